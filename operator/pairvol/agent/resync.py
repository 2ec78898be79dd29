"""Which copy a re-protection needs: the pure decision behind ``sync: "auto"`` (no I/O).

A primary that lost its peer keeps a dirty bitmap of every region the peer may lack
(docs/correctness.md, R1), recorded against the identity of the peer's disk. When the
same disk comes back, only those regions are copied; anything else — a new node, a
disk whose identity does not match, a bitmap that did not survive — is a full copy, and
the reason is said. The secondary has the last word: it only answers to the export name
that carries its own identity (R3), so a wrong decision here can only cost a fallback to
a full copy, never a partial copy onto the wrong disk.

Where no record vouches for the peer's disk but the peer holds data of the volume's size
(the old primary rejoining after a failover), :func:`refine` turns the full copy into a
checksum resync: both sides compare digests and only the differing regions are copied
(R4). Only a full copy is always correct without knowing anything about the peer's disk,
so every doubt about it (unreachable, another size, another disk, blank) keeps the full copy.

The old primary rejoining after a planned failover is the case where the history is known
after all (docs/correctness.md, R6): it stopped cleanly in sync with the secondary's disk at
a sync point, the secondary was promoted from exactly that point in Latest mode, and since
then the new primary's dirty bitmap recorded every region it wrote. :func:`refine` then
copies that bitmap (the union of the differences is only what the new primary wrote: the
old one wrote nothing its secondary lacked) instead of comparing. Both halves must name the
same sync point; anything short of that keeps the comparison (or the full copy), with the
reason why there is no union.
"""

from __future__ import annotations

from dataclasses import dataclass

NONE, FULL, BITMAP = "none", "full", "bitmap"
REQUESTS = ("none", "full", "auto")


@dataclass(frozen=True)
class SyncPoint:
    """A state of a secondary's disk both replicas can name: the disk identity ``disk``
    (replaced whenever the disk may hold anything but one primary's replicated writes, and
    at a promotion, so never reused) while it ran as secondary at ``epoch``."""

    disk: str
    epoch: int

    def to_api(self) -> dict[str, object]:
        return {"disk": self.disk, "epoch": self.epoch}


@dataclass(frozen=True)
class SyncPlan:
    kind: str  # none | full | bitmap | checksum
    reason: str
    # connect to the peer's identity export for this disk (None: the plain export, whose
    # content the primary then cannot vouch for afterwards)
    peer_disk: str | None
    # a bitmap resync of the regions written since the promotion from this sync point (R6):
    # the since-promotion record becomes the record about ``peer_disk``
    union: SyncPoint | None = None


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


# ---------------------------------------------------------------------- checksum resync

CHECKSUM = "checksum"


@dataclass(frozen=True)
class PeerView:
    """What the peer's agent said about its disk when the primary asked it
    (``POST /v1/digests`` with no range), or why it could not be asked."""

    disk: str | None
    size: int | None
    error: str | None = None
    written: int | None = None  # bytes of its disk ever written with data, if its file system says
    # R6: the peer's disk is unchanged since it stopped cleanly (as primary) in sync with this
    # sync point; or None, and why not
    stopped_in_sync: SyncPoint | None = None
    not_in_sync: str | None = None


@dataclass(frozen=True)
class SincePromotion:
    """This primary's record of what it wrote since it was promoted (R6)."""

    source: SyncPoint | None  # promoted in Latest mode from this sync point (None: no record)
    bitmap_present: bool  # the dirty bitmap of the writes since then exists in the daemon
    reason: str | None = None  # why there is no record, if known


# a disk with no more data than this was never given a volume's content: nothing to compare
BLANK_LIMIT = 64 * 1024


def needs_peer_view(requested: str, plan: SyncPlan) -> bool:
    """Whether a comparison could replace the full copy ``choose`` settled for: the caller
    asked ``auto`` and named the peer's disk, but nothing the primary holds vouches for it."""
    return requested == "auto" and plan.kind == FULL and plan.peer_disk is not None


@dataclass(frozen=True)
class StopView:
    """What a primary's clean stop knows once its workload exports are gone (every write
    completed on the quorum, so on both children) and before its peer leaves the quorum."""

    linked: bool  # a link to the peer is a child of the quorum
    gate_failed: str | None  # the link's gate failed, and why
    syncing: bool  # a copy to the peer runs
    marked: bool  # the peer is marked out of sync (in memory or in the state)
    tracking: bool  # a dirty bitmap of what the peer lacks runs
    replicating: bool  # the replica reports synchronous replication
    local_failed: str | None  # the local disk failed a request the peer served
    link_disk: str | None  # the identity export the link is connected to
    recorded_disk: str | None  # the peer disk the state records (R1, R3)
    link_epoch: int | None  # the peer epoch the link was made to


