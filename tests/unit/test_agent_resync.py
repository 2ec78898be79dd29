"""``sync: "auto"``: which copy a re-protection makes (pairvol.agent.resync, pure), and the
records and recipes behind it."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
from pathlib import Path

import pytest

from pairvol.agent import resync as rs
from pairvol.agent import state as persist
from pairvol.agent import validate as v
from pairvol.qemu import img
from pairvol.qemu import recipes as r

X = "a" * 32
Y = "b" * 32
TRACKED = rs.Record(peer_disk=X, tracking=True, bitmap_present=True, full_reason=None)


def test_the_tracked_disk_coming_back_gets_a_bitmap_resync_against_its_identity() -> None:
    plan = rs.choose("auto", X, TRACKED)
    assert plan.kind == rs.BITMAP
    assert plan.peer_disk == X  # the identity export: the secondary refuses it if its disk is another


def test_another_disk_gets_a_full_copy_and_the_reason_names_both() -> None:
    plan = rs.choose("auto", Y, TRACKED)
    assert plan.kind == rs.FULL
    assert X in plan.reason and Y in plan.reason
    assert plan.peer_disk == Y  # the full copy is made through Y's identity export, so Y is recorded after


def test_without_the_peers_identity_auto_copies_everything() -> None:
    plan = rs.choose("auto", None, TRACKED)
    assert plan == rs.SyncPlan(rs.FULL, plan.reason, None)
    assert "peerDisk" in plan.reason


@pytest.mark.parametrize(
    ("record", "why"),
    [
        (rs.Record(None, False, False, None), "new pairing"),
        (rs.Record(None, False, False, "the primary's agent restarted"), "restarted"),
        (rs.Record(X, False, True, None), "no dirty bitmap"),  # in sync when last seen, nothing tracked
        (rs.Record(X, True, False, None), "no dirty bitmap"),  # tracked, but the daemon that held it is gone
    ],
)
def test_auto_falls_back_to_full_when_nothing_vouches_for_the_peer(record: rs.Record, why: str) -> None:
    plan = rs.choose("auto", X, record)
    assert plan.kind == rs.FULL
    assert why in plan.reason


def test_explicit_requests_are_kept() -> None:
    assert rs.choose("full", X, TRACKED).kind == rs.FULL
    assert rs.choose("full", X, TRACKED).reason == "requested"
    assert rs.choose("none", X, TRACKED).kind == rs.NONE
    with pytest.raises(ValueError, match="unknown sync"):
        rs.choose("checksum", X, TRACKED)


def test_the_records_survive_the_state_file(tmp_path: Path) -> None:
    st = persist.PersistedState(
        name="vol", size=1 << 20, disk_id=X, boot_id="boot", peer_disk=Y, tracking=True, full_reason="why"
    )
    persist.save(tmp_path, st)
    assert persist.load(tmp_path) == st


def test_a_state_written_before_the_records_existed_knows_nothing_about_the_peer() -> None:
    data = json.loads(persist.PersistedState(name="vol", size=1 << 20, peer_disk=X, tracking=True).to_json())
    for key in ("disk_id", "boot_id", "peer_disk", "tracking", "full_reason"):
        del data[key]  # an older writer had none of these fields
    st = persist.PersistedState.from_json(json.dumps(data))
    assert (st.disk_id, st.peer_disk, st.tracking) == (None, None, False)


def test_the_identity_export_is_the_epochs_export_plus_the_disk() -> None:
    assert r.identity_export_name(7, X) == f"replication-e7-d{X}"
    assert r.identity_export_name(7, X) != r.identity_export_name(7, Y)


def test_the_copy_is_serialised_by_a_backup_job_above_the_quorum() -> None:
    args = r.backup_bitmap()
    assert args["device"] == r.QUORUM_NODE  # R2: its copy-before-write filter sits above both children
    assert args["sync"] == "bitmap" and args["bitmap"] == r.TRACK_BITMAP
    assert args["bitmap-mode"] == "never"  # bits go only when the peer is declared in sync
    assert r.track_bitmap()["node"] == r.QUORUM_NODE  # R1: bits set when the quorum completes a write


@pytest.mark.parametrize("bad", [X.upper(), X[:-1], X + "0", 5, "", "../" + X[:29]])
def test_peer_disk_must_be_an_identity(bad: object) -> None:
    with pytest.raises(v.InvalidInput, match="peerDisk"):
        v.parse_peer_disk({"peerDisk": bad})


def test_sync_auto_is_accepted() -> None:
    assert v.parse_sync({"sync": "auto"}) == "auto"
    assert v.parse_peer_disk({"peerDisk": X}) == X
    assert v.parse_peer_disk({}) is None


# ---------------------------------------------------------------- automatic re-protection


def dropped(failures: int, **kw: bool) -> rs.ReprotectView:
    fields = {"serving": True, "peer_configured": True, "attached": False, **kw}
    return rs.ReprotectView(failures=failures, **fields)


def test_a_dropped_peer_is_retried_soon_and_then_each_time_later() -> None:
    delays = [rs.reprotect_delay(dropped(n)) for n in range(1, len(rs.REPROTECT_DELAYS_S) + 1)]
    assert delays[0] is not None and delays[0] <= 1.0
    assert all(d is not None for d in delays)
    assert delays == sorted(delays) and len(set(delays)) == len(delays)


def test_a_peer_that_keeps_failing_is_given_up_after_a_bounded_number_of_attempts() -> None:
    assert rs.reprotect_delay(dropped(len(rs.REPROTECT_DELAYS_S) + 1)) is None
    # the whole schedule is bounded: at most a few minutes of attempts
    assert sum(rs.REPROTECT_DELAYS_S) < 120


@pytest.mark.parametrize(
    "why",
    [{"serving": False}, {"peer_configured": False}, {"attached": True}],
    ids=["not serving (fenced, demoted, stopping)", "no peer in this pairing", "a link is attached already"],
)
def test_nothing_is_re_protected_that_is_not_a_serving_primary_without_its_peer(why: dict[str, bool]) -> None:
    assert rs.reprotect_delay(dropped(1, **why)) is None


def test_no_attempt_without_a_drop() -> None:
    assert rs.reprotect_delay(dropped(0)) is None


def test_a_drop_soon_after_a_resync_adds_to_the_count_one_after_a_stable_link_starts_it_over() -> None:
    assert rs.failures_after_drop(3, None) == 4  # dropped during a resync
    assert rs.failures_after_drop(3, rs.REPROTECT_STABLE_S / 2) == 4  # flapping: no storm
    assert rs.failures_after_drop(5, rs.REPROTECT_STABLE_S) == 1
    assert rs.failures_after_drop(0, None) == 1


def test_an_automatic_attempt_runs_only_a_bitmap_resync_and_leaves_anything_else_to_the_caller() -> None:
    """The record vouches for the peer's disk: the attempt copies what it missed. Anything
    else (a full copy, a comparison) would replace the record a caller's own re-pair relies
    on — a bitmap resync the caller asked for would become a full one."""
    assert rs.automatic_allowed(rs.choose("auto", X, TRACKED))
    for record in (rs.Record(None, False, False, None), rs.Record(X, True, False, None)):
        assert not rs.automatic_allowed(rs.choose("auto", X, record))
    assert not rs.automatic_allowed(rs.choose("auto", Y, TRACKED))
    assert not rs.automatic_allowed(rs.choose("auto", None, TRACKED))
    assert not rs.automatic_allowed(rs.SyncPlan(rs.CHECKSUM, "data of unknown history", X))


# ---------------------------------------------------------------- union resync (R6)

SIZE = 64 << 20
P = rs.SyncPoint(X, 3)  # the secondary's disk X at its epoch 3
NEW = "c" * 32  # the old primary's identity as the new primary's secondary
ASKED = rs.SyncPlan(rs.FULL, "a new pairing: the primary has no record of this peer's disk", NEW)
ATTESTS = rs.PeerView(NEW, SIZE, written=SIZE, stopped_in_sync=P)
INTACT = rs.SincePromotion(P, bitmap_present=True)


def test_the_old_primary_that_stopped_in_sync_with_the_promoted_disk_gets_the_union() -> None:
    plan = rs.refine(ASKED, ATTESTS, SIZE, INTACT)
    assert plan.kind == rs.BITMAP and plan.union == P
    assert plan.peer_disk == NEW  # copied through its identity export (R3)
    assert plan.reason == (
        f"the peer's disk {NEW} stopped cleanly in sync with disk {X} at epoch 3: "
        f"copying only the regions written since the promotion from {X} at epoch 3"
    )


@pytest.mark.parametrize(
    ("peer", "since", "why"),
    [
        (ATTESTS, None, "no record of what it wrote since a promotion (it was not promoted from a secondary)"),
        (ATTESTS, rs.SincePromotion(None, True, "it was promoted in checkpoint mode: rolled back"),
         "no record of what it wrote since a promotion (it was promoted in checkpoint mode: rolled back)"),
        (ATTESTS, rs.SincePromotion(P, bitmap_present=False), "is not in its daemon"),
        (rs.PeerView(NEW, SIZE, written=SIZE, not_in_sync="its last stop was not clean"), INTACT,
         "holds no clean stop in sync (its last stop was not clean)"),
        (rs.PeerView(NEW, SIZE, written=SIZE), INTACT, "holds no clean stop in sync (none was reported)"),
        (rs.PeerView(NEW, SIZE, written=SIZE, stopped_in_sync=rs.SyncPoint(X, 2)), INTACT,
         f"stopped in sync with disk {X} at epoch 2, but this primary was promoted from disk {X} at epoch 3"),
        (rs.PeerView(NEW, SIZE, written=SIZE, stopped_in_sync=rs.SyncPoint(Y, 3)), INTACT,
         f"stopped in sync with disk {Y} at epoch 3"),
    ],
)
def test_without_both_halves_of_the_union_the_peer_is_compared_and_the_reason_says_why(
    peer: rs.PeerView, since: rs.SincePromotion | None, why: str
) -> None:
    plan = rs.refine(ASKED, peer, SIZE, since)
    assert plan.kind == rs.CHECKSUM and plan.union is None
    assert "no union: " in plan.reason and why in plan.reason, plan.reason


@pytest.mark.parametrize(
    ("peer", "why"),
    [
        (rs.PeerView(None, None, "connection refused", stopped_in_sync=P), "could not be asked"),
        (rs.PeerView(Y, SIZE, written=SIZE, stopped_in_sync=P), f"the peer's disk is {Y}, not {NEW}"),
        (rs.PeerView(NEW, SIZE // 2, written=SIZE, stopped_in_sync=P), "a size change"),
    ],
)
def test_a_peer_that_is_not_the_asked_disk_at_the_volumes_size_is_copied_in_full_whatever_it_attests(
    peer: rs.PeerView, why: str
) -> None:
    plan = rs.refine(ASKED, peer, SIZE, INTACT)
    assert plan.kind == rs.FULL and plan.union is None and why in plan.reason, plan


def test_only_a_full_copy_that_names_the_peers_disk_becomes_a_union() -> None:
    for plan in (
        rs.SyncPlan(rs.FULL, "requested", None),
        rs.SyncPlan(rs.BITMAP, "tracked", X),
        rs.SyncPlan(rs.NONE, "vouched", None),
    ):
        assert rs.refine(plan, ATTESTS, SIZE, INTACT) == plan


def test_the_union_is_chosen_exactly_when_every_condition_holds() -> None:
    """Every combination of the peer's answer and this primary's record: a bitmap resync
    only when the peer is the asked disk at the volume's size, attests the sync point, and
    this primary's record from that same point has its bitmap."""
    points = [None, P, rs.SyncPoint(X, 2), rs.SyncPoint(Y, 3)]
    peers = [
        rs.PeerView(disk, size, error, written=SIZE, stopped_in_sync=att)
        for disk in (NEW, Y)
        for size in (SIZE, SIZE - 4096)
        for error in (None, "refused")
        for att in points
    ]
    records = [None] + [rs.SincePromotion(src, present) for src in points for present in (True, False)]
    for peer in peers:
        for since in records:
            plan = rs.refine(ASKED, peer, SIZE, since)
            union = (
                peer.error is None and peer.disk == NEW and peer.size == SIZE
                and since is not None and since.source is not None and since.bitmap_present
                and peer.stopped_in_sync == since.source
            )
            assert (plan.kind == rs.BITMAP) == union, (peer, since, plan)
            assert (plan.union is not None) == union
            if union:
                assert since is not None and plan.union == since.source  # the recorded point
                assert plan.peer_disk == NEW
            elif peer.error is None and peer.disk == NEW and peer.size == SIZE:
                assert plan.kind == rs.CHECKSUM and "no union: " in plan.reason
            else:
                assert plan.kind == rs.FULL


