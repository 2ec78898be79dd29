"""The secondary's overlay chain under the faults of issue 7: a failover racing a
checkpoint's retire, a burst of checkpoint requests, a secondary restarted in the middle of
a full sync, and a crash in the middle of the failover commit. Real agents, real
qemu-storage-daemons, NBD over TCP; every result is compared byte for byte."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pairvol.aio import bounded
from tests.support.agents import Agent, AgentCallError, free_port, pair
from tests.support.bytes_compare import assert_same_image
from tests.support.writelog import WriteLog

MiB = 1 << 20


async def read_back(agent: Agent) -> bytes:
    async with await agent.nbd() as nbd:
        return await nbd.read_all()


async def fill(agent: Agent, size: int, byte: bytes) -> None:
    async with await agent.nbd() as nbd:
        for off in range(0, size, MiB):
            await nbd.pwrite(byte * MiB, off)


def read_block(path: Path, offset: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(4096)


async def staggered(agent: Agent, delay: float) -> dict[str, Any]:
    await asyncio.sleep(delay)  # a burst over a few cuts' time, so some requests share a cut
    return await agent.checkpoint()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name):
            return float(line.split()[-1])
    raise AssertionError(f"metric {name} not exported")


PENDING = "failover: retiring overlay generation"
ROUNDS = 6


async def quiet_round(tmp: Path, mode: str, delay: float) -> bool:
    """Checkpoint requests, then a failover queued behind them, no write in flight.
    Returns whether the failover found a retire pending."""
    rng = random.Random(f"quiet-{mode}-{delay}")
    async with pair(tmp, size="16Mi", peer_timeout=2) as (primary, secondary):
        image = bytearray(16 * MiB)
        async with await primary.nbd() as nbd:
            for _ in range(30):
                off = rng.randrange(0, 15 * MiB, 4096)
                data = rng.randbytes(rng.choice([4096, 65536, MiB]))
                await nbd.pwrite(data, off)
                image[off : off + len(data)] = data
            first = await secondary.checkpoint()
            at_first = bytes(image)
            await nbd.pwrite(b"\x77" * MiB, 3 * MiB)
            image[3 * MiB : 4 * MiB] = b"\x77" * MiB
        cuts = [asyncio.create_task(secondary.checkpoint()) for _ in range(4)]
        await asyncio.sleep(delay)
        result = await secondary.failover(epoch=3, mode=mode)
        await asyncio.gather(*cuts, return_exceptions=True)
        assert result["mode"] == mode
        # the queued cuts all came after the last write, so they and the latest state agree;
        # a failover that overtook every queued cut returns to the first one, before it
        back_to_first = mode == "checkpoint" and result["checkpointId"] == first["id"]
        expected = at_first if back_to_first else bytes(image)
        assert_same_image(await read_back(secondary), expected, f"promoted secondary ({result})")
        st = await secondary.status()
        assert (st["role"], st["stage"], st["export"]["serving"]) == ("primary", "done", True)
        assert list(secondary.data_dir.glob("*.qcow2")) == [], "a promoted replica keeps no overlays"
        return PENDING in secondary.log_tail(400)


@pytest.mark.parametrize("mode", ["checkpoint", "latest"])
async def test_a_failover_queued_behind_checkpoints_with_no_write_in_flight_succeeds(tmp_path: Path, mode: str) -> None:
    """Failure 5 as the issue saw it: the old generation's copy-before-write filter holds
    the disk without sharing WRITE, so a failover that runs before the retire cannot
    commit (checkpoint) or export the disk writably (latest) unless it retires it first.
    Whether the failover request overtakes the retire depends on when it arrives, so the
    scenario is repeated (every round must be correct) until one round had it."""
    for n in range(ROUNDS):
        if await quiet_round(tmp_path / f"round-{n}", mode, delay=0.002 * (n + 1)):
            return
    pytest.fail(f"in {ROUNDS} rounds no failover found a retire pending")


async def writing_round(tmp: Path, mode: str, delay: float) -> bool:
    """As quiet_round, with writers on the primary all along; the result is checked as a
    crash-consistent cut: the checkpoint the failover names, or the latest state."""
    rng = random.Random(f"retire-pending-{mode}-{delay}")
    async with pair(tmp, size="16Mi", peer_timeout=2) as (primary, secondary):
        log = WriteLog(writers=4, slots=1024)
        stop = asyncio.Event()
        windows: dict[int, tuple[float, float]] = {}

        async def cut() -> None:
            before = time.monotonic()
            try:
                res = await secondary.checkpoint()
            except AgentCallError as exc:  # queued behind the failover: no longer a secondary
                assert exc.status == 409, exc.body
                return
            windows[res["id"]] = (before, time.monotonic())

        async with await primary.nbd() as nbd:
            load = asyncio.create_task(log.run(nbd, stop, rng))
            await log.wait_acked(50)
            await cut()  # a restore point, so that checkpoint mode really commits
            await log.wait_acked(log.acked() + 50)
            cuts = [asyncio.create_task(cut()) for _ in range(4)]
            await asyncio.sleep(delay)
            fo_start = time.monotonic()
            result = await secondary.failover(epoch=3, mode=mode)
            fo_end = time.monotonic()
            await asyncio.gather(*cuts)
            stop.set()
            await load
        st = await secondary.status()
        assert (st["role"], st["stage"], st["export"]["serving"]) == ("primary", "done", True)
        image = (await read_back(secondary))[: log.slots * 4096]
        assert result["mode"] == mode
        if mode == "checkpoint":
            before, after = windows[result["checkpointId"]]
            log.check_cut(image, not_before=before, not_after=after)
        else:
            log.check_cut(image, not_before=fo_start, not_after=fo_end)
        return PENDING in secondary.log_tail(400)


@pytest.mark.parametrize("mode", ["checkpoint", "latest"])
async def test_a_failover_issued_while_a_checkpoints_retire_is_pending_succeeds(tmp_path: Path, mode: str) -> None:
    """Failure 5 with the old primary still writing: the failover retires the pending
    generation first, then commits (checkpoint) or discards (latest); the result is the
    cut the failover names, or every write acknowledged before the failover."""
    for n in range(ROUNDS):
        if await writing_round(tmp_path / f"round-{n}", mode, delay=0.002 * (n + 1)):
            return
    pytest.fail(f"in {ROUNDS} rounds no failover found a retire pending")


async def test_a_secondary_start_that_fails_after_copy_before_write_began_says_why_and_can_be_retried(
    tmp_path: Path,
) -> None:
    """The replication port is taken when the secondary starts: copy-before-write already
    runs when the export cannot listen. The answer names the port, not the undo (which
    must cancel the job before it can delete the overlays); nothing stays attached, and
    once the port is free the same agent becomes a secondary that replicates."""
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    rep_port = free_port()
    squatter.bind(("127.0.0.1", rep_port))
    squatter.listen()
    primary = Agent("vol", tmp_path / "replica-0", "16Mi")
    secondary = Agent("vol", tmp_path / "replica-1", "16Mi", rep_port=rep_port)
    try:
        await primary.start()
        await secondary.start()
        with pytest.raises(AgentCallError) as refused:
            await secondary.secondary(1)
        assert "cannot listen for the replication link" in str(refused.value), refused.value
        assert "Address already in use" in str(refused.value), refused.value
        assert "overlay" not in str(refused.value), refused.value
        st = await secondary.status()
        assert st["stage"] != "running", st
        squatter.close()
        await secondary.secondary(2)
        await primary.primary(3, secondary.replication_address, "full")
        await primary.wait_replicating()
        await fill(primary, 16 * MiB, b"\x3c")
        primary.kill()
        await primary.wait_exit()
        await secondary.failover(epoch=4, mode="latest")
        assert_same_image(await read_back(secondary), b"\x3c" * (16 * MiB), "promoted secondary")
    finally:
        squatter.close()
        await primary.stop()
        await secondary.stop()


async def test_a_burst_of_checkpoint_requests_shares_cuts_and_keeps_the_peer(tmp_path: Path) -> None:
    """Failure 10: 16 concurrent checkpoint requests while the primary writes. At most two
    overlay generations are ever attached, every id returned is one a cut really had, and
    the primary never stalls long enough to drop its secondary."""
    rng = random.Random("burst")
    async with pair(tmp_path, size="64Mi", peer_timeout=5) as (primary, secondary):
        log = WriteLog(writers=6, slots=4096)
        stop = asyncio.Event()
        async with await primary.nbd() as nbd:
            load = asyncio.create_task(log.run(nbd, stop, rng))
            await asyncio.sleep(0.5)
            burst_start = time.monotonic()
            results = await asyncio.gather(*(staggered(secondary, i * 0.003) for i in range(16)))
            burst_s = time.monotonic() - burst_start
            await asyncio.sleep(1.0)
            stop.set()
            await load
        pst = await primary.status()
        assert pst["replication"]["state"] == "replicating" and pst["replication"]["outOfSync"] is False, pst
        ids = sorted({res["id"] for res in results})
        st = await secondary.status()
        cuts = metric(await secondary.metrics(), "pairvol_checkpoint_duration_seconds_count")
        # ids are consecutive from the first cut, the last one is in force, one cut per id
        assert ids == list(range(1, ids[-1] + 1)), ids
        assert st["checkpoint"]["id"] == ids[-1] and st["checkpoint"]["restorePoint"] is True
        assert cuts == len(ids), f"{cuts} cuts for ids {ids}"
        assert st["overlays"]["peakLive"] <= 2, st["overlays"]
        assert len(st["overlays"]["live"]) <= 2, st["overlays"]
        stalls = [e.acked - e.issued for h in log.history for e in h if e.acked is not None]
        worst = max(stalls)
        print(
            f"\n16 concurrent checkpoints: {len(ids)} cuts in {burst_s * 1000:.0f} ms; "
            f"{len(stalls)} writes, worst write stall {worst * 1000:.1f} ms"
        )
        assert worst < 5.0, f"a write stalled {worst:.1f} s, as long as the peer timeout"


async def test_a_secondary_restarted_in_the_middle_of_a_full_sync_is_no_restore_point(tmp_path: Path) -> None:
    """Failure 2: history zeros → all '1' → all '2'; the secondary is killed during the full
    sync, restarted and resynced; the primary dies. A checkpoint-mode failover must not
    return the half-synced disk: without a checkpoint cut since the restart it keeps the
    latest state (all '2') and says so."""
    size = 256 * MiB
    primary = Agent("vol", tmp_path / "replica-0", "256Mi", peer_timeout=2)
    secondary = Agent("vol", tmp_path / "replica-1", "256Mi", peer_timeout=2)
    try:
        await asyncio.gather(primary.start(), secondary.start())
        await primary.primary(1, None)
        await fill(primary, size, b"1")
        await fill(primary, size, b"2")
        await secondary.secondary(2)
        await primary.primary(3, secondary.replication_address, "full")
        # the mirror copies front to back: kill the secondary once a quarter of its disk holds '2'
        disk_path = tmp_path / "replica-1" / "disk.raw"
        for _ in range(20_000):
            if await asyncio.to_thread(read_block, disk_path, size // 4) == b"2" * 4096:
                break
            await asyncio.sleep(0.001)
        secondary.kill()
        await secondary.wait_exit()
        disk = await asyncio.to_thread(disk_path.read_bytes)
        blocks = {disk[off : off + MiB] for off in range(0, size, MiB)}
        assert {b"2" * MiB, bytes(MiB)} <= blocks, "precondition: the secondary's disk is half synced"

        await secondary.start()
        restarted = await secondary.status()
        await primary.primary(4, secondary.replication_address, "full", peer_epoch=2)
        await primary.wait_replicating()
        primary.kill()
        await primary.wait_exit()
        result = await secondary.failover(5, "checkpoint")
        image = await read_back(secondary)
        mixed = {image[off : off + MiB] for off in range(0, size, MiB)}
        assert mixed == {b"2" * MiB}, f"the failover returned {len(mixed)} kinds of blocks, a state never had"
        assert (result["mode"], result["requestedMode"]) == ("latest", "checkpoint"), result
        assert "kept the latest state" in result["note"]
        assert "no restore point" in restarted["restored"], restarted["restored"]
        assert restarted["checkpoint"]["restorePoint"] is False
    finally:
        await asyncio.gather(primary.stop(), secondary.stop(), return_exceptions=True)


async def _pair_with_crashing_secondary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: str
) -> tuple[Agent, Agent]:
    primary = Agent("vol", tmp_path / "replica-0", "32Mi", peer_timeout=2)
    secondary = Agent("vol", tmp_path / "replica-1", "32Mi", peer_timeout=2)
    try:
        await primary.start()
        monkeypatch.setenv("PAIRVOL_CRASH_AT", crash_at)
        try:
            await secondary.start()
        finally:
            monkeypatch.delenv("PAIRVOL_CRASH_AT")
        await secondary.secondary(1)
        await primary.primary(2, secondary.replication_address, "full")
        await primary.wait_replicating()
    except BaseException:
        # the callers' cleanup only covers a pair that came up
        await asyncio.gather(primary.stop(), secondary.stop(), return_exceptions=True)
        raise
    return primary, secondary


async def write_random(agent: Agent, rng: random.Random, image: bytearray, count: int) -> None:
    async with await agent.nbd() as nbd:
        for _ in range(count):
            length = rng.choice([4096, 65536, 300 * 512, MiB])
            offset = rng.randrange(0, len(image) - length, 512)
            data = rng.randbytes(length)
            await nbd.pwrite(data, offset)
            image[offset : offset + length] = data


@pytest.mark.parametrize(
    ("crash_at", "result", "restored"),
    [
        ("failover.after-epoch-saved", "latest", "kept the latest state"),
        ("failover.after-export-stopped", "latest", "kept the latest state"),
        ("failover.after-cow-cancelled", "latest", "kept the latest state"),
        ("failover.after-overlays-durable", "checkpoint", "commit was redone: checkpoint {id}"),
        ("failover.mid-commit", "checkpoint", "commit was redone: checkpoint {id}"),
        ("failover.after-commit", "checkpoint", "commit was redone: checkpoint {id}"),
        ("failover.before-serve", "checkpoint", "found role primary"),
    ],
)
async def test_a_crash_during_the_checkpoint_failover_is_finished_on_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: str, result: str, restored: str
) -> None:
    """The agent dies at a step of a checkpoint-mode failover and restarts on the same data
    dir. Once the overlays were made durable (before the commit starts) the restart redoes
    the commit and the disk is exactly the checkpoint; before that the checkpoint is lost
    with the daemon's memory and the failover keeps the latest state, and says so."""
    rng = random.Random(crash_at)
    primary, secondary = await _pair_with_crashing_secondary(tmp_path, monkeypatch, crash_at)
    try:
        image = bytearray(32 * MiB)
        await write_random(primary, rng, image, 40)
        cp = await secondary.checkpoint()
        at_checkpoint = bytes(image)
        await write_random(primary, rng, image, 40)
        primary.kill()
        await primary.wait_exit()
        with pytest.raises(Exception):  # noqa: B017 - the agent dies mid-call
            await secondary.failover(3, "checkpoint")
        assert await secondary.wait_exit() != 0
        assert f"crash point {crash_at} reached" in secondary.log_tail(50)

        await secondary.start()
        st: dict[str, Any] = await secondary.status()
        assert (st["role"], st["stage"], st["epoch"]) == ("primary", "done", 3), st
        assert st["export"]["serving"] is False  # a restarted primary waits for a new epoch
        assert restored.format(id=cp["id"]) in st["restored"], st["restored"]
        assert list((tmp_path / "replica-1").glob("*.qcow2")) == []
        await secondary.primary(4, None)  # what the operator does to confirm the role
        got = await read_back(secondary)
        assert got == (at_checkpoint if result == "checkpoint" else bytes(image))
    finally:
        await asyncio.gather(primary.stop(), secondary.stop(), return_exceptions=True)


