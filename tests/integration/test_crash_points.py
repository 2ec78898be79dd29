"""Every crash point of the agent whose step is no other file's subject, one at a time.

A crash point (``pairvol.agent.crashpoints``) is a step boundary where the agent may die: the
test arms it with ``PAIRVOL_CRASH_AT`` and the agent SIGKILLs itself there, as a node losing
power would, its qemu-storage-daemon with it. Each test writes known data, reaches the point
for certain, restarts the agent on the same data dir, does the operator's next step by hand
and compares the disks byte for byte. Real agents and daemons.

The other points are armed where their operation is the subject: checkpoints, retires and
failovers in test_secondary_chain.py, grows in test_resize.py, ``link.tracked`` and the bitmap
resync in test_bitmap_resync.py, the checksum resync in test_checksum_resync.py, the union
resync in test_union_resync.py, the CSI node plugin's in test_csi_attacher_host.py and
guest_kernel_nbd.py. tests/unit/test_crash_points_named.py fails when a declared point is
named by no test.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from pairvol.agent import crashpoints
from pairvol.aio import bounded
from pairvol.nbd import NBDError
from tests.integration.test_bitmap_resync import BY_HAND, disk_id, image, make_primary
from tests.integration.test_secondary_chain import read_back, write_random
from tests.support.agents import Agent
from tests.support.bytes_compare import assert_same_image

MiB = 1 << 20
SIZE = 32 * MiB
PEER_TIMEOUT = 2.0


def replica(tmp: Path, index: int) -> Agent:
    # the tests re-pair by hand: the primary's own re-protection would race their calls
    return Agent("vol", tmp / f"replica-{index}", "32Mi", peer_timeout=PEER_TIMEOUT, extra_args=BY_HAND)


async def start_armed(agent: Agent, point: str) -> None:
    """Start ``agent`` with ``point`` armed (in its environment only: later starts are not)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv(crashpoints.ENV, point)
        await agent.start(wait=False)


async def died_at(agent: Agent, point: str) -> None:
    try:
        code = await bounded(agent.wait_exit(), 60)
    except TimeoutError:
        raise AssertionError(f"{agent.data_dir.name} never reached {point}:\n{agent.log_tail(60)}") from None
    assert code == -9, agent.log_tail(30)
    assert f"crash point {point} reached" in agent.log_tail(60)


async def write_all(agent: Agent, data: bytes) -> None:
    async with await agent.nbd() as nbd:
        for off in range(0, len(data), MiB):
            await nbd.pwrite(data[off : off + MiB], off)
        await nbd.flush()


@contextlib.asynccontextmanager
async def pair_holding(
    tmp: Path, seed: str, primary_armed_at: str | None = None
) -> AsyncIterator[tuple[Agent, Agent, str, bytearray]]:
    """Secondary at epoch 1, primary at epoch 2, fully synced against the secondary's disk
    identity, the whole volume written with known data (yielded as the expected image);
    ``primary_armed_at``: the primary runs with that crash point armed."""
    primary, secondary = replica(tmp, 0), replica(tmp, 1)
    try:
        if primary_armed_at is None:
            await primary.start()
        else:
            await start_armed(primary, primary_armed_at)
            await primary.wait_ready()
        await secondary.start()
        await secondary.secondary(1)
        ident = await disk_id(secondary)
        assert ident is not None
        await make_primary(primary, 2, secondary, "full", 1, ident)
        await primary.wait_replicating()
        data = bytearray(random.Random(seed).randbytes(SIZE))
        await write_all(primary, bytes(data))
        yield primary, secondary, ident, data
    finally:
        await asyncio.gather(primary.stop(), secondary.stop(), return_exceptions=True)


# ------------------------------------------------------------------ the secondary's restore


@pytest.mark.parametrize("crash_at", ["restore.after-discard", "restore.after-cow"])
async def test_a_secondary_killed_in_its_restart_comes_back_without_a_restore_point_and_its_next_cut_is_exact(
    tmp_path: Path, crash_at: str
) -> None:
    """A restarted secondary drops its old undo log and starts a new generation from the disk
    as found, and saves that only at the end: a death in between leaves the state naming the
    old generation, whose files may be gone or followed by a half-built new one. The next
    restart starts over from the disk, which nothing wrote meanwhile: no restore point until
    the next cut, a resync of only what it missed, and that cut is exact.

    A clean stop before the restart runs the same restore (only the note in ``restored``
    differs), so one kill covers both."""
    rng = random.Random(crash_at)
    async with pair_holding(tmp_path, crash_at) as (primary, secondary, ident, expected):
        await secondary.checkpoint()
        await write_random(primary, rng, expected, 10)  # into the undo log of that cut
        secondary.kill()
        await secondary.wait_exit()
        await write_random(primary, rng, expected, 10)  # the primary alone, tracking what it writes

        await start_armed(secondary, crash_at)
        await died_at(secondary, crash_at)
        await secondary.start()
        st = await secondary.status()
        assert (st["role"], st["stage"], st["epoch"]) == ("secondary", "running", 1), st
        assert st["checkpoint"]["restorePoint"] is False, st["checkpoint"]
        assert "no restore point until the next checkpoint" in st["restored"], st["restored"]
        assert await disk_id(secondary) == ident, "the disk as found is still the same disk"

        await make_primary(primary, 3, secondary, "auto", 1, ident)  # the operator re-pairs
        st = await primary.wait_replicating()
        assert st["replication"]["lastSync"]["kind"] == "bitmap", st["replication"]
        assert_same_image(image(secondary), bytes(expected), "secondary after the resync")

        await write_random(primary, rng, expected, 10)
        cut = await secondary.checkpoint()
        at_cut = bytes(expected)
        await write_random(primary, rng, expected, 10)
        primary.kill()
        await primary.wait_exit()
        result = await secondary.failover(4, "checkpoint")
        assert (result["mode"], result["checkpointId"]) == ("checkpoint", cut["id"]), result
        assert_same_image(await read_back(secondary), at_cut, "secondary promoted at the cut")


