"""Automatic re-protection of a peer that is still reachable (issue 10, docs/correctness.md R5).

Real agents and daemons. The link to a secondary that keeps running fails (the primary's
link daemon dies: every request in flight fails, as after a reset connection); the primary
marks the peer OutOfSync, takes it out of the quorum and goes on alone. Nobody calls the
primary again: it resyncs the peer on its own — the regions written since the drop when
its record allows, else everything, with the reason — and declares it in sync. Each test
ends by comparing both disks byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from pairvol.agent import resync as rs
from pairvol.aio import bounded
from pairvol.nbd import NBDClient, NBDError
from pairvol.qemu import recipes as r
from tests.integration.test_bitmap_resync import (
    SIZE,
    MiB,
    fill,
    image,
    make_primary,
    read_all,
    replicating_pair,
    wait_for,
)
from tests.integration.test_link_faults import in_process_primary
from tests.support.agents import Agent, AgentCallError
from tests.support.bytes_compare import assert_same_image
from tests.support.promtext import value
from tests.support.writelog import WriteLog


async def cut_link(primary: Agent) -> int:
    """Kill the primary's link daemon: the peer stays up and reachable."""
    st = await primary.status()
    pid = st["replication"]["link"]["pid"]
    assert isinstance(pid, int)
    os.kill(pid, signal.SIGKILL)
    return pid


def reprotected(before: dict[str, Any] | None) -> Any:
    """The primary replicates again after a sync that ended after ``before``."""

    def pred(st: dict[str, Any]) -> bool:
        rep = st["replication"]
        return rep["state"] == "replicating" and rep["lastSync"] is not None and rep["lastSync"] != before

    return pred


