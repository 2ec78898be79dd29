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


# ------------------------------------------------- generated mutants (mutmut)


def test_a_generated_mutant_is_named_after_the_function_as_spelled_in_the_source() -> None:
    from tests.mutation.generated import Mutant

    assert Mutant("pairvol.agent.stages.x_check_stop__mutmut_3", "m", "survived").function == \
        "pairvol.agent.stages.check_stop"
    assert Mutant("pairvol.agent.state.xǁCheckpointǁto_api__mutmut_12", "m", "survived").function == \
        "pairvol.agent.state.Checkpoint.to_api"


def test_a_listed_survivor_counts_as_equivalent_and_an_entry_that_explains_nothing_is_stale() -> None:
    from tests.mutation.equivalent import Equivalent
    from tests.mutation.generated import KILLED, MYPY, SURVIVED, Mutant, _changed_lines, account, killed_pct, table

    removed, added = _changed_lines("--- a\n+++ b\n@@ -1 +1 @@\n-    if x < 0:\n+    if x <= 0:\n")
    assert (removed, added) == ("if x < 0:", "if x <= 0:")
    mutants = [
        Mutant("pkg.mod.x_f__mutmut_1", "pkg/mod.py", SURVIVED, removed, added),
        Mutant("pkg.mod.x_f__mutmut_2", "pkg/mod.py", SURVIVED, "return 1", "return 2"),
        Mutant("pkg.mod.x_f__mutmut_3", "pkg/mod.py", KILLED),
        Mutant("pkg.mod.x_f__mutmut_4", "pkg/mod.py", MYPY),
    ]
    entries = [
        Equivalent("pkg.mod.f", "if x < 0:", "if x <= 0:", "x is never 0"),
        Equivalent("pkg.mod.f", "return 3", "return 4", "no longer in the code"),
        Equivalent("other.mod.g", "a", "b", "a module this run did not mutate"),
    ]
    stale = account(mutants, entries)
    assert stale == [entries[1]]
    assert mutants[0].equivalent == entries[0] and mutants[1].equivalent is None
    row = table(mutants)[0]
    assert {c: row.get(c) for c in ("mutants", KILLED, MYPY, SURVIVED, "equivalent")} == {
        "mutants": 4, KILLED: 1, MYPY: 1, SURVIVED: 1, "equivalent": 1}
    assert killed_pct(row) == 50.0


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.id for m in MUTATIONS])
def test_every_catalogued_guard_is_still_where_the_catalog_says(mutation: Mutation) -> None:
    """A guard line that moved or was duplicated by a later change makes its mutation stale,
    and ``make mutate`` would only say so when it runs: the suite says it at once."""
    root = Path(__file__).resolve().parents[2]
    assert (root / mutation.path).read_text().count(mutation.snippet) == 1, (
        f"{mutation.id}: its snippet is not found exactly once in {mutation.path}; update the catalog"
    )
