"""Failovers before re-protection, in the executor (handlers.py): while another volume of
this operator is failing over, a volume's loop holds its re-protection back, and the loop
is woken as soon as the last such failover ends (docs/correctness.md H20).

Against the emulated API server (no kubelet, no agents; the agents' answers stubbed, the
plans made by the real planner), as in test_operator_lost_answers.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from typing import Any

import pytest
from tests.support.operator_env import DaemonStop, operator_against_the_api
from tests.unit.test_operator_decisions import primary_dead
from tests.unit.test_operator_lost_answers import NS, degraded_volume_and_a_lagging_cache, on_server, stored

from pairvol.aio import bounded
from pairvol.kube.client import KubeClient
from pairvol.kube.paths import volume_path
from pairvol.operator import decisions as d
from pairvol.operator import handlers
from pairvol.operator.decisions import AgentView
from pairvol.operator.handlers import Reconciler

OTHER = f"{NS}/other"


@pytest.fixture
async def kube() -> AsyncIterator[KubeClient]:
    async with operator_against_the_api({"n1": True, "n2": True, "n3": True}) as (_, client):
        yield client


@pytest.fixture
async def rec(kube: KubeClient, monkeypatch: pytest.MonkeyPatch) -> Reconciler:
    """A degraded volume's loop, registered with the operator's context as a running loop."""
    loop = await degraded_volume_and_a_lagging_cache(kube, monkeypatch)
    handlers.ctx().loops[loop.key] = loop
    return loop


async def test_re_protection_waits_for_a_failover_elsewhere_and_goes_on_when_it_ends(
    kube: KubeClient, rec: Reconciler
) -> None:
    c = handlers.ctx()
    c.failing_over.add(OTHER)  # the last plan of another volume's loop is failing over
    assert not await rec.tick()
    assert await on_server(kube) == [("vol-1", "n1")]  # no secondary placed
    st = await stored(kube)
    assert st.secondary is None and st.epoch == 3
    assert st.message == "re-protection waits while other volumes fail over (at most 30 s); next: a new secondary"
    assert rec.reprotect_held and rec.reprotect_held_since is not None
    # the other volume's failover is recorded as done: its loop's next plan is no failover
    other = Reconciler("other", NS)
    in_flight = primary_dead()
    other.note_failovers(in_flight, d.plan(in_flight))
    assert c.failing_over == {OTHER}
    rec.wake.clear()
    in_flight = replace(in_flight, status=d.plan(in_flight).status, now=in_flight.now + 1)
    served = replace(in_flight, agents={"vol-1-b": AgentView("primary", "done", 4, "degraded", serving=True)})
    done = d.plan(served)
    assert any(isinstance(a, d.FailoverDone) for a in done.actions)
    other.note_failovers(served, done)
    assert c.failing_over == set()
    assert rec.wake.is_set(), "the waiting loop ticks at once, not after its interval"
    assert await rec.tick()
    assert await on_server(kube) == [("vol-1", "n1"), ("vol-4", "n2")]
    assert not rec.reprotect_held and rec.reprotect_held_since is None


async def test_its_own_failover_holds_nothing_and_one_still_running_elsewhere_keeps_the_wait(
    kube: KubeClient, rec: Reconciler
) -> None:
    c = handlers.ctx()
    c.failing_over.add(rec.key)  # only itself (a stale entry of its own): not another volume
    assert await rec.tick()
    assert ("vol-4", "n2") in await on_server(kube)
    assert rec.key not in c.failing_over  # its plan placed a secondary: it is no failover

    c.failing_over.update({OTHER, f"{NS}/third"})
    rec.reprotect_held = True
    rec.wake.clear()
    c.failover_over(OTHER)
    assert not rec.wake.is_set(), "one failover still runs: nothing to tick for"
    c.failover_over(f"{NS}/third")
    assert rec.wake.is_set()


async def test_a_loop_that_stops_while_failing_over_releases_the_waiting_ones(rec: Reconciler) -> None:
    c = handlers.ctx()
    rec.reprotect_held = True
    other, stop = Reconciler("other", NS), DaemonStop()  # its volume is gone: its ticks plan nothing
    task = asyncio.create_task(other.run(stop))
    await asyncio.sleep(0.05)
    c.failing_over.add(OTHER)
    stop.flag.set()
    await bounded(task, 5)
    assert c.failing_over == set() and rec.wake.is_set()


async def test_before_its_first_plan_a_loop_counts_as_failing_over_by_its_stored_status(
    kube: KubeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator that just started: a volume stored as FailingOver counts from its loop's
    first read of it, before the awaits of its first observation let the other loops plan."""
    rec = await degraded_volume_and_a_lagging_cache(kube, monkeypatch)
    c = handlers.ctx()
    await kube.create(volume_path(NS), {
        "apiVersion": "pairvol.io/v1alpha1", "kind": "ReplicatedVolume",
        "metadata": {"name": "other", "namespace": NS}, "spec": {"size": "64Mi"}})
    await kube.merge_patch(volume_path(NS, "other", status=True), {"status": {
        "phase": "FailingOver", "epoch": 5, "endpoint": {"node": "n2"},
        "primary": {"node": "n2", "pod": "other-1-a", "state": "primary/replicating"},
        "secondary": {"node": "n3", "pod": "other-1-b", "state": "secondary/running", "synced": True},
        "lastFailover": {"time": "2026-01-01T00:00:00Z", "fromNode": "n2", "toNode": "n3",
                         "mode": "Checkpoint", "reason": "node n2 is NotReady"}}})
    other = Reconciler("other", NS)
    other.token = "t"
    seen: list[int] = []
    observe = other.observe

    async def observing(body: Mapping[str, Any]) -> d.World:
        seen.append(c.failovers_besides(rec.key))
        return await observe(body)

    monkeypatch.setattr(other, "observe", observing)
    await other.tick()
    assert seen == [1]
