"""The workload: lanes of sequential writers, each logging every write it issues.

Each lane owns the slots `slot % lanes == lane` and has one write in flight at a time, so
its writes are totally ordered (the checker relies on it). Writes go to the export of the
current primary over its unix socket, as a pod on that node would. The controller moves
the workload with `retarget`: a write still in flight on the old primary is *abandoned*
(kept running: if it is acknowledged later, the ack is logged — that is how an old
primary acknowledging writes after a newer one took over is seen), and the lane goes on
with the next sequence number on the new primary. `retarget(None)` pauses the workload.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

from pairvol.aio import bounded
from pairvol.nbd import NBDClient
from tests.chaos import blocks
from tests.chaos.history import History, Write

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    replica: str
    term: int
    socket: Path


class Workload:
    def __init__(self, hist: History, rng: random.Random, pace: float = 0.004) -> None:
        self.hist = hist
        self.rng = rng
        self.pace = pace
        self.target: Target | None = None
        self._switched = asyncio.Event()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._orphans: set[asyncio.Task[None]] = set()
        self._old_clients: list[NBDClient] = []
        self.paused_since: float | None = time.monotonic()
        self.acks = 0  # acknowledgements so far (faults time themselves on them)
        self._acked = asyncio.Event()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._lane(i), name=f"lane-{i}") for i in range(self.hist.lanes)]

    def retarget(self, target: Target | None) -> None:
        now = time.monotonic()
        if target is None and self.paused_since is None:
            self.paused_since = now
        if target is not None and self.paused_since is not None:
            self.hist.excuse(self.paused_since, now, "workload paused by the controller")
            self.paused_since = None
        self.target = target
        self._switched.set()
        self._switched = asyncio.Event()

    async def stop(self, grace: float = 10.0) -> None:
        """Let each lane finish its write in flight (abandon it after `grace`)."""
        self._stop.set()
        done, pending = await asyncio.wait(self._tasks, timeout=grace) if self._tasks else (set(), set())
        for t in pending:
            t.cancel()
        await asyncio.gather(*done, *pending, return_exceptions=True)
        if self.paused_since is not None:
            self.hist.excuse(self.paused_since, time.monotonic(), "workload paused by the controller")
            self.paused_since = None

    async def close(self) -> None:
        for t in list(self._orphans):
            t.cancel()
        await asyncio.gather(*self._orphans, return_exceptions=True)
        for c in self._old_clients:
            with contextlib.suppress(Exception):
                await bounded(c.close(), 2)

    async def _connect(self, target: Target) -> NBDClient | None:
        try:
            return await bounded(NBDClient.connect_unix(str(target.socket)), 2)
        except (OSError, TimeoutError, Exception):
            return None

    async def _lane(self, lane: int) -> None:
        slots = list(self.hist.lane_slots(lane))
        seq = 0
        client: NBDClient | None = None
        client_for: Target | None = None
        while not self._stop.is_set():
            target = self.target
            switched = self._switched
            if target is None:
                stop = asyncio.create_task(self._stop.wait())
                resume = asyncio.create_task(switched.wait())
                await asyncio.wait({stop, resume}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                resume.cancel()
                continue
            if client is None or client_for != target:
                if client is not None:
                    self._old_clients.append(client)
                client, client_for = await self._connect(target), target
                if client is None:
                    await asyncio.sleep(0.05)
                    continue
            seq += 1
            slot = self.rng.choice(slots)
            data = blocks.make(self.hist.run, lane, seq, slot)
            w = Write(lane, seq, slot, blocks.checksum(data), target.replica, target.term, time.monotonic())
            self.hist.writes.append(w)
            io = asyncio.create_task(client.pwrite(data, self.hist.offset(slot)))
            waiter = asyncio.create_task(switched.wait())
            await asyncio.wait({io, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if io.done():
                exc = io.exception()
                if exc is None:
                    w.acked = time.monotonic()
                    self.acks += 1
                    self._acked.set()
                    self._acked = asyncio.Event()
                else:
                    w.error = f"{type(exc).__name__}: {exc}"
                    self._old_clients.append(client)
                    client = None
                    await asyncio.sleep(0.02)
            else:
                # moved to another primary (or stopped) while the write is in flight
                w.abandoned = True
                self._orphans.add(io)
                io.add_done_callback(functools.partial(self._late, w))
                self._old_clients.append(client)
                client = None
                continue
            if self.pace:
                await asyncio.sleep(self.pace * (0.5 + self.rng.random()))
        if client is not None:
            self._old_clients.append(client)

    async def after_acks(self, n: int, within: float = 2.0) -> None:
        """Return right after n more writes were acknowledged (or `within` passed)."""
        target = self.acks + n
        end = time.monotonic() + within
        while self.acks < target and (left := end - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                await bounded(self._acked.wait(), left)

    async def quiesce(self, within: float) -> bool:
        """With the workload paused: until every abandoned write has its outcome (acknowledged
        or failed), so that nothing is in flight while replicas are read and compared."""
        if self._orphans:
            await asyncio.wait(set(self._orphans), timeout=within)
        return not self._orphans

    def _late(self, w: Write, t: asyncio.Task[None]) -> None:
        self._orphans.discard(t)
        if not t.cancelled() and t.exception() is None:
            w.acked = time.monotonic()
        elif not t.cancelled():
            w.error = str(t.exception())
