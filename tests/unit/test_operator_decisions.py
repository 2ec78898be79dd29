"""The operator's decisions, as a specification: scheduling, failover, re-protection, phases.

Every test builds one observation of the world (no process, no API server) and checks what the
operator would persist and do next.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pairvol.api.spec import SpecError, parse_spec
from pairvol.api.status import Failover, Phase, Replica, VolumeStatus, rfc3339
from pairvol.operator import decisions
from pairvol.operator.decisions import (
    ANN_CHECKPOINT,
    ANN_FAILOVER,
    AgentView,
    Checkpoint,
    ClearAnnotation,
    CreatePod,
    DeletePod,
    DoFailover,
    Event,
    FailoverDone,
    LeaseView,
    NodeView,
    PodView,
    SetRole,
    StartPrimary,
    StartSecondary,
    World,
    choose_pair,
    eligible_nodes,
    plan,
    replica_health,
    unhealthy_pods,
)

NOW = 1_000_000.0
NODES = (NodeView("n1"), NodeView("n2"), NodeView("n3"))


def spec(**kw: Any) -> Any:
    return parse_spec({"size": "64Mi", **kw}, name="vol")


def pod(name: str, node: str, role: str, ip: str, **kw: Any) -> PodView:
    return PodView(name, node, role, kw.pop("phase", "Running"), kw.pop("ready", True), ip, **kw)


# its link names the secondary's incarnation: the export of SECONDARY_AGENT's epoch (2)
PRIMARY_AGENT = AgentView(
    "primary", "none", 3, "replicating", "10.0.0.2:7801", serving=True, link_export="replication-e2"
)
SECONDARY_AGENT = AgentView(
    "secondary", "running", 2, checkpoint={"id": 4, "time": NOW - 2, "durationMs": 3.0}
)


def replicating(**kw: Any) -> World:
    """A healthy volume: primary vol-1-a on n1, secondary vol-1-b on n2, epoch 3."""
    status = VolumeStatus(
        phase=Phase.REPLICATING, epoch=3,
        primary=Replica("n1", "vol-1-a", "primary/replicating", "10.0.0.1"),
        secondary=Replica("n2", "vol-1-b", "secondary/running", "10.0.0.2", synced=True),
        endpoint={"node": "n1"},
        checkpoint={"id": 4, "time": rfc3339(NOW - 2), "durationMs": 3.0},
        observed_generation=1,
    )
    base: dict[str, Any] = dict(
        name="vol", namespace="ns", generation=1, spec=spec(), status=status, now=NOW,
        nodes=NODES,
        pods={
            "vol-1-a": pod("vol-1-a", "n1", "primary", "10.0.0.1"),
            "vol-1-b": pod("vol-1-b", "n2", "secondary", "10.0.0.2"),
        },
        agents={"vol-1-a": PRIMARY_AGENT, "vol-1-b": SECONDARY_AGENT},
        lease=LeaseView("vol-1-a", 1, 3.0),
    )
    base.update(kw)
    return World(**base)


def primary_dead(**kw: Any) -> World:
    """The primary's pod vanished long ago and its lease expired."""
    w = replicating()
    pods = {"vol-1-b": w.pods["vol-1-b"]}
    defaults: dict[str, Any] = dict(
        pods=pods, agents={"vol-1-b": SECONDARY_AGENT},
        lease=LeaseView("vol-1-a", 10, 3.0), suspect_since={"vol-1-a": NOW - 10},
    )
    defaults.update(kw)
    return replace(w, **defaults)


@pytest.fixture(autouse=True)
def _every_plan_keeps_the_durability_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every plan made in this file is also checked against the rule the executor relies on
    (module docstring of decisions.py): a plan that hands out a new epoch, or moves the volume
    to another phase (other than into Syncing, which only reports progress), is written at
    once, never coalesced as cosmetic; and only a pair that replicates or syncs has cosmetic
    updates at all. The rule holds on its own, not only because a spec change not yet
    acknowledged in the status is written at once anyway: so each world is planned a second
    time with its generation already observed."""
    import pairvol.operator.decisions as decisions

    def keeps_the_rule(w: World) -> Any:
        p = decisions.plan(w)
        if p.status.epoch != w.status.epoch or p.status.phase not in (w.status.phase, Phase.SYNCING):
            assert not p.cosmetic, f"{p.status.phase}/{p.status.epoch} from {w.status.phase}/{w.status.epoch}"
        if p.cosmetic:  # only progress of a pair that replicates or syncs is informational
            assert p.status.phase in (Phase.REPLICATING, Phase.SYNCING), p.status.phase
        return p

    def checked(w: World) -> Any:
        if w.status.observed_generation != w.generation:
            keeps_the_rule(replace(w, status=w.status.with_(observed_generation=w.generation)))
        return keeps_the_rule(w)

    monkeypatch.setitem(globals(), "plan", checked)


def kinds(p: Any) -> list[str]:
    return [type(a).__name__ for a in p.actions]


# ------------------------------------------------------------------ scheduling


def test_two_distinct_ready_nodes_are_chosen_spreading_across_volumes() -> None:
    assert choose_pair(spec(), NODES, {"n1": 3, "n2": 1}) == ("n3", "n2")


def test_scheduling_honours_node_list_selector_and_readiness() -> None:
    nodes = (
        NodeView("n1", labels={"disk": "ssd"}), NodeView("n2", ready=False, labels={"disk": "ssd"}),
        NodeView("n3", labels={"disk": "ssd"}), NodeView("n4", labels={"disk": "hdd"}),
        NodeView("n5", schedulable=False, labels={"disk": "ssd"}),
    )
    assert choose_pair(spec(nodeSelector={"disk": "ssd"}), nodes, {}) == ("n1", "n3")
    assert choose_pair(spec(nodes=["n3", "n4"]), nodes, {}) == ("n3", "n4")


def test_the_first_primary_goes_to_the_preferred_node_when_it_is_eligible() -> None:
    # the CSI driver names the node of the volume's first consumer; load does not outweigh it
    assert choose_pair(spec(preferredPrimaryNode="n1"), NODES, {"n1": 3, "n2": 1}) == ("n1", "n3")
    # a preferred node that may not hold a replica is ignored: the usual rule places both
    nodes = (NodeView("n1"), NodeView("n2", ready=False), NodeView("n3"), NodeView("n4"))
    assert choose_pair(spec(preferredPrimaryNode="n2"), nodes, {"n1": 1}) == ("n3", "n4")
    assert choose_pair(spec(preferredPrimaryNode="n4", nodes=["n1", "n3"]), nodes, {}) == ("n1", "n3")


def test_fewer_than_two_eligible_nodes_is_a_clear_pending_error() -> None:
    w = World("vol", "ns", 1, spec(nodes=["n1", "n9"]), VolumeStatus(), NOW, nodes=NODES)
    p = plan(w)
    assert p.status.phase == Phase.PENDING
    assert "need two eligible nodes, found 1 (n1)" in p.status.message
    assert "spec.nodes=['n1', 'n9']" in p.status.message
    assert next(a for a in p.actions if isinstance(a, Event)).reason == "NotEnoughNodes"
    assert not any(isinstance(a, CreatePod) for a in p.actions)


def test_invalid_spec_fails_with_the_validation_message_and_one_event() -> None:
    err = SpecError(["spec.size is required (e.g. size: 1Gi)"])
    w = World("vol", "ns", 1, err, VolumeStatus(), NOW, nodes=NODES)
    p = plan(w)
    assert p.status.phase == Phase.FAILED and "spec.size is required" in p.status.message
    assert kinds(p) == ["Event"]
    assert kinds(plan(replace(w, status=p.status))) == []  # no event flood on later ticks


# -------------------------------------------------------------------- bring-up


def test_creation_places_both_replicas_with_fresh_names_and_epoch() -> None:
    w = World("vol", "ns", 1, spec(), VolumeStatus(), NOW, nodes=NODES)
    p = plan(w)
    creates = [a for a in p.actions if isinstance(a, CreatePod)]
    assert [(c.role, c.node) for c in creates] == [("primary", "n1"), ("secondary", "n2")]
    assert creates[0].pod != creates[1].pod
    assert p.status.epoch == 1 and p.status.phase == Phase.PENDING
    assert p.status.secondary is not None and p.status.secondary.out_of_sync


def _placed() -> World:
    w = World("vol", "ns", 1, spec(), VolumeStatus(), NOW, nodes=NODES)
    return replace(w, status=plan(w).status)


IDLE_AGENT = AgentView("none", "none", 0)


def _placed_and_running() -> World:
    """The placed pair's pods Running and ready (primary 10.0.0.1 on n1, secondary 10.0.0.2
    on n2), their agents answering with no role yet."""
    w = _placed()
    st0 = w.status
    assert st0.primary is not None and st0.secondary is not None
    pods = {
        st0.primary.pod: pod(st0.primary.pod, "n1", "primary", "10.0.0.1"),
        st0.secondary.pod: pod(st0.secondary.pod, "n2", "secondary", "10.0.0.2"),
    }
    return replace(w, pods=pods, agents={n: IDLE_AGENT for n in pods})


def test_bring_up_starts_secondary_first_then_primary_with_full_sync() -> None:
    w = _placed_and_running()
    st0 = w.status
    assert st0.primary is not None and st0.secondary is not None
    idle = IDLE_AGENT
    p = plan(w)
    assert [type(a) for a in p.actions] == [StartSecondary]
    assert p.actions[0] == StartSecondary(st0.secondary.pod, "10.0.0.2", 2)
    assert p.status.epoch == 2 and p.status.phase == Phase.PENDING

    sec = AgentView("secondary", "running", 2)
    w = replace(w, status=p.status, agents={st0.primary.pod: idle, st0.secondary.pod: sec})
    p = plan(w)
    start = [a for a in p.actions if isinstance(a, StartPrimary)]
    # the peer's export is named after the epoch the secondary runs at
    assert start == [StartPrimary(
        st0.primary.pod, "10.0.0.1", 3, "10.0.0.2:7801", "full", peer_epoch=2, peer_api="10.0.0.2:7800",
    )]
    assert p.status.phase == Phase.SYNCING and p.status.epoch == 3
    assert p.status.endpoint is not None
    assert p.status.endpoint["socket"] == "/var/lib/pairvol/ns/vol/export.sock"
    assert p.status.endpoint["service"] == "vol.ns.svc" and p.status.endpoint["port"] == 7802


def test_waits_while_agents_are_not_ready() -> None:
    w = _placed()
    assert w.status.primary is not None and w.status.secondary is not None
    pods = {r.pod: pod(r.pod, r.node, "x", "", phase="Pending", ready=False)
            for r in (w.status.primary, w.status.secondary)}
    p = plan(replace(w, pods=pods))
    assert kinds(p) == [] and p.status.phase == Phase.PENDING


def test_syncing_becomes_replicating_and_clears_out_of_sync() -> None:
    w = replicating()
    sec = w.status.secondary
    assert sec is not None
    w = replace(w, status=w.status.with_(phase=Phase.SYNCING,
                                           secondary=replace(sec, out_of_sync=True)))
    syncing = replace(PRIMARY_AGENT, replication_state="syncing", sync_done=1 << 20, sync_total=4 << 20,
                      sync_kind="full", sync_reason="requested")
    p = plan(replace(w, agents={"vol-1-a": syncing, "vol-1-b": SECONDARY_AGENT}))
    assert p.status.phase == Phase.SYNCING and p.status.sync == {
        "kind": "full", "reason": "requested", "progress": 0.25, "doneBytes": 1 << 20, "totalBytes": 4 << 20,
        "summary": "full 25% (3.0 MiB to go)"}
    p = plan(replace(w, status=p.status))
    assert p.status.phase == Phase.REPLICATING
    assert p.status.secondary is not None and not p.status.secondary.out_of_sync
    assert any(isinstance(a, Event) and a.reason == "Replicating" for a in p.actions)


def resync_events(p: Any) -> list[str]:
    events = [a for a in p.actions if isinstance(a, Event) and a.reason.startswith("Resync")]
    assert all(a.type == "Normal" for a in events), "a resync is ordinary work, never a Warning"
    return [f"{a.reason}: {a.message}" for a in events]


def test_a_resync_is_shown_with_its_kind_reason_and_bytes_and_announced_at_its_start_and_end() -> None:
    """Whatever kind the primary chose (a kind the operator does not know included), the
    status shows it with its reason and the bytes this resync copies; an Event says when it
    starts (what and how much) and when it ends (how long, how much)."""
    w = replicating()
    sec = w.status.secondary
    assert sec is not None
    w = replace(w, status=w.status.with_(phase=Phase.DEGRADED, secondary=replace(sec, out_of_sync=True)))
    for kind in ("bitmap", "checksum"):
        syncing = replace(PRIMARY_AGENT, replication_state="syncing", sync_done=0, sync_total=24 << 20,
                          sync_kind=kind, sync_reason="the reason the agent gave")
        p = plan(replace(w, agents={"vol-1-a": syncing, "vol-1-b": SECONDARY_AGENT}))
        assert p.status.sync is not None and p.status.sync["kind"] == kind
        assert p.status.sync["reason"] == "the reason the agent gave"
        assert p.status.sync["summary"] == f"{kind} 0% (24 MiB to go)"
        assert resync_events(p) == [f"ResyncStarted: {kind} resync vol-1-a on n1 -> vol-1-b on n2: 24 MiB to copy "
                                    "(the reason the agent gave)"]
        assert not p.cosmetic  # the event goes with a status write, not a coalesced one
        # the same resync one tick later: progress, no second Event
        later = replace(syncing, sync_done=18 << 20)
        p = plan(replace(w, status=p.status, agents={"vol-1-a": later, "vol-1-b": SECONDARY_AGENT}))
        assert p.status.sync is not None and p.status.sync["summary"] == f"{kind} 75% (6.0 MiB to go)"
        assert resync_events(p) == []
        done = replace(PRIMARY_AGENT, last_sync={"kind": kind, "reason": "the reason the agent gave",
                                                 "copiedBytes": 24 << 20, "seconds": 3.25, "endedAt": NOW - 1})
        p = plan(replace(w, status=p.status, agents={"vol-1-a": done, "vol-1-b": SECONDARY_AGENT}))
        assert p.status.sync is None and p.status.phase == Phase.REPLICATING
        assert resync_events(p) == [f"ResyncCompleted: {kind} resync vol-1-a -> vol-1-b done: 24 MiB copied in 3.2 s "
                                    "(the reason the agent gave)"]
        assert p.status.last_sync == {"kind": kind, "reason": "the reason the agent gave", "copiedBytes": 24 << 20,
                                      "seconds": 3.25, "time": rfc3339(NOW - 1)}
        # announced once
        p = plan(replace(w, status=p.status, agents={"vol-1-a": done, "vol-1-b": SECONDARY_AGENT}))
        assert resync_events(p) == []


def test_a_resync_the_agent_says_little_about_is_shown_with_zeros_and_no_reason_given() -> None:
    """An agent that names the kind before it knows the bytes, and gives no reason: the
    status and the Events show nothing invented (no bytes, no progress, no reason)."""
    w = replicating()
    sec = w.status.secondary
    assert sec is not None
    w = replace(w, status=w.status.with_(phase=Phase.DEGRADED, secondary=replace(sec, out_of_sync=True)))
    syncing = replace(PRIMARY_AGENT, replication_state="syncing", sync_kind="bitmap")
    p = plan(replace(w, agents={"vol-1-a": syncing, "vol-1-b": SECONDARY_AGENT}))
    assert p.status.sync == {"kind": "bitmap", "reason": "", "progress": 0.0, "doneBytes": 0, "totalBytes": 0,
                             "summary": "bitmap 0% (0.0 MiB to go)"}
    assert resync_events(p) == ["ResyncStarted: bitmap resync vol-1-a on n1 -> vol-1-b on n2: 0.0 MiB to copy "
                                "(no reason given)"]
    done = replace(PRIMARY_AGENT, last_sync={"kind": "bitmap"})
    p = plan(replace(w, status=p.status, agents={"vol-1-a": done, "vol-1-b": SECONDARY_AGENT}))
    assert p.status.last_sync == {"kind": "bitmap", "reason": "", "copiedBytes": 0, "seconds": 0.0}
    assert resync_events(p) == ["ResyncCompleted: bitmap resync vol-1-a -> vol-1-b done: 0.0 MiB copied in 0.0 s "
                                "(no reason given)"]


def test_a_checksum_resync_shows_how_far_it_compared_before_it_knows_what_to_copy() -> None:
    """While both replicas compare checksums nothing is copied and the bytes to copy are
    unknown: the SYNC column shows the comparison's progress, not "0% (0.0 MiB to go)"."""
    w = replicating()
    sec = w.status.secondary
    assert sec is not None
    w = replace(w, status=w.status.with_(phase=Phase.DEGRADED, secondary=replace(sec, out_of_sync=True)))
    comparing = replace(PRIMARY_AGENT, replication_state="syncing", sync_kind="checksum", sync_reason="why",
                        sync_done=0, sync_total=0, sync_compared=0, size=1 << 30)
    p = plan(replace(w, agents={"vol-1-a": comparing, "vol-1-b": SECONDARY_AGENT}))
    assert p.status.sync is not None and p.status.sync["summary"] == "checksum comparing 0% of 1024 MiB"
    assert p.status.sync["comparedBytes"] == 0
    assert resync_events(p) == ["ResyncStarted: checksum resync vol-1-a on n1 -> vol-1-b on n2: compares 1024 MiB, "
                                "then copies what differs (why)"]
    further = replace(comparing, sync_compared=768 << 20)
    p = plan(replace(w, status=p.status, agents={"vol-1-a": further, "vol-1-b": SECONDARY_AGENT}))
    assert p.status.sync is not None and p.status.sync["summary"] == "checksum comparing 75% of 1024 MiB"
    assert p.status.sync["comparedBytes"] == 768 << 20
    # compared: the regions that differ are known and copied
    copying = replace(further, sync_compared=1 << 30, sync_total=4 << 20, sync_done=1 << 20)
    p = plan(replace(w, status=p.status, agents={"vol-1-a": copying, "vol-1-b": SECONDARY_AGENT}))
    assert p.status.sync is not None and p.status.sync["summary"] == "checksum 25% (3.0 MiB to go)"


