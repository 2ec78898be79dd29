"""Credentials of pairvol.kube against the local cluster's API server, as a real cluster hands them out.

The API server here verifies ServiceAccount tokens as kube-apiserver does (signature,
expiry, the account's uid) and holds each account to its RBAC, so a client that sends a
stale token is refused, and one whose credentials come from somewhere else than intended
is caught by what it may do.

* Rotation: the kubelet replaces a projected token file long before the old token expires;
  here the tokens live 2 s and the file is replaced every 0.6 s, so a client that read the
  token once is refused within the run, and the primary's Lease would be lost.
* ``exec`` plugins: a kubeconfig whose user runs a command that prints an ExecCredential.
* A 401 that fresh credentials do not cure: one clear error, not a request every 200 ms.
* Key material from ``*-data`` fields never lands in a file.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp.web
import pytest
import yaml

from pairvol.agent.health import Health
from pairvol.kube.client import REFUSED_HOLD_S, KubeClient, KubeError, Unauthorized
from pairvol.kube.config import load_config
from pairvol.kube.lease import LeaseKeeper
from pairvol.kube.paths import lease_path, pods_path
from pairvol.localcluster.cluster import LocalCluster

pytestmark = pytest.mark.timeout(90)

NS, SA = "default", "pairvol-agent"


def grant_lease_rights(cluster: LocalCluster) -> None:
    """The agent's ServiceAccount with the chart's rights on Leases (and nothing on pods)."""
    cluster.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": SA, "namespace": NS}})
    cluster.apply({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": SA, "namespace": NS},
        "rules": [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                   "verbs": ["get", "create", "update", "patch"]}],
    })
    cluster.apply({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": SA, "namespace": NS},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": SA},
        "subjects": [{"kind": "ServiceAccount", "name": SA, "namespace": NS}],
    })


def kubeconfig(path: Path, server: str, user: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": NS}}],
        "current-context": "x",
    }))
    return path


def write_like_the_kubelet(path: Path, text: str) -> None:
    """A new file renamed over the old one: a reader sees the old or the new token, whole."""
    tmp = path.with_name(f".{path.name}.new")
    tmp.write_text(text)
    os.replace(tmp, path)


async def healthy(timeout_s: float) -> Health:
    del timeout_s
    return Health(True)


class Lost:
    def __init__(self) -> None:
        self.at: float | None = None

    async def __call__(self) -> None:
        self.at = time.monotonic()


@pytest.fixture
async def cluster() -> AsyncIterator[LocalCluster]:
    async with LocalCluster(nodes=0) as c:
        grant_lease_rights(c)
        yield c


async def test_lease_renewal_and_the_operators_client_follow_a_rotating_token_file(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    first = cluster.api.issue_token(NS, SA, expiration_seconds=2)
    write_like_the_kubelet(token_file, first)
    config = kubeconfig(tmp_path / "kubeconfig", cluster.url, {"tokenFile": "token"})  # relative to the file
    rotations = 0

    async def kubelet() -> None:
        nonlocal rotations
        while True:
            await asyncio.sleep(0.6)
            write_like_the_kubelet(token_file, cluster.api.issue_token(NS, SA, expiration_seconds=2))
            rotations += 1

    rotator = asyncio.create_task(kubelet())
    lost = Lost()
    keeper = LeaseKeeper(namespace=NS, name="pairvol-vol", holder="pod-a", duration_s=2.0,
                         kubeconfig=str(config), on_lost=lost)
    renewing: asyncio.Task[str | None] | None = None
    try:
        async with KubeClient(await load_config(str(config))) as operator_client:
            await keeper.acquire(5)
            renewing = asyncio.create_task(keeper.run(healthy=healthy))
            seen_versions = set()
            t_end = time.monotonic() + 6.0  # three token lifetimes, ten rotations
            while time.monotonic() < t_end:
                lease = await operator_client.get(lease_path(NS, "pairvol-vol"))
                seen_versions.add(lease["metadata"]["resourceVersion"])
                await asyncio.sleep(0.3)
            assert rotations >= 8
            assert lost.at is None and keeper.held and not renewing.done()
            assert len(seen_versions) >= 6, "renewals went on through the rotations"
            # the first token is dead by now: a client that had read the file once is refused
            stale = kubeconfig(tmp_path / "stale", cluster.url, {"token": first})
            async with KubeClient(await load_config(str(stale))) as once:
                with pytest.raises(Unauthorized):
                    await once.get(lease_path(NS, "pairvol-vol"))
    finally:
        rotator.cancel()
        if renewing is not None:
            renewing.cancel()
        await keeper.release()


async def test_kopf_login_reads_the_rotated_token(cluster: LocalCluster, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """kopf calls the login handler again after a 401: it must hand over the current token."""
    from pairvol.operator.handlers import login

    token_file = tmp_path / "token"
    write_like_the_kubelet(token_file, "first")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path / "kubeconfig", cluster.url, {"tokenFile": "token"})))
    before = await login()
    write_like_the_kubelet(token_file, "second")
    after = await login()
    assert (before.token, after.token) == ("first", "second")
    assert after.server == cluster.url and after.default_namespace == NS


EXEC_PLUGIN = """#!{python}
import json, os, sys, time
with open({count!r}, "a") as f:
    f.write("run\\n")
