"""One agent per data dir: an exclusive lock held for the agent's whole life.

Two agents on one data dir destroy a replica before any QEMU image lock can object: the
second one's start writes the state slots (the restart's own bookkeeping), removes overlay
files it takes for stale, and restores a secondary by deleting its undo log — all before its
daemon opens ``disk.raw``. It happens when a pod is force-deleted on a node the API server
cannot reach while its containers still run, and the operator then starts the replica's
next pod on that node; or when a pod create the API server applied is retried. So the agent
takes ``flock(LOCK_EX)`` on ``agent.lock`` in the data dir before it reads anything there,
and waits for it: the kernel releases it when the process holding it is gone (whatever
killed it), so the next agent goes on by itself, and never beside the previous one.

The lock file holds the holder's PID (in its PID namespace) for the waiting agent's message.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from pathlib import Path

from pairvol.errors import PairvolError

log = logging.getLogger(__name__)


class DataDirLockError(PairvolError):
    """The data dir cannot be locked at all (not: another agent holds it)."""


LOCK_FILE = "agent.lock"
# how often a waiting agent tries again, and says again that it waits
RETRY_S = 0.2
REPORT_EVERY_S = 10.0


def _try_lock(path: Path) -> int | None:
    """The locked file's descriptor (not inherited by children), or None if another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as exc:  # ENOLCK, EOPNOTSUPP...: a file system that cannot keep agents apart
        os.close(fd)
        raise DataDirLockError(
            f"cannot lock {path}: {exc.strerror}. The data directory must be on a file system with "
            "flock (a local ext4 or xfs; NFS only with its lock service): the lock keeps a second "
            "agent off this replica. Use another hostPath (spec.storage.hostPath)"
        ) from exc
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        return f"PID {int(path.read_text().strip())}"
    return "an unknown process"


async def hold_data_dir(data_dir: Path, give_up: asyncio.Event | None = None) -> int | None:
    """Wait until this process alone holds ``data_dir``; returns the lock's descriptor (close
    it to let go; the process's end lets go too), or None once ``give_up`` is set (the agent
    is stopped while it waits: it must not go on to open the replica)."""
    path = data_dir / LOCK_FILE
    reported = 0.0
    while True:
        if give_up is not None and give_up.is_set():
            return None
        fd = await asyncio.to_thread(_try_lock, path)
        if fd is not None:
            if reported:
                log.info("%s is free: starting", data_dir)
            return fd
        now = time.monotonic()
        if now - reported >= REPORT_EVERY_S:
            holder = await asyncio.to_thread(_holder, path)
            log.warning(
                "another agent (%s) still runs on %s: waiting for it to exit before touching the replica; "
                "if its pod was force-deleted, its containers may still run on this node",
                holder,
                data_dir,
            )
            reported = now
        await asyncio.sleep(RETRY_S)


def release(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
