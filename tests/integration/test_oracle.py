"""pairvol's data path against QEMU's own replication driver (the reference oracle).

The same random trace of primary writes (NBD writes and write-zeroes, sector aligned,
up to 8 non-overlapping ones in flight) and checkpoints is applied, concurrently, to

* the oracle: ``qemu-system-x86_64 -M none`` running ``block/replication.c`` in secondary
  mode, written through its secondary disk's NBD export (tests/support/oracle.py), and
* a pairvol pair: writes through the primary agent's workload export, checkpoints with
  ``POST /v1/checkpoint`` on the secondary;

then the primary is killed and both fail over in checkpoint mode. The images left behind
(the oracle's raw file once its commit reached stage DONE; pairvol's read through the new
primary's export) must be byte-identical. An in-memory model of "the volume at the last
checkpoint" is checked too, so a failure says which side is wrong.

Writes are quiesced around each checkpoint (QEMU's driver cuts the checkpoint with
``bdrv_make_empty`` and needs no I/O in flight; pairvol does not, but must agree).
Where pairvol deliberately departs from the seeds (no checkpoint since start: it keeps
the latest state; refusals where QEMU silently ignores a call), the tests pin the
departure down against what QEMU does, so it stays a decision and not an accident.

Seeds: a fixed set plus one fresh seed per run, printed; rerun one with
``PAIRVOL_ORACLE_SEEDS=<seed>[,<seed>...]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.agents import Agent, AgentCallError, agents, pair
from tests.support.oracle import (
    NOT_RUNNING,
    RUNNING_OR_DONE,
    Oracle,
    OracleCommandError,
    OracleUnavailable,
    Trace,
    TraceClient,
    difference,
    image_at_last_checkpoint,
    latest_image,
    random_trace,
    replay,
    without_checkpoint,
)

pytestmark = [pytest.mark.oracle, pytest.mark.timeout(120)]

MiB = 1 << 20
SIZE = 4 * MiB


def _seeds() -> list[int]:
    chosen = os.environ.get("PAIRVOL_ORACLE_SEEDS", "")
    if chosen.strip():
        return [int(s) for s in chosen.split(",") if s.strip()]
    # 1 and 3: one checkpoint, 2: none, 5: four; plus a fresh one
    return [1, 2, 3, 5, random.SystemRandom().randrange(1 << 32)]


SEEDS = _seeds()


OracleFactory = Callable[[int], Awaitable[Oracle]]


@pytest.fixture
async def oracles(tmp_path: Path) -> AsyncIterator[OracleFactory]:
    """Start oracles of a given size: QEMU's replication driver in secondary mode, stage
    NONE, secondary disk exported. Every one is shut down (by PID if need be) at the end."""
    made: list[Oracle] = []

    async def start(size: int) -> Oracle:
        one = Oracle(tmp_path / f"oracle-{len(made)}", size)
        made.append(one)
        try:
            await one.start()
        except OracleUnavailable as exc:
            pytest.skip(f"no reference oracle on this machine: {exc}")
        return one

    try:
        yield start
    finally:
        await asyncio.gather(*(one.close() for one in made), return_exceptions=True)


@pytest.fixture
async def oracle(oracles: OracleFactory) -> Oracle:
    return await oracles(SIZE)


DEPTH = 8  # non-overlapping writes in flight at once, on both sides


@dataclass(frozen=True)
class QemuResult:
    """What QEMU's driver leaves: ``at_checkpoint`` is the raw disk after the failover
    commit (stage DONE); ``latest`` is the secondary disk just before the failover: the
    driver writes every primary write straight into it (old data goes to the hidden disk),
    so it is what a failover that keeps every acknowledged write must leave."""

    at_checkpoint: bytes
    latest: bytes


@dataclass(frozen=True)
class PairvolResult:
    """The new primary's image (read through its export) and the failover's answer."""

    image: bytes
    answer: dict[str, Any]


async def run_oracle(oracle: Oracle, trace: Trace, synced: Trace | None = None) -> QemuResult:
    """The trace through QEMU's driver, then failover (checkpoint mode).

    ``synced``: writes that reach the secondary disk before replication starts, as
    COLO's initial drive-mirror does (COLO starts the secondary's replication only after
    the mirror is ready)."""
    async with await oracle.nbd() as nbd:  # the COLO primary's NBD client
        if synced is not None:
            await replay(synced, nbd, oracle.checkpoint, DEPTH)
        await oracle.start_replication()
        await replay(trace, nbd, oracle.checkpoint, DEPTH)
    # the primary is gone before the secondary fails over
    latest = await oracle.read_disk()
    return QemuResult(at_checkpoint=await oracle.failover(), latest=latest)


async def run_pairvol(
    primary: Agent, secondary: Agent, trace: Trace, failover_epoch: int, mode: str = "checkpoint"
) -> PairvolResult:
    """The trace through a replicating pairvol pair, SIGKILL of the primary, failover."""
    async with await TraceClient.open_unix(str(primary.export_socket)) as nbd:
        await replay(trace, nbd, secondary.checkpoint, DEPTH)
    primary.kill()
    await primary.wait_exit()
    answer = await secondary.failover(epoch=failover_epoch, mode=mode)
    async with await secondary.nbd() as new_primary:
        return PairvolResult(await new_primary.read_all(), answer)


async def both(
    oracle_side: Awaitable[QemuResult], pairvol_side: Awaitable[PairvolResult]
) -> tuple[QemuResult, PairvolResult]:
    """Run both sides concurrently; if one fails, the other is cancelled, not left behind."""
    oracle_task = asyncio.ensure_future(oracle_side)
    pairvol_task = asyncio.ensure_future(pairvol_side)
    try:
        qemu, pairvol = await asyncio.gather(oracle_task, pairvol_task)
    finally:
        for task in (oracle_task, pairvol_task):
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
    return qemu, pairvol


def assert_same_images(trace: Trace, what: str, qemu_image: bytes, pairvol_image: bytes, model: bytes) -> None:
    diff = difference(qemu_image, pairvol_image)
    assert diff is None, (
        f"{trace.describe()}: pairvol's image differs from QEMU's {what}: {diff}; "
        f"QEMU vs model: {difference(qemu_image, model) or 'equal'}; "
        f"pairvol vs model: {difference(pairvol_image, model) or 'equal'}"
    )
    assert qemu_image == model, f"{trace.describe()}: both differ from the model: {difference(qemu_image, model)}"


def assert_checkpoint_failover_agrees(trace: Trace, qemu: QemuResult, pairvol: PairvolResult, base: bytes) -> None:
    """The checkpoint-mode contract against QEMU.

    With a checkpoint cut after replication started, pairvol's result is QEMU's, byte for
    byte. Without one, pairvol deliberately differs from the seeds: its checkpoint 0 is
    the secondary's disk *before* the primary's full sync (QEMU's is taken after COLO's
    mirror), not a state the volume ever had, so it keeps the latest state instead and
    says so; that state must then be QEMU's secondary disk as it stood before failover.
    """
    answer = pairvol.answer
    if trace.checkpoints:
        assert_same_images(trace, "commit result", qemu.at_checkpoint, pairvol.image,
                           image_at_last_checkpoint(trace, base))
        assert answer["mode"] == "checkpoint", answer
        assert answer["checkpointId"] == trace.checkpoints, answer
    else:
        assert (answer["mode"], answer.get("requestedMode"), answer["checkpointId"]) == (
            "latest", "checkpoint", None), answer
        assert_same_images(trace, "secondary disk before failover", qemu.latest, pairvol.image,
                           latest_image(trace, base))
        assert qemu.at_checkpoint == image_at_last_checkpoint(trace, base), "QEMU's driver went back to its start"


async def call_error(call: Awaitable[object]) -> tuple[int, str]:
    """(HTTP status, error text) of an agent call that must fail."""
    try:
        await call
    except AgentCallError as exc:
        return exc.status, str(exc.body.get("error", exc.body))
    raise AssertionError("the agent accepted a call that must be refused")


async def qemu_error(command: Awaitable[object]) -> str:
    """QEMU's error text of an oracle command that must fail."""
    try:
        await command
    except OracleCommandError as exc:
        return exc.desc
    raise AssertionError("QEMU accepted a command that must be refused")


