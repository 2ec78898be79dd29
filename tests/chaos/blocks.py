"""Self-describing 4 KiB blocks: a block's content says which write it is.

Every write of the chaos workload is one block carrying the run id, its lane, its
sequence number and its slot, followed by a body derived from those, and a CRC of the
body. So an image can be read back without any knowledge of the run's timing: each block
is a zero block (never written), a whole record of exactly one logged write, or garbage
(torn, foreign, or from another slot), and the checker can tell which.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

BLOCK = 4096
MAGIC = b"PVCHAOS1"
_HDR = struct.Struct(">8sQIQQI")  # magic, run id, lane, seq, slot, crc32(body)
ZERO = bytes(BLOCK)


class BadBlock(ValueError):
    """The block is neither zeros nor a whole record of this run for this slot."""


@dataclass(frozen=True)
class Stamp:
    """What a block says about itself."""

    run: int
    lane: int
    seq: int
    slot: int


def body(run: int, lane: int, seq: int) -> bytes:
    seed = hashlib.sha256(f"{run}:{lane}:{seq}".encode()).digest()
    return (seed * (BLOCK // len(seed) + 1))[: BLOCK - _HDR.size]


def make(run: int, lane: int, seq: int, slot: int) -> bytes:
    b = body(run, lane, seq)
    return _HDR.pack(MAGIC, run, lane, seq, slot, zlib.crc32(b)) + b


def checksum(block: bytes) -> int:
    return zlib.crc32(block)


def parse(block: bytes, run: int, slot: int) -> Stamp | None:
    """The stamp of a valid record of this run at this slot; None for a zero block.
    Raises BadBlock saying what is wrong otherwise."""
    if len(block) != BLOCK:
        raise BadBlock(f"short block ({len(block)} bytes)")
    if block == ZERO:
        return None
    magic, brun, lane, seq, bslot, crc = _HDR.unpack_from(block)
    if magic != MAGIC:
        raise BadBlock("no record header (foreign or torn data)")
    b = block[_HDR.size :]
    if zlib.crc32(b) != crc or b != body(brun, lane, seq):
        raise BadBlock(f"torn record (header says lane {lane} seq {seq}, body does not match)")
    if brun != run:
        raise BadBlock(f"record of another run ({brun})")
    if bslot != slot:
        raise BadBlock(f"record of slot {bslot} (lane {lane} seq {seq}) found at slot {slot}")
    return Stamp(brun, lane, seq, bslot)
