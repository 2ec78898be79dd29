"""The control loop the local cluster's stand-ins for the CSI sidecars share.

The external-provisioner and the external-resizer work the same way: watches only wake a
loop that reads the current state itself (so a missed event costs a resync period, never
a wrong decision), each object has at most one operation running, and a failed operation
is retried with exponential back-off. The sidecars differ in what they do with the state,
which is all a subclass supplies (``sync_once``, what may be retried, how long to wait).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from pairvol.aio import bounded, cancel_and_wait
from pairvol.localcluster.csi_client import CsiClient
from pairvol.localcluster.kubelet_api import ApiError, KubeApi

logger = logging.getLogger(__name__)


class SidecarLoop:
    """``async with`` a subclass: its watches of ``watched`` and its loop run until exit."""

    name = "csi sidecar"  # in task names and log lines
    watched: tuple[str, ...] = ()  # API paths whose changes wake the loop
    retryable: tuple[type[BaseException], ...] = (ApiError,)  # failures retried with back-off

    def __init__(
        self,
        api: KubeApi,
        socket: Path,
        *,
        resync: float,
        backoff_base: float,
        backoff_cap: float,
        timeout: float,
    ) -> None:
        self.api = api
        self.resync = resync
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.timeout = timeout
        self._client = CsiClient(socket, timeout=timeout)
        self._tasks: list[asyncio.Task[None]] = []
        self._busy: dict[str, asyncio.Task[None]] = {}  # object key -> its running operation
        self._not_before: dict[str, float] = {}  # back-off: next attempt after (monotonic)
        self._failures: dict[str, int] = {}
        self._wake = asyncio.Event()

    async def __aenter__(self) -> Self:
        await self._client.__aenter__()
        self._tasks = [asyncio.create_task(self._loop(), name=self.name.replace(" ", "-"))]
        for path in self.watched:
            kind = path.rsplit("/", 1)[-1]
            self._tasks.append(asyncio.create_task(self._watch(path), name=f"{self.name} {kind} watch"))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        tasks = [*self._tasks, *self._busy.values()]
        await cancel_and_wait(*tasks)
        await self._client.close()

    async def sync_once(self) -> None:
        """One pass over the current state; starts operations with :meth:`_start`."""
        raise NotImplementedError

    def retry_delay(self, exc: BaseException, failures: int) -> float:
        """Seconds before the next attempt after ``failures`` failures in a row."""
        del exc
        return float(min(self.backoff_base * 2 ** (failures - 1), self.backoff_cap))

    async def _watch(self, path: str) -> None:
        """Wake the loop on every change (the loop reads the current state itself)."""
        while True:
            try:
                _, version = await self.api.list_all(path)
                async for _event in self.api.watch(path, version):
                    self._wake.set()
            except asyncio.CancelledError:
                raise
            except ApiError as exc:
                logger.info("watch %s ended (%s); again", path, exc)
            await asyncio.sleep(0.5)

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.sync_once()
            except asyncio.CancelledError:
                raise
            except ApiError as exc:
                logger.warning("%s: %s", self.name, exc)
            with contextlib.suppress(TimeoutError):
                await bounded(self._wake.wait(), self.resync)

    def _start(self, key: str, operation: Coroutine[Any, Any, None]) -> None:
        """Run ``operation`` unless one for ``key`` runs or its back-off is not over."""
        running = self._busy.get(key)
        if (running is not None and not running.done()) or time.monotonic() < self._not_before.get(key, 0.0):
            operation.close()
            return
        self._busy[key] = asyncio.create_task(self._run(key, operation))

    async def _run(self, key: str, operation: Coroutine[Any, Any, None]) -> None:
        try:
            await operation
            self._failures.pop(key, None)
            self._not_before.pop(key, None)
        except asyncio.CancelledError:
            raise
        except self.retryable as exc:
            failures = self._failures.get(key, 0) + 1
            self._failures[key] = failures
            delay = self.retry_delay(exc, failures)
            self._not_before[key] = time.monotonic() + delay
            logger.info("%s: %s failed (attempt %d, again in %.0fs): %s", self.name, key, failures, delay, exc)
        finally:
            self._busy.pop(key, None)
            self._wake.set()
