"""The operator's flow when a replica comes back at its old size while the volume was
expanded (``spec.size`` raised) without it: its new pod says the new size, its agent keeps
the size its disk holds (a grow still to come, tests/integration/test_grow_pending.py) and
reports it. The pair is resynced at that size first; only a pair in sync grows, in the
E0-E5 order (decisions.Grow)."""

from __future__ import annotations

from dataclasses import replace

from tests.unit.test_operator_decisions import PRIMARY_AGENT, SECONDARY_AGENT, replicating

from pairvol.api.spec import parse_spec
from pairvol.api.status import Phase
from pairvol.operator.decisions import Grow, StartPrimary, World, plan

MiB = 1 << 20
OLD, NEW = 64 * MiB, 128 * MiB
DISK = "d" * 32


def secondary_back_at_the_old_size() -> World:
    """spec.size is NEW; the primary served alone (degraded, with a record of the
    secondary's disk); the secondary is back on its node at OLD, out of sync."""
    w = replicating(
        spec=parse_spec({"size": "128Mi"}, name="vol"),
        agents={
            "vol-1-a": replace(
                PRIMARY_AGENT, size=OLD, replication_state="degraded", tracked_disk=DISK, peer="10.0.0.9:7801",
                link_export=None,
            ),
            "vol-1-b": replace(SECONDARY_AGENT, size=OLD, disk_id=DISK),
        },
    )
    sec = w.status.secondary
    assert sec is not None
    return replace(w, status=w.status.with_(phase=Phase.DEGRADED, secondary=replace(sec, out_of_sync=True,
                                                                                      synced=False)))


def test_a_secondary_back_at_the_old_size_is_resynced_at_that_size_before_anything_grows() -> None:
    p = plan(secondary_back_at_the_old_size())
    assert not [a for a in p.actions if isinstance(a, Grow)]
    assert [a for a in p.actions if isinstance(a, StartPrimary)] == [
        StartPrimary("vol-1-a", "10.0.0.1", 4, "10.0.0.2:7801", "auto", 2, DISK, "10.0.0.2:7800")
    ]
    assert p.status.phase == Phase.SYNCING


def test_while_the_resync_runs_nothing_grows() -> None:
    w = secondary_back_at_the_old_size()
    p = plan(w)
    syncing = replace(PRIMARY_AGENT, epoch=4, size=OLD, replication_state="syncing", sync_total=OLD, sync_done=0)
    w = replace(w, status=p.status, agents={"vol-1-a": syncing, "vol-1-b": w.agents["vol-1-b"]})
    p = plan(w)
    assert not [a for a in p.actions if isinstance(a, Grow | StartPrimary)]
    assert p.status.phase == Phase.SYNCING


def test_once_the_pair_is_in_sync_again_it_grows_to_the_spec_size() -> None:
    w = secondary_back_at_the_old_size()
    p = plan(w)
    in_sync = replace(PRIMARY_AGENT, epoch=4, size=OLD)  # linked to the secondary's incarnation (epoch 2)
    p = plan(replace(w, status=p.status, agents={"vol-1-a": in_sync, "vol-1-b": w.agents["vol-1-b"]}))
    assert [a for a in p.actions if isinstance(a, Grow)] == [
        Grow("vol-1-a", "10.0.0.1", 4, "vol-1-b", "10.0.0.2", 2, NEW)
    ]
    assert p.status.secondary is not None and not p.status.secondary.out_of_sync
    assert f"growing from {OLD} to {NEW} bytes" in p.status.message
