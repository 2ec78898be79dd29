"""``python -m tests.mutation.generated`` (``make mutate-generated``): mutants *generated* by
mutmut over the pure guard modules, each run against the unit tests that call the mutated
function; a per-module table, and every survivor either killed or listed as equivalent.

Why a generator as well as the hand-written catalog (``make mutate``): the catalog holds the
mutations someone thought of; mutmut makes every operator, comparison, constant, argument
and return value of a function wrong in turn, which finds the guards nobody thought of.
It runs only on modules without I/O, where a mutant costs milliseconds (one forked pytest
worker, warmed up once, running only the tests that called the function unmutated).

How it fits this layout: mutmut derives a module's name from its path (``src/`` stripped)
and puts its ``mutants/`` copy first on ``sys.path``. The package lives in ``operator/``, so
the run happens in a staging directory, ``build/mutmut/``, where ``src`` and ``tests`` are
links to the repository and ``pyproject.toml`` carries the pytest options and the mutmut
configuration made here. The worktree is never modified; the staging directory is made
anew on every run (mutmut does not re-test a surviving mutant after a test was added, so a
reused cache would report stale verdicts). After a run, ``cd build/mutmut &&
../../.venv/bin/mutmut show <mutant>`` shows one mutant's diff.

A survivor is accounted for when ``tests/mutation/equivalent.py`` lists it (function,
original line, mutated line, the reason it cannot change behaviour). Entries are matched
by content, not by mutmut's numbering, so they survive edits elsewhere in the function; an
entry that matches no survivor is reported as stale.

Exit status: 0 when at least ``--min-killed`` % of the mutants are killed (a timeout counts
as killed) and every other mutant is listed as equivalent; 1 otherwise; 2 when only stale
equivalence entries are wrong.
"""

from __future__ import annotations

import argparse
import difflib
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.mutation.equivalent import EQUIVALENT, Equivalent

ROOT = Path(__file__).resolve().parents[2]
STAGE = ROOT / "build" / "mutmut"
MUTMUT = Path(sys.executable).with_name("mutmut")

# module (relative to operator/) -> the unit tests that specify it
MODULES: dict[str, tuple[str, ...]] = {
    "pairvol/agent/stages.py": ("tests/unit/test_agent_logic.py",),
    "pairvol/agent/state.py": ("tests/unit/test_agent_logic.py", "tests/unit/test_agent_resize.py",
                               "tests/unit/test_agent_resync.py", "tests/unit/test_restore_points.py"),
    "pairvol/agent/health.py": ("tests/unit/test_agent_health.py",),
    "pairvol/api/spec.py": ("tests/unit/test_api_spec.py",),
    "pairvol/operator/decisions.py": ("tests/unit/test_operator_decisions.py",
                                      "tests/unit/test_operator_lease_clock.py",
                                      "tests/unit/test_operator_grow.py",
                                      "tests/unit/test_operator_cache_rules.py",
                                      "tests/unit/test_operator_scale_rules.py",
                                      "tests/unit/test_restore_points.py"),
}
SHORT = {Path(m).stem: m for m in MODULES}

# mutmut's exit-code verdicts, folded into the table's columns
KILLED, TIMEOUT, SURVIVED, NO_TESTS, OTHER = "killed", "timeout", "survived", "no tests", "other"
MYPY = "mypy"  # rejected by mypy --strict: such a mutant cannot pass `make lint`
CAUGHT = (KILLED, TIMEOUT, MYPY)


def _column(status: str) -> str:
    if status in (KILLED, TIMEOUT, SURVIVED, NO_TESTS):
        return status
    if status == "caught by type check":
        return MYPY
    return OTHER  # suspicious, segfault, not checked, interrupted


@dataclass
class Mutant:
    name: str  # mutmut's: pairvol.agent.stages.x_check_stop__mutmut_3
    module: str  # pairvol/agent/stages.py
    status: str
    removed: str = ""
    added: str = ""
    equivalent: Equivalent | None = None

    @property
    def function(self) -> str:
        """The mutated function as it is spelled in the source: pairvol.agent.state.Checkpoint.to_api."""
        mangled = self.name.partition("__mutmut_")[0]
        prefix, _, func = mangled.rpartition(".")
        if func.startswith("x_"):
            return f"{prefix}.{func[2:]}"
        return f"{prefix}.{'.'.join(p for p in func[1:].split('ǁ') if p)}"


