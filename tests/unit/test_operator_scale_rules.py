"""What the reconcile loop asks the agents, so a failed node does not slow every failover
from it (make bench-scale's failover storm): pure rules in pairvol.operator.decisions."""

from __future__ import annotations

from dataclasses import replace

from tests.unit.test_operator_decisions import NOW, SECONDARY_AGENT, pod, primary_dead, replicating

from pairvol.api.status import Phase
from pairvol.operator.decisions import AgentView, Event, FailoverDone, SetRole, agents_to_ask, plan


def test_both_replicas_are_asked_while_no_failover_runs() -> None:
    assert agents_to_ask(replicating().status) == ["vol-1-a", "vol-1-b"]


def test_while_a_failover_runs_only_its_target_is_asked() -> None:
    decided = plan(primary_dead())
    assert decided.status.phase == Phase.FAILING_OVER
    assert agents_to_ask(decided.status) == ["vol-1-b"]


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
