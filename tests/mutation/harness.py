"""Apply one mutation at a time to a copy of the repository and run the tests that should
catch it.

Why a copy: the worktree is never modified, so an interrupted run leaves nothing behind and
two runs (or a developer editing the tree) cannot disturb each other. The copy's
``operator/`` comes first on ``PYTHONPATH``, so pytest and every agent or operator process a
test starts (``python -m pairvol ...`` inherits the environment) run the mutated code; agent
pods of the local cluster (e2e) get it through the operator's ``PAIRVOL_AGENT_ENV``.

Why snippets and not line numbers: the guarded modules are being restructured. A mutation
names an exact piece of code that must occur exactly once in its file; when it no longer
does, the mutation is reported as STALE (and the run fails) instead of silently mutating
some other line or being skipped.

Outcomes per mutation:

* ``killed``   the selected tests failed (or timed out) with the mutation applied;
* ``survived`` they all passed: a guard that no test defends;
* ``stale``    the snippet is missing or ambiguous: update the catalog;
* ``invalid``  the mutated file does not compile: the mutation is wrong, not the tests;
* ``baseline`` the selected tests fail even without the mutation: the result would mean nothing.
"""

from __future__ import annotations

import difflib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# what the copy needs: the package, the tests and the files tests read (charts, docs, ...)
_IGNORE = shutil.ignore_patterns(".venv", ".git", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache",
                                 "*.egg-info", ".hypothesis")


@dataclass(frozen=True)
class Mutation:
    """One deliberate bug in a guard line.

    ``snippet`` must occur exactly once in ``path`` (relative to the repository); it may
    span several lines to be unique, but should change one. ``tests`` are pytest arguments
    (node ids, or ``-k`` expressions) selecting the smallest set that must fail.
    """

    id: str
    path: str
    snippet: str
    replacement: str
    tests: tuple[str, ...]
    guards: str  # what the original line protects, in a few words

    def __post_init__(self) -> None:
        if self.snippet == self.replacement:
            raise ValueError(f"mutation {self.id}: replacement equals the snippet")
        if not self.tests:
            raise ValueError(f"mutation {self.id}: no tests selected")


class Stale(Exception):
    """The mutation's snippet does not occur exactly once."""


def apply(source: str, m: Mutation) -> str:
    count = source.count(m.snippet)
    if count != 1:
        where = "not found" if count == 0 else f"found {count} times"
        raise Stale(f"snippet {where} in {m.path}")
    return source.replace(m.snippet, m.replacement, 1)


def diff(m: Mutation) -> str:
    lines = difflib.unified_diff(m.snippet.splitlines(), m.replacement.splitlines(), lineterm="", n=0)
    return "\n".join(ln for ln in lines if ln[:3] not in ("---", "+++") and not ln.startswith("@@"))


def check_catalog(mutations: Sequence[Mutation]) -> None:
    seen: set[str] = set()
    for m in mutations:
        if m.id in seen:
            raise ValueError(f"mutation id {m.id} is used twice")
        seen.add(m.id)


