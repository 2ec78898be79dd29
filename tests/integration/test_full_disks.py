"""Full disks: the primary's volume is reserved up front (so the primary itself never runs
out of space mid-write); a secondary whose undo log cannot grow drops out of sync without
failing a single primary write, keeps its checkpoint intact, and can still persist a
state change (its state slots are allocated once)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from pairvol.aio import bounded
from tests.support.agents import Agent, filled_and_checkpointed, pair
from tests.support.fs import small_fs

MiB = 1 << 20
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")


async def test_a_volume_larger_than_the_free_space_is_refused_at_start(tmp_path: Path) -> None:
    with small_fs(tmp_path / "fs", "8M") as fs:
        a = Agent("vol", fs / "data", "16Mi")
        await a.start(wait=False)
        assert await a.wait_exit() == 2
        assert "No space left on device" in a.log_tail() or "Could not preallocate" in a.log_tail()


async def test_secondary_out_of_space_for_its_undo_log_goes_out_of_sync_primary_goes_on(tmp_path: Path) -> None:
    with small_fs(tmp_path / "fs", "22M") as fs:
        async with pair(tmp_path, size="16Mi", peer_timeout=2) as (primary, secondary):
            pass
        # restart the pair with the secondary's data dir on the small filesystem
        async with filled_and_checkpointed(tmp_path / "replica-0", fs / "b", peer_timeout=2) as (primary, secondary):
            async with await primary.nbd() as nbd:
                # overwrite the whole volume: the undo log would need 16 MiB, there are ~5
                for off in range(0, 16 * MiB, MiB):
                    await bounded(nbd.pwrite(bytes([off // MiB + 1]) * MiB, off), 30)
                assert await nbd.pread(MiB, 15 * MiB) == bytes([16]) * MiB
            for _ in range(50):
                st = await primary.status()
                if st["replication"]["outOfSync"]:
                    break
                await asyncio.sleep(0.1)
            assert st["replication"]["outOfSync"] is True
            # the writes the secondary refused never touched its checkpoint: failing over to it
            # gives exactly the checkpoint's data
            primary.kill()
            await primary.wait_exit()
            await secondary.failover(7, "checkpoint")
            async with await secondary.nbd() as nbd:
                assert await nbd.read_all() == b"\xee" * (16 * MiB)
