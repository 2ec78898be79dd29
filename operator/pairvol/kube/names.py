"""Names on Kubernetes objects that the agent writes and the operator reads (or the reverse).

Both sides import them from here, so neither imports the other for a string.
"""

from __future__ import annotations

#: On the primary's Lease: ``"<epoch>"`` — the secondary missed writes the primary
#: acknowledged at that epoch. Set by the agent before such a write is acknowledged; the
#: operator never promotes a secondary so marked (docs/correctness.md).
OUT_OF_SYNC_ANNOTATION = "pairvol.io/out-of-sync"