@pytest.mark.parametrize(("to_go", "shown"), [(10 << 20, "10 MiB"), ((10 << 20) - (1 << 19), "9.5 MiB")])
def test_what_a_sync_has_to_go_is_shown_to_a_tenth_of_a_mib_below_10_mib_and_in_whole_mib_from_there(
    to_go: int, shown: str
) -> None:
    syncing = replace(PRIMARY_AGENT, replication_state="syncing", sync_kind="full", sync_done=0, sync_total=to_go)
    p = plan(replicating(agents={"vol-1-a": syncing, "vol-1-b": SECONDARY_AGENT}))
    assert p.status.sync is not None and p.status.sync["summary"] == f"full 0% ({shown} to go)"


def test_a_resync_that_ran_between_two_observations_is_still_announced_at_its_end() -> None:
    w = replicating()
    done = replace(PRIMARY_AGENT, last_sync={"kind": "bitmap", "reason": "r", "copiedBytes": 65536, "seconds": 0.2,
                                             "endedAt": NOW - 0.5})
    p = plan(replace(w, agents={"vol-1-a": done, "vol-1-b": SECONDARY_AGENT}))
    assert resync_events(p) == ["ResyncCompleted: bitmap resync vol-1-a -> vol-1-b done: 0.1 MiB copied in 0.2 s (r)"]
    assert p.status.last_sync is not None and p.status.last_sync["kind"] == "bitmap"


def test_the_operator_leaves_a_dropped_reachable_peer_to_the_primary_while_it_re_protects_it() -> None:
    """R5: the primary re-pairs with its peer on its own (bounded); the operator neither
    replaces the secondary nor re-pairs over it meanwhile. Once the primary gives up, the
    operator re-pairs with a new epoch."""
    w = replicating(lease=LeaseView("vol-1-a", 1, 3.0, out_of_sync_epoch=3))
    dropped = replace(PRIMARY_AGENT, replication_state="degraded", reprotecting=True)
    p = plan(replace(w, agents={"vol-1-a": dropped, "vol-1-b": SECONDARY_AGENT}))
    assert not any(isinstance(a, DeletePod | StartPrimary) for a in p.actions), p.actions
    assert p.status.phase == Phase.DEGRADED and "re-protecting vol-1-b on its own" in p.status.message
    # without the mark seen yet (a lagging cache), the secondary is not taken for dead either
    p = plan(replace(w, lease=LeaseView("vol-1-a", 1, 3.0), agents={"vol-1-a": dropped, "vol-1-b": SECONDARY_AGENT}))
    assert not any(isinstance(a, DeletePod | StartPrimary) for a in p.actions), p.actions
    gave_up = replace(dropped, reprotecting=False)
    p = plan(replace(w, agents={"vol-1-a": gave_up, "vol-1-b": SECONDARY_AGENT}))
    assert any(isinstance(a, StartPrimary) and a.epoch == 4 for a in p.actions), p.actions


def test_a_secondary_the_primary_rewrites_on_its_own_is_not_promoted_even_by_hand() -> None:
    """H8 for the automatic resync: the primary records it on its Lease before copying; from
    then on the secondary's disk is a partial copy until the marks are cleared."""
    lease = LeaseView(None, 100.0, 3.0, out_of_sync_epoch=3, resync_epoch=3)
    w = replicating(lease=lease, annotations={ANN_FAILOVER: "now"})
    w = replace(w, pods={"vol-1-b": w.pods["vol-1-b"]}, agents={"vol-1-b": SECONDARY_AGENT})
    p = plan(w)
    assert not any(isinstance(a, DoFailover) for a in p.actions), p.actions
    assert "resyncing secondary vol-1-b on its own" in p.status.message
    # an older epoch's mark (a re-pair by the operator since, which tracks that itself) does not block
    p = plan(replace(w, lease=replace(lease, resync_epoch=2)))
    assert any(isinstance(a, DoFailover) for a in p.actions), p.status.message


def test_a_resync_mark_on_the_lease_makes_the_secondary_unsynced_in_status() -> None:
    w = replicating(lease=LeaseView("vol-1-a", 1, 3.0, out_of_sync_epoch=3, resync_epoch=3))
    syncing = replace(PRIMARY_AGENT, replication_state="syncing", sync_total=1 << 20, sync_kind="bitmap")
    p = plan(replace(w, agents={"vol-1-a": syncing, "vol-1-b": SECONDARY_AGENT}))
    assert p.status.secondary is not None
    assert p.status.secondary.out_of_sync and not p.status.secondary.synced


# ----------------------------------------------------------------- checkpoints


def test_checkpoint_is_cut_when_the_interval_has_passed_and_not_before() -> None:
    assert kinds(plan(replicating())) == []
    p = plan(replicating(now=NOW + 9, lease=LeaseView("vol-1-a", 1, 3.0)))
    assert p.actions == (Checkpoint("vol-1-b", "10.0.0.2"),)
    assert p.status.checkpoint is not None and p.status.checkpoint["id"] == 4
    assert p.cosmetic  # nothing but informational fields: the executor may coalesce the write


def test_a_spec_change_is_acknowledged_in_the_status_at_once_not_coalesced() -> None:
    p = plan(replicating(generation=2, now=NOW + 9, lease=LeaseView("vol-1-a", 1, 3.0)))
    assert p.status.observed_generation == 2
    assert not p.cosmetic


def test_first_checkpoint_is_cut_as_soon_as_the_pair_is_in_sync() -> None:
    """Checkpoint 0 predates the full sync; waiting a whole interval for checkpoint 1
    would leave a Checkpoint-mode volume without a restore point that long."""
    fresh = replace(SECONDARY_AGENT, checkpoint={"id": 0, "time": NOW - 1, "durationMs": 0.0})
    p = plan(replicating(agents={"vol-1-a": PRIMARY_AGENT, "vol-1-b": fresh}))
    assert p.actions == (Checkpoint("vol-1-b", "10.0.0.2"),)
    manual = replicating(agents={"vol-1-a": PRIMARY_AGENT, "vol-1-b": fresh},
                         spec=spec(checkpoint={"intervalSeconds": 0}))
    assert kinds(plan(manual)) == []  # manual means manual


def test_a_checkpoint_that_is_no_restore_point_is_followed_by_one_at_once() -> None:
    """A secondary restarted after an unclean stop reports its last checkpoint with
    ``restorePoint: false``: that cut is no state to fail over to, so a new one is cut now,
    not an interval later; one that says it is a restore point waits for the interval."""
    for restore_point, cut in ((False, True), (True, False)):
        cp = {"id": 4, "time": NOW - 2, "durationMs": 3.0, "restorePoint": restore_point}
        p = plan(replicating(agents={"vol-1-a": PRIMARY_AGENT, "vol-1-b": replace(SECONDARY_AGENT, checkpoint=cp)}))
        assert (Checkpoint("vol-1-b", "10.0.0.2") in p.actions) is cut, restore_point


def test_checkpoint_interval_zero_means_manual_only_and_annotation_triggers_one() -> None:
    w = replicating(spec=spec(checkpoint={"intervalSeconds": 0}), now=NOW + 1000,
                    lease=LeaseView("vol-1-a", 0, 3.0))
    assert kinds(plan(w)) == []
    p = plan(replace(w, annotations={ANN_CHECKPOINT: "now"}))
    assert p.actions == (Checkpoint("vol-1-b", "10.0.0.2"), ClearAnnotation(ANN_CHECKPOINT))


# -------------------------------------------------------------------- failover


def test_dead_primary_fails_over_after_grace_and_lease_expiry() -> None:
    p = plan(primary_dead())
    assert p.status.phase == Phase.FAILING_OVER and p.status.epoch == 4
    assert DoFailover("vol-1-b", "10.0.0.2", 4, "checkpoint") in p.actions
    fo = p.status.last_failover
    assert fo is not None and fo.duration_ms is None  # in flight, durably recorded first
    assert (fo.from_node, fo.to_node, fo.mode) == ("n1", "n2", "Checkpoint")
    assert "pod vol-1-a is gone" in fo.reason


def test_latest_mode_is_passed_to_the_agent() -> None:
    p = plan(primary_dead(spec=spec(failover={"mode": "Latest"})))
    assert DoFailover("vol-1-b", "10.0.0.2", 4, "latest") in p.actions


def test_never_fails_over_while_the_primary_lease_is_still_valid() -> None:
    p = plan(primary_dead(lease=LeaseView("vol-1-a", 1, 3.0)))
    assert not any(isinstance(a, DoFailover) for a in p.actions)
    assert p.status.phase == Phase.DEGRADED and "waiting for lease" in p.status.message


def test_lease_margin_is_respected() -> None:
    # unchanged for 3.5 s, duration 3 s, margin 1 s: expired for the agent, not yet for us
    p = plan(primary_dead(lease=LeaseView("vol-1-a", 3.5, 3.0)))
    assert not any(isinstance(a, DoFailover) for a in p.actions)


def test_grace_period_delays_failover() -> None:
    p = plan(primary_dead(suspect_since={"vol-1-a": NOW - 1}))
    assert not any(isinstance(a, DoFailover) for a in p.actions)
    assert "grace period" in p.status.message


def test_a_primary_whose_lease_expired_long_ago_has_been_down_since_its_validity_ended() -> None:
    """A loop that looks for the first time (a standby that has just taken over) finds a Lease
    it has watched unchanged for 10 s of a 3 s duration: the primary has not been able to
    serve for 7 s, so the grace period (3 s) is over at once; one seen for 5 s (expired with
    the margin, 2 s after its validity ended) leaves 1 s of it. Its pods and agents looking
    fine do not count. What the loop remembers is only its own clock: a Lease renewed again
    takes the shortcut back."""
    from pairvol.operator.decisions import grace_started, next_suspect_since

    def grace(previous: dict[str, float], world: World) -> dict[str, float]:
        return grace_started(next_suspect_since(previous, world), world)

    dead = primary_dead(suspect_since={})
    assert next_suspect_since({}, dead) == {"vol-1-a": NOW}
    assert grace({}, dead) == {"vol-1-a": NOW - 7}
    assert any(isinstance(a, DoFailover) for a in plan(replace(dead, suspect_since=grace({}, dead))).actions)
    just = primary_dead(suspect_since={}, lease=LeaseView("vol-1-a", 5, 3.0))
    assert grace({}, just) == {"vol-1-a": NOW - 2}
    assert not any(isinstance(a, DoFailover) for a in plan(replace(just, suspect_since=grace({}, just))).actions)
    # the primary's own pod and agent still look fine: only the Lease says it is down
    assert grace({}, replicating(lease=LeaseView("vol-1-a", 10, 3.0))) == {"vol-1-a": NOW - 7}
    # the age as of the read, not of the World's making: 4 s earlier, the clock starts 4 s earlier
    read_before = primary_dead(lease=LeaseView("vol-1-a", 10, 3.0, observed_at=NOW - 4))
    assert grace({}, read_before) == {"vol-1-a": NOW - 11}
    # a Lease still running says nothing: the clock starts at this look, or stays where it was
    assert grace({}, primary_dead(lease=LeaseView("vol-1-a", 2, 3.0))) == {"vol-1-a": NOW}
    assert grace({"vol-1-a": NOW - 9}, primary_dead()) == {"vol-1-a": NOW - 9}
    # a released Lease: not serving since before the release was first seen
    assert grace({}, primary_dead(lease=LeaseView(None, 5, 3.0))) == {"vol-1-a": NOW - 5}
    # a replica that looks well again is forgotten
    assert next_suspect_since({"vol-1-a": NOW - 9, "vol-1-b": NOW - 2}, replicating()) == {}


def test_node_not_ready_counts_as_primary_death() -> None:
    w = replicating(
        nodes=(NodeView("n1", ready=False), NodeView("n2"), NodeView("n3")),
        lease=LeaseView("vol-1-a", 10, 3.0), suspect_since={"vol-1-a": NOW - 5},
    )
    p = plan(w)
    assert any(isinstance(a, DoFailover) for a in p.actions)
    assert p.status.last_failover is not None
    assert "node n1 is NotReady" in p.status.last_failover.reason


def test_partitioned_primary_that_lost_its_lease_is_replaced() -> None:
    # pod still reported running and ready (stale), but the lease expired
    w = replicating(lease=LeaseView("vol-1-a", 10, 3.0), suspect_since={"vol-1-a": NOW - 6})
    assert "vol-1-a" in unhealthy_pods(w)
    p = plan(w)
    assert any(isinstance(a, DoFailover) for a in p.actions)


@pytest.mark.parametrize("mode", ["Checkpoint", "Latest"])
def test_out_of_sync_secondary_is_never_promoted_automatically(mode: str) -> None:
    """In either mode: Latest would serve a disk without the writes it missed, Checkpoint
    a checkpoint cut on a disk that was already behind."""
    oos = primary_dead(spec=spec(failover={"mode": mode}),
                       lease=LeaseView("vol-1-a", 10, 3.0, out_of_sync_epoch=3))
    p = plan(oos)
    assert not any(isinstance(a, DoFailover) for a in p.actions)
    assert p.status.phase == Phase.FAILED and "OutOfSync" in p.status.message
    assert p.status.secondary is not None and p.status.secondary.out_of_sync
    # ... but an operator may accept the loss explicitly
    p2 = plan(replace(oos, status=p.status, annotations={ANN_FAILOVER: "now"}))
    assert DoFailover("vol-1-b", "10.0.0.2", 4, mode.lower()) in p2.actions


def test_stale_out_of_sync_mark_from_an_older_epoch_is_ignored() -> None:
    p = plan(primary_dead(lease=LeaseView("vol-1-a", 10, 3.0, out_of_sync_epoch=2)))
    assert any(isinstance(a, DoFailover) for a in p.actions)


def test_automatic_false_blocks_failover() -> None:
    p = plan(primary_dead(spec=spec(failover={"automatic": False})))
    assert not any(isinstance(a, DoFailover) for a in p.actions)
    assert "automatic is false" in p.status.message


@pytest.mark.parametrize("stage", ["none", "failover", "failover_failed", "done"])
def test_only_a_running_secondary_is_promoted(stage: str) -> None:
    """A secondary that is not running has no consistent undo log to fail over with."""
    p = plan(primary_dead(agents={"vol-1-b": replace(SECONDARY_AGENT, stage=stage)}))
    assert not any(isinstance(a, DoFailover) for a in p.actions)
    assert f"secondary agent is secondary/{stage}, not secondary/running" in p.status.message


