"""The benchmark harness works: ``python -m tests.bench.run --quick`` starts every
configuration, measures it and reports a number for each measurement, in the printed
table and in the JSON file (the resync section's partition needs root for iptables;
without it the section kills the secondary instead).

Benchmarks are numbers, not pass/fail: nothing here asserts on a timing. What it does
assert is that no measurement silently went missing, and that the failover images the
harness checks byte for byte were the promised ones (a correctness result, not a time).
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
from tests.bench.fio import WORKLOADS
from tests.bench.setups import CONFIGS

ROOT = Path(__file__).resolve().parents[2]
SHM = Path("/dev/shm")
SHM_USABLE = SHM.is_dir() and os.access(SHM, os.W_OK)

pytestmark = pytest.mark.timeout(420)


async def run_quick(out: Path) -> tuple[int, str, str]:
    """Run the quick benchmark as `make bench` would; on a hang, interrupt it (its
    cleanup stops every process it started) and kill it by PID if that does not work."""
    # tmpfs when there is one: on this ext4 (mounted with discard) deleting randomly
    # written images takes half a minute; timings are not checked here anyway
    workdir = ["--workdir", str(SHM)] if SHM_USABLE else []
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.bench.run", "--quick", "--json", str(out), *workdir,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = await bounded(proc.communicate(), 360)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGINT)
            try:
                await bounded(proc.wait(), 30)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace")


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


async def test_quick_run_reports_every_measurement_for_every_configuration(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    rc, stdout, stderr = await run_quick(out)
    assert rc == 0, f"bench exited {rc}:\n{stderr[-3000:]}"
    results = json.loads(out.read_text())

    # throughput: every configuration x every fio workload, plus the client-side QD1 stream
    assert set(results["throughput"]) == set(CONFIGS)
    for config, res in results["throughput"].items():
        for wl in WORKLOADS:
            numbers = res["workloads"][wl.name]
            for key in ("mibps", "iops", "p50_us", "p99_us"):
                assert is_number(numbers[key]) and numbers[key] > 0, f"{config} {wl.name}: {key} = {numbers[key]}"
        assert res["qd1_client"]["writes"] > 0, config
        assert is_number(res["load_before"][0]), config

    # ratios of c against a and b, for every workload
    for label in ("c/a", "c/b", "c/b tls"):
        for wl in WORKLOADS:
            assert is_number(results["ratios"][label][wl.name]["iops"]), (label, wl.name)

    # checkpoints under load: cut and duration percentiles, latency with and without
    cp = results["checkpoint"]
    assert cp["checkpoints"] > 0 and not cp["checkpoint_failures"]
    for key in ("cut_ms", "duration_ms"):
        assert is_number(cp[key]["p50"]) and is_number(cp[key]["p99"]), key
    for phase in ("without", "with"):
        assert cp[phase]["writes"] > 0
        assert is_number(cp[phase]["all_ms"]["max"]) and is_number(cp[phase]["all_ms"]["p99.9"])
    assert cp["with"]["during_checkpoint_ms"]["n"] > 0, "no write overlapped a checkpoint call"

    # failover: both modes at every size, timed, and the image is the promised one
    points = results["failover"]["points"]
    assert {(p["mode"], p["dirty_mib"]) for p in points} == {
        (mode, mib) for mode in ("checkpoint", "latest") for mib in results["meta"]["plan"]["failover_mib"]
    }
    for p in points:
        assert is_number(p["duration_ms"]) and is_number(p["client_ms"]), p
        assert p["steps_ms"] and all(is_number(v) for v in p["steps_ms"].values()), p
        assert p["verified"], f"{p['mode']} failover after {p['dirty_mib']} MiB left the wrong image"

    # resync: after each partition the primary re-protected on its own with a bitmap resync
    # that sent what changed, a checksum resync after a lost record, and a full sync timed
    # against a plain copy of the same image; the images were identical after each
    rs = results["resync"]
    assert rs["outage"] == ("partition" if os.geteuid() == 0 else "kill")
    for row in rs["resyncs"]:
        assert row["kind"] == "bitmap", row
        assert row["sent"] >= row["changed_mib"] * 2**20, row  # every changed byte went over the link
        assert is_number(row["seconds"]) and is_number(row["copy_s"]), row
    assert [row["kind"] for row in rs["checksum"]] == ["checksum"] * len(rs["checksum"])
    assert rs["rounds"], "no full sync against a plain copy"
    for rd in rs["rounds"]:
        assert rd["full"]["kind"] == "full" and rd["full"]["copied"] == rs["size"], rd
        assert is_number(rd["plain"]["mibps"]) and is_number(rd["ratio"]), rd
    assert rs["identical_after_resyncs"] and rs["identical"]

    # and the human-readable table says the same
    for config in CONFIGS:
        assert config in stdout
    assert "cut (transaction)" in stdout and "Failover" in stdout
    assert "Resync:" in stdout and "plain copy" in stdout
