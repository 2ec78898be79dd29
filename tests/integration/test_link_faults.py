"""The replication link under the faults that broke it (issue 7, failures 1, 3, 6, 8, 9).

The rule under test everywhere: the primary acknowledges a write its peer did not take
only after the peer is durably marked OutOfSync, or after the workload export is fenced.
Each test fails on the design before the link gate (quorum child straight to the peer).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pairvol.agent import state as persist
from pairvol.agent.config import AgentConfig
from pairvol.agent.metrics import AgentMetrics
from pairvol.agent.replica import Replica
from pairvol.aio import bounded
from pairvol.nbd import NBDClient, NBDError
from tests.support.agents import Agent, filled_and_checkpointed, free_port, pair
from tests.support.fs import small_fs

MiB = 1 << 20
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


@needs_root
async def test_a_write_the_secondary_refuses_is_acknowledged_only_after_the_mark_is_durable(tmp_path: Path) -> None:
    """Failure 1: the secondary's undo log hits ENOSPC, its NBD server fails the write, and
    quorum (vote-threshold 1) would acknowledge it from the local disk at once, the mark
    following milliseconds later. Read the primary's persisted state the moment each write
    is acknowledged: a write the secondary lacks must already be covered by the mark."""
    with small_fs(tmp_path / "fs", "22M") as fs:
        async with filled_and_checkpointed(tmp_path / "a", fs / "b", peer_timeout=3) as (primary, _):
            async with await primary.nbd() as nbd:
                disk = fs / "b" / persist.DISK_FILE
                unmarked_misses = []
                acked = 0
                for i, off in enumerate(range(0, 16 * MiB, 64 * 1024)):
                    block = bytes([i % 251 + 1]) * 65536
                    await bounded(nbd.pwrite(block, off), 30)
                    acked += 1
                    marked = persist.load(primary.data_dir)
                    assert marked is not None
                    with disk.open("rb") as f:
                        f.seek(off)
                        on_secondary = f.read(65536) == block
                    if not on_secondary and not marked.out_of_sync:
                        unmarked_misses.append(off)
                    if marked.out_of_sync:
                        break
            assert acked > 1, "the secondary refused the very first write: the scenario did not happen"
            assert marked.out_of_sync, "the undo log never filled up: the scenario did not happen"
            assert unmarked_misses == [], f"acknowledged without the secondary and without a mark: {unmarked_misses}"


async def test_the_third_peer_loss_still_re_protects(tmp_path: Path) -> None:
    """Failure 6: the quorum reuses child names; a counter that only grows names a child
    that does not exist at the second loss and leaves the old peer in the quorum."""
    primary = Agent("vol", tmp_path / "a", "16Mi", peer_timeout=2)
    await primary.start()
    secondaries: list[Agent] = []
    try:
        await primary.primary(1, None)
        epoch = 1
        async with await primary.nbd() as nbd:
            for loss in range(3):
                sec = Agent("vol", tmp_path / f"s{loss}", "16Mi", peer_timeout=2)
                secondaries.append(sec)
                await sec.start()
                await sec.secondary(epoch + 1)
                await primary.primary(epoch + 2, sec.replication_address, "full")
                epoch += 2
                await primary.wait_replicating(30)
                await nbd.pwrite(bytes([loss + 1]) * MiB, loss * MiB)
                sec.kill()
                await sec.wait_exit()
                await nbd.pwrite(bytes([loss + 11]) * MiB, 8 * MiB)
                st = await primary.status()
                for _ in range(50):
                    if st["replication"]["state"] == "degraded":
                        break
                    await asyncio.sleep(0.1)
                    st = await primary.status()
                assert st["replication"]["state"] == "degraded", st
            last = Agent("vol", tmp_path / "s-last", "16Mi", peer_timeout=2)
            secondaries.append(last)
            await last.start()
            await last.secondary(epoch + 1)
            await primary.primary(epoch + 2, last.replication_address, "full")
            await primary.wait_replicating(30)
            await nbd.pwrite(b"z" * MiB, 9 * MiB)
        primary.kill()
        await primary.wait_exit()
        await last.failover(epoch + 3, "latest")
        async with await last.nbd() as nbd:
            got = await nbd.pread(10 * MiB, 0)
        assert got[: 3 * MiB] == b"\x01" * MiB + b"\x02" * MiB + b"\x03" * MiB
        assert got[8 * MiB :] == bytes([13]) * MiB + b"z" * MiB
    finally:
        await asyncio.gather(primary.stop(), *(s.stop() for s in secondaries), return_exceptions=True)


async def test_a_frozen_old_primary_resumed_after_its_peer_address_was_reused_writes_nothing_there(
    tmp_path: Path,
) -> None:
    """Failure 8: A is frozen (agent and daemons stopped) with writes in flight; B takes
    over; B later runs as a secondary again, on the same data dir and address, for a newer
    epoch. When A resumes, its link must not deliver a single write to B (the export B
    serves now has another name), and A must not claim to replicate."""
    a = Agent("vol", tmp_path / "a", "16Mi", peer_timeout=3)
    b = Agent("vol", tmp_path / "b", "16Mi", peer_timeout=3)
    await asyncio.gather(a.start(), b.start())
    frozen: list[int] = []
    try:
        await b.secondary(1)
        await a.primary(2, b.replication_address, "full")
        await a.wait_replicating()
        async with await a.nbd() as nbd:
            await nbd.pwrite(b"\x01" * MiB, 0)
            st = await a.status()
            assert a.proc is not None
            frozen = [a.proc.pid, *children(a.proc.pid)]
            assert st["qsd"]["pid"] in frozen and st["replication"]["link"]["pid"] in frozen, frozen
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
            # writes A's daemon has been sent but not processed: in flight across the takeover
            in_flight = [asyncio.create_task(nbd.pwrite(b"A" * 65536, off)) for off in range(MiB, 2 * MiB, 65536)]
            await asyncio.sleep(0.2)
            # B takes over, then becomes a secondary again at the same address (epoch 5)
            await b.failover(3, "latest")
            b.kill()
            await b.wait_exit()
            await b.start()
            await b.secondary(5)
            before = (b.data_dir / persist.DISK_FILE).read_bytes()
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
            frozen = []
            done, _ = await asyncio.wait(in_flight, timeout=15)
            assert len(done) == len(in_flight), "A's writes neither completed nor failed"
            for task in in_flight:
                task.exception()
        for _ in range(100):
            if (await a.status())["replication"]["link"] is None:
                break
            await asyncio.sleep(0.05)
        after = (b.data_dir / persist.DISK_FILE).read_bytes()
        assert after == before, "the old primary's link delivered writes into the reused replica"
        st = await a.status()
        assert st["replication"]["state"] != "replicating"
        assert st["replication"]["outOfSync"] is True
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        await asyncio.gather(a.stop(), b.stop(), return_exceptions=True)


@contextlib.asynccontextmanager
async def in_process_primary(tmp_path: Path, peer_timeout: float) -> AsyncIterator[tuple[Replica, Agent]]:
    """A primary replica in this process (so its hooks can be real functions) replicating
    to a secondary agent process."""
    sec = Agent("vol", tmp_path / "b", "16Mi", peer_timeout=peer_timeout)
    cfg = AgentConfig(
        "vol",
        tmp_path / "a",
        16 * MiB,
        ("127.0.0.1", free_port()),
        ("127.0.0.1", free_port()),
        tmp_path / "a" / "export.sock",
        peer_timeout=peer_timeout,
    )
    replica = Replica(cfg, AgentMetrics("vol"))
    await sec.start()
    await replica.open()
    try:
        await sec.secondary(1)
        host, port = sec.replication_address.rsplit(":", 1)
        await replica.start_primary(2, (host, int(port)), "full")
        for _ in range(200):
            if replica.status()["replication"]["state"] == "replicating":
                break
            await asyncio.sleep(0.05)
        assert replica.status()["replication"]["state"] == "replicating"
        yield replica, sec
    finally:
        await replica.close()
        await sec.stop()


async def test_a_mark_that_cannot_be_recorded_holds_writes_until_it_is(tmp_path: Path) -> None:
    """Failure 9: cut off from the secondary and from the API server, the primary must not
    acknowledge a write: the mark cannot be recorded, so the write waits for it."""
    async with in_process_primary(tmp_path, peer_timeout=2) as (replica, sec):
        api_reachable = asyncio.Event()
        attempts: list[float] = []

        async def lease_mark(epoch: int) -> None:
            attempts.append(time.monotonic())
            if not api_reachable.is_set():
                raise ConnectionError("API server unreachable")

        replica.out_of_sync_hooks.append(lease_mark)
        async with await NBDClient.connect_unix(str(replica.cfg.export_socket)) as nbd:
            await nbd.pwrite(b"1" * 4096, 0)
            sec.kill()
            await sec.wait_exit()
            write = asyncio.create_task(nbd.pwrite(b"2" * 4096, 4096))
            await asyncio.sleep(4)  # twice the peer timeout
            assert not write.done(), "a write was acknowledged without the peer and without a mark"
            assert len(attempts) >= 3 and replica.status()["replication"]["link"]["heldRequests"] >= 1
            api_reachable.set()
            await bounded(write, 5)
        assert replica.state.out_of_sync is True
        assert replica.status()["replication"]["state"] == "degraded"


async def test_fencing_releases_held_writes_without_acknowledging_them(tmp_path: Path) -> None:
    """Failure 9, the other way out: the Lease is lost while the mark is still impossible;
    fencing closes the export first, so the held write fails instead of being acknowledged,
    and fencing does not wait for the replica lock that a detach may hold."""
    async with in_process_primary(tmp_path, peer_timeout=2) as (replica, sec):

        async def unreachable(epoch: int) -> None:
            raise ConnectionError("API server unreachable")

        replica.out_of_sync_hooks.append(unreachable)
        async with await NBDClient.connect_unix(str(replica.cfg.export_socket)) as nbd:
            await nbd.pwrite(b"1" * 4096, 0)
            sec.kill()
            await sec.wait_exit()
            write = asyncio.create_task(nbd.pwrite(b"2" * 4096, 4096))
            await asyncio.sleep(3)
            assert not write.done()
            async with replica.lock:  # whoever holds the lock, fencing goes through
                await bounded(replica.fence_workload("lease lost", "lease"), 5)
            with pytest.raises(NBDError):
                await bounded(write, 5)
        assert replica.status()["export"]["serving"] is False


async def test_stop_returns_promptly_while_the_link_is_stalled(tmp_path: Path) -> None:
    """Failure 3's second half: with a hung peer, POST /v1/stop must not wait behind a
    drain that waits on the stuck request."""
    async with pair(tmp_path, size="16Mi", peer_timeout=2) as (primary, secondary):
        qsd_pid = (await secondary.status())["qsd"]["pid"]
        async with await primary.nbd() as nbd:
            os.kill(qsd_pid, signal.SIGSTOP)
            try:
                write = asyncio.create_task(nbd.pwrite(b"x" * 4096, 0))
                await asyncio.sleep(0.3)
                t0 = time.monotonic()
                await bounded(primary.call("POST", "/v1/stop", {}), 10)
                assert time.monotonic() - t0 < 5
                await bounded(write, 5)
            finally:
                os.kill(qsd_pid, signal.SIGCONT)
        assert (await primary.status())["replication"]["outOfSync"] is True


async def test_a_primary_agent_killed_while_writes_are_held_acknowledges_none(tmp_path: Path) -> None:
    """The gate lives in the agent: when the agent dies its socket closes, and the
    quorum's client must not turn that into an acknowledgement from the local disk. It
    holds the requests until the kernel kills the daemon with its agent."""
    async with pair(tmp_path, size="16Mi", peer_timeout=30) as (primary, secondary):
        qsd_pid = (await secondary.status())["qsd"]["pid"]
        async with await primary.nbd() as nbd:
            await nbd.pwrite(b"1" * 4096, 0)
            os.kill(qsd_pid, signal.SIGSTOP)  # the link stalls; the gate holds (stall timeout 22.5 s)
            try:
                writes = [asyncio.create_task(nbd.pwrite(b"2" * 4096, 4096 * i)) for i in range(1, 9)]
                await asyncio.sleep(0.5)
                assert not any(w.done() for w in writes)
                primary.kill()
                await primary.wait_exit()
                for w in writes:
                    with pytest.raises(NBDError):
                        await bounded(w, 10)
            finally:
                os.kill(qsd_pid, signal.SIGCONT)
