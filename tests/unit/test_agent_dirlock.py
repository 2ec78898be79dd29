"""The data dir lock on a file system that cannot lock at all: a clear error naming the file
system as the cause and what to do, not a bare errno (a real second agent waiting for the
lock is tests/integration/test_restart_guards.py). No file system without ``flock`` is
available here, so the call fails as NFS without its lock service makes it fail."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest

from pairvol.agent import dirlock
from pairvol.errors import PairvolError


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP])
async def test_a_file_system_without_locks_is_named_as_the_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    before = open_fds()
    with pytest.raises(dirlock.DataDirLockError) as caught:
        await dirlock.hold_data_dir(tmp_path)
    message = str(caught.value)
    assert str(tmp_path / dirlock.LOCK_FILE) in message and os.strerror(code) in message
    assert "file system with flock" in message and "spec.storage.hostPath" in message
    assert isinstance(caught.value, PairvolError)  # the agent's CLI: one line, exit status 2
    assert open_fds() <= before, "the lock file's descriptor is closed"


async def test_a_free_data_dir_is_held_and_names_its_holder(tmp_path: Path) -> None:
    fd = await dirlock.hold_data_dir(tmp_path)
    try:
        assert fd is not None
        assert (tmp_path / dirlock.LOCK_FILE).read_text() == f"{os.getpid()}\n"
    finally:
        assert fd is not None
        dirlock.release(fd)
