"""A replica whose pod says a larger ``--size`` than its data dir holds: a grow still to come.

The operator makes every agent pod with ``--size`` = ``spec.size``, and pods are never
restarted in place: a replica that comes back (its node returned, its pod was killed) gets
a new pod with the *current* size, which may be larger than what its disk holds — the
volume was expanded while the replica was away, or the replica died in the middle of a
grow (docs/correctness.md E1, E5). Such an agent starts at the size it holds, says so, and
grows only when the operator's grow asks it to (``POST /v1/resize``, in the E0-E5 order),
once the pair is in sync again. Real agents and daemons; every test compares the bytes.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pairvol.agent import crashpoints
from tests.integration.test_bitmap_resync import disk_id, make_primary
from tests.support.agents import Agent
from tests.support.bytes_compare import assert_same_image

MiB = 1 << 20
OLD, NEW = 16 * MiB, 32 * MiB


def image(agent: Agent) -> bytes:
    return (agent.data_dir / "disk.raw").read_bytes()


async def resize(agent: Agent, epoch: int, size: int) -> dict[str, Any]:
    return await agent.call("POST", "/v1/resize", {"epoch": epoch, "size": size})


async def write_known(agent: Agent, rng: random.Random, volume: bytearray, count: int) -> None:
    """``count`` random writes through the primary's export, each also applied to ``volume``."""
    async with await agent.nbd() as nbd:
        for _ in range(count):
            length = rng.choice([4096, 65536, MiB])
            offset = rng.randrange(0, len(volume) - length + 1, 4096)
            data = rng.randbytes(length)
            await nbd.pwrite(data, offset)
            volume[offset : offset + length] = data
        await nbd.flush()


async def volume_bytes(agent: Agent) -> bytes:
    async with await agent.nbd() as nbd:
        assert nbd.size == (await agent.status())["size"]
        return await nbd.read_all()


@contextlib.asynccontextmanager
async def replicating_with_known_data(
    tmp_path: Path, seed: int, peer_timeout: float = 5.0
) -> AsyncIterator[tuple[Agent, Agent, str, random.Random, bytearray]]:
    """A 16 MiB pair (secondary at epoch 1, primary at 2) in sync after 24 known writes:
    (primary, secondary, the secondary's disk identity, the writes' generator, the volume)."""
    rng = random.Random(seed)
    primary = Agent("vol", tmp_path / "replica-0", "16Mi", peer_timeout=peer_timeout)
    secondary = Agent("vol", tmp_path / "replica-1", "16Mi", peer_timeout=peer_timeout)
    try:
        await primary.start()
        await secondary.start()
        await secondary.secondary(1)
        ident = await disk_id(secondary)
        assert ident is not None
        await make_primary(primary, 2, secondary, "full", 1, ident)
        await primary.wait_replicating()
        volume = bytearray(OLD)
        await write_known(primary, rng, volume, 24)
        yield primary, secondary, ident, rng, volume
    finally:
        await primary.stop()
        await secondary.stop()


async def paired_at_the_new_size_with_every_byte(
    primary: Agent, secondary: Agent, ident: str, rng: random.Random, volume: bytearray
) -> None:
    """The grow's last step (a re-pair at epoch 4), then writes anywhere in 32 MiB: both
    disks hold exactly what was written."""
    await make_primary(primary, 4, secondary, "auto", 1, ident)
    st = await primary.wait_replicating()
    assert st["size"] == NEW and (await secondary.status())["size"] == NEW
    volume += bytes(NEW - OLD)
    await write_known(primary, rng, volume, 16)
    assert await volume_bytes(primary) == bytes(volume)
    assert_same_image(image(primary), bytes(volume), "the primary after the grow")
    assert_same_image(image(secondary), bytes(volume), "the secondary after the grow")


