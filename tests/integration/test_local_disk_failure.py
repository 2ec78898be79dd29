"""A primary whose own disk fails a write (docs/correctness.md H13).

QEMU's quorum completes a write once one child took it: when the primary's local disk
fails a write the secondary took, the workload sees it acknowledged and only the secondary
has it. The primary fences itself (QUORUM_REPORT_BAD on its local child) and must never
serve its disk as the volume again — not after a restart of its agent either, which is
what H9's restart in place does to a primary that cannot fail over. Here the failure is a
real EIO: the primary's ``disk.raw`` is a FUSE export of a qemu-storage-daemon whose
``blkdebug`` node fails every write to one region, the agent runs with its pod's
privileges, and the bytes are compared on the replica that is promoted. The last tests
drive a primary in-process to hold it inside its multi-step commands (a stop that marks the
peer, a re-pair) while the failure happens."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from pairvol.agent.config import AgentConfig
from pairvol.agent.metrics import AgentMetrics
from pairvol.agent.procs import AgentCallError
from pairvol.agent.replica import Replica
from pairvol.agent.stages import IllegalTransition
from pairvol.aio import bounded
from pairvol.nbd import NBDClient, NBDError
from pairvol.qemu.qsd import Qsd
from pairvol.qemu.recipes import WORKLOAD_EXPORT
from tests.support.agents import Agent, agents, free_port

MiB = 1 << 20
SIZE = 16 * MiB
BAD_OFFSET = 8 * MiB  # writes to this 4 KiB block fail on the primary's own disk
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a FUSE export")


@contextlib.asynccontextmanager
async def failing_disk(tmp: Path) -> AsyncIterator[tuple[Path, Qsd]]:
    """A 16 MiB file (a FUSE mount point) whose writes to BAD_OFFSET fail with EIO, and the
    daemon that serves it."""
    backing, mountpoint = tmp / "backing.raw", tmp / "faulty.raw"

    def make_files() -> None:
        with open(backing, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, SIZE)
        mountpoint.touch()

    await asyncio.to_thread(make_files)
    qsd = Qsd(tmp / "faulty-run", tmp / "faulty.log", name="faulty")
    await qsd.start()
    try:
        rule = {"event": "pwritev", "iotype": "write", "sector": BAD_OFFSET // 512, "errno": 5, "once": False}
        await qsd.execute("blockdev-add", {
            "driver": "raw", "node-name": "faulty",
            "file": {"driver": "blkdebug", "inject-error": [rule],
                     "image": {"driver": "file", "filename": str(backing)}},
        })
        await qsd.execute("block-export-add", {
            "type": "fuse", "id": "faulty", "node-name": "faulty", "mountpoint": str(mountpoint), "writable": True,
        })
        yield mountpoint, qsd
    finally:
        await qsd.stop()


async def test_an_acknowledged_write_the_primary_disk_failed_survives_restarts_and_the_failover(
    tmp_path: Path,
) -> None:
    async with failing_disk(tmp_path) as (faulty, server):
        (tmp_path / "replica-0").mkdir()
        (tmp_path / "replica-0" / "disk.raw").symlink_to(faulty)
        async with agents(tmp_path, 2, size="16Mi") as (primary, secondary):
            await secondary.secondary(1)
            await primary.primary(2, secondary.replication_address, "full")
            await primary.wait_replicating()
            async with await primary.nbd() as nbd:
                await nbd.pwrite(b"\xa1" * 4096, 0)
                # The quorum reports the local failure as soon as the local child fails, and
                # the agent then fences: whether the write is acknowledged depends on whether
                # the secondary answered first. Make it so: the disk's server is stopped until
                # the secondary has long taken the write, then it fails it.
                assert server.pid is not None
                os.kill(server.pid, signal.SIGSTOP)
                try:
                    write = asyncio.create_task(nbd.pwrite(b"\xb2" * 4096, BAD_OFFSET))
                    await asyncio.sleep(1.0)
                    assert not write.done(), "the write completed without the primary's own disk"
                finally:
                    os.kill(server.pid, signal.SIGCONT)
                await bounded(write, 30)  # acknowledged: the secondary took it

            st = await primary.status()
            for _ in range(50):
                if st["disk"]["localFailure"] and not st["export"]["serving"]:
                    break
                st = await primary.status()
            assert "local disk failed a write" in st["disk"]["localFailure"]
            assert st["export"]["serving"] is False and st["export"]["fencedBy"] == "local-disk"

            # the agent restarts (H9 restarts the pod of a primary that cannot fail over):
            # the failure is on record, and the disk is never served as the volume again
            await primary.stop()
            restarted = Agent(name="vol", data_dir=primary.data_dir, size="16Mi",
                              api_port=primary.api_port, rep_port=primary.rep_port)
            await restarted.start()
            try:
                st = await restarted.status()
                assert "local disk failed a write" in st["disk"]["localFailure"]
                with pytest.raises(AgentCallError) as refused:
                    await restarted.primary(3, None, "none")
                assert refused.value.status == 409
                assert "never serves as the primary again" in refused.value.body["error"]
                st = await restarted.status()
                assert (st["role"], st["epoch"], st["export"]["serving"]) == ("primary", 2, False)

                # the secondary has every acknowledged write, the one the primary's disk failed too
                await secondary.failover(4, "latest")
                async with await secondary.nbd() as nbd:
                    assert await nbd.pread(4096, 0) == b"\xa1" * 4096
                    assert await nbd.pread(4096, BAD_OFFSET) == b"\xb2" * 4096

                # as a secondary its disk gets a new identity and is copied anew: the record goes
                st = await restarted.secondary(5)
                assert (st["role"], st["disk"]["localFailure"]) == ("secondary", None)
            finally:
                await restarted.stop()


async def test_a_primary_alone_whose_disk_fails_a_write_acknowledges_nothing_and_may_serve_again(
    tmp_path: Path,
) -> None:
    """Without a peer the quorum has no other child: the failed write is an error for the
    workload, the disk lacks nothing that was acknowledged, and nothing is recorded — a
    restart in place (H9) may serve it again."""
    async with failing_disk(tmp_path) as (faulty, _):
        (tmp_path / "replica-0").mkdir()
        (tmp_path / "replica-0" / "disk.raw").symlink_to(faulty)
        async with agents(tmp_path, 1, size="16Mi") as (primary,):
            await primary.primary(2, None, "none")
            async with await primary.nbd() as nbd:
                await nbd.pwrite(b"\xa1" * 4096, 0)
                with pytest.raises(NBDError):
                    await nbd.pwrite(b"\xb2" * 4096, BAD_OFFSET)
            st = await primary.status()
            for _ in range(50):
                if not st["export"]["serving"]:
                    break
                st = await primary.status()
            assert (st["export"]["serving"], st["export"]["fencedBy"]) == (False, "local-disk")
            assert st["disk"]["localFailure"] is None
            st = await primary.primary(3, None, "none")
            assert st["export"]["serving"] is True
            async with await primary.nbd() as nbd:
                assert await nbd.pread(4096, 0) == b"\xa1" * 4096


# ------------------------------------------------------------------ inside multi-step commands


def in_process_primary(data_dir: Path) -> Replica:
    cfg = AgentConfig("vol", data_dir, SIZE, ("127.0.0.1", free_port()), ("127.0.0.1", free_port()),
                      data_dir / "export.sock")
    return Replica(cfg, AgentMetrics("vol"))


@contextlib.asynccontextmanager
async def primary_on_a_failing_disk(tmp: Path) -> AsyncIterator[tuple[Replica, Agent, Qsd]]:
    """An in-process primary whose disk.raw fails writes to BAD_OFFSET, and a secondary
    agent (epoch 1) running as its pod would."""
    async with failing_disk(tmp) as (faulty, server):
        (tmp / "a").mkdir()
        (tmp / "a" / "disk.raw").symlink_to(faulty)
        secondary = Agent(name="vol", data_dir=tmp / "b", size="16Mi")
        primary = in_process_primary(tmp / "a")
        await secondary.start()
        await primary.open()
        try:
            await secondary.secondary(1)
            yield primary, secondary, server
        finally:
            with contextlib.suppress(Exception):
                await primary.close()
            await secondary.stop()


async def acknowledged_where_the_local_disk_fails(nbd: NBDClient, server: Qsd) -> None:
    """As in the first test: the secondary takes the write while the disk's server is
    stopped, then the disk fails it; the write is acknowledged from the secondary alone."""
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    try:
        write = asyncio.create_task(nbd.pwrite(b"\xb2" * 4096, BAD_OFFSET))
        await asyncio.sleep(1.0)
        assert not write.done()
    finally:
        os.kill(server.pid, signal.SIGCONT)
    await bounded(write, 30)


def held_reports(primary: Replica, stamped: bool = True) -> asyncio.Event:
    """The agent's event pump gets to QEMU's failure reports only once the returned event is
    set (QEMU acknowledges the write on its own; the agent may be busy). ``stamped=False``
    drops QEMU's timestamp: the report is then judged by the count of peer children alone."""
    handle = primary._on_qsd_event
    later = asyncio.Event()

    async def late(event: dict[str, object]) -> None:
        if event.get("event") == "QUORUM_REPORT_BAD":
            await later.wait()
            if not stamped:
                event = {k: v for k, v in event.items() if k != "timestamp"}
        await handle(event)  # type: ignore[arg-type]

    primary.qsd._handlers = [late]
    return later


