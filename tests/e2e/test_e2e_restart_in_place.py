"""A primary that lost only its Lease serves again in place; one that keeps losing it fails over.

On the local cluster with the real operator, agents and daemons. The primary's node is cut off
from the API server alone (iptables inside its network namespace, as the chaos class
`api-unreachable` does): its kubelet and its agent cannot renew anything, while the operator
still reaches the agent and the secondary still takes the replication. The agent fences its
export when its Lease runs out. What the operator does next is the promise under test
(docs/correctness.md, H10 and H11):

* the API server comes back before the operator decides: the same pod serves again at a new
  epoch, nothing is rolled back even in Checkpoint mode (every write acknowledged before the
  cut is there, also those after the last checkpoint), the secondary is kept and catches up
  with a bitmap resync;
* the API server stays away: the restart in place cannot take the Lease, and the next loss
  fails over to the secondary (Latest mode: no acknowledged write lost).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlparse

import pytest
from tests.e2e.test_e2e_failover import _at_least, agent_status, following, replicating
from tests.support.promtext import value

from pairvol.localcluster.demo import Stack, Writer, verify_log

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.timeout(240)]


@asynccontextmanager
async def api_cut_off(stack: Stack, node: str, kubelet: bool = True) -> AsyncIterator[None]:
    """``node``'s pods (and its kubelet unless ``kubelet`` is false) cannot reach the API
    server (silently: DROP); everything else still reaches them and they everything else."""
    url = urlparse(stack.sim.in_cluster_url)
    match = ["-d", str(url.hostname), "-p", "tcp", "--dport", str(url.port), "-j", "DROP"]
    rules = [["FORWARD", *match]] + ([["OUTPUT", *match]] if kubelet else [])
    for rule in rules:
        await stack.sim.run_in_node(node, ["iptables", "-w", "-I", *rule])
    try:
        yield
    finally:
        for rule in rules:
            await stack.sim.run_in_node(node, ["iptables", "-w", "-D", *rule])


async def written(stack: Stack, manifest: dict[str, Any]) -> tuple[dict[str, Any], Writer]:
    """The volume replicating, with a writer on its primary that has 40 writes acknowledged."""
    st = await replicating(stack, manifest)
    writer = following(stack, manifest["metadata"]["name"])
    writer.start()
    await stack.wait_for("writes", lambda: _at_least(writer, 40), within=30)
    return st, writer


async def fenced_by_its_lease(stack: Stack, name: str, primary: dict[str, Any]) -> None:
    async def fenced() -> bool:
        export = (await agent_status(stack, name, primary))["export"]
        return export["serving"] is False and export["fencedBy"] == "lease"

    await stack.wait_for(f"{primary['pod']} to fence itself for its lost Lease", fenced, within=30, every=0.1)


async def test_a_primary_that_only_lost_its_lease_serves_again_in_place_without_a_rollback(
    stack: Stack, volume: Any
) -> None:
    name = "inplace"
    # no checkpoint after the first: a failover in Checkpoint mode would roll every write back
    st, writer = await written(stack, volume(name, failover={"mode": "Checkpoint"}, checkpoint={"intervalSeconds": 0}))
    old, old_secondary, old_epoch = st["primary"], st["secondary"], st["epoch"]

    async with api_cut_off(stack, old["node"]):
        writer.outage_start = time.time()
        await fenced_by_its_lease(stack, name, old)
    # the API server answers the node again before the operator has decided anything

    async def restarted() -> dict[str, Any] | None:
        now = await stack.status(name)
        return now if now.get("lastRestart") and now["epoch"] > old_epoch and now.get("endpoint") else None

    st = await stack.wait_for("the restart in place", restarted, within=30, every=0.05)
    more = len(writer.log.acked) + 20
    await stack.wait_for("writes again", lambda: _at_least(writer, more), within=30)
    log = await writer.stop()

    assert st["lastRestart"]["pod"] == old["pod"] and st["lastRestart"]["node"] == old["node"]
    assert "lost its lease" in st["lastRestart"]["reason"]
    assert st["primary"]["pod"] == old["pod"], "the primary was replaced"
    assert not st.get("lastFailover"), f"failed over: {st.get('lastFailover')}"
    reasons = [e["reason"] for e in await stack.events(name)]
    assert "PrimaryRestarted" in reasons and "FailingOver" not in reasons, reasons
    text = await stack.metrics()
    assert value(text, "pairvol_operator_primary_restarts_total", trigger="lease-lost") == 1
    assert value(text, "pairvol_operator_failovers_total", mode="checkpoint", trigger="automatic") == 0

    # nothing rolled back: every acknowledged write is on the volume, also those after the cut
    v = await verify_log(stack.socket_path(st), log, writer.resume_seq)
    assert v.consistent and v.lost_acked == 0, v.detail

    st = await stack.wait_phase(name, "Replicating", within=60)
    assert st["secondary"]["pod"] == old_secondary["pod"], "the secondary was replaced"
    last = (await agent_status(stack, name, st["primary"]))["replication"]["lastSync"]
    assert last["kind"] == "bitmap", f"the secondary caught up with {last}"


async def test_a_primary_that_cannot_take_its_lease_again_is_failed_over(stack: Stack, volume: Any) -> None:
    name = "noinplace"
    st, writer = await written(stack, volume(name, failover={"mode": "Latest"}))
    old = st["primary"]

    async with api_cut_off(stack, old["node"]):
        writer.outage_start = time.time()
        await fenced_by_its_lease(stack, name, old)

        async def failed_over() -> dict[str, Any] | None:
            now = await stack.status(name)
            lf = now.get("lastFailover") or {}
            return now if lf.get("durationMs") is not None and now["primary"]["node"] != old["node"] else None

        st = await stack.wait_for("the failover", failed_over, within=60, every=0.05)
        more = len(writer.log.acked) + 20
        await stack.wait_for("writes on the new primary", lambda: _at_least(writer, more), within=30)
        log = await writer.stop()

    # it was asked to serve again in place first, could not take its Lease, and lost it again
    assert st["lastRestart"]["pod"] == old["pod"], st.get("lastRestart")
    assert "RestartRefused" in [e["reason"] for e in await stack.events(name)]
    assert "restarted in place" in st["lastFailover"]["reason"] or "lost its lease" in st["lastFailover"]["reason"]
    v = await verify_log(stack.socket_path(st), log, writer.resume_seq)
    assert v.consistent and v.lost_acked == 0, v.detail


async def test_a_primary_that_could_not_take_its_lease_at_bring_up_is_not_left_unserved(
    stack: Stack, volume: Any
) -> None:
    """Seen at 40 volumes on one machine: the first start of the primary linked its peer,
    copied the volume to it and then refused to serve, because its Lease could not be
    written in time; no Lease existed, and the volume was reported Replicating with nobody
    serving it. The primary's pods are cut off from the API server (its kubelet is not, so
    the pods become ready and the operator starts the pair) until the agent has refused."""
    name = "refused"
    await stack.apply(volume(name, failover={"mode": "Latest"}))

    async def placed() -> dict[str, Any] | None:
        now = await stack.status(name)
        return now if now.get("primary") else None

    st = await stack.wait_for("placement", placed, within=60, every=0.05)
    primary = st["primary"]
    async with api_cut_off(stack, primary["node"], kubelet=False):

        async def refused() -> bool:
            now = await stack.status(name)
            if not now.get("endpoint") or not (now.get("primary") or {}).get("address"):
                return False
            export = (await agent_status(stack, name, now["primary"]))["export"]
            return export["refusedEpoch"] is not None and export["serving"] is False

        await stack.wait_for("the primary's start to refuse for want of a Lease", refused, within=90, every=0.2)
    writer = following(stack, name)
    writer.start()
    await stack.wait_for("writes", lambda: _at_least(writer, 40), within=60)
    log = await writer.stop()
    st = await stack.wait_phase(name, "Replicating", within=90)
    export = (await agent_status(stack, name, st["primary"]))["export"]
    assert export["serving"] is True, export
    v = await verify_log(stack.socket_path(st), log, writer.resume_seq)
    assert v.consistent and v.lost_acked == 0, v.detail
