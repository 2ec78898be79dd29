"""The invariants of DESIGN.md §4, checked against a write history (pure; no I/O).

An image is the workload's slots packed (slot i at i * BLOCK), judged by what its blocks
say about themselves (tests/chaos/blocks.py):

* **Latest** — at a moment `at`, every write acknowledged by then is present: each slot
  holds its newest acknowledged write or a newer write whose outcome is unknown (issued,
  never acknowledged: it may or may not have landed).
* **Checkpoint** — the image is the state at one cut: each lane writes one block at a
  time, so a real moment shows, per lane, the writes up to some sequence number k and
  nothing later. k is at least the last write acknowledged before the cut was asked for
  and at most the last write issued before it was answered. A mix of two cuts, a half
  copied disk or a lost write shows up as a slot that does not match any such k.
* **One primary** — no write is acknowledged by a primary of an older term after the
  primary of a newer term acknowledged its first write.
* **Stalls** — while the primary lives, no lane waits longer than the peer timeout + 1 s
  between two acknowledgements, outside the intervals where a stall is expected.
* **Identical** — a primary replicating in sync and its secondary hold the same blocks.

Each check returns violations; an empty list is a pass. A check that cannot be decided
(for example a cut taken while the pair was not in sync) says so in a note instead.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass

from tests.chaos.blocks import BLOCK, BadBlock, Stamp, parse
from tests.chaos.history import Cut, History, Write


@dataclass(frozen=True)
class Violation:
    invariant: str  # latest | checkpoint | one-primary | stall | identical | failover | reprotect | ...
    detail: str

    def __str__(self) -> str:
        return f"[{self.invariant}] {self.detail}"


MAX_PER_CHECK = 5  # the first few differences say enough; the count says the rest


def _stamps(image: bytes, hist: History, what: str, invariant: str) -> tuple[dict[int, Stamp | None], list[Violation]]:
    stamps: dict[int, Stamp | None] = {}
    bad: list[Violation] = []
    for slot in range(hist.slots):
        try:
            stamps[slot] = parse(image[slot * BLOCK : (slot + 1) * BLOCK], hist.run, slot)
        except BadBlock as exc:
            bad.append(Violation(invariant, f"{what}: slot {slot}: {exc}"))
    return stamps, bad


def _by_lane_slot(writes: list[Write]) -> dict[int, dict[int, list[Write]]]:
    out: dict[int, dict[int, list[Write]]] = defaultdict(lambda: defaultdict(list))
    for w in writes:
        out[w.lane][w.slot].append(w)
    for slots in out.values():
        for ws in slots.values():
            ws.sort(key=lambda w: w.seq)
    return out


def _allowed(ws: list[Write], k: int) -> tuple[set[int | None], Write | None]:
    """What a slot may hold in a prefix cut at k: its writes up to k, newest first, down
    to and including the newest certain one (zeros if there is none). Also returns that
    certain write."""
    allowed: set[int | None] = set()
    for w in reversed(ws):
        if w.seq > k:
            continue
        allowed.add(w.seq)
        if w.certain:
            return allowed, w
    allowed.add(None)
    return allowed, None


def check_prefix(
    image: bytes, hist: History, must_t: float, may_t: float, what: str, invariant: str
) -> list[Violation]:
    """The image is a prefix cut per lane: every write certain by must_t is in, nothing
    issued after may_t is, and each slot holds what the cut implies."""
    stamps, out = _stamps(image, hist, what, invariant)
    index = _by_lane_slot(hist.writes)
    problems: list[Violation] = []
    for lane in range(hist.lanes):
        mine = [w for w in hist.writes if w.lane == lane]
        must_k = max((w.seq for w in mine if w.certain and w.acked is not None and w.acked <= must_t), default=0)
        may_k = max((w.seq for w in mine if w.issued <= may_t), default=0)
        seen = [s.seq for slot in hist.lane_slots(lane) if (s := stamps.get(slot)) is not None]
        for slot in hist.lane_slots(lane):
            s = stamps.get(slot)
            if s is not None and s.lane != lane:
                problems.append(Violation(invariant, f"{what}: slot {slot} holds a write of lane {s.lane}"))
        k = max([must_k, *seen])
        if k > may_k:
            problems.append(
                Violation(
                    invariant,
                    f"{what}: lane {lane} shows write seq {k}, issued after the cut "
                    f"(last write issued before it: seq {may_k})",
                )
            )
            continue
        for slot in hist.lane_slots(lane):
            if slot not in stamps:
                continue  # a bad block, reported above
            s = stamps[slot]
            got = s.seq if s is not None else None
            allowed, certain = _allowed(index[lane][slot], k)
            if got in allowed:
                continue
            if got is not None and got not in {w.seq for w in index[lane][slot]}:
                problems.append(
                    Violation(invariant, f"{what}: slot {slot}: lane {lane} seq {got} was never written there")
                )
            elif certain is not None:
                holds = f"write seq {got}" if got is not None else "zeros"
                problems.append(
                    Violation(
                        invariant,
                        f"{what}: slot {slot} holds {holds} but {certain.describe()} must be there "
                        f"(lane {lane} cut at seq {k}, must >= {must_k})",
                    )
                )
            else:
                problems.append(Violation(invariant, f"{what}: slot {slot} holds seq {got}, not allowed at cut {k}"))
    out += problems
    return _summarise(out)


def _summarise(vs: list[Violation]) -> list[Violation]:
    if len(vs) <= MAX_PER_CHECK:
        return vs
    return [*vs[:MAX_PER_CHECK], Violation(vs[0].invariant, f"... and {len(vs) - MAX_PER_CHECK} more like these")]


def check_latest(image: bytes, hist: History, at: float, what: str) -> list[Violation]:
    """Latest mode: every write acknowledged by `at` is in the image."""
    return check_prefix(image, hist, at, at, what, "latest")


def check_checkpoint(image: bytes, hist: History, cut: Cut, what: str) -> tuple[list[Violation], str | None]:
    """Checkpoint mode: the image is exactly the state at `cut`. Returns (violations, note);
    a cut the primary did not report in sync around is judged but only noted."""
    vs = check_prefix(image, hist, cut.start, cut.end, f"{what} (checkpoint {cut.id} by {cut.how})", "checkpoint")
    if vs and not cut.in_sync:
        return (
            [],
            f"{what}: checkpoint {cut.id} was cut while the pair was not in sync; {len(vs)} differences not judged",
        )
    return vs, None


def check_identical(primary: bytes, secondary: bytes, hist: History, what: str) -> list[Violation]:
    """A pair in sync holds the same blocks."""
    out: list[Violation] = []
    for slot in range(hist.slots):
        a = primary[slot * BLOCK : (slot + 1) * BLOCK]
        b = secondary[slot * BLOCK : (slot + 1) * BLOCK]
        if a != b:
            out.append(
                Violation(
                    "identical", f"{what}: slot {slot}: primary {_say(a, hist, slot)}, secondary {_say(b, hist, slot)}"
                )
            )
    return _summarise(out)


def _say(block: bytes, hist: History, slot: int) -> str:
    try:
        s = parse(block, hist.run, slot)
    except BadBlock as exc:
        return str(exc)
    return "zeros" if s is None else f"lane {s.lane} seq {s.seq}"


def check_one_primary(hist: History) -> list[Violation]:
    """No acknowledgement from an older term after a newer term's first acknowledgement."""
    first: dict[int, float] = {}
    for w in hist.all_writes():
        if w.acked is not None and not w.abandoned:
            first[w.term] = min(first.get(w.term, w.acked), w.acked)
    out: list[Violation] = []
    for w in hist.all_writes():
        if w.acked is None:
            continue
        newer = [(t, a) for t, a in first.items() if t > w.term and a < w.acked]
        if newer:
            t, a = min(newer, key=lambda x: x[1])
            out.append(
                Violation(
                    "one-primary",
                    f"{w.describe()}: acknowledged {w.acked - a:.3f} s after the primary of term {t} "
                    "acknowledged its first write",
                )
            )
    return _summarise(out)


def check_stalls(hist: History, bound: float, start: float, end: float) -> tuple[list[Violation], float]:
    """Gaps between successive acknowledgements of each lane, outside excused intervals.
    Returns violations and the longest unexcused gap."""
    out: list[Violation] = []
    worst = 0.0
    for lane in range(hist.lanes):
        acks = sorted(w.acked for w in hist.all_writes() if w.lane == lane and w.certain and w.acked is not None)
        points = [start, *[a for a in acks if start <= a <= end], end]
        for a, b in itertools.pairwise(points):
            if b - a <= bound:
                worst = max(worst, b - a)
                continue
            why = [x for (s, e, x) in hist.excused if s < b and e > a]
            if why:
                continue
            worst = max(worst, b - a)
            out.append(
                Violation(
                    "stall",
                    f"lane {lane}: no write acknowledged for {b - a:.2f} s (bound {bound:.1f} s) from t={a:.3f}",
                )
            )
    return _summarise(out), worst
