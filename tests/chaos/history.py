"""What happened during a run, as the checker needs it: every write the workload issued
(lane, sequence number, slot, checksum, which primary it went to, when it was issued and
when, if ever, it was acknowledged), every checkpoint a secondary reported complete (with
the interval of the call that cut it), and the intervals in which a stall of the workload
is expected (the primary is dead, frozen or being failed over).

Pure data; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Write:
    lane: int
    seq: int
    slot: int
    crc: int
    target: str  # replica that was primary when the write was sent
    term: int  # the controller's count of promotions: a new primary is a new term
    issued: float
    acked: float | None = None
    error: str | None = None
    # the controller moved the workload to another primary while this write was in flight:
    # it may land later (or never); an ack that comes later is recorded but proves nothing
    abandoned: bool = False

    @property
    def certain(self) -> bool:
        """Acknowledged by the primary of its term while that term was current."""
        return self.acked is not None and not self.abandoned

    def describe(self) -> str:
        ack = f"acked at {self.acked:.3f}" if self.acked is not None else "never acked"
        return f"write lane {self.lane} seq {self.seq} (to {self.target}, term {self.term}, {ack})"


@dataclass(frozen=True)
class Cut:
    """A checkpoint a secondary reported: the state it holds lies between start and end."""

    replica: str
    id: int
    start: float  # before this moment every acknowledged write is in the cut
    end: float  # nothing issued after this moment is
    how: str  # "checkpoint" (a POST /v1/checkpoint answered) or "restored" (found after a restart)
    in_sync: bool = True  # the primary reported this secondary replicating around the cut


@dataclass
class History:
    run: int
    lanes: int
    slots: int
    stride: int = 4096  # bytes between slots on the volume (slots are spread over all of it)
    writes: list[Write] = field(default_factory=list)
    retired: list[Write] = field(default_factory=list)  # superseded by a failover's image (see rebase)
    cuts: list[Cut] = field(default_factory=list)
    excused: list[tuple[float, float, str]] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)

    def offset(self, slot: int) -> int:
        return slot * self.stride

    def lane_slots(self, lane: int) -> range:
        return range(lane, self.slots, self.lanes)

    def all_writes(self) -> list[Write]:
        return [*self.retired, *self.writes]

    def rebase(self, seen: dict[int, tuple[int, int] | None]) -> int:
        """After a failover the new primary's image is the volume's state from then on
        (checked or not): per slot, the write it shows becomes the one certain write and
        every other write issued so far is retired (kept for the one-primary check only).
        `seen` maps slot -> (lane, seq) or None for zeros. Returns how many were retired."""
        keep = {(lane_seq, slot) for slot, lane_seq in seen.items() if lane_seq is not None}
        kept: list[Write] = []
        for w in self.writes:
            if ((w.lane, w.seq), w.slot) in keep:
                w.abandoned = False
                if w.acked is None:
                    w.acked = w.issued  # it is on the volume now: as good as acknowledged
                kept.append(w)
            else:
                self.retired.append(w)
        n = len(self.writes) - len(kept)
        self.writes = kept
        return n

    def excuse(self, start: float, end: float, why: str) -> None:
        self.excused.append((start, end, why))

    def event(self, t: float, text: str) -> None:
        self.events.append((t, text))

    def cut(self, replica: str, cid: int) -> Cut | None:
        found = [c for c in self.cuts if c.replica == replica and c.id == cid]
        return found[-1] if found else None
