"""Skips are loud, and on CI they fail.

A skipped test proves nothing, and on a machine set up by .ci/run nothing may be missing:
with ``CI`` set to true (as CI services do), a test that cannot run is a failure that names
what is missing. Locally a missing tool or privilege still skips, with the same message.
tests/conftest.py applies the rule to every skip, including ``skipif`` marks.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest

REPO = Path(__file__).resolve().parents[2]


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


#: The one kind of skip that stays a skip on CI: a test of conformance to a reference file
#: that lives outside the repository (next to a development checkout, not in a clone).
OUTSIDE_REPOSITORY = "reference outside the repository not present: "


def outside_repository(reason: str) -> NoReturn:
    """Skip, locally and on CI: the reference the test compares against is not here."""
    pytest.skip(OUTSIDE_REPOSITORY + reason)


def unavailable(reason: str) -> NoReturn:
    """Skip locally; fail on CI."""
    if on_ci():
        pytest.fail(f"{reason} (CI={os.environ.get('CI')}: a test that cannot run fails on CI)", pytrace=False)
    pytest.skip(reason)


TOOL_HINTS = {
    "helm": "run `make tools` (puts it in .venv/tools)",
    "kubectl": "run `make tools` (puts it in .venv/tools)",
    "promtool": "install Debian's `prometheus` package",
    "prometheus": "install Debian's `prometheus` package",
}


def find_tool(name: str) -> str | None:
    """The pinned binary of `make tools` if present, else the one on PATH."""
    local = REPO / ".venv" / "tools" / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def tool(name: str) -> str:
    """Path of a binary a test needs; skips locally / fails on CI when it is missing."""
    found = find_tool(name)
    if found is None:
        unavailable(f"{name} not found in .venv/tools or on PATH: {TOOL_HINTS.get(name, 'install it')}")
    return found
