"""Roles, stages and the legal transitions between them (pure; no I/O).

The stages and their error texts are replication.c's (``BLOCK_REPLICATION_*``,
"Block replication is running or done", "Block replication is not running"), so a
storage engineer who knows QEMU's driver recognises every refusal. On top of the seeds:
an *epoch* per role change (fencing), and re-starting a finished replica in a new role
when a newer epoch asks for it (re-protection demotes an old primary, for instance).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from pairvol.errors import PairvolError


class Role(enum.StrEnum):
    NONE = "none"
    PRIMARY = "primary"
    SECONDARY = "secondary"


class Stage(enum.StrEnum):
    NONE = "none"
    RUNNING = "running"
    FAILOVER = "failover"
    FAILOVER_FAILED = "failover_failed"
    DONE = "done"


class FailoverMode(enum.StrEnum):
    CHECKPOINT = "checkpoint"
    LATEST = "latest"


# Who asked for a failover, as the caller of POST /v1/failover says (its ``trigger``): only a
# label of the failover metrics, so that a planned failover does not alert. "unspecified":
# the caller did not say, or the failover was interrupted by a crash and completed when the
# agent started again.
FAILOVER_TRIGGERS = ("automatic", "manual", "unspecified")


# What stopped a primary's workload export (``export.fencedBy`` in the status): its Lease
# was lost, its data path failed its health check, its local disk failed a request the
# peer served, or the agent shut down. Only "lease" leaves a disk that is still the
# volume's latest and whole, which the operator may ask to serve again in place.
FenceCause = Literal["lease", "data-path", "local-disk", "shutdown"]


RUNNING_OR_DONE = "Block replication is running or done"
NOT_RUNNING = "Block replication is not running"


class IllegalTransition(PairvolError):
    """The call is not allowed in this role/stage/epoch (HTTP 409)."""


@dataclass(frozen=True)
class Position:
    role: Role
    stage: Stage
    epoch: int


def _check_epoch(pos: Position, epoch: int, role_change: bool) -> None:
    if epoch < pos.epoch:
        raise IllegalTransition(
            f"stale epoch {epoch}: this replica is at epoch {pos.epoch}; a caller with an older epoch is fenced"
        )
    if role_change and epoch == pos.epoch and pos.role is not Role.NONE:
        raise IllegalTransition(
            f"epoch {epoch} does not advance the current epoch {pos.epoch}: every role change needs a new, higher epoch"
        )


def check_start_secondary(pos: Position, epoch: int) -> None:
    if pos.role is Role.SECONDARY and pos.stage in (Stage.RUNNING, Stage.FAILOVER, Stage.FAILOVER_FAILED):
        _check_epoch(pos, epoch, role_change=False)
        raise IllegalTransition(RUNNING_OR_DONE)
    if pos.role is Role.SECONDARY and pos.stage is Stage.DONE and epoch == pos.epoch:
        raise IllegalTransition(RUNNING_OR_DONE)
    _check_epoch(pos, epoch, role_change=pos.role is not Role.SECONDARY or pos.stage is not Stage.NONE)


def check_start_primary(pos: Position, epoch: int) -> None:
    if pos.role is Role.SECONDARY and pos.stage is Stage.RUNNING:
        _check_epoch(pos, epoch, role_change=True)
        raise IllegalTransition(
            "this replica is a running secondary: promote it with POST /v1/failover, "
            "or stop it with POST /v1/stop first"
        )
    if pos.role is Role.SECONDARY and pos.stage in (Stage.FAILOVER, Stage.FAILOVER_FAILED):
        raise IllegalTransition(f"failover of this replica is {pos.stage.value.replace('_', ' ')}")
    # Re-configuring a primary (new peer) also needs a new epoch: it is a new pairing.
    _check_epoch(pos, epoch, role_change=True)


def check_checkpoint(pos: Position) -> None:
    if pos.role is not Role.SECONDARY:
        raise IllegalTransition(f"checkpoints are cut on the secondary; this replica is {pos.role.value}")
    if pos.stage is Stage.RUNNING:
        return
    if pos.stage in (Stage.FAILOVER, Stage.DONE):
        raise IllegalTransition(f"{NOT_RUNNING} (stage {pos.stage.value}: this replica was promoted or stopped)")
    raise IllegalTransition(NOT_RUNNING)


def check_failover(pos: Position, epoch: int) -> None:
    if pos.role is not Role.SECONDARY:
        raise IllegalTransition(f"only a secondary can fail over; this replica is {pos.role.value}")
    if pos.stage is not Stage.RUNNING:
        raise IllegalTransition(f"{NOT_RUNNING} (stage {pos.stage.value})")
    _check_epoch(pos, epoch, role_change=True)


def check_resize(pos: Position, epoch: int, current: int, new: int) -> bool:
    """Growing the volume (``POST /v1/resize``). Returns False when there is nothing to do
    (already at that size: a retry). Only the current epoch may resize: an operator that is
    behind has no say, and a resize is no role change. Never shrinks: the file system or
    database on the volume would lose its end."""
    if epoch != pos.epoch:
        raise IllegalTransition(
            f"epoch {epoch} is not this replica's epoch {pos.epoch}: a resize is asked at the current epoch"
        )
    if new < current:
        raise IllegalTransition(
            f"the volume is {current} bytes; shrinking it to {new} bytes is not supported (it would cut off "
            "the end of the file system or data on it): ask for at least the current size"
        )
    if new == current:
        return False
    if pos.role is Role.SECONDARY and pos.stage is not Stage.RUNNING:
        raise IllegalTransition(f"{NOT_RUNNING} (stage {pos.stage.value}): a secondary grows while it runs")
    if pos.role is Role.PRIMARY and pos.stage not in (Stage.RUNNING, Stage.DONE):
        raise IllegalTransition(f"a primary in stage {pos.stage.value} cannot grow")
    if pos.role is Role.NONE:
        raise IllegalTransition("this replica has no role yet: start it at the new size instead")
    return True


def check_stop(pos: Position) -> bool:
    """Returns False when stop is a no-op (replication.c ignores it after promotion)."""
    if pos.stage in (Stage.DONE, Stage.FAILOVER):
        return False
    if pos.stage is not Stage.RUNNING:
        raise IllegalTransition(NOT_RUNNING)
    return True


def io_status(role: Role, stage: Stage) -> str:
    """replication_get_io_status: what the replica's disk accepts in this stage."""
    if stage is Stage.NONE:
        return "error"
    if stage is Stage.RUNNING:
        return "ok"
    if role is Role.PRIMARY:
        return "error"
    return "allocated-only" if stage is Stage.FAILOVER_FAILED else "ok"