def test_unhealthy_secondary_blocks_failover() -> None:
    p = plan(primary_dead(agents={}))
    assert not any(isinstance(a, DoFailover) for a in p.actions)
    assert "secondary is unhealthy" in p.status.message


def test_manual_failover_of_a_healthy_primary_stops_it_first() -> None:
    p = plan(replicating(annotations={ANN_FAILOVER: "now"}))
    assert DeletePod("vol-1-a", "manual failover requested") in p.actions
    assert not any(isinstance(a, DoFailover) for a in p.actions)


def _in_flight() -> World:
    return replace(primary_dead(), status=plan(primary_dead()).status, now=NOW + 0.5)


def test_completed_failover_flips_roles_records_duration_and_demotes_the_old_primary() -> None:
    w = _in_flight()
    promoted = AgentView("primary", "done", 4, "degraded", serving=True)
    w = replace(w, agents={"vol-1-b": promoted},
                pods={**w.pods, "vol-1-a": pod("vol-1-a", "n1", "primary", "10.0.0.1")})
    p = plan(w)
    assert SetRole("vol-1-b", "primary") in p.actions
    assert DeletePod("vol-1-a", "demoted by failover") in p.actions
    assert p.status.primary is not None and p.status.primary.pod == "vol-1-b"
    assert p.status.secondary is None and p.status.phase == Phase.DEGRADED
    assert p.status.last_failover is not None and p.status.last_failover.duration_ms == 500.0
    assert any(isinstance(a, Event) and a.reason == "FailedOver" for a in p.actions)


def test_the_agent_is_told_a_manual_failover_was_asked_for_also_when_the_call_is_retried() -> None:
    """The trigger labels the agent's failover metrics: a planned failover does not alert.
    An agent that does not list ``failoverTriggers`` (an older one refuses unknown fields) is
    not sent one."""
    taking = {"vol-1-b": replace(SECONDARY_AGENT, takes_trigger=True)}
    asked = plan(primary_dead(agents=taking, annotations={ANN_FAILOVER: "now"}))
    calls = [a for a in asked.actions if isinstance(a, DoFailover)]
    assert calls == [DoFailover("vol-1-b", "10.0.0.2", 4, "checkpoint", "manual")]
    retried = plan(replace(primary_dead(agents=taking), status=asked.status, now=NOW + 0.5))  # the call was lost
    assert retried.actions == (DoFailover("vol-1-b", "10.0.0.2", 4, "checkpoint", "manual"),)
    automatic = plan(primary_dead(agents=taking)).actions[0]  # the grace period ran out: nobody asked
    assert isinstance(automatic, DoFailover) and automatic.trigger == "automatic"
    older = plan(primary_dead(annotations={ANN_FAILOVER: "now"}))
    untold = DoFailover("vol-1-b", "10.0.0.2", 4, "checkpoint")
    assert [a for a in older.actions if isinstance(a, DoFailover)] == [untold]
    assert AgentView.from_status({"failoverTriggers": ["automatic", "manual", "unspecified"]}).takes_trigger
    assert not AgentView.from_status({}).takes_trigger


def test_operator_restarted_mid_failover_retries_with_the_same_epoch() -> None:
    w = _in_flight()  # status says FailingOver, agent still a secondary: the call was lost
    p = plan(w)
    assert p.actions == (DoFailover("vol-1-b", "10.0.0.2", 4, "checkpoint"),)
    assert p.status.phase == Phase.FAILING_OVER


def test_a_target_that_is_primary_at_an_older_epoch_has_not_failed_over_yet() -> None:
    """Only the failover's own epoch proves the call took effect (the agent may report a
    role restored from its disk)."""
    w = _in_flight()
    stale = AgentView("primary", "done", 3, "degraded")
    p = plan(replace(w, agents={"vol-1-b": stale}))
    assert not any(isinstance(a, SetRole | DeletePod | FailoverDone) for a in p.actions)
    assert p.status.phase == Phase.FAILING_OVER
    assert p.status.primary is not None and p.status.primary.pod == "vol-1-a"


def test_a_failover_whose_target_died_is_failed_not_awaited_forever() -> None:
    w = _in_flight()
    for pods in ({}, {"vol-1-b": pod("vol-1-b", "n2", "secondary", "10.0.0.2", phase="Failed", ready=False)}):
        p = plan(replace(w, pods=pods, agents={}))
        assert p.status.phase == Phase.FAILED and "died during failover" in p.status.message
        assert any(isinstance(a, Event) and a.reason == "FailoverFailed" for a in p.actions)


def test_failover_failed_on_the_agent_is_reported() -> None:
    w = _in_flight()
    failed = AgentView("secondary", "failover_failed", 4, error="commit failed")
    p = plan(replace(w, agents={"vol-1-b": failed}))
    assert p.status.phase == Phase.FAILED and "commit failed" in p.status.message


def test_a_target_serving_at_an_older_epoch_has_not_finished_this_failover() -> None:
    # a primary that serves, but at an epoch before the failover's, answered an older call
    w = _in_flight()
    older = AgentView("primary", "done", 3, "degraded", serving=True)  # the failover is at 4
    p = plan(replace(w, agents={"vol-1-b": older}))
    assert not any(isinstance(a, Event) and a.reason == "FailedOver" for a in p.actions)
    assert p.status.primary is not None and p.status.primary.pod == "vol-1-a"  # not flipped


def test_a_target_that_took_the_role_but_does_not_serve_is_not_failed_over_yet() -> None:
    # issue 7, failure 7: the target saved role primary/done, then could not take the Lease
    w = _in_flight()
    stuck = AgentView("primary", "done", 4, "degraded", error="refusing to serve: lease held by vol-1-a",
                      serving=False)
    p = plan(replace(w, agents={"vol-1-b": stuck}))
    assert p.status.phase == Phase.FAILING_OVER and p.status.epoch == 5
    assert p.status.primary is not None and p.status.primary.pod == "vol-1-a"  # not flipped
    assert StartPrimary("vol-1-b", "10.0.0.2", 5, None, "none") in p.actions
    assert not any(isinstance(a, SetRole | DeletePod) for a in p.actions)
    assert not any(isinstance(a, Event) and a.reason == "FailedOver" for a in p.actions)
    assert [a.reason for a in p.actions if isinstance(a, Event)] == ["NotServing"]
    assert "primary but not serving" in p.status.message and "lease held by vol-1-a" in p.status.message
    # while that call runs, nothing new; an answer that still does not serve: again, new epoch, no new event
    w2 = replace(w, status=p.status, agents={"vol-1-b": replace(stuck, epoch=5)}, agent_call_in_flight=True)
    assert [a for a in plan(w2).actions if not isinstance(a, Event)] == []
    p3 = plan(replace(w2, agent_call_in_flight=False))
    assert StartPrimary("vol-1-b", "10.0.0.2", 6, None, "none") in p3.actions
    assert not any(isinstance(a, Event) for a in p3.actions)
    # serving at the current epoch: now it is done
    served = replace(stuck, epoch=6, serving=True, error=None)
    p4 = plan(replace(w2, status=p3.status, agents={"vol-1-b": served}, agent_call_in_flight=False))
    assert any(isinstance(a, Event) and a.reason == "FailedOver" for a in p4.actions)
    assert p4.status.primary is not None and p4.status.primary.pod == "vol-1-b"
    assert p4.status.epoch == 6


def test_agent_view_reads_serving_from_the_status_export() -> None:
    st = {"role": "primary", "stage": "done", "epoch": 4, "export": {"serving": False}}
    assert AgentView.from_status(st).serving is False
    assert AgentView.from_status({**st, "export": {"serving": True}}).serving is True
    assert AgentView.from_status({"role": "primary"}).serving is False


# ------------------------------------------------------- lease, as observed


def test_a_ready_primary_whose_lease_is_unchanged_for_longer_than_its_duration_is_dead() -> None:
    # pod Running and ready, agent answering: but the agent stopped renewing (its data path
    # is broken, or it is cut off from the API server)
    fresh = replicating(lease=LeaseView("vol-1-a", 3.9, 3.0))
    assert "vol-1-a" not in unhealthy_pods(fresh) and plan(fresh).status.phase == Phase.REPLICATING
    stale = replicating(lease=LeaseView("vol-1-a", 4.1, 3.0))  # seen unchanged for duration 3 + margin 1
    assert "vol-1-a" in unhealthy_pods(stale)
    p = plan(replace(stale, suspect_since={"vol-1-a": NOW - 4}))
    assert any(isinstance(a, DoFailover) for a in p.actions)
    assert p.status.last_failover is not None and "lost its lease" in p.status.last_failover.reason


def test_a_released_lease_means_the_primary_gave_up() -> None:
    # the agent fenced a broken data path and released the Lease: no need to wait a duration
    w = replicating(lease=LeaseView(None, 0.0, 3.0), suspect_since={"vol-1-a": NOW - 4})
    assert "vol-1-a" in unhealthy_pods(w)
    assert any(isinstance(a, DoFailover) for a in plan(w).actions)


def test_a_primary_pod_ended_by_its_liveness_probe_is_dead() -> None:
    # restartPolicy Never: a failed liveness probe ends the container; the agent exits 0 on
    # the SIGTERM (Succeeded) or not (Failed). Either is a dead primary; the Lease decides when.
    for phase in ("Failed", "Succeeded"):
        ended = pod("vol-1-a", "n1", "primary", "10.0.0.1", phase=phase, ready=False)
        w = replicating(pods={**replicating().pods, "vol-1-a": ended}, agents={"vol-1-b": SECONDARY_AGENT},
                        suspect_since={"vol-1-a": NOW - 4})
        assert "vol-1-a" in unhealthy_pods(w)
        held = plan(replace(w, lease=LeaseView("vol-1-a", 1.0, 3.0)))
        assert not any(isinstance(a, DoFailover) for a in held.actions)
        assert "waiting for lease" in held.status.message and "has terminated" in held.status.message
        released = plan(replace(w, lease=LeaseView(None, 0.0, 3.0)))
        assert any(isinstance(a, DoFailover) for a in released.actions)


def test_a_lease_still_held_by_the_previous_primary_does_not_condemn_the_new_one() -> None:
    w = _after_failover(lease=LeaseView("vol-1-a", 60.0, 3.0))
    assert "vol-1-b" not in unhealthy_pods(w)
    assert not any(isinstance(a, DoFailover) for a in plan(w).actions)


# ---------------------------------------------------------------- re-protection


def _after_failover(**kw: Any) -> World:
    st = VolumeStatus(
        phase=Phase.DEGRADED, epoch=4, primary=Replica("n2", "vol-1-b", "", "10.0.0.2"),
        endpoint={"node": "n2"},
        last_failover=Failover(rfc3339(NOW - 1), "n1", "n2", "Checkpoint", "x", 100.0),
    )
    base: dict[str, Any] = dict(
        status=st, pods={"vol-1-b": pod("vol-1-b", "n2", "primary", "10.0.0.2")},
        agents={"vol-1-b": AgentView("primary", "done", 4, "none", serving=True)}, lease=None,
    )
    base.update(kw)
    return replicating(**base)


def test_reprotection_prefers_the_old_primary_node_when_it_is_back() -> None:
    p = plan(_after_failover())
    assert CreatePod("vol-5", "n1", "secondary") in p.actions
    assert p.status.secondary is not None and p.status.secondary.out_of_sync
    assert p.status.epoch == 5


def test_reprotection_uses_another_node_while_the_old_one_is_down() -> None:
    nodes = (NodeView("n1", ready=False), NodeView("n2"), NodeView("n3"))
    p = plan(_after_failover(nodes=nodes))
    assert CreatePod("vol-5", "n3", "secondary") in p.actions


def test_reprotection_waits_for_old_pods_to_go_away() -> None:
    old = pod("vol-1-a", "n1", "primary", "10.0.0.1", deleting=True)
    nodes = (NodeView("n1"), NodeView("n2"))
    p = plan(_after_failover(nodes=nodes, pods={
        "vol-1-b": pod("vol-1-b", "n2", "primary", "10.0.0.2"), "vol-1-a": old}))
    assert not any(isinstance(a, CreatePod) for a in p.actions)
    assert "waiting for old pods on n1" in p.status.message


def test_dead_secondary_is_dropped_and_the_volume_degrades() -> None:
    w = replicating(pods={"vol-1-a": pod("vol-1-a", "n1", "primary", "10.0.0.1")},
                    agents={"vol-1-a": PRIMARY_AGENT})
    p = plan(w)
    assert p.status.phase == Phase.DEGRADED and p.status.secondary is None
    assert any(isinstance(a, Event) and a.reason == "SecondaryLost" for a in p.actions)


def test_primary_that_dropped_its_peer_triggers_a_fresh_secondary() -> None:
    dropped = replace(PRIMARY_AGENT, replication_state="degraded", error="peer timeout")
    p = plan(replicating(agents={"vol-1-a": dropped, "vol-1-b": SECONDARY_AGENT}))
    assert DeletePod("vol-1-b", "primary dropped secondary vol-1-b: peer timeout") in p.actions
    assert p.status.secondary is None


DISK = "c" * 32


def test_the_same_secondary_disk_coming_back_is_resynced_with_auto() -> None:
    """The primary tracks what the secondary's disk missed, and the secondary reports that
    very disk (same node, same data dir): the operator asks for ``auto`` and names the disk."""
    dropped = replace(PRIMARY_AGENT, replication_state="degraded", tracked_disk=DISK)
    back = replace(SECONDARY_AGENT, disk_id=DISK)
    p = plan(replicating(agents={"vol-1-a": replace(dropped, peer="10.0.0.9:7801"), "vol-1-b": back}))
    assert StartPrimary("vol-1-a", "10.0.0.1", 4, "10.0.0.2:7801", "auto", 2, DISK, "10.0.0.2:7800") in p.actions
    assert p.status.secondary is not None and p.status.secondary.out_of_sync  # as for a full sync
    assert [(e.reason, e.message) for e in p.actions if isinstance(e, Event)] == [
        ("Resync", "resync (the primary copies what differs) vol-1-a on n1 -> vol-1-b on n2 (epoch 4)")]


def test_a_secondary_disk_the_primary_has_no_record_of_is_left_to_the_agent_to_compare() -> None:
    """The old primary rejoining after a failover: the new primary has no record of its disk,
    but the disk holds the volume. The operator asks for ``auto`` with the peer's API, so the
    agent may compare checksums (R4) instead of copying everything; only a secondary that
    names no disk gets ``full``."""
    dropped = replace(PRIMARY_AGENT, replication_state="none", peer=None, tracked_disk=None)
    rejoined = replace(SECONDARY_AGENT, disk_id=DISK)
    p = plan(replicating(agents={"vol-1-a": dropped, "vol-1-b": rejoined}))
    assert StartPrimary("vol-1-a", "10.0.0.1", 4, "10.0.0.2:7801", "auto", 2, DISK, "10.0.0.2:7800") in p.actions
    p = plan(replicating(agents={"vol-1-a": dropped, "vol-1-b": SECONDARY_AGENT}))
    starts = [a for a in p.actions if isinstance(a, StartPrimary)]
    assert starts and starts[0].sync == "full"


def test_the_first_full_sync_names_the_secondarys_disk_so_the_primary_records_it() -> None:
    w = _placed()
    st0 = w.status
    assert st0.primary is not None and st0.secondary is not None
    pods = {
        st0.primary.pod: pod(st0.primary.pod, "n1", "primary", "10.0.0.1"),
        st0.secondary.pod: pod(st0.secondary.pod, "n2", "secondary", "10.0.0.2"),
    }
    sec = AgentView("secondary", "running", 2, disk_id=DISK)
    w = replace(w, pods=pods, agents={st0.primary.pod: AgentView("none", "none", 0), st0.secondary.pod: sec})
    start = [a for a in plan(w).actions if isinstance(a, StartPrimary)]
    assert start == [StartPrimary(
        st0.primary.pod, "10.0.0.1", st0.epoch + 1, "10.0.0.2:7801", "full", 2, DISK, peer_api="10.0.0.2:7800",
    )]


