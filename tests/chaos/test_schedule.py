"""How `python -m tests.chaos.run --duration` shares its time among the fault classes."""

from __future__ import annotations

from pathlib import Path

from tests.chaos.run import Ledger, Result, all_names, progress


def test_progress_counts_fault_injections_and_one_per_run_that_could_not_run() -> None:
    results = [
        Result("kill-agent", 1, exercised=4),
        Result("kill-agent", 2, exercised=3),
        Result("enospc", 1, exercised=1),
        Result("enospc", 2, skipped="the file system never filled"),
        Result("eio", 1, error="RuntimeError: boom", exercised=1),
    ]
    assert progress(results, "kill-agent") == 7
    assert progress(results, "enospc") == 2
    assert progress(results, "eio") == 1
    assert progress(results, "delay") == 0


def ledger(tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "ledger.jsonl", first_seed=100, faults=4)


def test_jobs_sharing_a_ledger_take_the_class_furthest_behind_over_all_of_them(tmp_path: Path) -> None:
    """A claimed run counts as the injections it will make, so a second job does not take
    the class the first one is already running; a finished run counts what it did."""
    job0, job1 = ledger(tmp_path), ledger(tmp_path)
    classes = ["kill-agent", "enospc", "api-slow"]
    assert job0.claim(classes) == ("kill-agent", 100)  # all at 0: the given order
    assert job1.claim(classes) == ("enospc", 100)
    assert job0.claim(classes) == ("api-slow", 100)
    job1.settle(Result("enospc", 100, exercised=1))
    assert job1.claim(classes) == ("enospc", 101)  # enospc 1 < 4 claimed for the others
    job0.settle(Result("kill-agent", 100, error="RuntimeError: boom"))  # counts 1, not 4
    assert job0.claim(classes) == ("kill-agent", 101)


def test_each_class_takes_its_seeds_in_turn_from_the_first(tmp_path: Path) -> None:
    job = ledger(tmp_path)
    seeds = [job.claim(["eio"]) for _ in range(3)]
    assert seeds == [("eio", 100), ("eio", 101), ("eio", 102)]


def test_a_repeatable_or_operator_level_class_is_expected_to_strike_faults_times(tmp_path: Path) -> None:
    job = ledger(tmp_path)
    assert job.expected("kill-agent") == 4
    assert job.expected("primary-isolated") == 4
    assert job.expected("crash-point") == 1
    assert set(all_names()) >= {"kill-agent", "primary-isolated", "crash-point"}
