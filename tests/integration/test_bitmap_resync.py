"""Bitmap resync after a transient secondary outage (issue 10, docs/correctness.md R1-R3).

Real agents and daemons. The secondary is killed while the primary writes; the primary
goes on alone and tracks what the secondary misses; the secondary restarts on the same
data dir; ``sync: "auto"`` copies only the tracked regions while the workload keeps
writing, then replication is synchronous again. Every test ends by comparing the two disks
byte for byte, and with a failover that must show every acknowledged write.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pairvol.agent import crashpoints
from pairvol.agent import state as persist
from pairvol.agent.peerlink import RESYNC_ISSUED
from pairvol.agent.procs import AgentCallError
from pairvol.aio import bounded
from pairvol.nbd import NBDClient
from pairvol.qemu import recipes as r
from tests.support.agents import Agent, frozen
from tests.support.bytes_compare import assert_same_image
from tests.support.writelog import WriteLog

MiB = 1 << 20
SIZE = 64 * MiB


async def wait_for(agent: Agent, pred: Any, within: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        st = await agent.status()
        if pred(st):
            return st
        assert time.monotonic() < deadline, f"{what}: not within {within} s: {st}"
        await asyncio.sleep(0.05)


async def make_primary(
    primary: Agent,
    epoch: int,
    secondary: Agent,
    sync: str,
    peer_epoch: int,
    peer_disk: str | None,
    peer_api: bool = False,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "epoch": epoch,
        "peer": secondary.replication_address,
        "sync": sync,
        "peerEpoch": peer_epoch,
    }
    if peer_api:
        # as the operator sends it: the primary has the secondary end its older replication
        # connections before each link (docs/correctness.md R5), which an automatic
        # re-protection needs; without it a checksum resync replaces "no record" copies too
        body["peerApi"] = secondary.api.removeprefix("http://")
    if peer_disk is not None:
        body["peerDisk"] = peer_disk
    return await primary.call("POST", "/v1/primary", body)


async def disk_id(agent: Agent) -> str | None:
    ident = (await agent.status())["disk"]["id"]
    assert ident is None or isinstance(ident, str)
    return ident


async def read_all(nbd: NBDClient) -> bytes:
    return b"".join([await nbd.pread(4 * MiB, off) for off in range(0, SIZE, 4 * MiB)])


def image(agent: Agent) -> bytes:
    return (agent.data_dir / "disk.raw").read_bytes()


# The tests here drive every re-pairing through POST /v1/primary, the contract they specify;
# the primary's own re-protection (docs/correctness.md R5) is test_auto_resync.py's subject,
# and would otherwise race the tests' calls.
BY_HAND = ["--auto-reprotect", "off"]


@contextlib.asynccontextmanager
async def replicating_pair(
    tmp: Path, peer_api: bool = False, **kw: Any
) -> AsyncIterator[tuple[Agent, Agent, str]]:
    """Secondary at epoch 1, primary at epoch 2, fully synced against the secondary's disk
    identity (so the primary records which disk its peer is); ``peer_api``: paired as the
    operator pairs, naming the secondary's agent API."""
    primary = Agent("vol", tmp / "replica-0", "64Mi", **kw)
    secondary = Agent("vol", tmp / "replica-1", "64Mi", **kw)
    try:
        await asyncio.gather(primary.start(), secondary.start())
        await secondary.secondary(1)
        ident = await disk_id(secondary)
        assert ident is not None
        await make_primary(primary, 2, secondary, "full", 1, ident, peer_api)
        st = await primary.wait_replicating()
        assert st["replication"]["resync"]["peerDisk"] == ident
        yield primary, secondary, ident
    finally:
        await asyncio.gather(primary.stop(), secondary.stop(), return_exceptions=True)


async def fill(nbd: NBDClient, pattern: int, offsets: list[int], length: int = 64 * 1024) -> None:
    for off in offsets:
        await nbd.pwrite(bytes([pattern]) * length, off)


async def kill_secondary_and_write(primary: Agent, secondary: Agent, nbd: NBDClient, offsets: list[int]) -> None:
    secondary.kill()
    await secondary.wait_exit()
    await fill(nbd, 0xB0, offsets)  # the first write waits for the link to be dropped
    st = await wait_for(primary, lambda s: s["replication"]["state"] == "degraded", 15, "peer dropped")
    assert st["replication"]["outOfSync"] is True
    assert st["replication"]["resync"]["tracking"] is True, st["replication"]["resync"]


