"""Pure number crunching for the benchmarks: percentiles, ratios, write-stall attribution
and the printed table.

Kept free of I/O so the arithmetic that turns raw samples into the reported numbers can
be unit-tested on its own (tests/bench/test_bench_smoke.py); a benchmark whose
percentile code is wrong reports confident nonsense.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

STALL_THRESHOLD_MS = 10.0


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by the nearest-rank method; None without samples.

    Nearest rank never interpolates: p100 is the maximum and p99.9 of 100 samples is the
    maximum too, which is the honest answer for small sample counts.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(values: Sequence[float], qs: Sequence[float] = (50, 99, 99.9)) -> dict[str, float | int | None]:
    """n, max and the requested percentiles of a sample set (keys like ``p50``, ``p99.9``)."""
    out: dict[str, float | int | None] = {"n": len(values), "max": max(values) if values else None}
    for q in qs:
        out[f"p{q:g}"] = percentile(values, q)
    return out


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either side is missing or the divisor is zero."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


@dataclass(frozen=True)
class Write:
    """One client write: when it was submitted and how long it took (CLOCK_MONOTONIC ns)."""

    start_ns: int
    latency_ns: int

    @property
    def end_ns(self) -> int:
        return self.start_ns + self.latency_ns


def overlaps(write: Write, window: tuple[int, int]) -> bool:
    """Whether a write was in flight at any moment of the window [start, end]."""
    return write.start_ns <= window[1] and write.end_ns >= window[0]


def stall_report(
    writes: Sequence[Write], windows: Sequence[tuple[int, int]], threshold_ms: float = STALL_THRESHOLD_MS
) -> dict[str, Any]:
    """Latency of a QD1 write stream, split by whether a write overlapped a checkpoint.

    At queue depth 1 a write's latency *is* the time the workload stood still, so the
    longest write is the longest stall. ``windows`` are the checkpoint calls
    (request sent .. response received) on the same clock as the writes.
    """
    lat_ms = [w.latency_ns / 1e6 for w in writes]
    during = [w.latency_ns / 1e6 for w in writes if any(overlaps(w, win) for win in windows)]
    outside = [w.latency_ns / 1e6 for w in writes if not any(overlaps(w, win) for win in windows)]
    duration_s = (max(w.end_ns for w in writes) - min(w.start_ns for w in writes)) / 1e9 if writes else 0.0
    return {
        "writes": len(writes),
        "iops": len(writes) / duration_s if duration_s > 0 else None,
        "all_ms": summary(lat_ms, (50, 99, 99.9)),
        "during_checkpoint_ms": summary(during, (50, 99, 99.9)),
        "outside_checkpoint_ms": summary(outside, (50, 99, 99.9)),
        "over_threshold": sum(1 for v in lat_ms if v > threshold_ms),
        "over_threshold_during_checkpoint": sum(1 for v in during if v > threshold_ms),
        "threshold_ms": threshold_ms,
    }


def since_cut_report(
    writes: Sequence[Write], windows: Sequence[tuple[int, int]], edges_ms: Sequence[float] = (0, 100, 300)
) -> list[dict[str, Any]]:
    """Latency of the writes that overlapped no checkpoint call, bucketed by how long
    after the end of the previous checkpoint call they started.

    After every cut, copy-before-write starts over: the first write to each cluster
    copies the old data into the new hidden overlay first. This shows how long that
    keeps writes slow. Writes before the first call are not counted.
    """
    ends = sorted(end for _, end in windows)
    buckets: list[list[float]] = [[] for _ in edges_ms]
    for w in writes:
        if any(overlaps(w, win) for win in windows):
            continue
        i = bisect.bisect_right(ends, w.start_ns)
        if i == 0:
            continue
        since_ms = (w.start_ns - ends[i - 1]) / 1e6
        b = bisect.bisect_right(list(edges_ms), since_ms) - 1
        buckets[b].append(w.latency_ns / 1e6)
    out = []
    for j, lo in enumerate(edges_ms):
        hi = edges_ms[j + 1] if j + 1 < len(edges_ms) else None
        out.append({"from_ms": lo, "to_ms": hi, **summary(buckets[j], (50, 99))})
    return out


def fmt(value: float | int | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    if value != 0 and abs(value) < 10**-digits * 5:
        return f"{value:.{digits + 2}f}"
    return f"{value:.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table, first column left-aligned, the others right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=False))
        ]
        return "  ".join(parts).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])