# --------------------------------------------------------------------------- the traces


def test_traces_can_tell_the_checkpoint_from_its_neighbours() -> None:
    """A trace is only a good probe if the result at its last checkpoint differs from the
    latest state and from the previous checkpoint's; otherwise a wrong failover mode or a
    lost checkpoint would go unnoticed."""
    for seed in [*SEEDS, *range(100, 130)]:
        trace = random_trace(seed, SIZE)
        want = image_at_last_checkpoint(trace)
        assert want != latest_image(trace), trace.describe()
        if trace.checkpoints:
            dropped = without_checkpoint(trace, trace.checkpoints - 1)
            assert image_at_last_checkpoint(dropped) != want, trace.describe()
    assert {random_trace(s, SIZE).checkpoints for s in range(100, 130)} >= {0, 1, 4}
    assert random_trace(7, SIZE) == random_trace(7, SIZE)


# the last case: a size that is no multiple of the qcow2 cluster (a partial last cluster)
CASES = [(seed, SIZE) for seed in SEEDS] + [(SEEDS[0] + 500, 3 * MiB + 37 * 512)]


@pytest.mark.parametrize(("seed", "size"), CASES)
async def test_pairvol_leaves_the_same_image_as_qemus_replication_driver(
    tmp_path: Path, oracles: OracleFactory, seed: int, size: int
) -> None:
    trace = random_trace(seed, size)
    print(trace.describe())
    oracle = await oracles(size)
    async with pair(tmp_path / "pair", size=str(size)) as (primary, secondary):
        qemu, pairvol = await both(run_oracle(oracle, trace), run_pairvol(primary, secondary, trace, 3))
        assert_checkpoint_failover_agrees(trace, qemu, pairvol, bytes(size))

        # After the failover both are done: a further stop is a no-op on both sides.
        await oracle.stop_replication()
        await secondary.call("POST", "/v1/stop", {})
        assert await oracle.read_disk() == qemu.at_checkpoint


