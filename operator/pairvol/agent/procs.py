"""Agent processes driven from outside, as the operator and other tools would: start
`pairvol agent` as a child process, call its HTTP API, and clean it up by PID (the agent
runs in its own process group, with its qemu-storage-daemon).

Used by `pairvol demo-agent`, the test suite and the benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from pairvol.aio import bounded
from pairvol.nbd import NBDClient

_handed_out: set[int] = set()  # ports this process gave out: never twice


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now and that no outgoing connection will take before the
    caller listens on it: chosen below the kernel's ephemeral range, which is where
    ``bind(0)`` would pick, and where every client socket of a busy machine picks too.
    Where that range leaves too little room below it, the kernel chooses."""
    low, _ = _ephemeral_range()
    if low - 10000 >= 1000:
        first, end = _port_slice(10000, low)
        for _ in range(200):
            port = random.randrange(first, end)
            if port in _handed_out:
                continue
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def _port_slice(low: int, high: int) -> tuple[int, int]:
    """``PAIRVOL_PORT_SLICE=K/N``: the K-th of N equal parts of [low, high), so that processes
    picking ports side by side (the test streams of `make test`) never pick the same one;
    ``_handed_out`` keeps one process from picking a port twice."""
    k, sep, n = os.environ.get("PAIRVOL_PORT_SLICE", "").partition("/")
    if not (sep and k.isdigit() and n.isdigit() and int(k) < int(n)):
        return low, high
    width = (high - low) // int(n)
    return low + int(k) * width, low + (int(k) + 1) * width


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


class AgentCallError(Exception):
    def __init__(self, status: int, body: dict[str, Any]):
        super().__init__(f"HTTP {status}: {body.get('error', body)}")
        self.status = status
        self.body = body


#: Turns an agent's command line into the argv that starts it (e.g. in the namespaces and
#: with the privileges of a pod); it must ``exec`` its way down so the PID is the agent's.
Launcher = Callable[["Agent", list[str]], list[str]]


