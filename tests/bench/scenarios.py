"""The measurements: fio throughput per configuration, checkpoint cut time and primary
write stall, and failover duration against the data changed since the last checkpoint.

Each scenario starts its own processes (through tests.bench.setups or
tests.support.agents), tears them down by PID when it ends or fails, and returns plain
JSON-able dicts; tests.bench.run prints them and computes the ratios.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import statistics
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pairvol.aio import bounded
from pairvol.nbd import NBDClient, NBDError
from tests.bench.errors import BenchError
from tests.bench.fio import WORKLOADS, run_fio
from tests.bench.setups import pin_trees, setup
from tests.bench.stats import since_cut_report, stall_report, summary
from tests.bench.writer import finish_writer, run_writer
from tests.support.agents import Agent, AgentCallError, pair

log = logging.getLogger(__name__)

MiB = 1 << 20


async def loadavg() -> list[float]:
    """The 1/5/15-minute load averages: the machine is shared, so every number carries one."""
    text = await asyncio.to_thread(Path("/proc/loadavg").read_text)
    return [float(x) for x in text.split()[:3]]


@dataclass(frozen=True)
class Plan:
    """How long and how big: --quick shrinks every dimension, nothing else changes."""

    size: int
    runtime_s: float
    ramp_s: float
    qd1_seconds: float
    stall_seconds: float
    checkpoint_interval_s: float
    failover_mib: tuple[int, ...]
    rounds: int = 1
    failover_modes: tuple[str, ...] = ("checkpoint", "latest")

    @property
    def failover_size(self) -> int:
        return (max(self.failover_mib, default=0) + 64) * MiB


FULL = Plan(
    size=256 * MiB,
    runtime_s=5,
    ramp_s=1,
    qd1_seconds=8,
    stall_seconds=20,
    checkpoint_interval_s=1.0,
    failover_mib=(0, 16, 64, 256),
    rounds=3,
)
QUICK = Plan(
    size=256 * MiB,
    runtime_s=1,
    ramp_s=0,
    qd1_seconds=1.5,
    stall_seconds=3,
    checkpoint_interval_s=1.0,
    failover_mib=(0, 8),
)


# ---------------------------------------------------------------------------- throughput


def median_of(rounds: Sequence[dict[str, float | None]]) -> dict[str, float | None]:
    """Per metric, the median over rounds (rounds with a missing value are skipped)."""
    out: dict[str, float | None] = {}
    for key in rounds[0]:
        values = [v for r in rounds if (v := r.get(key)) is not None]
        out[key] = statistics.median(values) if values else None
    return out


async def throughput(
    configs: Sequence[str], workdir: Path, plan: Plan, remote_cpus: set[int] | None = None
) -> dict[str, Any]:
    """fio's workloads against every configuration, interleaved: all configurations run
    side by side (idle ones cost nothing), and each round runs one workload on each of
    them in turn (rotating the order), so the neighbours' load drifts over all of them
    alike and per-round ratios compare like with like. Then the QD1 client-side write
    stream on each. ``remote_cpus``: the replica's processes are bound to these CPUs after
    the setup (``--two-nodes``; the harness, fio and the primary side keep the others)."""
    result: dict[str, Any] = {cfg: {"workloads": {}} for cfg in configs}
    async with contextlib.AsyncExitStack() as stack:
        targets = {}
        for cfg in configs:
            t0 = time.monotonic()
            targets[cfg] = await stack.enter_async_context(setup(cfg, workdir / cfg, plan.size))
            result[cfg]["setup_s"] = round(time.monotonic() - t0, 3)
            result[cfg]["pids"] = targets[cfg].pids
            if remote_cpus is not None and targets[cfg].remote_pids:
                threads = await asyncio.to_thread(pin_trees, targets[cfg].remote_pids, remote_cpus)
                log.info("%s: %d threads of the replica's node bound to CPU %s", cfg, threads, sorted(remote_cpus))
            result[cfg]["load_before"] = await loadavg()
        for wl in WORKLOADS:
            rounds: dict[str, list[dict[str, float | None]]] = {cfg: [] for cfg in configs}
            for rnd in range(plan.rounds):
                order = list(configs[rnd % len(configs) :]) + list(configs[: rnd % len(configs)])
                for cfg in order:
                    log.info("fio %s on %s (round %d/%d, %.0f s)", wl.name, cfg, rnd + 1, plan.rounds, plan.runtime_s)
                    numbers = await run_fio(
                        wl, targets[cfg].socket, plan.size, plan.runtime_s, workdir / cfg, plan.ramp_s
                    )
                    numbers["load1"] = (await loadavg())[0]
                    rounds[cfg].append(numbers)
            for cfg in configs:
                result[cfg]["workloads"][wl.name] = {**median_of(rounds[cfg]), "rounds": rounds[cfg]}
        for cfg in configs:
            out = workdir / cfg / "qd1.rec"
            log.info("QD1 client write stream on %s (%.0f s)", cfg, plan.qd1_seconds)
            proc = await run_writer(targets[cfg].socket, plan.qd1_seconds, out)
            writes = await finish_writer(proc, out, plan.qd1_seconds + 60)
            result[cfg]["qd1_client"] = stall_report(writes, [])
            result[cfg]["load_after"] = await loadavg()
        log.info("throughput measured; stopping all configurations")
    return result


# ---------------------------------------------------------------------------- checkpoints

COW_METRIC = "pairvol_cow_copied_bytes_total"


async def settled_cow_bytes(agent: Agent, previous: float | None, timeout: float = 10.0) -> float:
    """The copy-before-write counter once the last checkpoint's old generation is retired.

    The agent retires the old generation (cancels its job, which is when the copied
    bytes are counted) in the background after answering the checkpoint call, so the
    counter is read until it moves past ``previous`` and then holds still.
    """
    deadline = time.monotonic() + timeout
    last = metric_value(await agent.metrics(), COW_METRIC)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        now = metric_value(await agent.metrics(), COW_METRIC)
        if now == last and (previous is None or now > previous):
            return now
        last = now
    return last


def metric_value(text: str, name: str) -> float:
    """The sum of a Prometheus metric's samples (all label sets) in text format."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    if not found:
        raise BenchError(f"the agent's /metrics has no {name}; has the metric been renamed?")
    return total


