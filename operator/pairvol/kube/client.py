"""The async Kubernetes client of pairvol: the official client's ApiClient, off the event loop.

The ``kubernetes`` package does the HTTP: connection pooling, TLS with the kubeconfig's
certificates, proxies, the Authorization header with the refresh hook of
:mod:`pairvol.kube.config` (rotated token files, ``exec`` plugins). It is synchronous, so
every call runs in a thread pool that belongs to this client — not the event loop's shared
default pool, where a hung API server would hold the threads that the agent's file I/O and
everything else queue for, and where other work could delay a Lease renewal.

pairvol keeps objects as plain JSON dicts (the planner and the Lease protocol read fields
and compare resourceVersions verbatim), so calls go through the ApiClient's generic
``call_api`` with the response body undecoded, not through the typed model classes, whose
round trip would rewrite MicroTime strings and drop fields unknown to the client version.

Errors are typed where the answer is a decision: :class:`NotFound` (404), :class:`Conflict`
(409: exists, or resourceVersion changed), :class:`Unauthorized` (401). A 401 is answered
once by re-reading the credentials and, if they changed, one retry; if they did not, the
error says what to do, and further calls with the same refused credentials fail at once
without a request for ``REFUSED_HOLD_S`` (a Lease keeper or a reconcile loop retrying
every 200 ms must not become a stream of refused requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncGenerator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import urllib3
from kubernetes import client as kclient

from pairvol import __version__
from pairvol.aio import bounded
from pairvol.errors import PairvolError
from pairvol.kube.config import KubeConfig, KubeConfigError

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
# after a 401 that fresh credentials did not cure: how long the same credentials are not sent again
REFUSED_HOLD_S = 10.0


def merge_patch_to(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch (RFC 7386) that turns ``old`` into exactly ``new``.

    A merge patch only removes a key that it sets to ``null``: ``new`` alone as the patch
    would keep every key of ``old`` that ``new`` no longer has (a field a dataclass leaves
    out while it is unset, say). So the patch is ``new`` with ``null`` for each key of
    ``old`` it lacks, recursively where both hold an object. Lists are replaced whole, as
    the merge patch replaces them. ``None`` values in ``new`` stay ``null``: absent after
    the patch, as in ``new``'s meaning."""
    patch: dict[str, Any] = {}
    before = old if isinstance(old, Mapping) else {}
    for key in before:
        if key not in new:
            patch[key] = None
    for key, value in new.items():
        prior = before.get(key)
        if isinstance(value, Mapping) and isinstance(prior, Mapping):
            patch[key] = merge_patch_to(prior, value)
        else:
            patch[key] = value
    return patch


