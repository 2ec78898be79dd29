"""When a replica may grow (``check_resize``, pure) and how a grow in progress is persisted."""

from __future__ import annotations

from pathlib import Path

import pytest

from pairvol.agent import state as persist
from pairvol.agent.stages import IllegalTransition, Position, Role, Stage, check_resize

MiB = 1 << 20


def test_a_running_secondary_and_a_serving_primary_grow_at_their_current_epoch() -> None:
    assert check_resize(Position(Role.SECONDARY, Stage.RUNNING, 4), 4, 64 * MiB, 128 * MiB)
    assert check_resize(Position(Role.PRIMARY, Stage.RUNNING, 5), 5, 64 * MiB, 128 * MiB)
    assert check_resize(Position(Role.PRIMARY, Stage.DONE, 5), 5, 64 * MiB, 128 * MiB)  # degraded or stopped


def test_the_same_size_again_is_a_retry_that_changes_nothing() -> None:
    assert not check_resize(Position(Role.SECONDARY, Stage.RUNNING, 4), 4, 64 * MiB, 64 * MiB)


def test_shrinking_is_refused_with_what_to_do() -> None:
    with pytest.raises(IllegalTransition, match=r"shrinking it to .* is not supported.*at least the current size"):
        check_resize(Position(Role.PRIMARY, Stage.RUNNING, 5), 5, 128 * MiB, 64 * MiB)


@pytest.mark.parametrize("epoch", [3, 6])
def test_only_the_current_epoch_may_grow_a_replica(epoch: int) -> None:
    with pytest.raises(IllegalTransition, match="not this replica's epoch 5"):
        check_resize(Position(Role.PRIMARY, Stage.RUNNING, 5), epoch, 64 * MiB, 128 * MiB)


@pytest.mark.parametrize(
    "pos",
    [
        Position(Role.SECONDARY, Stage.FAILOVER, 4),
        Position(Role.SECONDARY, Stage.FAILOVER_FAILED, 4),
        Position(Role.SECONDARY, Stage.DONE, 4),
        Position(Role.PRIMARY, Stage.NONE, 4),
        Position(Role.NONE, Stage.NONE, 4),
    ],
)
def test_a_replica_between_roles_does_not_grow(pos: Position) -> None:
    with pytest.raises(IllegalTransition):
        check_resize(pos, 4, 64 * MiB, 128 * MiB)


def test_a_grow_in_progress_survives_in_the_state_file(tmp_path: Path) -> None:
    st = persist.PersistedState(name="vol", size=128 * MiB, resize_from=64 * MiB)
    persist.save(tmp_path, st)
    found = persist.load(tmp_path)
    assert found is not None and (found.size, found.resize_from) == (128 * MiB, 64 * MiB)
    persist.save(tmp_path, st.evolve(resize_from=None))
    again = persist.load(tmp_path)
    assert again is not None and again.resize_from is None