def attest(view: StopView) -> SyncPoint | str:
    """R6.1: the sync point this disk stopped in sync with, or why there is none. Only when
    the peer received every write this disk holds and nothing else: a link that never
    failed, the peer in sync, the local disk never failing, and the peer's identity known."""
    if not view.linked:
        return "no peer was in the quorum at the stop"
    if view.gate_failed is not None:
        return f"the link to the peer had failed ({view.gate_failed})"
    if view.syncing or view.marked or view.tracking or not view.replicating:
        return "the peer was not in sync at the stop"
    if view.local_failed is not None:
        return f"the local disk failed a request the peer served ({view.local_failed})"
    if view.link_disk is None or view.link_disk != view.recorded_disk or view.link_epoch is None:
        return "the peer's disk identity was not recorded (it was paired through its plain export)"
    return SyncPoint(view.link_disk, view.link_epoch)


def union(peer: PeerView, since: SincePromotion | None) -> SyncPoint | str:
    """The sync point from which the peer's disk differs from this primary's only by the
    regions this primary wrote since its promotion (R6), or why there is none. Both halves
    must be there and name the same point: the peer's clean stop in sync with a disk at an
    epoch, and this primary's promotion from that disk at that epoch with its bitmap intact."""
    if since is None or since.source is None:
        why = since.reason if since is not None and since.reason else "it was not promoted from a secondary"
        return f"this primary has no record of what it wrote since a promotion ({why})"
    if not since.bitmap_present:
        return "this primary's record of what it wrote since its promotion is not in its daemon"
    src, att = since.source, peer.stopped_in_sync
    if att is None:
        return f"the peer's disk holds no clean stop in sync ({peer.not_in_sync or 'none was reported'})"
    if att != src:
        return (
            f"the peer stopped in sync with disk {att.disk} at epoch {att.epoch}, but this primary was "
            f"promoted from disk {src.disk} at epoch {src.epoch}"
        )
    return src


def refine(plan: SyncPlan, peer: PeerView, size: int, since: SincePromotion | None = None) -> SyncPlan:
    """A full copy where the peer's history is unknown becomes a checksum resync when the
    peer has that disk at the volume's size: both sides compare digests region by region
    and only the regions that differ are copied (docs/correctness.md, R4). A new node,
    another size, another disk or a peer that cannot be asked keeps the full copy.

    Where the peer's history is known after all — it stopped cleanly in sync with the very
    disk this primary was promoted from (``since``) — only the regions this primary wrote
    since the promotion are copied: a bitmap resync of its since-promotion record (R6)."""
    if plan.kind != FULL or plan.peer_disk is None:
        return plan
    if peer.error is not None:
        return SyncPlan(FULL, f"{plan.reason}; the peer could not be asked for checksums ({peer.error})",
                        plan.peer_disk)
    if peer.disk != plan.peer_disk:
        return SyncPlan(FULL, f"{plan.reason}; the peer's disk is {peer.disk}, not {plan.peer_disk}", plan.peer_disk)
    if peer.size != size:
        return SyncPlan(
            FULL, f"{plan.reason}; the peer's disk holds {peer.size} bytes, the volume {size}: a size change",
            plan.peer_disk,
        )
    point = union(peer, since)
    if isinstance(point, SyncPoint):
        return SyncPlan(
            BITMAP,
            f"the peer's disk {plan.peer_disk} stopped cleanly in sync with disk {point.disk} at epoch "
            f"{point.epoch}: copying only the regions written since the promotion from {point.disk} at epoch "
            f"{point.epoch}",
            plan.peer_disk,
            union=point,
        )
    if peer.written is not None and peer.written <= BLANK_LIMIT:
        return SyncPlan(
            FULL, f"{plan.reason}; the peer's disk is blank ({peer.written} bytes ever written): nothing to compare",
            plan.peer_disk,
        )
    return SyncPlan(
        CHECKSUM,
        f"the history of the peer's disk {plan.peer_disk} is unknown ({plan.reason}; no union: {point}): "
        "copying only the regions whose checksums differ",
        plan.peer_disk,
    )


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


def automatic_allowed(plan: SyncPlan) -> bool:
    """An automatic attempt only runs a bitmap resync: the record vouches for the peer's
    disk, and the attempt cannot change the record (the bitmap keeps every bit until the
    peer is in sync). A full copy or a comparison is for whoever pairs (``POST /v1/primary``):
    an attempt that chose one would destroy the record a caller's re-pair relies on."""
    return plan.kind == BITMAP
