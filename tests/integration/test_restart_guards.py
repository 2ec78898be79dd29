"""What a replica does when its agent dies and comes back (DESIGN.md §4, unclean restarts):
the failover's epoch is durable before the failover touches the daemon, an interrupted
failover is finished on restart, overlays are trusted only after a clean stop, a restored
primary waits for the operator, and a chain of overlays that does not fit the disk is
refused with replication.c's message. Real agents and qemu-storage-daemons; deaths are
SIGKILL of the agent's process group."""

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

from pairvol.agent import state as persist
from pairvol.agent.procs import AgentCallError
from pairvol.aio import bounded
from pairvol.nbd import NBDError
from tests.support.agents import Agent, agents, pair
from tests.support.bytes_compare import assert_same_image

MiB = 1 << 20


async def write_random(agent: Agent, rng: random.Random, image: bytearray, count: int) -> None:
    async with await agent.nbd() as nbd:
        for _ in range(count):
            length = rng.choice([4096, 65536, MiB])
            offset = rng.randrange(0, len(image) - length, 4096)
            data = rng.randbytes(length)
            await nbd.pwrite(data, offset)
            image[offset : offset + length] = data


async def read_all(agent: Agent) -> bytes:
    async with await agent.nbd() as nbd:
        return await nbd.read_all()


@contextlib.asynccontextmanager
async def restarted(agent: Agent, wait: bool = True) -> AsyncIterator[Agent]:
    """The same replica (data dir) in a new agent process."""
    again = Agent(name=agent.name, data_dir=agent.data_dir, size=agent.size)
    try:
        await again.start(wait=wait)
        yield again
    finally:
        await again.stop()


async def until(what: str, probe: Any, within: float) -> Any:
    deadline = time.monotonic() + within
    while True:
        got = await probe()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}: not within {within} s"
        await asyncio.sleep(0.02)


