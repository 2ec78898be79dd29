"""A verifiable write log: concurrent writers whose records prove what a disk must hold.

Each writer owns the slots ``slot % writers == writer`` and writes them one request at a
time (its own queue depth 1; all writers together keep many requests in flight). Every
4 KiB record carries writer, sequence number, slot and a CRC of a payload derived from
(writer, seq), so a block is either a whole record of one write or garbage.

Because each writer is sequential, a crash-consistent image shows, per writer, a *prefix*
of its writes: there is a k such that every slot of that writer holds the last write with
seq <= k. `check_cut` verifies exactly that, plus bounds on k: at least the last write
acknowledged before the cut began, at most the last write issued before it ended.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import struct
import time
import zlib
from dataclasses import dataclass, field

from pairvol.nbd import NBDClient, NBDError

BLOCK = 4096
MAGIC = b"PVLOG001"
_HDR = struct.Struct(">8sIQQI")


def payload(writer: int, seq: int) -> bytes:
    seed = hashlib.sha256(f"{writer}:{seq}".encode()).digest()
    return (seed * (BLOCK // len(seed) + 1))[: BLOCK - _HDR.size]


def record(writer: int, seq: int, slot: int) -> bytes:
    body = payload(writer, seq)
    return _HDR.pack(MAGIC, writer, seq, slot, zlib.crc32(body)) + body


def parse(block: bytes) -> tuple[int, int, int] | None:
    """(writer, seq, slot) of a valid record, None for a never-written (zero) block;
    raises ValueError for a torn or foreign block."""
    if block == bytes(len(block)):
        return None
    magic, writer, seq, slot, crc = _HDR.unpack_from(block)
    body = block[_HDR.size :]
    if magic != MAGIC or zlib.crc32(body) != crc or body != payload(writer, seq):
        raise ValueError("torn or foreign block")
    return writer, seq, slot


@dataclass
class Write:
    writer: int
    seq: int
    slot: int
    issued: float
    acked: float | None = None


@dataclass
class WriteLog:
    writers: int
    slots: int
    base_offset: int = 0
    history: list[list[Write]] = field(default_factory=list)
    # why each writer stopped: "stopped" (asked to), "done" (max_writes), or the NBD error
    # that ended it (the primary died)
    ended: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.history = [[] for _ in range(self.writers)]
        self.ended = ["running"] * self.writers

    def offset(self, slot: int) -> int:
        return self.base_offset + slot * BLOCK

    def slots_of(self, writer: int) -> list[int]:
        return list(range(writer, self.slots, self.writers))

    async def run(
        self,
        client: NBDClient,
        stop: asyncio.Event,
        rng: random.Random,
        max_writes: int | None = None,
        pace: float = 0.0,
    ) -> None:
        """Write until `stop` is set or the NBD connection fails (the primary died).

        Only an NBD error ends a writer quietly (it is recorded in ``ended``); anything else
        is a bug in the test and propagates."""

        async def writer(w: int) -> None:
            mine = self.slots_of(w)
            seq = 0
            while not stop.is_set() and (max_writes is None or seq < max_writes):
                seq += 1
                slot = rng.choice(mine)
                entry = Write(w, seq, slot, time.monotonic())
                self.history[w].append(entry)
                try:
                    await client.pwrite(record(w, seq, slot), self.offset(slot))
                except NBDError as exc:
                    self.ended[w] = f"NBD error: {exc}"
                    return
                entry.acked = time.monotonic()
                if pace:
                    await asyncio.sleep(pace)
            self.ended[w] = "stopped" if stop.is_set() else "done"

        await asyncio.gather(*(writer(w) for w in range(self.writers)))

    async def wait_acked(self, at_least: int, within: float = 60.0) -> None:
        """Wait until `at_least` writes are acknowledged: tests pace themselves on the
        load's progress, not on wall-clock sleeps a slow machine can make too short."""
        deadline = time.monotonic() + within
        while self.acked() < at_least:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"only {self.acked()} of {at_least} writes acknowledged after {within} s; ended: {self.ended}"
                )
            await asyncio.sleep(0.01)

    def acked(self, before: float = float("inf")) -> int:
        """Writes acknowledged (before the given monotonic time)."""
        return sum(1 for h in self.history for e in h if e.acked is not None and e.acked <= before)

    def check_cut(self, image: bytes, not_before: float, not_after: float) -> dict[str, int]:
        """Verify the image is a crash-consistent cut taken between the two monotonic times.
        Returns counts; raises AssertionError with the first violation.

        A cut before which no write was acknowledged proves nothing (an image of zeroes
        would pass), so that is a violation too: every writer must have had a write
        acknowledged before ``not_before``."""
        idle = [
            w
            for w in range(self.writers)
            if not any(e.acked is not None and e.acked <= not_before for e in self.history[w])
        ]
        assert not idle, (
            f"writers {idle} had no write acknowledged before the cut ({self.acked(not_before)} acked in all): "
            f"the check would prove nothing; they ended with {[self.ended[w] for w in idle]}"
        )
        seen: dict[int, tuple[int, int] | None] = {}
        for slot in range(self.slots):
            off = self.offset(slot)
            try:
                rec = parse(image[off : off + BLOCK])
            except ValueError:
                raise AssertionError(f"slot {slot}: torn or foreign block") from None
            if rec is not None:
                writer, seq, rslot = rec
                assert rslot == slot and writer == slot % self.writers, f"slot {slot}: record of slot {rslot}"
                seen[slot] = (writer, seq)
            else:
                seen[slot] = None
        visible_writes = 0
        for w in range(self.writers):
            hist = self.history[w]
            k = max((s[1] for slot in self.slots_of(w) if (s := seen[slot]) is not None), default=0)
            must = max((e.seq for e in hist if e.acked is not None and e.acked <= not_before), default=0)
            may = max((e.seq for e in hist if e.issued <= not_after), default=0)
            assert k >= must, f"writer {w}: write {must} was acknowledged before the cut but is missing (image at {k})"
            assert k <= may, f"writer {w}: image shows write {k}, issued after the cut (last allowed {may})"
            last: dict[int, int] = {}
            for e in hist:
                if e.seq <= k:
                    last[e.slot] = e.seq
            for slot in self.slots_of(w):
                want = last.get(slot)
                got = seen[slot][1] if seen[slot] is not None else None  # type: ignore[index]
                assert got == want, f"writer {w} slot {slot}: holds write {got}, a prefix cut at {k} needs {want}"
            visible_writes += k
        return {"visible": visible_writes, "acked": self.acked()}
