"""The mutation harness itself (tests/mutation): a snippet that does not occur exactly
once is stale, never applied elsewhere; a run is reproducible from its seed; a mutation
the selected tests do not catch is reported as surviving."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.mutation.catalog import MUTATIONS
from tests.mutation.harness import Mutation, Stale, Workspace, apply, check_catalog, diff, order, run

SOURCE = "def f(x):\n    if x < 0:\n        raise ValueError(x)\n    return x\n"


def m(snippet: str = "    if x < 0:\n", replacement: str = "    if False:\n", **kw: object) -> Mutation:
    args: dict[str, object] = {"id": "t.guard", "path": "pkg/mod.py", "snippet": snippet,
                               "replacement": replacement, "tests": ("tests/test_mod.py",), "guards": "x"}
    args.update(kw)
    return Mutation(**args)  # type: ignore[arg-type]


def test_a_snippet_found_once_is_replaced() -> None:
    assert apply(SOURCE, m()) == SOURCE.replace("    if x < 0:\n", "    if False:\n")
    assert diff(m()) == "-    if x < 0:\n+    if False:"


@pytest.mark.parametrize(("source", "why"), [("def g():\n    pass\n", "not found"),
                                               (SOURCE + SOURCE, "found 2 times")])
def test_a_snippet_not_found_exactly_once_is_stale(source: str, why: str) -> None:
    with pytest.raises(Stale, match=why):
        apply(source, m())


def test_a_mutation_must_change_something_and_select_tests() -> None:
    with pytest.raises(ValueError, match="equals the snippet"):
        m(replacement="    if x < 0:\n")
    with pytest.raises(ValueError, match="no tests"):
        m(tests=())
    with pytest.raises(ValueError, match="used twice"):
        check_catalog([m(), m()])


def test_the_order_depends_on_the_seed_alone() -> None:
    assert order(MUTATIONS, 7) == order(MUTATIONS, 7)
    assert order(MUTATIONS, 7) != order(MUTATIONS, 8)
    assert order(MUTATIONS, 7, sample=3) == order(MUTATIONS, 7)[:3]
    check_catalog(MUTATIONS)


def test_outcomes_of_a_small_project(tmp_path: Path) -> None:
    """A tiny project with one tested guard and one untested guard, run for real."""
    (tmp_path / "operator").mkdir()
    (tmp_path / "operator" / "mod.py").write_text(SOURCE)
    (tmp_path / "test_mod.py").write_text(
        "import pytest\nfrom mod import f\n\n"
        "def test_negative_is_refused():\n    with pytest.raises(ValueError):\n        f(-1)\n\n"
        "def test_positive_passes():\n    assert f(2) == 2\n"
    )
    ws = Workspace(tmp_path)
    tested = m(path="operator/mod.py", tests=("test_mod.py::test_negative_is_refused",), id="t.tested")
    untested = m(path="operator/mod.py", tests=("test_mod.py::test_positive_passes",), id="t.untested")
    stale = m(path="operator/mod.py", snippet="    if x <= 0:\n", id="t.stale")
    broken = m(path="operator/mod.py", replacement="    if (:\n", id="t.broken")
    results = {r.mutation.id: r.outcome for r in run([tested, untested, stale, broken], ws, seed=1, timeout_s=120)}
    assert results == {"t.tested": "killed", "t.untested": "survived", "t.stale": "stale", "t.broken": "invalid"}
    assert (tmp_path / "operator" / "mod.py").read_text() == SOURCE, "the workspace is restored after each run"
