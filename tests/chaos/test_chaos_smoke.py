"""A short, deterministic subset of the fault injector (docs/chaos.md): fixed seeds across
fault classes, each a real run against real agents, judged by the checker.

A case that a known, unfixed bug breaks is marked with its failure number in issue 7 and
the invariant it breaks::

    bug, mark = known(6, "reprotect", "the second peer loss breaks re-protection")
    pytest.param("peer-loss-x3", 1, bug, marks=mark, id="peer-loss-x3-1")

so it is xfail(strict=True) for exactly that violation: any other violation fails it, and
so does the fix (the mark has to go). None is marked today: the failures these seeds hit
before the link gate (1, 6, 8) are fixed on main.
"""

from __future__ import annotations

import os
import shutil

import pytest

from tests.chaos.faults import by_name
from tests.chaos.run import run_one

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("iptables") is None, reason="needs root, ip netns and iptables"
    ),
]


class KnownBug(AssertionError):
    """The violation a known, unfixed bug causes (and only that one)."""


def known(failure: int, invariant: str, what: str) -> tuple[str, pytest.MarkDecorator]:
    """(bug, mark) for a case that breaks `invariant` because of issue 7's failure `failure`."""
    return invariant, pytest.mark.xfail(strict=True, raises=KnownBug, reason=f"issue 7 failure {failure}: {what}")


CASES = [
    pytest.param("kill-agent", 1, None, id="kill-agent-1"),
    pytest.param("partition", 1, None, id="partition-1"),
    pytest.param("crash-point", 1, None, id="crash-point-1"),
    pytest.param("peer-loss-x3", 1, None, id="peer-loss-x3-1"),
    pytest.param("enospc", 2, None, id="enospc-2"),
    pytest.param("frozen-old-primary", 1, None, id="frozen-old-primary-1"),
]


@pytest.mark.parametrize(("cls", "seed", "bug"), CASES)
async def test_a_seeded_run_keeps_every_invariant(cls: str, seed: int, bug: str | None) -> None:
    res = await run_one(by_name()[cls], seed, faults=1)
    if res.skipped:
        pytest.skip(f"{cls} seed {seed}: {res.skipped}")
    assert res.error is None, f"the injector failed: {res.error}\n" + "\n".join(res.notes)
    others = [v for v in res.violations if v.invariant != bug]
    assert not others, f"replay: {res.replay}\n" + "\n".join(str(v) for v in others)
    if res.violations:
        raise KnownBug(f"replay: {res.replay}\n" + "\n".join(str(v) for v in res.violations))