@pytest.mark.parametrize(
    ("tracked", "disk"), [(None, DISK), (DISK, None), (DISK, "d" * 32), (None, None)]
)
def test_a_secondary_that_names_its_disk_is_left_to_the_agent_and_one_that_does_not_is_synced_in_full(
    tracked: str | None, disk: str | None
) -> None:
    primary = replace(PRIMARY_AGENT, peer="10.0.0.9:7801", tracked_disk=tracked)
    p = plan(replicating(agents={"vol-1-a": primary, "vol-1-b": replace(SECONDARY_AGENT, disk_id=disk)}))
    if disk is None:
        assert StartPrimary(
            "vol-1-a", "10.0.0.1", 4, "10.0.0.2:7801", "full", 2, None, peer_api="10.0.0.2:7800",
        ) in p.actions
    else:
        assert StartPrimary("vol-1-a", "10.0.0.1", 4, "10.0.0.2:7801", "auto", 2, disk, "10.0.0.2:7800") in p.actions


def test_the_agents_report_their_disk_identities() -> None:
    view = AgentView.from_status(
        {"role": "primary", "disk": {"id": None}, "replication": {"resync": {"peerDisk": DISK},
                                                                 "sync": {"kind": "bitmap"}}}
    )
    assert (view.tracked_disk, view.disk_id, view.sync_kind) == (DISK, None, "bitmap")
    assert AgentView.from_status({"role": "secondary", "disk": {"id": DISK}}).disk_id == DISK
    assert AgentView.from_status({"role": "secondary"}).disk_id is None  # an older agent


def test_a_resync_marks_the_secondary_out_of_sync_before_it_starts() -> None:
    """A full sync to the secondary is about to overwrite its disk: until the primary says
    it is replicating again, the secondary holds no consistent state and must not be promoted,
    even if the primary dies mid-resync."""
    elsewhere = replace(PRIMARY_AGENT, peer="10.0.0.9:7801")  # replicating to a previous peer
    p = plan(replicating(agents={"vol-1-a": elsewhere, "vol-1-b": SECONDARY_AGENT}))
    assert StartPrimary(
        "vol-1-a", "10.0.0.1", 4, "10.0.0.2:7801", "full", peer_epoch=2, peer_api="10.0.0.2:7800",
    ) in p.actions
    assert p.status.phase == Phase.SYNCING and p.status.epoch == 4
    assert p.status.secondary is not None and p.status.secondary.out_of_sync
    # the primary dies before the sync finished: no promotion
    dead = primary_dead(status=p.status.with_(epoch=4),
                        lease=LeaseView("vol-1-a", 10, 3.0))
    assert not any(isinstance(a, DoFailover) for a in plan(dead).actions)


@pytest.mark.parametrize("mode", ["Checkpoint", "Latest"])
def test_a_half_synced_secondary_is_not_promoted_even_by_hand(mode: str) -> None:
    """Accepting data loss by hand means an older state, not a half-copied disk: a secondary
    whose full sync never finished is refused, whatever the annotation says."""
    elsewhere = replace(PRIMARY_AGENT, peer="10.0.0.9:7801")
    p = plan(replicating(spec=spec(failover={"mode": mode}), agents={"vol-1-a": elsewhere, "vol-1-b": SECONDARY_AGENT}))
    assert p.status.secondary is not None and not p.status.secondary.synced
    dead = primary_dead(status=p.status.with_(epoch=4), annotations={ANN_FAILOVER: "now"})
    p2 = plan(dead)
    assert not any(isinstance(a, DoFailover) for a in p2.actions)
    assert p2.status.phase == Phase.FAILED and "never finished its full sync" in p2.status.message
    assert any(isinstance(a, Event) and a.reason == "FailoverBlocked" for a in p2.actions)


def test_a_manual_failover_blocked_while_the_primary_is_down_is_answered_once() -> None:
    """The primary's node is down and the failover is blocked (the secondary never finished
    its full sync): the automatic path has said so already. A manual request then made gets
    an Event of its own at once (not only when the primary comes back and consumes it), and
    only one, however many ticks the request stands."""
    elsewhere = replace(PRIMARY_AGENT, peer="10.0.0.9:7801")
    p = plan(replicating(agents={"vol-1-a": elsewhere, "vol-1-b": SECONDARY_AGENT}))
    down = (NodeView("n1", ready=False), *NODES[1:])

    def node_down(**kw: Any) -> World:
        return primary_dead(nodes=down, **kw)

    blocked = plan(node_down(status=p.status.with_(epoch=4)))
    assert blocked.status.phase == Phase.FAILED
    assert [a.reason for a in blocked.actions if isinstance(a, Event)] == ["FailoverBlocked"]
    again = plan(node_down(status=blocked.status))
    assert not any(isinstance(a, Event) for a in again.actions), "the automatic path says it once"
    asked = plan(node_down(status=again.status, annotations={ANN_FAILOVER: "now"}))
    events = [a for a in asked.actions if isinstance(a, Event)]
    assert [(e.reason, e.type) for e in events] == [("FailoverBlocked", "Warning")], asked.actions
    assert "never finished its full sync" in events[0].message and f"{ANN_FAILOVER}=now" in events[0].message
    assert not any(isinstance(a, (DoFailover, ClearAnnotation)) for a in asked.actions), "the request stands"
    still = plan(node_down(status=asked.status, annotations={ANN_FAILOVER: "now"}))
    assert not any(isinstance(a, Event) for a in still.actions), "said once while the request stands"


def test_a_secondary_is_synced_once_the_pair_is_in_sync_after_its_full_sync() -> None:
    placed = plan(replicating(agents={"vol-1-a": replace(PRIMARY_AGENT, peer="10.0.0.9:7801"),
                                      "vol-1-b": SECONDARY_AGENT})).status
    syncing = plan(replicating(status=placed, agents={"vol-1-a": replace(PRIMARY_AGENT, replication_state="syncing"),
                                                      "vol-1-b": SECONDARY_AGENT}))
    assert syncing.status.secondary is not None and not syncing.status.secondary.synced
    in_sync = plan(replicating(status=syncing.status))
    assert in_sync.status.secondary is not None and in_sync.status.secondary.synced
    assert not in_sync.status.secondary.out_of_sync
    stored = VolumeStatus.from_dict(in_sync.status.to_dict())
    assert stored.secondary is not None and stored.secondary.synced


def test_a_manual_failover_of_a_healthy_primary_is_not_refused_for_what_the_annotation_overrides() -> None:
    """Automatic failover off, or a secondary OutOfSync after it was in sync: the annotation
    is exactly the override for those, so the healthy primary is stopped, not the request refused."""
    marked = plan(replicating(lease=LeaseView("vol-1-a", 1, 3.0, out_of_sync_epoch=3))).status
    for w in (replicating(spec=spec(failover={"automatic": False}), annotations={ANN_FAILOVER: "now"}),
              replicating(status=marked, lease=LeaseView("vol-1-a", 1, 3.0, out_of_sync_epoch=3),
                          annotations={ANN_FAILOVER: "now"})):
        p = plan(w)
        assert DeletePod("vol-1-a", "manual failover requested") in p.actions
        assert not any(isinstance(a, Event) and a.reason == "FailoverBlocked" for a in p.actions)
        assert p.status.message == "manual failover: stopping the primary"


def test_a_secondary_dropped_after_it_was_in_sync_may_be_promoted_by_hand() -> None:
    """Its disk is the state at the drop: older than the primary's, but one the volume had."""
    marked = plan(replicating(lease=LeaseView("vol-1-a", 1, 3.0, out_of_sync_epoch=3))).status
    assert marked.secondary is not None and marked.secondary.out_of_sync and marked.secondary.synced
    p = plan(primary_dead(status=marked, lease=LeaseView("vol-1-a", 10, 3.0, out_of_sync_epoch=3),
                          annotations={ANN_FAILOVER: "now"}))
    assert any(isinstance(a, DoFailover) for a in p.actions)


def test_a_status_written_before_synced_existed_reads_in_sync_as_synced() -> None:
    def sec(d: dict[str, Any]) -> Replica | None:
        return VolumeStatus.from_dict({"secondary": {"node": "n2", "pod": "p", **d}}).secondary

    assert (s := sec({"outOfSync": False})) is not None and s.synced
    assert (s := sec({"outOfSync": True})) is not None and not s.synced
    assert (s := sec({"outOfSync": True, "synced": True})) is not None and s.synced


def test_out_of_sync_is_not_cleared_while_the_lease_records_a_mark_for_this_epoch() -> None:
    """The primary's status may still say replicating when its durable mark says it dropped
    the peer: the mark wins."""
    w = replicating(lease=LeaseView("vol-1-a", 1, 3.0, out_of_sync_epoch=3))
    p = plan(w)
    assert p.status.secondary is not None and p.status.secondary.out_of_sync
    assert p.status.phase == Phase.DEGRADED and "OutOfSync" in p.status.message
    assert not any(isinstance(a, Event) and a.reason == "Replicating" for a in p.actions)
    # a second tick with the mark already in status keeps it
    p2 = plan(replace(w, status=p.status))
    assert p2.status.secondary is not None and p2.status.secondary.out_of_sync


def test_stray_pods_of_the_volume_are_deleted() -> None:
    w = replicating()
    w = replace(w, pods={**w.pods, "vol-0-a": pod("vol-0-a", "n3", "primary", "10.0.0.3")})
    assert DeletePod("vol-0-a", "no longer a replica of this volume") in plan(w).actions


# ------------------------------------------------------------------ invariants

EPOCH_ACTIONS = (StartPrimary, StartSecondary, DoFailover)


@settings(max_examples=300, deadline=None)
@given(
    st.booleans(), st.booleans(), st.booleans(), st.booleans(), st.booleans(),
    st.floats(0, 20), st.sampled_from([None, 2, 3, 4]), st.booleans(),
)
def test_epochs_only_grow_and_no_promotion_while_the_lease_is_live(
    p_pod: bool, p_agent: bool, s_agent: bool, n1_ready: bool, manual: bool,
    lease_age: float, oos: int | None, automatic: bool,
) -> None:
    w = replicating(spec=spec(failover={"automatic": automatic}))
    pods = dict(w.pods) if p_pod else {"vol-1-b": w.pods["vol-1-b"]}
    agents = {k: v for k, v in w.agents.items()
              if (k == "vol-1-a" and p_agent) or (k == "vol-1-b" and s_agent)}
    lease = LeaseView("vol-1-a", lease_age, 3.0, oos)
    w = replace(
        w, pods=pods, agents=agents, lease=lease,
        nodes=(NodeView("n1", ready=n1_ready), NodeView("n2"), NodeView("n3")),
        annotations={ANN_FAILOVER: "now"} if manual else {}, suspect_since={"vol-1-a": NOW - 9},
    )
    p = plan(w)
    assert p.status.epoch >= w.status.epoch
    for a in p.actions:
        if isinstance(a, EPOCH_ACTIONS):
            assert a.epoch == p.status.epoch > w.status.epoch
    if any(isinstance(a, DoFailover) for a in p.actions):
        assert lease.expired(w.settings.lease_margin_s)
        assert s_agent
        assert manual or (automatic and (oos is None or oos < 3))


def test_a_fresh_secondary_is_not_judged_by_the_previous_peers_failure() -> None:
    # the new secondary reuses the old one's address; the primary still reports that address
    # as a dropped peer, and the new agent restored role "secondary" from the node's disk
    w = replicating()
    sec = w.status.secondary
    assert sec is not None
    fresh = replace(sec, pod="vol-5", out_of_sync=True)
    dropped = replace(PRIMARY_AGENT, replication_state="degraded", error="peer lost")
    w = replace(
        w,
        status=w.status.with_(secondary=fresh),
        pods={"vol-1-a": w.pods["vol-1-a"], "vol-5": pod("vol-5", "n2", "secondary", "10.0.0.2", ready=False)},
        agents={"vol-1-a": dropped, "vol-5": SECONDARY_AGENT},
        suspect_since={"vol-5": NOW - 30},
    )
    p = plan(w)
    assert not any(isinstance(a, DeletePod) for a in p.actions)
    assert p.status.secondary is not None and p.status.secondary.pod == "vol-5"
    assert "waiting for secondary vol-5" in p.status.message
    # once ready it gets a full sync from the primary
    w = replace(w, pods={**w.pods, "vol-5": pod("vol-5", "n2", "secondary", "10.0.0.2")})
    assert StartPrimary(
        "vol-1-a", "10.0.0.1", 4, "10.0.0.2:7801", "full", peer_epoch=2, peer_api="10.0.0.2:7800",
    ) in plan(w).actions


def test_no_new_role_call_while_one_is_in_flight_but_failover_still_happens() -> None:
    # a full-sync start on the primary can take long; the loop keeps observing meanwhile
    w = replace(_after_failover(), agent_call_in_flight=True)
    p = plan(w)  # places the new secondary (no agent call needed for that)
    assert CreatePod("vol-5", "n1", "secondary") in p.actions
    sec = p.status.secondary
    assert sec is not None
    w = replace(
        w,
        status=p.status,
        pods={**w.pods, "vol-5": pod("vol-5", "n1", "secondary", "10.0.0.1")},
        agents={**w.agents, "vol-5": AgentView("none", "none", 0)},
    )
    p2 = plan(w)
    assert not any(isinstance(a, StartSecondary | StartPrimary) for a in p2.actions)
    assert p2.status.epoch == p.status.epoch and "waiting for an agent" in p2.status.message
    assert any(isinstance(a, StartSecondary) for a in plan(replace(w, agent_call_in_flight=False)).actions)
    # and a dead primary is failed over regardless of a call in flight
    dead = replace(primary_dead(), agent_call_in_flight=True)
    assert any(isinstance(a, DoFailover) for a in plan(dead).actions)


# ----------------------------------------------------------- observations


def test_agent_view_reads_every_field_of_the_agent_status() -> None:
    status = {
        "role": "secondary", "stage": "running", "epoch": 7,
        "checkpoint": {"id": 3, "time": NOW, "durationMs": 1.5},
        "replication": {"state": "syncing", "peer": "10.0.0.1:7801", "error": "peer slow",
                        "sync": {"doneBytes": 10, "totalBytes": 20}},
        "export": {"serving": True},
    }
    assert AgentView.from_status(status) == AgentView(
        "secondary", "running", 7, "syncing", "10.0.0.1:7801", "peer slow",
        {"id": 3, "time": NOW, "durationMs": 1.5}, 10, 20, serving=True,
    )
    # a sync reported at the top level wins over one under replication
    top = AgentView.from_status({**status, "sync": {"doneBytes": 1, "totalBytes": 2}})
    assert (top.sync_done, top.sync_total) == (1, 2)

    primary = {
        "role": "primary", "stage": "done", "epoch": 8, "size": 128 << 20,
        "replication": {"state": "degraded", "peer": "10.0.0.2:7801",
                        "sync": {"doneBytes": 0, "totalBytes": 4096, "kind": "bitmap", "reason": "same disk",
                                 "comparedBytes": 8192},
                        "lastSync": {"kind": "full", "copiedBytes": 64},
                        "reprotect": {"nextInSeconds": 0.5}, "resync": {"peerDisk": "d1"}},
        "disk": {"id": "d0"},
    }
    assert AgentView.from_status(primary) == AgentView(
        "primary", "done", 8, "degraded", "10.0.0.2:7801", None, None, 0, 4096, "bitmap", "same disk",
        {"kind": "full", "copiedBytes": 64}, reprotecting=True, disk_id="d0", tracked_disk="d1", size=128 << 20,
        sync_compared=8192,
    )
    # a re-protection is pending only while the agent names when it tries next; a size that is
    # not a number of bytes is no size
    idle = {**primary, "size": "128Mi", "replication": {**primary["replication"], "reprotect": {}}}
    assert (AgentView.from_status(idle).reprotecting, AgentView.from_status(idle).size) == (False, None)


def test_agent_view_of_a_bare_status_is_a_replica_without_a_role() -> None:
    assert AgentView.from_status({}) == AgentView("none", "none", 0)
    assert AgentView.from_status({"epoch": None, "checkpoint": {}, "replication": None}) == AgentView("none", "none", 0)


