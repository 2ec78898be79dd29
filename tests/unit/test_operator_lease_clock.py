"""Lease expiry as the operator judges it: by its own monotonic clock, from when it first
saw each renewal, never by comparing the holder's renewTime with its wall clock (issue 7).

The holder's clock may be off by an hour either way: the decision to fail over must come at
the same moment of the observer's time.
"""

from __future__ import annotations

from typing import Any

import pytest
from tests.unit.test_operator_decisions import NOW, replicating

from pairvol.kube.lease import LeaseObservation, lease_record, micro_time
from pairvol.operator.decisions import DoFailover, plan
from pairvol.operator.handlers import lease_view

MONO0 = 5_000.0  # the observer's monotonic clock has nothing to do with wall time


def lease(renewals: int, holder_clock: float) -> dict[str, Any]:
    """The Lease after the holder's n-th renewal, stamped with the holder's clock."""
    return {
        "metadata": {"name": "pairvol-vol", "resourceVersion": str(100 + renewals)},
        "spec": {"holderIdentity": "vol-1-a", "leaseDurationSeconds": 3,
                 "renewTime": micro_time(holder_clock + renewals)},
    }


def fails_over(raw: dict[str, Any], seen: LeaseObservation, mono: float) -> bool:
    view = lease_view(raw, seen.age(lease_record(raw), mono))
    world = replicating(lease=view, suspect_since={"vol-1-a": NOW - 60})
    return any(isinstance(a, DoFailover) for a in plan(world).actions)


@pytest.mark.parametrize("skew_s", [-3600.0, -2.5, 0.0, 2.5, 3600.0])
def test_the_holders_clock_does_not_move_the_failover(skew_s: float) -> None:
    # the holder renews at observer times 0, 1, 2, 3, 4 and then dies; the operator looks
    # every 0.5 s; duration 3 s + margin 1 s: the first failover is at 8.5 s, whatever the skew
    seen = LeaseObservation()
    decided = []
    for tick in range(20):
        t = tick * 0.5
        decided.append(fails_over(lease(min(int(t), 4), NOW + skew_s), seen, MONO0 + t))
    assert decided == [False] * 17 + [True] * 3


def test_a_restarted_operator_waits_a_full_duration_from_its_first_look() -> None:
    dead_long_ago = lease(4, NOW - 600)  # renewTime ten minutes old by every clock
    seen = LeaseObservation()  # a fresh process knows nothing
    assert not fails_over(dead_long_ago, seen, MONO0)
    assert not fails_over(dead_long_ago, seen, MONO0 + 4.0)
    assert fails_over(dead_long_ago, seen, MONO0 + 4.1)


def test_any_new_record_restarts_the_count_even_with_the_same_renew_time() -> None:
    # a holder whose clock stands still still renews: the resourceVersion changes
    seen = LeaseObservation()
    stuck = lease(0, NOW)
    assert not fails_over(stuck, seen, MONO0)
    again = {**stuck, "metadata": {**stuck["metadata"], "resourceVersion": "999"}}
    assert not fails_over(again, seen, MONO0 + 4.1)
    assert fails_over(again, seen, MONO0 + 8.2)


