"""When the operator may believe its watch caches, as a specification (decisions.py).

The caches lag the API server. A lagging cache may delay a decision, never make a wrong
one: these rules say when the reconcile loop reads the API server instead.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from tests.unit.test_operator_decisions import kinds, primary_dead
from tests.unit.test_operator_decisions import spec as spec_of

from pairvol.api.spec import SpecError
from pairvol.api.status import Failover, Phase, VolumeStatus
from pairvol.operator.decisions import (
    ANN_FAILOVER,
    LeaseView,
    NodeView,
    World,
    lease_needs_fresh_read,
    node_change_matters,
    plan,
    pods_not_yet_seen,
    volume_body_source,
)

HELD = LeaseView(holder="vol-1-a", observed_age_s=1.0, duration_s=3.0)


def serving(lease: LeaseView | None, **kw: Any) -> World:
    """A primary was told to serve (the Lease counts); its pod is gone, the secondary fine."""
    return primary_dead(lease=lease, **kw)


def test_a_cached_lease_that_is_held_is_believed() -> None:
    assert not lease_needs_fresh_read(serving(HELD))
    # up to the end of its duration plus the margin (1 s here), as observed by this operator
    assert not lease_needs_fresh_read(serving(replace(HELD, observed_age_s=4.0)))


def test_an_absent_released_or_expired_lease_is_read_again_before_anyone_acts_on_it() -> None:
    assert lease_needs_fresh_read(serving(None))
    assert lease_needs_fresh_read(serving(replace(HELD, holder=None)))
    assert lease_needs_fresh_read(serving(replace(HELD, observed_age_s=4.01)))
    assert lease_needs_fresh_read(serving(replace(HELD, duration_s=None)))


def test_before_a_primary_serves_and_during_a_failover_the_lease_is_not_read() -> None:
    """Nothing is decided on it then: a volume waiting for nodes does not poll."""
    world = serving(None)
    assert world.status.activated and world.status.primary is not None
    assert not lease_needs_fresh_read(replace(world, status=VolumeStatus()))
    assert not lease_needs_fresh_read(replace(world, status=replace(world.status, endpoint=None)))
    fo = Failover("t", "n1", "n2", "Checkpoint", "x")
    failing = replace(world.status, phase=Phase.FAILING_OVER, last_failover=fo)
    assert failing.failing_over and not lease_needs_fresh_read(replace(world, status=failing))
    # nor with no primary on record, or a spec the planner refuses (it then decides nothing)
    assert not lease_needs_fresh_read(replace(world, status=replace(world.status, primary=None)))
    assert not lease_needs_fresh_read(replace(world, spec=SpecError(["spec.size is required (e.g. size: 1Gi)"])))


def test_a_volume_whose_failover_is_blocked_anyway_does_not_read_the_lease_every_tick() -> None:
    expired = replace(HELD, observed_age_s=9.0)
    unsynced = replace(serving(expired).status.secondary, synced=False)
    world = serving(expired)
    assert not lease_needs_fresh_read(replace(world, status=replace(world.status, secondary=unsynced)))
    assert not lease_needs_fresh_read(replace(world, status=replace(world.status, secondary=None)))
    assert not lease_needs_fresh_read(serving(expired, spec=spec_of(failover={"automatic": False})))
    # by hand, automatic off does not block: the Lease is read
    assert lease_needs_fresh_read(
        serving(expired, spec=spec_of(failover={"automatic": False}), annotations={ANN_FAILOVER: "now"})
    )


def test_an_expired_lease_is_read_again_whatever_marks_the_cache_shows_on_it() -> None:
    """The marks are part of what the Lease says: a resync mark seen in the cache (which would
    block the failover, H8) is no reason to skip the fresh read, which may show it cleared."""
    expired = replace(HELD, observed_age_s=9.0)
    assert lease_needs_fresh_read(serving(replace(expired, resync_epoch=3)))
    assert lease_needs_fresh_read(serving(replace(expired, out_of_sync_epoch=3), annotations={ANN_FAILOVER: "now"}))


def test_every_lease_a_failover_can_follow_from_is_a_fresh_read() -> None:
    """The rule covers exactly the Leases that let the planner fail over: with the Lease
    the cache shows, a failover is planned only if the rule asks for a fresh read (and so
    the out-of-sync mark in it is fresh too)."""
    planned = 0
    leases = (None, HELD, replace(HELD, holder=None), replace(HELD, observed_age_s=9.0),
              replace(HELD, observed_age_s=3.4), replace(HELD, holder="other"), replace(HELD, out_of_sync_epoch=3))
    for lease in leases:  # fmt: skip
        for manual in (False, True):
            for automatic in (False, True):
                world = serving(lease, annotations={ANN_FAILOVER: "now"} if manual else {},
                                spec=spec_of(failover={"automatic": automatic}))  # fmt: skip
                if "DoFailover" in kinds(plan(world)):
                    planned += 1
                    assert lease_needs_fresh_read(world), (lease, manual, automatic)
    assert planned >= 6, "the cases above include failovers"
    assert "DoFailover" not in kinds(plan(serving(HELD)))


def test_pods_this_operator_created_are_read_from_the_api_until_the_cache_shows_them() -> None:
    assert pods_not_yet_seen({"vol-4"}, {"vol-3-a"}) == {"vol-4"}
    assert pods_not_yet_seen({"vol-4"}, {"vol-3-a", "vol-4"}) == set()
    assert pods_not_yet_seen(set(), set()) == set()


def test_the_volume_is_never_planned_from_a_version_older_than_this_loops_last_write() -> None:
    # first look: the cache if it has the volume, else the API server
    assert volume_body_source(None, False, True) == "cache"
    assert volume_body_source(None, False, False) == "api"
    # after a write (rv known): the own copy until the cache has shown that version...
    assert volume_body_source("41", False, True) == "own"
    assert volume_body_source("41", False, False) == "own"
    # ...then the cache, which holds that version or a newer one (or none: deleted since)
    assert volume_body_source("41", True, True) == "cache"
    assert volume_body_source("41", True, False) == "cache"


def test_only_node_changes_that_matter_wake_every_loop() -> None:
    n1 = NodeView("n1", ready=True, labels={"pairvol.io/storage": "true"})
    assert not node_change_matters(n1, NodeView("n1", ready=True, labels={"pairvol.io/storage": "true"}))
    assert node_change_matters(n1, replace(n1, ready=False))
    assert node_change_matters(n1, replace(n1, schedulable=False))
    assert node_change_matters(n1, replace(n1, labels={}))
    assert node_change_matters(None, n1)
    assert node_change_matters(n1, None)
