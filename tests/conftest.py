"""Shared pytest configuration: `tests` is a package so suites can import tests.support.

Skips are loud, and on CI (``CI=true``) every skip is turned into a failure that keeps the
skip's reason: on a machine prepared by .ci/run a test that cannot run is a broken setup,
not a pass (tests/support/ci.py, docs/testing.md). The one exception is named
OUTSIDE_REPOSITORY: a test against a reference file that is kept next to a development
checkout, not in the repository.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

from tests.support.ci import OUTSIDE_REPOSITORY, on_ci


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and on_ci():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if OUTSIDE_REPOSITORY in reason:
            return  # a reference file kept outside the repository: a clone cannot have it
        report.outcome = "failed"
        report.longrepr = (
            f"skipped on CI (CI={os.environ.get('CI')}), which counts as a failure: {reason}\n"
            "Install what the test needs (.ci/run) or fix the condition."
        )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    terminalreporter.section(
        f"{len(skipped)} SKIPPED: these tests proved nothing (on CI they fail, but for {OUTSIDE_REPOSITORY.strip()})",
        red=True,
    )
    for rep in skipped:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        terminalreporter.line(f"{rep.nodeid}: {reason}", red=True)