@dataclass
class Agent:
    name: str
    data_dir: Path
    size: str
    host: str = "127.0.0.1"
    netns: str | None = None
    token: str | None = None
    psk_file: Path | None = None
    peer_timeout: float = 5.0
    extra_args: list[str] = field(default_factory=list)
    api_port: int = 0
    rep_port: int = 0
    proc: asyncio.subprocess.Process | None = None
    log_path: Path | None = None
    launcher: Launcher | None = None

    @property
    def api(self) -> str:
        return f"http://{self.host}:{self.api_port}"

    @property
    def replication_address(self) -> str:
        return f"{self.host}:{self.rep_port}"

    @property
    def export_socket(self) -> Path:
        return self.data_dir / "export.sock"

    def argv(self) -> list[str]:
        """The agent's own command line."""
        argv = [
            sys.executable,
            "-m",
            "pairvol",
            "agent",
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--size",
            self.size,
            "--listen",
            f"{self.host}:{self.api_port}",
            "--replication-listen",
            f"{self.host}:{self.rep_port}",
            "--peer-timeout",
            str(self.peer_timeout),
        ]
        if self.token is not None:
            token_file = self.data_dir.parent / f"{self.data_dir.name}.token"
            token_file.write_text(self.token)
            argv += ["--token-file", str(token_file)]
        if self.psk_file is not None:
            argv += ["--psk-file", str(self.psk_file)]
        argv += self.extra_args
        return argv

    def launch_argv(self) -> list[str]:
        """What is spawned: the launcher's argv, else the command line (in ``netns``)."""
        if self.launcher is not None:
            return self.launcher(self, self.argv())
        if self.netns is not None:
            return ["ip", "netns", "exec", self.netns, *self.argv()]
        return self.argv()

    async def start(self, wait: bool = True) -> None:
        if not self.api_port:
            self.api_port = free_port() if self.netns is None else 7800
        if not self.rep_port:
            self.rep_port = free_port() if self.netns is None else 7801
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        log = self.log_path.open("ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.launch_argv(), stdout=log, stderr=log, start_new_session=True
            )
        finally:
            log.close()
        if wait:
            await self.wait_ready()

    async def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        answer = "no answer"
        while True:
            if self.proc is not None and self.proc.returncode is not None:
                raise RuntimeError(f"agent {self.data_dir.name} exited ({self.proc.returncode}): {self.log_tail()}")
            try:
                async with (
                    aiohttp.ClientSession() as s,
                    s.get(f"{self.api}/healthz", timeout=aiohttp.ClientTimeout(total=1)) as r,
                ):
                    if r.status == 200:
                        return
                    answer = f"/healthz answered {r.status}: {(await r.text())[:200]}"
            except (aiohttp.ClientError, OSError) as exc:
                answer = f"/healthz: {type(exc).__name__}: {exc}"
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(
                    f"agent {self.data_dir.name} not ready after {timeout:g} s ({answer}; processes: "
                    f"{self.process_tree()}); its log: {self.log_tail()}"
                )
            await asyncio.sleep(0.05)

    def process_tree(self) -> str:
        """The agent's process and its descendants, with their state (for a hung start)."""
        if self.proc is None:
            return "not started"
        found: list[str] = []
        todo = [self.proc.pid]
        while todo and len(found) < 20:
            pid = todo.pop()
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            found.append(f"{pid} {stat.rsplit(')', 1)[1].split()[0]} {cmd[:80].strip()}")
            todo += [int(c) for c in children]
        return "; ".join(found) or "gone"

    def log_tail(self, lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        raw: bytes | None = None,
        token: str | None = None,
        timeout: float = 60.0,
    ) -> dict[str, Any]:
        headers = {}
        tok = token if token is not None else self.token
        if tok is not None:
            headers["Authorization"] = f"Bearer {tok}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        async with (
            aiohttp.ClientSession() as s,
            s.request(
                method, f"{self.api}{path}", data=data, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as r,
        ):
            text = await r.text()
            try:
                payload = json.loads(text) if text else {}
            except ValueError:
                payload = {"text": text}
            if r.status >= 400:
                raise AgentCallError(r.status, payload)
            return payload if isinstance(payload, dict) else {"value": payload}

    async def status(self) -> dict[str, Any]:
        return await self.call("GET", "/v1/status")

    async def metrics(self) -> str:
        async with aiohttp.ClientSession() as s, s.get(f"{self.api}/metrics") as r:
            return await r.text()

    async def secondary(self, epoch: int) -> dict[str, Any]:
        return await self.call("POST", "/v1/secondary", {"epoch": epoch})

    async def primary(
        self, epoch: int, peer: str | None = None, sync: str = "none", peer_epoch: int | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"epoch": epoch, "peer": peer, "sync": sync}
        if peer_epoch is not None:
            body["peerEpoch"] = peer_epoch
        return await self.call("POST", "/v1/primary", body)

    async def checkpoint(self) -> dict[str, Any]:
        return await self.call("POST", "/v1/checkpoint", {})

    async def failover(self, epoch: int, mode: str = "checkpoint", trigger: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"epoch": epoch, "mode": mode}
        if trigger is not None:
            body["trigger"] = trigger
        return await self.call("POST", "/v1/failover", body)

    async def wait_replicating(self, timeout: float = 60.0) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            st = await self.status()
            if st["replication"]["state"] == "replicating":
                return st
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"not replicating: {st}")
            await asyncio.sleep(0.1)

    async def nbd(self) -> NBDClient:
        return await NBDClient.connect_unix(str(self.export_socket))

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is not None:
            # reaped earlier: its PID, and so its group's ID, may be another process's by
            # now (a daemon started in a session of its own, as qsd is, leads a group of
            # its own PID); nothing of ours is left in the group to signal
            return
        self.kill(signal.SIGTERM)
        try:
            await bounded(self.proc.wait(), 10)
        except TimeoutError:
            self.kill(signal.SIGKILL)
            await self.proc.wait()
        # what is left of its group (reaped just now: the ID is not reused yet); qsd is in
        # a session of its own and dies with the agent (PR_SET_PDEATHSIG)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    async def wait_exit(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()


def write_psk(path: Path) -> Path:
    path.write_text(f"pairvol:{secrets.token_hex(32)}\n")
    path.chmod(0o600)
    return path
