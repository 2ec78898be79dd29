"""Shared watch caches of the objects every volume's reconcile loop looks at.

Why: each volume's loop used to read its ReplicatedVolume, the nodes, its pods and its
Lease from the API server on every tick (every 0.5 s): four requests per volume per tick,
about 480 per volume per minute, which is what an API server pays for every volume of a
large cluster (``make bench-scale`` measures it). Instead one :class:`Informer` per
collection (LIST, then WATCH from that resourceVersion, again from a fresh LIST after a
410 Gone or a broken stream) keeps the objects in memory, and the loops read them from
there; a change of an object a loop cares about wakes that loop at once
(:meth:`Informer.subscribe`), so a spec change or an annotation is acted on without
waiting for the next tick.

A cache lags the API server by the time an event takes to arrive. What the loops may
conclude from it, and when they read the API server instead, is decided in
:mod:`pairvol.operator.decisions` (``lease_needs_fresh_read``, ``pods_not_yet_seen``) and
applied in :mod:`pairvol.operator.handlers`; this module only keeps the copies.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from pairvol.kube.client import KubeClient, KubeError

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped objects
Listener = Callable[[str, dict[str, Any], dict[str, Any] | None], None]  # (type, object, previous)

# a watch ends after this long (the server may end it earlier) and is resumed from the
# last resourceVersion; a connection silent for longer than this plus the slack is dead
WATCH_TIMEOUT_S = 240
READ_SLACK_S = 30
RETRY_S = 1.0
#: Before the LIST that follows a watch the server ended with 410 Gone: a server that refuses
#: every watch (its history compacted past each new listing) must not get a LIST loop as fast
#: as it answers, and the loop keeps a point where it can be cancelled.
RELIST_PAUSE_S = 0.2
# resourceVersions remembered per object, for "has the cache shown this version yet?"
SEEN_PER_OBJECT = 16


def key_of(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


class Informer:
    """One collection (``path``, optionally a label selector) kept current by LIST+WATCH.

    ``synced`` is set once the first LIST has been stored; until then (and only then)
    :meth:`get` and :meth:`items` know nothing and callers read the API server
    themselves. After a broken watch the last known objects stay until a new LIST
    replaces them all at once.
    """

    def __init__(self, kube: KubeClient, path: str, label_selector: str | None = None) -> None:
        self.kube, self.path, self.label_selector = kube, path, label_selector
        self.objects: dict[Key, dict[str, Any]] = {}
        self._seen: dict[Key, collections.deque[str]] = {}
        self.synced = asyncio.Event()
        self._listeners: list[Listener] = []
        self._rv = ""
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        sel = f"?labelSelector={self.label_selector}" if self.label_selector else ""
        return f"Informer({self.path}{sel})"

    # ------------------------------------------------------------------ reading

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((namespace, name))

    def items(self, namespace: str | None = None, labels: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        out = []
        for (ns, _), obj in self.objects.items():
            if namespace is not None and ns != namespace:
                continue
            have = (obj.get("metadata") or {}).get("labels") or {}
            if labels and any(have.get(k) != v for k, v in labels.items()):
                continue
            out.append(obj)
        return out

    def has_seen(self, namespace: str, name: str, resource_version: str) -> bool:
        """True once this version of the object has been in the cache (it may have been
        replaced by a newer one since: events arrive in order)."""
        return resource_version in self._seen.get((namespace, name), ())

    def subscribe(self, listener: Listener) -> None:
        """``listener(type, object, previous)`` runs on the event loop for every change
        (ADDED/MODIFIED/DELETED; a relist reports what it changed the same way)."""
        self._listeners.append(listener)

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=repr(self))

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        # Python 3.11's wait_for can lose a cancellation that arrives as its inner call
        # completes (pairvol.aio; ours is banned, the libraries' is not): cancel again
        # until the task has ended
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        try:
            await task
        except asyncio.CancelledError:
            if not task.cancelled():
                raise

    async def _run(self) -> None:
        while True:
            try:
                await self._list()
                while await self._watch():
                    pass
                await asyncio.sleep(RELIST_PAUSE_S)
            except (KubeError, TimeoutError, ValueError) as exc:
                log.info("%r: %s; listing again in %.0f s", self, exc, RETRY_S)
                await asyncio.sleep(RETRY_S)

    def _params(self) -> dict[str, str]:
        return {"labelSelector": self.label_selector} if self.label_selector else {}

    async def _list(self) -> None:
        listing = await self.kube.request("GET", self.path, params=self._params() or None)
        fresh = {key_of(o): o for o in listing.get("items") or []}
        old, self.objects = self.objects, fresh
        self._rv = str((listing.get("metadata") or {}).get("resourceVersion") or "")
        self.synced.set()
        for key, obj in fresh.items():
            before = old.get(key)
            if before is None:
                self._notify("ADDED", obj, None)
            elif _rv(before) != _rv(obj):
                self._notify("MODIFIED", obj, before)
        for key, obj in old.items():
            if key not in fresh:
                self._notify("DELETED", obj, obj)

    async def _watch(self) -> bool:
        """One watch request; True to watch again from the last resourceVersion, False
        when a new LIST is needed (410 Gone or an error event)."""
        params = {
            **self._params(),
            "watch": "true",
            "resourceVersion": self._rv,
            "timeoutSeconds": str(WATCH_TIMEOUT_S),
            "allowWatchBookmarks": "true",
        }
        stream = self.kube.stream_lines(self.path, params, WATCH_TIMEOUT_S + READ_SLACK_S)
        try:
            async with contextlib.aclosing(stream) as lines:
                async for line in lines:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    etype, obj = str(event.get("type")), event.get("object") or {}
                    if etype == "ERROR":
                        log.info("%r: watch ended: %s", self, obj.get("message"))
                        return False
                    rv = _rv(obj)
                    if rv:
                        self._rv = rv
                    if etype == "BOOKMARK":
                        continue
                    key = key_of(obj)
                    before = self.objects.get(key)
                    if etype == "DELETED":
                        self.objects.pop(key, None)
                    else:
                        self.objects[key] = obj
                    self._notify(etype, obj, before)
        except KubeError as exc:
            if exc.status == 410:
                return False
            raise
        return True

    def _notify(self, etype: str, obj: dict[str, Any], before: dict[str, Any] | None) -> None:
        key = key_of(obj)
        # kept after a deletion too: "seen, and gone since" is what a reader needs to know
        self._seen.setdefault(key, collections.deque(maxlen=SEEN_PER_OBJECT)).append(_rv(obj))
        if len(self._seen) > 2 * len(self.objects) + 1000:
            self._seen = {k: v for k, v in self._seen.items() if k in self.objects}
        for listener in self._listeners:
            try:
                listener(etype, obj, before)
            except Exception as exc:  # a listener's bug must not stop the cache
                log.error("%r: listener failed on %s %s: %r", self, etype, key, exc)
                log.debug("traceback", exc_info=True)


def _rv(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


class SharedRead:
    """One read that many loops need at about the same time, made once for all of them.

    Why: a volume without both replicas looks at every volume's agent pods in the cluster to
    spread its replicas (placement only). Each such loop listing them on every tick made the
    API server answer N lists of N volumes' pods per tick — quadratic in the volumes, and at
    its worst exactly when many volumes lack a replica at once (a bring-up, a node's
    failover storm), when the API server can least afford it. The loops now share one result
    no older than ``max_age_s`` (counted from when its request was sent); a loop asking while
    the request is under way waits for that request instead of sending another. A failed
    read is not kept: every waiter gets its error and the next call asks again.
    """

    def __init__(
        self, read: Callable[[], Awaitable[list[dict[str, Any]]]], max_age_s: float, clock: Callable[[], float]
    ) -> None:
        self._read = read
        self.max_age_s = max_age_s
        self._clock = clock
        self._sent_at = float("-inf")
        self._value: list[dict[str, Any]] = []
        self._inflight: asyncio.Task[list[dict[str, Any]]] | None = None
        self.requests = 0  # reads actually made (for tests and metrics)

    async def get(self) -> list[dict[str, Any]]:
        if self._clock() - self._sent_at <= self.max_age_s:
            return self._value
        task = self._inflight
        if task is None:
            task = self._inflight = asyncio.create_task(self._fetch())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved even if nobody waits
        # shielded: one waiter cancelled (its loop stopping) does not cancel the others' read
        return await asyncio.shield(task)

    async def _fetch(self) -> list[dict[str, Any]]:
        sent = self._clock()
        self.requests += 1
        try:
            value = list(await self._read())
            self._value, self._sent_at = value, sent
            return value
        finally:
            self._inflight = None
