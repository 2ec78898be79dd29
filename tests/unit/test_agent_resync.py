"""``sync: "auto"``: which copy a re-protection makes (pairvol.agent.resync, pure), and the
records and recipes behind it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pairvol.agent import resync as rs
from pairvol.agent import state as persist
from pairvol.agent import validate as v
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


async def test_an_overlays_allocation_map_leaves_its_backing_out(tmp_path: Path) -> None:
    """R6.3 reads what a Checkpoint-mode commit will write: the clusters the overlay holds
    itself (data or zeroes), not what its backing file shows through."""
    base, overlay = tmp_path / "disk.raw", tmp_path / "hidden.qcow2"
    await img.run_qemu_img("create", "-q", "-f", "raw", str(base), "4M")
    await img.run_qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay))
    script = "write -P 7 0 1M\n"  # the backing's data: not the overlay's
    await _qemu_io(base, "raw", script)
    await _qemu_io(overlay, "qcow2", "write -P 1 64k 64k\nwrite -P 2 128k 64k\nwrite -z 1M 64k\n")
    assert await img.allocated_ranges(overlay) == [(64 << 10, 128 << 10), (1 << 20, 64 << 10)]


async def _qemu_io(path: Path, fmt: str, script: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "qemu-io", "-f", fmt, str(path), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL
    )
    await proc.communicate(script.encode())
    assert proc.returncode == 0
