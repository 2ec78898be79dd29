"""Which copy a re-protection needs: the pure decision behind ``sync: "auto"`` (no I/O).

A primary that lost its peer keeps a dirty bitmap of every region the peer may lack
(docs/correctness.md, R1), recorded against the identity of the peer's disk. When the
same disk comes back, only those regions are copied; anything else — a new node, a
disk whose identity does not match, a bitmap that did not survive — is a full copy, and
the reason is said. The secondary has the last word: it only answers to the export name
that carries its own identity (R3), so a wrong decision here can only cost a fallback to
a full copy, never a partial copy onto the wrong disk.
"""

from __future__ import annotations

from dataclasses import dataclass

NONE, FULL, BITMAP = "none", "full", "bitmap"
REQUESTS = ("none", "full", "auto")


@dataclass(frozen=True)
class SyncPlan:
    kind: str  # none | full | bitmap
    reason: str
    # connect to the peer's identity export for this disk (None: the plain export, whose
    # content the primary then cannot vouch for afterwards)
    peer_disk: str | None


@dataclass(frozen=True)
class Record:
    """What the primary knows about a peer disk (persisted in its state)."""

    peer_disk: str | None  # the disk the bitmap is about
    tracking: bool  # the bitmap holds every region that disk may lack
    bitmap_present: bool  # the bitmap exists in the running daemon
    full_reason: str | None  # why there is no usable record, if known


def choose(requested: str, peer_disk: str | None, record: Record) -> SyncPlan:
    """The copy for ``POST /v1/primary {"sync": requested, "peerDisk": peer_disk}``."""
    if requested == NONE:
        return SyncPlan(NONE, "the caller vouches that the peer holds the volume", None)
    if requested == FULL:
        return SyncPlan(FULL, "requested", peer_disk)
    if requested != "auto":
        raise ValueError(f"unknown sync request {requested!r}")
    if peer_disk is None:
        return SyncPlan(FULL, "the peer's disk identity (peerDisk) was not given: its content is unknown", None)
    if record.peer_disk is None:
        why = record.full_reason or "a new pairing: the primary has no record of this peer's disk"
        return SyncPlan(FULL, why, peer_disk)
    if record.peer_disk != peer_disk:
        return SyncPlan(
            FULL,
            f"the peer's disk {peer_disk} is not the one the primary's bitmap was taken against ({record.peer_disk})",
            peer_disk,
        )
    if not record.tracking or not record.bitmap_present:
        why = record.full_reason or "no dirty bitmap for the peer's disk survived"
        return SyncPlan(FULL, why, peer_disk)
    return SyncPlan(BITMAP, f"the peer's disk {peer_disk} lacks at most the regions written since it was dropped",
                    peer_disk)


# ---------------------------------------------------------------- automatic re-protection
#
# A primary whose link to a peer failed while that peer may still be reachable (a reset
# connection, a write or flush the peer answered with an error) re-pairs with the same peer
# on its own, at the same epoch, with ``auto`` (docs/correctness.md, R5). The decision is
# here, pure; the steps are in the replica (``Replica._reprotect``).

# Delays before the automatic attempts after a drop, in seconds. A peer that keeps failing
# costs at most this many attempts (bounded, exponential), then the primary stops trying and
# says so; a new pairing (``POST /v1/primary``) starts the count over.
REPROTECT_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
# A peer that stayed in sync this long after a resync has shown the link works: a later drop
# starts the count over instead of continuing it.
REPROTECT_STABLE_S = 60.0


@dataclass(frozen=True)
class ReprotectView:
    """What the primary knows when its peer was dropped or an attempt failed."""

    serving: bool  # the workload export serves (not fenced, not demoted, not stopping)
    peer_configured: bool  # the current pairing names a peer
    attached: bool  # a link to the peer exists (being synced or in sync)
    failures: int  # drops and failed attempts since the count last started over


def reprotect_delay(view: ReprotectView) -> float | None:
    """Seconds until the next automatic attempt, or None: no attempt (nothing to re-protect,
    or the attempts are used up)."""
    if not view.serving or not view.peer_configured or view.attached:
        return None
    if view.failures < 1 or view.failures > len(REPROTECT_DELAYS_S):
        return None
    return REPROTECT_DELAYS_S[view.failures - 1]


def failures_after_drop(failures: int, in_sync_for_s: float | None) -> int:
    """The count after one more drop: a link that had stayed in sync for
    ``REPROTECT_STABLE_S`` starts it over; a drop during a resync, or soon after one, adds to it."""
    if in_sync_for_s is not None and in_sync_for_s >= REPROTECT_STABLE_S:
        return 1
    return failures + 1