class KubeError(PairvolError):
    """A Kubernetes API call failed; ``status`` is the HTTP status (0: no response)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


class NotFound(KubeError):
    pass


class Conflict(KubeError):
    pass


class Unauthorized(KubeError):
    """The API server refused the credentials (401)."""


def _message(body: Any) -> str:
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")
    try:
        parsed = json.loads(text)
    except ValueError:
        return text.strip()[:500]
    return str(parsed.get("message", text)) if isinstance(parsed, dict) else text[:500]


class KubeClient:
    """Async calls against one API server; use as ``async with KubeClient(cfg) as k``.

    ``timeout_s`` bounds every call (connect, each read, and the whole wait). The client owns
    ``config`` from here on: :meth:`close` releases its key material too.
    """

    def __init__(self, config: KubeConfig, timeout_s: float = 10.0, max_workers: int = 16) -> None:
        self.config = config
        self.timeout_s = timeout_s
        config.configuration.connection_pool_maxsize = max_workers
        self._api = kclient.ApiClient(configuration=config.configuration)
        self._api.user_agent = f"pairvol/{__version__}"
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kube")
        # (Authorization header the API server refused, monotonic time, the error)
        self._refused: tuple[str | None, float, Unauthorized] | None = None
        self._closed = False

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self._close_sync)

    def _close_sync(self) -> None:
        self._api.close()
        self._api.rest_client.pool_manager.clear()
        self.config.close()

    # ------------------------------------------------------------------ calls

    def _send(
        self, method: str, path: str, body: Any, params: Mapping[str, str] | None, content_type: str, timeout_s: float
    ) -> tuple[int, bytes]:
        """One HTTP exchange (worker thread); (status, body), errors as raised by the library."""
        resp = self._api.call_api(
            path,
            method,
            query_params=list((params or {}).items()),
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=(timeout_s, timeout_s),
            _return_http_data_only=True,
        )
        try:
            return int(resp.status), bytes(resp.data)
        finally:
            resp.release_conn()

    def _call(
        self, method: str, path: str, body: Any, params: Mapping[str, str] | None, content_type: str, timeout_s: float
    ) -> Any:
        what = f"{method} {path}"
        try:
            for attempt in (1, 2):
                auth = self.config.authorization()
                refused = self._refused
                if refused is not None and refused[0] == auth and time.monotonic() - refused[1] < REFUSED_HOLD_S:
                    raise refused[2]
                try:
                    _, data = self._send(method, path, body, params, content_type, timeout_s)
                except kclient.ApiException as exc:
                    if exc.status == 401:
                        if attempt == 1 and self.config.refresh():
                            log.info("%s: 401 with the old credentials; retrying once with the new ones", what)
                            continue
                        err = self._unauthorized(what, _message(exc.body))
                        self._refused = (auth, time.monotonic(), err)
                        raise err from None
                    raise self._error(what, exc) from None
                self._refused = None
                return json.loads(data) if data else {}
        except urllib3.exceptions.HTTPError as exc:
            raise KubeError(0, f"{what}: {exc!r} (is the API server {self.config.server} reachable?)") from exc
        except KubeConfigError as exc:
            raise KubeError(0, f"{what}: {exc}") from exc
        raise AssertionError("unreachable")

    def _unauthorized(self, what: str, message: str) -> Unauthorized:
        return Unauthorized(
            401,
            f"{what}: 401 Unauthorized ({message or 'no message'}): the API server {self.config.server} refused "
            f"the credentials of {self.config.source}, and reading them again gave nothing new. Give this "
            "process valid credentials: a current token (ServiceAccount tokens expire and die with their "
            "ServiceAccount or pod), a kubeconfig naming the right user, or an exec plugin that succeeds "
            f"(its errors are in the log). The same credentials are tried again after {REFUSED_HOLD_S:.0f} s; "
            "a new token file or kubeconfig is picked up at the next call.",
        )

    @staticmethod
    def _error(what: str, exc: Any) -> KubeError:
        status = int(exc.status or 0)
        if status == 0:
            return KubeError(0, f"{what}: {exc.reason} (is the API server reachable?)")
        text = f"{what}: {status} {_message(exc.body) or exc.reason}"
        if status == 404:
            return NotFound(404, text)
        if status == 409:
            return Conflict(409, text)
        return KubeError(status, text)

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        if self._closed:
            raise KubeError(0, f"{method} {path}: the Kubernetes client is closed")
        t = self.timeout_s if timeout_s is None else timeout_s
        loop = asyncio.get_running_loop()
        call = loop.run_in_executor(self._pool, self._call, method, path, body, params, content_type, t)
        try:
            # the worker's own timeouts are per read; this bounds the caller's wait as a whole
            result = await bounded(call, t)
        except TimeoutError as exc:
            raise KubeError(0, f"{method} {path}: no answer within {t:.1f}s (is the API server reachable?)") from exc
        return result if isinstance(result, dict) else {"value": result}

    async def stream_lines(
        self, path: str, params: Mapping[str, str], read_timeout_s: float
    ) -> AsyncGenerator[bytes, None]:
        """GET a response that streams (a watch), line by line.

        A thread of its own reads it (a watch lasts minutes; it must not hold a worker of
        the pool every other call shares); lines reach the event loop through a queue.
        A status >= 400 raises like :meth:`request`; a connection silent for
        ``read_timeout_s`` ends the stream with a :class:`KubeError`.
        """
        if self._closed:
            raise KubeError(0, f"GET {path}: the Kubernetes client is closed")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        opened: list[Any] = []
        what = f"GET {path}"

        def put(item: bytes | BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody listens
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def read() -> None:
            try:
                resp = self._api.call_api(
                    path, "GET", query_params=list(params.items()),
                    header_params={"Accept": "application/json"}, auth_settings=["BearerToken"],
                    _preload_content=False, _request_timeout=(self.timeout_s, read_timeout_s),
                    _return_http_data_only=True,
                )  # fmt: skip
                opened.append(resp)
                rest = b""
                for chunk in resp.stream(65536):
                    lines = (rest + chunk).split(b"\n")
                    rest = lines.pop()
                    for line in lines:
                        put(line)
                if rest:
                    put(rest)
                put(None)
            except kclient.ApiException as exc:
                put(self._error(what, exc))
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                put(KubeError(0, f"{what}: {exc!r}"))
            except Exception as exc:  # e.g. urllib3 reading a connection it already released
                put(KubeError(0, f"{what}: the stream ended: {exc!r}"))

        thread = threading.Thread(target=read, name=f"kube-stream {path}", daemon=True)
        thread.start()
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            for resp in opened:  # unblocks the reading thread
                with contextlib.suppress(Exception):
                    resp.shutdown()
                with contextlib.suppress(Exception):
                    resp.close()

    # ------------------------------------------------------------------ helpers

    async def get(self, path: str) -> dict[str, Any]:
        return await self.request("GET", path)

    async def get_or_none(self, path: str) -> dict[str, Any] | None:
        try:
            return await self.get(path)
        except NotFound:
            return None

    async def list(self, path: str, label_selector: str | None = None) -> list[dict[str, Any]]:
        params = {"labelSelector": label_selector} if label_selector else None
        items: list[dict[str, Any]] = (await self.request("GET", path, params=params)).get("items") or []
        return items

    async def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self.request("POST", path, dict(body))

    async def create_if_missing(self, path: str, body: Mapping[str, Any]) -> bool:
        """Create; False if it already existed (idempotent reconcile)."""
        try:
            await self.create(path, body)
            return True
        except Conflict:
            return False

    async def merge_patch(self, path: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", path, dict(patch), content_type=MERGE_PATCH)

    async def replace(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self.request("PUT", path, dict(body))

    async def delete(self, path: str, grace_s: int | None = None, uid: str | None = None) -> bool:
        """Delete; False if it was already gone. With ``uid``, only that very object: one
        that replaced it under the same name stays (the API server answers 409)."""
        body: dict[str, Any] | None = None if grace_s is None else {"gracePeriodSeconds": grace_s}
        if uid is not None:
            body = {**(body or {}), "preconditions": {"uid": uid}}
        try:
            await self.request("DELETE", path, body)
            return True
        except NotFound:
            return False
