"""Typed values out of the driver's protobuf messages (which are dynamic, ``Any`` to mypy)."""

from __future__ import annotations

from typing import Any

from pairvol.csi.params import Capability
from pairvol.csi.server import invalid


def capability(msg: Any, field: str) -> Capability:
    """A VolumeCapability; INVALID_ARGUMENT when its access type or access mode is missing."""
    kind = msg.WhichOneof("access_type")
    if kind is None:
        raise invalid(f"{field} must say block or mount (its access_type is empty)")
    if not msg.HasField("access_mode"):
        raise invalid(f"{field}.access_mode is required")
    mount = msg.mount
    return Capability(
        block=kind == "block",
        access_mode=int(msg.access_mode.mode),
        fs_type=str(mount.fs_type) if kind == "mount" else "",
        mount_flags=tuple(str(f) for f in mount.mount_flags) if kind == "mount" else (),
    )


def string_map(msg: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in msg.items()}
