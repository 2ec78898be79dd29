"""The few Kubernetes API calls the node simulator makes, over plain aiohttp.

The node simulator is the local cluster's own control plane — it plays the kubelets (and,
through :mod:`pairvol.localcluster.services`, the endpoints controller) — not a client of
the cluster: it holds no credentials (the emulated API server trusts unauthenticated
requests as its in-process control plane), reads no kubeconfig, and keeps one watch open
per node. pairvol's own programs reach the API through :mod:`pairvol.kube` (the official
``kubernetes`` client: kubeconfigs, exec plugins, rotating tokens); none of that applies
here, and the ``kubernetes`` client is synchronous: every watch would hold a thread for
its lifetime, and every status update of every simulated pod would cross a thread pool in
the process that also runs the API server. The kubelet only needs a handful of REST calls
— list/watch Pods of a node, patch Pod status, finalize Pod deletion, read
Secrets/ConfigMaps, create and patch Nodes and node Leases, request ServiceAccount tokens.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp

from pairvol.aio import cancel_and_wait
from pairvol.httpsession import LazySession
from pairvol.localcluster.kubelet_pods import JsonDict, KubeletError

logger = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"


class ApiError(KubeletError):
    """The API server answered with an error status (or could not be reached)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class KubeApi:
    """A tiny async client for one API server URL (no auth: the emulator needs none)."""

    def __init__(self, base_url: str, *, request_timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._session = LazySession()

    async def __aenter__(self) -> KubeApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        return self._session.get()

    async def close(self) -> None:
        await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> JsonDict:
        url = self.base_url + path
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        try:
            async with self.session.request(
                method, url, data=data, params=params, headers=headers, timeout=self._timeout
            ) as response:
                text = await response.text()
                if response.status >= 400:
                    raise ApiError(
                        f"{method} {path} -> HTTP {response.status}: {_message(text)}",
                        response.status,
                    )
                if not text:
                    return {}
                result = json.loads(text)
                return result if isinstance(result, dict) else {"value": result}
        except aiohttp.ClientError as exc:
            raise ApiError(f"{method} {path}: API server {self.base_url} unreachable: {exc}") from exc
        except TimeoutError as exc:
            raise ApiError(f"{method} {path}: API server {self.base_url} timed out") from exc

    # -- pods -----------------------------------------------------------------------------

    async def list_pods(self, node: str) -> tuple[list[JsonDict], str]:
        """Pods bound to ``node`` (filtered here too, in case the server ignores the selector)."""
        result = await self.request("GET", "/api/v1/pods", params={"fieldSelector": f"spec.nodeName={node}"})
        items = [p for p in result.get("items") or [] if _on_node(p, node)]
        version = str((result.get("metadata") or {}).get("resourceVersion") or "")
        return items, version

    async def watch_pods(self, node: str, resource_version: str) -> AsyncIterator[JsonDict]:
        """Watch events of pods on ``node``; ends when the server closes the stream."""
        params = {"fieldSelector": f"spec.nodeName={node}"}
        async for event in self.watch("/api/v1/pods", resource_version, params, f"pods on {node}"):
            obj = event.get("object") or {}
            if event.get("type") in ("ERROR", "BOOKMARK") or _on_node(obj, node):
                yield event

    async def list_all(self, path: str) -> tuple[list[JsonDict], str]:
        """Every object of a collection (all namespaces) and the list's resourceVersion."""
        result = await self.request("GET", path)
        version = str((result.get("metadata") or {}).get("resourceVersion") or "")
        return [o for o in result.get("items") or [] if isinstance(o, dict)], version

    async def watch(
        self, path: str, resource_version: str, params: Mapping[str, str] | None = None, what: str = ""
    ) -> AsyncIterator[JsonDict]:
        """Watch events of a collection; ends when the server closes the stream."""
        query = {"watch": "true", "allowWatchBookmarks": "false", **(params or {})}
        if resource_version and resource_version != "...":
            query["resourceVersion"] = resource_version
        what = what or path
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None)
        try:
            async with self.session.get(self.base_url + path, params=query, timeout=timeout) as response:
                if response.status >= 400:
                    text = await response.text()
                    raise ApiError(f"watch {what} -> HTTP {response.status}: {_message(text)}", response.status)
                async for line in response.content:
                    line = line.strip()
                    if not line:
                        continue
                    event = json.loads(line)
                    if isinstance(event, dict):
                        yield event
        except aiohttp.ClientError as exc:
            raise ApiError(f"watch {what}: {exc}") from exc

    async def patch_pod_status(self, namespace: str, name: str, status: JsonDict) -> JsonDict:
        return await self.request(
            "PATCH",
            f"/api/v1/namespaces/{namespace}/pods/{name}/status",
            body={"status": status},
            content_type=MERGE_PATCH,
        )

    async def delete_pod_now(self, namespace: str, name: str, uid: str | None = None) -> None:
        """Finalize a graceful deletion (gracePeriodSeconds=0); gone already is fine, and so
        is a pod of the same name with another ``uid`` (this one is gone, a new one lives)."""
        body: JsonDict = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            await self.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}", body=body)
        except ApiError as exc:
            if exc.status not in (404, 409):
                raise

    async def get_object(self, namespace: str, plural: str, name: str) -> JsonDict | None:
        """A Secret or ConfigMap, or None if it does not exist."""
        try:
            return await self.request("GET", f"/api/v1/namespaces/{namespace}/{plural}/{name}")
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    # -- nodes ----------------------------------------------------------------------------

    async def ensure_node(self, node: JsonDict) -> JsonDict:
        name = node["metadata"]["name"]
        try:
            return await self.request("POST", "/api/v1/nodes", body=node)
        except ApiError as exc:
            if exc.status != 409:
                raise
        patch = {"metadata": node["metadata"], "spec": node.get("spec") or {}}
        return await self.request("PATCH", f"/api/v1/nodes/{name}", body=patch, content_type=MERGE_PATCH)

    async def patch_node(self, name: str, patch: JsonDict) -> JsonDict:
        return await self.request("PATCH", f"/api/v1/nodes/{name}", body=patch, content_type=MERGE_PATCH)

    async def patch_node_status(self, name: str, status: JsonDict) -> JsonDict:
        return await self.request(
            "PATCH",
            f"/api/v1/nodes/{name}/status",
            body={"status": status},
            content_type=MERGE_PATCH,
        )

    async def renew_lease(self, name: str, holder: str, now: str, duration: int) -> None:
        """Create or renew the node's Lease in kube-node-lease (what real kubelets do)."""
        path = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"
        spec = {"holderIdentity": holder, "leaseDurationSeconds": duration, "renewTime": now}
        try:
            await self.request("PATCH", f"{path}/{name}", body={"spec": spec}, content_type=MERGE_PATCH)
            return
        except ApiError as exc:
            if exc.status != 404:
                raise
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": "kube-node-lease"},
            "spec": {**spec, "acquireTime": now},
        }
        try:
            await self.request("POST", path, body=body)
        except ApiError as exc:
            if exc.status != 409:
                raise


