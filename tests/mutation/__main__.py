"""``python -m tests.mutation`` (``make mutate``): run the catalog, print one line per
mutation and a summary; exit 0 only if every mutation was killed.

Exit status: 0 all killed; 1 some mutation survived; 2 none survived but some are stale,
invalid or have a failing baseline (the catalog needs attention).
"""

from __future__ import annotations

import argparse
import sys
import time

from tests.mutation.catalog import MUTATIONS
from tests.mutation.harness import Result, Workspace, check_catalog, diff, order, run

MARK = {"killed": "killed  ", "survived": "SURVIVED", "stale": "STALE   ", "invalid": "INVALID ",
        "baseline": "BASELINE"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make mutate", description=__doc__)
    p.add_argument("--seed", type=int, default=13, help="order, sample and test seeds (default 13)")
    p.add_argument("--only", default="", help="comma-separated mutation ids, or id prefixes (e.g. stages.)")
    p.add_argument("--sample", type=int, default=None, help="run only this many mutations (chosen by the seed)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per test run; longer counts as killed")
    p.add_argument("--no-baseline", action="store_true", help="do not run each selection unmutated first")
    p.add_argument("--list", action="store_true", help="print the catalog and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="also say which test killed each mutation")
    args = p.parse_args(argv)

    check_catalog(MUTATIONS)
    chosen = list(MUTATIONS)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        chosen = [m for m in chosen if any(m.id == w or (w.endswith(".") and m.id.startswith(w)) for w in wanted)]
        unknown = [w for w in wanted if not any(m.id == w or m.id.startswith(w) for m in MUTATIONS)]
        if unknown:
            p.error(f"no mutation matches {', '.join(unknown)} (see --list)")
    chosen = order(chosen, args.seed, args.sample)
    if args.list:
        for m in chosen:
            print(f"{m.id}  {m.path}  ({m.guards})\n{diff(m)}\n  tests: {' '.join(m.tests)}\n")
        return 0

    print(f"mutation run: {len(chosen)} mutations, seed {args.seed}", flush=True)

    def report(r: Result) -> None:
        line = f"{MARK[r.outcome]} {r.mutation.id:<42} {r.seconds:6.1f} s  {r.mutation.guards}"
        if r.outcome == "killed" and args.verbose:
            line += f"\n    | {r.detail}"
        elif r.outcome != "killed":
            line += "\n" + "\n".join(f"    | {ln}" for ln in (diff(r.mutation) + "\n" + r.detail).splitlines())
        print(line, flush=True)

    t0 = time.monotonic()
    ws = Workspace.create()
    try:
        results = run(chosen, ws, args.seed, args.timeout, baseline=not args.no_baseline, report=report)
    finally:
        ws.remove()
    count = {k: sum(1 for r in results if r.outcome == k) for k in MARK}
    total = len(results)
    killed_pct = 100.0 * count["killed"] / max(1, total)
    print(
        f"\n{count['killed']}/{total} killed ({killed_pct:.0f}%), {count['survived']} survived, "
        f"{count['stale']} stale, {count['invalid']} invalid, {count['baseline']} failing baseline "
        f"in {time.monotonic() - t0:.0f} s (seed {args.seed})"
    )
    for outcome in ("survived", "stale", "invalid", "baseline"):
        ids = [r.mutation.id for r in results if r.outcome == outcome]
        if ids:
            print(f"{outcome.upper()}: {', '.join(ids)}")
    if count["survived"]:
        return 1
    if count["stale"] or count["invalid"] or count["baseline"]:
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
