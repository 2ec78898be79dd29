"""Names on Kubernetes objects that the agent writes and the operator reads (or the reverse).

Both sides import them from here, so neither imports the other for a string.
"""

from __future__ import annotations

#: On the primary's Lease: ``"<epoch>"`` — the secondary missed writes the primary
#: acknowledged at that epoch. Set by the agent before such a write is acknowledged; the
#: operator never promotes a secondary so marked (docs/correctness.md).
OUT_OF_SYNC_ANNOTATION = "pairvol.io/out-of-sync"

#: On the primary's Lease: ``"<epoch>"`` — the primary is rewriting its secondary on its own
#: (automatic re-protection, docs/correctness.md R5): until it is in sync again the
#: secondary's disk is a partial copy, no state the volume had, and is not promoted even by
#: hand. Set by the agent before the first byte of such a resync is copied; removed, with
#: the out-of-sync mark, once the peer is in sync.
RESYNC_ANNOTATION = "pairvol.io/resync"