@pytest.mark.parametrize(
    "crash_at",
    [
        "checkpoint.after-prepare",
        "checkpoint.after-attach",
        "checkpoint.after-cut",
        "checkpoint.after-save",
        "retire.after-cancel",
        "retire.after-detach",
    ],
)
async def test_a_secondary_killed_at_a_step_of_a_checkpoint_recovers_to_exact_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: str
) -> None:
    """The secondary dies at a step of a cut or of the retire after it, restarts, is
    resynced, and is again a secondary whose checkpoints are exact: until a new cut there
    is no restore point, after it a checkpoint-mode failover gives exactly that cut."""
    rng = random.Random(crash_at)
    primary, secondary = await _pair_with_crashing_secondary(tmp_path, monkeypatch, crash_at)
    try:
        image = bytearray(32 * MiB)
        await write_random(primary, rng, image, 30)
        with contextlib.suppress(AgentCallError, OSError, asyncio.TimeoutError, aiohttp.ClientError):
            await secondary.checkpoint()  # the retire points are reached after it answered
        assert await bounded(secondary.wait_exit(), 30) != 0
        assert f"crash point {crash_at} reached" in secondary.log_tail(50)

        await secondary.start()
        st = await secondary.status()
        assert (st["role"], st["stage"]) == ("secondary", "running") and st["checkpoint"]["restorePoint"] is False
        await primary.primary(3, secondary.replication_address, "full", peer_epoch=1)
        await primary.wait_replicating()
        await write_random(primary, rng, image, 20)
        cp = await secondary.checkpoint()
        at_checkpoint = bytes(image)
        await write_random(primary, rng, image, 20)
        primary.kill()
        await primary.wait_exit()
        result = await secondary.failover(4, "checkpoint")
        assert (result["mode"], result["checkpointId"]) == ("checkpoint", cp["id"]), result
        assert_same_image(await read_back(secondary), at_checkpoint, "promoted secondary")
    finally:
        await asyncio.gather(primary.stop(), secondary.stop(), return_exceptions=True)