def test_the_union_records_survive_the_state_file(tmp_path: Path) -> None:
    st = persist.PersistedState(
        name="v", size=SIZE, stopped_in_sync=P, stop_note=None, promoted_from=rs.SyncPoint(Y, 7),
        union_reason="kept",
    )
    persist.save(tmp_path, st)
    assert persist.load(tmp_path) == st


def test_a_state_written_before_the_union_existed_has_no_attestation_and_no_record() -> None:
    old = json.loads(persist.PersistedState(name="v", size=SIZE).to_json())
    for key in ("stopped_in_sync", "stop_note", "promoted_from", "union_reason"):
        del old[key]
    st = persist.PersistedState.from_json(json.dumps(old))
    assert st.stopped_in_sync is None and st.promoted_from is None


IN_SYNC = rs.StopView(
    linked=True, gate_failed=None, syncing=False, marked=False, tracking=False, replicating=True,
    local_failed=None, link_disk=X, recorded_disk=X, link_epoch=3,
)


def test_a_drained_stop_with_the_peer_in_sync_attests_the_peers_disk_at_the_links_epoch() -> None:
    assert rs.attest(IN_SYNC) == P


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"linked": False, "link_disk": None}, "no peer was in the quorum at the stop"),
        ({"gate_failed": "stalled"}, "the link to the peer had failed (stalled)"),
        ({"syncing": True}, "the peer was not in sync at the stop"),
        ({"marked": True}, "the peer was not in sync at the stop"),
        ({"tracking": True}, "the peer was not in sync at the stop"),
        ({"replicating": False}, "the peer was not in sync at the stop"),
        ({"local_failed": "EIO"}, "the local disk failed a request the peer served (EIO)"),
        ({"link_disk": None}, "identity was not recorded"),
        ({"recorded_disk": Y}, "identity was not recorded"),
        ({"recorded_disk": None}, "identity was not recorded"),
        ({"link_epoch": None}, "identity was not recorded"),
    ],
)
def test_a_stop_that_may_leave_the_disks_different_attests_nothing_and_says_why(
    change: dict[str, object], why: str
) -> None:
    verdict = rs.attest(dataclasses.replace(IN_SYNC, **change))  # type: ignore[arg-type]
    assert isinstance(verdict, str) and why in verdict, verdict