@dataclass
class Result:
    mutation: Mutation
    outcome: str  # killed | survived | stale | invalid | baseline
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Workspace:
    """A private copy of the repository in which one file at a time is mutated."""

    root: Path
    tools: Path | None = None
    _originals: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls, source: Path = ROOT) -> Workspace:
        root = Path(tempfile.mkdtemp(prefix=f"pairvol-mutate-{os.getpid()}-"))
        root.chmod(0o755)  # processes that drop privileges (the e2e operator, agents) read the copy too
        shutil.copytree(source, root / "repo", ignore=_IGNORE, symlinks=True)
        tools = source / ".venv" / "tools"
        if tools.is_dir():  # the pinned helm/kubectl of `make tools`, where tests look for them
            (root / "repo" / ".venv").mkdir()
            (root / "repo" / ".venv" / "tools").symlink_to(tools)
        return cls(root / "repo", tools if tools.is_dir() else None)

    def remove(self) -> None:
        shutil.rmtree(self.root.parent, ignore_errors=True)

    def read(self, path: str) -> str:
        return (self.root / path).read_text()

    def write(self, path: str, text: str) -> None:
        self._originals.setdefault(path, self.read(path))
        (self.root / path).write_text(text)

    def restore(self) -> None:
        for path, text in self._originals.items():
            (self.root / path).write_text(text)
        self._originals.clear()

    def env(self, seed: int) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(self.root / "operator"), str(self.root)])
        # agent pods of the local cluster get a minimal environment, not ours: the operator
        # passes this on to them (e2e tests), so they run the mutated code too
        env["PAIRVOL_AGENT_ENV"] = json.dumps({"PYTHONPATH": env["PYTHONPATH"], "PYTHONDONTWRITEBYTECODE": "1"})
        env["PYTHONHASHSEED"] = str(seed)
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # a mutated module must never be cached as the original
        if self.tools is not None:
            env["PATH"] = f"{self.tools}{os.pathsep}{env.get('PATH', '')}"
        return env

    def pytest(self, tests: Iterable[str], seed: int, timeout_s: float) -> tuple[int | None, str]:
        """Exit status (None on timeout) and the tail of the output."""
        argv = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                f"--hypothesis-seed={seed}", *_split(tests)]
        try:
            proc = subprocess.run(argv, cwd=self.root, env=self.env(seed), capture_output=True, text=True,
                                  timeout=timeout_s, start_new_session=True)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            return None, out[-2000:]
        return proc.returncode, (proc.stdout + proc.stderr)[-2000:]


def _split(tests: Iterable[str]) -> list[str]:
    """``"-k expr"`` becomes two arguments; node ids stay as they are."""
    out: list[str] = []
    for t in tests:
        if t.startswith("-k "):
            out += ["-k", t[3:]]
        else:
            out.append(t)
    return out


def order(mutations: Sequence[Mutation], seed: int, sample: int | None = None) -> list[Mutation]:
    """The run order (and an optional sample) is a function of the seed alone."""
    chosen = list(mutations)
    rng = random.Random(seed)
    rng.shuffle(chosen)
    return chosen[:sample] if sample is not None else chosen


def run(
    mutations: Sequence[Mutation],
    ws: Workspace,
    seed: int,
    timeout_s: float,
    baseline: bool = True,
    report: Callable[[Result], None] = lambda r: None,
) -> list[Result]:
    results: list[Result] = []
    passing: dict[tuple[str, ...], tuple[bool, str]] = {}
    for m in mutations:
        t0 = time.monotonic()
        try:
            mutated = apply(ws.read(m.path), m)
        except Stale as exc:
            results.append(Result(m, "stale", 0.0, str(exc)))
            report(results[-1])
            continue
        try:
            if m.path.endswith(".py"):
                compile(mutated, m.path, "exec")
        except SyntaxError as exc:
            results.append(Result(m, "invalid", 0.0, f"mutated file does not compile: {exc}"))
            report(results[-1])
            continue
        if baseline and m.tests not in passing:
            code, out = ws.pytest(m.tests, seed, timeout_s)
            passing[m.tests] = (code == 0, out)
        if baseline and not passing[m.tests][0]:
            results.append(Result(m, "baseline", time.monotonic() - t0,
                                  "the selected tests fail without the mutation:\n" + passing[m.tests][1]))
            report(results[-1])
            continue
        t0 = time.monotonic()
        ws.write(m.path, mutated)
        try:
            code, out = ws.pytest(m.tests, seed, timeout_s)
        finally:
            ws.restore()
        seconds = time.monotonic() - t0
        if code is None:
            results.append(Result(m, "killed", seconds, f"timed out after {timeout_s:.0f} s"))
        elif code == 1:
            failed = [ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR", "E   "))]
            results.append(Result(m, "killed", seconds, "\n".join(failed[:3]) if failed else "tests failed"))
        elif code == 0:
            results.append(Result(m, "survived", seconds, "every selected test passed"))
        elif code == 2 and baseline:  # the same selection collected fine unmutated
            results.append(Result(m, "killed", seconds, "the mutated module fails at import"))
        else:  # 4 usage error, 5 nothing collected, 2 without a baseline: not a verdict
            results.append(Result(m, "invalid", seconds, f"pytest exited {code}:\n{out}"))
        report(results[-1])
    return results