async def refuses_connections(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        _, writer = await asyncio.open_connection(host, int(port))
    except OSError:
        return True
    writer.close()
    return False


async def test_a_failover_is_durable_before_it_touches_the_daemon(tmp_path: Path) -> None:
    """The secondary's daemon is frozen, so the failover stops at its first QMP command;
    the agent dies there. The replica that comes back has the failover's epoch (the old
    primary stays fenced) and does not export its disk for replication again. The
    overlays were not yet durable, so the checkpoint died with the daemon: the failover is
    finished with the latest state and says so (docs/correctness.md, S6)."""
    async with pair(tmp_path, size="16Mi") as (primary, secondary):
        image = bytearray(16 * MiB)
        await write_random(primary, random.Random("durable"), image, 20)
        await secondary.checkpoint()
        primary.kill()
        await primary.wait_exit()

        async def retired() -> bool:  # a retire left running would hold the lock the failover needs
            return (await secondary.status())["overlays"]["retiring"] is None

        await until("the previous generation to be retired", retired, within=10)
        qsd = (await secondary.status())["qsd"]["pid"]
        os.kill(qsd, signal.SIGSTOP)
        call = asyncio.create_task(secondary.failover(epoch=3, mode="checkpoint"))
        try:
            async def in_failover() -> bool:
                return (await secondary.status())["stage"] == "failover"

            await until("the failover to begin", in_failover, within=10)
            await asyncio.sleep(0.2)  # it is blocked on the frozen daemon, not about to save
            assert not call.done()
            secondary.kill()  # agent and daemon, as a node losing power
            await secondary.wait_exit()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(qsd, signal.SIGCONT)
            call.cancel()
            with contextlib.suppress(BaseException):
                await call
    async with restarted(secondary) as again:
        st = await again.status()
        assert (st["role"], st["stage"], st["epoch"]) == ("primary", "done", 3), st
        assert "before its undo log was durable, so it kept the latest state" in st["restored"]
        assert st["export"]["serving"] is False  # a restarted primary waits for a new epoch
        assert await refuses_connections(again.replication_address), "the replication export came back"
        with pytest.raises(Exception, match="stale epoch 2: this replica is at epoch 3"):
            await again.secondary(2)  # a caller with the old primary's epoch is fenced


async def test_after_an_unclean_stop_the_secondary_has_no_restore_point_until_the_next_cut(tmp_path: Path) -> None:
    """The undo log may miss metadata that lived in the dead daemon's memory, and the disk
    as found may be a mix of two states (a sync in flight, issue 7 failure 2). So it is no
    restore point: a checkpoint-mode failover after the restart keeps the latest state,
    every write acknowledged before the death, and says so."""
    rng = random.Random("unclean")
    async with pair(tmp_path, size="16Mi") as (primary, secondary):
        image = bytearray(16 * MiB)
        await write_random(primary, rng, image, 15)
        await secondary.checkpoint()
        cp = await secondary.checkpoint()
        await write_random(primary, rng, image, 15)  # after the last checkpoint
        primary.kill()
        await primary.wait_exit()
        secondary.kill()
        await secondary.wait_exit()
    async with restarted(secondary) as again:
        st = await again.status()
        assert (st["role"], st["stage"], st["epoch"]) == ("secondary", "running", 1), st
        assert (st["checkpoint"]["id"], st["checkpoint"]["restorePoint"]) == (cp["id"], False)
        assert "no restore point until the next checkpoint" in st["restored"]
        result = await again.failover(epoch=3, mode="checkpoint")
        assert (result["mode"], result["requestedMode"], result["checkpointId"]) == ("latest", "checkpoint", None)
        assert_same_image(await read_all(again), bytes(image), "restarted replica")


async def test_a_restored_primary_serves_only_after_a_new_epoch(tmp_path: Path) -> None:
    """Another replica may have been promoted while this one was down: it must not accept
    a write before the operator confirms its role with a newer epoch."""
    async with agents(tmp_path, 1, size="16Mi") as (a,):
        await a.primary(2, None)
        async with await a.nbd() as nbd:
            await nbd.pwrite(b"p" * 65536, 0)
        a.kill()
        await a.wait_exit()
    async with restarted(a) as again:
        st = await again.status()
        assert (st["role"], st["epoch"], st["export"]["serving"]) == ("primary", 2, False), st
        assert "not serving the workload export" in st["restored"]
        with pytest.raises(NBDError):
            await again.nbd()
        with pytest.raises(Exception, match="does not advance"):
            await again.primary(2, None)
        await again.primary(3, None)
        assert (await again.status())["export"]["serving"] is True
        async with await again.nbd() as nbd:
            assert await nbd.pread(65536, 0) == b"p" * 65536


async def test_an_overlay_of_another_size_fails_the_chain_check(tmp_path: Path) -> None:
    """replication_start's length check, on a cut: the overlays prepared for the next
    generation are replaced by a hidden disk that does not match the secondary disk; the cut
    is refused with QEMU's message and the running generation goes on. (A restart never
    reuses overlays: it makes a new generation, S5.)"""
    async with pair(tmp_path, size="16Mi") as (_, secondary):
        gen = (await secondary.status())["overlays"]["generation"]
        prepared = [secondary.data_dir / f"{kind}-{gen + 1}.qcow2" for kind in ("hidden", "active")]
        for _ in range(200):
            if all(p.exists() for p in prepared):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # the preparation's last qemu-img has written its file
        prepared[0].unlink()
        proc = await asyncio.create_subprocess_exec("qemu-img", "create", "-q", "-f", "qcow2", str(prepared[0]), "32M")
        assert await proc.wait() == 0
        with pytest.raises(AgentCallError) as refused:
            await secondary.checkpoint()
        assert "Active disk, hidden disk, secondary disk's length are not the same" in str(refused.value.body)
        st = await secondary.status()
        assert (st["role"], st["stage"], st["overlays"]["generation"]) == ("secondary", "running", gen), st


async def test_a_disk_resized_behind_the_replicas_back_is_refused(tmp_path: Path) -> None:
    """The state remembers the volume's size; a disk file of another size (grown by hand,
    say) is not adopted even when --size matches the file. (A larger --size alone is a grow
    still to come, tests/integration/test_grow_pending.py: the volume keeps its size, so the
    file must have it.)"""
    async with agents(tmp_path, 1, size="16Mi") as (a,):
        await a.secondary(1)
    os.truncate(a.data_dir / persist.DISK_FILE, 32 * MiB)
    grown = Agent(name=a.name, data_dir=a.data_dir, size="32Mi")
    try:
        await grown.start(wait=False)
        assert await bounded(grown.wait_exit(), 30) == 2
        disk = a.data_dir / persist.DISK_FILE
        assert (
            f"{disk} is {32 * MiB} bytes but the volume is {16 * MiB} bytes: refusing to resize or reformat it"
            in grown.log_tail()
        )
        assert disk.stat().st_size == 32 * MiB  # nothing touched
        assert persist.load(a.data_dir).size == 16 * MiB  # type: ignore[union-attr]
    finally:
        await grown.stop()


async def test_a_second_agent_on_a_data_dir_touches_nothing_until_the_first_has_exited(tmp_path: Path) -> None:
    """A pod force-deleted on a node the API server cannot reach may still run there when the
    replica's next pod starts beside it. The second agent waits, saying why, before it reads
    or writes anything in the data dir; the first serves on, its state slots untouched; once
    the first has exited, the second restores the replica as any restart does."""
    async with agents(tmp_path, 1, size="16Mi") as (first,):
        await first.primary(2, None)
        async with await first.nbd() as nbd:
            await nbd.pwrite(b"p" * 65536, 0)
            await nbd.flush()
        slots = {name: (first.data_dir / name).read_bytes() for name in ("state.a", "state.b")}
        async with restarted(first, wait=False) as second:

            async def waits() -> bool:
                return "still runs on" in second.log_tail(50)

            await until("the second agent to wait for the first", waits, within=20)
            async with await first.nbd() as nbd:
                await nbd.pwrite(b"q" * 65536, 65536)
                await nbd.flush()
            assert second.proc is not None and second.proc.returncode is None
            with pytest.raises(Exception):  # noqa: B017 - its API does not listen yet
                await second.status()
            assert {name: (first.data_dir / name).read_bytes() for name in slots} == slots
            assert (await first.status())["export"]["serving"] is True
            async with restarted(first, wait=False) as third:  # a waiting pod being deleted

                async def both_wait() -> bool:  # the two write one log
                    return third.log_tail(50).count("still runs on") >= 2

                await until("a third agent to wait too", both_wait, within=20)
                third.kill(signal.SIGTERM)
                assert await bounded(third.wait_exit(), 10) == 0
                assert "stopped while another agent held" in third.log_tail(5)
            assert {name: (first.data_dir / name).read_bytes() for name in slots} == slots

            await first.stop()
            await second.wait_ready()
            st = await second.status()
            assert (st["role"], st["epoch"], st["export"]["serving"]) == ("primary", 2, False), st
            await second.primary(3, None)
            async with await second.nbd() as nbd:
                assert await nbd.pread(131072, 0) == b"p" * 65536 + b"q" * 65536