async def test_latest_mode_keeps_what_qemus_secondary_disk_holds(tmp_path: Path, oracle: Oracle) -> None:
    """Beyond the seeds: pairvol's latest mode drops the overlays; QEMU's driver keeps
    every primary write in the secondary disk itself, so its raw file just before the
    failover is the reference."""
    trace = random_trace(SEEDS[-1], SIZE, checkpoints=2)
    print(trace.describe())
    async with pair(tmp_path / "pair", size=str(SIZE)) as (primary, secondary):
        qemu, pairvol = await both(
            run_oracle(oracle, trace), run_pairvol(primary, secondary, trace, 3, mode="latest")
        )
        assert (pairvol.answer["mode"], pairvol.answer["checkpointId"]) == ("latest", None), pairvol.answer
        assert_same_images(trace, "secondary disk before failover", qemu.latest, pairvol.image, latest_image(trace))


@pytest.mark.parametrize("checkpoints_after_sync", [0, 2])
async def test_data_copied_by_the_full_sync_survives_a_checkpoint_failover(
    tmp_path: Path, oracle: Oracle, checkpoints_after_sync: int
) -> None:
    """The volume had data before it was paired: the primary's full sync copies it (in
    the oracle, as in COLO, it is on the secondary disk before replication starts), and a
    failover in checkpoint mode must never go back to before that copy."""
    synced = random_trace(SEEDS[0] + 1000, SIZE, writes=24, checkpoints=0)
    trace = random_trace(SEEDS[0], SIZE, checkpoints=checkpoints_after_sync)
    print(trace.describe())
    async with agents(tmp_path / "agents", 2, size=str(SIZE)) as (primary, secondary):
        await primary.primary(1, None)
        async with await TraceClient.open_unix(str(primary.export_socket)) as nbd:
            await replay(synced, nbd, secondary.checkpoint, DEPTH)
        await secondary.secondary(2)
        await primary.primary(3, secondary.replication_address, "full")
        await primary.wait_replicating()
        qemu, pairvol = await both(run_oracle(oracle, trace, synced), run_pairvol(primary, secondary, trace, 4))
        assert_checkpoint_failover_agrees(trace, qemu, pairvol, latest_image(synced))