def test_lease_expires_in_counts_down_to_zero_with_the_margin() -> None:
    assert LeaseView("p", 1.0, 3.0).expires_in(0.5) == 2.5
    assert LeaseView("p", 10.0, 3.0).expires_in(0.5) == 0.0
    assert LeaseView(None, 1.0, 3.0).expires_in(0.5) == 0.0  # released
    assert LeaseView("p", 1.0, None).expires_in(0.5) == 0.0  # no duration: nobody can rely on it


@pytest.mark.parametrize(
    "unwell",
    [
        {"pods": {}},
        {"pods": {"vol-1-b": pod("vol-1-b", "n2", "secondary", "10.0.0.2", deleting=True)}},
        {"pods": {"vol-1-b": pod("vol-1-b", "n2", "secondary", "10.0.0.2", ready=False)}},
        {"agents": {"vol-1-b": None}},
        {"nodes": (NodeView("n1"), NodeView("n3"))},
        {"nodes": (NodeView("n1"), NodeView("n2", ready=False), NodeView("n3"))},
    ],
)
def test_each_sign_of_trouble_alone_makes_a_replica_pod_unhealthy(unwell: dict[str, Any]) -> None:
    """With no primary recorded, so the secondary is judged on its own."""
    healthy = replicating(status=replicating().status.with_(primary=None), lease=None)
    assert unhealthy_pods(healthy) == set()
    w = replace(healthy, **unwell)
    assert unhealthy_pods(w) == {"vol-1-b"}


def test_a_replica_is_dead_once_unwell_for_the_whole_grace_period() -> None:
    w = replicating(suspect_since={"vol-1-b": NOW - 3.0},
                    pods={"vol-1-b": pod("vol-1-b", "n2", "secondary", "10.0.0.2", ready=False)})
    sec = w.status.secondary
    assert sec is not None
    assert replica_health(w, sec, 3.0, started=True) == ("dead", "pod vol-1-b not ready for 3.0s")
    assert replica_health(w, sec, 3.5, started=True) == ("suspect", "pod vol-1-b not ready")
    silent = replace(w, pods={"vol-1-b": pod("vol-1-b", "n2", "secondary", "10.0.0.2")}, agents={})
    assert replica_health(silent, sec, 3.5, started=True) == ("suspect", "pod vol-1-b not answering on its API")
    assert replica_health(silent, sec, 2.0, started=True) == ("dead", "pod vol-1-b not answering on its API for 3.0s")


def test_eligibility_judges_each_node_on_its_own() -> None:
    nodes = (NodeView("hdd", labels={"disk": "hdd"}), NodeView("a", labels={"disk": "ssd"}),
             NodeView("gone", ready=False), NodeView("b", labels={"disk": "ssd"}))
    assert [n.name for n in eligible_nodes(spec(nodeSelector={"disk": "ssd"}), nodes)] == ["a", "b"]
    assert [n.name for n in eligible_nodes(spec(nodes=["a", "b"]), nodes)] == ["a", "b"]
    assert [n.name for n in eligible_nodes(spec(), nodes)] == ["hdd", "a", "b"]


def test_too_few_nodes_lists_only_the_ready_schedulable_ones() -> None:
    nodes = (NodeView("n1"), NodeView("n2", schedulable=False), NodeView("n3", ready=False))
    assert choose_pair(spec(), nodes, {}) == (
        "need two eligible nodes, found 1 (n1) among ready nodes ['n1']; add or label nodes, or widen "
        "spec.nodes/nodeSelector"
    )


def test_a_node_is_looked_up_by_name() -> None:
    w = replicating()
    assert w.node("n2") == NodeView("n2")
    assert w.node("n9") is None


def test_the_status_shows_each_replica_as_its_agent_or_else_its_pod_reports_it() -> None:
    """A primary by its replication state, a secondary by its stage; without an agent answer,
    the pod's phase, NotReady for a running pod that is not ready."""
    p = plan(replicating())
    assert p.status.primary is not None and p.status.secondary is not None
    assert (p.status.primary.state, p.status.secondary.state) == ("primary/replicating", "secondary/running")
    for sec_pod, shown in [
        (pod("vol-1-b", "n2", "secondary", "10.0.0.2", ready=False), "NotReady"),
        (pod("vol-1-b", "n2", "secondary", "10.0.0.2", ready=False, phase="Pending"), "Pending"),
        (pod("vol-1-b", "n2", "secondary", "10.0.0.2"), "Running"),
    ]:
        w = replicating(agents={"vol-1-a": PRIMARY_AGENT, "vol-1-b": None},
                        pods={"vol-1-a": replicating().pods["vol-1-a"], "vol-1-b": sec_pod})
        secondary = plan(w).status.secondary
        assert secondary is not None and secondary.state == shown


def test_the_checkpoint_in_the_status_is_the_secondarys_in_api_spelling() -> None:
    def shown(cp: dict[str, Any]) -> Any:
        return plan(replicating(agents={"vol-1-a": PRIMARY_AGENT,
                                        "vol-1-b": replace(SECONDARY_AGENT, checkpoint=cp)})).status.checkpoint

    assert shown({"id": 5, "time": NOW, "durationMs": None}) == {"id": 5, "time": rfc3339(NOW), "durationMs": 0.0}
    assert shown({"id": 5, "time": "2026-01-01T00:00:00Z", "durationMs": 2}) == {
        "id": 5, "time": "2026-01-01T00:00:00Z", "durationMs": 2.0}
    # an agent that has no checkpoint (yet) does not erase the one on record
    assert shown({"id": None}) == replicating().status.checkpoint
# ------------------------------------------------------- what the user sees


def _scenarios() -> dict[str, World]:
    sc: dict[str, World] = {}
    sc["created"] = World("vol", "ns", 1, spec(), VolumeStatus(), NOW, nodes=NODES)
    sc["not_enough_nodes"] = World("vol", "ns", 1, spec(nodes=["n1", "n9"]), VolumeStatus(), NOW, nodes=NODES)
    sc["invalid_spec"] = World(
        "vol", "ns", 1, SpecError(["spec.size is required (e.g. size: 1Gi)"]), VolumeStatus(), NOW, nodes=NODES
    )
    w = _placed()
    st0 = w.status
    assert st0.primary is not None and st0.secondary is not None
    pods = {
        st0.primary.pod: pod(st0.primary.pod, "n1", "primary", "10.0.0.1"),
        st0.secondary.pod: pod(st0.secondary.pod, "n2", "secondary", "10.0.0.2"),
    }
    idle = AgentView("none", "none", 0)
    sc["bring_up_waiting"] = w
    sc["bring_up_secondary"] = replace(w, pods=pods, agents={n: idle for n in pods})
    sc["bring_up_primary"] = replace(
        w, pods=pods, agents={st0.primary.pod: idle, st0.secondary.pod: AgentView("secondary", "running", 2)}
    )
    sc["bring_up_pod_failed"] = replace(
        w,
        pods={
            **pods,
            st0.secondary.pod: pod(
                st0.secondary.pod, "n2", "secondary", "", phase="Failed", ready=False, reason="Error"
            ),
        },
    )
    sc["bring_up_node_down"] = replace(
        w, pods=pods, nodes=(NodeView("n1"), NodeView("n2", ready=False), NodeView("n3"))
    )
    sc["replicating"] = replicating()
    sec = replicating().status.secondary
    assert sec is not None
    sc["synced"] = replicating(
        status=replicating().status.with_(phase=Phase.SYNCING, secondary=replace(sec, out_of_sync=True))
    )
    sc["primary_dead"] = primary_dead()
    sc["primary_dead_manual_oos"] = primary_dead(
        lease=LeaseView("vol-1-a", 10, 3.0, out_of_sync_epoch=3), annotations={ANN_FAILOVER: "now"}
    )
    sc["oos_blocked"] = primary_dead(lease=LeaseView("vol-1-a", 10, 3.0, out_of_sync_epoch=3))
    sc["manual"] = replicating(annotations={ANN_FAILOVER: "now"})
    w = _in_flight()
    sc["failover_done"] = replace(
        w,
        agents={"vol-1-b": AgentView("primary", "done", 4, "degraded", serving=True)},
        pods={**w.pods, "vol-1-a": pod("vol-1-a", "n1", "primary", "10.0.0.1")},
    )
    sc["failover_target_died"] = replace(w, pods={}, agents={})
    sc["failover_failed"] = replace(
        w, agents={"vol-1-b": AgentView("secondary", "failover_failed", 4, error="commit failed")}
    )
    sc["not_serving"] = replace(
        w,
        agents={
            "vol-1-b": AgentView(
                "primary", "done", 4, "degraded", error="refusing to serve: lease held by vol-1-a", serving=False
            )
        },
    )
    sc["after_failover"] = _after_failover()
    sc["secondary_dead"] = replicating(
        pods={"vol-1-a": replicating().pods["vol-1-a"]}, suspect_since={"vol-1-b": NOW - 10}
    )
    sc["peer_dropped"] = replicating(
        agents={
            "vol-1-a": replace(PRIMARY_AGENT, replication_state="degraded", error="peer timed out"),
            "vol-1-b": SECONDARY_AGENT,
        }
    )
    sc["resync"] = replicating(
        agents={"vol-1-a": replace(PRIMARY_AGENT, replication_state="none", peer=None), "vol-1-b": SECONDARY_AGENT}
    )
    sc["oos_mark"] = replicating(lease=LeaseView("vol-1-a", 1, 3.0, out_of_sync_epoch=3))
    return sc


# scenario -> phase, status message, events (type, reason, message): kubectl get / describe
SEEN = [
    ("created", "Pending", "starting agents on n1 and n2", [("Normal", "Scheduled", "primary on n1, secondary on n2")]),
    (
        "not_enough_nodes",
        "Pending",
        "need two eligible nodes, found 1 (n1) among ready nodes ['n1', 'n2', 'n3'] "
        "with spec.nodes=['n1', 'n9']; add or label nodes, or widen spec.nodes/nodeSelector",
        [
            (
                "Warning",
                "NotEnoughNodes",
                "need two eligible nodes, found 1 (n1) among ready nodes ['n1', 'n2', 'n3'] "
                "with spec.nodes=['n1', 'n9']; add or label nodes, or widen spec.nodes/nodeSelector",
            )
        ],
    ),
    (
        "invalid_spec",
        "Failed",
        "invalid ReplicatedVolume: spec.size is required (e.g. size: 1Gi)",
        [("Warning", "InvalidSpec", "invalid ReplicatedVolume: spec.size is required (e.g. size: 1Gi)")],
    ),
    ("bring_up_waiting", "Pending", "waiting for both agents to become ready", []),
    ("bring_up_secondary", "Pending", "starting agents on n1 and n2", []),
    (
        "bring_up_primary",
        "Syncing",
        "full sync n1 -> n2",
        [("Normal", "PrimaryStarted", "vol-1-a on n1 is primary (epoch 2), full sync to vol-1-b on n2")],
    ),
    (
        "bring_up_pod_failed",
        "Pending",
        "secondary failed during bring-up: pod vol-1-b failed (Error)",
        [("Warning", "BringUpRestarted", "secondary failed during bring-up: pod vol-1-b failed (Error)")],
    ),
    (
        "bring_up_node_down",
        "Pending",
        "secondary failed during bring-up: node n2 is not ready",
        [("Warning", "BringUpRestarted", "secondary failed during bring-up: node n2 is not ready")],
    ),
    ("replicating", "Replicating", "n1 -> n2 in sync", []),
    (
        "synced",
        "Replicating",
        "n1 -> n2 in sync",
        [("Normal", "Replicating", "vol-1-b on n2 is in sync with vol-1-a on n1")],
    ),
    (
        "primary_dead",
        "FailingOver",
        "failing over to n2: pod vol-1-a is gone",
        [("Warning", "FailingOver", "promoting vol-1-b on n2 (epoch 4, mode Checkpoint): pod vol-1-a is gone")],
    ),
    (
        "primary_dead_manual_oos",
        "FailingOver",
        "failing over to n2: manual",
        [
            ("Warning", "OutOfSync", "primary dropped secondary vol-1-b at epoch 3; it needs a resync"),
            ("Normal", "FailingOver", "promoting vol-1-b on n2 (epoch 4, mode Checkpoint): manual"),
        ],
    ),
    (
        "oos_blocked",
        "Failed",
        "primary down (pod vol-1-a is gone); secondary vol-1-b is OutOfSync (it missed acknowledged "
        "writes) and is never promoted automatically; annotate pairvol.io/failover=now to accept the data loss; "
        "restarting primary vol-1-a on n1",
        [
            ("Warning", "OutOfSync", "primary dropped secondary vol-1-b at epoch 3; it needs a resync"),
            (
                "Warning",
                "FailoverBlocked",
                "primary down (pod vol-1-a is gone); secondary vol-1-b is OutOfSync (it missed acknowledged "
                "writes) and is never promoted automatically; annotate pairvol.io/failover=now to accept the data loss",
            ),
            ("Normal", "RestartingPrimary", "no failover possible: restarting vol-1-a on n1"),
        ],
    ),
    (
        "manual",
        "Replicating",
        "manual failover: stopping the primary",
        [("Normal", "ManualFailover", "stopping primary vol-1-a")],
    ),
    (
        "failover_done",
        "Degraded",
        "failed over to n2; re-protecting",
        [("Normal", "FailedOver", "vol-1-b on n2 is primary (epoch 4, Checkpoint, 500 ms); was vol-1-a on n1")],
    ),
    (
        "failover_target_died",
        "Failed",
        "failover target vol-1-b died during failover; no replica left to promote",
        [("Warning", "FailoverFailed", "failover target vol-1-b died during failover; no replica left to promote")],
    ),
    (
        "failover_failed",
        "Failed",
        "failover of vol-1-b failed: commit failed",
        [("Warning", "FailoverFailed", "failover of vol-1-b failed: commit failed")],
    ),
    (
        "not_serving",
        "FailingOver",
        "failing over to n2: vol-1-b is primary but not serving "
        "(refusing to serve: lease held by vol-1-a); asking it to serve (epoch 5)",
        [
            (
                "Warning",
                "NotServing",
                "failing over to n2: vol-1-b is primary but not serving "
                "(refusing to serve: lease held by vol-1-a); asking it to serve again",
            )
        ],
    ),
    (
        "after_failover",
        "Degraded",
        "re-protecting: new secondary on n1",
        [("Normal", "Reprotecting", "new secondary vol-5 on n1")],
    ),
    (
        "secondary_dead",
        "Degraded",
        "pod vol-1-b is gone",
        [("Warning", "SecondaryLost", "pod vol-1-b is gone; re-protecting")],
    ),
    (
        "peer_dropped",
        "Degraded",
        "primary dropped secondary vol-1-b: peer timed out",
        [("Warning", "SecondaryLost", "primary dropped secondary vol-1-b: peer timed out; re-protecting")],
    ),
    (
        "resync",
        "Syncing",
        "full sync n1 -> n2",
        [("Normal", "Resync", "full sync vol-1-a on n1 -> vol-1-b on n2 (epoch 4)")],
    ),
    (
        "oos_mark",
        "Degraded",
        "secondary vol-1-b is OutOfSync",
        [("Warning", "OutOfSync", "primary dropped secondary vol-1-b at epoch 3; it needs a resync")],
    ),
]


@pytest.mark.parametrize(("scenario", "phase", "message", "events"), SEEN, ids=[s[0] for s in SEEN])
def test_each_step_tells_the_user_the_phase_and_why_with_events(
    scenario: str, phase: str, message: str, events: list[tuple[str, str, str]]
) -> None:
    p = plan(_scenarios()[scenario])
    assert (p.status.phase.value, p.status.message) == (phase, message)
    assert [(a.type, a.reason, a.message) for a in p.actions if isinstance(a, Event)] == events


@pytest.mark.parametrize("scenario", [s[0] for s in SEEN])
def test_only_a_plan_that_changes_nothing_but_information_may_be_coalesced(scenario: str) -> None:
    """A plan with actions, or a new phase or epoch, is written at once: the epoch an action
    carries must be persisted before the action runs. Checked with the spec's generation
    already observed, so that the rule is not hidden by an acknowledgement that is news anyway."""
    w = _scenarios()[scenario]
    w = replace(w, status=w.status.with_(observed_generation=w.generation))
    p = plan(w)
    essential = bool(p.actions) or p.status.phase != w.status.phase or p.status.epoch != w.status.epoch
    assert p.cosmetic is not essential


