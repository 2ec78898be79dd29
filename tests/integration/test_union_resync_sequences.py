"""Union resync (R6) under sequences its own tests do not drive: role changes of the old
primary between its restart and the pairing that asks for its attestation.

Real agents and daemons, as ``test_union_resync``; every test ends by comparing both disks
byte for byte.
"""

from __future__ import annotations

from pathlib import Path

from tests.integration.test_union_resync import (
    NEW_WRITES,
    REGION,
    MiB,
    disk_id,
    fill,
    image,
    in_sync,
    pair_with,
    promote_and_rejoin,
)
from tests.support.bytes_compare import assert_same_image


async def test_an_old_primary_promoted_by_a_failover_after_its_restart_vouches_for_nothing(tmp_path: Path) -> None:
    """The old primary restarts (its attestation moves into memory), starts as secondary,
    and is then promoted by a failover (an operator acting on a stale view; a split brain
    the Lease would refuse, like ``old.primary`` in test_union_resync): its disk takes
    writes as primary. Demoted in place, it is paired by the first new primary, whose
    record of what it wrote since its promotion is intact: the old primary's writes are on
    its disk only, so a union resync would leave them there."""
    async with in_sync(tmp_path) as (old, new):
        await old.stop()
        await promote_and_rejoin(old, new)
        assert (await old.status())["disk"]["stoppedInSync"] is not None
        await old.failover(5, "latest")  # promoted: its disk is written from here on
        async with await old.nbd() as nbd:
            await fill(nbd, 0xEE, [5 * MiB, 30 * MiB])
        await old.secondary(6)  # demoted in place, without a restart
        started = await pair_with(new, 7, old, 6)
        sync = started["replication"]["sync"]
        await new.wait_replicating()
        last = (await new.status())["replication"]["lastSync"]
        assert_same_image(image(old), image(new), f"old primary after a {last['kind']} resync ({sync['reason']})")
        assert last["kind"] == "checksum", last
        assert "no union" in last["reason"] and "promoted by a failover at epoch 5" in last["reason"], last


async def test_a_second_planned_failover_back_is_again_a_union_of_only_what_was_written_since(tmp_path: Path) -> None:
    """Ping-pong: after the union resync, the new primary is drained in sync, the old one is
    promoted from the identity it had as secondary, writes, and the drained one rejoins:
    again only the regions written since the second promotion are copied, and the bytes
    match. The sync point of the second round names the old primary's disk at its epoch."""
    async with in_sync(tmp_path) as (old, new):
        await old.stop()
        await promote_and_rejoin(old, new)
        started = await pair_with(new, 5, old, 4)
        assert started["replication"]["sync"]["kind"] == "bitmap", started["replication"]
        await new.wait_replicating()
        async with await new.nbd() as nbd:
            await fill(nbd, 0xC5, [12 * MiB, 50 * MiB])  # replicated to both
        source = {"disk": await disk_id(old), "epoch": 4}
        await new.stop()  # drained in sync
        await old.failover(6, "latest")
        assert (await old.status())["replication"]["sincePromotion"] == {"from": source, "reason": None}
        async with await old.nbd() as nbd:
            await fill(nbd, 0xD6, [1 * MiB, 20 * MiB])
        await new.start()
        await new.secondary(7)
        started = await pair_with(old, 8, new, 7)
        assert started["replication"]["sync"]["kind"] == "bitmap", started["replication"]
        st = await old.wait_replicating()
        last = st["replication"]["lastSync"]
        assert last["kind"] == "bitmap" and last["copiedBytes"] == 2 * REGION, last
        async with await old.nbd() as nbd:
            await fill(nbd, 0xC0, [2 * MiB])
        assert_same_image(image(new), image(old), "drained new primary after the second union resync")


async def test_a_checkpoint_mode_promotion_after_two_cuts_rolls_back_only_past_the_last_one(tmp_path: Path) -> None:
    """Two cuts: what the old primary wrote between them is in the last checkpoint (kept on
    both disks), what it wrote after the last one is rolled back on the new primary and so
    copied. The older generation is retired at the failover; its undo log is not part of the
    rollback, and the bytes match."""
    async with in_sync(tmp_path) as (old, new):
        await new.checkpoint()
        async with await old.nbd() as nbd:
            await fill(nbd, 0xE1, [6 * MiB, 33 * MiB])  # between the cuts: kept
        await new.checkpoint()
        async with await old.nbd() as nbd:
            await fill(nbd, 0xE2, [7 * MiB])  # after the last cut: rolled back
        await old.stop()
        await new.failover(3, "checkpoint")
        async with await new.nbd() as nbd:
            await fill(nbd, 0xB3, NEW_WRITES)
            assert await nbd.pread(8, 6 * MiB) == bytes([0xE1]) * 8, "kept by the last checkpoint"
            assert await nbd.pread(8, 7 * MiB) != bytes([0xE2]) * 8, "rolled back"
        await old.start()
        await old.secondary(4)
        started = await pair_with(new, 5, old, 4)
        assert started["replication"]["sync"]["kind"] == "bitmap", started["replication"]
        st = await new.wait_replicating()
        last = st["replication"]["lastSync"]
        async with await new.nbd() as nbd:
            await fill(nbd, 0xC0, [2 * MiB])
        assert_same_image(image(old), image(new), "old primary after a union resync past two cuts")
        assert last["copiedBytes"] == (1 + len(NEW_WRITES)) * REGION, last
