"""The node plugin's commands (pairvol.csi.attach.run) never outlive the call that ran them.

gRPC cancels a handler when the kubelet's deadline passes or its connection drops. A
command (mount, losetup, ...) that went on running after that would overlap with the
kubelet's retry, which runs once the volume's lock is free: so a cancelled ``run`` kills
its command, with everything that command started, and waits for it before the
cancellation goes on. A file system being made is the exception: killed half-way, it
would leave a device that is neither blank nor formatted, so ``mkfs`` is waited for
instead (within its own time limit), still before the cancellation goes on.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pairvol.aio import bounded
from pairvol.csi.attach import AttachError, run

pytestmark = pytest.mark.timeout(60)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has exited: it only waits to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def pids_in(path: Path) -> list[int]:
    """The PIDs a command wrote to ``path``, once it has written both."""
    while True:
        text = await asyncio.to_thread(lambda: path.read_text() if path.exists() else "")
        if len(text.split()) == 2 and text.endswith("\n"):
            return [int(p) for p in text.split()]
        await asyncio.sleep(0.02)


async def gone(pid: int, within: float = 2.0) -> bool:
    """Whether ``pid`` has exited within ``within`` seconds (a grandchild is reaped by
    whoever adopted it, which takes a moment)."""
    deadline = asyncio.get_running_loop().time() + within
    while alive(pid):
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


SHELL_AND_CHILD = 'sleep 60 & echo "$$ $!" > "$0"; wait'


async def test_a_cancelled_command_and_what_it_started_are_gone_when_the_cancellation_arrives(
    tmp_path: Path,
) -> None:
    pids = tmp_path / "pids"
    call = asyncio.create_task(run("sh", "-c", SHELL_AND_CHILD, str(pids)))
    shell, child = await bounded(pids_in(pids), 10)
    assert alive(shell) and alive(child)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    # the command itself was waited for before the cancellation arrived here
    assert not alive(shell), "the cancelled command still runs"
    assert await gone(child), "a process the cancelled command started still runs"


async def test_a_command_past_its_time_limit_is_killed_with_what_it_started(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    with pytest.raises(AttachError, match="did not finish within 1 s"):
        await run("sh", "-c", SHELL_AND_CHILD, str(pids), timeout=1)
    shell, child = await pids_in(pids)
    assert not alive(shell)
    assert await gone(child), "a process the timed-out command started still runs"


async def test_a_cancellation_repeated_while_the_command_is_killed_still_waits_for_it(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    call = asyncio.create_task(run("sh", "-c", SHELL_AND_CHILD, str(pids)))
    shell, child = await bounded(pids_in(pids), 10)
    call.cancel()
    await asyncio.sleep(0)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert not alive(shell)
    assert await gone(child)


async def test_a_cancelled_mkfs_is_waited_for_not_killed(tmp_path: Path) -> None:
    """``finish_on_cancel``: the command completes, then the cancellation goes on."""
    started, finished = tmp_path / "started", tmp_path / "finished"
    script = f'echo "$$ $$" > "{started}"; sleep 1; touch "{finished}"'
    call = asyncio.create_task(run("sh", "-c", script, finish_on_cancel=True))
    await bounded(pids_in(started), 10)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert finished.exists(), "the cancelled mkfs was cut short"


async def test_a_cancelled_mkfs_is_still_killed_at_its_time_limit(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    call = asyncio.create_task(run("sh", "-c", SHELL_AND_CHILD, str(pids), timeout=1.5, finish_on_cancel=True))
    shell, child = await bounded(pids_in(pids), 10)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert not alive(shell)
    assert await gone(child)


async def test_a_command_that_succeeds_or_fails_reports_its_output() -> None:
    assert await run("sh", "-c", "echo out; echo err >&2") == (0, "out\nerr")
    assert await run("sh", "-c", "echo no; exit 3", check=False) == (3, "no")
    with pytest.raises(AttachError, match=r"exit status 3\): no"):
        await run("sh", "-c", "echo no; exit 3")