def test_every_stop_short_of_in_sync_attests_nothing() -> None:
    """Every combination of the stop's conditions: a sync point only when all hold."""
    flags = ("linked", "syncing", "marked", "tracking", "replicating")
    for bits in itertools.product((False, True), repeat=len(flags)):
        for gate, local, disk in itertools.product((None, "x"), (None, "y"), (X, Y, None)):
            view = dataclasses.replace(
                IN_SYNC, **dict(zip(flags, bits, strict=True)), gate_failed=gate, local_failed=local, link_disk=disk
            )
            good = (
                view.linked and not view.syncing and not view.marked and not view.tracking and view.replicating
                and gate is None and local is None and disk == X
            )
            assert isinstance(rs.attest(view), rs.SyncPoint) == good, view


async def test_an_overlays_allocation_map_leaves_its_backing_out(tmp_path: Path) -> None:
    """R6.3 reads what a Checkpoint-mode commit will write: the clusters the overlay holds
    itself (data or zeroes), not what its backing file shows through."""
    base, overlay = tmp_path / "disk.raw", tmp_path / "hidden.qcow2"
    await img.run_qemu_img("create", "-q", "-f", "raw", str(base), "4M")
    await img.run_qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay))
    await _qemu_io(base, "raw", "write -P 7 0 1M\n")  # the backing's data: not the overlay's
    await _qemu_io(overlay, "qcow2", "write -P 1 64k 64k\nwrite -P 2 128k 64k\nwrite -z 1M 64k\n")
    assert await img.allocated_ranges(overlay) == [(64 << 10, 128 << 10), (1 << 20, 64 << 10)]


async def _qemu_io(path: Path, fmt: str, script: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "qemu-io", "-f", fmt, str(path), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL
    )
    await proc.communicate(script.encode())
    assert proc.returncode == 0