async def until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def block_of(disk: Path) -> bytes:
    with open(disk, "rb") as f:
        f.seek(BAD_OFFSET)
        return f.read(4096)


async def test_a_failure_while_a_stop_takes_the_peer_out_is_recorded(tmp_path: Path) -> None:
    """The operator's grow stops the primary first (POST /v1/stop): the peer is marked
    (state, then the Lease: slow on a busy API server) while it is still a child of the
    quorum and the export still serves. A write acknowledged from the peer alone then is
    recorded all the same."""
    async with primary_on_a_failing_disk(tmp_path) as (primary, secondary, server):
        host, port = secondary.replication_address.rsplit(":", 1)
        await primary.start_primary(2, (host, int(port)), "full", peer_epoch=1)
        await until(lambda: primary.replication == "replicating", "the pair to replicate")
        marking, go_on = asyncio.Event(), asyncio.Event()

        async def slow_lease_mark(epoch: int) -> None:
            marking.set()
            await go_on.wait()

        primary.out_of_sync_hooks.append(slow_lease_mark)
        async with await NBDClient.connect_unix(str(primary.cfg.export_socket)) as nbd:
            stop = asyncio.create_task(primary.stop())
            await bounded(marking.wait(), 10)
            await acknowledged_where_the_local_disk_fails(nbd, server)
        go_on.set()
        await stop
        assert primary.state.local_failure is not None
        assert block_of(tmp_path / "b" / "disk.raw") == b"\xb2" * 4096
        with pytest.raises(IllegalTransition, match="never serves as the primary again"):
            await primary.start_primary(3, None, "none")