async def test_a_secondary_back_with_the_expanded_size_resyncs_at_its_own_size_then_grows(tmp_path: Path) -> None:
    """Sequence: a 16 MiB pair; the secondary's node goes down; the primary writes alone;
    the volume is expanded to 32 MiB meanwhile (the operator grows only a pair in sync, so
    nothing grows yet); the secondary comes back in a pod that says ``--size 32Mi``. It
    starts at the 16 MiB it holds, is resynced at that size, and only then does the grow
    in the operator's order bring both replicas to 32 MiB, every byte intact."""
    pair = replicating_with_known_data(tmp_path, 7301, peer_timeout=1.0)
    async with pair as (primary, secondary, ident, rng, volume):
        secondary.kill()  # its node goes down
        await secondary.wait_exit()
        await write_known(primary, rng, volume, 24)  # acknowledged by the primary alone
        assert (await primary.status())["replication"]["state"] == "degraded"

        secondary.size = "32Mi"  # the new pod: --size is the expanded spec.size
        await secondary.start()  # before the fix: exit status 2, "refusing to resize or reformat"
        st = await secondary.status()
        assert (st["role"], st["stage"], st["epoch"], st["size"]) == ("secondary", "running", 1, OLD), st
        assert (secondary.data_dir / "disk.raw").stat().st_size == OLD
        assert f"keeping {OLD} bytes until the volume is grown" in secondary.log_tail(200)

        # the operator re-pairs first (replicas of the same size), at a new epoch
        await make_primary(primary, 3, secondary, "auto", 1, ident)
        st = await primary.wait_replicating()
        assert st["size"] == OLD
        assert await volume_bytes(primary) == bytes(volume)
        assert_same_image(image(secondary), bytes(volume), "the secondary resynced at its own size")

        # then the grow (decisions.Grow, handlers._grow), and the resync of what it missed
        await primary.call("POST", "/v1/stop", {})
        assert (await resize(secondary, 1, NEW))["size"] == NEW
        st = await resize(primary, 3, NEW)
        assert st["size"] == NEW and st["export"]["serving"], st
        await paired_at_the_new_size_with_every_byte(primary, secondary, ident, rng, volume)


async def test_a_primary_that_died_before_its_grow_was_saved_comes_back_at_its_size_and_the_grow_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sequence: the grow to 32 MiB has let go of the secondary (E0) and grown it (E2); the
    primary's agent dies with its exports down and nothing of its own grow persisted (crash
    point ``resize.after-unexport``). No failover is possible (the secondary is out of sync),
    so the operator makes the primary's pod again, with ``--size 32Mi``: it starts at the
    16 MiB it holds, serves again alone once confirmed with a new epoch (H9) with every
    acknowledged write, and the operator finishes the grow that stopped half-way."""
    async with replicating_with_known_data(tmp_path, 7302) as (primary, secondary, ident, rng, volume):
        await primary.call("POST", "/v1/stop", {})  # E0
        await write_known(primary, rng, volume, 8)  # acknowledged after E0, by the primary alone
        assert (await resize(secondary, 1, NEW))["size"] == NEW  # E2
        await primary.stop()
        monkeypatch.setenv(crashpoints.ENV, "resize.after-unexport")
        await primary.start()
        monkeypatch.delenv(crashpoints.ENV)
        with pytest.raises(Exception):  # noqa: B017 - the agent dies before it answers
            await resize(primary, 2, NEW)
        assert await primary.wait_exit() == -9, primary.log_tail()

        primary.size = "32Mi"  # the pod made again by the operator (H9): --size is spec.size
        await primary.start()  # before the fix: exit status 2, the volume stays down
        st = await primary.status()
        assert (st["role"], st["size"]) == ("primary", OLD), st
        assert (primary.data_dir / "disk.raw").stat().st_size == OLD
        await primary.call("POST", "/v1/primary", {"epoch": 3, "peer": None, "sync": "none"})  # H9
        assert await volume_bytes(primary) == bytes(volume), "a write acknowledged after E0 was lost"

        # the grow that stopped half-way is finished (replicas of different sizes never pair)
        await primary.call("POST", "/v1/stop", {})
        assert (await resize(secondary, 1, NEW))["size"] == NEW  # already done: a no-op
        st = await resize(primary, 3, NEW)
        assert st["size"] == NEW and st["export"]["serving"], st
        await paired_at_the_new_size_with_every_byte(primary, secondary, ident, rng, volume)
