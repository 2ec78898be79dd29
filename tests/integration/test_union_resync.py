"""Union resync: the old primary rejoining after a planned failover (issue 10, docs/correctness.md R6).

Real agents and daemons. The planned case: the primary's agent gets SIGTERM (a drain), its
last writes all reached the secondary, the secondary is promoted in Latest mode, the new
primary writes, and the old primary comes back on its data dir as the new one's secondary.
Its disk then differs from the new primary's only by what the new primary wrote since the
promotion, and ``sync: "auto"`` copies just that (kind ``bitmap``), without reading either
disk whole. Every way the history is not known — an unclean stop, a disk written since,
a record lost with the new primary's daemon, a rollback to a checkpoint — falls back to the
comparison (R4) and says why. Every test ends by comparing both disks byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pairvol.agent import checksum as cs
from pairvol.agent import crashpoints
from pairvol.agent import state as persist
from pairvol.agent.procs import AgentCallError
from pairvol.nbd import NBDClient
from tests.support.agents import Agent
from tests.support.bytes_compare import assert_same_image
from tests.support.writelog import WriteLog

MiB = 1 << 20
KiB = 1 << 10
SIZE = 64 * MiB
REGION = cs.REGION
# what the new primary writes after its promotion: 64 KiB each, region-aligned
NEW_WRITES = (9 * MiB, 41 * MiB + 64 * KiB, 63 * MiB)


def image(agent: Agent) -> bytes:
    return (agent.data_dir / "disk.raw").read_bytes()


def sent_bytes(metrics: str) -> float:
    m = re.search(r'^pairvol_replication_sent_bytes_total\{volume="vol"\} (\S+)$', metrics, re.M)
    return float(m.group(1)) if m else 0.0


async def disk_id(agent: Agent) -> str:
    ident = (await agent.status())["disk"]["id"]
    assert isinstance(ident, str)
    return ident


async def pair_with(primary: Agent, epoch: int, secondary: Agent, peer_epoch: int, sync: str = "auto") -> Any:
    """As the operator pairs them: the secondary's disk identity and its agent's address."""
    return await primary.call("POST", "/v1/primary", {
        "epoch": epoch, "peer": secondary.replication_address, "sync": sync, "peerEpoch": peer_epoch,
        "peerDisk": await disk_id(secondary), "peerApi": secondary.api.removeprefix("http://"),
    })


async def fill(nbd: NBDClient, pattern: int, offsets: list[int] | tuple[int, ...], length: int = 64 * KiB) -> None:
    for off in offsets:
        await nbd.pwrite(bytes([pattern]) * length, off)
    await nbd.flush()


def stopped_in_sync(agent: Agent) -> Any:
    found = persist.load(agent.data_dir)
    assert found is not None
    return found.stopped_in_sync


async def start_armed(agent: Agent, crash_at: str | None, monkeypatch: pytest.MonkeyPatch | None) -> None:
    """Start the agent with ``crash_at`` armed (in this process only)."""
    if crash_at is None or monkeypatch is None:
        await agent.start()
        return
    monkeypatch.setenv(crashpoints.ENV, crash_at)
    try:
        await agent.start()
    finally:
        monkeypatch.delenv(crashpoints.ENV)


@contextlib.asynccontextmanager
async def in_sync(
    tmp: Path, monkeypatch: pytest.MonkeyPatch | None = None, crash_old: str | None = None,
    crash_new: str | None = None,
) -> AsyncIterator[tuple[Agent, Agent]]:
    """``old`` primary (epoch 2) of ``new`` (secondary, epoch 1), in sync, 16 MiB written
    (in the second half: the first is the concurrent writers')."""
    old = Agent("vol", tmp / "replica-0", "64Mi")
    new = Agent("vol", tmp / "replica-1", "64Mi")
    try:
        await asyncio.gather(start_armed(old, crash_old, monkeypatch), start_armed(new, crash_new, monkeypatch))
        await new.secondary(1)
        await pair_with(old, 2, new, 1, sync="full")
        await old.wait_replicating()
        async with await old.nbd() as nbd:
            await fill(nbd, 0xA0, range(40 * MiB, 56 * MiB, MiB), MiB)
        yield old, new
    finally:
        await asyncio.gather(old.stop(), new.stop(), return_exceptions=True)


async def promote_and_restart(old: Agent, new: Agent, mode: str = "latest") -> None:
    """``new`` is promoted (epoch 3) and writes NEW_WRITES; ``old`` is started again on its
    data dir (no role given yet)."""
    await new.failover(3, mode)
    async with await new.nbd() as nbd:
        await fill(nbd, 0xB3, NEW_WRITES)
    await old.start()


async def promote_and_rejoin(old: Agent, new: Agent, mode: str = "latest") -> None:
    """:func:`promote_and_restart`, and ``old`` comes back as ``new``'s secondary (epoch 4)."""
    await promote_and_restart(old, new, mode)
    await old.secondary(4)


async def resynced(primary: Agent, old: Agent, epoch: int = 5) -> dict[str, Any]:
    """Pair, wait until in sync, and check both disks byte for byte; the finished sync."""
    started = await pair_with(primary, epoch, old, 4)
    st = await primary.wait_replicating()
    last: dict[str, Any] = st["replication"]["lastSync"]
    assert last["kind"] == started["replication"]["sync"]["kind"], (started["replication"], last)
    async with await primary.nbd() as nbd:
        await fill(nbd, 0xC0, [2 * MiB])  # synchronous again
    assert_same_image(image(old), image(primary), f"old primary after a {last['kind']} resync")
    return last


async def test_a_cleanly_stopped_primary_rejoining_gets_only_what_the_new_primary_wrote(tmp_path: Path) -> None:
    async with in_sync(tmp_path) as (old, new):
        source = {"disk": await disk_id(new), "epoch": 1}
        await old.stop()  # SIGTERM: the drain, as `kubectl drain` evicts the pod
        assert stopped_in_sync(old).to_api() == source
        await promote_and_rejoin(old, new)
        assert (await new.status())["replication"]["sincePromotion"] == {"from": source, "reason": None}
        assert (await old.status())["disk"]["stoppedInSync"] == source
        assert stopped_in_sync(old) is None, "taken at the start, before anything could write the disk"
        sent_before = sent_bytes(await new.metrics())
        started = await pair_with(new, 5, old, 4)
        sync = started["replication"]["sync"]
        assert sync["kind"] == "bitmap", sync
        assert f"written since the promotion from {source['disk']} at epoch 1" in sync["reason"], sync
        st = await new.wait_replicating()
        last = st["replication"]["lastSync"]
        # exactly the three 64 KiB regions written since the promotion, no comparison
        assert last["kind"] == "bitmap" and last["copiedBytes"] == len(NEW_WRITES) * REGION, last
        sent = sent_bytes(await new.metrics()) - sent_before
        assert sent <= 2 * len(NEW_WRITES) * REGION, f"{sent} bytes sent for {len(NEW_WRITES)} regions written"
        assert st["replication"]["resync"] == {"peerDisk": await disk_id(old), "tracking": False, "fullReason": None}
        assert st["replication"]["sincePromotion"]["from"] is None, "a pairing ends the record"
        assert (await old.status())["disk"]["stoppedInSync"] is None, "handed out once"
        async with await new.nbd() as nbd:
            await fill(nbd, 0xC0, [2 * MiB])
        assert_same_image(image(old), image(new), "old primary after a union resync")


async def test_a_union_resync_under_concurrent_writes_ends_byte_exact(tmp_path: Path) -> None:
    """Writers overwrite the first half while the regions written since the promotion are
    copied (R2's ordering); then a failover to the old primary shows every acknowledged write."""
    async with in_sync(tmp_path) as (old, new):
        await old.stop()
        await new.failover(3, "latest")
        async with await new.nbd() as nbd:  # 4 MiB written since the promotion, before the writers start
            await fill(nbd, 0xB3, range(40 * MiB, 44 * MiB, MiB), MiB)
        await old.start()
        await old.secondary(4)
        log = WriteLog(writers=16, slots=SIZE // 2 // 4096)
        stop = asyncio.Event()
        async with await new.nbd() as nbd:
            load = asyncio.create_task(log.run(nbd, stop, random.Random(21)))
            try:
                await log.wait_acked(300)
                before = log.acked()
                started = await pair_with(new, 5, old, 4)
                assert started["replication"]["sync"]["kind"] == "bitmap", started["replication"]
                st = await new.wait_replicating(60)
                during = log.acked() - before
                assert st["replication"]["lastSync"]["kind"] == "bitmap", st["replication"]
                assert during > 20, f"only {during} writes were acknowledged during the resync: no race was tried"
                await log.wait_acked(log.acked() + 300)
            finally:
                stop.set()
                await load
            await nbd.flush()
        assert all(e == "stopped" for e in log.ended), log.ended
        assert_same_image(image(old), image(new), "old primary after a union resync under writes")
        acked_at = time.monotonic()
        new.kill()
        await new.wait_exit()
        await old.failover(6, "latest")
        async with await old.nbd() as nbd:
            promoted = b"".join([await nbd.pread(4 * MiB, off) for off in range(0, SIZE // 2, 4 * MiB)])
        log.check_cut(promoted, acked_at, acked_at)


async def test_the_record_since_the_promotion_survives_a_clean_restart_of_the_new_primary(tmp_path: Path) -> None:
    async with in_sync(tmp_path) as (old, new):
        await old.stop()
        await promote_and_rejoin(old, new)
        await new.stop()
        await new.start()
        await new.primary(5, None, "none")  # the same disk confirmed as primary, writing on
        async with await new.nbd() as nbd:
            await fill(nbd, 0xB5, [20 * MiB])
        last = await resynced(new, old, epoch=6)
        assert last["kind"] == "bitmap" and last["copiedBytes"] == (len(NEW_WRITES) + 1) * REGION, last


async def test_an_old_primary_killed_is_compared_and_the_reason_says_it_stopped_uncleanly(tmp_path: Path) -> None:
    async with in_sync(tmp_path) as (old, new):
        old.kill()
        await old.wait_exit()
        await promote_and_rejoin(old, new)
        last = await resynced(new, old)
        assert last["kind"] == "checksum", last
        assert "no union" in last["reason"] and "not clean" in last["reason"], last


async def test_an_old_primary_that_wrote_alone_before_its_clean_stop_is_compared(tmp_path: Path) -> None:
    """The secondary died, the primary went on alone, then stopped cleanly: its disk holds
    acknowledged writes the promoted secondary never got, so there is no union to offer."""
    async with in_sync(tmp_path) as (old, new):
        new.kill()  # on this boot: its disk keeps its identity
        await new.wait_exit()
        async with await old.nbd() as nbd:
            await fill(nbd, 0xEE, [5 * MiB, 30 * MiB + 128 * KiB])
        await old.stop()
        found = persist.load(old.data_dir)
        assert found is not None and found.stopped_in_sync is None and found.stop_note is not None
        # the failed link is still a child of the quorum, or already gone: either way, said
        said = ("no peer was in the quorum at the stop", "the link to the peer had failed")
        assert found.stop_note.startswith(said), found.stop_note
        await new.start()
        await promote_and_rejoin(old, new)
        last = await resynced(new, old)  # a union would leave the old primary's own writes
        assert last["kind"] == "checksum", last
        assert "no union" in last["reason"] and any(s in last["reason"] for s in said), last
        assert 5 * REGION <= last["copiedBytes"] <= 10 * REGION, last


async def test_an_old_primary_that_served_again_after_its_clean_stop_is_compared(tmp_path: Path) -> None:
    """Its disk took writes (as primary) after it attested: the attestation left the state
    file at that start and left memory when it started as primary, before the export served."""
    async with in_sync(tmp_path) as (old, new):
        await old.stop()
        await promote_and_restart(old, new)
        assert stopped_in_sync(old) is None
        await old.primary(3, None, "none")  # a split brain the Lease would refuse: its disk is written
        async with await old.nbd() as nbd:
            await fill(nbd, 0xEE, [5 * MiB, 30 * MiB])
        await old.secondary(4)  # demoted in place, without a restart
        last = await resynced(new, old)
        assert last["kind"] == "checksum", last
        assert "no union" in last["reason"] and "it started as primary at epoch 3" in last["reason"], last
        assert last["copiedBytes"] <= 10 * REGION, last


async def test_a_new_primary_restarted_uncleanly_has_no_record_and_compares(tmp_path: Path) -> None:
    async with in_sync(tmp_path) as (old, new):
        await old.stop()
        await promote_and_rejoin(old, new)
        new.kill()
        await new.wait_exit()
        await new.start()
        st = await new.status()
        assert st["replication"]["sincePromotion"]["from"] is None
        assert "unclean stop" in st["replication"]["sincePromotion"]["reason"], st["replication"]
        last = await resynced(new, old)
        assert last["kind"] == "checksum", last
        assert "no union" in last["reason"] and "unclean stop" in last["reason"], last


async def test_a_checkpoint_mode_promotion_also_copies_the_regions_the_rollback_changed(tmp_path: Path) -> None:
    """The promotion rolled the disk back to the cut: what the old primary wrote after the
    checkpoint is on the old primary and not on the new one. The undo log's allocation map,
    read before the commit, seeds the bitmap with exactly those regions."""
    async with in_sync(tmp_path) as (old, new):
        await new.checkpoint()
        async with await old.nbd() as nbd:
            await fill(nbd, 0xEF, [6 * MiB, 33 * MiB])  # after the cut: rolled back on the new primary
        await old.stop()
        await promote_and_rejoin(old, new, mode="checkpoint")
        last = await resynced(new, old)  # without the rolled-back regions the bytes would differ
        assert last["kind"] == "bitmap" and "written since the promotion" in last["reason"], last
        assert last["copiedBytes"] == (2 + len(NEW_WRITES)) * REGION, last


async def test_a_primary_that_links_without_asking_ends_the_attestation(tmp_path: Path) -> None:
    """A full copy does not ask for the attestation, but it relinks before it writes: from
    then on the old primary vouches for nothing."""
    async with in_sync(tmp_path) as (old, new):
        await old.stop()
        await promote_and_rejoin(old, new)
        assert (await old.status())["disk"]["stoppedInSync"] is not None
        started = await pair_with(new, 5, old, 4, sync="full")
        assert started["replication"]["sync"]["kind"] == "full", started["replication"]
        await new.wait_replicating()
        assert (await old.status())["disk"]["stoppedInSync"] is None
        assert_same_image(image(old), image(new), "old primary after a full copy")


async def test_the_attestation_is_handed_out_once(tmp_path: Path) -> None:
    """Whoever asks first consumes it: a pairing after that compares."""
    async with in_sync(tmp_path) as (old, new):
        await old.stop()
        await promote_and_rejoin(old, new)
        ident = await disk_id(old)
        first = await old.call("POST", "/v1/digests", {"disk": ident})
        assert first["stoppedInSync"] is not None and first["notInSyncReason"] is None, first
        again = await old.call("POST", "/v1/digests", {"disk": ident})
        assert again["stoppedInSync"] is None and "already handed" in again["notInSyncReason"], again
        last = await resynced(new, old)
        assert last["kind"] == "checksum" and "already handed" in last["reason"], last


async def test_a_crash_just_after_the_clean_stop_attested_keeps_the_union(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the final state of its clean stop was written: that state is complete."""
    async with in_sync(tmp_path, monkeypatch, crash_old="union.attested") as (old, new):
        await old.stop()
        assert await old.wait_exit() == -9, old.log_tail()
        assert stopped_in_sync(old) is not None
        await promote_and_rejoin(old, new)
        last = await resynced(new, old)
        assert last["kind"] == "bitmap" and last["copiedBytes"] == len(NEW_WRITES) * REGION, last


async def test_a_crash_just_after_the_restart_took_the_attestation_compares(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the restart cleared it durably: the next start finds none."""
    async with in_sync(tmp_path) as (old, new):
        await old.stop()
        await new.failover(3, "latest")
        async with await new.nbd() as nbd:
            await fill(nbd, 0xB3, NEW_WRITES)
        monkeypatch.setenv(crashpoints.ENV, "union.attestation-taken")
        await old.start(wait=False)
        monkeypatch.delenv(crashpoints.ENV)
        assert await old.wait_exit() == -9, old.log_tail()
        assert stopped_in_sync(old) is None
        await old.start()
        await old.secondary(4)
        last = await resynced(new, old)
        assert last["kind"] == "checksum" and "not clean" in last["reason"], last


async def test_a_crash_just_after_the_record_started_compares(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The new primary killed during its promotion, after the bitmap started and before it
    served: the bitmap died with its daemon, the restart drops the record."""
    async with in_sync(tmp_path, monkeypatch, crash_new="union.started") as (old, new):
        await old.stop()
        with contextlib.suppress(AgentCallError, OSError, asyncio.TimeoutError, aiohttp.ClientError):
            await new.failover(3, "latest")  # it dies before it answers
        assert await new.wait_exit() == -9, new.log_tail()
        await new.start()
        await new.primary(4, None, "none")  # the operator confirms the promotion
        async with await new.nbd() as nbd:
            await fill(nbd, 0xB3, NEW_WRITES)
        await old.start()
        await old.secondary(4)
        last = await resynced(new, old)
        assert last["kind"] == "checksum" and "unclean stop" in last["reason"], last