async def test_a_reachable_peer_dropped_under_writes_is_resynced_on_its_own(tmp_path: Path) -> None:
    async with replicating_pair(tmp_path, peer_api=True) as (primary, secondary, ident):
        # the writers keep to the first quarter: a bitmap resync copies at most that
        log = WriteLog(writers=16, slots=SIZE // 4 // 4096)
        stop = asyncio.Event()
        async with await primary.nbd() as nbd:
            load = asyncio.create_task(log.run(nbd, stop, random.Random(20)))
            try:
                await log.wait_acked(300)
                before = (await primary.status())["replication"]["lastSync"]
                await cut_link(primary)
                # nobody calls the primary: it re-protects the peer by itself
                st = await wait_for(primary, reprotected(before), 20, "automatic re-protection")
                last = st["replication"]["lastSync"]
                assert last["kind"] == rs.BITMAP, last
                assert "lacks at most the regions written since it was dropped" in last["reason"], last
                assert 0 < last["copiedBytes"] <= SIZE // 4, last  # what it missed, not the volume
                assert st["replication"]["outOfSync"] is False
                assert st["epoch"] == 2, "the same pairing: no new epoch was needed"
                auto = st["replication"]["reprotect"]
                assert auto["failures"] == 1 and auto["nextInSeconds"] is None and not auto["gaveUp"], auto
                assert "link to the peer lost" in auto["lastError"], auto
                await log.wait_acked(log.acked() + 300)  # synchronous again, under the same load
            finally:
                stop.set()
                await load
            await nbd.flush()
        assert all(e == "stopped" for e in log.ended), log.ended
        assert_same_image(image(secondary), image(primary), "secondary after an automatic bitmap resync")
        assert primary.log_path is not None
        said = primary.log_path.read_text(errors="replace")
        assert "re-protecting peer " in said and "automatically in 0.5 s (attempt 1 of 7)" in said
        assert f"bitmap resync to {secondary.replication_address}" in said and "bytes to copy" in said
        text = await primary.metrics()
        assert value(text, "pairvol_resyncs_total", volume="vol", kind="bitmap", result="succeeded") >= 1
        assert value(text, "pairvol_resync_last_duration_seconds", volume="vol") > 0
        assert value(text, "pairvol_resync_remaining_bytes", volume="vol") == 0
        acked_at = time.monotonic()
        primary.kill()
        await primary.wait_exit()
        await secondary.failover(4, "latest")
        async with await secondary.nbd() as nbd:
            promoted = await read_all(nbd)
        log.check_cut(promoted, acked_at, acked_at)
        del ident


async def test_a_write_sent_on_a_connection_from_before_the_drop_never_lands_after_the_resync(
    tmp_path: Path,
) -> None:
    """What the fault injector found (seeds 9302 partition, 9302 and 9303 loss): after a
    silent partition the secondary still holds the connection of the primary's failed link,
    and the writes that were in flight on it when the partition struck — retransmitted by
    the primary's kernel once it heals — land on the secondary's disk after the automatic
    resync copied those regions. The old data stays there, with the peer declared in sync.
    Here the test holds such a connection itself (a client of the secondary's replication
    export from before the drop) and sends its write only after the primary declared the
    peer in sync: it must find the connection gone, and the disks identical."""
    async with replicating_pair(tmp_path, peer_api=True) as (primary, secondary, ident):
        host, port = secondary.replication_address.rsplit(":", 1)
        stale = await NBDClient.connect_tcp(host, int(port), r.identity_export_name(1, ident))
        try:
            async with await primary.nbd() as nbd:
                await fill(nbd, 0xA0, [i * MiB for i in range(SIZE // MiB)], MiB)
                before = (await primary.status())["replication"]["lastSync"]
                await cut_link(primary)
                await fill(nbd, 0xB0, [5 * MiB])  # written while the peer is out: in the bitmap
                st = await wait_for(primary, reprotected(before), 20, "automatic re-protection")
                assert st["replication"]["lastSync"]["kind"] == rs.BITMAP, st["replication"]["lastSync"]
                assert st["replication"]["outOfSync"] is False
                await nbd.flush()
            landed = True
            try:
                # the old link's write, delivered late: 0xEE where the primary has 0xB0
                await bounded(stale.pwrite(b"\xee" * 4096, 5 * MiB), 10)
            except (ConnectionError, OSError, asyncio.IncompleteReadError, NBDError):
                landed = False
        finally:
            with contextlib.suppress(Exception):
                await stale.close()
        assert_same_image(image(secondary), image(primary), "secondary after a late write of an earlier link")
        assert not landed, "the secondary took a write on a connection from before the re-protection"


async def test_only_the_running_secondary_at_that_epoch_ends_its_connections_on_request(tmp_path: Path) -> None:
    """``POST /v1/relink``: 409 with the reason on a primary and at another epoch; nothing
    changes. At its epoch the secondary cuts the primary's link (the primary drops it, as
    after any link loss) and exports again under the same names."""
    async with replicating_pair(tmp_path, peer_api=True) as (primary, secondary, ident):
        with pytest.raises(AgentCallError, match=r"409.*only a running secondary"):
            await primary.call("POST", "/v1/relink", {"epoch": 2})
        with pytest.raises(AgentCallError, match=r"409.*runs at epoch 1, not 7"):
            await secondary.call("POST", "/v1/relink", {"epoch": 7})
        assert (await primary.status())["replication"]["state"] == "replicating"
        await secondary.call("POST", "/v1/relink", {"epoch": 1})
        host, port = secondary.replication_address.rsplit(":", 1)
        async with await NBDClient.connect_tcp(host, int(port), r.identity_export_name(1, ident)) as nbd:
            assert nbd.size == SIZE  # offered again, under the identity name too
        del primary


async def test_an_explicit_re_pair_during_the_automatic_attempts_wins_and_stays_a_bitmap_resync(
    tmp_path: Path,
) -> None:
    """The race the bitmap resync tests met in CI: a caller restarts the secondary and
    re-pairs by hand while the primary's own attempts run (one sleeping, one waiting for the
    lock, one linking: the rounds re-pair at different moments after the restart). The
    caller's pairing is the last one — its epoch, no attempt pending, the count started
    over —, its resync is a bitmap one whatever an attempt did before it, and the disks end
    identical."""
    async with replicating_pair(tmp_path, peer_api=True) as (primary, secondary, ident):
        async with await primary.nbd() as nbd:
            await fill(nbd, 0xA0, [i * MiB for i in range(SIZE // MiB)], MiB)
            for n, (epoch, after) in enumerate(((3, 0.0), (4, 0.4), (5, 1.2))):
                secondary.kill()
                await secondary.wait_exit()
                await fill(nbd, 0xB0 + n, [3 * MiB, 40 * MiB])
                await wait_for(primary, lambda s: s["replication"]["reprotect"] is not None, 15, "the drop")
                await secondary.start()  # same data dir, same epoch, same disk
                await asyncio.sleep(after)
                await make_primary(primary, epoch, secondary, "auto", 1, ident, peer_api=True)
                st = await primary.wait_replicating()
                last = st["replication"]["lastSync"]
                assert st["epoch"] == epoch
                assert last["kind"] == rs.BITMAP, last
                assert last["copiedBytes"] <= 2 * 64 * 1024, last  # at most the two regions written
                assert st["replication"]["reprotect"] is None, st["replication"]["reprotect"]
            await nbd.flush()
        assert_same_image(image(secondary), image(primary), "secondary after re-pairs that met automatic attempts")


async def test_an_attempt_refused_by_another_disk_is_a_failed_attempt_and_keeps_the_record(
    tmp_path: Path,
) -> None:
    """While the secondary is away, another replica answers on its addresses (its node's
    next pod, a fresh data dir, the same epoch): the primary's attempt is refused its tracked
    disk's export. That is a failed attempt, not a full copy onto the other disk — which
    would replace the record the caller's own re-pair relies on. When the secondary is back
    and the caller re-pairs, its resync is still a bitmap one."""
    async with replicating_pair(tmp_path, peer_api=True) as (primary, secondary, ident):
        async with await primary.nbd() as nbd:
            await fill(nbd, 0xA0, [i * MiB for i in range(SIZE // MiB)], MiB)
            await secondary.stop()
            await fill(nbd, 0xB0, [3 * MiB, 40 * MiB])
            other = Agent("vol", tmp_path / "other", "64Mi", api_port=secondary.api_port, rep_port=secondary.rep_port)
            try:
                await other.start()
                await other.secondary(1)

                def refused_or_linked(st: dict[str, Any]) -> bool:
                    auto = st["replication"]["reprotect"] or {}
                    return "has no export" in str(auto.get("lastError")) or st["replication"]["state"] != "degraded"

                st = await wait_for(primary, refused_or_linked, 30, "an attempt against the other disk")
                assert st["replication"]["state"] == "degraded", st["replication"]
                assert st["replication"]["resync"]["peerDisk"] == ident, st["replication"]["resync"]
                assert st["replication"]["resync"]["tracking"] is True, st["replication"]["resync"]
            finally:
                await other.stop()
            await secondary.start()
            await make_primary(primary, 3, secondary, "auto", 1, ident, peer_api=True)
            st = await primary.wait_replicating()
            last = st["replication"]["lastSync"]
            assert last["kind"] == rs.BITMAP and last["copiedBytes"] <= 2 * 64 * 1024, last
            await nbd.flush()
        assert_same_image(image(secondary), image(primary), "secondary re-paired after a refused attempt")


async def test_a_peer_that_cannot_be_reached_is_retried_with_backoff_and_resynced_when_back(
    tmp_path: Path,
) -> None:
    """The secondary dies: the automatic attempts fail (connection refused), each a little
    later than the one before, and say so; once it is back on the same data dir the next
    attempt resyncs only what it missed."""
    async with replicating_pair(tmp_path, peer_api=True) as (primary, secondary, ident):
        async with await primary.nbd() as nbd:
            await fill(nbd, 0xA0, [i * MiB for i in range(SIZE // MiB)], MiB)
            secondary.kill()
            await secondary.wait_exit()
            await fill(nbd, 0xB0, [3 * MiB, 40 * MiB])
            st = await wait_for(
                primary, lambda s: (s["replication"]["reprotect"] or {}).get("failures", 0) >= 2, 15, "a failed attempt"
            )
            auto = st["replication"]["reprotect"]
            # the first step of an attempt fails: the peer's agent cannot cut its old connections
            assert "cannot ask the peer's agent" in auto["lastError"] and auto["nextInSeconds"] > 0, auto
            assert st["replication"]["state"] == "degraded"
            await secondary.start()  # same data dir, same epoch: it serves its identity export again
            st = await wait_for(primary, reprotected(None), 30, "re-protection once the peer is back")
            assert st["replication"]["lastSync"]["kind"] == rs.BITMAP
            assert st["replication"]["lastSync"]["copiedBytes"] <= 4 * 64 * 1024
            await nbd.flush()
        assert_same_image(image(secondary), image(primary), "secondary resynced after it came back")
        text = await primary.metrics()
        assert value(text, "pairvol_resync_automatic_attempts_total", volume="vol", result="failed") >= 1
        assert value(text, "pairvol_resync_automatic_attempts_total", volume="vol", result="started") >= 1
        assert value(text, "pairvol_resync_automatic_gave_up", volume="vol") == 0
        del ident


async def test_under_a_lease_the_resync_is_recorded_before_it_copies_and_cleared_once_in_sync(tmp_path: Path) -> None:
    """The order R5 rests on, seen from the hooks the Lease is wired to: the out-of-sync mark,
    then the resync mark while the peer is not attached yet (before any byte is copied), then
    the clear only once the state says the peer is in sync; a clear that fails is retried
    while the peer stays in sync."""
    async with in_process_primary(tmp_path, peer_timeout=2) as (replica, sec):
        # paired as the operator pairs: naming the peer's disk and its agent's API
        ident = (await sec.status())["disk"]["id"]
        host, port = sec.replication_address.rsplit(":", 1)
        await replica.start_primary(3, (host, int(port)), "auto", 1, ident, sec.api.removeprefix("http://"))
        for _ in range(200):
            if replica.status()["replication"]["state"] == "replicating":
                break
            await asyncio.sleep(0.05)
        calls: list[tuple[str, int, bool]] = []
        unreachable_once = [True]

        async def mark(epoch: int) -> None:
            calls.append(("out-of-sync", epoch, replica.link is None))

        async def resync(epoch: int) -> None:
            calls.append(("resync", epoch, replica.link is None))

        async def clear(epoch: int) -> None:
            calls.append(("clear", epoch, replica.state.out_of_sync))
            if unreachable_once:
                unreachable_once.pop()
                raise ConnectionError("API server unreachable")

        replica.out_of_sync_hooks.append(mark)
        replica.before_resync_hooks.append(resync)
        replica.in_sync_hooks.append(clear)
        link = replica.link
        assert link is not None and link.link.pid is not None
        async with await NBDClient.connect_unix(str(replica.cfg.export_socket)) as nbd:
            await nbd.pwrite(b"1" * MiB, 0)
            os.kill(link.link.pid, signal.SIGKILL)
            await nbd.pwrite(b"2" * MiB, MiB)
            for _ in range(200):
                if len(calls) >= 4:
                    break
                await asyncio.sleep(0.05)
            await nbd.flush()
        assert calls == [
            ("out-of-sync", 3, False),  # held writes wait for it, the failed link still there
            ("resync", 3, True),  # the failed link gone, the new one not attached yet
            ("clear", 3, False),  # the state says in sync already
            ("clear", 3, False),  # retried after the API server came back
        ], calls
        st = replica.status()
        assert st["replication"]["state"] == "replicating"
        last = st["replication"]["lastSync"]
        assert last["kind"] == rs.BITMAP, last
        primary_disk = (replica.data_dir / "disk.raw").read_bytes()
    assert_same_image(
        (sec.data_dir / "disk.raw").read_bytes(), primary_disk, "secondary after an automatic bitmap resync"
    )
