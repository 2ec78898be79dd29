"""A primary that lost nothing but its Lease serves again in place, once; anything else fails over.

The operator's decision (``decisions.fit_to_restart_in_place``) as a specification: which
primaries are asked to serve again on their own node and disk with a new epoch, and which are
failed over as before. No process, no API server: one observation of the world per test.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from tests.unit.test_operator_decisions import NOW, PRIMARY_AGENT, SECONDARY_AGENT, pod, replicating

from pairvol.api.status import Failover, Phase, Restart, VolumeStatus, rfc3339
from pairvol.operator.decisions import (
    ANN_FAILOVER,
    DeletePod,
    DoFailover,
    Event,
    LeaseView,
    NodeView,
    Plan,
    RestartedInPlace,
    StartPrimary,
    World,
    fit_to_restart_in_place,
    plan,
    primary_not_serving,
    unhealthy_pods,
)

# the primary's own agent says: fenced because its Lease was lost; daemon and disk fine
FENCED_BY_LEASE = replace(PRIMARY_AGENT, serving=False, fenced_by="lease")


def lease_lost(**kw: Any) -> World:
    """Primary vol-1-a (n1, epoch 3) answers its agent API, pod Running and ready, node Ready;
    its Lease unchanged for longer than duration + margin, past the grace period."""
    base: dict[str, Any] = dict(
        agents={"vol-1-a": FENCED_BY_LEASE, "vol-1-b": SECONDARY_AGENT},
        lease=LeaseView("vol-1-a", 4.5, 3.0),
        suspect_since={"vol-1-a": NOW - 4},
    )
    base.update(kw)
    return replicating(**base)


def restarted_in_place(p: Plan) -> StartPrimary | None:
    starts = [a for a in p.actions if isinstance(a, StartPrimary)]
    return starts[0] if starts else None


def failed_over(p: Plan) -> bool:
    return any(isinstance(a, DoFailover) for a in p.actions)


def test_a_primary_fenced_only_by_its_lease_serves_again_in_place_with_a_new_epoch() -> None:
    p = plan(lease_lost())
    start = restarted_in_place(p)
    assert start is not None and not failed_over(p)
    # the same pod, on its own node and disk, alone first (the secondary re-pairs after)
    assert (start.pod, start.epoch, start.peer, start.sync) == ("vol-1-a", 4, None, "none")
    assert p.status.epoch == 4 and p.status.primary is not None and p.status.primary.pod == "vol-1-a"
    assert p.status.last_failover is None, "no failover happened"
    # the secondary misses what the primary acknowledges alone: never promoted until resynced
    assert p.status.secondary is not None and p.status.secondary.out_of_sync
    assert p.status.last_restart == Restart(
        rfc3339(NOW), "vol-1-a", "n1", 4, "primary vol-1-a lost its lease", secondary="vol-1-b", secondary_in_sync=True
    )
    assert p.status.phase == Phase.DEGRADED
    events = [(e.type, e.reason) for e in p.actions if isinstance(e, Event)]
    assert ("Warning", "PrimaryRestarted") in events
    assert not any(isinstance(a, DeletePod) for a in p.actions), "the primary's pod is kept"
    assert RestartedInPlace("lease-lost") in p.actions  # pairvol_operator_primary_restarts_total


@pytest.mark.parametrize(
    ("agent", "why"),
    [
        (replace(FENCED_BY_LEASE, fenced_by="data-path"), "stopped by data-path"),
        (replace(FENCED_BY_LEASE, fenced_by="local-disk"), "stopped by local-disk"),
        (replace(FENCED_BY_LEASE, fenced_by="shutdown"), "stopped by shutdown"),
        (replace(FENCED_BY_LEASE, fenced_by=None), "something other than its Lease"),
        (replace(FENCED_BY_LEASE, local_failure="local disk failed a write: EIO"), "local disk failed"),
        (replace(FENCED_BY_LEASE, daemon_alive=False), "qemu-storage-daemon is not running"),
        (replace(FENCED_BY_LEASE, serving=True), "still says it serves"),
        (replace(FENCED_BY_LEASE, epoch=2), "not the primary of epoch 3"),
        (replace(FENCED_BY_LEASE, role="secondary"), "not the primary of epoch 3"),
        (None, "does not answer"),
    ],
    ids=["data-path", "local-disk", "shutdown", "unknown", "disk-failed", "daemon-dead", "serving",
         "older-epoch", "not-primary", "unreachable"],
)
def test_a_primary_with_anything_else_wrong_is_failed_over(agent: Any, why: str) -> None:
    w = lease_lost(agents={"vol-1-a": agent, "vol-1-b": SECONDARY_AGENT})
    reason = fit_to_restart_in_place(w, w.status)
    assert reason is not None and why in reason
    p = plan(w)
    assert failed_over(p) and restarted_in_place(p) is None
    assert p.status.last_restart is None


def test_a_primary_on_a_node_that_is_not_ready_is_failed_over() -> None:
    w = lease_lost(nodes=(NodeView("n1", ready=False), NodeView("n2"), NodeView("n3")))
    assert "not Ready" in (fit_to_restart_in_place(w, w.status) or "")
    assert failed_over(plan(w))


def test_a_primary_whose_pod_is_going_away_is_not_restarted_in_place() -> None:
    w = lease_lost()
    w = replace(w, pods={**w.pods, "vol-1-a": pod("vol-1-a", "n1", "primary", "10.0.0.1", deleting=True)})
    assert "not running and ready" in (fit_to_restart_in_place(w, w.status) or "")
    assert restarted_in_place(plan(w)) is None


def test_a_lease_that_has_not_expired_yet_is_waited_for() -> None:
    p = plan(lease_lost(lease=LeaseView("vol-1-a", 3.9, 3.0)))  # duration 3 + margin 1 not yet over
    assert restarted_in_place(p) is None and not failed_over(p)


def test_a_second_loss_within_the_window_fails_over() -> None:
    # restarted in place 20 s ago at epoch 4, and lost its Lease again: whatever keeps it
    # from renewing did not pass
    w = lease_lost()
    status = replace(w.status, epoch=4, last_restart=Restart(rfc3339(NOW - 20), "vol-1-a", "n1", 4, "lost its lease"))
    w = replace(w, status=status, agents={"vol-1-a": replace(FENCED_BY_LEASE, epoch=4), "vol-1-b": SECONDARY_AGENT})
    assert "restarted in place 20s ago" in (fit_to_restart_in_place(w, w.status) or "")
    p = plan(w)
    assert failed_over(p) and p.status.last_failover is not None
    assert p.status.last_restart == status.last_restart, "the record of the restart is kept"


def test_a_loss_after_the_window_restarts_in_place_again() -> None:
    w = lease_lost()
    old = Restart(rfc3339(NOW - 61), "vol-1-a", "n1", 3, "lost its lease")
    w = replace(w, status=replace(w.status, last_restart=old))
    start = restarted_in_place(plan(w))
    assert start is not None and start.epoch == 4


def test_a_restart_of_another_pod_does_not_count() -> None:
    w = lease_lost()
    w = replace(w, status=replace(w.status, last_restart=Restart(rfc3339(NOW - 5), "vol-0-a", "n3", 2, "x")))
    assert fit_to_restart_in_place(w, w.status) is None
    assert restarted_in_place(plan(w)) is not None


def test_a_window_of_zero_turns_the_restart_in_place_off() -> None:
    w = lease_lost()
    w = replace(w, settings=replace(w.settings, restart_in_place_window_s=0.0))
    assert "turned off" in (fit_to_restart_in_place(w, w.status) or "")
    assert failed_over(plan(w))


def test_a_manual_failover_is_never_turned_into_a_restart() -> None:
    p = plan(lease_lost(annotations={ANN_FAILOVER: "now"}))
    assert failed_over(p) and restarted_in_place(p) is None


def test_a_primary_that_lost_its_lease_is_restarted_even_when_the_secondary_could_not_be_promoted() -> None:
    # unchanged behaviour: with the failover blocked the primary was restarted in place before
    w = lease_lost()
    w = replace(w, status=replace(w.status, secondary=replace(w.status.secondary, synced=False)))
    p = plan(w)
    start = restarted_in_place(p)
    assert start is not None and start.pod == "vol-1-a"
    assert RestartedInPlace("lease-lost") in p.actions  # it was fit: counted as that
    # one not fit (its data path stopped it) is restarted too, as H9 always did
    w = replace(w, agents={"vol-1-a": replace(FENCED_BY_LEASE, fenced_by="data-path"), "vol-1-b": SECONDARY_AGENT})
    p = plan(w)
    assert restarted_in_place(p) is not None and RestartedInPlace("no-failover") in p.actions


def test_the_agent_status_fields_reach_the_view() -> None:
    from pairvol.operator.decisions import AgentView

    view = AgentView.from_status(
        {
            "role": "primary",
            "epoch": 3,
            "export": {"serving": False, "fencedBy": "lease"},
            "disk": {"localFailure": None},
            "qsd": {"alive": True},
        }
    )
    assert (view.fenced_by, view.local_failure, view.daemon_alive) == ("lease", None, True)
    dead = AgentView.from_status({"role": "primary", "qsd": {"alive": False}, "disk": {"localFailure": "EIO"}})
    assert (dead.fenced_by, dead.local_failure, dead.daemon_alive) == (None, "EIO", False)


def test_last_restart_survives_the_status_round_trip() -> None:
    st = VolumeStatus(
        epoch=4,
        last_restart=Restart(rfc3339(NOW), "vol-1-a", "n1", 4, "primary vol-1-a lost its lease"),
        last_failover=Failover(rfc3339(NOW - 100), "n2", "n1", "Latest", "x", 1.0),
    )
    assert VolumeStatus.from_dict(st.to_dict()) == st
    assert VolumeStatus.from_dict({**st.to_dict(), "lastRestart": None}).last_restart is None


# ------------------------------------------------ a restart that could not take the Lease


def after_the_restart(agent: Any, **kw: Any) -> World:
    """The plan above was carried out: status at epoch 4 with the secondary marked OutOfSync
    by the restart, the primary's agent at epoch 4, not serving; the Lease still the old one."""
    restart = Restart(rfc3339(NOW - 5), "vol-1-a", "n1", 4, "lost its lease", "vol-1-b", secondary_in_sync=True)
    w = lease_lost(lease=LeaseView("vol-1-a", 9.0, 3.0), suspect_since={"vol-1-a": NOW - 9})
    sec = replace(w.status.secondary, out_of_sync=True)
    status = replace(w.status, epoch=4, phase=Phase.DEGRADED, secondary=sec, last_restart=restart)
    base: dict[str, Any] = dict(status=status, agents={"vol-1-a": agent, "vol-1-b": SECONDARY_AGENT})
    base.update(kw)
    return replace(w, **base)


