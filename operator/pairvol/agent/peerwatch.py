"""Watchdog for the replication link, because QEMU's NBD client has no I/O timeout.

A peer that is killed resets the TCP connection and the NBD client notices at once. A
peer that is silently partitioned (packets dropped, no RST) or whose daemon hangs does
not: every quorum write waits for it, for many minutes. Two signals catch that:

* the kernel's view of the link (``ss -ti``): data sent but not acknowledged for T
  (a partition);
* a canary: the primary's qsd keeps a second NBD connection to the peer, exported
  read-only on the local unix socket, and the watchdog reads one block through it; no
  answer within T means the peer's daemon is stuck (TCP may still acknowledge).

On either, the watchdog destroys the sockets to the peer (``ss -K``): the NBD client
sees a connection error, holds requests for its reconnect delay, then fails them, and
the quorum goes on with the local disk. The same samples count the bytes sent.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

_KV = re.compile(r"\b(bytes_sent|bytes_received|bytes_acked|lastsnd|lastrcv|lastack|unacked):(\d+)")

Probe = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class ConnSample:
    local: str
    remote: str
    bytes_sent: int
    bytes_received: int
    unacked: int
    lastack_ms: int

    def stalled(self, timeout_ms: int) -> bool:
        """Data is in flight and the peer has acknowledged nothing for timeout_ms."""
        return self.unacked > 0 and self.lastack_ms >= timeout_ms


def parse_ss(text: str) -> list[ConnSample]:
    """Parse ``ss -tniH state established ...`` (address line, then an indented info line)."""
    conns: list[ConnSample] = []
    addr: tuple[str, str] | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            parts = line.split()
            addr = (parts[-2], parts[-1]) if len(parts) >= 4 else None
            continue
        if addr is None:
            continue
        kv = {k: int(v) for k, v in _KV.findall(line)}
        conns.append(
            ConnSample(
                local=addr[0],
                remote=addr[1],
                bytes_sent=kv.get("bytes_sent", kv.get("bytes_acked", 0)),
                bytes_received=kv.get("bytes_received", 0),
                unacked=kv.get("unacked", 0),
                lastack_ms=kv.get("lastack", 0),
            )
        )
        addr = None
    return conns


def _ss_filter(host: str, port: int) -> list[str]:
    dst = f"[{host}]" if ":" in host else host
    return ["dst", dst, "and", "dport", "=", f":{port}"]


class PeerWatch:
    """Polls the link to one peer; reports when it has been down, breaks it when stuck."""

    def __init__(
        self,
        host: str,
        port: int,
        stall_timeout: float,
        on_sent: Callable[[int], None],
        probe: Probe | None = None,
        on_stalled: Callable[[str], Awaitable[None]] | None = None,
        interval: float = 0.25,
    ) -> None:
        self.host = host
        self.port = port
        self.stall_timeout = stall_timeout
        self.interval = interval
        self._on_sent = on_sent
        self._probe = probe
        self._on_stalled = on_stalled
        self._ss = shutil.which("ss") or "ss"
        self._last_sent: dict[str, int] = {}
        self.down_since: float | None = None
        self.kills = 0

    async def _run_ss(self, *args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            self._ss, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            log.debug("ss %s failed: %s", " ".join(args), err.decode().strip())
        return out.decode()

    async def sample(self) -> list[ConnSample]:
        return parse_ss(await self._run_ss("-tniH", "state", "established", *_ss_filter(self.host, self.port)))

    async def kill_connections(self) -> None:
        self.kills += 1
        await self._run_ss("-K", *_ss_filter(self.host, self.port))

    async def _probe_peer(self) -> str | None:
        """None when the peer answered; else why not ("stalled" when it did not answer)."""
        if self._probe is None:
            return None
        try:
            await asyncio.wait_for(self._probe(), self.stall_timeout)
        except TimeoutError:
            return "stalled"
        except Exception as exc:  # any failure of the canary means the peer is not serving
            return f"canary failed: {exc}"
        return None

    async def poll_once(self) -> None:
        started = time.monotonic()
        problem = await self._probe_peer()
        conns = await self.sample()
        seen: dict[str, int] = {}
        for conn in conns:
            seen[conn.local] = conn.bytes_sent
            delta = conn.bytes_sent - self._last_sent.get(conn.local, 0)
            if delta > 0:
                self._on_sent(delta)
        self._last_sent = seen
        stuck = [c for c in conns if c.stalled(int(self.stall_timeout * 1000))]
        if stuck and problem is None:
            problem = "stalled"
        if problem is None and conns:
            self.down_since = None
            return
        if self.down_since is None:
            self.down_since = started - (self.stall_timeout if problem == "stalled" else 0.0)
        if problem == "stalled" and conns:
            why = "no acknowledgement" if stuck else "no answer to the canary read"
            log.error(
                "replication link to %s:%d is stuck (%s for %.1f s): breaking the connection",
                self.host,
                self.port,
                why,
                self.stall_timeout,
            )
            if self._on_stalled is not None:
                await self._on_stalled(f"link to {self.host}:{self.port} stuck ({why})")
            await self.kill_connections()

    def down_for(self) -> float:
        return 0.0 if self.down_since is None else time.monotonic() - self.down_since