@pytest.mark.parametrize("scenario", [s[0] for s in SEEN])
def test_the_ready_and_replicating_conditions_follow_the_phase(scenario: str) -> None:
    w = replace(_scenarios()[scenario], generation=7)
    st = plan(w).status
    serving = st.phase in (Phase.REPLICATING, Phase.DEGRADED, Phase.SYNCING)
    in_sync = st.phase == Phase.REPLICATING
    conds = {c.type: (c.status, c.reason, c.message, c.observed_generation) for c in st.conditions}
    assert conds == {
        "Ready": (str(serving), st.phase.value, st.message, 7),
        "Replicating": (str(in_sync), "InSync" if in_sync else "NotInSync",
                        "secondary is in sync" if in_sync else st.message, 7),
    }
    assert st.observed_generation == 7


def test_reprotection_starts_the_new_pair_with_ever_higher_epochs() -> None:
    """Failover left epoch 4; the new secondary is placed at 5, started at 6, and the primary
    re-paired with it at 7. A primary paired with another address is re-paired at a new epoch."""
    w = _after_failover()
    w = replace(w, status=plan(w).status, pods={**w.pods, "vol-5": pod("vol-5", "n1", "secondary", "10.0.0.9")},
                agents={**w.agents, "vol-5": AgentView("none", "none", 0)})
    assert w.status.epoch == 5
    p = plan(w)
    assert p.actions == (StartSecondary("vol-5", "10.0.0.9", 6),)
    assert (p.status.epoch, p.status.phase, p.status.message) == (6, Phase.DEGRADED, "starting secondary vol-5")
    busy = plan(replace(w, agent_call_in_flight=True))
    assert busy.actions == () and busy.status.epoch == 5
    assert (busy.status.phase, busy.status.message) == (Phase.DEGRADED,
                                                        "re-protecting with vol-5: waiting for an agent to answer")

    w = replace(w, status=p.status, agents={**w.agents, "vol-5": AgentView("secondary", "running", 6)})
    p = plan(w)
    assert p.actions[0] == StartPrimary(
        "vol-1-b", "10.0.0.2", 7, "10.0.0.9:7801", "full", peer_epoch=6, peer_api="10.0.0.9:7800",
    )
    assert (p.status.epoch, p.status.phase) == (7, Phase.SYNCING)

    pairing = AgentView("primary", "done", 7, "syncing", "10.0.0.9:7801", serving=True, link_export="replication-e6")
    w = replace(w, status=p.status, agents={"vol-1-b": pairing, "vol-5": AgentView("secondary", "running", 6)})
    assert plan(w).actions == () and plan(w).status.epoch == 7
    elsewhere = replace(pairing, peer="10.0.0.8:7801")
    p = plan(replace(w, agents={"vol-1-b": elsewhere, "vol-5": AgentView("secondary", "running", 6)}))
    assert p.actions[0] == StartPrimary(
        "vol-1-b", "10.0.0.2", 8, "10.0.0.9:7801", "full", peer_epoch=6, peer_api="10.0.0.9:7800",
    )


def test_bring_up_records_both_replicas_with_their_pod_addresses_and_the_secondary_out_of_sync() -> None:
    p = plan(_scenarios()["bring_up_primary"])
    assert p.status.primary == Replica("n1", "vol-1-a", "none/none", "10.0.0.1")
    assert p.status.secondary == Replica("n2", "vol-1-b", "secondary/running", "10.0.0.2", out_of_sync=True)


def test_bring_up_waits_until_both_pods_are_ready_not_just_one() -> None:
    w = _scenarios()["bring_up_primary"]
    for name in w.pods:
        p = plan(replace(w, pods={**w.pods, name: replace(w.pods[name], ready=False)}))
        assert (p.actions, p.status.message) == ((), "waiting for both agents to become ready")


@pytest.mark.parametrize("broken", ["bring_up_pod_failed", "bring_up_node_down"])
def test_a_broken_bring_up_deletes_the_pods_that_exist_and_starts_over(broken: str) -> None:
    w = _scenarios()[broken]
    p = plan(w)
    assert [a.pod for a in p.actions if isinstance(a, DeletePod)] == ["vol-1-a", "vol-1-b"]
    assert (p.status.primary, p.status.secondary) == (None, None)
    only_secondary = replace(w, pods={"vol-1-b": w.pods["vol-1-b"]})
    assert [a.pod for a in plan(only_secondary).actions if isinstance(a, DeletePod)] == ["vol-1-b"]


def test_a_bring_up_pod_that_ended_without_an_error_is_replaced_too() -> None:
    """A failed liveness probe stops the agent, which exits 0: with restartPolicy Never the
    pod is Succeeded. It will never be ready; waiting for it would wait for ever."""
    w = _scenarios()["bring_up_pod_failed"]
    ended = {name: replace(p, phase="Succeeded", reason="Completed, exit code 0") if p.phase == "Failed" else p
             for name, p in w.pods.items()}  # fmt: skip
    p = plan(replace(w, pods=ended))
    assert [a.pod for a in p.actions if isinstance(a, DeletePod)] == ["vol-1-a", "vol-1-b"]
    assert (p.status.primary, p.status.secondary) == (None, None)
    assert "ended (Completed, exit code 0)" in p.status.message


def test_placement_records_both_replicas_and_keeps_the_cleanup_of_stray_pods() -> None:
    w = World("vol", "ns", 1, spec(), VolumeStatus(), NOW, nodes=NODES,
              pods={"vol-9-a": pod("vol-9-a", "n3", "primary", "10.0.0.9")})
    p = plan(w)
    assert p.actions[0] == DeletePod("vol-9-a", "no longer a replica of this volume")
    assert p.actions[1:3] == (CreatePod("vol-1-a", "n1", "primary"), CreatePod("vol-1-b", "n2", "secondary"))
    assert p.status.primary == Replica("n1", "vol-1-a", "Placed")
    assert p.status.secondary == Replica("n2", "vol-1-b", "Placed", out_of_sync=True)


def test_reprotection_prefers_the_node_the_failover_left_even_when_another_ranks_first() -> None:
    left_n3 = Failover(rfc3339(NOW - 1), "n3", "n2", "Checkpoint", "x", 100.0)
    p = plan(_after_failover(status=replace(_after_failover().status, last_failover=left_n3)))
    assert p.actions[0] == CreatePod("vol-5", "n3", "secondary")
    assert p.status.secondary == Replica("n3", "vol-5", "Placed", out_of_sync=True)
    assert (p.status.phase, p.status.message) == (Phase.DEGRADED, "re-protecting: new secondary on n3")


def test_no_node_for_a_new_secondary_says_what_to_do() -> None:
    p = plan(_after_failover(nodes=(NodeView("n1", ready=False), NodeView("n2"))))
    assert p.actions == ()
    assert (p.status.phase, p.status.message) == (
        Phase.DEGRADED, "no eligible node for a new secondary; add a ready node matching spec.nodes/nodeSelector")
    old = pod("vol-1-a", "n1", "primary", "10.0.0.1", deleting=True)
    p = plan(_after_failover(nodes=(NodeView("n1"), NodeView("n2")),
                             pods={"vol-1-b": pod("vol-1-b", "n2", "primary", "10.0.0.2"), "vol-1-a": old}))
    assert (p.status.phase, p.status.message) == (
        Phase.DEGRADED, "no eligible node for a new secondary (waiting for old pods on n1 to go away)")


def test_a_suspect_primary_keeps_a_replicating_volume_replicating_and_degrades_any_other() -> None:
    w = replicating(pods={"vol-1-a": pod("vol-1-a", "n1", "primary", "10.0.0.1", ready=False),
                          "vol-1-b": replicating().pods["vol-1-b"]})
    p = plan(w)
    assert (p.actions, p.status.phase, p.status.message) == ((), Phase.REPLICATING,
                                                             "primary suspect: pod vol-1-a not ready")
    assert not p.cosmetic  # the user sees the suspicion at once
    p = plan(replace(w, status=w.status.with_(phase=Phase.SYNCING)))
    assert (p.status.phase, p.status.message) == (Phase.DEGRADED, "primary suspect: pod vol-1-a not ready")


def test_failover_starts_once_the_primary_is_down_for_exactly_the_grace_period() -> None:
    p = plan(primary_dead(suspect_since={"vol-1-a": NOW - 2.9}))
    assert (p.actions, p.status.message) == ((), "primary down (pod vol-1-a is gone); grace period running")
    assert not p.cosmetic  # the user sees at once that the grace period runs
    p = plan(primary_dead(suspect_since={"vol-1-a": NOW - 3.0}))
    assert p.actions[0] == DoFailover("vol-1-b", "10.0.0.2", 4, "checkpoint")
    assert p.status.last_failover == Failover(rfc3339(NOW), "n1", "n2", "Checkpoint", "pod vol-1-a is gone")


def test_a_blocked_failover_is_announced_once_and_waiting_for_the_lease_is_not_a_failure() -> None:
    # (the primary's node is down too, so nothing can be restarted either)
    w = primary_dead(lease=LeaseView("vol-1-a", 10, 3.0, out_of_sync_epoch=3),
                     nodes=(NodeView("n1", ready=False), NodeView("n2"), NodeView("n3")))
    p = plan(w)
    assert [a.reason for a in p.actions if isinstance(a, Event)] == ["OutOfSync", "FailoverBlocked"]
    assert p.status.message.endswith("; restarting primary vol-1-a once node n1 is Ready")
    again = plan(replace(w, status=p.status))
    assert again.actions == () and again.status.phase == Phase.FAILED
    p = plan(primary_dead(lease=LeaseView("vol-1-a", 1, 3.0)))
    assert (p.actions, p.status.phase) == ((), Phase.DEGRADED)
    assert p.status.message == ("primary down (pod vol-1-a is gone); waiting for lease held by vol-1-a to expire "
                                "(unchanged for 1.0s; 3.0s to go)")


def test_a_completed_failover_records_the_new_primary_its_endpoint_and_the_duration_to_a_tenth_of_a_ms() -> None:
    w = _in_flight()
    promoted = AgentView("primary", "done", 4, "degraded", serving=True)
    w = replace(w, now=NOW + 0.25678, agents={"vol-1-b": promoted}, annotations={ANN_FAILOVER: "now"},
                pods={**w.pods, "vol-1-a": pod("vol-1-a", "n1", "primary", "10.0.0.1")})
    p = plan(w)
    # what no later tick repeats comes first; the label and the old pod follow (every tick plans them)
    assert p.actions[0] == ClearAnnotation(ANN_FAILOVER)
    assert [type(a).__name__ for a in p.actions[1:3]] == ["Event", "FailoverDone"]
    assert p.actions[3:5] == (SetRole("vol-1-b", "primary"), DeletePod("vol-1-a", "demoted by failover"))
    assert p.status.primary == Replica("n2", "vol-1-b", "primary/degraded", "10.0.0.2")
    assert p.status.endpoint == {"node": "n2", "socket": "/var/lib/pairvol/ns/vol/export.sock",
                                 "service": "vol.ns.svc", "port": 7802, "exportName": "volume"}
    assert p.status.sync is None
    assert p.status.last_failover is not None and p.status.last_failover.duration_ms == 256.8


def test_a_failover_that_cannot_finish_says_why() -> None:
    w = _in_flight()
    p = plan(replace(w, status=w.status.with_(secondary=None)))
    assert (p.status.phase, p.status.message) == (Phase.FAILED,
                                                  "failover target vanished from status; manual repair needed")
    p = plan(replace(w, agents={"vol-1-b": AgentView("secondary", "failover_failed", 4)}))
    assert p.status.message == "failover of vol-1-b failed: see agent log"
    ended = pod("vol-1-b", "n2", "secondary", "10.0.0.2", phase="Succeeded", ready=False)
    p = plan(replace(w, pods={"vol-1-b": ended}, agents={}))
    assert p.status.message == "failover target vol-1-b died during failover; no replica left to promote"
    # a target without an address yet is not called again until it has one
    p = plan(replace(w, pods={"vol-1-b": pod("vol-1-b", "n2", "secondary", "")}))
    assert (p.actions, p.status.message) == ((), "failing over to n2")


def test_a_target_that_does_not_serve_is_asked_again_only_when_it_can_be() -> None:
    w = _in_flight()
    stuck = AgentView("primary", "done", 4, "degraded", serving=False)
    p = plan(replace(w, agents={"vol-1-b": stuck}, pods={}))
    assert (p.actions, p.status.message) == ((), "failing over to n2: vol-1-b is primary but not serving")
    p = plan(replace(w, agents={"vol-1-b": stuck}, agent_call_in_flight=True))
    assert p.actions == ()
    assert p.status.message == "failing over to n2: vol-1-b is primary but not serving; waiting for the agent to answer"


def test_an_agent_call_in_flight_holds_back_only_a_new_role_call() -> None:
    """In sync: carry on. Primary unpaired, or paired with another address: the re-pairing
    waits for the answer."""
    p = plan(replicating(agent_call_in_flight=True))
    assert (p.actions, p.status.message) == ((), "n1 -> n2 in sync")
    for pa in (replace(PRIMARY_AGENT, replication_state="none"), replace(PRIMARY_AGENT, peer="10.0.0.7:7801")):
        p = plan(replicating(agent_call_in_flight=True, agents={"vol-1-a": pa, "vol-1-b": SECONDARY_AGENT}))
        assert p.actions == ()
        assert (p.status.phase, p.status.message) == (
            Phase.DEGRADED, "re-protecting with vol-1-b: waiting for an agent to answer")


def test_an_in_sync_secondary_not_ready_past_the_grace_is_dropped_a_starting_one_is_awaited() -> None:
    unready = pod("vol-1-b", "n2", "secondary", "10.0.0.2", ready=False)
    w = replicating(pods={"vol-1-a": replicating().pods["vol-1-a"], "vol-1-b": unready},
                    suspect_since={"vol-1-b": NOW - 10})
    p = plan(w)
    assert p.actions[0] == DeletePod("vol-1-b", "pod vol-1-b not ready for 10.0s")
    assert (p.status.phase, p.status.secondary) == (Phase.DEGRADED, None)
    sec = w.status.secondary
    assert sec is not None
    p = plan(replace(w, status=w.status.with_(secondary=replace(sec, out_of_sync=True))))
    assert (p.actions, p.status.message) == ((), "waiting for secondary vol-1-b to be ready")


def test_a_primary_pod_not_ready_past_the_grace_is_failed_over() -> None:
    w = replicating(pods={"vol-1-a": pod("vol-1-a", "n1", "primary", "10.0.0.1", ready=False),
                          "vol-1-b": replicating().pods["vol-1-b"]},
                    suspect_since={"vol-1-a": NOW - 10}, lease=LeaseView("vol-1-a", 10, 3.0))
    p = plan(w)
    assert p.actions[0] == DoFailover("vol-1-b", "10.0.0.2", 4, "checkpoint")
    assert p.status.message == "failing over to n2: pod vol-1-a not ready for 10.0s"


def test_a_primary_whose_agent_lost_its_role_is_down() -> None:
    w = replicating(agents={"vol-1-a": AgentView("none", "none", 0), "vol-1-b": SECONDARY_AGENT},
                    suspect_since={"vol-1-a": NOW - 10})
    p = plan(w)
    assert p.status.message.startswith("primary down (agent of vol-1-a is none, not primary); waiting for lease")


@pytest.mark.parametrize(("unwell", "why"), [
    ({"pods": {"vol-1-b": pod("vol-1-b", "n2", "secondary", "10.0.0.2", deleting=True)}},
     "pod vol-1-b is being deleted"),
    ({"pods": {"vol-1-b": pod("vol-1-b", "n2", "secondary", "10.0.0.2", phase="Failed")}},
     "pod vol-1-b has terminated (phase Failed)"),
    ({"nodes": (NodeView("n1"), NodeView("n3"))}, "node n2 of pod vol-1-b no longer exists"),
    ({"nodes": (NodeView("n1"), NodeView("n2", ready=False))}, "node n2 is NotReady"),
])
def test_a_secondary_whose_pod_or_node_is_gone_is_dropped_at_once(unwell: dict[str, Any], why: str) -> None:
    if "pods" in unwell:
        unwell = {"pods": {"vol-1-a": replicating().pods["vol-1-a"], **unwell["pods"]}}
    w = replicating(**unwell)
    w = replace(w, status=w.status.with_(sync={"progress": 0.5, "doneBytes": 1, "totalBytes": 2}))
    p = plan(w)
    assert [(a.reason, a.message) for a in p.actions if isinstance(a, Event)] == [
        ("SecondaryLost", f"{why}; re-protecting")]
    assert (p.status.secondary, p.status.sync, p.status.message) == (None, None, why)


