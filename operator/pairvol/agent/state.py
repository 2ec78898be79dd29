"""What a replica remembers across restarts, written atomically.

``state.json`` in the data dir holds role, stage, epoch, the overlay generation and the
last checkpoint. It is written with write-to-temp, fsync, rename, fsync-dir, so a crash
leaves either the old or the new version, never a torn one. A replica that restarts reads
it, reports what it found and never reformats or truncates an image.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Self

from pairvol.agent.stages import Role, Stage
from pairvol.errors import PairvolError

STATE_FILE = "state.json"
DISK_FILE = "disk.raw"
FORMAT_VERSION = 1


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
    extra: dict[str, Any] = field(default_factory=dict)

    def evolve(self, **changes: Any) -> Self:
        return replace(self, **changes)

    def to_json(self) -> str:
        data = asdict(self)
        data["role"] = self.role.value
        data["stage"] = self.stage.value
        data["version"] = FORMAT_VERSION
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PersistedState:
        try:
            data = json.loads(text)
            if data.pop("version", None) != FORMAT_VERSION:
                raise StateError("unsupported state.json version")
            cp = data.pop("checkpoint", None)
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
                extra=dict(data.pop("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"state.json is corrupt: {exc}") from exc


def load(data_dir: Path) -> PersistedState | None:
    path = data_dir / STATE_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc}") from exc
    return PersistedState.from_json(text)


def save(data_dir: Path, state: PersistedState) -> None:
    """Atomic and durable (blocking: call through asyncio.to_thread)."""
    path = data_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    payload = state.to_json().encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
