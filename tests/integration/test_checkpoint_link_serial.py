"""A cut asked for while the pair was in sync is refused once the primary has linked again
(docs/correctness.md S5, "a cut never catches a resync").

Real agents and daemons, driven as the operator drives them: the cut carries the serial of
the link the primary reported in sync (``replication.link.serial``, read through the
operator's own ``AgentView``); the secondary's agent changes its serial at every
``POST /v1/relink``, which a primary calls before each new link — so also before the
automatic re-protection after a link drop copies a byte. A cut with a serial from before
that relink is refused: it could land on a disk the resync has half rewritten, and it would
replace the restore point that still holds (the resync's writes pass copy-before-write).
Each test ends by comparing bytes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pairvol.operator.agentclient import AgentClient, AgentError, LinkChanged
from pairvol.operator.decisions import AgentView
from tests.integration.test_auto_resync import cut_link, reprotected
from tests.integration.test_bitmap_resync import (
    SIZE,
    MiB,
    fill,
    image,
    read_all,
    replicating_pair,
    wait_for,
)
from tests.support.agents import Agent, AgentCallError
from tests.support.bytes_compare import assert_same_image


def api(agent: Agent) -> str:
    return agent.api.removeprefix("http://")


async def serial_in_sync(primary: Agent) -> str:
    """The serial the operator reads: the primary's, while it reports its link in sync."""
    view = AgentView.from_status(await primary.status())
    assert view.replication_state == "replicating", view
    assert view.link_serial is not None, "a primary in sync reports the serial of its link"
    return view.link_serial


async def test_a_cut_asked_for_before_the_primary_linked_again_is_refused_and_the_restore_point_stays(
    tmp_path: Path,
) -> None:
    """Known data, checkpoint 1 (a restore point) with the serial the operator read in sync;
    the link drops and the primary re-protects its peer on its own (relink, bitmap resync of
    what was written meanwhile). The operator's cut with the serial it read before is
    refused (409), checkpoint 1 stays the restore point, and a checkpoint-mode failover
    returns exactly the bytes of checkpoint 1."""
    client = AgentClient(timeout_s=30)
    try:
        async with replicating_pair(tmp_path, peer_api=True) as (primary, secondary, ident):
            async with await primary.nbd() as nbd:
                await fill(nbd, 0xA0, [i * MiB for i in range(SIZE // MiB)], MiB)
                await nbd.flush()
                seen = await serial_in_sync(primary)
                cut = await client.checkpoint(api(secondary), "", seen)
                assert cut["id"] == 1
                at_c1 = image(secondary)  # nothing written since the cut: the checkpoint's bytes
                assert_same_image(at_c1, image(primary), "the secondary at checkpoint 1")

                before = (await primary.status())["replication"]["lastSync"]
                await cut_link(primary)
                await fill(nbd, 0xB0, [3 * MiB, 17 * MiB, 40 * MiB])  # the peer misses these
                st = await wait_for(primary, reprotected(before), 20, "automatic re-protection")
                assert st["replication"]["lastSync"]["kind"] == "bitmap", st["replication"]["lastSync"]
                await fill(nbd, 0xC0, [5 * MiB])  # in sync again: replicated
                await nbd.flush()

            now = await serial_in_sync(primary)
            assert now != seen, "the re-protection linked anew: a new serial"
            refused: AgentError | None = None
            try:
                await client.checkpoint(api(secondary), "", seen)
            except AgentError as exc:
                refused = exc
            cp = (await secondary.status())["checkpoint"]

            # the bytes first: what a cut that was not refused costs
            primary.kill()
            await primary.wait_exit()
            done = await secondary.failover(3, "checkpoint")
            async with await secondary.nbd() as nbd:
                promoted = await read_all(nbd)
            assert_same_image(promoted, at_c1, "a checkpoint-mode failover after a refused cut")
            assert (done["mode"], done["checkpointId"]) == ("checkpoint", 1), done
            assert (cp["id"], cp["restorePoint"]) == (1, True), cp
            assert isinstance(refused, LinkChanged), f"the cut with the old serial was not refused: {refused}"
            assert refused.status == 409, refused
            assert "linked to this secondary again" in refused.message, refused.message
            assert "no checkpoint was cut" in refused.message, refused.message
            assert "the restore point is still checkpoint 1" in refused.message, refused.message
            del ident
    finally:
        await client.close()


async def test_a_cut_with_the_serial_of_the_link_in_sync_is_cut_and_a_relink_changes_the_serial(
    tmp_path: Path,
) -> None:
    """The serial the primary reports in sync is the secondary's own
    (``replication.linkSerial``); a cut that carries it is cut, and so is one without a serial
    (a manual call: today's behaviour). A relink changes the secondary's serial; the primary
    links again and, in sync, reports the new one, with which the next cut is cut."""
    client = AgentClient(timeout_s=30)
    try:
        async with replicating_pair(tmp_path, peer_api=True) as (primary, secondary, ident):
            seen = await serial_in_sync(primary)
            assert (await secondary.status())["replication"]["linkSerial"] == seen
            assert (await client.checkpoint(api(secondary), "", seen))["id"] == 1
            assert (await client.checkpoint(api(secondary), ""))["id"] == 2  # no serial: no check

            async with await primary.nbd() as nbd:
                await fill(nbd, 0xA1, [i * MiB for i in range(0, SIZE // MiB, 4)], MiB)
                await nbd.flush()
                before = (await primary.status())["replication"]["lastSync"]
                relinked = await secondary.call("POST", "/v1/relink", {"epoch": 1})
                assert relinked["replication"]["linkSerial"] not in (None, seen), relinked["replication"]
                # the relink cut the primary's link: the next write finds it gone, the primary
                # drops the peer and links again on its own
                await fill(nbd, 0xA2, [2 * MiB, 33 * MiB])
                await wait_for(primary, reprotected(before), 20, "automatic re-protection after the relink")
                await nbd.flush()
            now = await serial_in_sync(primary)
            assert now != seen
            assert (await secondary.status())["replication"]["linkSerial"] == now
            with pytest.raises(LinkChanged):
                await client.checkpoint(api(secondary), "", seen)
            cut = await client.checkpoint(api(secondary), "", now)
            assert cut["id"] == 3
            cp = (await secondary.status())["checkpoint"]
            assert (cp["id"], cp["restorePoint"]) == (3, True), cp

            with pytest.raises(AgentCallError, match=r"400.*invalid linkSerial"):
                await secondary.call("POST", "/v1/checkpoint", {"linkSerial": 7})
            with pytest.raises(AgentError) as other:  # a 409 for another reason is no LinkChanged
                await client.checkpoint(api(primary), "", now)
            assert other.value.status == 409 and not isinstance(other.value, LinkChanged), other.value
            assert_same_image(image(secondary), image(primary), "the secondary after the relinks")
            del ident
    finally:
        await client.close()