def test_fixing_an_invalid_spec_resumes_where_the_volume_was_as_pending() -> None:
    sc = _scenarios()
    for name, in_flight in (("created", False), ("not_enough_nodes", False), ("bring_up_waiting", False),
                            ("bring_up_secondary", False), ("bring_up_secondary", True)):
        w = sc[name]
        p = plan(replace(w, status=w.status.with_(phase=Phase.FAILED, message="invalid"),
                         agent_call_in_flight=in_flight))
        assert p.status.phase == Phase.PENDING, name
    w = sc["bring_up_secondary"]
    p = plan(replace(w, status=w.status.with_(phase=Phase.FAILED, message="invalid"), agent_call_in_flight=True))
    assert p.status.message == "waiting for an agent to answer"


def test_an_invalid_spec_is_announced_even_on_a_volume_that_had_failed_for_another_reason() -> None:
    w = replicating(spec=SpecError(["spec.size is required (e.g. size: 1Gi)"]))
    w = replace(w, status=w.status.with_(phase=Phase.FAILED, message="failover of vol-1-b failed: x"))
    assert [a.reason for a in plan(w).actions if isinstance(a, Event)] == ["InvalidSpec"]


def test_bring_up_creates_a_missing_pod_in_its_role_and_shows_it_gone() -> None:
    w = _scenarios()["bring_up_secondary"]
    p = plan(replace(w, pods={"vol-1-b": w.pods["vol-1-b"]}, agents={"vol-1-b": AgentView("none", "none", 0)}))
    assert p.actions == (CreatePod("vol-1-a", "n1", "primary"),)
    assert p.status.primary == Replica("n1", "vol-1-a", "Gone")


def test_a_pod_that_failed_without_a_reason_is_named_alone() -> None:
    w = _scenarios()["bring_up_pod_failed"]
    p = plan(replace(w, pods={**w.pods, "vol-1-b": replace(w.pods["vol-1-b"], reason="")}))
    assert p.status.message == "secondary failed during bring-up: pod vol-1-b failed"


def test_no_eligible_node_at_all_names_every_constraint() -> None:
    assert choose_pair(spec(nodes=["n8", "n9"], nodeSelector={"a": "b"}), NODES, {}) == (
        "need two eligible nodes, found 0 (none) among ready nodes ['n1', 'n2', 'n3'] with "
        "spec.nodes=['n8', 'n9'] and nodeSelector={'a': 'b'}; add or label nodes, or widen spec.nodes/nodeSelector")


def test_waiting_for_old_pods_lists_every_node() -> None:
    nodes = (NodeView("n1"), NodeView("n2"), NodeView("n3"))
    p = plan(_after_failover(nodes=nodes, pods={
        "vol-1-b": pod("vol-1-b", "n2", "primary", "10.0.0.2"),
        "vol-1-a": pod("vol-1-a", "n1", "primary", "10.0.0.1", deleting=True),
        "vol-0-b": pod("vol-0-b", "n3", "secondary", "10.0.0.3", deleting=True)}))
    assert p.status.message == "no eligible node for a new secondary (waiting for old pods on n1, n3 to go away)"


def test_sync_progress_is_reported_to_four_decimal_places_and_may_be_coalesced() -> None:
    for done, shown in ((None, {"progress": 0.0, "doneBytes": 0, "totalBytes": 3}),
                        (1, {"progress": 0.3333, "doneBytes": 1, "totalBytes": 3})):
        syncing = replace(PRIMARY_AGENT, replication_state="syncing", sync_done=done, sync_total=3)
        w = replicating(agents={"vol-1-a": syncing, "vol-1-b": SECONDARY_AGENT})
        # the sync already shown (its start announced): only the numbers move
        w = replace(w, status=w.status.with_(phase=Phase.SYNCING, sync={"kind": "full", "totalBytes": 3}))
        p = plan(w)
        assert p.status.sync is not None
        got = {k: p.status.sync[k] for k in shown}
        assert (p.status.phase, p.status.message, got) == (Phase.SYNCING, "full sync n1 -> n2", shown)
        assert p.actions == () and p.cosmetic


def test_back_in_sync_the_status_drops_the_progress_and_shows_the_primary_as_it_is_now() -> None:
    w = replicating()
    w = replace(w, status=w.status.with_(phase=Phase.SYNCING, sync={"progress": 0.9, "doneBytes": 9, "totalBytes": 10}),
                pods={**w.pods, "vol-1-a": pod("vol-1-a", "n1", "primary", "10.0.0.11")})
    p = plan(w)
    assert (p.status.phase, p.status.sync) == (Phase.REPLICATING, None)
    assert p.status.primary == Replica("n1", "vol-1-a", "primary/replicating", "10.0.0.11")
    assert p.status.endpoint == {"node": "n1", "socket": "/var/lib/pairvol/ns/vol/export.sock",
                                 "service": "vol.ns.svc", "port": 7802, "exportName": "volume"}


@pytest.mark.parametrize(("interval", "due"), [(1, True), (2, True), (3, False)])
def test_a_checkpoint_is_due_once_the_interval_has_passed_to_the_second(interval: int, due: bool) -> None:
    """The last checkpoint was cut 2 s ago."""
    p = plan(replicating(spec=spec(checkpoint={"intervalSeconds": interval})))
    assert (Checkpoint("vol-1-b", "10.0.0.2") in p.actions) is due


def test_a_primary_that_dropped_an_out_of_sync_secondary_is_re_paired_after_the_call_in_flight() -> None:
    degraded = replace(PRIMARY_AGENT, replication_state="degraded")
    w = replicating(agent_call_in_flight=True, agents={"vol-1-a": degraded, "vol-1-b": SECONDARY_AGENT})
    sec = w.status.secondary
    assert sec is not None
    w = replace(w, status=w.status.with_(secondary=replace(sec, out_of_sync=True)))
    assert plan(w).actions == ()
    assert StartPrimary("vol-1-a", "10.0.0.1", 4, "10.0.0.2:7801", "full", 2, peer_api="10.0.0.2:7800") in plan(
        replace(w, agent_call_in_flight=False)).actions


def test_a_primary_that_reports_no_replication_with_the_right_peer_is_re_paired() -> None:
    p = plan(replicating(agents={"vol-1-a": replace(PRIMARY_AGENT, replication_state="none"),
                                 "vol-1-b": SECONDARY_AGENT}))
    assert p.actions[0] == StartPrimary("vol-1-a", "10.0.0.1", 4, "10.0.0.2:7801", "full", 2, peer_api="10.0.0.2:7800")


def test_an_in_sync_volume_degrades_while_its_secondary_does_not_answer_or_lost_its_role() -> None:
    p = plan(replicating(agents={"vol-1-a": PRIMARY_AGENT, "vol-1-b": None}))
    assert (p.status.phase, p.status.message) == (Phase.DEGRADED, "waiting for secondary vol-1-b to be ready")
    p = plan(replicating(agents={"vol-1-a": PRIMARY_AGENT, "vol-1-b": AgentView("none", "none", 0)}))
    assert p.actions == (StartSecondary("vol-1-b", "10.0.0.2", 4),)
    assert (p.status.phase, p.status.message) == (Phase.DEGRADED, "starting secondary vol-1-b")


def test_every_failover_blocker_is_spelled_out() -> None:
    w = primary_dead()
    p = plan(replace(w, status=w.status.with_(secondary=None), pods={}, agents={}))
    restarting = "; restarting primary vol-1-a on n1"
    assert p.status.message == (
        "primary down (pod vol-1-a is gone); there is no secondary to fail over to" + restarting)
    p = plan(primary_dead(spec=spec(failover={"automatic": False})))
    assert p.status.message == ("primary down (pod vol-1-a is gone); spec.failover.automatic is false; "
                                "annotate pairvol.io/failover=now to fail over" + restarting)
    p = plan(primary_dead(pods={"vol-1-b": pod("vol-1-b", "n2", "secondary", "10.0.0.2", ready=False)}))
    assert p.status.message == (
        "primary down (pod vol-1-a is gone); secondary is unhealthy: pod vol-1-b not ready" + restarting)
    # H8: a partial copy is named as such, with what happens instead of a failover
    sec = w.status.secondary
    assert sec is not None
    p = plan(replace(w, status=w.status.with_(secondary=replace(sec, synced=False))))
    assert p.status.message == (
        "primary down (pod vol-1-a is gone); secondary vol-1-b never finished its full sync: its disk is a "
        "partial copy, a state the volume never had, and is not promoted even by hand. The primary is restarted "
        "on its node once that node is Ready; the volume resumes from the primary's data" + restarting)
    p = plan(primary_dead(lease=LeaseView("vol-1-a", 10, 3.0, resync_epoch=3)))
    assert p.status.message == (
        "primary down (pod vol-1-a is gone); the primary was resyncing secondary vol-1-b on its own (epoch 3): its "
        "disk is a partial copy, a state the volume never had, and is not promoted even by hand. The primary is "
        "restarted on its node once that node is Ready; the volume resumes from the primary's data" + restarting)


def test_the_failed_over_event_gives_the_duration_in_milliseconds_and_the_progress_is_dropped() -> None:
    w = _in_flight()
    w = replace(w, now=NOW + 2.0, agents={"vol-1-b": AgentView("primary", "done", 4, "degraded", serving=True)},
                status=w.status.with_(sync={"progress": 0.5, "doneBytes": 1, "totalBytes": 2}))
    p = plan(w)
    assert [a.message for a in p.actions if isinstance(a, Event)] == [
        "vol-1-b on n2 is primary (epoch 4, Checkpoint, 2000 ms); was vol-1-a on n1"]
    assert p.status.sync is None


@pytest.mark.parametrize("target", [pod("vol-1-b", "n2", "primary", "10.0.0.2", deleting=True),
                                    pod("vol-1-b", "n2", "primary", ""),
                                    pod("vol-1-b", "n2", "primary", "10.0.0.2", phase="Pending")])
def test_a_target_that_does_not_serve_is_not_asked_again_while_its_pod_cannot_answer(target: PodView) -> None:
    w = _in_flight()
    stuck = AgentView("primary", "done", 4, "degraded", serving=False)
    p = plan(replace(w, agents={"vol-1-b": stuck}, pods={"vol-1-b": target}))
    assert not any(isinstance(a, StartPrimary) for a in p.actions)


def test_a_failed_volume_whose_primary_serves_again_is_re_protected_as_degraded() -> None:
    failed = _after_failover().status.with_(phase=Phase.FAILED, message="failover of vol-1-b failed: x")
    p = plan(_after_failover(status=failed))
    assert (p.status.phase, p.status.message) == (Phase.DEGRADED, "re-protecting: new secondary on n1")
    p = plan(_after_failover(status=failed, nodes=(NodeView("n1", ready=False), NodeView("n2"))))
    assert p.status.phase == Phase.DEGRADED


def test_a_primary_that_dropped_its_peer_without_saying_why_is_reported_as_a_peer_failure() -> None:
    dropped = replace(PRIMARY_AGENT, replication_state="degraded", error=None)
    p = plan(replicating(agents={"vol-1-a": dropped, "vol-1-b": SECONDARY_AGENT}))
    assert p.status.message == "primary dropped secondary vol-1-b: peer failed"


# ------------------------------------------- no failover possible: the primary comes back


def _half_copied(**kw: Any) -> World:
    """The primary is down and the secondary never finished its full sync: nothing may be
    promoted (H8), so only the primary itself can serve the volume again."""
    w = primary_dead(**kw)
    sec = w.status.secondary
    assert sec is not None
    return replace(w, status=w.status.with_(secondary=replace(sec, synced=False, out_of_sync=True)))


RESTORED = AgentView("primary", "done", 3)  # restored from the node's disk: serves nothing yet


@pytest.mark.parametrize(("phase", "what"), [("Succeeded", "ended"), ("Failed", "failed")])
def test_a_primary_pod_that_ended_while_no_failover_is_possible_is_replaced_on_its_node(phase: str, what: str) -> None:
    ended = pod("vol-1-a", "n1", "primary", "", phase=phase, ready=False)
    p = plan(_half_copied(pods={**primary_dead().pods, "vol-1-a": ended}))
    assert DeletePod("vol-1-a", f"primary {what} while no failover is possible; restarting it on n1") in p.actions
    assert p.status.phase == Phase.FAILED and p.status.epoch == 3
    assert p.status.message.endswith(f"; primary pod vol-1-a {what}; replacing it on n1")

    p = plan(_half_copied())  # the pod is gone: the same pod (name, node, so data dir) again
    assert CreatePod("vol-1-a", "n1", "primary") in p.actions
    assert not any(isinstance(a, (StartPrimary, DoFailover)) for a in p.actions)


def test_a_restored_primary_serves_again_alone_with_a_new_epoch_once_its_lease_is_over() -> None:
    back = pod("vol-1-a", "n1", "primary", "10.0.0.9")
    w = _half_copied(pods={**primary_dead().pods, "vol-1-a": back},
                     agents={"vol-1-a": RESTORED, "vol-1-b": SECONDARY_AGENT})
    p = plan(w)
    assert StartPrimary("vol-1-a", "10.0.0.9", 4, None, "none") in p.actions
    assert p.status.epoch == 4 and p.status.phase == Phase.DEGRADED
    assert p.status.message == "primary vol-1-a serves again on n1 (epoch 4); re-protecting"
    sec = p.status.secondary
    assert sec is not None and sec.out_of_sync, "the writes it now acknowledges alone are not on the secondary"
    assert ("Warning", "PrimaryRestarted") in [(e.type, e.reason) for e in p.actions if isinstance(e, Event)]

    # a secondary that was in sync (the failover was blocked for another reason) is marked too
    unready = pod("vol-1-b", "n2", "secondary", "10.0.0.2", ready=False)
    p_in_sync = plan(replace(w, status=primary_dead().status, pods={"vol-1-a": back, "vol-1-b": unready}))
    assert StartPrimary("vol-1-a", "10.0.0.9", 4, None, "none") in p_in_sync.actions
    sec = p_in_sync.status.secondary
    assert sec is not None and sec.out_of_sync

    # once it serves (and holds its Lease again), the ordinary re-protection takes over
    serving = replace(RESTORED, epoch=4, serving=True)
    again = plan(replace(w, status=p.status, agents={"vol-1-a": serving, "vol-1-b": SECONDARY_AGENT},
                         lease=LeaseView("vol-1-a", 0.5, 3.0), suspect_since={}))
    starts = [a for a in again.actions if isinstance(a, StartPrimary)]
    assert starts and starts[0].peer == "10.0.0.2:7801" and starts[0].epoch == 5


def test_a_primary_whose_local_disk_failed_a_write_is_not_restarted_the_secondary_is_waited_for() -> None:
    """H13: the write its disk failed was acknowledged because the secondary took it. With
    the secondary briefly unready, H9 would otherwise serve the primary's disk again alone
    and mark the secondary, the one copy that has the write, OutOfSync."""
    back = pod("vol-1-a", "n1", "primary", "10.0.0.9")
    failed = replace(RESTORED, local_failure="local disk failed a write: Input/output error")
    unready = pod("vol-1-b", "n2", "secondary", "10.0.0.2", ready=False)
    w = primary_dead(pods={"vol-1-a": back, "vol-1-b": unready},
                     agents={"vol-1-a": failed, "vol-1-b": SECONDARY_AGENT})
    p = plan(w)
    assert not any(isinstance(a, (StartPrimary, DoFailover, DeletePod)) for a in p.actions)
    assert p.status.epoch == w.status.epoch
    sec = p.status.secondary
    assert sec is not None and not sec.out_of_sync, "the secondary holds the write: it must stay promotable"
    assert p.status.message.endswith(
        "primary vol-1-a is not restarted: its local disk failed a request that only the secondary served "
        "(local disk failed a write: Input/output error); the volume waits for the secondary to be promotable"
    )
    # once the secondary is ready again, it is the one promoted
    ready = replace(w, pods={"vol-1-a": back, "vol-1-b": pod("vol-1-b", "n2", "secondary", "10.0.0.2")})
    assert any(isinstance(a, DoFailover) for a in plan(ready).actions)


