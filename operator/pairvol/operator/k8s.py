"""The one place that talks to the Kubernetes API beyond kopf: a small async REST client.

Why not the ``kubernetes`` package: it is synchronous and would block the event loop (or
need a thread per call), and the agent's Lease keeper needs the same client without
importing kopf. Why not kopf's own API helpers: they are internal. So this is a thin aiohttp
client with exactly the calls pairvol needs, typed errors (404/409/422 are decisions, not
crashes), and config loading from a kubeconfig file or the in-cluster service account.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import yaml

from pairvol.errors import PairvolError
from pairvol.httpsession import LazySession

log = logging.getLogger(__name__)

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class KubeError(PairvolError):
    """A Kubernetes API call failed; ``status`` is the HTTP status (0: no response)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


class NotFound(KubeError):
    pass


class Conflict(KubeError):
    pass


class KubeConfigError(PairvolError):
    """No usable Kubernetes client configuration."""


@dataclass(frozen=True)
class KubeConfig:
    server: str
    token: str | None = None
    ca_path: str | None = None
    cert_path: str | None = None
    key_path: str | None = None
    insecure: bool = False
    namespace: str = "default"

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https"):
            return False
        if self.insecure:
            return False
        ctx = ssl.create_default_context(cafile=self.ca_path)
        if self.cert_path and self.key_path:
            ctx.load_cert_chain(self.cert_path, self.key_path)
        return ctx


