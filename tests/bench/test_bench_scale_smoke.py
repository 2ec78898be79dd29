"""The scale benchmark's harness works: ``python -m tests.bench.scale --quick`` brings up
volumes in the local cluster, measures every number it reports, kills two nodes and
measures the failovers, and stops everything it started.

Numbers, not pass/fail: nothing here asserts on a timing. What it asserts is that no
measurement silently went missing, and that the request counter of the emulated API
server saw the clients the benchmark reports on.
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
from tests.support.ci import unavailable

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.timeout(300)]


async def run_quick(out: Path) -> tuple[int, str, str]:
    """Run it as `make bench-scale` would; on a hang, interrupt it (its cleanup stops every
    process it started) and kill it by PID if that does not work."""
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'tools'}:{os.environ.get('PATH', '')}"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.bench.scale", "--quick", "--json", str(out),
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = await bounded(proc.communicate(), 240)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                await bounded(proc.wait(), 60)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace")


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


async def test_quick_scale_run_reports_every_measurement(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        unavailable("needs root (network namespaces, cgroups)")
    out = tmp_path / "scale.json"
    rc, stdout, stderr = await run_quick(out)
    assert rc == 0, f"bench-scale exited {rc}:\n{stdout[-2000:]}\n{stderr[-3000:]}"
    res = json.loads(out.read_text())

    assert is_number(res["bringup"]["all_replicating_s"]) and res["bringup"]["per_volume_s"]["n"] == 3
    for probe in ("spec_to_observedGeneration", "checkpoint_annotation_to_status"):
        assert res["reconcile_latency_s"][probe]["n"] == 4, probe  # 3 volumes and the reference
        assert is_number(res["reconcile_latency_s"][probe]["p99"]), probe

    steady = res["steady"]
    assert steady["phases_at_start"] == {"Replicating": 4}
    # the counter saw the operator (it writes the status) and the agents (the primaries
    # renew their Leases, also in the steady window)
    assert res["requests_whole_run"]["operator"].get("patch replicatedvolumes/status", 0) > 0
    assert res["requests_whole_run"]["agents"].get("update leases", 0) > 0
    assert steady["by_verb_resource"]["agents"].get("update leases", 0) > 0
    assert is_number(steady["pairvol_requests_per_volume_minute"])
    assert steady["operator_cpu_s"] > 0 and res["operator"]["peak_rss_mib"] > 0

    rss = res["replica_rss_mib"]
    assert rss["agent"]["n"] == 8 and rss["agent"]["p50"] > 0 and rss["qsd"]["p50"] > 0

    fo = res["failover"]
    assert fo["single"]["volumes"] == 1 and is_number(fo["single"]["rto_s"]["p50"])
    assert fo["storm"]["volumes"] >= 2, "3 volumes on 2 nodes: one node holds at least 2 primaries"
    assert is_number(fo["storm"]["rto_s"]["p99"]) and is_number(fo["storm_p99_over_single"])

    for line in ("apply -> all Replicating", "API requests / volume / min", "storm RTO p50 / p99"):
        assert line in stdout