async def test_a_restarted_secondary_gets_only_the_regions_written_while_it_was_away(tmp_path: Path) -> None:
    async with replicating_pair(tmp_path, extra_args=BY_HAND) as (primary, secondary, ident):
        async with await primary.nbd() as nbd:
            await fill(nbd, 0xA0, [i * MiB for i in range(SIZE // MiB)], MiB)  # the whole volume, replicated
            changed = [3 * MiB, 17 * MiB + 4096, 40 * MiB, 63 * MiB]
            await kill_secondary_and_write(primary, secondary, nbd, changed)
            await secondary.start()  # the same data dir: its disk is kept, with its identity
            assert await disk_id(secondary) == ident
            started = await make_primary(primary, 3, secondary, "auto", 1, ident)
            sync = started["replication"]["sync"]  # the answer comes as the copy job starts
            assert (sync["kind"], started["replication"]["state"]) == ("bitmap", "syncing"), started["replication"]
            assert "lacks at most the regions written since it was dropped" in sync["reason"]
            assert 4 * 64 * 1024 <= sync["totalBytes"] <= 8 * 64 * 1024, sync  # what it copies, not the volume
            st = await primary.wait_replicating()
            last = st["replication"]["lastSync"]
            assert last["kind"] == "bitmap", last
            # 64 KiB granularity: each 64 KiB write touches one or two chunks
            assert 4 * 64 * 1024 <= last["copiedBytes"] <= 8 * 64 * 1024, last
            assert st["replication"]["outOfSync"] is False
            assert st["replication"]["resync"] == {"peerDisk": ident, "tracking": False, "fullReason": None}
            await fill(nbd, 0xC0, [5 * MiB])  # synchronous again
            await nbd.flush()
        assert_same_image(image(secondary), image(primary), "secondary after a bitmap resync")


async def test_auto_copies_everything_onto_a_disk_that_is_not_the_tracked_one(tmp_path: Path) -> None:
    """A secondary restarted on a fresh data dir has another identity: the primary asks for
    its tracked disk, the secondary has no export by that name, the primary copies it all."""
    async with replicating_pair(tmp_path, extra_args=BY_HAND) as (primary, secondary, ident):
        async with await primary.nbd() as nbd:
            await fill(nbd, 0xA0, [0, 9 * MiB])
            await kill_secondary_and_write(primary, secondary, nbd, [MiB])
            secondary.data_dir = tmp_path / "replica-1-new"
            await secondary.start()
            await secondary.secondary(3)
            other = await disk_id(secondary)
            assert other != ident
            # the operator's view may be stale: it names the old disk, the secondary refuses it
            await make_primary(primary, 4, secondary, "auto", 3, ident)
            st = await primary.wait_replicating()
            last = st["replication"]["lastSync"]
            assert last["kind"] == "full", last
            assert "refused" in last["reason"] and ident in last["reason"], last
            assert last["copiedBytes"] == SIZE
            assert st["replication"]["resync"]["peerDisk"] is None  # it cannot vouch for the disk's identity
            await nbd.flush()
        assert_same_image(image(secondary), image(primary), "secondary after the fallback to a full sync")


async def test_the_bitmap_survives_a_clean_restart_of_the_primary(tmp_path: Path) -> None:
    """A clean stop writes the bitmap into a qcow2 carrier in the data dir; the restarted
    primary loads it into its new daemon, and the resync still copies only what changed."""
    async with replicating_pair(tmp_path, extra_args=BY_HAND) as (primary, secondary, ident):
        async with await primary.nbd() as nbd:
            await fill(nbd, 0xA0, [i * MiB for i in range(SIZE // MiB)], MiB)
            await kill_secondary_and_write(primary, secondary, nbd, [2 * MiB, 50 * MiB])
        await primary.stop()  # SIGTERM: a clean stop
        await primary.start()
        assert not (primary.data_dir / "resync-bitmap.qcow2").exists(), "loaded, then deleted: never reused"
        st = await primary.status()
        assert st["replication"]["resync"] == {"peerDisk": ident, "tracking": True, "fullReason": None}
        await secondary.start()
        await make_primary(primary, 3, secondary, "auto", 1, ident)
        st = await primary.wait_replicating()
        last = st["replication"]["lastSync"]
        assert last["kind"] == "bitmap" and last["copiedBytes"] <= 4 * 64 * 1024, last
        assert_same_image(image(secondary), image(primary), "secondary after a resync across a primary restart")


async def test_a_clean_restart_while_in_sync_tracks_from_the_stop(tmp_path: Path) -> None:
    """Stopped while the peer was in sync: nothing was written without it, so the saved
    bitmap is empty, and the peer that comes back needs nothing but what is written later."""
    async with replicating_pair(tmp_path, extra_args=BY_HAND) as (primary, secondary, ident):
        async with await primary.nbd() as nbd:
            await fill(nbd, 0xA0, [0, 7 * MiB])
        await primary.stop()
        await primary.start()
        st = await primary.status()
        assert st["replication"]["resync"]["tracking"] is True
        await make_primary(primary, 3, secondary, "auto", 1, ident)
        st = await primary.wait_replicating()
        assert st["replication"]["lastSync"]["kind"] == "bitmap"
        assert st["replication"]["lastSync"]["copiedBytes"] == 0
        assert_same_image(image(secondary), image(primary), "secondary after a primary's clean restart")


async def test_an_unclean_primary_restart_falls_back_to_full_and_says_why(tmp_path: Path) -> None:
    async with replicating_pair(tmp_path, extra_args=BY_HAND) as (primary, secondary, ident):
        async with await primary.nbd() as nbd:
            await kill_secondary_and_write(primary, secondary, nbd, [MiB])
        primary.kill()  # SIGKILL: the bitmap dies with the daemon
        await primary.wait_exit()
        await primary.start()
        await secondary.start()
        st = await primary.status()
        assert st["replication"]["resync"]["peerDisk"] is None
        assert "unclean stop" in st["replication"]["resync"]["fullReason"]
        await make_primary(primary, 3, secondary, "auto", 1, ident)
        st = await primary.wait_replicating()
        assert st["replication"]["lastSync"]["kind"] == "full"
        assert "unclean stop" in st["replication"]["lastSync"]["reason"]
        assert_same_image(image(secondary), image(primary), "secondary after a full sync")


async def test_a_bitmap_resync_under_concurrent_writers_leaves_no_old_data_on_the_peer(tmp_path: Path) -> None:
    """The race the design closes (R2): the copy of a region and a new write to it. Writers
    keep overwriting the whole volume while the tracked regions (nearly all of it) are being
    copied; at the end both disks are equal, and a failover to the secondary shows every
    acknowledged write."""
    async with replicating_pair(tmp_path, extra_args=BY_HAND) as (primary, secondary, ident):
        log = WriteLog(writers=16, slots=SIZE // 4096)
        rng = random.Random(10)
        stop = asyncio.Event()
        async with await primary.nbd() as nbd:
            load = asyncio.create_task(log.run(nbd, stop, rng))
            try:
                await log.wait_acked(300)
                secondary.kill()
                await secondary.wait_exit()
                await wait_for(primary, lambda s: s["replication"]["state"] == "degraded", 15, "peer dropped")
                await log.wait_acked(log.acked() + 4000)  # ~98% of the 64 KiB chunks tracked
                await secondary.start()
                before = log.acked()
                await make_primary(primary, 3, secondary, "auto", 1, ident)
                st = await primary.wait_replicating()
                during = log.acked() - before
                last = st["replication"]["lastSync"]
                assert last["kind"] == "bitmap" and last["copiedBytes"] > SIZE // 2, last
                assert during > 20, f"only {during} writes were acknowledged while {last} ran: no race was tried"
                await log.wait_acked(log.acked() + 500)  # synchronous replication under the same load
            finally:
                stop.set()
                await load
            await nbd.flush()
        assert all(e == "stopped" for e in log.ended), log.ended
        assert_same_image(image(secondary), image(primary), "secondary after a bitmap resync under writes")
        acked_at = time.monotonic()
        primary.kill()
        await primary.wait_exit()
        await secondary.failover(4, "latest")
        assert await disk_id(secondary) is None, "a promoted disk is nobody's copy any more (R3)"
        async with await secondary.nbd() as nbd:
            promoted = await read_all(nbd)
        log.check_cut(promoted, acked_at, acked_at)


async def test_writes_in_flight_when_the_peer_dies_are_tracked(tmp_path: Path) -> None:
    """R1's hard case: writes the peer never answered, that the quorum completed from the
    local disk once the link was released. The writers stop once the peer is seen dropped;
    the resync copies at most the bitmap granules of the writes not acknowledged before the
    kill (a bound taken from the load's own record, whatever the machine's speed)."""
    async with replicating_pair(tmp_path, extra_args=BY_HAND) as (primary, secondary, ident):
        log = WriteLog(writers=32, slots=SIZE // 4096)
        rng = random.Random(11)
        stop = asyncio.Event()
        async with await primary.nbd() as nbd:
            load = asyncio.create_task(log.run(nbd, stop, rng))
            try:
                await log.wait_acked(500)
                killed_at = time.monotonic()
                secondary.kill()
                await secondary.wait_exit()
                await wait_for(primary, lambda s: s["replication"]["state"] == "degraded", 15, "peer dropped")
            finally:
                stop.set()
                await load
            await secondary.start()
            await make_primary(primary, 3, secondary, "auto", 1, ident)
            st = await primary.wait_replicating()
            assert st["replication"]["lastSync"]["kind"] == "bitmap"
            # what the peer may lack: every write not acknowledged before the kill
            late = {e.slot for h in log.history for e in h if e.acked is None or e.acked >= killed_at}
            granules = {log.offset(slot) // r.BITMAP_GRANULARITY for slot in late}
            bound = len(granules) * r.BITMAP_GRANULARITY
            assert 0 < st["replication"]["lastSync"]["copiedBytes"] <= bound, (st["replication"]["lastSync"], bound)
            await nbd.flush()
        assert_same_image(image(secondary), image(primary), "secondary after a bitmap resync")


async def test_a_peer_replaced_by_itself_under_writes_gets_a_bitmap_resync(tmp_path: Path) -> None:
    """A planned detach (the operator re-pairs with the same secondary): the peer leaves the
    quorum while the workload writes, so the bitmap must exist before it leaves (R1)."""
    async with replicating_pair(tmp_path, extra_args=BY_HAND) as (primary, secondary, ident):
        log = WriteLog(writers=16, slots=SIZE // 4096)
        stop = asyncio.Event()
        async with await primary.nbd() as nbd:
            load = asyncio.create_task(log.run(nbd, stop, random.Random(12)))
            try:
                for epoch in (3, 4, 5):
                    await log.wait_acked(log.acked() + 200)
                    await make_primary(primary, epoch, secondary, "auto", 1, ident)
                    st = await primary.wait_replicating()
                    assert st["replication"]["lastSync"]["kind"] == "bitmap", st["replication"]
                await log.wait_acked(log.acked() + 200)
            finally:
                stop.set()
                await load
            await nbd.flush()
        assert_same_image(image(secondary), image(primary), "secondary re-paired three times under writes")


async def test_a_secondary_killed_mid_resync_is_resynced_again_and_ends_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The resync is interrupted by the secondary's death: the bitmap keeps every bit it
    had (the copy job never clears them), so the next resync copies them all again.

    The primary freezes as soon as its first resync's copy job exists (``resync.issued``;
    the replication gate lives in the agent, so the copy stands still with it), the
    secondary is killed then, and the primary goes on: the kill lands while the job copies,
    however fast the machine."""
    monkeypatch.setenv(crashpoints.ENV, f"{RESYNC_ISSUED.name}:1:stop")  # the primary's only resync
    async with replicating_pair(tmp_path, extra_args=BY_HAND) as (primary, secondary, ident):
        monkeypatch.delenv(crashpoints.ENV)
        log = WriteLog(writers=16, slots=SIZE // 4096)
        stop = asyncio.Event()
        async with await primary.nbd() as nbd:
            load = asyncio.create_task(log.run(nbd, stop, random.Random(13)))
            try:
                await log.wait_acked(200)
                secondary.kill()
                await secondary.wait_exit()
                await wait_for(primary, lambda s: s["replication"]["state"] == "degraded", 15, "peer dropped")
                await fill(nbd, 0xD0, [i * MiB for i in range(SIZE // MiB)], MiB)  # all of it tracked
                await secondary.start()
                answer = asyncio.create_task(make_primary(primary, 3, secondary, "auto", 1, ident))
                try:
                    await frozen(primary, RESYNC_ISSUED.name)
                    secondary.kill()  # while the job copies
                    await secondary.wait_exit()
                finally:
                    assert primary.proc is not None
                    os.kill(primary.proc.pid, signal.SIGCONT)
                with contextlib.suppress(AgentCallError):  # the resync may fail before it answers
                    await answer
                st = await wait_for(primary, lambda s: s["replication"]["state"] == "degraded", 15, "dropped again")
                # still the initial pairing's full sync: the bitmap resync never finished
                assert st["replication"]["lastSync"]["kind"] == "full", "the resync finished before the kill"
                assert st["replication"]["resync"]["tracking"] is True
                await secondary.start()
                await make_primary(primary, 4, secondary, "auto", 1, ident)
                st = await primary.wait_replicating()
                assert st["replication"]["lastSync"]["kind"] == "bitmap", st["replication"]
                await log.wait_acked(log.acked() + 200)
            finally:
                stop.set()
                await load
            await nbd.flush()
        # the copy's failure never failed a workload write waiting for it (R2, the copy connection)
        assert all(e == "stopped" for e in log.ended), log.ended
        assert_same_image(image(secondary), image(primary), "secondary after an interrupted bitmap resync")


@pytest.mark.parametrize("crash_at", ["link.tracked", "resync.issued", "resync.started", "resync.copied"])
async def test_a_primary_crash_during_tracking_or_resync_costs_a_full_copy_and_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: str
) -> None:
    """The bitmap lives in the primary's daemon: a primary killed while it tracks or copies
    restarts without it, says so, and copies everything; the bytes end identical."""
    async with replicating_pair(tmp_path, extra_args=BY_HAND) as (primary, secondary, ident):
        async with await primary.nbd() as nbd:
            await fill(nbd, 0xA0, [i * MiB for i in range(0, SIZE // MiB, 4)], MiB)
        await primary.stop()
        monkeypatch.setenv(crashpoints.ENV, crash_at)
        await primary.start()
        monkeypatch.delenv(crashpoints.ENV)
        await make_primary(primary, 3, secondary, "full", 1, ident)  # the restarted primary re-pairs
        await primary.wait_replicating()
        secondary.kill()
        await secondary.wait_exit()
        with contextlib.suppress(Exception):  # the primary dies at the crash point under this write
            async with await primary.nbd() as nbd:
                await bounded(fill(nbd, 0xB0, [8 * MiB]), 15)
        await secondary.start()
        if crash_at.startswith("resync."):
            with contextlib.suppress(Exception):  # resync.issued|started: the primary dies before it answers
                await make_primary(primary, 4, secondary, "auto", 1, ident)
        try:
            code = await bounded(primary.wait_exit(), 60)
        except TimeoutError:
            raise AssertionError(f"the primary never reached {crash_at}:\n{primary.log_tail(80)}") from None
        assert code == -9, primary.log_tail()
        await primary.start()
        st = await primary.status()
        assert "restarted" in st["replication"]["resync"]["fullReason"]
        await make_primary(primary, 5, secondary, "auto", 1, ident)
        st = await primary.wait_replicating()
        assert st["replication"]["lastSync"]["kind"] == "full"
        assert "restarted" in st["replication"]["lastSync"]["reason"]
        assert_same_image(image(secondary), image(primary), f"secondary after a primary crash at {crash_at}")


async def test_a_secondary_back_on_a_new_boot_after_an_unclean_stop_is_not_trusted(tmp_path: Path) -> None:
    """Its daemon may have acknowledged writes that were still in the page cache when the
    node went down: the restarted secondary takes a new identity and gets a full copy."""
    async with replicating_pair(tmp_path, extra_args=BY_HAND) as (primary, secondary, ident):
        async with await primary.nbd() as nbd:
            await kill_secondary_and_write(primary, secondary, nbd, [MiB])  # SIGKILL: unclean
        found = persist.load(secondary.data_dir)
        assert found is not None and found.boot_id is not None and not found.clean_shutdown
        persist.save(secondary.data_dir, found.evolve(boot_id="the boot before the power loss"))
        await secondary.start()
        assert await disk_id(secondary) not in (None, ident)
        await make_primary(primary, 3, secondary, "auto", 1, ident)
        st = await primary.wait_replicating()
        assert st["replication"]["lastSync"]["kind"] == "full"
        assert "refused" in st["replication"]["lastSync"]["reason"]
        assert_same_image(image(secondary), image(primary), "secondary after a full sync")


async def test_a_secondary_stopped_cleanly_and_restarted_gets_only_what_it_missed(tmp_path: Path) -> None:
    """A pod deleted and rescheduled to the same node: SIGTERM, not a crash."""
    async with replicating_pair(tmp_path, extra_args=BY_HAND) as (primary, secondary, ident):
        async with await primary.nbd() as nbd:
            await fill(nbd, 0xA0, [i * MiB for i in range(0, SIZE // MiB, 2)], MiB)
            await secondary.stop()
            await fill(nbd, 0xB1, [5 * MiB, 33 * MiB])
            await wait_for(primary, lambda s: s["replication"]["resync"]["tracking"], 15, "tracking")
            await secondary.start()
            assert await disk_id(secondary) == ident
            await make_primary(primary, 3, secondary, "auto", 1, ident)
            st = await primary.wait_replicating()
            assert st["replication"]["lastSync"]["kind"] == "bitmap"
            assert st["replication"]["lastSync"]["copiedBytes"] <= 4 * 64 * 1024
            await nbd.flush()
        assert_same_image(image(secondary), image(primary), "secondary after a clean restart and a bitmap resync")