async def test_a_failure_during_a_re_pair_keeps_the_export_down_and_the_peer_marked(tmp_path: Path) -> None:
    """A primary serving alone is paired again: the peer joins the quorum while the old
    export still serves. A write acknowledged from the peer alone before the export is
    served again leaves it unserved, and the peer is never declared in sync from this disk."""
    async with primary_on_a_failing_disk(tmp_path) as (primary, secondary, _):
        await primary.start_primary(2, None, "none")
        nbd = await NBDClient.connect_unix(str(primary.cfg.export_socket))
        serve = primary._serve_workload
        reported = held_reports(primary)
        failed_first: list[bool] = []

        async def fail_before_serving(*args: object) -> None:
            if not failed_first:
                failed_first.append(True)
                await nbd.pwrite(b"\xb2" * 4096, BAD_OFFSET)  # acknowledged: the peer took it
                reported.set()
                await until(lambda: primary.state.local_failure is not None, "the record")
            await serve(*args)  # type: ignore[arg-type]

        primary._serve_workload = fail_before_serving  # type: ignore[method-assign]
        host, port = secondary.replication_address.rsplit(":", 1)
        try:
            with pytest.raises(IllegalTransition, match="never serves as the primary again"):
                await primary.start_primary(3, (host, int(port)), "full", peer_epoch=1)
        finally:
            await nbd.close()
        assert failed_first and not primary.serving
        await asyncio.sleep(2.0)  # time for the full sync of 16 MiB to end
        assert primary.replication != "replicating" and primary.state.out_of_sync


@pytest.mark.parametrize("stamped", [True, False], ids=["by-its-timestamp", "by-the-count-alone"])
async def test_a_failure_handled_after_the_link_dropped_is_recorded(tmp_path: Path, stamped: bool) -> None:
    """QEMU acknowledges the write and reports the failure on its own; the agent may get
    to the report only after the link failed and left the quorum. What counts is whether
    the peer was a child when the write completed."""
    async with primary_on_a_failing_disk(tmp_path) as (primary, secondary, _):
        host, port = secondary.replication_address.rsplit(":", 1)
        await primary.start_primary(2, (host, int(port)), "full", peer_epoch=1)
        await until(lambda: primary.replication == "replicating", "the pair to replicate")
        later = held_reports(primary, stamped)
        async with await NBDClient.connect_unix(str(primary.cfg.export_socket)) as nbd:
            await nbd.pwrite(b"\xb2" * 4096, BAD_OFFSET)  # acknowledged: the peer took it
            secondary.kill()
            await secondary.wait_exit()
            other = asyncio.create_task(nbd.pwrite(b"\xa1" * 4096, 0))  # finds the link gone
            await asyncio.sleep(3.0)
            later.set()
            with contextlib.suppress(Exception):
                await bounded(other, 30)
        await until(lambda: primary.state.local_failure is not None, "the record")


