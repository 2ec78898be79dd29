"""Restore points (issue 7, failure 2), without processes: what the secondary persists
about its checkpoint and a failover in progress, and how the operator reacts when the
secondary reports that its checkpoint is no restore point."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from tests.unit.test_operator_decisions import PRIMARY_AGENT, SECONDARY_AGENT, replicating

from pairvol.agent import state as persist
from pairvol.agent.stages import FailoverMode, Role, Stage
from pairvol.operator.decisions import Checkpoint, plan


def test_restore_point_and_failover_progress_survive_a_restart(tmp_path: Path) -> None:
    s = persist.PersistedState(
        name="v",
        size=1 << 20,
        role=Role.SECONDARY,
        stage=Stage.FAILOVER,
        epoch=7,
        generation=3,
        checkpoint=persist.Checkpoint(5, 1.5, 2.0),
        restore_point=True,
        failover_mode=FailoverMode.CHECKPOINT,
        overlays_durable=True,
    )
    persist.save(tmp_path, s)
    assert persist.load(tmp_path) == s


def test_a_state_written_before_restore_points_existed_keeps_its_meaning() -> None:
    """Old agents treated every checkpoint but 0 as a restore point."""
    base = persist.PersistedState(name="v", size=1 << 20, role=Role.SECONDARY, stage=Stage.RUNNING, epoch=2)
    for cp_id, expected in ((0, False), (4, True)):
        text = base.evolve(checkpoint=persist.Checkpoint(cp_id, 1.0, 1.0)).to_json()
        old = text.replace('"restore_point": false,', "").replace('"overlays_durable": false,', "")
        old = old.replace('"failover_mode": null,', "")
        assert "restore_point" not in old and "failover_mode" not in old
        loaded = persist.PersistedState.from_json(old)
        assert (loaded.restore_point, loaded.failover_mode, loaded.overlays_durable) == (expected, None, False)


def test_a_secondary_without_a_restore_point_gets_a_checkpoint_at_once() -> None:
    """After an unclean restart the secondary's last checkpoint id is not 0 but it is no
    restore point: the operator cuts one as soon as the pair is in sync, not an interval later."""
    restarted = replace(
        SECONDARY_AGENT,
        checkpoint={**(SECONDARY_AGENT.checkpoint or {}), "restorePoint": False},
    )
    assert plan(replicating()).actions == ()  # the interval has not passed
    p = plan(replicating(agents={"vol-1-a": PRIMARY_AGENT, "vol-1-b": restarted}))
    assert p.actions == (Checkpoint("vol-1-b", "10.0.0.2"),)
