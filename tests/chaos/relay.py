"""A TCP relay that can delay a replication link, in place of `tc netem`.

This machine's kernel has no `sch_netem` ("Specified qdisc kind is unknown"), so the
`delay` class cannot slow a node's interface. It slows the link itself instead: the
controller tells the primary that its peer is this relay (listening on the host's bridge
address, which every node reaches), and the relay forwards to the secondary's NBD server.
Normally it only copies bytes; during a fault window every chunk it reads is held for a
latency plus a random jitter before it is passed on, each way, keeping the byte order of
each direction (a chunk never overtakes the one before it, as on a TCP stream). The link's
TLS-PSK runs end to end through it: the relay sees only ciphertext.

What this does not model that netem would: delay of the other traffic of the node (the
agent's HTTP API, the API server) and reordering below TCP. The faults that need those are
`partition`, `loss` (iptables) and `api-slow`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

log = logging.getLogger(__name__)


class DelayRelay:
    def __init__(self, listen_host: str, target: str, rng: random.Random) -> None:
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self._listen_host = listen_host
        self._rng = rng
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.latency = 0.0  # s added to each chunk, each way
        self.jitter = 0.0  # s, uniform in [0, jitter) on top
        self.port = 0

    @property
    def address(self) -> str:
        return f"{self._listen_host}:{self.port}"

    def slow(self, latency: float, jitter: float) -> None:
        self.latency, self.jitter = latency, jitter

    def clear(self) -> None:
        self.latency, self.jitter = 0.0, 0.0

    async def start(self) -> DelayRelay:
        self._server = await asyncio.start_server(self._handle, self._listen_host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self._target)
            except OSError as exc:
                log.debug("relay cannot reach %s:%s: %s", *self._target, exc)
                return
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        finally:
            with contextlib.suppress(Exception):
                writer.close()
            self._tasks.discard(task)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Read as fast as the sender sends; deliver each chunk at its due time, in order."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    return
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                dst.write(data)
                await dst.drain()

        sender = asyncio.create_task(deliver())
        last_due = 0.0
        try:
            while (data := await src.read(65536)) and not sender.done():
                due = time.monotonic() + self.latency + (self._rng.uniform(0, self.jitter) if self.jitter else 0.0)
                last_due = max(last_due, due)  # never ahead of the chunk before it
                queue.put_nowait((last_due, data))
            queue.put_nowait((last_due, b""))
            await sender
        except (ConnectionError, OSError):
            pass
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            with contextlib.suppress(Exception):
                dst.close()
