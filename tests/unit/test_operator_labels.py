"""The role labels of the agent pods, as a specification.

The workload Service selects ``pairvol.io/role=primary`` (the CSI's export address points at
it): the pod the status names as primary must carry that label, and no other replica of the
status may. The label is a Kubernetes write that can fail or be cut short by an operator
restart, so it is not planned once (in the tick that records a failover as done) but on
every tick whose observation shows a label that differs, and only then.
"""

from __future__ import annotations

from dataclasses import replace

from tests.unit.test_operator_decisions import (
    NOW,
    SECONDARY_AGENT,
    _after_failover,
    pod,
    primary_dead,
    replicating,
)

from pairvol.api.status import Phase
from pairvol.operator.decisions import AgentView, DeletePod, DoFailover, SetRole, World, plan


def labels(w: World) -> list[SetRole]:
    return [a for a in plan(w).actions if isinstance(a, SetRole)]


def test_a_new_primary_whose_label_was_not_set_is_labelled_on_the_next_ticks() -> None:
    # the failover: decided, then recorded as done once the target serves
    w = primary_dead()
    p = plan(w)
    assert any(isinstance(a, DoFailover) for a in p.actions)
    served = replace(SECONDARY_AGENT, role="primary", epoch=4, serving=True)
    w = replace(w, status=p.status, now=NOW + 1, agents={"vol-1-b": served})
    p = plan(w)
    assert SetRole("vol-1-b", "primary") in p.actions and p.status.primary is not None
    assert p.status.primary.pod == "vol-1-b" and p.status.phase == Phase.DEGRADED
    # that status was persisted, the label patch was not (a 500, a timeout, an operator
    # restarted right after the write): the pod still says secondary
    assert w.pods["vol-1-b"].role == "secondary"
    for i in range(3):
        w = replace(w, status=p.status, now=w.now + 1)
        p = plan(w)
        assert SetRole("vol-1-b", "primary") in p.actions, f"tick {i}: the workload Service selects no pod"
    # once the label is there, nothing more is asked
    w = replace(w, status=p.status, pods={"vol-1-b": replace(w.pods["vol-1-b"], role="primary")})
    assert labels(w) == []


def test_a_primary_without_its_label_is_labelled_first_whatever_else_the_tick_does() -> None:
    # a checkpoint is due (an agent call that may fail and stop the actions after it)
    unlabelled = replicating(pods={**replicating().pods, "vol-1-a": pod("vol-1-a", "n1", "", "10.0.0.1")},
                             now=NOW + 3600)
    p = plan(unlabelled)
    assert p.actions[0] == SetRole("vol-1-a", "primary")
    assert len(p.actions) > 1 and p.status.phase == Phase.REPLICATING
    # after a failover, re-protecting: the new secondary is placed in the same tick
    after = _after_failover(pods={"vol-1-b": pod("vol-1-b", "n2", "secondary", "10.0.0.2")})
    p = plan(after)
    assert p.actions[0] == SetRole("vol-1-b", "primary")
    assert p.status.secondary is not None


def test_labels_that_are_right_cost_no_call() -> None:
    assert labels(replicating()) == []
    assert labels(replicating(now=NOW + 3600)) == []  # a checkpoint tick
    assert labels(_after_failover()) == []


def test_a_secondary_labelled_primary_is_labelled_secondary_so_that_only_the_primary_is_selected() -> None:
    w = replicating(pods={**replicating().pods, "vol-1-b": pod("vol-1-b", "n2", "primary", "10.0.0.2")})
    assert labels(w) == [SetRole("vol-1-b", "secondary")]


def test_a_labelled_pod_that_is_no_replica_is_deleted_not_relabelled() -> None:
    # the old primary after a failover: the Service drops a pod once it is being deleted
    old = pod("vol-1-a", "n1", "primary", "10.0.0.1")
    p = plan(_after_failover(pods={**_after_failover().pods, "vol-1-a": old}))
    assert DeletePod("vol-1-a", "no longer a replica of this volume") in p.actions
    assert not any(isinstance(a, SetRole) for a in p.actions)
    p = plan(_after_failover(pods={**_after_failover().pods, "vol-1-a": replace(old, deleting=True)}))
    assert not any(isinstance(a, SetRole | DeletePod) for a in p.actions)


def test_a_primary_pod_that_does_not_run_is_not_labelled_until_it_does() -> None:
    base = replicating().pods
    for gone in (
        replace(base["vol-1-a"], role="", phase="Pending", ready=False),
        replace(base["vol-1-a"], role="", deleting=True),
        replace(base["vol-1-a"], role="", phase="Failed", ready=False),
        replace(base["vol-1-a"], role="", phase="Succeeded", ready=False),
    ):
        assert labels(replicating(pods={**base, "vol-1-a": gone})) == [], gone
    dead = primary_dead()  # no pod at all
    assert labels(dead) == []


def test_during_a_failover_the_target_keeps_its_label_until_the_failover_is_recorded() -> None:
    w = primary_dead()
    w = replace(w, status=plan(w).status, now=NOW + 0.5)
    # the target took the role but does not serve yet: not the volume's primary yet
    stuck = AgentView("primary", "done", 4, "degraded", serving=False)
    assert labels(replace(w, agents={"vol-1-b": stuck})) == []
    assert labels(w) == []
