"""Run the fault injector: `python -m tests.chaos.run [--duration S] [--seed S] [--class C ...]`.

One run = one fault class and one seed: a fresh set of node namespaces, a primary and a
secondary replicating an 8 MiB volume under a logging workload, checkpoints every second
or so, the fault at a seeded random moment, the controller reacting as the operator would,
then the end-of-run checks (Latest on the primary, the pair identical, a final failover in
the run's mode). The seed fixes every choice the injector makes (which fault, where,
when, which failover mode); the timing of the processes is not reproducible, so a replay
reproduces the scenario, and a race it found usually but not always.

A repeatable class strikes --faults times per run (default 4), each fault once the pair
replicates again and each followed by the checks; the setup and the final failover are
paid once. With --duration, the class furthest behind in fault injections runs next, each
class taking its seeds from --seed on, until the time is up; --jobs N runs N processes
that take the class furthest behind over all of them (a shared ledger). The output is a
table: class x runs x fault injections x violating runs, skipped and errored runs apart
with their reasons, and every violating seed with its replay command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pairvol.localcluster.netns import ClusterNetwork, NetnsError, check_prerequisites
from tests.chaos import operator_level
from tests.chaos.checker import Violation, check_one_primary, check_stalls
from tests.chaos.cluster import Controller
from tests.chaos.faults import CLASSES, NOT_DONE, Fault, by_name
from tests.chaos.history import History

log = logging.getLogger("tests.chaos.run")

LANES = 4
SLOTS = 256  # 1 MiB of an 8 MiB volume: small enough that slots are overwritten often
NODES = ["n0", "n1", "n2", "n3"]
DEFAULT_FAULTS = 4  # injections per run of a repeatable class


@dataclass
class Result:
    cls: str
    seed: int
    mode: str = ""
    violations: list[Violation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    error: str | None = None
    seconds: float = 0.0
    writes: int = 0
    acked: int = 0
    worst_gap: float = 0.0
    exercised: int = 0  # fault injections (a repeatable class injects --faults per run)
    faults: int = 1  # the run's --faults, for the replay command
    phases: dict[str, float] = field(default_factory=dict)  # where the run's time went (s)

    @property
    def replay(self) -> str:
        more = f" --faults {self.faults}" if self.faults != DEFAULT_FAULTS else ""
        return f"python -m tests.chaos.run --seed {self.seed} --class {self.cls}{more}"


async def run_operator_one(name: str, seed: int, faults: int) -> Result:
    """An operator-level class (tests/chaos/operator_level.py)."""
    res = Result(name, seed, faults=faults)
    t0 = time.monotonic()
    try:
        await operator_level.run_operator(name, seed, res, faults)
    except NetnsError as exc:
        res.skipped = str(exc)
    except Exception as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        res.notes.append(traceback.format_exc())
    res.seconds = time.monotonic() - t0
    return res


async def run_named(
    name: str, seed: int, peer_timeout: float = 2.0, keep: bool = False, faults: int = DEFAULT_FAULTS
) -> Result:
    if name in operator_level.CLASSES:
        return await run_operator_one(name, seed, faults)
    return await run_one(by_name()[name], seed, peer_timeout, keep, faults)


def all_names() -> list[str]:
    return [c.name for c in CLASSES] + list(operator_level.CLASSES)


async def run_one(
    cls: type[Fault], seed: int, peer_timeout: float = 2.0, keep: bool = False, faults: int = DEFAULT_FAULTS
) -> Result:
    res = Result(cls.name, seed, faults=faults)
    fault = cls()
    why = fault.unavailable()
    if why:
        res.skipped = why
        return res
    rng = random.Random(f"{cls.name}:{seed}")
    res.mode = fault.mode or rng.choice(["latest", "checkpoint"])
    point = fault.crash_point(rng, seed)
    stride = parse_size(fault.size) // SLOTS
    hist = History(run=zlib.crc32(f"{cls.name}:{seed}".encode()), lanes=LANES, slots=SLOTS, stride=stride)
    workdir = Path(tempfile.mkdtemp(prefix=f"chaos-{cls.name}-{seed}-"))
    t_start = time.monotonic()
    c: Controller | None = None
    clock = Phases(res.phases)
    try:
        await fault.prepare(workdir, rng)
        async with ClusterNetwork(NODES) as net:
            c = Controller(
                net, NODES, workdir, hist, rng, res.mode, peer_timeout=peer_timeout, size=fault.size, crash_point=point
            )
            c.relay_links = fault.relay_links
            if point:
                c.note(f"crash point {point} armed")
            try:
                clock.lap("netns+prepare")
                await c.setup((fault.data_dir(0, workdir), fault.data_dir(1, workdir)), fault.during_sync)
                clock.lap("setup+sync")
                w0 = time.monotonic()
                n = faults if fault.repeat else 1
                for i in range(n):
                    if i and not c.replicating():
                        c.note(f"the pair does not replicate after fault {i}: no more faults in this run")
                        break
                    await asyncio.sleep(rng.uniform(0.5, 2.0))
                    c.fault_at = time.monotonic()
                    n_injected = await fault.inject(c, rng)
                    res.exercised += 1 if n_injected is None else n_injected
                    c.hold_reactions = False
                    clock.lap("fault")
                    await asyncio.sleep(0.5)
                    await c.settle(60)
                    if i < n - 1:
                        clock.lap("settle")
                        await c.check_now(f"after fault {i + 1}")
                        clock.lap("checks")
                await asyncio.sleep(rng.uniform(0.5, 1.5))
                clock.lap("settle")
                w1 = time.monotonic()
                await c.finish()
                clock.lap("checks")
                res.violations = list(c.violations)
                late = check_one_primary(hist)
                if late and fault.one_primary_unjudged:
                    why = fault.one_primary_unjudged
                    c.note(f"not judged: {len(late)} late acknowledgements ({late[0].detail}): {why}")
                else:
                    res.violations += late
                stalls, res.worst_gap = check_stalls(hist, peer_timeout + 1.0, w0, w1)
                res.violations += stalls
                if point and not c.crash_fired:
                    res.skipped = f"crash point {point} was not reached in this run"
            finally:
                res.notes = c.notes
                await c.close()
                await fault.cleanup()
                clock.lap("teardown")
    except NetnsError as exc:
        res.skipped = str(exc)
    except Exception as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        log.debug("run failed", exc_info=True)
        res.notes.append(traceback.format_exc())
    finally:
        await fault.cleanup()
        res.seconds = time.monotonic() - t_start
        res.writes = len(hist.all_writes())
        res.acked = sum(1 for w in hist.all_writes() if w.acked is not None)
        if keep:
            res.notes.append(f"work dir kept: {workdir}")
        elif res.violations or res.error:
            await asyncio.to_thread(drop_images, workdir)
            res.notes.append(f"logs kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return res


class Phases:
    """Wall-clock time of a run's phases, for `-v` (where the time goes)."""

    def __init__(self, into: dict[str, float]) -> None:
        self.into = into
        self.t = time.monotonic()

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.into[name] = self.into.get(name, 0.0) + now - self.t
        self.t = now


