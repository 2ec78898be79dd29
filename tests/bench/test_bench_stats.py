"""The arithmetic behind the reported numbers: percentiles, ratios, fio's JSON, and which
writes count as stalled by a checkpoint. Pure functions, no processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench import stats
from tests.bench.errors import BenchError
from tests.bench.fio import WORKLOADS, fio_argv, parse_fio
from tests.bench.run import compute_ratios, parse_args
from tests.bench.scenarios import metric_value
from tests.bench.stats import Write, percentile, ratio, stall_report, summary, table


def test_percentile_is_nearest_rank_and_never_interpolates() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 99.9) == 100
    assert percentile(values, 100) == 100
    assert percentile(values, 0) == 1
    assert percentile([7.0], 99.9) == 7.0
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # unsorted input


def test_percentile_outside_0_to_100_is_refused() -> None:
    with pytest.raises(ValueError, match=r"outside 0\.\.100"):
        percentile([1.0], 101)


def test_summary_has_count_max_and_requested_percentiles() -> None:
    assert summary([1.0, 2.0, 3.0, 4.0], (50, 99.9)) == {"n": 4, "max": 4.0, "p50": 2.0, "p99.9": 4.0}
    assert summary([], (50,)) == {"n": 0, "max": None, "p50": None}


def test_ratio_is_none_when_a_side_is_missing_or_zero() -> None:
    assert ratio(9.0, 10.0) == pytest.approx(0.9)
    assert ratio(None, 1.0) is None
    assert ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None


def test_a_write_in_flight_during_a_checkpoint_call_is_attributed_to_it() -> None:
    ms = 1_000_000
    writes = [
        Write(0, 1 * ms),  # before the checkpoint
        Write(9 * ms, 15 * ms),  # starts before, ends inside: stalled by the checkpoint
        Write(30 * ms, 12 * ms),  # after it: a stall, but not the checkpoint's
        Write(50 * ms, 1 * ms),
    ]
    report = stall_report(writes, [(10 * ms, 20 * ms)], threshold_ms=10)
    assert report["writes"] == 4
    assert report["during_checkpoint_ms"]["n"] == 1
    assert report["during_checkpoint_ms"]["max"] == 15.0
    assert report["outside_checkpoint_ms"]["max"] == 12.0
    assert report["all_ms"]["max"] == 15.0
    assert report["over_threshold"] == 2
    assert report["over_threshold_during_checkpoint"] == 1
    assert report["iops"] == pytest.approx(4 / 0.051)


def test_without_checkpoints_nothing_is_attributed() -> None:
    report = stall_report([Write(0, 2_000_000)], [])
    assert report["during_checkpoint_ms"]["n"] == 0
    assert report["over_threshold_during_checkpoint"] == 0


FIO_DOC = {
    "jobs": [
        {
            "jobname": "randwrite-4k-qd1",
            "error": 0,
            "write": {
                "total_ios": 1000,
                "bw_bytes": 4 * 1048576,
                "iops": 1024.0,
                "clat_ns": {
                    "max": 9_000_000,
                    "percentile": {"50.000000": 150_000, "99.000000": 800_000, "99.900000": 2_000_000},
                },
            },
        }
    ]
}


def test_fio_json_becomes_mibps_iops_and_microseconds() -> None:
    got = parse_fio(FIO_DOC)
    assert got["mibps"] == 4.0
    assert got["iops"] == 1024.0
    assert (got["p50_us"], got["p99_us"], got["p99.9_us"], got["max_us"]) == (150.0, 800.0, 2000.0, 9000.0)


def test_a_fio_job_without_writes_or_with_an_error_is_an_error() -> None:
    empty = {"jobs": [{"jobname": "x", "error": 0, "write": {"total_ios": 0}}]}
    with pytest.raises(BenchError, match="completed no writes"):
        parse_fio(empty)
    with pytest.raises(BenchError, match="failed with error 5"):
        parse_fio({"jobs": [{"jobname": "x", "error": 5}]})
    with pytest.raises(BenchError, match="no jobs"):
        parse_fio({})


def test_fio_runs_time_based_on_the_nbd_engine_and_writes_json_to_a_file() -> None:
    argv = fio_argv(WORKLOADS[2], Path("/run/x.sock"), 1 << 30, 5, Path("/tmp/o.json"))
    assert "--ioengine=nbd" in argv
    assert "--uri=nbd+unix:///volume?socket=/run/x.sock" in argv
    assert "--iodepth=16" in argv and "--bs=4k" in argv and "--rw=randwrite" in argv
    assert "--time_based" in argv and "--runtime=5" in argv
    assert "--output=/tmp/o.json" in argv and "--output-format=json" in argv


def test_ratios_compare_pairvol_with_bare_and_quorum_per_workload() -> None:
    def res(iops: float) -> dict[str, object]:
        return {"workloads": {"randwrite-4k-qd1": {"mibps": iops / 256, "iops": iops, "p50_us": 100.0, "p99_us": 1.0}}}

    got = compute_ratios({"a-bare": res(1000), "b-quorum": res(500), "c-pairvol": res(450)})
    assert got["c/a"]["randwrite-4k-qd1"]["iops"] == pytest.approx(0.45)
    assert got["c/b"]["randwrite-4k-qd1"]["iops"] == pytest.approx(0.9)
    assert "c/b tls" not in got  # TLS configurations were not run


def test_unknown_configuration_names_are_refused_with_the_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--configs", "a-bare,z-nothing"])
    assert "unknown z-nothing; choose from a-bare" in capsys.readouterr().err


def test_no_tls_drops_the_tls_configurations() -> None:
    assert parse_args(["--no-tls"]).configs == ["a-bare", "b-quorum", "c-pairvol"]


def test_table_aligns_columns() -> None:
    text = table(["config", "IOPS"], [["a", "1"], ["bbb", "1000"]])
    assert text.splitlines() == ["config  IOPS", "------  ----", "a          1", "bbb     1000"]


def test_writes_are_bucketed_by_time_since_the_previous_checkpoint_call() -> None:
    ms = 1_000_000
    windows = [(100 * ms, 110 * ms), (1100 * ms, 1110 * ms)]
    writes = [
        Write(50 * ms, 1 * ms),  # before the first checkpoint: not counted
        Write(105 * ms, 1 * ms),  # during a call: not counted here
        Write(120 * ms, 8 * ms),  # 10 ms after the first call ended
        Write(500 * ms, 1 * ms),  # 390 ms after
        Write(1150 * ms, 6 * ms),  # 40 ms after the second call ended
    ]
    got = stats.since_cut_report(writes, windows, edges_ms=(0, 100, 300))
    assert [(b["from_ms"], b["to_ms"], b["n"], b["max"]) for b in got] == [
        (0, 100, 2, 8.0),
        (100, 300, 0, None),
        (300, None, 1, 1.0),
    ]


def test_ratios_are_paired_within_rounds_and_the_median_is_reported() -> None:
    def res(*iops: float) -> dict[str, object]:
        rounds = [{"mibps": i / 256, "iops": i, "p50_us": 100.0, "p99_us": 1.0} for i in iops]
        return {"workloads": {"randwrite-4k-qd1": {"iops": sorted(iops)[len(iops) // 2], "rounds": rounds}}}

    # the machine got slower in round 2 for both; paired ratios stay at 0.9
    got = compute_ratios({"b-quorum": res(1000, 500, 1000), "c-pairvol": res(900, 450, 900)})
    assert got["c/b"]["randwrite-4k-qd1"]["iops"] == pytest.approx(0.9)
    assert got["c/b"]["randwrite-4k-qd1"]["iops_range"] == pytest.approx([0.9, 0.9])


def test_metric_value_sums_the_samples_of_one_metric_only() -> None:
    text = "\n".join(
        [
            "# HELP pairvol_cow_copied_bytes_total Bytes copied",
            'pairvol_cow_copied_bytes_total{volume="vol"} 131072.0',
            'pairvol_cow_copied_bytes_created{volume="vol"} 1.7e9',
            "pairvol_cow_copied_bytes_total_other 5.0",
        ]
    )
    assert metric_value(text, "pairvol_cow_copied_bytes_total") == 131072.0
    with pytest.raises(BenchError, match="has no pairvol_missing"):
        metric_value(text, "pairvol_missing")


def test_the_diagnostic_unix_link_configuration_is_opt_in() -> None:
    assert "b-quorum-unix" not in parse_args([]).configs
    assert parse_args(["--configs", "b-quorum,b-quorum-unix"]).configs == ["b-quorum", "b-quorum-unix"]


def test_two_nodes_binds_a_whole_process_tree_and_only_measures_throughput() -> None:
    """``--two-nodes`` models two one-CPU nodes: every thread of a process and of its
    children (those started before and after) lands on the replica's CPU."""
    import os
    import subprocess
    import time

    from tests.bench.run import parse_args
    from tests.bench.setups import pin_trees

    if not {0, 1} <= os.sched_getaffinity(0):
        pytest.skip("needs CPUs 0 and 1")
    parent = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30; wait"])
    try:
        deadline = time.monotonic() + 10
        while not Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert pin_trees([parent.pid], {1}) >= 2
        child = int(Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()[0])
        assert os.sched_getaffinity(parent.pid) == os.sched_getaffinity(child) == {1}
    finally:
        parent.kill()
        parent.wait()
    with pytest.raises(SystemExit):
        parse_args(["--two-nodes"])  # every section: refused, it models throughput only
    assert parse_args(["--two-nodes", "--sections", "throughput"]).two_nodes