async def test_a_skipped_checkpoint_changes_the_oracles_result(oracle: Oracle) -> None:
    """The differential test can fail: QEMU's own result moves when one checkpoint is
    not taken, so a pairvol that lost a checkpoint could not match it."""
    trace = random_trace(SEEDS[0], SIZE)
    if not trace.checkpoints:
        trace = next(t for s in range(100, 200) if (t := random_trace(s, SIZE)).checkpoints)
    skipped = without_checkpoint(trace, trace.checkpoints - 1)
    got = (await run_oracle(oracle, skipped)).at_checkpoint
    assert got == image_at_last_checkpoint(skipped)
    assert difference(got, image_at_last_checkpoint(trace)) is not None


# --------------------------------------------------------------------------- refusals


async def test_illegal_transitions_are_refused_with_the_seeds_messages(tmp_path: Path, oracle: Oracle) -> None:
    """Where the contract promises replication.c's texts, pairvol's 409 says exactly what
    QEMU says; where pairvol is deliberately stricter than QEMU (QEMU silently ignores
    start/checkpoint after stage DONE, for a promoted secondary), the refusal still opens
    with the seeds' text."""
    async with agents(tmp_path / "agents", 1, size=str(SIZE)) as (agent,):
        # stage NONE: stop is refused
        assert await qemu_error(oracle.stop_replication()) == NOT_RUNNING
        assert await call_error(agent.call("POST", "/v1/stop", {})) == (409, NOT_RUNNING)
        assert await oracle.replication_error() == NOT_RUNNING
        assert (await agent.status())["stage"] == "none"
        # a checkpoint before start: both refuse, in their own words (QEMU's driver has no
        # backup job yet; pairvol's replica has no secondary role yet)
        assert await qemu_error(oracle.checkpoint()) == "Backup job was cancelled unexpectedly"
        status, text = await call_error(agent.checkpoint())
        assert status == 409 and "secondary" in text, text
        # failover before start: QEMU drops the error (xen-set-replication passes no errp
        # to replication_stop_all when failover=true) and stays in NONE; pairvol refuses
        await oracle.request_failover()
        assert await oracle.replication_error() == NOT_RUNNING
        status, text = await call_error(agent.failover(1))
        assert status == 409 and "only a secondary can fail over" in text, text

        # stage RUNNING: a second start is refused, whatever the (non-stale) epoch
        await oracle.start_replication()
        await agent.secondary(1)
        assert await oracle.replication_error() is None
        assert (await agent.status())["stage"] == "running"
        assert await qemu_error(oracle.start_replication()) == RUNNING_OR_DONE
        assert await call_error(agent.secondary(1)) == (409, RUNNING_OR_DONE)
        assert await call_error(agent.secondary(2)) == (409, RUNNING_OR_DONE)

        # stop without failover: both reach stage DONE. QEMU 7.2 reports an error on the
        # way (replication_stop cancels the backup job, whose completion callback clears
        # s->backup_job, then runs secondary_do_checkpoint, which finds no job) but sets
        # the stage anyway; pairvol's stop succeeds.
        assert await qemu_error(oracle.stop_replication()) == "Backup job was cancelled unexpectedly"
        await agent.call("POST", "/v1/stop", {})
        assert (await agent.status())["stage"] == "done"
        # a second stop is a no-op on both sides
        await oracle.stop_replication()
        await agent.call("POST", "/v1/stop", {})

        # stage DONE: QEMU ignores start and checkpoint; pairvol refuses with the seeds' texts
        await oracle.start_replication()
        await oracle.checkpoint()
        status, text = await call_error(agent.secondary(1))
        assert (status, text) == (409, RUNNING_OR_DONE)
        status, text = await call_error(agent.checkpoint())
        assert status == 409 and text.startswith(NOT_RUNNING), text
        status, text = await call_error(agent.failover(3))
        assert status == 409 and text.startswith(NOT_RUNNING), text
        # QEMU's get_error keeps the cancelled backup job's -EIO after a non-failover stop
        assert await oracle.replication_error() == "I/O error occurred"
