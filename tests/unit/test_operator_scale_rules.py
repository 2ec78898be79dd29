"""Rules that matter when many volumes share few nodes (make bench-scale): what a tick asks
the agents, so a failed node does not slow every failover from it, and how volumes placed at
the same moment spread. Pure rules in pairvol.operator.decisions."""

from __future__ import annotations

import collections
from dataclasses import replace

from tests.unit.test_operator_decisions import NOW, SECONDARY_AGENT, pod, primary_dead, replicating, spec

from pairvol.api.status import Phase, VolumeStatus
from pairvol.operator.decisions import (
    AgentView,
    Event,
    FailoverDone,
    NodeView,
    SetRole,
    World,
    agents_to_ask,
    plan,
    replica_counts,
)


def test_both_replicas_are_asked_while_no_failover_runs() -> None:
    assert agents_to_ask(replicating().status) == ["vol-1-a", "vol-1-b"]


def test_while_a_failover_runs_only_its_target_is_asked() -> None:
    decided = plan(primary_dead())
    assert decided.status.phase == Phase.FAILING_OVER
    assert agents_to_ask(decided.status) == ["vol-1-b"]
    # a failover whose target vanished from the status (it is failed for that) asks nobody
    assert agents_to_ask(replace(decided.status, secondary=None)) == []


def test_the_old_primarys_answer_changes_nothing_in_a_failover_that_runs() -> None:
    """The reason the old primary need not be asked: whatever it would answer (nothing, or
    a status from a primary that still runs), the plan for a running failover is the same,
    whether the target has not answered yet, took the role, or serves."""
    in_flight = replace(primary_dead(), status=plan(primary_dead()).status, now=NOW + 0.5)
    in_flight = replace(in_flight, pods={**in_flight.pods, "vol-1-a": pod("vol-1-a", "n1", "primary", "10.0.0.1")})
    old_views = (None, AgentView("primary", "none", 3, "replicating", "10.0.0.2:7801"))
    targets = (
        SECONDARY_AGENT,
        AgentView("primary", "done", 4, "degraded", serving=False),
        AgentView("primary", "done", 4, "degraded", serving=True),
    )
    for target in targets:
        plans = [plan(replace(in_flight, agents={"vol-1-b": target, "vol-1-a": old})) for old in old_views]
        without = plan(replace(in_flight, agents={"vol-1-b": target}))
        assert all(p == without for p in plans), target
    done = plan(replace(in_flight, agents={"vol-1-b": targets[2]}))
    assert SetRole("vol-1-b", "primary") in done.actions
    assert any(isinstance(a, FailoverDone) for a in done.actions)
    assert any(isinstance(a, Event) and a.reason == "FailedOver" for a in done.actions)


def test_volumes_placed_at_the_same_moment_spread_over_the_nodes() -> None:
    """Each loop counts what the others have planned (their pods are not listed yet) right
    before it plans, and records its own plan right after (handlers.Reconciler.tick)."""
    nodes = (NodeView("n1"), NodeView("n2"), NodeView("n3"), NodeView("n4"))
    placed: dict[str, set[str]] = {}
    for i in range(8):
        key = f"ns/vol{i}"
        w = World(f"vol{i}", "ns", 1, spec(), VolumeStatus(), NOW, nodes=nodes,
                  placement=replica_counts(key, [], placed))  # fmt: skip
        p = plan(w)
        assert p.status.primary is not None and p.status.secondary is not None
        placed[key] = {p.status.primary.node, p.status.secondary.node}
    per_node = collections.Counter(n for where in placed.values() for n in where)
    assert per_node == {"n1": 4, "n2": 4, "n3": 4, "n4": 4}


def test_replica_counts_take_pods_and_plans_of_other_volumes_once_each() -> None:
    pods = [("ns/a", "n1"), ("ns/a", "n2"), ("ns/b", "n1"), ("ns/me", "n3"), ("ns/c", "")]
    placed = {"ns/a": {"n1", "n2"}, "ns/b": {"n1", "n4"}, "ns/me": {"n3", "n4"}}
    assert replica_counts("ns/me", pods, placed) == {"n1": 2, "n2": 1, "n4": 1}
