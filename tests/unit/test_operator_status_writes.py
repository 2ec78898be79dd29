"""The volume's status is written as planned, and only over the version the plan was made from
(docs/correctness.md H19).

The executor persists the planned status before it acts (the Durability rule of
pairvol.operator.decisions): the stored status must then be exactly the planned one, and a
plan made from a status someone changed since must never be stored over it; a label patch
(planned again by every tick) that fails does not stop the rest of the plan. Checked here
against the emulated API server (the same merge-patch and resourceVersion rules as a real
one): no kubelet, no agents; the plans are made by the real planner.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest
from tests.support.operator_env import DaemonStop, operator_against_the_api
from tests.unit.test_operator_decisions import pod, primary_dead, replicating

from pairvol.aio import bounded
from pairvol.api.status import Failover, Phase, VolumeStatus
from pairvol.kube.client import KubeClient, KubeError, merge_patch_to
from pairvol.kube.paths import volume_path
from pairvol.localcluster.apiserver_logic import merge_patch
from pairvol.operator import handlers
from pairvol.operator.decisions import (
    ANN_CHECKPOINT,
    Checkpoint,
    ClearAnnotation,
    DeletePod,
    DoFailover,
    LeaseView,
    Plan,
    SetRole,
    plan,
)
from pairvol.operator.handlers import Reconciler

NS = "default"


def without_nulls(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: without_nulls(v) for k, v in doc.items() if v is not None}
    return doc


def random_doc(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key in rng.sample("abcdefg", rng.randrange(0, 6)):
        kind = rng.randrange(6 if depth < 3 else 4)
        doc[key] = [None, rng.randrange(3), [rng.randrange(3)], "x"][kind] if kind < 4 else random_doc(rng, depth + 1)
    return doc


def test_the_patch_turns_any_document_into_exactly_the_new_one() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        old, new = random_doc(rng), random_doc(rng)
        stored = without_nulls(old)  # what an API server holds: no nulls
        assert merge_patch(stored, merge_patch_to(stored, new)) == without_nulls(new), (old, new)


def test_a_failover_still_running_has_no_duration_after_one_that_ended() -> None:
    ended = VolumeStatus(last_failover=Failover("2026-01-01T00:00:00Z", "n3", "n1", "Checkpoint", "lease", 1234.0))
    running = VolumeStatus(last_failover=Failover("2026-01-02T00:00:00Z", "n1", "n2", "Checkpoint", "lease"))
    stored = merge_patch(ended.to_dict(), merge_patch_to(ended.to_dict(), running.to_dict()))
    assert VolumeStatus.from_dict(stored) == running
    assert "durationMs" not in stored["lastFailover"]


@pytest.fixture
async def kube() -> AsyncIterator[KubeClient]:
    async with operator_against_the_api({"n1": True, "n2": True}) as (_, client):
        yield client


async def stored_volume(k: KubeClient, status: VolumeStatus) -> dict[str, Any]:
    await k.create(volume_path(NS), {
        "apiVersion": "pairvol.io/v1alpha1", "kind": "ReplicatedVolume", "metadata": {"name": "vol", "namespace": NS},
        "spec": {"size": "64Mi"}})
    return await k.merge_patch(volume_path(NS, "vol", status=True), {"status": status.to_dict()})


async def test_the_stored_status_is_the_planned_one_also_where_the_plan_dropped_a_field(kube: KubeClient) -> None:
    """A second failover, after one that ended: the failover under way has no duration yet.
    Stored with the first one's duration, the volume would look as if this failover had
    finished, and a target lost now would no longer keep the old primary from serving (H15)."""
    earlier = Failover("2026-01-01T00:00:00Z", "n3", "n1", "Checkpoint", "lease expired", 1234.0)
    w = primary_dead()
    w = replace(w, status=w.status.with_(last_failover=earlier))
    body = await stored_volume(kube, w.status)
    rec = Reconciler("vol", NS)
    rec.remember(body)
    p = plan(w)
    assert p.status.phase is Phase.FAILING_OVER and any(isinstance(a, DoFailover) for a in p.actions)
    assert await rec.persist(p, body, 10)
    stored = VolumeStatus.from_dict((await kube.get(volume_path(NS, "vol")))["status"])
    assert stored == p.status
    assert stored.last_failover is not None and stored.last_failover.duration_ms is None


async def test_a_plan_made_from_an_older_status_is_neither_stored_nor_acted_on(kube: KubeClient) -> None:
    """Two plans from the same version: an operator replica that has watched the Lease expire
    fails over at a new epoch (stored, then acted on); one that has just started, from the
    version it read before that write, would keep the old primary. The second write is
    refused, the stored status keeps the epoch that was handed out, and the loop reads the
    volume again before it plans anew."""
    w = primary_dead()
    body = await stored_volume(kube, w.status)
    old_replica, new_replica = Reconciler("vol", NS), Reconciler("vol", NS)
    for rec in (old_replica, new_replica):
        rec.remember(body)
    failing_over = plan(w)
    assert failing_over.status.epoch == w.status.epoch + 1
    assert await old_replica.persist(failing_over, body, 10)

    first_look = plan(replace(w, lease=LeaseView("vol-1-a", 0.0, 3.0)))  # has not seen the Lease expire
    assert first_look.status.epoch == w.status.epoch
    assert not await new_replica.persist(first_look, body, 10)
    stored = VolumeStatus.from_dict((await kube.get(volume_path(NS, "vol")))["status"])
    assert stored == failing_over.status

    again = await new_replica.read_volume()
    assert again is not None and VolumeStatus.from_dict(again["status"]) == failing_over.status


async def test_a_plan_that_acts_on_pods_is_checked_against_the_stored_version_even_if_its_status_is_unchanged(
    kube: KubeClient,
) -> None:
    """Deleting or relabelling a pod is checked by no agent: a replica that planned from an
    older version (its status the one it last wrote, so nothing to write) would delete the
    pod the other replica just placed. Its plan is written anyway, conditionally, and refused;
    a plan of role calls, which name their epoch, costs no write."""
    w = primary_dead()
    body = await stored_volume(kube, w.status)
    old_replica, new_replica = Reconciler("vol", NS), Reconciler("vol", NS)
    for rec in (old_replica, new_replica):
        rec.remember(body)
        rec.last_written = w.status.to_dict()
    assert await old_replica.persist(plan(w), body, 10)  # the volume moves on
    unchanged = w.status
    delete = Plan(unchanged, (DeletePod("vol-2-c", "no replica of this volume"),))
    assert not await new_replica.persist(delete, body, 10)
    assert not await new_replica.persist(Plan(unchanged, (SetRole("vol-1-b", "secondary"),)), body, 10)

    current = await kube.get(volume_path(NS, "vol"))
    rec = Reconciler("vol", NS)
    rec.remember(current)
    now = VolumeStatus.from_dict(current["status"])
    rec.last_written = now.to_dict()
    assert await rec.persist(Plan(now, (Checkpoint("vol-1-b", "10.0.0.2"),)), body, 10), "no write, no check"
    assert await rec.persist(Plan(now, (DeletePod("vol-2-c", "no replica of this volume"),)), current, 10)


async def test_a_label_patch_the_api_server_refuses_does_not_stop_the_rest_of_the_plan(kube: KubeClient) -> None:
    """Labels are planned again by every tick (H18): one that cannot be patched now (here the
    pod is not there; elsewhere a webhook that is down) is reported and left for the next
    tick, and the actions after it — a failover, a cut, here the clear of a request — run."""
    w = primary_dead()
    body = await stored_volume(kube, w.status)
    body = await kube.merge_patch(volume_path(NS, "vol"), {"metadata": {"annotations": {ANN_CHECKPOINT: "now"}}})
    rec = Reconciler("vol", NS)
    rec.remember(body)
    for action in (SetRole("vol-9-z", "primary"), ClearAnnotation(ANN_CHECKPOINT)):
        await rec.execute(body, w, action)
    annotations = (await kube.get(volume_path(NS, "vol")))["metadata"].get("annotations") or {}
    assert ANN_CHECKPOINT not in annotations


async def test_a_label_patch_refused_every_tick_does_not_make_the_loop_spin(
    kube: KubeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refusal that comes at once (a webhook without endpoints, a policy) took no effect: the
    loop waits its reconcile interval before the next tick, as after any failed tick, instead
    of ticking again at once and patching without pause."""
    w = replicating()
    w = replace(w, pods={**w.pods, "vol-1-a": pod("vol-1-a", "n1", "", "10.0.0.1")})  # unlabelled
    planned = plan(w)
    assert SetRole("vol-1-a", "primary") in planned.actions
    await stored_volume(kube, planned.status)
    ticks = 0

    async def observe(self: Reconciler, body: Any) -> Any:
        nonlocal ticks
        ticks += 1
        return replace(w, status=VolumeStatus.from_dict(body.get("status")))

    real_patch = kube.merge_patch

    async def refusing_pod_patches(path: str, patch: Any) -> Any:
        if "/pods/" in path:
            raise KubeError(500, "failed calling webhook: no endpoints available for service")
        return await real_patch(path, patch)

    monkeypatch.setattr(Reconciler, "observe", observe)
    monkeypatch.setattr(kube, "merge_patch", refusing_pod_patches)
    stop = DaemonStop()
    loop = asyncio.create_task(Reconciler("vol", NS).run(stop))
    await asyncio.sleep(2.0)
    stop.flag.set()
    await bounded(loop, 10)
    interval = handlers.ctx().config.reconcile_interval_s
    assert 1 <= ticks <= 2.0 / interval + 2, f"{ticks} ticks in 2 s with a reconcile interval of {interval} s"