@dataclass
class Row:
    module: str
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, column: str) -> None:
        self.counts[column] = self.counts.get(column, 0) + 1

    def get(self, column: str) -> int:
        return self.counts.get(column, 0)


def stage(modules: Sequence[str]) -> None:
    """The staging directory: links to the package and the tests, and the configuration."""
    shutil.rmtree(STAGE, ignore_errors=True)
    STAGE.mkdir(parents=True)
    (STAGE / "src").symlink_to(ROOT / "operator")
    (STAGE / "tests").symlink_to(ROOT / "tests")
    (STAGE / "mutants").mkdir()  # on PYTHONPATH from the start (see run_mutmut)
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]
    tests = sorted({t for m in modules for t in MODULES[m]})
    lines = ["[tool.pytest.ini_options]"]
    lines += [f"{key} = {_toml(value)}" for key, value in tool["pytest"]["ini_options"].items()]
    # the project's mypy --strict, over the mutated copy (a mutant it rejects cannot pass `make lint`)
    mypy = {k: v for k, v in tool["mypy"].items() if k not in ("overrides", "packages", "mypy_path")}
    lines += ["", "[tool.mypy]", 'mypy_path = "src"', *(f"{k} = {_toml(v)}" for k, v in mypy.items()),
              "warn_unused_ignores = false"]  # mutmut's trampolines carry "type: ignore" that may be unused
    for override in tool["mypy"].get("overrides", []):
        lines += ["", "[[tool.mypy.overrides]]", *(f"{k} = {_toml(v)}" for k, v in override.items())]
    type_check = ["mypy", "--output", "json", *(f"src/{m}" for m in modules)]
    lines += [
        "",
        "[tool.mutmut]",
        'source_paths = ["src/pairvol"]',
        f"only_mutate = {_toml([f'src/{m}' for m in modules])}",
        f"pytest_add_cli_args = {_toml(['-p', 'no:cacheprovider', '-p', 'tests.mutation.hypothesis_profile'])}",
        f"pytest_add_cli_args_test_selection = {_toml(tests)}",
        f"type_check_command = {_toml(type_check)}",
        "",
    ]
    (STAGE / "pyproject.toml").write_text("\n".join(lines))


def _toml(value: object) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def run_mutmut(max_children: int, log: Path) -> int:
    env = dict(os.environ)
    # the -p plugin is imported before pytest puts the rootdir on sys.path
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(STAGE / "mutants"), env.get("PYTHONPATH", "")) if p)
    env["PATH"] = f"{MUTMUT.parent}{os.pathsep}{env.get('PATH', '')}"  # mypy of this venv
    env["PYTHONHASHSEED"] = "13"
    env.pop("CI", None)  # not a CI test run: a skip inside a mutant run is not a setup failure
    with log.open("w") as out:
        proc = subprocess.run([str(MUTMUT), "run", "--max-children", str(max_children)], cwd=STAGE, env=env,
                              stdout=out, stderr=subprocess.STDOUT, check=False)
    return proc.returncode


def collect(modules: Sequence[str]) -> list[Mutant]:
    """Every mutant's verdict and, for survivors, the lines it changed (read in the stage)."""
    old = Path.cwd()
    os.chdir(STAGE)
    try:
        from mutmut.mutation.data import SourceFileMutationData
        from mutmut.mutation.diff_apply import get_diff_for_mutant
        from mutmut.stats import status_by_exit_code

        found: list[Mutant] = []
        for module in modules:
            data = SourceFileMutationData(path=Path("src") / module)
            data.load()
            for name, code in sorted(data.exit_code_by_key.items()):
                mutant = Mutant(name, module, _column(status_by_exit_code[code]))
                if mutant.status not in CAUGHT:
                    mutant.removed, mutant.added = _changed_lines(get_diff_for_mutant(name, path=data.path))
                found.append(mutant)
        return found
    finally:
        os.chdir(old)


def _changed_lines(diff: str) -> tuple[str, str]:
    removed = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    added = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return "\n".join(removed), "\n".join(added)


def account(mutants: list[Mutant], entries: Sequence[Equivalent]) -> list[Equivalent]:
    """Mark the survivors the list explains; return the entries that explain no survivor."""
    used: set[int] = set()
    for m in mutants:
        if m.status not in (SURVIVED, NO_TESTS):
            continue
        for i, e in enumerate(entries):
            if e.matches(m.function, m.removed, m.added):
                m.equivalent = e
                used.add(i)
                break
    prefixes = tuple({m.module[:-3].replace("/", ".") + "." for m in mutants})
    return [e for i, e in enumerate(entries) if i not in used and e.function.startswith(prefixes)]


