"""Shared pytest configuration: `tests` is a package so suites can import tests.support.

Skips are loud, and on CI (``CI=true``) every skip is turned into a failure that keeps the
skip's reason: on a machine prepared by .ci/run a test that cannot run is a broken setup,
not a pass (tests/support/ci.py, docs/testing.md). The one exception is named
OUTSIDE_REPOSITORY: a test against a reference file that is kept next to a development
checkout, not in the repository.
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import os
import sys
import threading
from collections.abc import Generator, Iterator
from typing import Any

import pytest
from _pytest._code import code as _pytest_code

from tests.support.ci import OUTSIDE_REPOSITORY, on_ci
from tests.support.vm import BACKGROUND_GUEST, BackgroundGuest


def _lineno_of_entry(entry: Any) -> int:
    # Python 3.11 may give a traceback entry no line number (tb_lineno None, e.g. for an
    # exception raised by a signal handler between two instructions of a frame); pytest
    # 8.4 then crashes with INTERNALERROR while rendering the failure, which ends the whole
    # session and hides which test failed. Such an entry is shown at its function's first line.
    line = entry._rawentry.tb_lineno
    return (line if line is not None else entry._rawentry.tb_frame.f_code.co_firstlineno) - 1


_pytest_code.TracebackEntry.lineno = property(_lineno_of_entry)  # type: ignore[assignment, method-assign]

HANG_REPORT_MARGIN_S = 20.0


def _dump_tasks(header: str) -> None:
    """In the event loop's thread: every task's await chain, to the real stderr."""
    out = sys.__stderr__
    assert out is not None
    tasks = asyncio.all_tasks()
    print(f"{header}: {len(tasks)} asyncio task(s)", file=out, flush=True)
    for task in tasks:
        task.print_stack(limit=12, file=out)
    out.flush()


def _report_hang(nodeid: str, after_s: float) -> None:
    """A test about to hit its timeout: where every thread and every asyncio task waits.
    Written to the real stderr, so it reaches the log even if the timeout ends the session."""
    out = sys.__stderr__
    assert out is not None
    header = f"\n=== {nodeid} still running after {after_s:.0f} s"
    print(f"{header}: threads ===", file=out, flush=True)
    faulthandler.dump_traceback(file=out, all_threads=True)
    for obj in gc.get_objects():
        if isinstance(obj, asyncio.AbstractEventLoop) and obj.is_running():
            obj.call_soon_threadsafe(_dump_tasks, header)


@pytest.fixture(autouse=True)
def _report_where_a_test_hangs(request: pytest.FixtureRequest) -> Iterator[None]:
    marker = request.node.get_closest_marker("timeout")
    timeout = float(marker.args[0]) if marker and marker.args else float(request.config.getini("timeout") or 0)
    if timeout <= HANG_REPORT_MARGIN_S:
        yield
        return
    after = timeout - HANG_REPORT_MARGIN_S
    timer = threading.Timer(after, _report_hang, (request.node.nodeid, after))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


# ---------------------------------------------------------------- a slower machine

_SLOWDOWN = float(os.environ.get("PAIRVOL_TEST_SLOWDOWN", "1") or "1")


def _scale_time_limits(config: pytest.Config, items: list[pytest.Item]) -> None:
    """PAIRVOL_TEST_SLOWDOWN=K (the emulated guest sets it): every test's time limit is K times
    what its ``timeout`` marker (or the ini's) says; start-up waits scale the same way
    (tests/support/agents.py, tests/support/csi.py)."""
    if _SLOWDOWN <= 1:
        return
    default = float(config.getini("timeout") or 0)
    for item in items:
        marker = item.get_closest_marker("timeout")
        limit = float(marker.args[0]) if marker is not None and marker.args else default
        if limit > 0:
            item.add_marker(pytest.mark.timeout(limit * _SLOWDOWN), append=False)


# ---------------------------------------------------------------- the guest, in the background
#
# The emulated VM of test_csi_kernel_nbd.py (marker ``guest_vm``) is CPU-bound for ~8
# minutes and waits on nothing. When other tests run in the same session, it is started at the
# session's start at nice 19 and its test moves to the end, where it collects the outcome; the
# local-cluster tests (tests/e2e, tests/localcluster), which mostly wait, run first, so the VM
# lives on the CPU they leave idle. PAIRVOL_GUEST_BACKGROUND=0 runs it in its turn instead.

_GUEST_ITEM = pytest.StashKey[pytest.Item]()
_MOSTLY_WAITING = ("e2e", "localcluster")


def _runs_beside_the_guest(item: pytest.Item) -> bool:
    parts = item.path.relative_to(item.config.rootpath).parts
    return len(parts) > 1 and parts[0] == "tests" and parts[1] in _MOSTLY_WAITING


def _guest_last(config: pytest.Config, items: list[pytest.Item]) -> None:
    guests = [item for item in items if item.get_closest_marker("guest_vm")]
    if len(guests) != 1 or len(items) == 1 or os.environ.get("PAIRVOL_GUEST_BACKGROUND", "1") == "0":
        return
    rest = [item for item in items if item is not guests[0]]
    items[:] = [*sorted(rest, key=lambda item: not _runs_beside_the_guest(item)), guests[0]]  # stable
    config.stash[_GUEST_ITEM] = guests[0]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _scale_time_limits(config, items)
    _guest_last(config, items)


@pytest.fixture(scope="session", autouse=True)
def _guest_in_the_background(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    item = request.config.stash.get(_GUEST_ITEM, None)
    if item is None:
        yield
        return
    module: Any = getattr(item, "module", None)
    guest = BackgroundGuest(
        module.guest_script(module.BACKGROUND_SLOWDOWN), tmp_path_factory.mktemp("guest"), module.BACKGROUND_TIMEOUT_S
    )
    guest.start()
    request.config.stash[BACKGROUND_GUEST] = guest
    try:
        yield
    finally:
        guest.cancel()  # collected by its test by now, unless the session ended early


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
