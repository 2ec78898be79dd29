"""Checksum resync: the peer's disk holds data of unknown history (issue 10, docs/correctness.md R4).

Real agents and daemons. The typical case is the old primary rejoining as secondary after a
failover: its disk differs from the new primary's by what the new primary wrote since the
promotion and what the old one wrote that never reached the secondary. ``sync: "auto"``
with ``peerApi`` makes both agents digest their own disks region by region; only the
regions that differ are copied. Every test ends by comparing both disks byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pairvol.agent import checksum as cs
from pairvol.agent import crashpoints
from pairvol.agent.procs import AgentCallError
from pairvol.agent.replica import CHECKSUM_MARKED
from pairvol.nbd import NBDClient
from tests.support.agents import Agent, frozen
from tests.support.bytes_compare import assert_same_image
from tests.support.promtext import value
from tests.support.writelog import WriteLog

MiB = 1 << 20
KiB = 1 << 10
SIZE = 64 * MiB
REGION = cs.REGION


def image(agent: Agent) -> bytes:
    return (agent.data_dir / "disk.raw").read_bytes()


def api(agent: Agent) -> str:
    return agent.api.removeprefix("http://")


def sent_bytes(metrics: str) -> float:
    m = re.search(r'^pairvol_replication_sent_bytes_total\{volume="vol"\} (\S+)$', metrics, re.M)
    return float(m.group(1)) if m else 0.0


def differing_regions(a: bytes, b: bytes) -> int:
    return sum(1 for off in range(0, len(a), REGION) if a[off:off + REGION] != b[off:off + REGION])


async def wait_for(agent: Agent, pred: Any, within: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        st = await agent.status()
        if pred(st):
            return st
        assert time.monotonic() < deadline, f"{what}: not within {within} s: {st}"
        await asyncio.sleep(0.05)


async def disk_id(agent: Agent) -> str:
    ident = (await agent.status())["disk"]["id"]
    assert isinstance(ident, str)
    return ident


async def pair_with(
    primary: Agent, epoch: int, secondary: Agent, peer_epoch: int, sync: str = "auto", peer_api: bool = True
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "epoch": epoch,
        "peer": secondary.replication_address,
        "sync": sync,
        "peerEpoch": peer_epoch,
        "peerDisk": await disk_id(secondary),
    }
    if peer_api:
        body["peerApi"] = api(secondary)
    return await primary.call("POST", "/v1/primary", body)


async def fill(nbd: NBDClient, pattern: int, offsets: list[int], length: int = 64 * KiB) -> None:
    for off in offsets:
        await nbd.pwrite(bytes([pattern]) * length, off)


def scribble(agent: Agent, offsets: list[int], pattern: int) -> None:
    """Writes that reached this replica's disk and no other (the old primary's last writes,
    never acknowledged by its secondary): put straight into the stopped replica's file."""
    fd = os.open(agent.data_dir / "disk.raw", os.O_WRONLY)
    try:
        for off in offsets:
            os.pwrite(fd, bytes([pattern]) * (16 * KiB), off)
    finally:
        os.close(fd)


@contextlib.asynccontextmanager
async def rejoined(
    tmp: Path,
    filled: tuple[int, int] = (0, SIZE),
    old_writes: tuple[int, ...] = (5 * MiB, 30 * MiB + 128 * KiB),
    new_writes: tuple[int, ...] = (9 * MiB, 41 * MiB + 64 * KiB, 63 * MiB),
    **kw: Any,
) -> AsyncIterator[tuple[Agent, Agent]]:
    """A pair whose roles swapped the hard way: ``old`` was primary of ``new`` (epoch 2,
    in sync, the volume written whole), ``old`` was killed with writes of its own that
    never reached ``new``, ``new`` was promoted (epoch 3) and wrote, and ``old`` came back
    on its data dir as ``new``'s secondary (epoch 4). Yields (new primary, old primary)."""
    old = Agent("vol", tmp / "replica-0", "64Mi", **kw)
    new = Agent("vol", tmp / "replica-1", "64Mi", **kw)
    try:
        await asyncio.gather(old.start(), new.start())
        await new.secondary(1)
        await pair_with(old, 2, new, 1, sync="full", peer_api=False)
        await old.wait_replicating()
        async with await old.nbd() as nbd:
            await fill(nbd, 0xA0, list(range(*filled, MiB)), MiB)
            await nbd.flush()
        old.kill()
        await old.wait_exit()
        scribble(old, list(old_writes), 0xEE)
        await new.failover(3, "latest")
        async with await new.nbd() as nbd:
            await fill(nbd, 0xB3, list(new_writes))
            await nbd.flush()
        await old.start()
        await old.secondary(4)
        yield new, old
    finally:
        await asyncio.gather(old.stop(), new.stop(), return_exceptions=True)