def test_a_standby_observes_the_leases_while_it_stands_by(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Lease cache's events keep every volume Lease's observation in the process, paused
    or not: the loop a standby starts when it takes over finds how long the record has been
    the same, instead of starting its own count (docs/correctness.md, H5)."""
    from pairvol.operator.handlers import Context
    from pairvol.operator.manifests import OperatorConfig

    mono = [MONO0]
    monkeypatch.setattr("pairvol.operator.handlers.time.monotonic", lambda: mono[0])
    c = Context(config=OperatorConfig(), kube=None, agents=None, metrics=None)  # type: ignore[arg-type]
    renewed = {**lease(4, NOW), "metadata": {"name": "pairvol-vol", "namespace": "apps", "resourceVersion": "104"}}
    c.lease_event("MODIFIED", renewed)  # the last renewal, seen while standing by
    mono[0] += 3.0
    c.lease_event("MODIFIED", {**renewed, "metadata": {**renewed["metadata"], "name": "other-lock"}})  # not ours
    mono[0] += 1.2  # taken over: the volume's loop looks for the first time
    assert fails_over(renewed, c.lease_observation("apps", "pairvol-vol"), mono[0])

    again = {**renewed, "metadata": {**renewed["metadata"], "resourceVersion": "105"}}
    c.lease_event("MODIFIED", again)  # a renewal restarts the count
    assert not fails_over(again, c.lease_observation("apps", "pairvol-vol"), mono[0] + 4.0)
    c.lease_event("DELETED", again)
    assert ("apps", "other-lock") not in c._lease_seen
    assert ("apps", "pairvol-vol") not in c._lease_seen
    assert not fails_over(again, c.lease_observation("apps", "pairvol-vol"), mono[0] + 5.0)  # a look afresh


def test_a_read_counts_only_up_to_when_it_was_sent_and_a_new_record_only_from_its_arrival() -> None:
    """A GET that takes time (or whose answer waits for the agents' status calls before it is
    looked at) confirms a known record only as of its sending: a renewal stored meanwhile
    would not be in it. A record it shows for the first time is known only once it arrived."""
    seen = LeaseObservation()
    x, y = lease_record(lease(0, NOW)), lease_record(lease(1, NOW))
    assert seen.age(x, MONO0) == 0.0  # the cache's event
    assert seen.age(x, MONO0 + 9.0, current_at=MONO0 + 2.0) == 2.0  # sent at +2, looked at +9
    assert seen.age(y, MONO0 + 3.5, current_at=MONO0 + 3.0) == 0.0  # new: from its arrival
    assert seen.age(y, MONO0 + 5.0) == 1.5


def test_a_record_a_lagging_cache_shows_again_is_known_as_replaced() -> None:
    seen = LeaseObservation()
    x, y = lease_record(lease(0, NOW)), lease_record(lease(1, NOW))
    seen.age(x, MONO0)
    seen.age(y, MONO0 + 1.0)  # from the API server
    assert seen.replaced(x) and not seen.replaced(y)  # the cache still at x: read afresh
    assert seen.age(y, MONO0 + 4.0) == 3.0
    seen.age(x, MONO0 + 4.5)  # a late event of x after all: counted, it only restarts the count
    assert not seen.replaced(x) and seen.replaced(y)


def test_the_volume_loop_counts_a_lease_read_as_of_its_sending(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop's GET of the Lease is looked at only after the agents' status calls: the
    record is confirmed as of the GET's sending, and its wall time goes with the view."""
    import pairvol.operator.handlers as handlers
    from pairvol.operator.manifests import OperatorConfig

    c = handlers.Context(config=OperatorConfig(), kube=None, agents=None, metrics=None)  # type: ignore[arg-type]
    monkeypatch.setattr(handlers, "_CTX", c)
    loop = handlers.Reconciler("vol", "apps")
    raw = lease(4, NOW)
    first = loop.lease_view(handlers.LeaseRead(raw, True, sent=MONO0, received=MONO0 + 0.1, wall=NOW))
    assert first is not None and first.observed_age_s == 0.0
    view = loop.lease_view(handlers.LeaseRead(raw, True, sent=MONO0 + 2.0, received=MONO0 + 2.2, wall=NOW + 2.0))
    assert view is not None and view.observed_age_s == pytest.approx(1.9) and view.observed_at == NOW + 2.0


def test_a_look_older_than_the_current_record_changes_nothing() -> None:
    """A tick reads the Lease, then waits for the agents' status calls; a renewal's event
    comes in meanwhile. The tick's older record, looked at last, neither replaces the newer
    one nor sends the next tick to the API server."""
    seen = LeaseObservation()
    r1, r2 = lease_record(lease(0, NOW)), lease_record(lease(1, NOW))
    seen.age(r1, MONO0)  # event
    seen.age(r2, MONO0 + 11.0)  # the renewal's event, during the tick's status calls
    assert seen.age(r1, MONO0 + 10.0) == 0.0  # the tick's read at +10, looked at after +11
    assert not seen.replaced(r2) and seen.replaced(r1)
    assert seen.age(r2, MONO0 + 14.0) == 3.0
