"""The data-path verdict (pairvol.agent.health.judge) as a specification: what makes a
replica unhealthy, what is only inconclusive, and when something may still serve."""

from __future__ import annotations

from dataclasses import replace

from pairvol.agent.health import Health, Observed, judge

EXPORT = "volume"
SERVING = Observed(qsd_alive=True, qsd_error=None, serving=True, exports=frozenset({EXPORT, "canary"}),
                   relay_wanted=False, relay_alive=False, relay_exports=None)
RELAYED = replace(SERVING, relay_wanted=True, relay_alive=True, relay_exports=frozenset({EXPORT}))
IDLE = replace(SERVING, serving=False, exports=frozenset({"replication"}))


def test_a_serving_primary_with_its_export_in_the_daemon_is_healthy() -> None:
    assert judge(SERVING, EXPORT) == Health(True, may_serve=True)
    assert judge(RELAYED, EXPORT) == Health(True, may_serve=True)


def test_a_dead_daemon_is_conclusively_unhealthy_in_every_role() -> None:
    for seen in (SERVING, IDLE):
        h = judge(replace(seen, qsd_alive=False, qsd_error="exited with status -9", exports=None), EXPORT)
        assert not h.ok and h.conclusive and "not running: exited with status -9" in h.reason
        assert not h.may_serve
    # ... but a relay that still lives may still hand out writes: not released, left to expire
    h = judge(replace(RELAYED, qsd_alive=False, exports=None), EXPORT)
    assert not h.ok and h.may_serve


def test_the_daemon_is_asked_rather_than_the_flag_trusted() -> None:
    h = judge(replace(SERVING, exports=frozenset({"canary"})), EXPORT)
    assert not h.ok and h.conclusive and "'volume' is gone" in h.reason and not h.may_serve


def test_the_relay_counts_only_with_export_listen() -> None:
    h = judge(replace(RELAYED, relay_alive=False, relay_exports=None), EXPORT)
    assert not h.ok and h.conclusive and "relay daemon of --export-listen is not running" in h.reason
    assert h.may_serve  # the unix export is still there until the fence
    assert h.reason == "the relay daemon of --export-listen is not running"
    h = judge(replace(RELAYED, relay_exports=frozenset()), EXPORT)
    assert not h.ok and h.reason == "the relay daemon no longer exports 'volume'"
    assert h.may_serve  # the relay lives, and the daemon still has the export


def test_no_answer_in_time_is_inconclusive() -> None:
    h = judge(replace(SERVING, exports=None, timed_out="qemu-storage-daemon"), EXPORT)
    assert not h.ok and not h.conclusive and h.may_serve and "did not answer" in h.reason


def test_a_replica_that_does_not_mean_to_serve_is_healthy_while_its_daemon_lives() -> None:
    # secondary, restored or fenced primary, promoted replica whose serving was refused
    assert judge(IDLE, EXPORT) == Health(True, may_serve=False)
    # a slow daemon does not take a secondary out of service; what it did not say is unknown
    slow = judge(replace(IDLE, exports=None, timed_out="qemu-storage-daemon"), EXPORT)
    assert slow.ok and slow.may_serve
    assert judge(replace(IDLE, exports=frozenset({EXPORT})), EXPORT) == Health(True, may_serve=True)


def test_a_daemon_that_was_never_started_says_so() -> None:
    h = judge(replace(IDLE, qsd_alive=False, qsd_error=None, exports=None), EXPORT)
    assert h.reason == "qemu-storage-daemon is not running: not started"


def test_an_export_gone_from_the_daemon_may_still_be_served_by_a_live_relay() -> None:
    """Unhealthy, but the relay may still hand out writes: the Lease is left to expire."""
    h = judge(replace(RELAYED, exports=frozenset({"canary"})), EXPORT)
    assert not h.ok and "'volume' is gone" in h.reason and h.may_serve
