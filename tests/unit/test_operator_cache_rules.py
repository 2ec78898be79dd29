"""When the operator may believe its watch caches, as a specification (decisions.py).

The caches lag the API server. A lagging cache may delay a decision, never make a wrong
one: these rules say when the reconcile loop reads the API server instead.
"""

from __future__ import annotations

from dataclasses import replace

from tests.unit.test_operator_decisions import kinds, primary_dead

from pairvol.api.status import Failover, Phase, VolumeStatus
from pairvol.operator.decisions import (
    ANN_FAILOVER,
    LeaseView,
    NodeView,
    lease_needs_fresh_read,
    node_change_matters,
    plan,
    pods_not_yet_seen,
    volume_body_source,
)

MARGIN = 0.5
HELD = LeaseView(holder="vol-1-a", observed_age_s=1.0, duration_s=3.0)


SERVING = primary_dead().status  # a primary was told to serve: the Lease counts


def test_a_cached_lease_that_is_held_is_believed() -> None:
    assert not lease_needs_fresh_read(SERVING, HELD, MARGIN)
    # up to the end of its duration plus the margin, as observed by this operator
    assert not lease_needs_fresh_read(SERVING, replace(HELD, observed_age_s=3.5), MARGIN)


def test_an_absent_released_or_expired_lease_is_read_again_before_anyone_acts_on_it() -> None:
    assert lease_needs_fresh_read(SERVING, None, MARGIN)
    assert lease_needs_fresh_read(SERVING, replace(HELD, holder=None), MARGIN)
    assert lease_needs_fresh_read(SERVING, replace(HELD, observed_age_s=3.51), MARGIN)
    assert lease_needs_fresh_read(SERVING, replace(HELD, duration_s=None), MARGIN)


def test_before_a_primary_serves_and_during_a_failover_the_lease_is_not_read() -> None:
    """Nothing is decided on it then: a volume waiting for nodes does not poll."""
    assert SERVING.activated and SERVING.primary is not None
    assert not lease_needs_fresh_read(VolumeStatus(), None, MARGIN)
    assert not lease_needs_fresh_read(replace(SERVING, endpoint=None), None, MARGIN)
    failing = replace(SERVING, phase=Phase.FAILING_OVER, last_failover=Failover("t", "n1", "n2", "Checkpoint", "x"))
    assert failing.failing_over and not lease_needs_fresh_read(failing, None, MARGIN)


def test_every_lease_a_failover_can_follow_from_is_a_fresh_read() -> None:
    """The rule above covers exactly the Leases that let the planner fail over: with the
    Lease the cache shows, a failover is planned only if the rule asks for a fresh read
    (and so the out-of-sync mark in it is fresh too)."""
    planned = 0
    for lease in (None, HELD, replace(HELD, holder=None), replace(HELD, observed_age_s=9.0),
                  replace(HELD, observed_age_s=3.4), replace(HELD, holder="other"),
                  replace(HELD, out_of_sync_epoch=3)):  # fmt: skip
        for manual in (False, True):
            world = primary_dead(lease=lease, annotations={ANN_FAILOVER: "now"} if manual else {})
            if "DoFailover" in kinds(plan(world)):
                planned += 1
                assert lease_needs_fresh_read(world.status, lease, world.settings.lease_margin_s), (lease, manual)
    assert planned >= 4, "the cases above include failovers"
    assert "DoFailover" not in kinds(plan(primary_dead(lease=HELD)))


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
