"""What a replica remembers across restarts, written atomically.

Two slots in the data dir (``state.a``, ``state.b``) hold role, stage, epoch, the overlay
generation, the last checkpoint and whether it is still a restore point, and how far a
failover got, each with a sequence number and a CRC; writes go to
the older slot in place, so a crash leaves the previous version readable and a full file
system cannot block a state change (see :func:`save`). A replica that restarts reads
it, reports what it found and never reformats or truncates an image.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Self

from pairvol.agent.resync import SyncPoint
from pairvol.agent.stages import FailoverMode, Role, Stage
from pairvol.errors import PairvolError

STATE_SLOTS = ("state.a", "state.b")
STATE_FILE = STATE_SLOTS[0]  # its presence marks a data dir that has held a replica
SLOT_SIZE = 64 * 1024
_SLOT_MAGIC = b"PVSTATE1"
_SLOT_HEADER = struct.Struct(">8sQII")
DISK_FILE = "disk.raw"
BITMAP_FILE = "resync-bitmap.qcow2"
FORMAT_VERSION = 1
# a state that records a local disk failure (H13): agents that predate it refuse the
# format instead of reading the state without the record, which they would then drop
FORMAT_LOCAL_FAILURE = 2


class StateError(PairvolError):
    """The persisted state is unreadable or belongs to another volume."""


@dataclass(frozen=True)
class Checkpoint:
    id: int
    time: float
    duration_ms: float

    def to_api(self) -> dict[str, Any]:
        return {"id": self.id, "time": self.time, "durationMs": round(self.duration_ms, 3)}


@dataclass(frozen=True)
class PersistedState:
    name: str
    size: int
    role: Role = Role.NONE
    stage: Stage = Stage.NONE
    epoch: int = 0
    generation: int = 0
    checkpoint: Checkpoint | None = None
    peer: str | None = None
    out_of_sync: bool = False
    clean_shutdown: bool = True
    # the checkpoint is a state the volume had and the undo log back to it is intact: a
    # checkpoint-mode failover may return to it (not checkpoint 0, not after an unclean stop)
    restore_point: bool = False
    # stage FAILOVER: the mode being carried out, and whether the overlays are durable (a
    # restart then redoes the commit; see SecondaryChain.commit)
    failover_mode: FailoverMode | None = None
    overlays_durable: bool = False
    # secondary: the identity of this disk's content (docs/correctness.md, R3): kept while
    # the disk only ever received the writes of the primary it is paired with, replaced
    # when it may hold anything else (it served as primary, a new boot after an unclean stop)
    disk_id: str | None = None
    boot_id: str | None = None
    # primary: the peer disk the dirty bitmap is about, and whether the bitmap holds every
    # region that disk may lack (R1); with no peer disk, a resync must copy everything and
    # ``full_reason`` says why
    peer_disk: str | None = None
    tracking: bool = False
    full_reason: str | None = None
    # a clean stop wrote the tracking bitmap into BITMAP_FILE
    bitmap_saved: bool = False
    # primary: the epoch since which this disk is one continuous history of the writes its
    # workload clients saw acknowledged. Set anew whenever that may not hold: at a failover
    # (a Checkpoint-mode one rolls the disk back; after any, this disk continues another
    # copy's history), at a primary start on a disk that was not primary, after an unclean
    # stop with a new boot; kept while the same disk is confirmed as primary again. The
    # workload export is also served as recipes.lineage_export_name(lineage).
    lineage: int | None = None
    # a grow in progress: the disk file's size before it (docs/correctness.md, E1); the new
    # size is persisted before the file grows, so a restart that finds the file still at
    # this size completes the grow, and any other size is refused
    resize_from: int | None = None
    # R6, old primary: written only by the final save of a clean stop whose drain completed
    # on both quorum children with the peer in sync: this disk then holds exactly what the
    # peer's disk held at that sync point. Taken (and cleared durably) by the next start
    # before anything can write the disk; ``stop_note`` says why a clean stop has none.
    stopped_in_sync: SyncPoint | None = None
    stop_note: str | None = None
    # R6, new primary: promoted in Latest mode from this sync point, and the tracking bitmap
    # holds every region written since (started before the workload export served); kept
    # across a clean stop with the bitmap, dropped after an unclean one, at a role change and
    # at the first pairing. ``union_reason``: why there is no such record.
    promoted_from: SyncPoint | None = None
    union_reason: str | None = None
    # primary: a start at this epoch refused to serve (its Lease could not be taken) and
    # served nothing; with ``epoch`` equal to it the replica has served nothing at its epoch
    # and never will (serving again needs a start at a newer epoch). The operator may then
    # promote a secondary it marked OutOfSync only for that start.
    refused_epoch: int | None = None
    # primary: its local disk failed a write that the peer took (QUORUM_REPORT_BAD on the
    # local child): the write was acknowledged, so this disk lacks what the workload saw
    # written and must never serve as the primary again (docs/correctness.md H13). Cleared
    # only when the replica becomes a secondary, whose disk the new primary copies anew.
    local_failure: str | None = None

    def evolve(self, **changes: Any) -> Self:
        return replace(self, **changes)

    def to_json(self) -> str:
        data = asdict(self)
        data["role"] = self.role.value
        data["stage"] = self.stage.value
        data["failover_mode"] = self.failover_mode.value if self.failover_mode else None
        data["version"] = FORMAT_VERSION if self.local_failure is None else FORMAT_LOCAL_FAILURE
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PersistedState:
        try:
            data = json.loads(text)
            if data.pop("version", None) not in (FORMAT_VERSION, FORMAT_LOCAL_FAILURE):
                raise StateError("unsupported state version")
            cp = data.pop("checkpoint", None)
            mode = data.pop("failover_mode", None)
            return cls(
                name=str(data.pop("name")),
                size=int(data.pop("size")),
                role=Role(data.pop("role")),
                stage=Stage(data.pop("stage")),
                epoch=int(data.pop("epoch")),
                generation=int(data.pop("generation")),
                checkpoint=Checkpoint(**cp) if cp else None,
                peer=data.pop("peer", None),
                out_of_sync=bool(data.pop("out_of_sync", False)),
                clean_shutdown=bool(data.pop("clean_shutdown", False)),
                # states written before the field existed: any checkpoint but 0 was one
                restore_point=bool(data.pop("restore_point", bool(cp) and int(cp.get("id", 0)) > 0)),
                failover_mode=FailoverMode(mode) if mode else None,
                overlays_durable=bool(data.pop("overlays_durable", False)),
                disk_id=data.pop("disk_id", None),
                boot_id=data.pop("boot_id", None),
                peer_disk=data.pop("peer_disk", None),
                tracking=bool(data.pop("tracking", False)),
                full_reason=data.pop("full_reason", None),
                bitmap_saved=bool(data.pop("bitmap_saved", False)),
                lineage=data.pop("lineage", None),
                resize_from=None if (grow := data.pop("resize_from", None)) is None else int(grow),
                stopped_in_sync=_sync_point(data.pop("stopped_in_sync", None)),
                stop_note=data.pop("stop_note", None),
                promoted_from=_sync_point(data.pop("promoted_from", None)),
                union_reason=data.pop("union_reason", None),
                refused_epoch=None if (refused := data.pop("refused_epoch", None)) is None else int(refused),
                local_failure=None if (failed := data.pop("local_failure", None)) is None else str(failed),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"state is corrupt: {exc}") from exc


def _sync_point(data: Any) -> SyncPoint | None:
    if data is None:
        return None
    return SyncPoint(disk=str(data["disk"]), epoch=int(data["epoch"]))


def _read_slot(path: Path) -> tuple[int, PersistedState] | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror}") from exc
    if len(raw) < _SLOT_HEADER.size:
        return None
    magic, seq, length, crc = _SLOT_HEADER.unpack_from(raw)
    body = raw[_SLOT_HEADER.size : _SLOT_HEADER.size + length]
    if magic != _SLOT_MAGIC or len(body) != length or zlib.crc32(body) != crc:
        return None  # torn or never completed: the other slot holds the state
    return seq, PersistedState.from_json(body.decode())


def _slots(data_dir: Path) -> list[Path]:
    return [data_dir / name for name in STATE_SLOTS]


def load(data_dir: Path) -> PersistedState | None:
    """The newest valid slot (blocking: call through asyncio.to_thread)."""
    found = [slot for path in _slots(data_dir) if (slot := _read_slot(path)) is not None]
    if not found:
        if any(path.exists() for path in _slots(data_dir)):
            raise StateError(f"no valid state in {data_dir} ({', '.join(STATE_SLOTS)} are corrupt)")
        return None
    return max(found, key=lambda slot: slot[0])[1]


def save(data_dir: Path, state: PersistedState) -> None:
    """Durable and atomic without allocating: two slots, allocated once, overwritten in
    place in turn, each with a sequence number and a CRC. A torn write leaves the other
    slot; a full file system (the hidden disk can fill it) cannot stop a state change.
    Blocking: call through asyncio.to_thread."""
    seqs = [slot[0] for path in _slots(data_dir) if (slot := _read_slot(path)) is not None]
    seq = max(seqs, default=0) + 1
    body = state.to_json().encode()
    if _SLOT_HEADER.size + len(body) > SLOT_SIZE:
        raise StateError(f"state is {len(body)} bytes, more than a {SLOT_SIZE}-byte slot")
    record = _SLOT_HEADER.pack(_SLOT_MAGIC, seq, len(body), zlib.crc32(body)) + body
    path = _slots(data_dir)[seq % 2]
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            created = os.fstat(fd).st_size < SLOT_SIZE
            if created:
                os.posix_fallocate(fd, 0, SLOT_SIZE)
            os.pwrite(fd, record.ljust(SLOT_SIZE, b"\0"), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            dir_fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except OSError as exc:
        raise StateError(f"cannot persist the replica's state in {path}: {exc.strerror}") from exc
