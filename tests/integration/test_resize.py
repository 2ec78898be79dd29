"""Growing a replicated volume (``POST /v1/resize``, docs/correctness.md E1-E5).

Real agents and daemons. The secondary grows first, then the primary, while a client keeps
writing through the primary's export (it reconnects and resends what was in flight, as the
CSI attachment's NBD client does); the operator's part — re-pairing the two with a resync of
what the secondary missed — is done here by hand. Every test ends with both disks at the new
size, identical byte for byte, with every acknowledged write and data past the old end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pairvol.agent import crashpoints
from pairvol.agent import state as persist
from pairvol.agent.config import AgentConfig
from pairvol.agent.metrics import AgentMetrics
from pairvol.agent.procs import AgentCallError, free_port
from pairvol.agent.replica import Replica, ReplicaError
from pairvol.nbd import NBDClient, NBDError
from tests.integration.test_bitmap_resync import make_primary, replicating_pair
from tests.support.agents import Agent
from tests.support.bytes_compare import assert_same_image
from tests.support.fs import small_fs

MiB = 1 << 20
OLD, NEW = 64 * MiB, 128 * MiB
BLOCK = 64 * 1024


def image(agent: Agent) -> bytes:
    return (agent.data_dir / "disk.raw").read_bytes()


def block(seq: int) -> bytes:
    return seq.to_bytes(8, "big") * (BLOCK // 8)


async def resize(agent: Agent, epoch: int, size: int) -> dict[str, Any]:
    return await agent.call("POST", "/v1/resize", {"epoch": epoch, "size": size})


class Writer:
    """Writes block ``seq`` at offset ``seq * BLOCK`` in order, each until acknowledged: a
    write cut off by the export going away is sent again on a new connection."""

    def __init__(self, agent: Agent, blocks: int) -> None:
        self.agent, self.blocks = agent, blocks
        self.acked = 0
        self.reconnects = 0
        self.stop = asyncio.Event()

    async def run(self) -> None:
        nbd: NBDClient | None = None
        seq = 0
        try:
            while not self.stop.is_set() or seq < 16:
                try:
                    if nbd is None:
                        nbd = await self.agent.nbd()
                    await nbd.pwrite(block(seq + 1), (seq % self.blocks) * BLOCK)
                    await nbd.flush()
                except Exception:
                    if nbd is not None:
                        with contextlib.suppress(Exception):
                            await nbd.close()
                    nbd = None
                    self.reconnects += 1
                    await asyncio.sleep(0.05)
                    continue
                seq += 1
                self.acked = seq
        finally:
            if nbd is not None:
                await nbd.close()

    def expected(self) -> dict[int, bytes]:
        last: dict[int, bytes] = {}
        for seq in range(self.acked):
            last[(seq % self.blocks) * BLOCK] = block(seq + 1)
        return last


async def grow_pair(primary: Agent, secondary: Agent, ident: str, epoch: int, size: int) -> dict[str, Any]:
    """The operator's order: the primary lets go of the secondary (a planned detach: it
    records what the secondary misses from here on), the secondary grows, then the primary,
    then the resync of what was recorded."""
    await primary.call("POST", "/v1/stop", {})
    st = await resize(secondary, 1, size)
    assert st["size"] == size
    st = await resize(primary, 2, size)
    assert st["size"] == size and st["export"]["serving"], st
    await make_primary(primary, epoch, secondary, "auto", 1, ident)
    return await primary.wait_replicating()


async def test_both_replicas_grow_under_writes_and_keep_every_acknowledged_write(tmp_path: Path) -> None:
    async with replicating_pair(tmp_path) as (primary, secondary, ident):
        async with await primary.nbd() as nbd:
            for off in range(0, OLD, 4 * MiB):
                await nbd.pwrite(bytes([0xA5]) * (4 * MiB), off)
        writer = Writer(primary, OLD // BLOCK)
        task = asyncio.create_task(writer.run())
        await asyncio.sleep(0.3)
        st = await grow_pair(primary, secondary, ident, 3, NEW)
        writer.stop.set()
        await task
        assert writer.reconnects >= 1  # the export went away once, the client came back
        assert st["replication"]["lastSync"]["kind"] == "bitmap", st["replication"]["lastSync"]
        async with await primary.nbd() as nbd:
            assert nbd.size == NEW
            await nbd.pwrite(b"past the old end" * (BLOCK // 16), OLD + 5 * MiB)
            await nbd.pwrite(b"the very last block" + bytes(BLOCK - 19), NEW - BLOCK)
            await nbd.flush()
            for off, data in writer.expected().items():
                assert await nbd.pread(BLOCK, off) == data, f"acknowledged write at {off} lost"
        a, b = image(primary), image(secondary)
        assert len(a) == len(b) == NEW
        assert a[OLD + 5 * MiB : OLD + 5 * MiB + 16] == b"past the old end"
        assert a[OLD : OLD + MiB] == bytes(MiB)  # the new region starts as zeros
        assert_same_image(b, a, "secondary after the grow")
        # a restart with the pod's original --size comes back at the grown size
        await primary.stop()
        await primary.start()
        assert (await primary.status())["size"] == NEW
        assert persist.load(primary.data_dir).size == NEW  # type: ignore[union-attr]


async def test_a_resize_is_idempotent_and_never_shrinks(tmp_path: Path) -> None:
    async with replicating_pair(tmp_path) as (primary, secondary, _):
        await resize(secondary, 1, NEW)
        again = await resize(secondary, 1, NEW)  # a retry: nothing happens
        assert again["size"] == NEW and again["stage"] == "running"
        with pytest.raises(AgentCallError) as shrink:
            await resize(secondary, 1, OLD)
        assert shrink.value.status == 409 and "shrinking" in shrink.value.body["error"]
        with pytest.raises(AgentCallError) as stale:
            await resize(primary, 1, NEW)  # not the primary's epoch
        assert stale.value.status == 409 and "epoch" in stale.value.body["error"]
        with pytest.raises(AgentCallError) as bad:
            await primary.call("POST", "/v1/resize", {"epoch": 2, "size": NEW + 1})
        assert bad.value.status == 400 and "multiple of 512" in bad.value.body["error"]
        assert (await primary.status())["size"] == OLD


SECONDARY_POINTS = ["resize.after-unexport", "resize.after-size-saved", "resize.after-disk-grown",
                    "resize.after-complete"]
# A node that crashes while the disk file is being allocated keeps whatever length its journal
# committed: ext4 lengthens the file chunk by chunk, a file system without fallocate a block
# at a time. The kill at the crash point is followed by the file cut to such a length.
CUT_SHORT = OLD + 16 * MiB
GROW_CRASHES = [pytest.param(point, None, id=point) for point in SECONDARY_POINTS] + [
    pytest.param("resize.after-size-saved", CUT_SHORT, id="allocation-cut-short"),
]


@pytest.mark.parametrize("side", ["secondary", "primary"])
@pytest.mark.parametrize(("crash_at", "file_left_at"), GROW_CRASHES)
async def test_a_crash_at_any_step_of_a_grow_leaves_the_old_or_the_new_size_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, side: str, crash_at: str, file_left_at: int | None
) -> None:
    async with replicating_pair(tmp_path) as (primary, secondary, ident):
        async with await primary.nbd() as nbd:
            for off in range(0, OLD, MiB):
                await nbd.pwrite(os.urandom(MiB), off)
            await nbd.flush()
            before = await nbd.read_all()
        victim, epoch = (secondary, 1) if side == "secondary" else (primary, 2)
        await primary.call("POST", "/v1/stop", {})
        if side == "primary":
            await resize(secondary, 1, NEW)
        await victim.stop()
        monkeypatch.setenv(crashpoints.ENV, crash_at)
        await victim.start()
        monkeypatch.delenv(crashpoints.ENV)
        with pytest.raises(Exception):  # noqa: B017 - the agent dies before it answers
            await resize(victim, epoch, NEW)
        assert await victim.wait_exit() == -9, victim.log_tail()
        if file_left_at is not None:
            os.truncate(victim.data_dir / "disk.raw", file_left_at)
        await victim.start()
        size = (await victim.status())["size"]
        assert size in (OLD, NEW)
        assert (victim.data_dir / "disk.raw").stat().st_size == size  # never between, never torn
        if side == "primary":
            # restarted primaries wait for the operator's confirmation with a new epoch
            await primary.call("POST", "/v1/primary", {"epoch": 3, "peer": None, "sync": "none"})
            epoch = 3
        await resize(victim, epoch, NEW)  # completes the grow, or a no-op if it was done
        if side == "secondary":
            await resize(primary, 2, NEW)
            epoch = 2
        await make_primary(primary, epoch + 1, secondary, "auto", 1, ident)
        st = await primary.wait_replicating()
        assert st["size"] == NEW
        async with await primary.nbd() as nbd:
            now = b"".join([await nbd.pread(4 * MiB, off) for off in range(0, OLD, 4 * MiB)])
            assert now == before, "data written before the grow changed"
            await nbd.pwrite(b"\x5a" * BLOCK, NEW - BLOCK)
            await nbd.flush()
        assert_same_image(image(secondary), image(primary), f"after a {side} crash at {crash_at}")


@contextlib.asynccontextmanager
async def primary_on_a_small_file_system(tmp_path: Path) -> AsyncIterator[tuple[Agent, Path]]:
    """A 16 MiB primary at epoch 1 on a 24 MB file system (no room to grow to 64 MiB), its
    first MiB written with 0x17."""
    with small_fs(tmp_path / "fs", "24M") as fs:
        a = Agent("vol", fs / "data", "16Mi")
        try:
            await a.start()
            await a.call("POST", "/v1/primary", {"epoch": 1, "peer": None, "sync": "none"})
            async with await a.nbd() as nbd:
                await nbd.pwrite(b"\x17" * MiB, 0)
                await nbd.flush()
            yield a, fs
        finally:
            await a.stop()


async def test_a_grow_without_the_space_for_it_keeps_the_old_size_and_serves_on(tmp_path: Path) -> None:
    """The grown region is allocated like the rest of the disk: without room for it, the
    replica says so, goes back to its old size and serves as before."""
    async with primary_on_a_small_file_system(tmp_path) as (a, fs):
        with pytest.raises(AgentCallError) as full:
            await resize(a, 1, 64 * MiB)
        assert full.value.status == 500 and "No space left" in full.value.body["error"]
        assert "stays at 16777216 bytes" in full.value.body["error"]
        st = await a.status()
        assert st["size"] == 16 * MiB and st["export"]["serving"]
        assert (fs / "data" / "disk.raw").stat().st_size == 16 * MiB
        async with await a.nbd() as nbd:
            assert nbd.size == 16 * MiB and await nbd.pread(MiB, 0) == b"\x17" * MiB
        await a.stop()
        await a.start()  # and it comes back at the old size
        assert (await a.status())["size"] == 16 * MiB


async def test_a_grow_cut_short_and_without_the_space_to_finish_goes_back_to_the_old_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart that cannot complete an interrupted grow returns the file to the length the
    state recorded before the grow, not to the length the interruption left."""
    async with primary_on_a_small_file_system(tmp_path) as (a, fs):
        await a.stop()
        monkeypatch.setenv(crashpoints.ENV, "resize.after-size-saved")
        await a.start()
        monkeypatch.delenv(crashpoints.ENV)
        with pytest.raises(Exception):  # noqa: B017 - the agent dies before it answers
            await resize(a, 1, 64 * MiB)
        assert await a.wait_exit() == -9, a.log_tail()
        disk = fs / "data" / "disk.raw"
        os.truncate(disk, 18 * MiB)  # the allocation got 2 MiB further
        for _ in range(2):  # and the restart after that one finds what it left
            await a.start()
            assert (await a.status())["size"] == 16 * MiB
            assert disk.stat().st_size == 16 * MiB
            await a.stop()
        await a.start()
        await a.call("POST", "/v1/primary", {"epoch": 2, "peer": None, "sync": "none"})
        async with await a.nbd() as nbd:
            assert nbd.size == 16 * MiB and await nbd.pread(MiB, 0) == b"\x17" * MiB


