"""The data path, byte for byte: a real primary replicating to a real secondary (two
agents, two qemu-storage-daemons, NBD over TCP), checkpoints, SIGKILL of the primary, and
failover in both modes, read back through the new primary's workload export."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import pytest

from pairvol.aio import bounded
from tests.support.agents import Agent, pair
from tests.support.bytes_compare import assert_same_image
from tests.support.writelog import WriteLog

MiB = 1 << 20


async def write_pattern(agent: Agent, rng: random.Random, image: bytearray, count: int) -> None:
    """Random sector-aligned writes through the workload export, mirrored into `image`."""
    async with await agent.nbd() as nbd:
        for _ in range(count):
            length = rng.choice([512, 4096, 65536, 300 * 512, MiB])
            offset = rng.randrange(0, len(image) - length, 512)
            data = rng.randbytes(length)
            await nbd.pwrite(data, offset)
            image[offset : offset + length] = data


async def wait_for_state(agent: Agent, state: str, within: float) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        st = await agent.status()
        if st["replication"]["state"] == state:
            return st
        assert time.monotonic() < deadline, f"replication state is not {state!r} after {within} s: {st}"
        await asyncio.sleep(0.1)


async def read_back(agent: Agent) -> bytes:
    async with await agent.nbd() as nbd:
        return await nbd.read_all()


@pytest.mark.parametrize("mode", ["checkpoint", "latest"])
async def test_failover_result_is_exactly_the_checkpoint_or_the_latest_write(tmp_path: Path, mode: str) -> None:
    rng = random.Random(f"failover-{mode}")
    async with pair(tmp_path, size="32Mi") as (primary, secondary):
        image = bytearray(32 * MiB)
        await write_pattern(primary, rng, image, 40)
        cp1 = await secondary.checkpoint()
        await write_pattern(primary, rng, image, 40)
        cp2 = await secondary.checkpoint()
        assert cp2["id"] == cp1["id"] + 1
        at_checkpoint = bytes(image)
        await write_pattern(primary, rng, image, 60)

        primary.kill()
        await primary.wait_exit()
        result = await secondary.failover(epoch=3, mode=mode)

        assert result["mode"] == mode
        got = await read_back(secondary)
        want = at_checkpoint if mode == "checkpoint" else bytes(image)
        assert got == want, f"{mode} failover image differs from the expected image"
        if mode == "checkpoint":
            assert result["checkpointId"] == cp2["id"]
        st = await secondary.status()
        assert (st["role"], st["stage"], st["epoch"]) == ("primary", "done", 3)
        assert st["replication"]["state"] == "degraded"
        # the new primary accepts writes
        async with await secondary.nbd() as nbd:
            await nbd.pwrite(b"\x5a" * 4096, 0)
            assert await nbd.pread(4096, 0) == b"\x5a" * 4096


async def test_full_sync_copies_existing_data_while_the_workload_writes(tmp_path: Path) -> None:
    """A primary with data gets a fresh secondary: sync=full copies everything, writes
    during the copy are not lost, and a latest-mode failover shows the whole disk."""
    rng = random.Random("full-sync")
    async with pair(tmp_path, size="64Mi", sync="none") as (primary, secondary):
        pass
    # restart both on the same dirs: primary keeps its data, secondary starts over empty
    (tmp_path / "replica-1" / "disk.raw").unlink()
    for slot in ("state.a", "state.b"):
        (tmp_path / "replica-1" / slot).unlink(missing_ok=True)
    primary = Agent(name="vol", data_dir=tmp_path / "replica-0", size="64Mi")
    secondary = Agent(name="vol", data_dir=tmp_path / "replica-1", size="64Mi")
    try:
        await primary.start()
        await secondary.start()
        assert "found role primary" in (await primary.status())["restored"]
        await primary.primary(5, None)
        image = bytearray(64 * MiB)
        await write_pattern(primary, rng, image, 80)
        await secondary.secondary(6)
        writes = asyncio.create_task(write_pattern(primary, rng, image, 120))
        await primary.primary(7, secondary.replication_address, "full")
        await writes
        st = await primary.wait_replicating()
        assert st["replication"]["outOfSync"] is False
        primary.kill()
        await primary.wait_exit()
        await secondary.failover(epoch=8, mode="latest")
        assert_same_image(await read_back(secondary), bytes(image), "promoted secondary")
    finally:
        await primary.stop()
        await secondary.stop()


async def test_checkpoints_under_concurrent_writers_are_crash_consistent_cuts(tmp_path: Path) -> None:
    """Checkpoints are cut while 8 writers keep requests in flight; the checkpoint the
    failover restores is a crash-consistent cut: per writer a prefix of its writes, with
    everything acknowledged before the cut and nothing issued after it."""
    rng = random.Random("cuts")
    async with pair(tmp_path, size="16Mi") as (primary, secondary):
        log = WriteLog(writers=8, slots=1024)
        stop = asyncio.Event()
        async with await primary.nbd() as nbd:
            load = asyncio.create_task(log.run(nbd, stop, rng))
            cut_windows = []
            for _ in range(5):
                await log.wait_acked(log.acked() + 50)
                before = time.monotonic()
                cp = await secondary.checkpoint()
                cut_windows.append((before, time.monotonic(), cp["id"]))
            await log.wait_acked(log.acked() + 50)
            primary.kill()
            await primary.wait_exit()
            stop.set()
            await load
        assert log.acked() >= 300, "the load did not run"
        await secondary.failover(epoch=3, mode="checkpoint")
        image = await read_back(secondary)
        before, after, _ = cut_windows[-1]
        counts = log.check_cut(image[: log.slots * 4096], not_before=before, not_after=after)
        assert counts["visible"] > 0


@pytest.mark.parametrize("mode", ["latest", "checkpoint"])
@pytest.mark.parametrize("seed", [1, 2])
async def test_sigkill_of_the_primary_at_a_random_moment_under_load(tmp_path: Path, mode: str, seed: int) -> None:
    """`latest` loses no acknowledged write; `checkpoint` is exactly the last checkpoint."""
    rng = random.Random(f"kill-{seed}-{mode}")
    async with pair(tmp_path, size="16Mi") as (primary, secondary):
        log = WriteLog(writers=6, slots=2048)
        stop = asyncio.Event()  # never set: the writers must stop because the primary died
        async with await primary.nbd() as nbd:
            load = asyncio.create_task(log.run(nbd, stop, rng))
            last_cut = None
            deadline = time.monotonic() + rng.uniform(0.5, 1.5)
            while time.monotonic() < deadline:
                before = time.monotonic()
                await secondary.checkpoint()
                last_cut = (before, time.monotonic())
                await asyncio.sleep(rng.uniform(0.05, 0.3))
            await asyncio.sleep(rng.uniform(0, 0.2))
            await log.wait_acked(101)
            killed_at = time.monotonic()
            primary.kill()
            await primary.wait_exit()
            await bounded(load, 30)  # the writers end on their own: the connection died
        assert all(e.startswith("NBD error") for e in log.ended), f"writers did not end by the kill: {log.ended}"
        assert log.acked(before=killed_at) > 100, f"only {log.acked(before=killed_at)} writes acked before the kill"
        await secondary.failover(epoch=3, mode=mode)
        image = (await read_back(secondary))[: log.slots * 4096]
        if mode == "latest":
            counts = log.check_cut(image, not_before=killed_at, not_after=float("inf"))
            assert counts["visible"] >= log.acked(before=killed_at), counts
        else:
            assert last_cut is not None
            counts = log.check_cut(image, not_before=last_cut[0], not_after=last_cut[1])
            assert counts["visible"] >= log.acked(before=last_cut[0]), counts


async def test_old_primary_cannot_write_to_the_promoted_secondary(tmp_path: Path) -> None:
    """Fencing: after failover the replication export is gone, so the old primary (if it
    is merely cut off, not dead) loses its peer and cannot reach the new primary's disk."""
    async with pair(tmp_path, size="16Mi", peer_timeout=2) as (primary, secondary):
        async with await primary.nbd() as old:
            await old.pwrite(b"1" * 4096, 0)
            await secondary.failover(epoch=3, mode="latest")
            # the old primary still accepts local writes (it does not know yet) ...
            await bounded(old.pwrite(b"2" * 4096, 0), 10)
        # ... but they never reach the new primary's disk
        assert (await read_back(secondary))[:4096] == b"1" * 4096
        st = await wait_for_state(primary, "degraded", within=5)
        assert st["replication"]["outOfSync"] is True
        assert "lost" in st["replication"]["error"]
        # and a command with the old epoch is refused by the new primary
        with pytest.raises(Exception, match="stale epoch 2"):
            await secondary.primary(2, None)


