"""The operator's cut names the link it saw in sync (docs/correctness.md S5): the serial the
primary reports for its link while it replicates goes with the ``Checkpoint`` action, so the
secondary can refuse the cut if the primary linked to it again since (a resync may be
rewriting it). A primary that reports no serial (an agent from before the serial) gets
today's cut, without one."""

from __future__ import annotations

from dataclasses import replace

from tests.unit.test_operator_decisions import NOW, PRIMARY_AGENT, SECONDARY_AGENT, replicating

from pairvol.operator.decisions import ANN_CHECKPOINT, AgentView, Checkpoint, ClearAnnotation, LeaseView, plan

IN_SYNC = replace(PRIMARY_AGENT, link_serial="5f3a9c1e07b2-4")
AGENTS = {"vol-1-a": IN_SYNC, "vol-1-b": SECONDARY_AGENT}


def test_a_due_cut_carries_the_serial_of_the_link_the_primary_reports_in_sync() -> None:
    w = replicating(now=NOW + 9, lease=LeaseView("vol-1-a", 1, 3.0), agents=AGENTS)
    assert plan(w).actions == (Checkpoint("vol-1-b", "10.0.0.2", "5f3a9c1e07b2-4"),)


def test_a_requested_cut_and_the_first_cut_after_a_sync_carry_it_too() -> None:
    requested = replicating(annotations={ANN_CHECKPOINT: "now"}, agents=AGENTS)
    assert plan(requested).actions == (
        Checkpoint("vol-1-b", "10.0.0.2", "5f3a9c1e07b2-4"), ClearAnnotation(ANN_CHECKPOINT)
    )
    fresh = replace(SECONDARY_AGENT, checkpoint={"id": 0, "time": NOW - 1, "durationMs": 0.0})
    first = replicating(agents={"vol-1-a": IN_SYNC, "vol-1-b": fresh})
    assert plan(first).actions == (Checkpoint("vol-1-b", "10.0.0.2", "5f3a9c1e07b2-4"),)


def test_without_a_serial_from_the_primary_the_cut_carries_none() -> None:
    w = replicating(now=NOW + 9, lease=LeaseView("vol-1-a", 1, 3.0))
    assert PRIMARY_AGENT.link_serial is None
    assert plan(w).actions == (Checkpoint("vol-1-b", "10.0.0.2", None),)
    assert Checkpoint("vol-1-b", "10.0.0.2") == Checkpoint("vol-1-b", "10.0.0.2", None)


def test_the_serial_is_read_from_the_primarys_link_and_only_there() -> None:
    status = {
        "role": "primary", "stage": "running", "epoch": 3,
        "replication": {"state": "replicating", "link": {"export": "replication-e2", "serial": "ab12-7"}},
    }
    assert AgentView.from_status(status).link_serial == "ab12-7"
    syncing = {**status, "replication": {"state": "syncing", "link": {"export": "replication-e2", "serial": None}}}
    assert AgentView.from_status(syncing).link_serial is None
    # a secondary's own serial (replication.linkSerial) is not a primary's link
    secondary = {"role": "secondary", "stage": "running", "epoch": 2, "replication": {"linkSerial": "ab12-7"}}
    assert AgentView.from_status(secondary).link_serial is None
    assert AgentView.from_status({"role": "primary", "replication": {"link": None}}).link_serial is None
