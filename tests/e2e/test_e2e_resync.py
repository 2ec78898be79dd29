"""Re-protection after a transient secondary outage, through the operator (issue 10): the
secondary's pod dies, its replacement lands on the same node and data dir, and the
operator asks the primary for ``sync: "auto"`` naming that disk; the primary copies only
what the secondary missed. A failover to it afterwards keeps every acknowledged write."""

from __future__ import annotations

from typing import Any

from tests.e2e.test_e2e_failover import _at_least, agent_status, failed_over_from, following, replicating

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
    events = [e["message"] for e in await stack.events(name) if e["reason"] == "Resync"]
    assert any("the primary copies what differs" in m for m in events), events

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