def test_a_primary_that_refused_to_serve_at_the_new_epoch_is_failed_over_to_the_secondary() -> None:
    # the agent says: the start at epoch 4 refused to serve (no Lease): nothing was
    # acknowledged at epoch 4, so the secondary missed nothing since the restart
    p = plan(after_the_restart(replace(FENCED_BY_LEASE, epoch=4, refused_epoch=4)))
    assert failed_over(p), [type(a).__name__ for a in p.actions]
    events = [(e.type, e.reason) for e in p.actions if isinstance(e, Event)]
    assert ("Warning", "RestartRefused") in events
    assert p.status.last_failover is not None and p.status.epoch == 5


@pytest.mark.parametrize(
    ("agent", "restart_change"),
    [
        # it may have served at epoch 4 (no refusal said): writes the secondary lacks
        (replace(FENCED_BY_LEASE, epoch=4), {}),
        # a refusal at an older epoch says nothing about epoch 4
        (replace(FENCED_BY_LEASE, epoch=4, refused_epoch=3), {}),
        # it serves
        (replace(FENCED_BY_LEASE, epoch=4, refused_epoch=4, serving=True), {}),
        # the secondary was not in sync before the restart
        (replace(FENCED_BY_LEASE, epoch=4, refused_epoch=4), {"secondary_in_sync": False}),
        # another secondary than the one the restart marked
        (replace(FENCED_BY_LEASE, epoch=4, refused_epoch=4), {"secondary": "vol-0-b"}),
        # the restart was at another epoch than the volume's
        (replace(FENCED_BY_LEASE, epoch=4, refused_epoch=4), {"epoch": 3}),
        # the primary's own durable record: it acknowledged writes its peer lacks (before the
        # restart; the status had not caught up with the Lease mark)
        (replace(FENCED_BY_LEASE, epoch=4, refused_epoch=4, peer_out_of_sync=True), {}),
    ],
    ids=["no-refusal", "older-refusal", "serving", "was-out-of-sync", "other-secondary", "other-epoch",
         "primary-says-out-of-sync"],
)
def test_a_secondary_marked_by_a_restart_stays_out_of_sync_without_the_refusal(
    agent: Any, restart_change: dict[str, Any]
) -> None:
    w = after_the_restart(agent)
    assert w.status.last_restart is not None
    w = replace(w, status=replace(w.status, last_restart=replace(w.status.last_restart, **restart_change)))
    p = plan(w)
    assert not failed_over(p)
    assert p.status.secondary is not None and p.status.secondary.out_of_sync
    assert "RestartRefused" not in [e.reason for e in p.actions if isinstance(e, Event)]


