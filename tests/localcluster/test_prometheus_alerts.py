"""The chart's monitoring against a running cluster: a real Prometheus scrapes what the
chart's PodMonitor and ServiceMonitor select, evaluates its PrometheusRule, and the alerts
fire from the series the agents and the operator really export when a node dies, a volume
fails over or the operator is gone (tests/chart/alerts_test.yaml pins the same rules on
synthetic series; this is the other half: the names, labels and timings of real ones).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.support.ci import tool
from tests.support.localcluster_cli import kubectl, pairvol
from tests.support.prometheus import Prometheus, ScrapeJob, pod_monitor_targets, service_monitor_targets

from pairvol.aio import bounded
from pairvol.kube.client import KubeClient
from pairvol.kube.config import load_config

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "pairvol"

pytestmark = [
    pytest.mark.netns,
    pytest.mark.timeout(480),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for simulated nodes"),
]

# what the test installs, and the monitors and alert thresholds rendered with it
INSTALL = {
    "watchNamespaces": ["apps"],
    # the active operator replica may die with a node: its peer takes over within 5 s
    "operator": {"peering": {"lifetimeSeconds": 5}},
}
MONITORING = {
    **INSTALL,
    "monitoring": {
        "prometheusRule": {"enabled": True},
        "podMonitor": {"enabled": True, "interval": "1s"},
        "serviceMonitor": {"enabled": True, "interval": "1s"},
    },
    "alerts": {"degradedFor": "5s", "agentDownFor": "5s", "operatorDownFor": "5s"},
}
VOLUME = """
apiVersion: pairvol.io/v1alpha1
kind: ReplicatedVolume
metadata: {name: watched, namespace: apps}
spec:
  size: 16Mi
  checkpoint: {intervalSeconds: 1}
  failover: {mode: Latest, gracePeriodSeconds: 1}
