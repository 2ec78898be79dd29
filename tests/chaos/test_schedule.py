"""How `python -m tests.chaos.run --duration` shares its time among the fault classes."""

from __future__ import annotations

from tests.chaos.run import Result, all_names, progress, share


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


def test_jobs_get_every_class_exactly_once_in_the_given_order() -> None:
    names = all_names()
    groups = share(names, 2)
    assert len(groups) == 2
    assert sorted(c for g in groups for c in g) == sorted(names)
    for g in groups:
        assert g == [c for c in names if c in g]


def test_more_jobs_than_classes_leaves_no_empty_job() -> None:
    groups = share(["kill-agent", "delay"], 4)
    assert sorted(groups) == [["delay"], ["kill-agent"]]