@pytest.mark.parametrize(
    "lease",
    [LeaseView("vol-1-a", 9.0, 3.0, out_of_sync_epoch=3), LeaseView("vol-1-a", 9.0, 3.0, resync_epoch=3)],
    ids=["out-of-sync-mark", "resync-mark"],
)
def test_a_mark_on_the_lease_keeps_the_secondary_out_of_sync_after_a_refusal(lease: LeaseView) -> None:
    # marks from before the restart (epoch 3) that the status had not caught up with: the
    # secondary lacks writes (or is a half copy) whatever the refusal says
    p = plan(after_the_restart(replace(FENCED_BY_LEASE, epoch=4, refused_epoch=4), lease=lease))
    assert not failed_over(p)
    assert p.status.secondary is not None and p.status.secondary.out_of_sync


def test_a_restart_records_a_secondary_the_primary_says_it_left_behind_as_not_in_sync() -> None:
    p = plan(lease_lost(agents={"vol-1-a": replace(FENCED_BY_LEASE, peer_out_of_sync=True),
                                "vol-1-b": SECONDARY_AGENT}))
    assert restarted_in_place(p) is not None
    assert p.status.last_restart is not None and p.status.last_restart.secondary_in_sync is False


def test_while_the_restart_is_carried_out_nothing_else_is_decided() -> None:
    # the call that takes the Lease back may take a Lease duration: no FailoverBlocked, no
    # phase Failed, no second restart meanwhile
    w = after_the_restart(replace(FENCED_BY_LEASE, epoch=3), agent_call_in_flight=True)
    p = plan(w)
    assert not any(isinstance(a, StartPrimary | DoFailover | Event) for a in p.actions), p.actions
    assert p.status.phase == Phase.DEGRADED and "waiting for its agent" in p.status.message


