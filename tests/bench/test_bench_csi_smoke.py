"""The CSI benchmark's harness works: ``python -m tests.bench.csi --quick`` attaches a
Filesystem and a Block volume through the real node plugin, measures fio on the export,
the published device and the mounted file system, fails the mounted volume over under a
writer, and reports a number for each measurement, in the table and in the JSON file.

Numbers, not pass/fail: nothing here asserts on a timing. What it asserts is that no
measurement went missing and that the writer in the mounted file system never saw an I/O
error across the failovers (a correctness result: Latest mode keeps the pod's I/O going).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from pairvol.aio import bounded
from tests.bench.csi import CONFIGS, QUICK, RATIOS
from tests.bench.fio import WORKLOADS
from tests.support.ci import unavailable

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(300)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


async def test_quick_run_reports_the_attachment_costs_and_the_failover_stalls(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        unavailable("the CSI benchmark mounts file systems and creates loop devices: needs root")
    out = tmp_path / "bench-csi.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.bench.csi", "--quick", "--json", str(out),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        stdout_b, stderr_b = await bounded(proc.communicate(), 240)
    finally:
        if proc.returncode is None:  # a hang: interrupt it (its cleanup detaches), then kill
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGINT)
            try:
                await bounded(proc.wait(), 60)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
    stdout, stderr = stdout_b.decode(errors="replace"), stderr_b.decode(errors="replace")
    assert proc.returncode == 0, f"bench-csi exited {proc.returncode}:\n{stderr[-3000:]}"
    results = json.loads(out.read_text())
    # a detach that fails leaves the volume's attacher running after the run
    assert results["detach_failed"] == [], results["detach_failed"]

    assert set(results["throughput"]) == set(CONFIGS)
    for config, per in results["throughput"].items():
        for wl in WORKLOADS:
            for key in ("mibps", "iops", "p50_us", "p99_us"):
                value = per[wl.name][key]
                assert is_number(value) and value > 0, f"{config} {wl.name}: {key} = {value}"
    for label, _, _ in RATIOS:
        for wl in WORKLOADS:
            assert is_number(results["ratios"][label][wl.name]["iops"]), (label, wl.name)

    fo = results["failover"]
    assert len(fo["points"]) == QUICK.failovers
    assert fo["errors"] == [], f"the writer in the mounted file system saw I/O errors: {fo['errors'][:3]}"
    for point in fo["points"]:
        timed = {k: v for k, v in point.items() if k != "reprotect_s"}  # none after the last
        assert all(is_number(v) for v in timed.values()), point
    for key in ("stall_ms", "first_write_after_kill_ms", "promotion_returned_ms"):
        assert is_number(fo[key]["p50"]) and is_number(fo[key]["p99"]), key

    for config in CONFIGS:
        assert config in stdout
    assert "pod-visible stall" in stdout and "fs/export" in stdout