@pytest.mark.parametrize(
    ("change", "waits_for"),
    [
        ({"agents": {"vol-1-a": AgentView("none", "none", 0), "vol-1-b": SECONDARY_AGENT}},
         "; agent of vol-1-a has no primary role on record (none): its data dir is not the volume's; restore it, "
         "or accept a failover by hand"),
        ({"agent_call_in_flight": True}, "; waiting for an agent to answer"),
        ({"nodes": (NodeView("n1", ready=False), NodeView("n2"), NodeView("n3"))}, "once node n1 is Ready"),
        ({"pods": {"vol-1-b": primary_dead().pods["vol-1-b"],
                   "vol-1-a": pod("vol-1-a", "n1", "primary", "10.0.0.9", ready=False)}},
         "waiting for primary vol-1-a on n1 to be ready"),
    ],
    ids=["wiped-data-dir", "call-in-flight", "node-not-ready", "pod-not-ready"],
)
def test_a_primary_is_not_asked_to_serve_again_while_anything_could_still_be_wrong(
    change: dict[str, Any], waits_for: str
) -> None:
    w = _half_copied(pods={**primary_dead().pods, "vol-1-a": pod("vol-1-a", "n1", "primary", "10.0.0.9")},
                     agents={"vol-1-a": RESTORED, "vol-1-b": SECONDARY_AGENT})
    p = plan(replace(w, **change))
    assert not any(isinstance(a, (StartPrimary, DoFailover, CreatePod, DeletePod)) for a in p.actions)
    assert p.status.epoch == 3 and p.status.message.endswith(waits_for)


def test_a_restored_primary_is_never_given_an_epoch_while_a_lease_is_live() -> None:
    """H9's last guard, asked directly: plan() reaches the restart only once it judged the
    primary's Lease expired or released, so a live Lease (held by anyone) must still stop it
    here, should a later change reach this step another way."""
    w = _half_copied(pods={**primary_dead().pods, "vol-1-a": pod("vol-1-a", "n1", "primary", "10.0.0.9")},
                     agents={"vol-1-a": RESTORED, "vol-1-b": SECONDARY_AGENT})
    for holder in ("vol-1-a", "vol-9"):
        live = replace(w, lease=LeaseView(holder, 1.0, 3.0))
        p = decisions._restart_primary_in_place(live, live.status.with_(message="primary down"), [])
        assert not any(isinstance(a, StartPrimary) for a in p.actions)
        assert p.status.epoch == 3
        assert p.status.message == f"primary down; waiting for the lease held by {holder} to expire before vol-1-a " \
                                   "serves again"
    over = replace(w, lease=LeaseView("vol-1-a", 10.0, 3.0))
    p = decisions._restart_primary_in_place(over, over.status, [])
    assert StartPrimary("vol-1-a", "10.0.0.9", 4, None, "none") in p.actions


def test_a_manual_failover_that_could_promote_nothing_is_refused_before_the_primary_is_stopped() -> None:
    w = replicating(annotations={ANN_FAILOVER: "now"})
    sec = w.status.secondary
    assert sec is not None
    p = plan(replace(w, status=w.status.with_(secondary=replace(sec, synced=False))))
    assert not any(isinstance(a, DeletePod) for a in p.actions)
    assert ClearAnnotation(ANN_FAILOVER) in p.actions
    blocked = [(e.type, e.message) for e in p.actions if isinstance(e, Event) and e.reason == "FailoverBlocked"]
    assert blocked and blocked[0][0] == "Warning"
    assert blocked[0][1].startswith("manual failover refused: secondary vol-1-b never finished")


# ------------------------------------------------------------------ a bring-up whose start was lost (H12)

def _activated_but_never_started(**agent: Any) -> World:
    """The bring-up sent StartPrimary at epoch 3 (persisted first: activated, Syncing); the
    operator stopped before the call reached the primary's agent."""
    w = _placed_and_running()
    st0 = w.status
    assert st0.primary is not None and st0.secondary is not None
    sec = AgentView("secondary", "running", 2)
    w = replace(w, agents={st0.primary.pod: IDLE_AGENT, st0.secondary.pod: sec})
    w = replace(w, status=plan(replace(w, status=w.status.with_(epoch=2))).status)
    assert w.status.activated and w.status.epoch == 3 and w.status.phase == Phase.SYNCING
    assert w.status.primary is not None
    return replace(w, agents={**w.agents, w.status.primary.pod: replace(IDLE_AGENT, **agent)})


def test_a_bring_up_whose_start_never_reached_the_primary_goes_on_at_a_new_epoch() -> None:
    w = _activated_but_never_started()
    p = plan(w)
    starts = [a for a in p.actions if isinstance(a, StartPrimary)]
    assert [(a.epoch, a.sync) for a in starts] == [(4, "full")]
    assert p.status.epoch == 4 and p.status.activated and p.status.phase == Phase.SYNCING
    resumed = [a for a in p.actions if isinstance(a, Event) and a.reason == "BringUpResumed"]
    assert len(resumed) == 1 and "never reached its agent" in resumed[0].message


@pytest.mark.parametrize(
    ("why", "change"),
    [
        ("the agent has an epoch: the start arrived", {"agents": {"epoch": 3}}),
        ("the agent is carrying out a command", {"agents": {"busy": True}}),
        ("a Lease exists: a primary took it", {"lease": LeaseView("vol-1-a", 1, 3.0)}),
        ("this operator's call is on its way", {"agent_call_in_flight": True}),
        ("the secondary was in sync once", {"synced": True}),
    ],
)
def test_a_bring_up_is_resumed_only_when_the_primary_provably_served_nothing(
    why: str, change: dict[str, Any]
) -> None:
    w = _activated_but_never_started(**change.get("agents", {}))
    if "lease" in change:
        w = replace(w, lease=change["lease"])
    if "agent_call_in_flight" in change:
        w = replace(w, agent_call_in_flight=True)
    if "synced" in change:
        assert w.status.secondary is not None
        w = replace(w, status=w.status.with_(secondary=replace(w.status.secondary, synced=True)))
    p = plan(w)
    assert not [a for a in p.actions if isinstance(a, StartPrimary)], why
    assert not [a for a in p.actions if isinstance(a, Event) and a.reason == "BringUpResumed"], why
    assert p.status.activated, why


# ------------------------------------------- re-protection while other volumes fail over (H20)

HELD = "re-protection waits while other volumes fail over (at most 30 s); next: "


def _secondary_lost(**kw: Any) -> World:
    """The dead secondary already dropped (SecondaryLost): primary vol-1-a serves alone."""
    w = replicating(pods={"vol-1-a": pod("vol-1-a", "n1", "primary", "10.0.0.1")}, agents={"vol-1-a": PRIMARY_AGENT})
    return replace(w, **{"status": plan(w).status, **kw})


def _creates(p: Any) -> list[CreatePod]:
    return [a for a in p.actions if isinstance(a, CreatePod)]


def test_a_dead_secondary_is_dropped_at_once_while_other_volumes_fail_over() -> None:
    w = replicating(pods={"vol-1-a": pod("vol-1-a", "n1", "primary", "10.0.0.1")}, agents={"vol-1-a": PRIMARY_AGENT})
    held, free = plan(replace(w, failovers_elsewhere=5)), plan(w)
    assert held == free  # the drop records what is true: only the placement after it waits
    assert held.status.secondary is None and not held.reprotect_held


def test_the_replacement_of_a_dead_secondary_waits_while_another_volume_fails_over() -> None:
    p = plan(_secondary_lost(failovers_elsewhere=2))
    assert _creates(p) == [] and p.reprotect_held and not p.failing_over
    assert (p.status.phase, p.status.message) == (Phase.DEGRADED, HELD + "a new secondary")
    assert p.status.epoch == 3 and p.status.secondary is None  # no epoch handed out, nothing placed
    # once none does, it is placed
    p = plan(_secondary_lost(failovers_elsewhere=0))
    assert _creates(p) == [CreatePod("vol-4", "n2", "secondary")] and not p.reprotect_held


def test_the_replacement_waits_at_most_the_cap_even_while_a_failover_elsewhere_goes_on() -> None:
    assert plan(_secondary_lost(failovers_elsewhere=1, reprotect_held_since=NOW - 29.9)).reprotect_held
    p = plan(_secondary_lost(failovers_elsewhere=1, reprotect_held_since=NOW - 30))
    assert _creates(p) == [CreatePod("vol-4", "n2", "secondary")] and not p.reprotect_held
    # the cap is a setting; 0 turns the wait off
    w = _secondary_lost(failovers_elsewhere=1)
    assert _creates(plan(replace(w, settings=replace(w.settings, reprotect_hold_max_s=0.0))))
    short = replace(w, settings=replace(w.settings, reprotect_hold_max_s=5.0), reprotect_held_since=NOW - 5)
    assert _creates(plan(short))


def test_the_wait_is_remembered_from_its_first_plan_until_no_failover_goes_on_or_the_pair_is_in_sync() -> None:
    w = _secondary_lost(failovers_elsewhere=1)
    p = plan(w)
    assert decisions.next_reprotect_held_since(w, p) == NOW  # the first plan that holds
    later = replace(w, now=NOW + 10, reprotect_held_since=NOW)
    assert decisions.next_reprotect_held_since(later, plan(later)) == NOW  # kept, not restarted
    past_cap = replace(w, now=NOW + 31, reprotect_held_since=NOW)
    p = plan(past_cap)
    assert not p.reprotect_held and _creates(p)
    # kept past the cap while failovers go on: every later step of this re-protection goes on too
    assert decisions.next_reprotect_held_since(past_cap, p) == NOW
    after = replace(past_cap, status=p.status, now=NOW + 32, reprotect_held_since=NOW)
    assert not plan(after).reprotect_held
    # forgotten once no failover goes on, or once the pair is in sync again
    none_left = replace(past_cap, failovers_elsewhere=0)
    assert decisions.next_reprotect_held_since(none_left, plan(none_left)) is None
    in_sync = replicating(failovers_elsewhere=1, reprotect_held_since=NOW)
    assert decisions.next_reprotect_held_since(in_sync, plan(in_sync)) is None


def test_a_volume_that_failed_over_re_protects_only_once_the_other_failovers_are_done() -> None:
    p = plan(_after_failover(failovers_elsewhere=3))
    assert _creates(p) == [] and p.status.message == HELD + "a new secondary"
    assert p.status.primary is not None and p.status.primary.pod == "vol-1-b"  # it serves as before
    assert CreatePod("vol-5", "n1", "secondary") in plan(_after_failover()).actions


def test_every_step_that_starts_re_protection_waits_for_an_out_of_sync_secondary() -> None:
    placed = plan(_secondary_lost()).status  # vol-4 on n2, OutOfSync, its pod created by that plan
    base = _secondary_lost(status=placed)
    # its pod runs, its agent has no role yet: not started
    running = replace(base, pods={**base.pods, "vol-4": pod("vol-4", "n2", "secondary", "10.0.0.4")},
                      agents={**base.agents, "vol-4": AgentView("none", "none", 0)})
    p = plan(replace(running, failovers_elsewhere=1))
    assert p.actions == () and p.status.message == HELD + "starting secondary vol-4"
    assert p.status.epoch == placed.epoch
    assert plan(running).actions == (StartSecondary("vol-4", "10.0.0.4", placed.epoch + 1),)
    # a secondary: the primary's start that syncs to it
    started = replace(running, agents={**running.agents, "vol-4": AgentView("secondary", "running", placed.epoch + 1)},
                      status=placed.with_(epoch=placed.epoch + 1))
    p = plan(replace(started, failovers_elsewhere=1))
    assert p.actions == () and p.status.message == HELD + "the resync to vol-4"
    assert p.status.phase == Phase.DEGRADED and p.status.epoch == placed.epoch + 1
    assert [type(a) for a in plan(started).actions if not isinstance(a, Event)] == [StartPrimary]


def test_a_secondary_in_sync_in_status_is_not_held_so_the_hold_never_keeps_it_promotable() -> None:
    """A step for a secondary the status holds in sync marks it OutOfSync before its call:
    holding the step would keep it recorded as promotable, so it is never held."""
    lost_role = replicating(agents={"vol-1-a": PRIMARY_AGENT, "vol-1-b": AgentView("none", "none", 0)},
                            failovers_elsewhere=4)
    p = plan(lost_role)
    assert p.actions == (StartSecondary("vol-1-b", "10.0.0.2", 4),) and not p.reprotect_held
    not_replicating = replicating(agents={"vol-1-a": replace(PRIMARY_AGENT, replication_state="none"),
                                          "vol-1-b": SECONDARY_AGENT}, failovers_elsewhere=4)
    p = plan(not_replicating)
    assert isinstance(p.actions[0], StartPrimary) and not p.reprotect_held


def test_a_volume_that_must_fail_over_itself_is_never_held() -> None:
    p = plan(primary_dead(failovers_elsewhere=9))
    assert p.actions[0] == DoFailover("vol-1-b", "10.0.0.2", 4, "checkpoint")
    assert p.failing_over and not p.reprotect_held
    # and the failover runs to its end: retried, then done
    in_flight = replace(_in_flight(), failovers_elsewhere=9)
    assert plan(in_flight).actions == (DoFailover("vol-1-b", "10.0.0.2", 4, "checkpoint"),)
    promoted = AgentView("primary", "done", 4, "degraded", serving=True)
    done = plan(replace(in_flight, agents={"vol-1-b": promoted}))
    assert any(isinstance(a, FailoverDone) for a in done.actions) and not done.failing_over


def test_a_restart_in_place_is_never_held() -> None:
    # H10: a primary that lost only its Lease serves again on its node
    fenced = replace(PRIMARY_AGENT, serving=False, fenced_by="lease")
    w = replicating(agents={"vol-1-a": fenced, "vol-1-b": SECONDARY_AGENT}, lease=LeaseView("vol-1-a", 4.5, 3.0),
                    suspect_since={"vol-1-a": NOW - 4}, failovers_elsewhere=9)
    p = plan(w)
    assert StartPrimary("vol-1-a", "10.0.0.1", 4, None, "none") in p.actions
    assert not p.reprotect_held and not p.failing_over
    # H9: no replica may be promoted, the primary's pod is created again on its node
    dead = primary_dead(failovers_elsewhere=9)
    sec = dead.status.secondary
    assert sec is not None
    p = plan(replace(dead, status=dead.status.with_(secondary=replace(sec, out_of_sync=True))))
    assert CreatePod("vol-1-a", "n1", "primary") in p.actions and not p.reprotect_held and not p.failing_over


def test_a_volume_counts_as_failing_over_from_the_moment_only_time_stands_before_its_promotion() -> None:
    """What other volumes' re-protection waits for (``Plan.failing_over``)."""
    gone = {"vol-1-b": replicating().pods["vol-1-b"]}
    agents = {"vol-1-b": SECONDARY_AGENT}
    suspect = replicating(pods=gone, agents=agents)  # not yet judged dead (no suspect_since: now)
    grace = replicating(pods=gone, agents=agents, suspect_since={"vol-1-a": NOW - 1}, lease=LeaseView(None, 0, 3.0))
    lease = replicating(pods=gone, agents=agents, suspect_since={"vol-1-a": NOW - 10})
    assert "grace period running" in plan(grace).status.message
    assert "waiting for lease" in plan(lease).status.message
    for w in (suspect, grace, lease, primary_dead(), _in_flight(), replicating(annotations={ANN_FAILOVER: "now"})):
        assert plan(w).failing_over, w.status.message
    # nothing to promote, a healthy pair, a failover recorded as done or failed: not failing over
    sec = lease.status.secondary
    assert sec is not None
    blocked = replace(lease, status=lease.status.with_(secondary=replace(sec, out_of_sync=True)))
    failed = replace(_in_flight(), agents={"vol-1-b": AgentView("secondary", "failover_failed", 4, error="x")})
    for w in (blocked, replicating(), _after_failover(), failed, _secondary_lost()):
        assert not plan(w).failing_over, w.status.message
