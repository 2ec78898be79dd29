"""Real pairvol agents as pods on the simulated nodes.

The point is the node simulator, not the agent: an agent pod shaped like the operator's
(``pairvol agent`` from this venv, hostPath data dir, Secret with token and PSK,
readiness probe on ``/healthz``) must run, become Ready, keep its images on *its* node's
disk, and be reachable from another node on the node IP — while a partition cuts it off.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pairvol.aio import bounded
from pairvol.localcluster.cluster import LocalCluster
from pairvol.localcluster.kubelet import NodeSimulator
from pairvol.localcluster.kubelet_api import ApiError, KubeApi
from pairvol.operator.manifests import agent_security_context

pytestmark = [
    pytest.mark.netns,
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(
        shutil.which("qemu-storage-daemon") is None, reason="needs qemu-storage-daemon (Debian qemu-system-common)"
    ),
]

NS = "default"
TOKEN = "kubelet-test-token"
PSK = "pairvol:" + "ab" * 32
SECRET_MOUNT = f"/run/pairvol-test-agent-{os.getpid()}/secret"
DATA = "/var/lib/pairvol/default/vol1"


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[tuple[NodeSimulator, KubeApi]]:
    async with (
        LocalCluster(nodes=0, load_crds=False) as cluster,
        KubeApi(cluster.url) as api,
        NodeSimulator(
            cluster.url,
            nodes=["node-a", "node-b"],
            root=tmp_path / "nodes",
            status_interval=0.3,
            node_monitor_grace=1.5,
        ) as simulator,
    ):
        yield simulator, api
    shutil.rmtree(Path(SECRET_MOUNT).parent, ignore_errors=True)


def agent_pod(name: str, node: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "nodeName": node,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            "containers": [
                {
                    "name": "agent",
                    "image": "pairvol:dev",
                    "command": [
                        "pairvol",
                        "agent",
                        "--name",
                        "vol1",
                        "--data-dir",
                        DATA,
                        "--size",
                        "16Mi",
                        "--listen",
                        "0.0.0.0:7800",
                        "--replication-listen",
                        "0.0.0.0:7801",
                        "--token-file",
                        f"{SECRET_MOUNT}/token",
                        "--psk-file",
                        f"{SECRET_MOUNT}/psk",
                    ],
                    "ports": [{"name": "api", "containerPort": 7800}],
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": "api"}, "periodSeconds": 0.5},
                    "securityContext": agent_security_context(),  # as the operator's pods run
                    "volumeMounts": [
                        {"name": "data", "mountPath": DATA},
                        {"name": "credentials", "mountPath": SECRET_MOUNT, "readOnly": True},
                    ],
                }
            ],
            "volumes": [
                {"name": "data", "hostPath": {"path": DATA, "type": "DirectoryOrCreate"}},
                {"name": "credentials", "secret": {"secretName": "vol1-agent", "defaultMode": 0o400}},
            ],
        },
    }


async def call(
    sim: NodeSimulator, from_node: str, host: str, method: str, path: str, body: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    """A tiny HTTP/1.0 client that runs inside ``from_node``'s network namespace."""
    reader, writer = await sim.net.open_connection(from_node, host, 7800, time_limit=3.0)
    payload = json.dumps(body or {}).encode() if method == "POST" else b""
    head = (
        f"{method} {path} HTTP/1.0\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    writer.write(head.encode() + payload)
    await writer.drain()
    raw = await bounded(reader.read(), 30)
    writer.close()
    status_line, _, rest = raw.partition(b"\r\n")
    _, _, text = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(text or b"{}")


async def test_agent_pod_runs_with_its_secret_and_node_local_data_dir(sim: tuple[NodeSimulator, KubeApi]) -> None:
    simulator, api = sim
    await api.request(
        "POST",
        f"/api/v1/namespaces/{NS}/secrets",
        body={
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "vol1-agent", "namespace": NS},
            "data": {
                "token": base64.b64encode(TOKEN.encode()).decode(),
                "psk": base64.b64encode(PSK.encode()).decode(),
            },
        },
    )
    await api.request("POST", f"/api/v1/namespaces/{NS}/pods", body=agent_pod("agent-b", "node-b"))

    deadline = time.monotonic() + 60
    while True:
        try:
            obj = await api.request("GET", f"/api/v1/namespaces/{NS}/pods/agent-b")
        except ApiError:
            obj = {}
        conds = {c["type"]: c["status"] for c in (obj.get("status") or {}).get("conditions", [])}
        if conds.get("Ready") == "True":
            break
        assert time.monotonic() < deadline, (
            f"agent pod never became Ready: {obj.get('status')}\n"
            + simulator.log_path("node-b", NS, "agent-b").read_text()[-3000:]
        )
        await asyncio.sleep(0.2)

    b_ip = obj["status"]["podIP"]
    status, body = await call(simulator, "node-a", b_ip, "GET", "/v1/status")
    assert status == 200 and body["role"] == "none"

    status, body = await call(simulator, "node-a", b_ip, "POST", "/v1/secondary", {"epoch": 1})
    assert status == 200, body
    status, body = await call(simulator, "node-a", b_ip, "GET", "/v1/status")
    assert body["role"] == "secondary" and body["stage"] == "running"
    # The replica's images are on node-b's disk, not node-a's and not the machine's.
    node_b_files = await asyncio.to_thread(
        lambda: sorted(p.name for p in simulator.host_path("node-b", DATA).iterdir())
    )
    assert node_b_files, "agent wrote nothing into its hostPath"
    assert not await asyncio.to_thread(simulator.host_path("node-a", DATA).exists)

    # Cut node-b off: its API is unreachable from node-a, silently.
    await simulator.partition_node("node-b")
    with pytest.raises(TimeoutError):
        await simulator.net.open_connection("node-a", b_ip, 7800, time_limit=1.0)
    await simulator.heal_node("node-b")
    status, _ = await call(simulator, "node-a", b_ip, "GET", "/v1/status")
    assert status == 200
