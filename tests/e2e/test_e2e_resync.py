"""Re-protection after a transient secondary outage, through the operator (issue 10): the
secondary's pod dies, its replacement lands on the same node and data dir, and the
operator asks the primary for ``sync: "auto"`` naming that disk; the primary copies only
what the secondary missed. A failover to it afterwards keeps every acknowledged write.
A secondary that stays reachable while its link fails is re-protected by the primary on
its own (docs/correctness.md R5), and the volume shows it."""

from __future__ import annotations

import os
import signal
from typing import Any

from tests.e2e.test_e2e_failover import _at_least, agent_status, failed_over_from, following, replicating

from pairvol.kube.names import OUT_OF_SYNC_ANNOTATION, RESYNC_ANNOTATION
from pairvol.kube.paths import lease_path
from pairvol.localcluster.demo import BLOCK, Stack, pattern
from pairvol.nbd import NBDClient

MiB = 1 << 20


async def test_a_secondary_back_on_its_node_gets_only_what_it_missed(stack: Stack, volume: Any) -> None:
    name = "rsync"
    # two candidate nodes: the secondary's replacement can only go back to where it was
    st = await replicating(stack, volume(name, nodes=["node-1", "node-2"], failover={"mode": "Latest"}))
    old_sec = st["secondary"]
    writer = following(stack, name)
    writer.start()
    target = len(writer.log.acked) + 30
    await stack.wait_for("writes before the outage", lambda: _at_least(writer, target), within=60)
    await stack.sim.kill_pod(stack.namespace, old_sec["pod"])

    async def back() -> dict[str, Any] | None:
        cur = await stack.status(name)
        sec = cur.get("secondary") or {}
        ok = cur.get("phase") == "Replicating" and sec.get("pod") not in (None, old_sec["pod"])
        return cur if ok else None

    st = await stack.wait_for("re-protection", back, within=150, every=0.1)
    assert st["secondary"]["node"] == old_sec["node"]
    assert writer.log.errors == 0, "losing the secondary never interrupts the workload"
    rep = (await agent_status(stack, name, st["primary"]))["replication"]
    # a bitmap resync when the primary's record vouches for the disk, else a checksum
    # comparison (the kill was unclean): either copies only what differs
    assert rep["lastSync"]["kind"] in ("bitmap", "checksum"), rep
    assert rep["lastSync"]["copiedBytes"] < 16 * MiB, rep["lastSync"]  # of a 64 MiB volume
    # the replacement restores the secondary role of its data dir (same disk, same epoch), so
    # the primary may reach it by its own automatic re-protection (R5) before the operator
    # asks for "auto"; either way the resync copies only what differs, and is announced
    events = [e["message"] for e in await stack.events(name) if e["reason"] == "ResyncCompleted"]
    assert any(m.startswith(f"{rep['lastSync']['kind']} resync") for m in events), events

    # the resynced secondary holds every acknowledged write: fail over to it and read them back
    target = len(writer.log.acked) + 30
    await stack.wait_for("writes after the resync", lambda: _at_least(writer, target), within=60)
    old = st["primary"]
    await stack.sim.kill_pod(stack.namespace, old["pod"])
    st = await failed_over_from(stack, name, old["node"])
    target = len(writer.log.acked) + 10
    await stack.wait_for("writes after the failover", lambda: _at_least(writer, target), within=60)
    log = await writer.stop()
    async with await NBDClient.connect_unix(str(stack.socket_path(st))) as nbd:
        image = await nbd.read_all()
    lost = [seq for seq, _ in log.acked if image[seq * BLOCK : (seq + 1) * BLOCK] != bytes([pattern(seq)]) * BLOCK]
    assert not lost, f"{len(lost)} acknowledged writes lost, first {lost[:5]}"


async def test_a_reachable_secondary_whose_link_failed_is_resynced_by_the_primary_and_shown(
    stack: Stack, volume: Any
) -> None:
    """The primary's link daemon dies under writes (a reset connection: the secondary keeps
    running). The primary marks the secondary, takes it out of the quorum and resyncs it on
    its own — no new pod, no new epoch; the volume shows the resync in its status and
    Events and ends Replicating with the Lease's marks gone."""
    name = "autors"
    st = await replicating(stack, volume(name))
    sec, epoch = st["secondary"], st["epoch"]
    writer = following(stack, name)
    writer.start()
    target = len(writer.log.acked) + 30
    await stack.wait_for("writes before the fault", lambda: _at_least(writer, target), within=60)
    before = (await agent_status(stack, name, st["primary"]))["replication"]
    os.kill(before["link"]["pid"], signal.SIGKILL)

    async def resynced() -> dict[str, Any] | None:
        cur = await stack.status(name)
        last = cur.get("lastSync") or {}
        return cur if cur.get("phase") == "Replicating" and last.get("kind") == "bitmap" else None

    st = await stack.wait_for("automatic resync shown", resynced, within=30, every=0.1)
    assert (st["secondary"]["pod"], st["epoch"]) == (sec["pod"], epoch), "the same pairing, no re-pair"
    assert st["secondary"]["outOfSync"] is False and st["secondary"]["synced"] is True
    assert "lacks at most the regions written since it was dropped" in st["lastSync"]["reason"], st["lastSync"]
    rep = (await agent_status(stack, name, st["primary"]))["replication"]
    assert rep["lastSync"]["kind"] == "bitmap" and rep["reprotect"]["failures"] == 1, rep
    done = [e["message"] for e in await stack.events(name) if e["reason"] == "ResyncCompleted"]
    assert any(m.startswith("bitmap resync") and "copied in" in m for m in done), done
    lease = await stack.kube.get(lease_path(stack.namespace, f"pairvol-{name}"))
    marks = (lease.get("metadata") or {}).get("annotations") or {}
    assert OUT_OF_SYNC_ANNOTATION not in marks and RESYNC_ANNOTATION not in marks, marks
    target = len(writer.log.acked) + 30
    await stack.wait_for("writes after the resync", lambda: _at_least(writer, target), within=60)
    log = await writer.stop()
    assert log.errors == 0, "a link failure never interrupts the workload"