async def test_a_failure_recorded_while_the_export_is_set_up_keeps_it_down(tmp_path: Path) -> None:
    """A start with a full sync: the mirror reads the disk through the quorum while the
    export is being set up (here: while the Lease is taken). A failure the agent records
    then, with the peer a child, is fenced while nothing serves yet; the start must not
    serve the disk after all."""
    async with primary_on_a_failing_disk(tmp_path) as (primary, secondary, _):
        taking, go_on = asyncio.Event(), asyncio.Event()

        async def slow_lease(epoch: int) -> None:
            taking.set()
            await go_on.wait()

        primary.before_serve_hooks.append(slow_lease)
        host, port = secondary.replication_address.rsplit(":", 1)
        start = asyncio.create_task(primary.start_primary(2, (host, int(port)), "full", peer_epoch=1))
        await bounded(taking.wait(), 10)
        assert primary._peer_children > 0
        # what QEMU reports when the mirror's read of the local disk fails (the peer refuses reads)
        await primary._on_qsd_event({
            "event": "QUORUM_REPORT_BAD",
            "data": {"node-name": "disk", "type": "read", "error": "Input/output error"},
        })
        await asyncio.sleep(0.5)  # the fence runs, and finds nothing serving
        go_on.set()
        with pytest.raises(IllegalTransition, match="never serves as the primary again"):
            await bounded(start, 30)
        assert not primary.serving


async def test_a_failure_recorded_while_the_export_is_added_takes_it_down_again(tmp_path: Path) -> None:
    """The same, with the record made (by the event pump, in memory at once) while QEMU
    adds the exports: the exports just added are taken down as a fence would, and the
    start fails."""
    async with primary_on_a_failing_disk(tmp_path) as (primary, secondary, _):
        execute = primary.qsd.execute
        added: list[str] = []

        async def record_after_the_last_export(command: str, args: dict[str, Any] | None = None) -> Any:
            answer = await execute(command, args)
            if command == "block-export-add":
                added.append(str((args or {}).get("id")))
                if len(added) == 1 + len(primary._lineage_exports()):
                    primary.state = primary.state.evolve(local_failure="local disk failed a read: Input/output error")
            return answer

        primary.qsd.execute = record_after_the_last_export  # type: ignore[method-assign]
        host, port = secondary.replication_address.rsplit(":", 1)
        with pytest.raises(IllegalTransition, match="never serves as the primary again"):
            await primary.start_primary(2, (host, int(port)), "full", peer_epoch=1)
        assert WORKLOAD_EXPORT in added and not primary.serving
        exports = await execute("query-block-exports")
        assert not [e for e in exports if e["id"] in added], exports


def report_bad(at: float) -> dict[str, object]:
    """QUORUM_REPORT_BAD for the local disk as QEMU stamps it (when the failure happened)."""
    return {
        "event": "QUORUM_REPORT_BAD",
        "timestamp": {"seconds": int(at), "microseconds": int((at % 1) * 1_000_000)},
        "data": {"node-name": "disk", "type": "write", "error": "Input/output error"},
    }


async def test_a_report_qemu_held_back_until_after_the_peer_left_is_judged_by_when_it_failed(
    tmp_path: Path,
) -> None:
    """QEMU's monitor sends one QUORUM_REPORT_BAD per node-name and second at once and
    holds the next back for up to a second, so it may come after the reply that removed the
    peer, and after the event barrier. Its timestamp is when the failure happened."""
    async with primary_on_a_failing_disk(tmp_path) as (primary, secondary, _):
        host, port = secondary.replication_address.rsplit(":", 1)
        await primary.start_primary(2, (host, int(port)), "full", peer_epoch=1)
        await until(lambda: primary.replication == "replicating", "the pair to replicate")
        failed_at = time.time()  # the peer is a child
        await primary.stop()
        assert primary._peer_children == 0
        await primary._on_qsd_event(report_bad(time.time() + 0.01))  # alone: an error, not recorded
        assert primary.state.local_failure is None
        await primary._on_qsd_event(report_bad(failed_at))  # held back by QEMU
        assert primary.state.local_failure is not None
