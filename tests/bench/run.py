"""``make bench``: measure pairvol's data path against the configurations it is built
from, in one run on one machine, and print the numbers (no assertions).

Ratios are only meaningful within one run: the machine is shared, so absolute numbers
drift with the neighbours' load (recorded with every section). The targets of
DESIGN.md §8 and the brief are printed next to the measured values for comparison:
c/b >= 0.9, checkpoint cut p99 <= 20 ms, no primary write stall > 10 ms caused by a
checkpoint.

    .venv/bin/python -m tests.bench.run [--quick] [--json FILE] [--sections ...] [--configs ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pairvol.errors import PairvolError
from tests.bench import resync
from tests.bench.fio import WORKLOADS
from tests.bench.scenarios import FULL, QUICK, Plan, checkpoint_stall, failover_series, throughput
from tests.bench.setups import CONFIGS, EXTRA_CONFIGS, pin_trees
from tests.bench.stats import STALL_THRESHOLD_MS, fmt, ratio, table

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("throughput", "checkpoint", "failover", "resync")
RATIO_PAIRS = (
    ("c/a", "c-pairvol", "a-bare"),
    ("c/b", "c-pairvol", "b-quorum"),
    ("c/a tuned", "c-pairvol", "a-bare-tuned"),  # only with --configs ...,a-bare-tuned
    ("c/b tls", "c-pairvol-tls", "b-quorum-tls"),
    ("b tcp/unix", "b-quorum", "b-quorum-unix"),  # only with --configs ...,b-quorum-unix
    ("c/b nodelay", "c-pairvol", "b-quorum-nodelay"),  # only with --configs ...,b-quorum-nodelay
    ("b nodelay/b", "b-quorum-nodelay", "b-quorum"),
    ("b hop/nodelay", "b-quorum-hop", "b-quorum-nodelay"),  # the listener daemon's hop
)
TARGET_C_OVER_B = 0.9
TARGET_CUT_P99_MS = 20.0


async def _command_output(*argv: str) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except OSError as exc:
        return f"({argv[0]}: {exc})"
    out, _ = await proc.communicate()
    return out.decode(errors="replace").strip().splitlines()[0] if out else ""


async def machine() -> dict[str, Any]:
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "uptime": await _command_output("uptime"),
        "fio": await _command_output("fio", "--version"),
        "qsd": await _command_output("qemu-storage-daemon", "--version"),
        "python": sys.version.split()[0],
    }


def compute_ratios(tp: dict[str, Any]) -> dict[str, Any]:
    """c/a, c/b (and the TLS pair) per workload: throughput and IOPS ratios (higher is
    better for c) and latency ratios (lower is better for c).

    Each ratio is taken within a round (both sides measured minutes apart at most, under
    the same neighbours' load) and the median over rounds is reported, with the range.
    """
    out: dict[str, Any] = {}
    for label, num, den in RATIO_PAIRS:
        if num not in tp or den not in tp:
            continue
        per: dict[str, Any] = {}
        for wl in WORKLOADS:
            n, d = tp[num]["workloads"].get(wl.name), tp[den]["workloads"].get(wl.name)
            if n is None or d is None:
                continue
            n_rounds, d_rounds = n.get("rounds") or [n], d.get("rounds") or [d]
            entry: dict[str, Any] = {}
            for key in ("mibps", "iops", "p50_us", "p99_us"):
                paired = [
                    r
                    for a, b in zip(n_rounds, d_rounds, strict=False)
                    if (r := ratio(a.get(key), b.get(key))) is not None
                ]
                entry[key] = statistics.median(paired) if paired else None
                entry[f"{key}_range"] = [min(paired), max(paired)] if paired else None
            per[wl.name] = entry
        out[label] = per
    return out


def render(results: dict[str, Any]) -> str:
    """The human-readable report: one table per section, targets alongside."""
    parts: list[str] = []
    meta = results["meta"]
    parts.append(
        f"pairvol data-path benchmark ({'quick' if meta['quick'] else 'full'} run) on {meta['machine']['host']}, "
        f"{meta['machine']['cpus']} CPUs"
    )
    parts.append(f"  start: {meta['machine']['uptime']}")
    parts.append(f"  end:   {meta.get('uptime_end', '')}")
    parts.append(f"  {meta['machine']['fio']}; {meta['machine']['qsd']}; pairvol {meta.get('git', '?')}")
    if meta.get("two_nodes"):
        parts.append(
            "  two nodes of one CPU each: CPU 0 runs fio, the harness and each configuration's primary side; "
            "CPU 1 the replica's side (a-bare: all on CPU 0)"
        )

    tp = results.get("throughput") or {}
    if tp:
        rows = []
        for cfg, res in tp.items():
            for wl in WORKLOADS:
                m = res["workloads"].get(wl.name)
                if m is None:
                    continue
                iops = [r["iops"] for r in m.get("rounds", [m])]
                rows.append(
                    [
                        cfg,
                        wl.name,
                        fmt(m["mibps"]),
                        fmt(m["iops"], 0),
                        f"{fmt(min(iops), 0)}-{fmt(max(iops), 0)}",
                        fmt(m["p50_us"], 0),
                        fmt(m["p99_us"], 0),
                        fmt(m["p99.9_us"], 0),
                    ]
                )
            q = res.get("qd1_client")
            if q:
                rows.append(
                    [
                        cfg,
                        "qd1 client (py)",
                        "-",
                        fmt(q["iops"], 0),
                        "",
                        fmt(_us(q["all_ms"]["p50"]), 0),
                        fmt(_us(q["all_ms"]["p99"]), 0),
                        fmt(_us(q["all_ms"]["p99.9"]), 0) + f"  max {fmt(q['all_ms']['max'], 2)} ms",
                    ]
                )
        n_rounds = max(len(m.get("rounds", [m])) for res in tp.values() for m in res["workloads"].values())
        parts.append(
            f"\nThroughput and latency (fio nbd engine, median of {n_rounds} interleaved round(s); "
            "latency = completion latency, µs)"
        )
        parts.append(table(["config", "workload", "MiB/s", "IOPS", "IOPS range", "p50", "p99", "p99.9"], rows))
        loads = [r["load1"] for res in tp.values() for m in res["workloads"].values() for r in m.get("rounds", [])]
        if loads:
            parts.append(f"  1-min load during the fio runs: {min(loads):.2f} .. {max(loads):.2f} (2 CPUs)")

    ratios = results.get("ratios") or {}
    if ratios:
        rows = []
        for label, per in ratios.items():
            for wl, r in per.items():
                rng = r.get("iops_range")
                rows.append(
                    [
                        label,
                        wl,
                        fmt(r["mibps"], 3),
                        fmt(r["iops"], 3),
                        f"{fmt(rng[0], 2)}-{fmt(rng[1], 2)}" if rng else "-",
                        fmt(r["p50_us"], 2),
                        fmt(r["p99_us"], 2),
                    ]
                )
        parts.append(
            f"\nRatios (MiB/s and IOPS: higher is better, target c/b >= {TARGET_C_OVER_B}; latency: lower is better)"
            f"\n  issue 11 targets: randwrite-4k-qd16 c/b >= 1.0 and c/a >= 0.5; seq-write-1M c/a >= 0.6"
        )
        parts.append(table(["ratio", "workload", "MiB/s", "IOPS", "IOPS range", "p50 lat", "p99 lat"], rows))
        parts.append("  (median over rounds of the ratio within each round, and its range)")

    cp = results.get("checkpoint")
    if cp:
        parts.append(
            f"\nCheckpoints every {cp['interval_s']} s under a QD1 4 KiB random-write load "
            f"(c-pairvol, {cp['checkpoints']} checkpoints, {len(cp['checkpoint_failures'])} failed)"
        )
        parts.append(
            table(
                ["", "n", "p50 ms", "p99 ms", "max ms"],
                [
                    [name, fmt(cp[key]["n"]), fmt(cp[key]["p50"], 2), fmt(cp[key]["p99"], 2), fmt(cp[key]["max"], 2)]
                    for name, key in (("cut (transaction)", "cut_ms"), ("checkpoint duration", "duration_ms"))
                ],
            )
        )
        rows = []
        for name, rep, key in (
            ("without checkpoints", cp["without"], "all_ms"),
            ("with checkpoints: all writes", cp["with"], "all_ms"),
            ("  during a checkpoint call", cp["with"], "during_checkpoint_ms"),
            ("  outside checkpoint calls", cp["with"], "outside_checkpoint_ms"),
        ):
            s = rep[key]
            rows.append([name, fmt(s["n"]), fmt(s["p50"], 3), fmt(s["p99"], 2), fmt(s["p99.9"], 2), fmt(s["max"], 2)])
        parts.append("Primary write latency at QD1 (client side, ms)")
        parts.append(table(["", "writes", "p50", "p99", "p99.9", "max"], rows))
        rows = [
            [
                f"{b['from_ms']:g}..{b['to_ms']:g} ms" if b["to_ms"] is not None else f">= {b['from_ms']:g} ms",
                fmt(b["n"]),
                fmt(b["p50"], 3),
                fmt(b["p99"], 2),
                fmt(b["max"], 2),
            ]
            for b in cp.get("with_since_cut", [])
        ]
        if rows:
            parts.append("Writes outside checkpoint calls, by time since the previous call ended (ms)")
            parts.append(table(["since checkpoint", "writes", "p50", "p99", "max"], rows))
        cow = cp.get("cow")
        if cow:
            parts.append(
                f"  copy-before-write on the secondary: "
                f"{cow['without_per_write_bytes'] / 1024:.1f} KiB per 4 KiB write "
                f"without checkpoints, {cow['with_per_write_bytes'] / 1024:.1f} KiB with "
                f"({cow['without_bytes'] / 2**20:.0f} / {cow['with_bytes'] / 2**20:.0f} MiB copied)"
            )
        parts.append(
            f"  writes > {STALL_THRESHOLD_MS:g} ms: without checkpoints {cp['without']['over_threshold']}, "
            f"with {cp['with']['over_threshold']} (of which during a checkpoint call: "
            f"{cp['with']['over_threshold_during_checkpoint']})"
        )
        parts.append(
            f"  targets: cut p99 <= {TARGET_CUT_P99_MS:g} ms; no write stall > {STALL_THRESHOLD_MS:g} ms "
            f"caused by a checkpoint; 1-min load {cp['load_before'][0]:.2f} -> {cp['load_after'][0]:.2f}"
        )

    fo = results.get("failover")
    if fo:
        rows = [
            [
                p["mode"],
                str(p["dirty_mib"]),
                fmt(p["duration_ms"]),
                fmt(p["api_call_ms"]),
                fmt(p["client_ms"]),
                "yes" if p["verified"] else "NO",
                " ".join(f"{k} {v:.0f}" for k, v in (p.get("steps_ms") or {}).items()),
            ]
            for p in fo["points"]
        ]
        parts.append("\nFailover after SIGKILL of the primary vs. data changed since the last checkpoint")
        parts.append(
            table(
                ["mode", "MiB changed", "durationMs", "API call ms", "client write ms", "image ok", "steps (ms)"], rows
            )
        )
        parts.append(
            "  client write ms: from sending POST /v1/failover until a new NBD connection to the new "
            "primary's export has a 4 KiB write acknowledged; steps: the agent's stepsMs"
        )
    rs = results.get("resync")
    if rs:
        parts.append(resync.render(rs))
    return "\n".join(parts)


def _us(ms: float | None) -> float | None:
    return None if ms is None else ms * 1000


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="short run (seconds, small volumes): checks the harness")
    p.add_argument("--json", type=Path, default=None, help="also write all results as JSON to this file")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    p.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated, from {', '.join(CONFIGS)} (default) and the diagnostic {', '.join(EXTRA_CONFIGS)}",
    )
    p.add_argument("--no-tls", action="store_true", help="skip the TLS-PSK configurations")
    p.add_argument("--rounds", type=int, default=None, help="interleaved fio rounds per workload (default 3, quick 1)")
    p.add_argument("--runtime", type=float, default=None, help="seconds per fio job (default 5, quick 1)")
    p.add_argument(
        "--failover-mib", default=None, help="comma-separated MiB changed before failover (default 0,16,64,256)"
    )
    p.add_argument(
        "--resync-size",
        type=resync.size_arg,
        default=None,
        help="volume size of the resync section (default 256Mi, quick 64Mi; 4Gi: python -m tests.bench.resync)",
    )
    p.add_argument(
        "--two-nodes",
        action="store_true",
        help="throughput only: model two one-CPU nodes on this machine: the harness, fio and every configuration's "
        "primary side bound to CPU 0, the replica's side (second qsd, secondary agent) to CPU 1",
    )
    p.add_argument("--workdir", type=Path, default=None, help="parent of the temporary directory (default /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (images, logs)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    for name, allowed in (("sections", SECTIONS), ("configs", CONFIGS + EXTRA_CONFIGS)):
        chosen = [x for x in getattr(args, name).split(",") if x]
        bad = [x for x in chosen if x not in allowed]
        if bad:
            p.error(f"--{name}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
        setattr(args, name, chosen)
    if args.no_tls:
        args.configs = [c for c in args.configs if not c.endswith("-tls")]
    if args.two_nodes:
        if args.sections != ["throughput"]:
            p.error("--two-nodes measures throughput only: add --sections throughput")
        if not {0, 1} <= os.sched_getaffinity(0):
            p.error("--two-nodes needs CPUs 0 and 1")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else FULL
    changes: dict[str, Any] = {}
    if args.rounds is not None:
        changes["rounds"] = args.rounds
    if args.runtime is not None:
        changes["runtime_s"] = args.runtime
    if args.failover_mib is not None:
        try:
            changes["failover_mib"] = tuple(int(x) for x in args.failover_mib.split(",") if x)
        except ValueError:
            raise SystemExit(f"--failover-mib {args.failover_mib!r}: expected comma-separated integers") from None
    if not changes:
        return plan
    return replace(plan, **changes)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = make_plan(args)
    base = args.workdir or Path("/tmp")
    workdir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=f"pvbench-{os.getpid()}-", dir=base))
    results: dict[str, Any] = {
        "meta": {
            "quick": args.quick,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": await machine(),
            "git": await _command_output("git", "-C", str(ROOT), "describe", "--always", "--dirty"),
            "plan": {k: getattr(plan, k) for k in plan.__dataclass_fields__},
            "command": " ".join([sys.executable, "-m", "tests.bench.run", *sys.argv[1:]]),
            "two_nodes": args.two_nodes,
        }
    }
    try:
        if "throughput" in args.sections:
            remote = None
            if args.two_nodes:
                await asyncio.to_thread(pin_trees, [os.getpid()], {0})  # fio and every daemon start here
                remote = {1}
            results["throughput"] = await throughput(args.configs, workdir / "throughput", plan, remote)
            log.info("throughput done")
            await asyncio.to_thread(shutil.rmtree, workdir / "throughput", True)
            results["ratios"] = compute_ratios(results["throughput"])
        if "checkpoint" in args.sections:
            log.info("checkpoint cut and write stall")
            results["checkpoint"] = await checkpoint_stall(workdir / "checkpoint", plan)
        if "failover" in args.sections:
            results["failover"] = await failover_series(workdir, plan, plan.failover_modes)
        if "resync" in args.sections:
            log.info("resync after a partition, full sync and a plain copy")
            settings = resync.QUICK if args.quick else resync.FULL
            if args.resync_size is not None:
                settings = replace(settings, size=args.resync_size)
            if (why := resync.cut_available()) is not None:
                log.warning("resync: the secondary is killed instead of partitioned: %s", why)
                settings = replace(settings, outage="kill")
            results["resync"] = await resync.run(settings, workdir / "resync")
            await asyncio.to_thread(shutil.rmtree, workdir / "resync", True)
    finally:
        if not args.keep:
            await asyncio.to_thread(shutil.rmtree, workdir, True)
        else:
            log.warning("kept %s", workdir)
    results["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results["meta"]["uptime_end"] = await _command_output("uptime")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)  # a QMP wire trace, and retried connects as ERROR
    if shutil.which("fio") is None or shutil.which("qemu-storage-daemon") is None:
        print(
            "bench: fio and qemu-storage-daemon must be on PATH (Debian: apt-get install fio qemu-system-common)",
            file=sys.stderr,
        )
        return 2
    try:
        results = asyncio.run(run(args))
    except PairvolError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    print(render(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
        print(f"\nJSON results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
