"""fio as the load generator: the command line (pure), its JSON result (pure), and one
asynchronous run.

fio's ``nbd`` engine (libnbd) is a real, independent NBD client with a proper queue
depth, so the throughput numbers do not measure our own Python client. The JSON goes to
a file (``--output``): the engine prints "connected to NBD server" on stdout, which would
corrupt a JSON stream read from stdout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pairvol.aio import bounded
from tests.bench.errors import BenchError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str
    bs: str
    iodepth: int


WORKLOADS: tuple[Workload, ...] = (
    Workload("seq-write-1M", "write", "1M", 4),
    Workload("randwrite-4k-qd1", "randwrite", "4k", 1),
    Workload("randwrite-4k-qd16", "randwrite", "4k", 16),
)


def nbd_uri(socket: Path, export: str = "volume") -> str:
    return f"nbd+unix:///{export}?socket={socket}"


def fio_argv(
    workload: Workload, socket: Path, size_bytes: int, runtime_s: float, output: Path, ramp_s: float = 0.0
) -> list[str]:
    """The fio command for one workload against one NBD unix socket."""
    argv = [
        "fio",
        f"--name={workload.name}",
        "--ioengine=nbd",
        f"--uri={nbd_uri(socket)}",
        f"--rw={workload.rw}",
        f"--bs={workload.bs}",
        f"--iodepth={workload.iodepth}",
        f"--size={size_bytes}",
        "--time_based",
        f"--runtime={max(1, round(runtime_s))}",
        "--randrepeat=0",
        "--norandommap",
        "--output-format=json",
        f"--output={output}",
    ]
    if ramp_s > 0:
        argv.append(f"--ramp_time={max(1, round(ramp_s))}")
    return argv


def parse_fio(doc: dict[str, Any]) -> dict[str, float | None]:
    """Throughput, IOPS and completion-latency percentiles (µs) of a write job."""
    jobs = doc.get("jobs") or []
    if not jobs:
        raise BenchError("fio output has no jobs")
    job = jobs[0]
    if job.get("error"):
        raise BenchError(f"fio job {job.get('jobname')} failed with error {job['error']}")
    write = job.get("write") or {}
    if not write.get("total_ios"):
        raise BenchError(f"fio job {job.get('jobname')} completed no writes")
    clat = write.get("clat_ns") or {}
    pct: dict[str, float] = clat.get("percentile") or {}

    def us(key: str) -> float | None:
        value = pct.get(key)
        return None if value is None else float(value) / 1000

    return {
        "mibps": float(write["bw_bytes"]) / (1 << 20),
        "iops": float(write["iops"]),
        "p50_us": us("50.000000"),
        "p99_us": us("99.000000"),
        "p99.9_us": us("99.900000"),
        "max_us": float(clat["max"]) / 1000 if "max" in clat else None,
        "ios": float(write["total_ios"]),
    }


def require_fio() -> str:
    path = shutil.which("fio")
    if path is None:
        raise BenchError("fio not found on PATH; install it (Debian: apt-get install fio)")
    return path


async def run_fio(
    workload: Workload, socket: Path, size_bytes: int, runtime_s: float, workdir: Path, ramp_s: float = 0.0
) -> dict[str, float | None]:
    """Run one fio job to completion and return its parsed numbers."""
    require_fio()
    output = workdir / f"fio-{workload.name}.json"
    argv = fio_argv(workload, socket, size_bytes, runtime_s, output, ramp_s)
    log.debug("running %s", " ".join(argv))
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await bounded(proc.communicate(), timeout=runtime_s + ramp_s + 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BenchError(f"fio {workload.name} did not finish within {runtime_s + ramp_s + 60:.0f} s") from None
    if proc.returncode != 0:
        text = (err or out).decode(errors="replace").strip()
        raise BenchError(f"fio {workload.name} on {socket} exited with {proc.returncode}: {text}")
    text = await asyncio.to_thread(output.read_text)
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise BenchError(f"fio {workload.name} wrote no valid JSON to {output}: {exc}") from exc
    return parse_fio(doc)
