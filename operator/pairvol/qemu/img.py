"""qemu-img, run as an asyncio subprocess (never blocks the event loop)."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path

from pairvol.qemu import QemuError

log = logging.getLogger(__name__)


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise QemuError(
            f"{name} not found on PATH; install it (Debian: apt-get install "
            f"{'qemu-utils' if name == 'qemu-img' else 'qemu-system-common'})"
        )
    return path


async def run_qemu_img(*args: str) -> str:
    exe = require_binary("qemu-img")
    proc = await asyncio.create_subprocess_exec(
        exe, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise QemuError(f"qemu-img {' '.join(args)} failed: {err.decode().strip() or out.decode().strip()}")
    return out.decode()


async def create(path: Path, fmt: str, size: int) -> None:
    """Create an image; refuses to overwrite an existing file (never reformat data)."""
    if await asyncio.to_thread(path.exists):
        raise QemuError(f"refusing to create {path}: it exists already")
    # raw volumes reserve their space up front: a primary must never hit ENOSPC on its own
    # disk (quorum would then acknowledge a write that only the peer has)
    opts = ["-o", "cluster_size=65536"] if fmt == "qcow2" else ["-o", "preallocation=falloc"]
    await run_qemu_img("create", "-q", "-f", fmt, *opts, str(path), str(size))
    log.debug("created %s image %s (%d bytes)", fmt, path, size)


async def allocated_ranges(path: Path) -> list[tuple[int, int]]:
    """The byte ranges a qcow2 image holds itself — data or zero clusters, not what its
    backing file would show (the backing is left out): ``(offset, length)``, sorted, neighbours
    joined. ``-U``: the image may be open elsewhere read-only; the caller has closed it."""
    spec = json.dumps({"driver": "qcow2", "file": {"driver": "file", "filename": str(path)}, "backing": None})
    out = await run_qemu_img("map", "--output=json", "-U", f"json:{spec}")
    try:
        entries = json.loads(out)
        ranges: list[tuple[int, int]] = []
        for e in entries:
            if not e["present"]:
                continue
            start, length = int(e["start"]), int(e["length"])
            if ranges and ranges[-1][0] + ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
            else:
                ranges.append((start, length))
    except (ValueError, KeyError, TypeError) as exc:
        raise QemuError(f"qemu-img map of {path} gave an unreadable answer: {exc}") from exc
    return ranges