async def test_checkpoint_metrics_are_exported(tmp_path: Path) -> None:
    async with pair(tmp_path, size="16Mi") as (primary, secondary):
        async with await primary.nbd() as nbd:
            await nbd.pwrite(b"x" * MiB, 0)
            await secondary.checkpoint()
            await nbd.pwrite(b"y" * MiB, 0)
            await secondary.checkpoint()
        for _ in range(50):  # the old generation's copy count arrives when it is retired
            text = await secondary.metrics()
            cow = [ln for ln in text.splitlines() if ln.startswith("pairvol_cow_copied_bytes_total")]
            if cow and float(cow[0].split()[-1]) >= MiB:
                break
            await asyncio.sleep(0.1)
        assert 'pairvol_checkpoint_id{volume="vol"} 2.0' in text
        assert 'pairvol_checkpoint_duration_seconds_count{volume="vol"} 2.0' in text
        cow = [ln for ln in text.splitlines() if ln.startswith("pairvol_cow_copied_bytes_total")]
        assert cow and float(cow[0].split()[-1]) >= MiB
        for _ in range(50):  # the watchdog samples the link every 0.2 s
            ptext = await primary.metrics()
            sent = [ln for ln in ptext.splitlines() if ln.startswith("pairvol_replication_sent_bytes_total")]
            if float(sent[0].split()[-1]) >= 2 * MiB:
                break
            await asyncio.sleep(0.1)
        assert float(sent[0].split()[-1]) >= 2 * MiB
        assert 'pairvol_replication_state{state="replicating",volume="vol"} 1.0' in ptext


async def test_checkpoint_failover_before_any_checkpoint_keeps_the_synced_data(tmp_path: Path) -> None:
    """Checkpoint 0 is the secondary's disk before the primary's full sync copied the volume
    to it; failing over to it would lose the whole volume. Without a later checkpoint the
    failover keeps the latest state and says so."""
    rng = random.Random("no-checkpoint")
    image = bytearray(16 * MiB)
    async with pair(tmp_path, size="16Mi") as (primary, secondary):
        await write_pattern(primary, rng, image, 30)
        primary.kill()
        await primary.wait_exit()
        result = await secondary.failover(epoch=3, mode="checkpoint")
        assert (result["mode"], result["requestedMode"], result["checkpointId"]) == ("latest", "checkpoint", None)
        assert "no checkpoint" in result["note"]
        assert_same_image(await read_back(secondary), bytes(image), "promoted secondary")
