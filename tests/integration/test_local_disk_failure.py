"""A primary whose own disk fails a write (docs/correctness.md H13).

QEMU's quorum completes a write once one child took it: when the primary's local disk
fails a write the secondary took, the workload sees it acknowledged and only the secondary
has it. The primary fences itself (QUORUM_REPORT_BAD on its local child) and must never
serve its disk as the volume again — not after a restart of its agent either, which is
what H9's restart in place does to a primary that cannot fail over. Here the failure is a
real EIO: the primary's ``disk.raw`` is a FUSE export of a qemu-storage-daemon whose
``blkdebug`` node fails every write to one region, the agent runs with its pod's
privileges, and the bytes are compared on the replica that is promoted."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pairvol.agent.procs import AgentCallError
from pairvol.nbd import NBDError
from pairvol.qemu.qsd import Qsd
from tests.support.agents import Agent, agents

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
                await asyncio.wait_for(write, 30)  # acknowledged: the secondary took it

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
