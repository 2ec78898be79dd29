"""`pairvol localcluster ...` and `kubectl` as a user runs them from a shell, for tests that
drive a detached local cluster through its state directory."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from pairvol.aio import bounded
from tests.support.ci import tool


@dataclass
class Result:
    code: int
    out: str
    err: str


async def pairvol(*args: str, within: float = 60) -> Result:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pairvol", "localcluster", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await bounded(proc.communicate(), within)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


def helm_home(tmp: Path) -> dict[str, str]:
    """helm's cache, config and data directories under ``tmp`` (not the user's)."""
    return {f"HELM_{kind}_HOME": str(tmp / f"helm-{kind.lower()}") for kind in ("CACHE", "CONFIG", "DATA")}


async def run_session(argv: list[str], *, cwd: Path, env: dict[str, str], within: float) -> tuple[int, str]:
    """A command as a user runs it from a shell, in a session of its own: (exit code,
    stdout and stderr together). Whatever it leaves in its process group is killed after,
    also when the test fails."""
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, env=env, start_new_session=True,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[bytes] = []

    async def collect() -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            lines.append(line)
        await proc.wait()

    try:
        await bounded(collect(), within)
    except TimeoutError:
        tail = b"".join(lines[-80:]).decode(errors="replace")
        raise AssertionError(f"{argv[2:]} still running after {within:g} s; its last output:\n{tail}") from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode is not None
    return proc.returncode, b"".join(lines).decode(errors="replace")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def stop_detached(state: Path) -> None:
    """Stop whatever `up --detach` left running in ``state`` (by its PID): SIGTERM, up to
    30 s for a clean stop, then SIGKILL."""
    cluster = state / "cluster.json"
    if not cluster.exists():
        return
    pid = json.loads(cluster.read_text())["pid"]
    if alive(pid):
        os.kill(pid, signal.SIGTERM)
        for _ in range(150):
            if not alive(pid):
                break
            await asyncio.sleep(0.2)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


async def kubectl(kubeconfig: str, *args: str, within: float = 60) -> str:
    proc = await asyncio.create_subprocess_exec(
        tool("kubectl"), "--kubeconfig", kubeconfig, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await bounded(proc.communicate(), within)
    assert proc.returncode == 0, err.decode()
    return out.decode()
