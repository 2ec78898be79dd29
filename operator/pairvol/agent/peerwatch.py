"""Watchdog for the replication link, because QEMU's NBD client has no I/O timeout.

A peer that is killed resets the TCP connection and the NBD client notices at once. A
peer that is silently partitioned (packets dropped, no RST) does not: TCP retransmits for
many minutes while every quorum write waits for it. The kernel knows, though: ``ss -ti``
shows per connection when data was last sent and last received. NBD servers never send
unprompted, so "sent after the last reply, and no reply for T" means a request is stuck;
the watchdog then destroys the socket (``ss -K``), the NBD client fails or reconnects,
and the primary goes on. The same samples give the bytes sent to the peer.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

_KV = re.compile(r"\b(bytes_sent|bytes_received|bytes_acked|lastsnd|lastrcv|lastack|unacked):(\d+)")


@dataclass(frozen=True)
class ConnSample:
    local: str
    remote: str
    bytes_sent: int
    bytes_received: int
    lastsnd_ms: int
    lastrcv_ms: int

    def stalled(self, timeout_ms: int) -> bool:
        """A request went out after the last reply, and no reply came for timeout_ms."""
        return self.lastsnd_ms < self.lastrcv_ms and self.lastrcv_ms >= timeout_ms


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
                lastsnd_ms=kv.get("lastsnd", 0),
                lastrcv_ms=kv.get("lastrcv", 0),
            )
        )
        addr = None
    return conns


def _ss_filter(host: str, port: int) -> list[str]:
    dst = f"[{host}]" if ":" in host else host
    return ["dst", dst, "and", "dport", "=", f":{port}"]


class PeerWatch:
    """Polls the kernel's view of the connections to one peer."""

    def __init__(
        self,
        host: str,
        port: int,
        stall_timeout: float,
        on_sent: Callable[[int], None],
        interval: float = 0.2,
    ) -> None:
        self.host = host
        self.port = port
        self.stall_timeout_ms = int(stall_timeout * 1000)
        self.interval = interval
        self._on_sent = on_sent
        self._ss = shutil.which("ss") or "ss"
        self._last_sent: dict[str, int] = {}
        self.connected = False
        self.down_since: float | None = time.monotonic()
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

    async def poll_once(self) -> list[ConnSample]:
        conns = await self.sample()
        now = time.monotonic()
        seen: dict[str, int] = {}
        for conn in conns:
            seen[conn.local] = conn.bytes_sent
            delta = conn.bytes_sent - self._last_sent.get(conn.local, 0)
            if delta > 0:
                self._on_sent(delta)
        self._last_sent = seen
        stuck = [c for c in conns if c.stalled(self.stall_timeout_ms)]
        # A connection counts once the peer has said something on it: a stopped daemon's
        # kernel still accepts connections, but never sends the NBD greeting.
        if any(c.bytes_received > 0 and c not in stuck for c in conns):
            self.connected, self.down_since = True, None
        elif self.connected or self.down_since is None:
            self.connected, self.down_since = False, now
        if stuck:
            log.error(
                "replication link to %s:%d is stalled (no reply for %.1f s): breaking the connection",
                self.host,
                self.port,
                stuck[0].lastrcv_ms / 1000,
            )
            await self.kill_connections()
        return conns

    def down_for(self) -> float:
        return 0.0 if self.down_since is None else time.monotonic() - self.down_since
