"""The kernel's NBD client, for attachments on nodes that have it.

Why it is used where it exists: an attachment served through the kernel's ``nbd`` driver
is one block device in the kernel talking to the attacher over a unix socket, instead of a
FUSE file in a user-space daemon under a loop device; it keeps the queue depth the
workload issues (FUSE + loop serialises it) and costs no FUSE round trips.

What this module knows, and nothing else: whether the node can attach this way, which
``/dev/nbdN`` devices are connected (the kernel shows a ``pid`` attribute in sysfs only
while a device is connected) and their size. Connecting and disconnecting are
``nbd-client``'s (it speaks the NBD handshake and configures the device through netlink,
then exits: the kernel holds the connection, so it survives restarts of the node plugin's
and the attacher host's containers); :mod:`pairvol.csi.attach` calls it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

SYS_BLOCK = Path("/sys/block")
SYS_MODULE = Path("/sys/module/nbd")


def unavailable() -> str | None:
    """Why this node cannot attach through the kernel's NBD client, or None if it can."""
    if not SYS_MODULE.is_dir():
        return "the nbd kernel module is not loaded on this node (modprobe nbd)"
    if not any(SYS_BLOCK.glob("nbd[0-9]*")):
        return "the nbd module is loaded but offers no devices (modprobe nbd nbds_max=N)"
    if shutil.which("nbd-client") is None:
        return "nbd-client is not installed where the node plugin runs"
    return None


def index(device: str) -> int:
    """``/dev/nbd7`` -> 7 (ValueError for anything else)."""
    name = Path(device).name
    if not name.startswith("nbd") or not name[3:].isdigit():
        raise ValueError(f"{device} is not an nbd device")
    return int(name[3:])


def connected(device: str) -> bool:
    """Whether the kernel has a connection for ``device`` (its ``pid`` attribute exists
    exactly while it is connected)."""
    return (SYS_BLOCK / Path(device).name / "pid").exists()


def size(device: str) -> int:
    """The device's size in bytes, as the kernel has it."""
    return int((SYS_BLOCK / Path(device).name / "size").read_text()) * 512


def free_devices() -> list[str]:
    """The nbd devices no connection uses, in index order."""
    found = [p.name for p in SYS_BLOCK.glob("nbd[0-9]*") if p.name[3:].isdigit()]
    return [f"/dev/{name}" for name in sorted(found, key=lambda n: int(n[3:])) if not connected(name)]