"""


async def helm(*args: str, within: float = 180) -> str:
    proc = await asyncio.create_subprocess_exec(
        tool("helm"), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await bounded(proc.communicate(), within)
    assert proc.returncode == 0, err.decode()
    return out.decode()


def values_file(tmp: Path, name: str, values: dict[str, Any]) -> str:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


@pytest.fixture
async def cluster(state_dir: Path, tmp_path: Path) -> AsyncIterator[tuple[str, KubeClient]]:
    """Two simulated nodes with the chart installed by helm; (kubeconfig, API client)."""
    up = await pairvol("up", "--detach", "--nodes", "2", "--state-dir", str(state_dir), within=120)
    assert up.code == 0, up.err
    kubeconfig = str(state_dir / "kubeconfig")
    await kubectl(kubeconfig, "create", "namespace", "apps")
    await helm(
        "install", "pairvol", str(CHART), "--namespace", "pairvol", "--create-namespace",
        "-f", values_file(tmp_path, "install", INSTALL), "--kubeconfig", kubeconfig, "--wait", "--timeout", "150s",
    )  # fmt: skip
    async with KubeClient(await load_config(kubeconfig)) as kube:
        yield kubeconfig, kube


async def monitoring_objects(tmp: Path) -> dict[str, dict[str, Any]]:
    rendered = await helm(
        "template", "pairvol", str(CHART), "--namespace", "pairvol", "-f", values_file(tmp, "monitoring", MONITORING)
    )
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    wanted = ("PodMonitor", "ServiceMonitor", "PrometheusRule")
    return {d["kind"]: d for d in docs if d.get("kind") in wanted}


async def status(kubeconfig: str) -> dict[str, Any]:
    rv = json.loads(await kubectl(kubeconfig, "get", "rv", "-n", "apps", "watched", "-o", "json"))
    st: dict[str, Any] = rv.get("status") or {}
    return st


async def wait_phase(kubeconfig: str, phase: str, within: float = 150) -> dict[str, Any]:
    await kubectl(
        kubeconfig, "wait", "-n", "apps", "rv/watched", f"--for=jsonpath={{.status.phase}}={phase}",
        f"--timeout={within:.0f}s", within=within + 10,
    )  # fmt: skip
    return await status(kubeconfig)


async def test_alerts_fire_from_real_series_when_a_node_dies_a_volume_fails_over_and_the_operator_is_gone(
    cluster: tuple[str, KubeClient], state_dir: Path, tmp_path: Path
) -> None:
    kubeconfig, kube = cluster
    objects = await monitoring_objects(tmp_path)
    pod_monitor, service_monitor = objects["PodMonitor"], objects["ServiceMonitor"]

    async def agents() -> list[dict[str, Any]]:
        return pod_monitor_targets(pod_monitor, await kube.list("/api/v1/pods"))

    async def operators() -> list[dict[str, Any]]:
        services, endpoints = await kube.list("/api/v1/services"), await kube.list("/api/v1/endpoints")
        return service_monitor_targets(service_monitor, services, endpoints)

    jobs = {  # named as the Prometheus Operator names them
        "podMonitor/pairvol/pairvol-agent/0": ScrapeJob.of(pod_monitor["spec"]["podMetricsEndpoints"][0], agents),
        "serviceMonitor/pairvol/pairvol-operator/0": ScrapeJob.of(service_monitor["spec"]["endpoints"][0], operators),
    }
    (tmp_path / "volume.yaml").write_text(VOLUME)
    await kubectl(kubeconfig, "apply", "-f", str(tmp_path / "volume.yaml"))
    st = await wait_phase(kubeconfig, "Replicating")

    async with Prometheus(tool("prometheus"), tmp_path / "prometheus", objects["PrometheusRule"], jobs) as prom:

        async def up(job: str) -> list[str]:
            return [s["metric"].get("pod", "") for s in await prom.query(f'up{{job="{job}"}} == 1')]

        # what the monitors select is scraped under the job names the alerts use
        agents_up = await prom.wait_for("two agents scraped", lambda: _two(up("pairvol-agent")), within=30)
        assert sorted(agents_up) == sorted([st["primary"]["pod"], st["secondary"]["pod"]])
        await prom.wait_for("two operator replicas scraped", lambda: _two(up("pairvol-operator")), within=30)
        replicating = await prom.wait_for(
            "the replicating series",
            lambda: prom.query('pairvol_replication_state{state="replicating", namespace="apps"} == 1'),
            within=30,
        )
        assert {s["metric"]["volume"] for s in replicating} == {"watched"}

        # healthy: longer than every `for`, and nothing fires
        await asyncio.sleep(8)
        assert [a["labels"]["alertname"] for a in await prom.alerts() if a["state"] == "firing"] == []

        # the secondary's node dies: the primary runs without a replica, the agent is unreachable
        await node(state_dir, "kill", st["secondary"]["node"])
        degraded = await prom.wait_for(
            "PairvolReplicationDegraded", lambda: prom.firing("PairvolReplicationDegraded", volume="watched"), 60
        )
        assert degraded[0]["annotations"]["summary"] == "Volume apps/watched runs without a replica"
        await prom.wait_for(
            "PairvolAgentDown for the dead secondary",
            lambda: prom.firing("PairvolAgentDown", pod=st["secondary"]["pod"]),
            60,
        )

        # the node comes back: the volume replicates again and the alert resolves
        await node(state_dir, "restart", st["secondary"]["node"])
        st = await wait_phase(kubeconfig, "Replicating")

        async def degraded_resolved() -> bool:
            return not await prom.firing("PairvolReplicationDegraded", volume="watched")

        await prom.wait_for("PairvolReplicationDegraded to resolve", degraded_resolved, 60)

        # the primary's node dies: the volume fails over, and that is reported
        await node(state_dir, "kill", st["primary"]["node"])
        failed_over = await prom.wait_for(
            "PairvolFailoverHappened", lambda: prom.firing("PairvolFailoverHappened", volume="watched"), 120
        )
        assert failed_over[0]["labels"]["namespace"] == "apps"

        async def promoted() -> bool:  # the agent counts the failover before the status says so
            return bool((await status(kubeconfig)).get("primary", {}).get("node") == st["secondary"]["node"])

        await prom.wait_for("the status to name the promoted secondary", promoted, 30)

        # no operator replica left running
        await kubectl(kubeconfig, "scale", "deploy", "-n", "pairvol", "pairvol-operator", "--replicas=0")
        await prom.wait_for("PairvolOperatorDown", lambda: prom.firing("PairvolOperatorDown"), 90)


async def _two(found: Any) -> list[str] | None:
    pods: list[str] = await found
    return pods if len(pods) == 2 else None


async def node(state_dir: Path, action: str, name: str) -> None:
    done = await pairvol("node", action, name, "--state-dir", str(state_dir), within=60)
    assert done.code == 0, done.err
