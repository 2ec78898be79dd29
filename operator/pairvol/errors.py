"""The one root exception of the package.

Every error pairvol raises on purpose derives from :class:`PairvolError`, so callers can
catch ours without catching bugs. Sub-packages derive their own, narrower classes.
"""


class PairvolError(Exception):
    """Root of all pairvol errors."""