async def checkpoint_stall(workdir: Path, plan: Plan) -> dict[str, Any]:
    """QD1 4 KiB random writes on a pairvol primary, first without checkpoints, then with
    one checkpoint every interval; cut/duration as the agent reports them, and each
    write's latency as the client saw it."""
    result: dict[str, Any] = {"load_before": await loadavg(), "interval_s": plan.checkpoint_interval_s}
    async with setup("c-pairvol", workdir, plan.size) as target:
        assert target.secondary is not None
        secondary = target.secondary
        await secondary.checkpoint()  # both phases start right after a cut
        # copy-before-write bytes are counted when a generation's job ends (at the next
        # checkpoint), so each phase is closed by a checkpoint before the counter is read
        cow0 = await settled_cow_bytes(secondary, None)

        out0 = workdir / "without.rec"
        proc = await run_writer(target.socket, plan.stall_seconds, out0, seed=2)
        without = await finish_writer(proc, out0, plan.stall_seconds + 60)
        await secondary.checkpoint()
        cow1 = await settled_cow_bytes(secondary, cow0)

        out1 = workdir / "with.rec"
        proc = await run_writer(target.socket, plan.stall_seconds, out1, seed=3)
        windows: list[tuple[int, int]] = []
        cuts: list[float] = []
        durations: list[float] = []
        failures: list[str] = []
        await asyncio.sleep(min(0.5, plan.checkpoint_interval_s / 2))  # let the writer connect
        next_at = time.monotonic()
        while proc.returncode is None:
            next_at += plan.checkpoint_interval_s
            start = time.monotonic_ns()
            try:
                reply = await secondary.checkpoint()
            except AgentCallError as exc:
                failures.append(str(exc))
            else:
                cuts.append(float(reply["cutMs"]))
                durations.append(float(reply["durationMs"]))
            windows.append((start, time.monotonic_ns()))
            with contextlib.suppress(TimeoutError):
                await bounded(asyncio.shield(proc.wait()), max(0.0, next_at - time.monotonic()))
        with_cp = await finish_writer(proc, out1, 60)
        before_last = await settled_cow_bytes(secondary, None, timeout=2.0)
        await secondary.checkpoint()
        cow2 = await settled_cow_bytes(secondary, before_last)
    # only the windows that fell inside the write stream count as "checkpoints under load"
    first, last = with_cp[0].start_ns, with_cp[-1].end_ns
    under_load = [w for w in windows if w[0] <= last and w[1] >= first]
    result.update(
        {
            "checkpoints": len(cuts),
            "checkpoint_failures": failures,
            "cut_ms": summary(cuts, (50, 99)),
            "duration_ms": summary(durations, (50, 99)),
            "without": stall_report(without, []),
            "with": stall_report(with_cp, under_load),
            "with_since_cut": since_cut_report(with_cp, under_load, edges_ms=(0, 20, 100, 300)),
            "cow": {
                "without_bytes": cow1 - cow0,
                "with_bytes": cow2 - cow1,
                "without_per_write_bytes": (cow1 - cow0) / len(without),
                "with_per_write_bytes": (cow2 - cow1) / len(with_cp),
            },
            "load_after": await loadavg(),
        }
    )
    return result