def in_process_primary(data_dir: Path) -> Replica:
    cfg = AgentConfig("vol", data_dir, OLD, ("127.0.0.1", free_port()), ("127.0.0.1", free_port()),
                      data_dir / "export.sock")
    return Replica(cfg, AgentMetrics("vol"))


async def written_whole(primary: Replica) -> bytes:
    async with await NBDClient.connect_unix(str(primary.cfg.export_socket)) as nbd:
        for off in range(0, OLD, 4 * MiB):
            await nbd.pwrite(bytes([off // MiB + 1]) * (4 * MiB), off)
        await nbd.flush()
    return (primary.data_dir / "disk.raw").read_bytes()


async def test_a_primary_fenced_while_it_grows_does_not_serve_again_at_that_epoch(tmp_path: Path) -> None:
    """H17: the Lease is lost in the middle of a grow (the agent's Lease keeper fences the
    export, then renews nothing more at this epoch, waiting for the operator's next one). The
    grow completes on disk but does not serve the export again: serving at the fenced epoch
    would be serving without a Lease, beside a secondary the operator may promote. Only a
    start at a newer epoch serves, and the data written before is all there."""
    data_dir = tmp_path / "a"
    primary = in_process_primary(data_dir)
    cfg = primary.cfg
    await primary.open()
    try:
        await primary.start_primary(1, None, "none")
        written = await written_whole(primary)
        grow = primary._grow_disk

        async def lease_lost_while_growing(size: int) -> str | None:
            # what the keeper's on_lost does when a renewal fails: it does not take the lock
            await primary.fence_workload("lease lost: another replica may be promoted", "lease")
            return await grow(size)

        primary._grow_disk = lease_lost_while_growing  # type: ignore[method-assign]
        with pytest.raises(ReplicaError, match="fenced at epoch 1") as refused:
            await primary.resize(1, NEW)
        assert "grown from 67108864 to 134217728 bytes but is not served" in str(refused.value)
        assert "newer epoch" in str(refused.value)
        assert not primary.serving and primary.fenced.is_set()
        with pytest.raises(NBDError, match="cannot connect"):
            await NBDClient.connect_unix(str(cfg.export_socket))
        assert primary.state.size == NEW
        disk = (data_dir / "disk.raw").read_bytes()
        assert len(disk) == NEW and disk[:OLD] == written and disk[OLD:] == bytes(NEW - OLD)
        # the operator's next epoch serves it again, at the new size
        await primary.start_primary(2, None, "none")
        async with await NBDClient.connect_unix(str(cfg.export_socket)) as nbd:
            assert nbd.size == NEW
            assert await nbd.pread(4 * MiB, OLD - 4 * MiB) == bytes([OLD // MiB - 3]) * (4 * MiB)
    finally:
        await primary.close()


async def test_a_fence_that_lands_while_the_grow_adds_the_export_takes_it_down_again(tmp_path: Path) -> None:
    """H17, the same with the Lease lost while QEMU adds the export again: the fence found
    nothing serving yet; the export just added is taken down, and the grow fails."""
    primary = in_process_primary(tmp_path / "a")
    await primary.open()
    try:
        await primary.start_primary(1, None, "none")
        written = await written_whole(primary)
        execute = primary.qsd.execute
        added: list[str] = []

        async def fenced_after_the_export_is_added(command: str, args: dict[str, Any] | None = None) -> Any:
            answer = await execute(command, args)
            if command == "block-export-add":
                added.append(str((args or {}).get("id")))
                if len(added) == 1 + len(primary._lineage_exports()):  # the last one
                    await primary.fence_workload("lease lost: another replica may be promoted", "lease")
            return answer

        primary.qsd.execute = fenced_after_the_export_is_added  # type: ignore[method-assign]
        with pytest.raises(ReplicaError, match="fenced at epoch 1"):
            await primary.resize(1, NEW)
        assert added and not primary.serving and primary.fenced_by == "lease"
        assert not [e for e in await execute("query-block-exports") if e["id"] in added]
        disk = (primary.data_dir / "disk.raw").read_bytes()
        assert disk[:OLD] == written and disk[OLD:] == bytes(NEW - OLD)
    finally:
        await primary.close()