token = open({source!r}).read().strip()
print(json.dumps({{"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
                  "status": {{"token": token}}}}))
"""


async def test_an_exec_credential_plugin_is_run_and_run_again_after_a_401(cluster: LocalCluster,
                                                                          tmp_path: Path) -> None:
    source, count = tmp_path / "issued", tmp_path / "runs"
    source.write_text(cluster.api.issue_token(NS, SA, expiration_seconds=2))
    plugin = tmp_path / "credential-plugin"
    plugin.write_text(EXEC_PLUGIN.format(python=sys.executable, count=str(count), source=str(source)))
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
    config = kubeconfig(tmp_path / "kubeconfig", cluster.url, {
        "exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": str(plugin),
                 "interactiveMode": "Never"},
    })
    async with KubeClient(await load_config(str(config))) as kube:
        created = await kube.create(lease_path(NS), {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "by-plugin", "namespace": NS}, "spec": {"holderIdentity": "x"}})
        assert created["spec"]["holderIdentity"] == "x"
        # the plugin's token is the ServiceAccount's: what the account may not do is refused
        with pytest.raises(KubeError, match="403") as refused:
            await kube.list(pods_path(NS))
        assert refused.value.status == 403
        runs_before = count.read_text().count("run")
        # the plugin's credential expires (it said nothing about when): the 401 makes the
        # client run the plugin again, which hands out a fresh token, and the call succeeds
        source.write_text(cluster.api.issue_token(NS, SA, expiration_seconds=60))
        await asyncio.sleep(2.5)
        refused_before = len(cluster.api.unauthorized)
        lease = await kube.get(lease_path(NS, "by-plugin"))
        assert lease["metadata"]["name"] == "by-plugin"
        assert count.read_text().count("run") == runs_before + 1
        assert len(cluster.api.unauthorized) == refused_before + 1  # the one 401 that made it run


async def test_refused_credentials_give_one_clear_error_not_a_retry_storm(cluster: LocalCluster,
                                                                         tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    write_like_the_kubelet(token_file, "not-a-token-of-this-cluster")
    config = kubeconfig(tmp_path / "kubeconfig", cluster.url, {"tokenFile": "token"})
    keeper = LeaseKeeper(namespace=NS, name="pairvol-vol", holder="pod-a", duration_s=2.0,
                         kubeconfig=str(config), on_lost=Lost())
    async with KubeClient(await load_config(str(config))) as kube:
        with pytest.raises(Unauthorized) as first:
            await kube.get(lease_path(NS, "pairvol-vol"))
        message = str(first.value)
        assert "401 Unauthorized" in message and "Give this process valid credentials" in message
        assert str(token_file.parent) in message or str(config) in message  # names the source
        # a Lease keeper retries every 0.2 s and the operator's loop every tick: for 3 s of
        # that, the API server sees no more refused requests than the first one of each client
        t_end = time.monotonic() + 3.0
        calls = 0
        acquiring = asyncio.create_task(keeper.acquire(3.0))
        while time.monotonic() < t_end:
            with pytest.raises(Unauthorized):
                await kube.get(lease_path(NS, "pairvol-vol"))
            calls += 1
            await asyncio.sleep(0.05)
        with pytest.raises(Exception, match="401 Unauthorized"):
            await acquiring
        await keeper.release()
        assert calls > 20 and REFUSED_HOLD_S > 3.0
        assert len(cluster.api.unauthorized) == 2, list(cluster.api.unauthorized)
        # new credentials are used at once, not after the hold
        write_like_the_kubelet(token_file, cluster.api.issue_token(NS, SA, expiration_seconds=60))
        with pytest.raises(KubeError) as after:
            await kube.get(lease_path(NS, "pairvol-vol"))
        assert after.value.status == 404 and len(cluster.api.unauthorized) == 2


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
            "-days", "1", "-subj", "/CN=test-ca", cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "1", "-extfile", f"{name}.ext", cwd=d)


def b64(path: Path) -> str:
    import base64

    return base64.b64encode(path.read_bytes()).decode()


class TlsApiServer:
    """An HTTPS server standing in for kube-apiserver where the emulator (plain HTTP) cannot:
    a certificate for 127.0.0.1 from a test CA, client certificates from the same CA asked
    for, and bearer tokens accepted only while they are in ``valid``."""

    def __init__(self, pki: Path) -> None:
        self.pki = pki
        self.clients: list[str] = []  # common names of the client certificates presented
        self.tokens: list[str] = []  # bearer tokens presented
        self.valid: set[str] = set()
        self.port = 0
        self._runner: aiohttp.web.AppRunner | None = None

    async def pods(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        cert = request.transport.get_extra_info("peercert") if request.transport else None
        if cert:
            self.clients.append(dict(x[0] for x in cert.get("subject", ())).get("commonName", ""))
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if token:
            self.tokens.append(token)
        if not cert and (scheme != "Bearer" or token not in self.valid):
            return aiohttp.web.json_response({"kind": "Status", "code": 401, "message": "Unauthorized"}, status=401)
        return aiohttp.web.json_response({"kind": "PodList", "items": [{"metadata": {"name": "p"}}]})

    async def start(self) -> None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.pki / "ca.crt"))
        tls.load_cert_chain(str(self.pki / "server.crt"), str(self.pki / "server.key"))
        tls.verify_mode = ssl.CERT_OPTIONAL
        app = aiohttp.web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self.pods)
        self._runner = aiohttp.web.AppRunner(app)
        await self._runner.setup()
        site = aiohttp.web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=tls)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def tls_api(tmp_path: Path) -> AsyncIterator[TlsApiServer]:
    pki = tmp_path / "pki"
    pki.mkdir()
    await asyncio.to_thread(make_pki, pki)
    server = TlsApiServer(pki)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_key_material_from_the_kubeconfig_is_used_for_tls_and_never_written_to_a_file(
    tls_api: TlsApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pki = tls_api.pki
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the library writes its files
    key_bytes = (pki / "client.key").read_bytes()
    cfg_path = tmp_path / "kubeconfig"
    cfg_path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": f"https://127.0.0.1:{tls_api.port}",
                                               "certificate-authority-data": b64(pki / "ca.crt")}}],
        "users": [{"name": "u", "user": {"client-certificate-data": b64(pki / "client.crt"),
                                         "client-key-data": b64(pki / "client.key")}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }))
    config = await load_config(str(cfg_path))
    creds = config.credentials()
    assert creds.key_path is not None and creds.key_path.startswith("/proc/self/fd/")
    assert await asyncio.to_thread(Path(creds.key_path).read_bytes) == key_bytes
    assert list(scratch.iterdir()) == [], "the library's temporary files are gone"
    async with KubeClient(config) as kube:
        assert [p["metadata"]["name"] for p in await kube.list(pods_path("default"))] == ["p"]
        assert list(scratch.iterdir()) == []
    assert tls_api.clients == ["client"], "the client certificate from memory was presented"
    # and nothing anywhere in the temporary directory holds the key
    leftovers = [p for p in scratch.rglob("*") if p.is_file() and key_bytes in p.read_bytes()]
    assert leftovers == []


async def test_in_cluster_the_service_account_token_is_read_again_when_the_kubelet_replaces_it(
    tls_api: TlsApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The in-cluster configuration (https to KUBERNETES_SERVICE_HOST, the mounted CA and
    token): a server that accepts only the current token keeps answering across rotations."""
    import pairvol.kube.config as kube_config

    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "ca.crt").write_bytes((tls_api.pki / "ca.crt").read_bytes())
    (sa / "namespace").write_text("apps")
    write_like_the_kubelet(sa / "token", "token-1")
    tls_api.valid = {"token-1"}
    monkeypatch.setattr(kube_config, "SA_DIR", str(sa))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(tls_api.port))
    config = await load_config(None)
    assert config.namespace == "apps" and config.source.startswith("in-cluster")
    async with KubeClient(config) as kube:
        await kube.list(pods_path("apps"))
        for n in (2, 3):  # the kubelet writes a new token; the old one stops being accepted
            write_like_the_kubelet(sa / "token", f"token-{n}")
            tls_api.valid = {f"token-{n}"}
            await kube.list(pods_path("apps"))
    assert tls_api.tokens == ["token-1", "token-2", "token-3"], "one request each, no 401 in between"


def test_kubeconfig_files_are_merged_as_kubectl_merges_them(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """$KUBECONFIG=a:b — the cluster and context from one file, the user (with a token file
    relative to its own file) from the other."""
    from pairvol.kube.config import load_config_sync

    (tmp_path / "users").mkdir()
    (tmp_path / "users" / "token").write_text("from-b\n")
    a = tmp_path / "a.yaml"
    a.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "x",
        "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:9"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": "apps"}}],
    }))
    b = tmp_path / "users" / "b.yaml"
    b.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Config",
                                 "users": [{"name": "u", "user": {"tokenFile": "token"}}]}))
    monkeypatch.setenv("KUBECONFIG", f"{a}{os.pathsep}{b}")
    config = load_config_sync(None)
    try:
        assert (config.server, config.namespace) == ("http://127.0.0.1:9", "apps")
        assert config.credentials().token == "from-b"
        (tmp_path / "users" / "token").write_text("rotated\n")
        assert config.credentials().token == "rotated"
        assert json.dumps(config.source).count("a.yaml") == 1
    finally:
        config.close()