# ------------------------------------------------ a primary that does not serve


def refused_at_bring_up(**kw: Any) -> World:
    """The pairing start at epoch 3 could not take the Lease (a slow API server): the agent
    linked its peer, copied the volume to it, and refused to serve. No Lease was ever
    written; the agent's view looks like a replicating pair."""
    agent = replace(PRIMARY_AGENT, serving=False, refused_epoch=3, fenced_by=None)
    base: dict[str, Any] = dict(
        agents={"vol-1-a": agent, "vol-1-b": SECONDARY_AGENT}, lease=None, suspect_since={"vol-1-a": NOW - 4}
    )
    base.update(kw)
    return replicating(**base)


def test_a_primary_that_does_not_serve_is_not_reported_replicating() -> None:
    w = refused_at_bring_up()
    assert "vol-1-a" in unhealthy_pods(w), "the grace period must start"
    p = plan(w)
    assert p.status.phase != Phase.REPLICATING
    # it never served: the Lease alone kept it from serving, so it is asked again in place
    start = restarted_in_place(p)
    assert start is not None and (start.pod, start.epoch) == ("vol-1-a", 4)
    assert p.status.last_restart is not None and "could not take the lease" in p.status.last_restart.reason


def test_a_primary_that_does_not_serve_gets_the_grace_period_first() -> None:
    p = plan(refused_at_bring_up(suspect_since={"vol-1-a": NOW - 0.5}))
    assert restarted_in_place(p) is None and not failed_over(p)
    assert "grace period" in p.status.message


@pytest.mark.parametrize(
    "change",
    [
        {"agent_call_in_flight": True},  # the start is on its way
        {"agents": {"vol-1-a": replace(PRIMARY_AGENT, serving=False, epoch=2), "vol-1-b": SECONDARY_AGENT}},
    ],
    ids=["call-in-flight", "agent-behind"],
)
def test_a_primary_not_serving_yet_is_left_alone(change: dict[str, Any]) -> None:
    w = refused_at_bring_up(**change)
    assert primary_not_serving(w) is None
    assert restarted_in_place(plan(w)) is None


def test_a_primary_that_does_not_serve_for_another_reason_is_failed_over() -> None:
    # e.g. its agent restarted and restored the primary role: it waits for a new epoch
    agent = replace(PRIMARY_AGENT, serving=False, fenced_by=None, refused_epoch=None)
    w = refused_at_bring_up(agents={"vol-1-a": agent, "vol-1-b": SECONDARY_AGENT})
    assert "does not serve at epoch 3" in (primary_not_serving(w) or "")
    assert failed_over(plan(w))


def test_a_primary_whose_agent_is_busy_is_left_alone() -> None:
    # a start sent by an operator process that died since: this one has no call in flight,
    # the agent saved the epoch and is still trying to take the Lease; it may yet serve
    agent = replace(PRIMARY_AGENT, serving=False, refused_epoch=None, fenced_by=None, busy=True)
    w = refused_at_bring_up(agents={"vol-1-a": agent, "vol-1-b": SECONDARY_AGENT})
    assert primary_not_serving(w) is None
    p = plan(w)
    assert restarted_in_place(p) is None and not failed_over(p)