# ---------------------------------------------------------------------------- failover


def pattern(tag: bytes, index: int) -> bytes:
    """1 MiB of recognisable data: the tag and the MiB index, repeated."""
    return struct.pack(">4sI", tag, index) * (MiB // 8)


async def write_region(client: NBDClient, mib: int, tag: bytes, depth: int = 8) -> None:
    """Write ``mib`` MiB of ``tag`` pattern from offset 0, ``depth`` requests in flight."""
    sem = asyncio.Semaphore(depth)

    async def one(i: int) -> None:
        async with sem:
            await client.pwrite(pattern(tag, i), i * MiB)

    await asyncio.gather(*(one(i) for i in range(mib)))
    await client.flush()


async def region_matches(client: NBDClient, mib: int, tag: bytes) -> bool:
    for i in range(mib):
        if await client.pread(MiB, i * MiB) != pattern(tag, i):
            return False
    return True


async def probe_write(socket: Path, offset: int, timeout: float) -> float:
    """Seconds until a fresh connection to ``socket`` gets one 4 KiB write acknowledged."""
    t0 = time.monotonic()
    last = "never connected"
    while time.monotonic() - t0 < timeout:
        try:
            client = await NBDClient.connect_unix(str(socket))
        except NBDError as exc:
            last = str(exc)
            await asyncio.sleep(0.002)
            continue
        try:
            await client.pwrite(b"\xa5" * 4096, offset)
            return time.monotonic() - t0
        except NBDError as exc:
            last = str(exc)
        finally:
            await client.close()
        await asyncio.sleep(0.002)
    raise BenchError(f"the new primary's export {socket} accepted no write within {timeout:.0f} s: {last}")


async def failover_point(workdir: Path, plan: Plan, mode: str, mib: int) -> dict[str, Any]:
    """Fill ``mib`` MiB, checkpoint, overwrite it, SIGKILL the primary, fail over; time it
    (agent-reported and client-observed) and check the image is the promised one."""
    size = plan.failover_size
    try:
        async with pair(workdir, size=str(size), sync="none") as (primary, secondary):
            async with await primary.nbd() as client:
                await write_region(client, mib, b"OLD.")
            cp = await secondary.checkpoint()
            t_dirty = time.monotonic()
            async with await primary.nbd() as client:
                await write_region(client, mib, b"NEW.")
            dirty_s = time.monotonic() - t_dirty
            primary.kill()
            await primary.wait_exit()

            t0 = time.monotonic()
            probe = asyncio.create_task(probe_write(secondary.export_socket, size - 4096, 120))
            try:
                reply = await secondary.failover(epoch=3, mode=mode)
                api_s = time.monotonic() - t0
                client_s = await probe
            finally:
                probe.cancel()
                with contextlib.suppress(BaseException):
                    await probe
            async with await secondary.nbd() as client:
                verified = await region_matches(client, mib, b"OLD." if mode == "checkpoint" else b"NEW.")
            secondary.kill()  # no clean flush of a throw-away image (see setups._qsd)
    finally:
        await asyncio.to_thread(shutil.rmtree, workdir, True)
    return {
        "mode": mode,
        "dirty_mib": mib,
        "duration_ms": float(reply["durationMs"]),
        "steps_ms": reply.get("stepsMs"),
        "api_call_ms": round(api_s * 1000, 3),
        "client_ms": round(client_s * 1000, 3),
        "checkpoint_id": reply.get("checkpointId"),
        "checkpoint_before": cp["id"],
        "dirty_write_mibps": round(mib / dirty_s, 1) if mib and dirty_s > 0 else None,
        "verified": verified,
    }


async def failover_series(workdir: Path, plan: Plan, modes: Sequence[str]) -> dict[str, Any]:
    points = []
    load_before = await loadavg()
    for mode in modes:
        for mib in plan.failover_mib:
            log.info("failover %s after %d MiB changed", mode, mib)
            points.append(await failover_point(workdir / f"failover-{mode}-{mib}", plan, mode, mib))
    return {"load_before": load_before, "points": points, "load_after": await loadavg()}