def table(mutants: list[Mutant]) -> list[Row]:
    rows: dict[str, Row] = {}
    total = Row("total")
    for m in mutants:
        row = rows.setdefault(m.module, Row(m.module))
        column = "equivalent" if m.equivalent is not None else m.status
        for r in (row, total):
            r.add("mutants")
            r.add(column)
    return [*rows.values(), total]


COLUMNS = ("mutants", KILLED, TIMEOUT, MYPY, SURVIVED, NO_TESTS, "equivalent", OTHER)


def killed_pct(row: Row) -> float:
    """Killed by a test, by a timeout or by mypy --strict."""
    return 100.0 * sum(row.get(c) for c in CAUGHT) / max(1, row.get("mutants"))


def render(rows: list[Row]) -> str:
    head = "| module | " + " | ".join(COLUMNS) + " | killed % |"
    sep = "|---|" + "---:|" * (len(COLUMNS) + 1)
    body = [f"| `{r.module}` | " + " | ".join(str(r.get(c)) for c in COLUMNS) + f" | {killed_pct(r):.1f} |"
            for r in rows]
    return "\n".join([head, sep, *body])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make mutate-generated", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help=f"comma-separated modules: {', '.join(SHORT)} (default: all)")
    p.add_argument("--max-children", type=int, default=2, help="parallel mutant workers (default 2)")
    p.add_argument("--min-killed", type=float, default=90.0, help="required %% of mutants killed (default 90)")
    p.add_argument("--report", type=Path, default=None, help="also write the table and survivors to this file")
    args = p.parse_args(argv)

    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in SHORT]
    if unknown:
        p.error(f"unknown module {', '.join(unknown)}; choose from {', '.join(SHORT)}")
    modules = [SHORT[w] for w in wanted] if wanted else list(MODULES)
    if not MUTMUT.exists():
        p.error(f"{MUTMUT} is missing: install the test extras (make venv)")

    t0 = time.monotonic()
    stage(modules)
    log = STAGE / "mutmut.log"
    print(f"mutmut over {', '.join(modules)} (staging {STAGE.relative_to(ROOT)}, log {log.relative_to(ROOT)})",
          flush=True)
    rc = run_mutmut(args.max_children, log)
    if rc != 0:
        tail = log.read_text()[-3000:]
        print(f"mutmut run failed (exit {rc}):\n{tail}")
        return 1
    mutants = collect(modules)
    stale = account(mutants, EQUIVALENT)
    rows = table(mutants)
    seconds = time.monotonic() - t0

    out: list[str] = [render(rows), ""]
    open_ones = [m for m in mutants if m.equivalent is None and m.status not in CAUGHT]
    for m in open_ones:
        out.append(f"{m.status.upper()}: {m.name}  ({m.function})")
        out.extend(f"    | {ln}" for ln in _diff(m))
    for e in stale:
        out.append(f"STALE equivalence entry (matches no survivor): {e.function}: {e.before!r} -> {e.after!r}")
    total = rows[-1]
    verdict_ok = killed_pct(total) >= args.min_killed and not open_ones
    out.append("")
    typed = total.get("mutants") - total.get(MYPY)
    by_tests = 100.0 * (total.get(KILLED) + total.get(TIMEOUT)) / max(1, typed)
    out.append(f"{typed} mutants pass mypy --strict; the tests kill {by_tests:.1f} % of them")
    out.append(f"{total.get('mutants')} mutants: {killed_pct(total):.1f} % killed, {total.get('equivalent')} "
               f"equivalent, {len(open_ones)} not accounted for, {len(stale)} stale entries; "
               f"{seconds:.0f} s with {args.max_children} workers")
    text = "\n".join(out)
    print(text)
    if args.report is not None:
        args.report.write_text(text + "\n")
    if not verdict_ok:
        return 1
    return 2 if stale else 0


def _diff(m: Mutant) -> list[str]:
    lines = difflib.unified_diff(m.removed.splitlines(), m.added.splitlines(), lineterm="", n=0)
    return [ln for ln in lines if ln[:3] not in ("---", "+++") and not ln.startswith("@@")]


if __name__ == "__main__":
    sys.exit(main())
