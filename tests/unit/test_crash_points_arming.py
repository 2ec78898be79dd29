"""How ``PAIRVOL_CRASH_AT`` arms a crash point: which occurrence, and whether the agent
dies there (SIGKILL, the default) or freezes (SIGSTOP) for a test to break something else
at that step."""

from __future__ import annotations

import signal

import pytest

from pairvol.agent import crashpoints

POINT = crashpoints.CrashPoint("test.arming", "a point only this test reaches")  # not registered


@pytest.fixture(autouse=True)
def _fresh_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crashpoints, "_hits", {})


@pytest.fixture
def signals(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sent: list[int] = []
    monkeypatch.setattr(crashpoints.os, "kill", lambda pid, sig: sent.append(sig))
    return sent


@pytest.mark.parametrize(
    ("armed", "expected"),
    [
        ("test.arming", [signal.SIGKILL]),
        ("test.arming:1", [signal.SIGKILL]),
        ("test.arming:1:stop", [signal.SIGSTOP]),
        ("test.arming:1:kill", [signal.SIGKILL]),
        ("other.point, test.arming:1:stop", [signal.SIGSTOP]),
        ("test.arming:1:explode", [signal.SIGKILL]),  # an unknown action is the default
        ("other.point", []),
        ("", []),
    ],
)
def test_the_first_occurrence_kills_or_freezes_as_armed(
    monkeypatch: pytest.MonkeyPatch, signals: list[int], armed: str, expected: list[int]
) -> None:
    monkeypatch.setenv(crashpoints.ENV, armed)
    crashpoints.hit(POINT)
    assert signals == expected


def test_a_later_occurrence_acts_only_when_it_comes(monkeypatch: pytest.MonkeyPatch, signals: list[int]) -> None:
    monkeypatch.setenv(crashpoints.ENV, "test.arming:3:stop")
    crashpoints.hit(POINT)
    crashpoints.hit(POINT)
    assert signals == []
    crashpoints.hit(POINT)
    assert signals == [signal.SIGSTOP]
    crashpoints.hit(POINT)
    assert signals == [signal.SIGSTOP]


def test_the_point_and_the_signal_are_said_on_stderr_first(
    monkeypatch: pytest.MonkeyPatch, signals: list[int], capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(crashpoints.ENV, "test.arming:1:stop")
    crashpoints.hit(POINT)
    assert "crash point test.arming reached (occurrence 1): SIGSTOP" in capsys.readouterr().err
