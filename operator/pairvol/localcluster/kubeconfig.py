"""Kubeconfig files for the local cluster.

Why: ``kubectl``, the ``kubernetes`` client and kopf all find a cluster through a
kubeconfig; writing a real one (plain HTTP to the emulated API server; the admin token,
or a ServiceAccount token the server issued so a client runs with that account's RBAC)
lets every tool run unchanged against ``pairvol localcluster``.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import yaml

from pairvol.localcluster.apiserver_auth import ADMIN_TOKEN

CONTEXT = "pairvol-local"


def render(
    server_url: str,
    namespace: str = "default",
    name: str = CONTEXT,
    token: str = ADMIN_TOKEN,
    token_file: str | None = None,
) -> dict[str, Any]:
    """The kubeconfig document for ``server_url`` (pure). With ``token_file`` the user's
    token is read from that file (relative: to the kubeconfig's directory) instead."""
    user = {"tokenFile": token_file} if token_file else {"token": token}
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": server_url}}],
        "users": [{"name": name, "user": user}],
        "contexts": [
            {
                "name": name,
                "context": {"cluster": name, "user": name, "namespace": namespace},
            }
        ],
        "current-context": name,
        "preferences": {},
    }


def _write_atomically(path: Path, text: str, mode: int = 0o600, owner: tuple[int, int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        if owner is not None:
            os.chown(tmp, *owner)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


async def write(
    path: Path,
    server_url: str,
    namespace: str = "default",
    token: str = ADMIN_TOKEN,
    token_file: str | None = None,
    mode: int = 0o600,
) -> Path:
    """Write the kubeconfig to ``path`` (atomically, ``mode``) without blocking the loop."""
    text = yaml.safe_dump(render(server_url, namespace, token=token, token_file=token_file), sort_keys=False)
    await asyncio.to_thread(_write_atomically, path, text, mode)
    return path


async def write_token(path: Path, token: str, mode: int = 0o600) -> None:
    """Replace the token file ``path`` as a kubelet does (a new file renamed over the old)."""
    await asyncio.to_thread(_write_atomically, path, token, mode)


class TokenClient(Protocol):
    """What :func:`for_pod` needs of an API client (the node simulator's ``KubeApi``)."""

    async def request(self, method: str, path: str, *, body: Any = None) -> dict[str, Any]: ...


#: Where a kubelet mounts a pod's ServiceAccount credentials in its containers.
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


async def request_token(api: TokenClient, namespace: str, account: str) -> tuple[str, float]:
    """A new token of ServiceAccount ``namespace/account`` and its lifetime in seconds, from
    the API server's TokenRequest endpoint (which may grant less than the 24 hours asked)."""
    result = await api.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token",
        body={
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 24 * 3600},
        },
    )
    status = result.get("status") or {}
    lifetime = 24 * 3600.0
    expires = status.get("expirationTimestamp")
    if expires:
        when = datetime.datetime.fromisoformat(str(expires).replace("Z", "+00:00")).timestamp()
        lifetime = max(1.0, when - time.time())
    return str(status.get("token") or ""), lifetime


def _pod_account(pod: Mapping[str, Any]) -> tuple[str, str]:
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    return str(meta.get("namespace") or "default"), str(spec.get("serviceAccountName") or "default")


async def for_pod(
    api: TokenClient,
    pod: Mapping[str, Any],
    directory: Path,
    server_url: str,
    owner: tuple[int, int] | None = None,
) -> tuple[Path, float] | None:
    """The pod's ServiceAccount credentials, as a kubelet mounts them: a directory with
    ``token``, ``namespace`` and (our addition: the API server speaks plain HTTP, so the
    in-cluster https convention does not apply) a ``kubeconfig`` that reads the token from
    the ``token`` file beside it (``tokenFile``), so a client follows its rotation.

    The token comes from the API server's TokenRequest endpoint; the pod then runs with
    exactly that account's RBAC. Returned with the directory: the token's lifetime, after
    which the API server refuses it; the node simulator replaces the file before then
    (:func:`rotate_token`), as a kubelet refreshes a projected token. A missing
    ServiceAccount fails here (the API error says which), as Kubernetes would refuse the pod.
    None when the pod opts out (``automountServiceAccountToken: false``): no credentials.

    File modes follow the kubelet's for projected tokens: ``owner`` (uid, gid: the user
    every container of the pod runs as) owns them with mode 0600; without one (containers
    of different users) they are 0644.
    """
    if (pod.get("spec") or {}).get("automountServiceAccountToken") is False:
        return None
    namespace, account = _pod_account(pod)
    token, lifetime = await request_token(api, namespace, account)
    path = directory / "serviceaccount"
    config = yaml.safe_dump(render(server_url, namespace, token_file="token"), sort_keys=False)
    mode = 0o600 if owner is not None else 0o644

    def write_all() -> None:
        for name, text in (("token", token), ("namespace", namespace), ("kubeconfig", config)):
            _write_atomically(path / name, text, mode, owner)

    await asyncio.to_thread(write_all)
    return path, lifetime


async def rotate_token(
    api: TokenClient, pod: Mapping[str, Any], path: Path, owner: tuple[int, int] | None = None
) -> float:
    """Replace the ``token`` file of :func:`for_pod`'s directory ``path`` with a new token
    (a new file renamed over the old one: readers see one or the other, whole); its lifetime."""
    namespace, account = _pod_account(pod)
    token, lifetime = await request_token(api, namespace, account)
    mode = 0o600 if owner is not None else 0o644
    await asyncio.to_thread(_write_atomically, path / "token", token, mode, owner)
    return lifetime
