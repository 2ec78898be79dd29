"""The benchmark harness's one exception, under pairvol's root exception, so a failed
setup (missing fio, a daemon that would not start) reads as a clear message rather
than a traceback from deep inside asyncio."""

from __future__ import annotations

from pairvol.errors import PairvolError


class BenchError(PairvolError):
    """A benchmark could not be run or produced no usable numbers."""
