"""Fixtures of the chart tests: the real tools, found once per session.

A missing helm or promtool fails the tests with the command that installs it; nothing is
skipped silently (CI installs both: .ci/run and `make tools`).
"""

from __future__ import annotations

import pytest
from chart_support import tool


@pytest.fixture(scope="session")
def helm() -> str:
    return tool("helm")


@pytest.fixture(scope="session")
def promtool() -> str:
    return tool("promtool")
