"""The operator's part of growing a volume (decisions.Grow): when it grows, in which order
the agents are asked, and what a grow that stopped half-way leads to."""

from __future__ import annotations

from dataclasses import replace

import pytest
from tests.unit.test_operator_decisions import PRIMARY_AGENT, SECONDARY_AGENT, replicating

from pairvol.api.spec import parse_spec
from pairvol.api.status import Phase
from pairvol.operator.decisions import Event, Grow, StartPrimary, World, plan

MiB = 1 << 20


def sized(primary: int, secondary: int, spec_size: str) -> World:
    return replicating(
        spec=parse_spec({"size": spec_size}, name="vol"),
        agents={"vol-1-a": replace(PRIMARY_AGENT, size=primary), "vol-1-b": replace(SECONDARY_AGENT, size=secondary)},
    )


def test_a_pair_in_sync_reports_its_size() -> None:
    w = sized(64 * MiB, 64 * MiB, "64Mi")
    p = plan(w)
    assert p.status.size == 64 * MiB
    assert not [a for a in p.actions if isinstance(a, Grow)]
    assert p.status.message == "n1 -> n2 in sync"  # a spec that equals the size is neither a grow nor a shrink
    assert not p.cosmetic, "a new size is news, not a refresh to coalesce"
    assert plan(replace(w, status=p.status)).cosmetic  # once recorded, it is not news again


def test_a_larger_spec_size_grows_both_replicas_at_their_own_epochs() -> None:
    p = plan(sized(64 * MiB, 64 * MiB, "128Mi"))
    grows = [a for a in p.actions if isinstance(a, Grow)]
    assert grows == [Grow("vol-1-a", "10.0.0.1", 3, "vol-1-b", "10.0.0.2", 2, 128 * MiB)]
    assert "growing from 67108864 to 134217728 bytes" in p.status.message
    assert p.status.size == 64 * MiB  # not yet: the status says what both replicas have
    assert not p.cosmetic
    assert [(e.type, e.reason, e.message) for e in p.actions if isinstance(e, Event)] == [
        ("Normal", "Resizing", "growing the volume from 67108864 to 134217728 bytes")
    ]


def test_a_smaller_spec_size_never_shrinks_and_says_what_to_do() -> None:
    p = plan(sized(128 * MiB, 128 * MiB, "64Mi"))
    assert not [a for a in p.actions if isinstance(a, Grow)]
    assert "never shrinks; set spec.size to at least 134217728" in p.status.message


@pytest.mark.parametrize(
    ("primary", "secondary", "spec_size", "target"),
    [
        (64, 128, "128Mi", 128),  # the secondary grew, the primary did not
        (128, 64, "64Mi", 128),  # the primary is the larger one
        (64, 128, "64Mi", 128),  # the spec was lowered since: still never a shrink
        (64, 128, "256Mi", 256),  # the spec was raised since: grown to it at once
    ],
)
def test_a_grow_that_stopped_half_way_is_finished_to_the_largest_size_before_the_pair_is_resynced(
    primary: int, secondary: int, spec_size: str, target: int
) -> None:
    w = sized(primary * MiB, secondary * MiB, spec_size)
    w = replace(w, agents={
        "vol-1-a": replace(PRIMARY_AGENT, size=primary * MiB, replication_state="none"),
        "vol-1-b": replace(SECONDARY_AGENT, size=secondary * MiB),
    })
    p = plan(w)
    assert [a for a in p.actions if isinstance(a, Grow)] == [
        Grow("vol-1-a", "10.0.0.1", 3, "vol-1-b", "10.0.0.2", 2, target * MiB)
    ]
    assert not [a for a in p.actions if isinstance(a, StartPrimary)]
    assert (p.status.phase, p.status.message) == (Phase.DEGRADED, f"finishing the grow to {target * MiB} bytes")


def test_after_the_grow_the_pair_is_resynced_with_only_what_the_secondary_missed() -> None:
    w = sized(128 * MiB, 128 * MiB, "128Mi")
    w = replace(w, agents={
        "vol-1-a": replace(PRIMARY_AGENT, size=128 * MiB, replication_state="none", tracked_disk="d1"),
        "vol-1-b": replace(SECONDARY_AGENT, size=128 * MiB, disk_id="d1"),
    })
    p = plan(w)
    starts = [a for a in p.actions if isinstance(a, StartPrimary)]
    assert len(starts) == 1 and starts[0].sync == "auto" and starts[0].peer_disk == "d1"


def test_no_second_grow_while_an_agent_call_is_in_flight() -> None:
    p = plan(replace(sized(64 * MiB, 64 * MiB, "128Mi"), agent_call_in_flight=True))
    assert not [a for a in p.actions if isinstance(a, Grow)]
    assert "growing from 67108864 to 134217728 bytes" in p.status.message


PiB = 1 << 50


def beyond_what_an_agent_takes(primary: int, secondary: int, replication_state: str = "replicating") -> World:
    """spec.size 2Pi: parse_spec and the CRD refuse it (1Pi is the most an agent serves), so
    only a spec that skipped them reaches the planner; the planner does not rely on that."""
    spec = replace(parse_spec({"size": "64Mi"}, name="vol"), size=2 * PiB)
    return replicating(
        spec=spec,
        agents={
            "vol-1-a": replace(PRIMARY_AGENT, size=primary, replication_state=replication_state),
            "vol-1-b": replace(SECONDARY_AGENT, size=secondary),
        },
    )


def test_a_spec_size_no_agent_takes_is_never_grown_to_and_the_pair_stays_in_sync() -> None:
    """The grow's first call lets the secondary go (POST /v1/stop); a secondary that then
    refuses the resize leaves the pair out of sync, and the next tick starts it over: a
    volume that is never in sync, so never failed over automatically."""
    p = plan(beyond_what_an_agent_takes(64 * MiB, 64 * MiB))
    assert not [a for a in p.actions if isinstance(a, Grow)]
    assert not [e for e in p.actions if isinstance(e, Event) and e.reason == "Resizing"]
    assert p.status.phase == Phase.REPLICATING
    assert p.status.message == (
        f"spec.size {2 * PiB} is more than 1Pi ({PiB} bytes), the largest volume an agent serves: not growing; "
        "set spec.size to at most 1Pi"
    )


def test_a_grow_that_stopped_half_way_is_finished_to_the_larger_replica_not_to_a_spec_size_no_agent_takes() -> None:
    p = plan(beyond_what_an_agent_takes(64 * MiB, 128 * MiB, replication_state="none"))
    assert [a for a in p.actions if isinstance(a, Grow)] == [
        Grow("vol-1-a", "10.0.0.1", 3, "vol-1-b", "10.0.0.2", 2, 128 * MiB)
    ]
