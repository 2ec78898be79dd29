"""A pair is recognised by the incarnations it links, not by addresses (docs/correctness.md H14).

The operator's decisions as a specification, one observation of the world per test: a
secondary is in sync only once the primary's link names *that* secondary's incarnation (the
export carries the epoch it was started at); the primary's marks on the Lease count from
its own epoch, whatever the volume's epoch is by then.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from tests.unit.test_operator_decisions import NOW, PRIMARY_AGENT, SECONDARY_AGENT, pod, primary_dead, replicating

from pairvol.api.status import Phase, Replica
from pairvol.operator.decisions import (
    AgentView,
    ClearAnnotation,
    CreatePod,
    DeletePod,
    DoFailover,
    Event,
    LeaseView,
    Plan,
    StartPrimary,
    StartSecondary,
    World,
    lease_needs_fresh_read,
    linked_to,
    plan,
)
from pairvol.qemu.recipes import identity_export_name, replication_export_name


def failed_over(p: Plan) -> bool:
    return any(isinstance(a, DoFailover) for a in p.actions)


def in_sync(p: Plan) -> bool:
    sec = p.status.secondary
    return sec is not None and sec.synced and not sec.out_of_sync


# ------------------------------------------------ the link names the secondary's incarnation


def replaced_secondary(**kw: Any) -> World:
    """Secondary vol-1-b (epoch 2) died while the volume was idle: primary vol-1-a (epoch 3)
    noticed nothing and still reports replicating to 10.0.0.2:7801 over its link to
    ``replication-e2``. The operator placed vol-5 on the same node (epoch 5), which got the
    same address, and started it as secondary at epoch 6: its disk is blank."""
    status = replace(
        replicating().status,
        phase=Phase.DEGRADED,
        epoch=6,
        secondary=Replica("n2", "vol-5", "secondary/running", "10.0.0.2", out_of_sync=True, synced=False),
    )
    base: dict[str, Any] = dict(
        status=status,
        pods={
            "vol-1-a": pod("vol-1-a", "n1", "primary", "10.0.0.1"),
            "vol-5": pod("vol-5", "n2", "secondary", "10.0.0.2"),
        },
        agents={"vol-1-a": PRIMARY_AGENT, "vol-5": AgentView("secondary", "running", 6, disk_id="blank")},
    )
    base.update(kw)
    return replicating(**base)


def test_a_blank_secondary_on_the_address_of_the_one_before_is_paired_not_taken_for_in_sync() -> None:
    w = replaced_secondary()
    p = plan(w)
    assert not in_sync(p), "the primary's link goes to the dead incarnation: vol-5 holds nothing"
    assert p.status.phase != Phase.REPLICATING
    assert not any(isinstance(a, Event) and a.reason == "Replicating" for a in p.actions)
    # it is paired: the primary links to vol-5's own export (epoch 6) and copies what differs
    assert StartPrimary(
        "vol-1-a", "10.0.0.1", 7, "10.0.0.2:7801", "auto", 6, "blank", "10.0.0.2:7800"
    ) in p.actions
    assert p.status.epoch == 7 and p.status.secondary is not None and not p.status.secondary.synced
    # the primary dies right then: the blank disk is never promoted, not even by hand
    dead = replace(w, status=p.status, pods={"vol-5": w.pods["vol-5"]}, agents={"vol-5": w.agents["vol-5"]},
                   lease=LeaseView("vol-1-a", 10, 3.0), suspect_since={"vol-1-a": NOW - 10},
                   annotations={"pairvol.io/failover": "now"})
    assert not failed_over(plan(dead))


def test_the_pair_is_in_sync_once_the_link_names_the_new_incarnation() -> None:
    w = replaced_secondary()
    w = replace(w, status=plan(w).status)  # the re-pair at epoch 7, persisted
    for export in (replication_export_name(6), identity_export_name(6, "blank")):
        paired = replace(PRIMARY_AGENT, epoch=7, link_export=export)
        p = plan(replace(w, agents={**w.agents, "vol-1-a": paired}))
        assert in_sync(p), export
        assert p.status.phase == Phase.REPLICATING
        assert not any(isinstance(a, StartPrimary | StartSecondary) for a in p.actions)


def test_a_primary_that_reports_no_link_is_not_linked() -> None:
    # what it reports without one is no evidence: it is paired again (the safe direction)
    p = plan(replaced_secondary(agents={"vol-1-a": replace(PRIMARY_AGENT, epoch=7, link_export=None),
                                        "vol-5": AgentView("secondary", "running", 6)}))
    assert not in_sync(p)
    assert any(isinstance(a, StartPrimary) and a.peer_epoch == 6 for a in p.actions)


def test_an_export_of_another_epoch_with_the_same_digits_in_front_is_not_this_incarnation() -> None:
    sec = AgentView("secondary", "running", 1)
    assert linked_to(replace(PRIMARY_AGENT, link_export="replication-e1"), sec)
    assert linked_to(replace(PRIMARY_AGENT, link_export="replication-e1-d1234"), sec)
    assert not linked_to(replace(PRIMARY_AGENT, link_export="replication-e12"), sec)
    assert not linked_to(replace(PRIMARY_AGENT, link_export="replication-e12-d1234"), sec)
    # a replica that is no secondary has no incarnation a link could go to
    assert not linked_to(replace(PRIMARY_AGENT, link_export="replication-e1"), replace(sec, role="none"))


def test_the_agent_view_reads_the_export_of_the_primarys_link() -> None:
    link = {"export": "replication-e6", "pid": 42, "failed": None, "heldRequests": 0}
    status = {"role": "primary", "epoch": 7, "replication": {"state": "replicating", "link": link}}
    assert AgentView.from_status(status).link_export == "replication-e6"
    assert AgentView.from_status({"role": "primary", "replication": {"link": None}}).link_export is None


def test_a_secondary_started_anew_is_out_of_sync_until_the_primary_links_to_it() -> None:
    # vol-1-b was in sync; its agent now has no role on record (a wiped data dir: a blank
    # disk). Starting it makes a new incarnation the primary's link does not reach.
    w = replicating(agents={"vol-1-a": PRIMARY_AGENT, "vol-1-b": AgentView("none", "none", 0)})
    p = plan(w)
    assert p.actions == (StartSecondary("vol-1-b", "10.0.0.2", 4),)
    assert p.status.secondary is not None and p.status.secondary.out_of_sync and not p.status.secondary.synced
    # the primary dies before it is re-paired: the blank disk is not promoted
    dead = replace(w, status=p.status, pods={"vol-1-b": w.pods["vol-1-b"]},
                   agents={"vol-1-b": AgentView("secondary", "running", 4)},
                   lease=LeaseView("vol-1-a", 10, 3.0), suspect_since={"vol-1-a": NOW - 10})
    assert not failed_over(plan(dead))


# ------------------------------------------------ the primary's marks count from its own epoch


def test_a_mark_the_primary_wrote_at_its_epoch_counts_when_the_volumes_epoch_is_newer() -> None:
    """The re-pair at epoch 4 has not reached the primary (still at 3, still linked to the
    secondary); its Lease, read after its status, says it dropped the peer at epoch 3 and
    acknowledged writes without it. The secondary is not in sync."""
    sec = replicating().status.secondary
    assert sec is not None
    status = replace(replicating().status, epoch=4, phase=Phase.SYNCING,
                     secondary=replace(sec, out_of_sync=True, synced=False))
    w = replicating(status=status, lease=LeaseView("vol-1-a", 1, 3.0, out_of_sync_epoch=3),
                    agent_call_in_flight=True)
    p = plan(w)
    assert not in_sync(p)
    # a mark from before the primary's own epoch (an earlier pairing) is history
    p = plan(replace(w, lease=LeaseView("vol-1-a", 1, 3.0, out_of_sync_epoch=2)))
    assert in_sync(p)


def test_a_resync_mark_at_the_primarys_epoch_leaves_the_secondary_unsynced_in_status() -> None:
    # the primary (epoch 3) rewrites its peer on its own; the volume's epoch is 4
    status = replace(replicating().status, epoch=4)
    syncing = replace(PRIMARY_AGENT, replication_state="syncing", sync_total=1 << 20, sync_kind="bitmap")
    p = plan(replicating(status=status, lease=LeaseView("vol-1-a", 1, 3.0, resync_epoch=3),
                         agents={"vol-1-a": syncing, "vol-1-b": SECONDARY_AGENT}))
    assert p.status.secondary is not None and not p.status.secondary.synced


# ------------------------------------------------ a failover whose target may have served (H15)


def target_lost(lease: LeaseView | None, **kw: Any) -> World:
    """vol-1-a (n1, epoch 3) was failed over to vol-1-b (n2) at epoch 4; the status says
    FailingOver and vol-1-b's pod is gone; vol-1-a's pod still runs, fenced, at epoch 3."""
    w = primary_dead()
    w = replace(w, status=plan(w).status, now=NOW + 0.5)
    assert w.status.phase == Phase.FAILING_OVER and w.status.epoch == 4
    base: dict[str, Any] = dict(
        pods={"vol-1-a": pod("vol-1-a", "n1", "primary", "10.0.0.1")},
        agents={"vol-1-a": replace(PRIMARY_AGENT, serving=False, fenced_by="lease", link_export=None,
                                   replication_state="none")},
        lease=lease,
    )
    base.update(kw)
    return replace(w, **base)


def serves_or_restarts(p: Plan, pod_name: str) -> bool:
    return any(
        isinstance(a, StartPrimary | StartSecondary | CreatePod) and a.pod == pod_name
        for a in p.actions
    )


def test_a_target_that_took_the_lease_and_died_never_sends_the_volume_back_to_the_old_primary() -> None:
    # vol-1-b held the Lease (it served, for all the operator knows), then its pod went
    w = target_lost(LeaseView("vol-1-b", 10, 3.0))
    p = plan(w)
    assert p.status.phase == Phase.FAILED
    assert "vol-1-b may have served writes that vol-1-a on n1 lacks" in p.status.message
    assert "Bring node n2 back" in p.status.message
    assert [a.reason for a in p.actions if isinstance(a, Event)] == ["FailoverTargetLost"]
    # its node is Ready: the same pod there brings its agent, and its disk, back
    assert CreatePod("vol-1-b", "n2", "secondary") in p.actions
    # the ticks after: vol-1-a's agent (epoch 3) is neither asked to serve nor judged healthy
    for tick in range(3):
        w = replace(w, status=p.status, pods={**w.pods, "vol-1-b": pod("vol-1-b", "n2", "secondary", "", ready=False)})
        p = plan(w)
        assert p.status.phase == Phase.FAILED, tick
        assert not serves_or_restarts(p, "vol-1-a") and not any(isinstance(a, DeletePod) for a in p.actions)
        assert p.status.endpoint == w.status.endpoint and p.status.secondary == w.status.secondary
        assert not any(isinstance(a, Event) for a in p.actions), "announced once"
    # vol-1-a's pod gone as well: it is not restarted in place either
    p = plan(replace(w, pods={}, agents={}))
    assert not serves_or_restarts(p, "vol-1-a") and p.status.phase == Phase.FAILED


def test_a_lease_released_or_unknown_is_no_proof_that_the_target_never_served() -> None:
    # a manual failover: the old primary released its Lease when it stopped; the target may
    # have taken it, served and released it again
    for lease in (LeaseView(None, 10, 3.0), None):
        p = plan(target_lost(lease))
        assert p.status.phase == Phase.FAILED and "may have served" in p.status.message
        assert p.status.secondary is not None and p.status.secondary.pod == "vol-1-b"
    # a pod still being deleted may still run its agent, which may still take the Lease
    gone = pod("vol-1-b", "n2", "secondary", "10.0.0.2", deleting=True)
    w = target_lost(LeaseView("vol-1-a", 10, 3.0), pods={"vol-1-b": gone})
    assert "may have served" in plan(w).status.message


def test_the_target_coming_back_finishes_the_failover() -> None:
    w = target_lost(LeaseView("vol-1-b", 10, 3.0))
    w = replace(w, status=plan(w).status)
    back = pod("vol-1-b", "n2", "secondary", "10.0.0.7")
    restored = AgentView("primary", "done", 4, "none")  # its role from its disk, serving nothing yet
    p = plan(replace(w, pods={**w.pods, "vol-1-b": back}, agents={**w.agents, "vol-1-b": restored}))
    assert StartPrimary("vol-1-b", "10.0.0.7", 5, None, "none") in p.actions
    assert p.status.phase == Phase.FAILING_OVER and p.status.epoch == 5
    serving = replace(restored, epoch=5, serving=True)
    p = plan(replace(w, status=p.status, pods={**w.pods, "vol-1-b": back}, agents={"vol-1-b": serving}))
    assert p.status.primary is not None and p.status.primary.pod == "vol-1-b"
    assert any(isinstance(a, Event) and a.reason == "FailedOver" for a in p.actions)
    assert DeletePod("vol-1-a", "demoted by failover") in p.actions


def test_a_target_that_provably_never_served_gives_the_volume_back_to_the_old_primary() -> None:
    # its pod is gone and the Lease is still the old primary's: it never took the Lease
    w = target_lost(LeaseView("vol-1-a", 10, 3.0))
    assert lease_needs_fresh_read(w), "a cached Lease may lag the target's takeover"
    assert not lease_needs_fresh_read(replace(w, lease=LeaseView("vol-1-b", 10, 3.0)))
    p = plan(w)
    assert p.status.phase == Phase.FAILED and "died during failover" in p.status.message
    assert p.status.secondary is None and p.status.last_failover is None, "settled"
    # from there on the old primary is the volume's primary as before (H9, H10)
    p = plan(replace(w, status=p.status))
    assert any(isinstance(a, StartPrimary) and a.pod == "vol-1-a" for a in p.actions)
    # its agent says it never took the primary role (its pod came back on its node)
    w = target_lost(LeaseView("vol-1-b", 10, 3.0))
    w = replace(w, status=plan(w).status)
    w = replace(w, pods={**w.pods, "vol-1-b": pod("vol-1-b", "n2", "secondary", "10.0.0.7")},
                agents={**w.agents, "vol-1-b": AgentView("secondary", "failover", 4)})
    p = plan(w)
    assert p.status.secondary is None and p.status.last_failover is None
    assert "did not finish" in p.status.message


# ------------------------------------------------ a manual failover that was not carried out


RESTORED = AgentView("primary", "done", 3)  # restored from its node's disk: serves nothing yet


def manual_blocked(**kw: Any) -> World:
    """pairvol.io/failover=now on a volume in sync; the operator stopped vol-1-a (its pod
    is back on n1, its agent restored, its Lease released); vol-1-b's node went NotReady:
    the failover is blocked, and vol-1-a is restarted in place instead."""
    w = primary_dead()
    base: dict[str, Any] = dict(
        annotations={"pairvol.io/failover": "now"},
        nodes=(w.nodes[0], replace(w.nodes[1], ready=False), w.nodes[2]),
        pods={**w.pods, "vol-1-a": pod("vol-1-a", "n1", "primary", "10.0.0.1")},
        agents={"vol-1-a": RESTORED, "vol-1-b": None},
        lease=LeaseView(None, 10, 3.0),
    )
    base.update(kw)
    return replace(w, **base)


def test_a_manual_failover_blocked_after_the_primary_stopped_is_consumed_by_the_restart_in_place() -> None:
    w = manual_blocked()
    p = plan(w)
    start = StartPrimary("vol-1-a", "10.0.0.1", 4, None, "none")
    assert start in p.actions and not failed_over(p)
    # consumed before the call: an action that fails stops the ones after it
    assert ClearAnnotation("pairvol.io/failover") in p.actions
    assert p.actions.index(ClearAnnotation("pairvol.io/failover")) < p.actions.index(start)
    told = [a.message for a in p.actions if isinstance(a, Event) and a.reason == "ManualFailoverNotDone"]
    assert len(told) == 1 and "was not carried out" in told[0] and "secondary is unhealthy" in told[0]
    assert p.status.secondary is not None and p.status.secondary.out_of_sync
    # the secondary comes back; the request is gone: the primary serving alone is kept
    serving = replace(RESTORED, epoch=4, serving=True, replication_state="none")
    later = replace(w, status=p.status, annotations={}, nodes=primary_dead().nodes,
                    pods={**w.pods, "vol-1-b": primary_dead().pods["vol-1-b"]},
                    agents={"vol-1-a": serving, "vol-1-b": SECONDARY_AGENT}, lease=LeaseView("vol-1-a", 1, 3.0))
    p = plan(later)
    assert not any(isinstance(a, DeletePod) and a.pod == "vol-1-a" for a in p.actions) and not failed_over(p)


def test_a_restart_in_place_without_a_manual_request_clears_nothing() -> None:
    p = plan(manual_blocked(annotations={}))
    assert any(isinstance(a, StartPrimary) for a in p.actions)
    assert not any(isinstance(a, ClearAnnotation) for a in p.actions)
    assert "ManualFailoverNotDone" not in [a.reason for a in p.actions if isinstance(a, Event)]


def test_a_resync_mark_seen_when_the_primary_is_restarted_keeps_the_secondary_unsynced_after() -> None:
    """The primary (epoch 3) was resyncing vol-1-b on its own when it went down: the restart
    in place at epoch 4 must not make that half copy promotable again, even by hand."""
    w = manual_blocked(annotations={}, lease=LeaseView(None, 10, 3.0, out_of_sync_epoch=3, resync_epoch=3))
    p = plan(w)
    assert any(isinstance(a, StartPrimary) and a.epoch == 4 for a in p.actions)
    assert p.status.secondary is not None and not p.status.secondary.synced
    # epoch 4: the primary down again, vol-1-b back, a new manual request: refused (H8)
    again = primary_dead(status=p.status, annotations={"pairvol.io/failover": "now"},
                         lease=LeaseView("vol-1-a", 10, 3.0, out_of_sync_epoch=3, resync_epoch=3))
    p = plan(again)
    assert not failed_over(p) and "never finished its full sync" in p.status.message