# ------------------------------------------------------------------ the primary's full sync


@pytest.mark.parametrize("crash_at", ["sync.started", "sync.ready", "sync.done"])
async def test_a_primary_killed_before_its_full_sync_is_declared_done_keeps_the_peer_marked_and_copies_it_all_again(
    tmp_path: Path, crash_at: str
) -> None:
    """The peer is marked out of sync before the mirror copies a byte, and declared in sync
    only after the mirror has finished: a primary that dies at any step in between, even
    with every byte copied, comes back with the peer still marked (no failover may pick
    it), and the re-pair copies the whole volume again."""
    primary, secondary = replica(tmp_path, 0), replica(tmp_path, 1)
    try:
        await secondary.start()
        await start_armed(primary, crash_at)
        await primary.wait_ready()
        await primary.primary(1, None)
        expected = random.Random(crash_at).randbytes(SIZE)
        await write_all(primary, expected)
        await secondary.secondary(2)
        ident = await disk_id(secondary)
        with contextlib.suppress(aiohttp.ClientError):  # it answers as the mirror starts, if it lives that long
            await make_primary(primary, 3, secondary, "full", 2, ident)
        await died_at(primary, crash_at)

        await primary.start()
        st = await primary.status()
        assert st["replication"]["outOfSync"] is True, st["replication"]
        assert st["replication"]["resync"]["fullReason"] == "a full sync to the peer did not finish", st["replication"]

        await make_primary(primary, 4, secondary, "auto", 2, ident)  # the operator re-pairs
        st = await primary.wait_replicating()
        last = st["replication"]["lastSync"]
        assert (last["kind"], last["copiedBytes"]) == ("full", SIZE), last
        assert "a full sync to the peer did not finish" in last["reason"], last
        assert st["replication"]["outOfSync"] is False
        assert_same_image(image(primary), expected, "primary after the re-pair")
        assert_same_image(image(secondary), expected, "secondary after the re-pair")
    finally:
        await asyncio.gather(primary.stop(), secondary.stop(), return_exceptions=True)


# ------------------------------------------------------------------ the primary's failed link

HELD_AT, HELD_LENGTH = 5 * MiB + 4096, 64 * 1024


@pytest.mark.parametrize("crash_at", ["link.failed", "track.started"])
async def test_a_primary_killed_before_it_marks_a_failed_peer_acknowledged_nothing_the_peer_lacks(
    tmp_path: Path, crash_at: str
) -> None:
    """When the link fails the gate holds every request; the dirty bitmap is started and the
    peer durably marked before any is answered. A primary that dies before the mark has
    acknowledged no write without the peer: the peer, not marked, holds every acknowledged
    write, and a failover to it returns exactly those. The restarted primary's bitmap died
    with its daemon, so its next resync would copy everything, and it says why."""
    async with pair_holding(tmp_path, crash_at, primary_armed_at=crash_at) as (primary, secondary, _, expected):
        secondary.kill()
        await secondary.wait_exit()
        with pytest.raises(NBDError):  # held at the failed link, then the primary dies
            async with await primary.nbd() as nbd:
                await bounded(nbd.pwrite(b"\x5a" * HELD_LENGTH, HELD_AT), 30)
        await died_at(primary, crash_at)

        await primary.start()
        st = await primary.status()
        assert st["replication"]["outOfSync"] is False, st["replication"]
        assert "unclean stop" in st["replication"]["resync"]["fullReason"], st["replication"]

        await secondary.start()  # the operator finds no mark: it may promote the peer
        result = await secondary.failover(3, "latest")
        assert result["mode"] == "latest", result
        assert_same_image(await read_back(secondary), bytes(expected), "the unmarked peer, promoted")


async def test_a_primary_killed_as_it_answers_the_held_writes_comes_back_with_the_peer_marked(tmp_path: Path) -> None:
    """``link.released``: the mark is durable and the held writes are being answered (the
    client may or may not see its acknowledgement before the kill: the held write here
    rewrites what the volume holds, so its content is known either way). The restarted
    primary still has the peer marked, so no failover picks the peer that lacks the write,
    and the re-pair copies the whole volume."""
    point = "link.released"
    async with pair_holding(tmp_path, point, primary_armed_at=point) as (primary, secondary, ident, expected):
        secondary.kill()
        await secondary.wait_exit()
        with contextlib.suppress(NBDError):  # the answer races the kill
            async with await primary.nbd() as nbd:
                await bounded(nbd.pwrite(bytes(expected[HELD_AT : HELD_AT + HELD_LENGTH]), HELD_AT), 30)
        await died_at(primary, point)

        await primary.start()
        st = await primary.status()
        assert st["replication"]["outOfSync"] is True, st["replication"]
        assert "unclean stop" in st["replication"]["resync"]["fullReason"], st["replication"]

        await secondary.start()
        await make_primary(primary, 3, secondary, "auto", 1, ident)  # the operator re-pairs
        st = await primary.wait_replicating()
        last = st["replication"]["lastSync"]
        assert (last["kind"], last["copiedBytes"]) == ("full", SIZE), last
        assert_same_image(image(primary), bytes(expected), "primary after the re-pair")
        assert_same_image(image(secondary), bytes(expected), "secondary after the re-pair")