async def test_the_old_primary_rejoining_gets_only_the_regions_that_differ(tmp_path: Path) -> None:
    async with rejoined(tmp_path) as (primary, old):
        differ = differing_regions(image(primary), image(old))
        assert differ == 5, "two scribbled regions of the old primary and three written by the new one"
        sent_before = sent_bytes(await primary.metrics())
        started = await pair_with(primary, 5, old, 4)
        sync = started["replication"]["sync"]
        assert sync["kind"] == "checksum", started["replication"]
        assert "history" in sync["reason"] and "unknown" in sync["reason"], sync
        assert 0 <= sync["comparedBytes"] <= SIZE, sync  # how far both sides have compared
        st = await primary.wait_replicating()
        last = st["replication"]["lastSync"]
        assert last["kind"] == "checksum", last
        # the comparison is progress too (PairvolResyncStalled watches it): all of the volume
        assert value(await primary.metrics(), "pairvol_sync_compared_bytes", volume="vol") == SIZE
        # what it copies is what differs (one 64 KiB region each), not the volume
        assert differ * REGION <= last["copiedBytes"] <= 2 * differ * REGION, last
        sent = sent_bytes(await primary.metrics()) - sent_before
        assert sent <= 2 * differ * REGION, f"{sent} bytes sent over the link for {differ} differing regions"
        assert st["replication"]["resync"] == {"peerDisk": await disk_id(old), "tracking": False, "fullReason": None}
        async with await primary.nbd() as nbd:
            await fill(nbd, 0xC0, [2 * MiB])  # synchronous again
            await nbd.flush()
        assert_same_image(image(old), image(primary), "old primary after a checksum resync")


