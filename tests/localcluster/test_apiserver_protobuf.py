"""Protobuf request bodies: what the real kubectl's and helm's typed clients send.

`kubectl create namespace|secret|configmap|serviceaccount|role|...` and helm's release
storage (one Secret per revision) send ``application/vnd.kubernetes.protobuf``; the API
server decodes them to the same objects the JSON forms would give. Bodies it cannot
decode get a Status saying why and what to send instead.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
from tests.support.ci import tool

from pairvol.aio import bounded
from pairvol.localcluster.cluster import LocalCluster

KubectlRunner = Callable[..., Coroutine[Any, Any, tuple[int, str, str]]]  # the `kubectl` fixture
REPO = Path(__file__).resolve().parents[2]
PROTOBUF = {"Content-Type": "application/vnd.kubernetes.protobuf"}


async def test_kubectl_create_namespace_then_use_it(kubectl: KubectlRunner) -> None:
    code, out, err = await kubectl("create", "namespace", "apps")
    assert (code, out.strip()) == (0, "namespace/apps created"), err
    code, out, err = await kubectl("create", "configmap", "settings", "-n", "apps", "--from-literal=mode=fast")
    assert code == 0, err

    code, out, err = await kubectl("get", "configmap", "settings", "-n", "apps", "-o", "json")
    assert code == 0, err
    cm = json.loads(out)
    assert cm["data"] == {"mode": "fast"}
    assert cm["metadata"]["namespace"] == "apps"


async def test_kubectl_create_secret_keeps_bytes_and_type(kubectl: KubectlRunner) -> None:
    code, _, err = await kubectl(
        "create", "secret", "generic", "creds", "--from-literal=user=admin", "--from-literal=pw=\u00e9\u00e8!"
    )
    assert code == 0, err
    code, out, err = await kubectl("get", "secret", "creds", "-o", "json")
    assert code == 0, err
    secret = json.loads(out)
    assert secret["type"] == "Opaque"
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == {
        "user": "admin",
        "pw": "\u00e9\u00e8!",
    }


async def test_kubectl_create_rbac_objects(kubectl: KubectlRunner) -> None:
    steps = [
        ("create", "serviceaccount", "reader"),
        ("create", "role", "pod-reader", "--verb=get,list", "--resource=pods,pods/log", "--resource-name=web"),
        ("create", "rolebinding", "read-pods", "--role=pod-reader", "--serviceaccount=default:reader"),
        ("create", "clusterrole", "health", "--verb=get", "--non-resource-url=/healthz"),
        ("create", "clusterrolebinding", "health", "--clusterrole=health", "--user=alice"),
    ]
    for step in steps:
        code, _, err = await kubectl(*step)
        assert code == 0, (step, err)

    code, out, err = await kubectl("get", "role", "pod-reader", "-o", "json")
    assert code == 0, err
    assert json.loads(out)["rules"] == [
        {"apiGroups": [""], "resources": ["pods", "pods/log"], "resourceNames": ["web"], "verbs": ["get", "list"]}
    ]
    code, out, err = await kubectl("get", "rolebinding", "read-pods", "-o", "json")
    assert code == 0, err
    binding = json.loads(out)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "reader", "namespace": "default"}]
    code, out, err = await kubectl("get", "clusterrole", "health", "-o", "json")
    assert code == 0, err
    assert json.loads(out)["rules"] == [{"nonResourceURLs": ["/healthz"], "verbs": ["get"]}]


async def test_helm_install_upgrade_uninstall_the_chart(api_cluster: LocalCluster, tmp_path: Path) -> None:
    helm = tool("helm")
    env = {
        **os.environ,
        "KUBECONFIG": str(api_cluster.kubeconfig_path),
        "HELM_CACHE_HOME": str(tmp_path / "cache"),
        "HELM_CONFIG_HOME": str(tmp_path / "config"),
        "HELM_DATA_HOME": str(tmp_path / "data"),
    }

    async def run(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            helm, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await bounded(proc.communicate(), 60)
        assert proc.returncode == 0, (args, err.decode())
        return out.decode()

    async def release_secrets() -> dict[str, str]:
        """helm's release storage: Secret name -> its status label."""
        url = f"{api_cluster.url}/api/v1/namespaces/default/secrets?labelSelector=owner=helm"
        async with aiohttp.ClientSession() as http, http.get(url) as r:
            items = (await r.json())["items"]
        return {s["metadata"]["name"]: s["metadata"]["labels"]["status"] for s in items}

    await run("install", "pv", str(REPO / "charts" / "pairvol"))
    assert await release_secrets() == {"sh.helm.release.v1.pv.v1": "deployed"}
    await run("upgrade", "pv", str(REPO / "charts" / "pairvol"))  # creates v2, updates v1
    assert await release_secrets() == {"sh.helm.release.v1.pv.v1": "superseded", "sh.helm.release.v1.pv.v2": "deployed"}
    [release] = json.loads(await run("list", "-o", "json"))
    assert (release["name"], release["revision"], release["status"]) == ("pv", "2", "deployed")
    await run("uninstall", "pv")  # deletes the release Secrets with protobuf DeleteOptions
    assert await release_secrets() == {}


# ---------------------------------------------------------------- bodies we cannot decode


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (the only wire type the envelope needs)."""
    assert number < 16 and len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


def _envelope(api_version: str, kind: str, raw: bytes) -> bytes:
    type_meta = _field(1, api_version.encode()) + _field(2, kind.encode())
    return b"k8s\x00" + _field(1, type_meta) + _field(2, raw)


async def test_a_kind_without_a_protobuf_schema_is_refused_with_what_to_send_instead(
    api_http: aiohttp.ClientSession,
) -> None:
    body = _envelope("apps/v1", "Deployment", _field(1, _field(1, b"web")))
    async with api_http.post("/apis/apps/v1/namespaces/default/deployments", data=body, headers=PROTOBUF) as r:
        status = await r.json()
    assert (r.status, status["reason"]) == (415, "UnsupportedMediaType")
    assert "Deployment (apps/v1)" in status["message"] and "send it as JSON" in status["message"]


async def test_malformed_protobuf_is_a_bad_request(api_http: aiohttp.ClientSession) -> None:
    async with api_http.post("/api/v1/namespaces", data=b"\x0a\x05abc", headers=PROTOBUF) as r:
        status = await r.json()
    assert (r.status, status["reason"]) == (400, "BadRequest")
    assert "k8s\\x00" in status["message"]

    truncated = _envelope("v1", "Namespace", _field(1, _field(1, b"apps")))[:-2]
    async with api_http.post("/api/v1/namespaces", data=truncated, headers=PROTOBUF) as r:
        status = await r.json()
    assert (r.status, status["reason"]) == (400, "BadRequest")
    assert "runs past the end" in status["message"]


async def test_a_hand_encoded_namespace_is_created(api_http: aiohttp.ClientSession) -> None:
    meta = _field(1, b"team-a") + _field(11, _field(1, b"tier") + _field(2, b"gold"))
    body = _envelope("v1", "Namespace", _field(1, meta))
    async with api_http.post("/api/v1/namespaces", data=body, headers=PROTOBUF) as r:
        created = await r.json()
    assert r.status == 201, created
    assert created["metadata"]["name"] == "team-a"
    assert created["metadata"]["labels"] == {"tier": "gold"}