def _materialize(data_b64: str, suffix: str) -> str:
    """kubeconfig ``*-data`` fields hold base64 PEM; ssl wants files."""
    fd, path = tempfile.mkstemp(prefix="pairvol-kube-", suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(base64.b64decode(data_b64))
    return path


def _load_sync(path: str | None) -> KubeConfig:
    path = path or os.environ.get("KUBECONFIG")
    if not path:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if host and os.path.exists(f"{SA_DIR}/token"):
            with open(f"{SA_DIR}/token") as f:
                token = f.read().strip()
            ns = "default"
            if os.path.exists(f"{SA_DIR}/namespace"):
                with open(f"{SA_DIR}/namespace") as f:
                    ns = f.read().strip()
            host = f"[{host}]" if ":" in host else host
            return KubeConfig(f"https://{host}:{port}", token=token, ca_path=f"{SA_DIR}/ca.crt", namespace=ns)
        default = os.path.expanduser("~/.kube/config")
        if not os.path.exists(default):
            raise KubeConfigError(
                "no Kubernetes configuration: set KUBECONFIG (or pass --kubeconfig), or run "
                "in a pod with a service account"
            )
        path = default
    path = path.split(os.pathsep)[0]
    try:
        with open(path) as f:
            doc = yaml.safe_load(f) or {}
    except OSError as exc:
        raise KubeConfigError(f"cannot read kubeconfig {path}: {exc}") from exc
    ctx_name = doc.get("current-context")
    contexts = {c["name"]: c.get("context", {}) for c in doc.get("contexts") or []}
    ctx = contexts.get(ctx_name) if ctx_name else next(iter(contexts.values()), None)
    if ctx is None:
        raise KubeConfigError(f"kubeconfig {path} has no usable current-context")
    clusters = {c["name"]: c.get("cluster", {}) for c in doc.get("clusters") or []}
    users = {u["name"]: u.get("user", {}) or {} for u in doc.get("users") or []}
    cluster = clusters.get(ctx.get("cluster", ""))
    if not cluster or not cluster.get("server"):
        raise KubeConfigError(f"kubeconfig {path}: context {ctx_name!r} names no cluster server")
    user = users.get(ctx.get("user", ""), {})
    base = os.path.dirname(os.path.abspath(path))

    def rel(p: str | None) -> str | None:
        return None if p is None else os.path.join(base, p)

    ca = rel(cluster.get("certificate-authority"))
    if cluster.get("certificate-authority-data"):
        ca = _materialize(cluster["certificate-authority-data"], ".crt")
    cert, key = rel(user.get("client-certificate")), rel(user.get("client-key"))
    if user.get("client-certificate-data"):
        cert = _materialize(user["client-certificate-data"], ".crt")
    if user.get("client-key-data"):
        key = _materialize(user["client-key-data"], ".key")
    utoken = user.get("token")
    if not utoken and user.get("tokenFile"):
        with open(str(rel(user["tokenFile"]))) as f:
            utoken = f.read().strip()
    return KubeConfig(
        server=str(cluster["server"]).rstrip("/"),
        token=str(utoken) if utoken else None,
        ca_path=ca,
        cert_path=cert,
        key_path=key,
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        namespace=str(ctx.get("namespace") or "default"),
    )


async def load_config(path: str | None = None) -> KubeConfig:
    """Kubeconfig from ``path``, ``$KUBECONFIG``, the in-cluster service account, ~/.kube."""
    return await asyncio.to_thread(_load_sync, path)


class KubeClient:
    """Async REST calls against one API server; use as ``async with KubeClient(cfg) as k``."""

    def __init__(self, config: KubeConfig, timeout_s: float = 10.0) -> None:
        self.config = config
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session = LazySession(self._make_session)

    async def __aenter__(self) -> KubeClient:
        self.session()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _make_session(self) -> aiohttp.ClientSession:
        headers = {"Accept": "application/json"}
        if self.config.token:
            headers["Authorization"] = f"Bearer {self.config.token}"
        return aiohttp.ClientSession(
            base_url=self.config.server,
            headers=headers,
            timeout=self._timeout,
            connector=aiohttp.TCPConnector(ssl=self.config.ssl_context()),
        )

    def session(self) -> aiohttp.ClientSession:
        return self._session.get()

    async def close(self) -> None:
        await self._session.close()

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
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if body is not None else {}
        kw: dict[str, Any] = {}
        if timeout_s is not None:
            kw["timeout"] = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with self.session().request(method, path, data=data, headers=headers, params=params, **kw) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    try:
                        msg = json.loads(text).get("message", text)
                    except (ValueError, AttributeError):
                        msg = text
                    what = f"{method} {path}: {resp.status} {msg}"
                    if resp.status == 404:
                        raise NotFound(404, what)
                    if resp.status == 409:
                        raise Conflict(409, what)
                    raise KubeError(resp.status, what)
                return json.loads(text) if text else {}
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise KubeError(0, f"{method} {path}: {exc!r} (is the API server reachable?)") from exc

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
        return await self.request("POST", path, body)

    async def create_if_missing(self, path: str, body: Mapping[str, Any]) -> bool:
        """Create; False if it already existed (idempotent reconcile)."""
        try:
            await self.create(path, body)
            return True
        except Conflict:
            return False

    async def merge_patch(self, path: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", path, patch, content_type="application/merge-patch+json")

    async def replace(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self.request("PUT", path, body)

    async def delete(self, path: str, grace_s: int | None = None) -> bool:
        """Delete; False if it was already gone."""
        body = None if grace_s is None else {"gracePeriodSeconds": grace_s}
        try:
            await self.request("DELETE", path, body)
            return True
        except NotFound:
            return False


# ---------------------------------------------------------------- resource paths


def pods_path(ns: str, name: str | None = None) -> str:
    return f"/api/v1/namespaces/{ns}/pods" + (f"/{name}" if name else "")


def services_path(ns: str, name: str | None = None) -> str:
    return f"/api/v1/namespaces/{ns}/services" + (f"/{name}" if name else "")


def secrets_path(ns: str, name: str | None = None) -> str:
    return f"/api/v1/namespaces/{ns}/secrets" + (f"/{name}" if name else "")


def events_path(ns: str) -> str:
    return f"/api/v1/namespaces/{ns}/events"


def nodes_path() -> str:
    return "/api/v1/nodes"


def netpol_path(ns: str, name: str | None = None) -> str:
    return f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies" + (f"/{name}" if name else "")


def lease_path(ns: str, name: str | None = None) -> str:
    return f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases" + (f"/{name}" if name else "")


def volume_path(ns: str, name: str | None = None, status: bool = False) -> str:
    base = f"/apis/pairvol.io/v1alpha1/namespaces/{ns}/replicatedvolumes"
    return base + (f"/{name}" if name else "") + ("/status" if status else "")