async def test_a_checksum_resync_under_concurrent_writes_ends_byte_exact(tmp_path: Path) -> None:
    """Writers overwrite the volume while both sides digest it and the differing regions
    are copied: a write racing the comparison of its region is in the dirty bitmap (started
    before the comparison), a write racing the copy waits for it (R2). At the end both disks
    are equal, and a failover to the old primary shows every acknowledged write."""
    # the writers own the first half (blocks of their own or zeroes); the replicas differ in the second
    apart: dict[str, Any] = {
        "filled": (SIZE // 2, SIZE), "old_writes": (40 * MiB, 50 * MiB + 128 * KiB), "new_writes": (45 * MiB, 60 * MiB),
    }
    async with rejoined(tmp_path, **apart) as (primary, old):
        log = WriteLog(writers=16, slots=SIZE // 2 // 4096)
        stop = asyncio.Event()
        async with await primary.nbd() as nbd:
            load = asyncio.create_task(log.run(nbd, stop, random.Random(20)))
            try:
                await log.wait_acked(300)
                before = log.acked()
                await pair_with(primary, 5, old, 4)
                st = await primary.wait_replicating(120)
                during = log.acked() - before
                assert st["replication"]["lastSync"]["kind"] == "checksum", st["replication"]
                assert during > 20, f"only {during} writes were acknowledged during the resync: no race was tried"
                await log.wait_acked(log.acked() + 300)  # synchronous replication under the same load
            finally:
                stop.set()
                await load
            await nbd.flush()
        assert all(e == "stopped" for e in log.ended), log.ended
        assert_same_image(image(old), image(primary), "old primary after a checksum resync under writes")
        acked_at = time.monotonic()
        primary.kill()
        await primary.wait_exit()
        await old.failover(6, "latest")
        async with await old.nbd() as nbd:
            promoted = b"".join([await nbd.pread(4 * MiB, off) for off in range(0, SIZE // 2, 4 * MiB)])
        log.check_cut(promoted, acked_at, acked_at)


async def test_a_secondary_killed_mid_comparison_is_compared_again_and_ends_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with rejoined(tmp_path) as (primary, old):
        ident = await disk_id(old)
        await old.stop()
        monkeypatch.setenv(crashpoints.ENV, "digests.read:2")  # the second span of its disk
        await old.start()
        monkeypatch.delenv(crashpoints.ENV)
        await pair_with(primary, 5, old, 4)
        assert await old.wait_exit() == -9, old.log_tail()
        st = await wait_for(primary, lambda s: s["replication"]["state"] == "degraded", 20, "peer dropped")
        assert "checksum resync failed" in st["replication"]["error"], st["replication"]
        assert st["replication"]["outOfSync"] is True
        assert st["replication"]["resync"]["peerDisk"] is None, "nothing is recorded before the comparison ends"
        await old.start()  # killed on this boot: its disk keeps its identity
        assert await disk_id(old) == ident
        await pair_with(primary, 6, old, 4)
        st = await primary.wait_replicating()
        last = st["replication"]["lastSync"]
        assert last["kind"] == "checksum" and "did not finish" in last["reason"], last
        assert_same_image(image(old), image(primary), "old primary after an interrupted comparison")


async def test_a_secondary_killed_after_the_comparison_gets_a_bitmap_resync_of_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the differing regions are in the dirty bitmap, the primary has a record of that
    disk like after a dropped link: the next resync copies the bitmap, without comparing.

    The primary freezes right after it recorded the comparison (``checksum.marked``, before
    the copy starts), the secondary is killed then, and the primary goes on: the copy fails
    on the lost connection with nothing else in flight. (Killed at a moment of its own
    choosing, the secondary may take a FLUSH with it, and a flush that fails is a failed
    writeback as far as the primary can tell: that link failure rightly makes the next
    resync a comparison again, docs/correctness.md R3.)"""
    async with rejoined(tmp_path) as (primary, old):
        ident = await disk_id(old)
        await primary.stop()
        monkeypatch.setenv(crashpoints.ENV, f"{CHECKSUM_MARKED.name}:1:stop")
        await primary.start()
        monkeypatch.delenv(crashpoints.ENV)
        await pair_with(primary, 5, old, 4)
        await frozen(primary, CHECKSUM_MARKED.name)
        assert primary.proc is not None
        old.kill()
        await old.wait_exit()
        os.kill(primary.proc.pid, signal.SIGCONT)
        st = await wait_for(primary, lambda s: s["replication"]["state"] == "degraded", 20, "peer dropped")
        assert st["replication"]["resync"] == {"peerDisk": ident, "tracking": True, "fullReason": None}, st
        async with await primary.nbd() as nbd:
            await fill(nbd, 0xD4, [17 * MiB])
            await nbd.flush()
        await old.start()
        await pair_with(primary, 6, old, 4)
        st = await primary.wait_replicating()
        assert st["replication"]["lastSync"]["kind"] == "bitmap", st["replication"]
        assert_same_image(image(old), image(primary), "old primary after a comparison and a bitmap resync")


@pytest.mark.parametrize(
    "crash_at", ["checksum.started", "checksum.compared", "checksum.marked", "resync.started", "resync.copied"]
)
async def test_a_primary_killed_at_each_step_of_a_checksum_resync_resyncs_again_and_ends_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: str
) -> None:
    async with rejoined(tmp_path) as (primary, old):
        await primary.stop()
        monkeypatch.setenv(crashpoints.ENV, crash_at)
        await primary.start()
        monkeypatch.delenv(crashpoints.ENV)
        with contextlib.suppress(AgentCallError, OSError, asyncio.TimeoutError):
            await pair_with(primary, 5, old, 4)  # resync.started: dies before it answers
        assert await primary.wait_exit() == -9, primary.log_tail()
        await primary.start()
        await pair_with(primary, 6, old, 4)
        st = await primary.wait_replicating()
        last = st["replication"]["lastSync"]
        assert last["kind"] == "checksum", last  # the record died with the daemon: compared again
        assert last["copiedBytes"] <= 10 * REGION, last
        assert_same_image(image(old), image(primary), f"old primary after a primary crash at {crash_at}")


async def test_a_peer_whose_agent_cannot_be_asked_is_not_linked_and_the_reason_is_said(tmp_path: Path) -> None:
    """``peerApi`` is also where the primary has the secondary end its older replication
    connections before it links (docs/correctness.md R5): an agent that cannot be reached
    there cannot vouch that no write of an earlier link lands after the copy, so the pairing
    fails with the reason, the peer stays marked, and nothing is copied. Asked where its
    agent listens, the same peer is compared and resynced."""
    async with rejoined(tmp_path) as (primary, old):
        body = {
            "epoch": 5, "peer": old.replication_address, "sync": "auto", "peerEpoch": 4,
            "peerDisk": await disk_id(old), "peerApi": "127.0.0.1:9",  # nothing listens there
        }
        with pytest.raises(AgentCallError, match=re.escape("127.0.0.1:9 to end its replication connections")):
            await primary.call("POST", "/v1/primary", body)
        st = await primary.status()
        assert st["replication"]["state"] == "degraded" and st["replication"]["outOfSync"] is True, st
        body.update(epoch=6, peerApi=old.api.removeprefix("http://"))
        await primary.call("POST", "/v1/primary", body)
        st = await primary.wait_replicating()
        assert st["replication"]["lastSync"]["kind"] == "checksum", st["replication"]["lastSync"]
        assert_same_image(image(old), image(primary), "old primary after the comparison")


async def test_a_new_blank_secondary_is_copied_in_full_not_compared(tmp_path: Path) -> None:
    primary = Agent("vol", tmp_path / "replica-0", "64Mi")
    fresh = Agent("vol", tmp_path / "replica-1", "64Mi")
    try:
        await asyncio.gather(primary.start(), fresh.start())
        await primary.primary(1, None, "none")
        async with await primary.nbd() as nbd:
            await fill(nbd, 0xA7, [0, 33 * MiB])
        await fresh.secondary(2)
        await pair_with(primary, 3, fresh, 2)
        st = await primary.wait_replicating()
        last = st["replication"]["lastSync"]
        assert last["kind"] == "full" and "blank" in last["reason"], last
        assert_same_image(image(fresh), image(primary), "a new secondary after a full copy")
    finally:
        await asyncio.gather(primary.stop(), fresh.stop(), return_exceptions=True)


async def test_digests_are_given_only_with_the_token_for_the_disk_the_secondary_has(tmp_path: Path) -> None:
    token = "a-volume-token-0123456789"
    async with rejoined(tmp_path, token=token) as (primary, old):
        ident = await disk_id(old)
        with pytest.raises(AgentCallError) as err:
            await old.call("POST", "/v1/digests", {"disk": ident}, token="not-the-volume-token")
        assert err.value.status == 401
        meta = await old.call("POST", "/v1/digests", {"disk": ident})
        assert (meta["disk"], meta["size"], meta["regionSize"], meta["digests"]) == (ident, SIZE, REGION, "")
        span = await old.call("POST", "/v1/digests", {"disk": ident, "offset": MiB, "length": MiB})
        assert bytes.fromhex(span["digests"]) == cs.digest_span(old.data_dir / "disk.raw", SIZE, MiB, MiB)
        for body, status, says in [
            ({"disk": "f" * 32}, 409, "not " + "f" * 32),
            ({"disk": ident, "offset": 4096, "length": REGION}, 400, "multiple of the region size"),
            ({"disk": ident, "offset": SIZE - REGION, "length": 2 * REGION}, 400, "beyond the volume"),
            ({"disk": ident, "length": 64 * MiB}, 400, "at most"),
            ({"disk": "../../etc/passwd"}, 400, "32 lowercase hex digits"),
            ({"disk": ident, "offset": -1}, 400, "integer >= 0"),
        ]:
            with pytest.raises(AgentCallError) as err:
                await old.call("POST", "/v1/digests", body)
            assert err.value.status == status and says in str(err.value.body), (body, err.value.body)
        with pytest.raises(AgentCallError) as err:  # a primary's disk changes under its workload
            await primary.call("POST", "/v1/digests", {"disk": ident})
        assert err.value.status == 409 and "running secondary" in str(err.value.body)
        # with the token the primary holds, the checksum resync goes through
        await pair_with(primary, 5, old, 4)
        st = await primary.wait_replicating()
        assert st["replication"]["lastSync"]["kind"] == "checksum"
        assert_same_image(image(old), image(primary), "old primary after a checksum resync with a token")