def parse_size(text: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    for suffix, mult in units.items():
        if text.endswith(suffix):
            return int(text[: -len(suffix)]) * mult
    return int(text)


def drop_images(workdir: Path) -> None:
    """Keep a failed run's logs and states for the report, not its images (MiBs each)."""
    for pattern in ("*.raw", "*.qcow2", "ext4.img"):
        for f in workdir.rglob(pattern):
            f.unlink(missing_ok=True)


def table(results: list[Result]) -> str:
    names = all_names()
    rows = [
        "| class | runs | exercised (fault injections) | violations (runs) | skipped | errored |",
        "|---|---|---|---|---|---|",
    ]
    for n in names:
        rs = [r for r in results if r.cls == n]
        if not rs:
            continue
        ok = [r for r in rs if not r.skipped and not r.error]
        bad = [r for r in ok if r.violations]
        ex = sum(r.exercised for r in ok)
        skipped, errored = sum(1 for r in rs if r.skipped), sum(1 for r in rs if r.error)
        rows.append(f"| {n} | {len(ok)} | {ex} | {len(bad)} | {skipped} | {errored} |")
    for n, why in NOT_DONE.items():
        rows.append(f"| {n} | — | — | — | not done: {why} | |")
    out = ["\n".join(rows), ""]
    viol = [r for r in results if r.violations]
    if viol:
        out.append("Violations:")
        for r in viol:
            kinds = sorted({v.invariant for v in r.violations})
            out.append(f"  seed {r.seed} class {r.cls} ({r.mode}): {', '.join(kinds)} — {r.violations[0].detail}")
            out.append(f"    replay: {r.replay}")
    skipped = sorted({(r.cls, r.skipped) for r in results if r.skipped})
    if skipped:
        out.append("Skipped:")
        out += [f"  {c}: {why}" for c, why in skipped]
    errored = [r for r in results if r.error]
    if errored:
        out.append("Errored (the injector failed, not the product):")
        out += [f"  seed {r.seed} class {r.cls}: {r.error}\n    replay: {r.replay}" for r in errored]
    return "\n".join(out)


def report(r: Result, verbose: bool) -> str:
    head = f"{r.cls} seed {r.seed} ({r.mode}): "
    if r.skipped:
        head += f"skipped: {r.skipped}"
    elif r.error:
        head += f"ERROR {r.error}"
    else:
        head += f"{len(r.violations)} violations"
    head += f" [{r.seconds:.1f} s, {r.acked}/{r.writes} writes acked, worst gap {r.worst_gap:.2f} s]"
    lines = [head] + [f"  VIOLATION {v}" for v in r.violations]
    if verbose or r.violations or r.error:
        lines += [f"  . {n}" for n in r.notes]
    if verbose and r.phases:
        lines.append("  time: " + ", ".join(f"{k} {v:.1f} s" for k, v in r.phases.items()))
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    # SIGTERM (and SIGINT where the shell left it to us) end the run cleanly: the current
    # run tears down what it started and the table of what ran so far is printed
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    await check_prerequisites()
    classes = args.cls or all_names()
    results: list[Result] = []
    complete = True
    try:
        if args.jobs > 1 and args.duration:
            complete = await run_jobs(args, classes, results)
        else:
            await run_all(args, classes, results)
    except asyncio.CancelledError:  # Ctrl-C: the table of what ran so far
        print("\ninterrupted")
        print(table(results))
        await write_json(args, results)
        raise
    print()
    print(table(results))
    await write_json(args, results)
    if any(r.violations for r in results):
        return 1
    return 0 if complete else 2


async def write_json(args: argparse.Namespace, results: list[Result]) -> None:
    if args.json:
        text = json.dumps([result_json(r) for r in results], indent=1)
        await asyncio.to_thread(Path(args.json).write_text, text)


def result_json(r: Result) -> dict[str, object]:
    return {
        "class": r.cls,
        "seed": r.seed,
        "mode": r.mode,
        "violations": [str(v) for v in r.violations],
        "found": [{"invariant": v.invariant, "detail": v.detail} for v in r.violations],
        "skipped": r.skipped,
        "error": r.error,
        "replay": r.replay,
        "exercised": r.exercised,
        "faults": r.faults,
        "seconds": round(r.seconds, 1),
    }


def result_from_json(d: dict[str, Any]) -> Result:
    return Result(
        str(d["class"]),
        int(d["seed"]),
        mode=str(d.get("mode") or ""),
        violations=[Violation(v["invariant"], v["detail"]) for v in d.get("found") or []],
        skipped=d.get("skipped"),
        error=d.get("error"),
        exercised=int(d.get("exercised") or 0),
        faults=int(d.get("faults") or DEFAULT_FAULTS),
        seconds=float(d.get("seconds") or 0.0),
    )


def progress(results: list[Result], cls: str) -> int:
    """How far a class has got: its fault injections, and 1 for each run that was skipped
    or errored (so that a class that cannot run does not hold the others back)."""
    return sum(r.exercised if not (r.skipped or r.error) else 1 for r in results if r.cls == cls)


async def run_all(args: argparse.Namespace, classes: list[str], results: list[Result]) -> None:
    if args.duration:
        # the class furthest behind goes next (in the given order among equals): cheap and
        # dear classes alike reach about the same number of fault injections; each class
        # takes the seeds from --seed up, so (class, seed) replays a run
        end = time.monotonic() + args.duration
        seeds = dict.fromkeys(classes, args.seed)
        ledger = Ledger(Path(args.ledger), args.seed, args.faults) if args.ledger else None
        while time.monotonic() < end:
            if ledger is not None:
                cls, seed = await asyncio.to_thread(ledger.claim, classes)
            else:
                cls = min(classes, key=lambda c: progress(results, c))
                seed = seeds[cls]
                seeds[cls] += 1
            r = await run_named(cls, seed, args.peer_timeout, args.keep, args.faults)
            results.append(r)
            if ledger is not None:
                await asyncio.to_thread(ledger.settle, r)
            print(report(r, args.verbose), flush=True)
    else:
        for cls in classes:
            for i in range(args.runs):
                r = await run_named(cls, args.seed + i, args.peer_timeout, args.keep, args.faults)
                results.append(r)
                print(report(r, args.verbose), flush=True)


class Ledger:
    """The jobs' shared account (``--jobs N``): which (class, seed) each job claimed and
    how far each finished run got. Every job takes the class furthest behind over *all*
    jobs, counting a claimed run as the injections it will make, so the minimum over the
    classes grows as fast as the total does, whatever the classes cost; a static share of
    the classes per job let one job's classes fall behind the other's.

    A JSON-lines file, appended to and read under ``flock``: claims
    ``{"cls", "seed", "expect"}``, results ``{"cls", "seed", "done"}``. Blocking: call
    through ``asyncio.to_thread``."""

    def __init__(self, path: Path, first_seed: int, faults: int) -> None:
        self.path = path
        self.first_seed = first_seed
        self.faults = faults

    def expected(self, cls: str) -> int:
        """Injections a run of the class makes when it runs through."""
        if cls in operator_level.CLASSES or by_name()[cls].repeat:
            return self.faults
        return 1

    def _entries(self, fh: Any) -> list[dict[str, Any]]:
        fh.seek(0)
        return [json.loads(line) for line in fh.read().splitlines() if line.strip()]

    def standing(self, entries: list[dict[str, Any]], classes: list[str]) -> dict[str, int]:
        done = {(e["cls"], e["seed"]): int(e["done"]) for e in entries if "done" in e}
        out = dict.fromkeys(classes, 0)
        for e in entries:
            if "expect" in e and e["cls"] in out:
                out[e["cls"]] += done.get((e["cls"], e["seed"]), int(e["expect"]))
        return out

    def claim(self, classes: list[str]) -> tuple[str, int]:
        import fcntl

        with self.path.open("a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            entries = self._entries(fh)
            standing = self.standing(entries, classes)
            cls = min(classes, key=lambda c: standing[c])
            seed = self.first_seed + sum(1 for e in entries if "expect" in e and e["cls"] == cls)
            fh.write(json.dumps({"cls": cls, "seed": seed, "expect": self.expected(cls)}) + "\n")
            fh.flush()
        return cls, seed

    def settle(self, result: Result) -> None:
        import fcntl

        with self.path.open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            done = progress([result], result.cls)
            fh.write(json.dumps({"cls": result.cls, "seed": result.seed, "done": done}) + "\n")
            fh.flush()


async def run_jobs(args: argparse.Namespace, classes: list[str], results: list[Result]) -> bool:
    """--jobs N: N processes of this program, each taking the class furthest behind over
    all of them (:class:`Ledger`) for the whole duration (separate processes: each
    workload has its own interpreter, so one job's checks cannot stall another's writes),
    then one table of everything. False when a job ended otherwise than with its table
    (its runs may be missing from it)."""
    tmp = Path(tempfile.mkdtemp(prefix="chaos-jobs-"))
    procs: list[tuple[asyncio.subprocess.Process, Path]] = []
    try:
        ledger = tmp / "ledger.jsonl"
        for i in range(args.jobs):
            out = tmp / f"job{i}.json"
            argv = [sys.executable, "-m", "tests.chaos.run", "--duration", str(args.duration), "--seed", str(args.seed)]
            argv += ["--faults", str(args.faults), "--peer-timeout", str(args.peer_timeout), "--json", str(out)]
            argv += ["--ledger", str(ledger)] + [a for c in classes for a in ("--class", c)]
            argv += (["-v"] if args.verbose else []) + (["--keep"] if args.keep else [])
            proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, cwd=Path.cwd())
            procs.append((proc, out))

        async def relay(i: int, proc: asyncio.subprocess.Process) -> None:
            assert proc.stdout is not None
            own_table = False  # a job's own table and what follows it: the merged one says it all
            while line := await proc.stdout.readline():
                text = line.decode(errors="replace").rstrip("\n")
                own_table = own_table or text.startswith("| class |")
                if text.strip() and not own_table:
                    print(f"[job{i}] {text}", flush=True)
            await proc.wait()

        await asyncio.gather(*(relay(i, p) for i, (p, _) in enumerate(procs)))
        failed = [(i, p.returncode) for i, (p, _) in enumerate(procs) if p.returncode not in (0, 1)]
        for i, rc in failed:
            print(f"[job{i}] ended with status {rc}: its runs may be missing from the table", flush=True)
        return not failed
    finally:
        for proc, _ in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        await asyncio.gather(*(asyncio.shield(p.wait()) for p, _ in procs), return_exceptions=True)
        for _, out in procs:
            with contextlib.suppress(OSError, ValueError):
                text = await asyncio.to_thread(out.read_text)
                results += [result_from_json(d) for d in json.loads(text)]
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.chaos.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1, help="first seed (default 1)")
    ap.add_argument(
        "--class", dest="cls", action="append", choices=sorted(all_names()), help="fault class (repeatable)"
    )
    ap.add_argument("--runs", type=int, default=1, help="runs per class without --duration")
    ap.add_argument("--duration", type=float, default=0, help="run classes in turn for this many seconds")
    ap.add_argument("--peer-timeout", type=float, default=2.0)
    ap.add_argument(
        "--faults",
        type=int,
        default=DEFAULT_FAULTS,
        help=f"injections per run of a repeatable class, each followed by the checks (default {DEFAULT_FAULTS})",
    )
    ap.add_argument("--keep", action="store_true", help="keep every run's work dir")
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="with --duration: this many processes, each taking the class furthest behind over all of them",
    )
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--ledger", help=argparse.SUPPRESS)  # --jobs: the jobs' shared account
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.DEBUG if os.environ.get("CHAOS_DEBUG") else logging.WARNING)
    if os.geteuid() != 0:
        sys.exit("the fault injector needs root (network namespaces, iptables, mounts)")
    try:
        sys.exit(asyncio.run(main_async(args)))
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.exit(130)


if __name__ == "__main__":
    main()