class EventRecorder:
    """Kubelet Events (``kubectl describe pod`` shows them), posted in the background.

    Like client-go's recorder, a repeat of the same reason and message for the same object
    bumps ``count`` and ``lastTimestamp`` of the first Event instead of adding one. Losing
    an Event (API server unreachable) is logged at DEBUG: Events are best effort.
    """

    def __init__(self, api: KubeApi) -> None:
        self._api = api
        self._seen: dict[tuple[str, str, str, str], tuple[str, int]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._sequence = itertools.count(1)

    def record(self, obj: Mapping[str, Any], kind: str, reason: str, message: str, host: str) -> None:
        task = asyncio.create_task(self._post(dict(obj), kind, reason, message, host))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, obj: JsonDict, kind: str, reason: str, message: str, host: str) -> None:
        meta = obj.get("metadata") or {}
        namespace = str(meta.get("namespace") or "default")
        key = (namespace, str(meta.get("uid") or meta.get("name")), reason, message)
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        path = f"/api/v1/namespaces/{namespace}/events"
        async with self._lock:  # one at a time, so repeats find the first one
            try:
                seen = self._seen.get(key)
                if seen is not None:
                    name, count = seen
                    patch = {"count": count + 1, "lastTimestamp": now}
                    await self._api.request("PATCH", f"{path}/{name}", body=patch, content_type=MERGE_PATCH)
                    self._seen[key] = (name, count + 1)
                    return
                name = f"{meta.get('name')}.{time.time_ns():x}{next(self._sequence):x}"
                event = {
                    "apiVersion": "v1",
                    "kind": "Event",
                    "metadata": {"name": name, "namespace": namespace},
                    "involvedObject": {
                        "apiVersion": "v1",
                        "kind": str(obj.get("kind") or "Pod"),
                        "name": meta.get("name"),
                        "namespace": namespace,
                        "uid": meta.get("uid"),
                    },
                    "reason": reason,
                    "message": message,
                    "type": kind,
                    "source": {"component": "kubelet", "host": host},
                    "reportingComponent": "kubelet",
                    "reportingInstance": host,
                    "firstTimestamp": now,
                    "lastTimestamp": now,
                    "count": 1,
                }
                await self._api.request("POST", path, body=event)
                self._seen[key] = (name, 1)
            except ApiError as exc:
                logger.debug("event %s %s for %s not recorded: %s", reason, message, meta.get("name"), exc)

    async def close(self) -> None:
        """Wait briefly for pending Events, then drop the rest."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2.0)
        await cancel_and_wait(*self._tasks)


def _on_node(pod: Any, node: str) -> bool:
    return isinstance(pod, dict) and (pod.get("spec") or {}).get("nodeName") == node


def _message(text: str) -> str:
    try:
        payload = json.loads(text)
    except ValueError:
        return text[:300]
    if isinstance(payload, dict) and payload.get("message"):
        return str(payload["message"])[:300]
    return text[:300]
