"""The node simulator, specified by what a cluster user observes.

Every test runs real processes in real network namespaces against the team's emulated
API server (``LocalCluster``) and needs root; they are marked ``netns``. The fixtures
tear everything down (processes by cgroup/PID, namespaces, veths, bridge) even when a
test fails.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pairvol.aio import bounded
from pairvol.localcluster.cluster import LocalCluster
from pairvol.localcluster.kubelet import NodeSimulator
from pairvol.localcluster.kubelet_api import ApiError, KubeApi
from pairvol.localcluster.kubelet_pods import RUNTIME_DEFAULT_CAPABILITIES, capability_mask
from pairvol.localcluster.netns import run_command

pytestmark = [
    pytest.mark.netns,
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

NODES = ["node-a", "node-b"]
NS = "default"
GRACE = 1.5  # node_monitor_grace for tests: Unknown after 1.5 s without heartbeat


@pytest.fixture
async def sim(cluster: LocalCluster, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[NodeSimulator]:
    """Two nodes; ``indirect`` param ``"no-cgroups"`` forces the process-group fallback."""
    simulator = NodeSimulator(
        cluster.url,
        nodes=NODES,
        root=tmp_path / f"nodes-{os.getpid()}",
        status_interval=0.3,
        node_monitor_grace=GRACE,
        backoff_base=0.2,
        config_retry=0.3,
        use_cgroups=getattr(request, "param", "cgroups") != "no-cgroups",
    )
    async with simulator:
        yield simulator
    # The teardown promise: nothing of ours is left behind.
    assert simulator.net.plan is not None
    links = await run_command(["ip", "-o", "link", "show"])
    assert simulator.net.plan.bridge not in links.stdout
    netns = await run_command(["ip", "netns", "list"])
    assert f"pvn{simulator.net.plan.token}-" not in netns.stdout


async def eventually(check: Callable[[], Awaitable[Any]], *, within: float = 15.0, every: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy (and return that) or fail."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await check()
        except (ApiError, AssertionError) as exc:
            last = exc
        else:
            if last:
                return last
        await asyncio.sleep(every)
    raise AssertionError(f"condition not met within {within}s; last result: {last!r}")


def pod(name: str, node: str, command: list[str], **spec: Any) -> dict[str, Any]:
    container = {"name": "main", "image": "ignored", "command": command}
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"test": name}},
        "spec": {"nodeName": node, "containers": [container], **spec},
    }


async def create(api: KubeApi, obj: dict[str, Any]) -> dict[str, Any]:
    plural = obj["kind"].lower() + "s"
    return await api.request("POST", f"/api/v1/namespaces/{NS}/{plural}", body=obj)


async def get_pod(api: KubeApi, name: str) -> dict[str, Any]:
    return await api.request("GET", f"/api/v1/namespaces/{NS}/pods/{name}")


async def pod_gone(api: KubeApi, name: str) -> bool:
    try:
        await get_pod(api, name)
    except ApiError as exc:
        if exc.status == 404:
            return True
        raise
    return False


def condition(obj: dict[str, Any], ctype: str) -> str | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == ctype:
            return str(cond.get("status"))
    return None


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def http_get(sim: NodeSimulator, from_node: str, host: str, port: int) -> bytes:
    reader, writer = await sim.net.open_connection(from_node, host, port, time_limit=2.0)
    try:
        writer.write(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        await writer.drain()
        return await bounded(reader.readline(), 5)
    finally:
        writer.close()


def http_server_pod(name: str, node: str, port: int = 8080) -> dict[str, Any]:
    return pod(
        name,
        node,
        [sys.executable, "-m", "http.server", "--bind", "$(POD_IP)", str(port)],
        container={
            "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
            "ports": [{"name": "http", "containerPort": port}],
            "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 0.2},
        },
    )


async def running_ready(api: KubeApi, name: str) -> dict[str, Any] | None:
    obj = await get_pod(api, name)
    status = obj.get("status") or {}
    if status.get("phase") == "Running" and condition(obj, "Ready") == "True":
        return obj
    return None


# ---------------------------------------------------------------------------------------


async def test_nodes_register_ready_with_their_ip(sim: NodeSimulator, api: KubeApi) -> None:
    for name in NODES:
        node = await api.request("GET", f"/api/v1/nodes/{name}")
        assert node["metadata"]["labels"]["kubernetes.io/hostname"] == name
        assert condition(node, "Ready") == "True"
        addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
        assert addresses["InternalIP"] == sim.node_ip(name)
    assert sim.node_ip("node-a") != sim.node_ip("node-b")


async def test_pod_runs_its_command_and_becomes_ready_after_its_readiness_probe(
    sim: NodeSimulator, api: KubeApi
) -> None:
    await create(api, http_server_pod("web", "node-b"))

    obj = await eventually(lambda: running_ready(api, "web"))

    status = obj["status"]
    assert status["hostIP"] == sim.node_ip("node-b")
    assert ipaddress.IPv4Address(status["podIP"]) in ipaddress.IPv4Network(sim.net.pod_cidr("node-b"))
    (container,) = status["containerStatuses"]
    assert container["ready"] is True and container["restartCount"] == 0
    assert "running" in container["state"]
    # Reachable from another node on the pod IP, served by the real process.
    line = await http_get(sim, "node-a", status["podIP"], 8080)
    assert line.startswith(b"HTTP/1.0 200")


async def test_pod_is_not_ready_while_its_readiness_probe_fails(sim: NodeSimulator, api: KubeApi) -> None:
    # Listens on 8081, but the probe checks 8082: Running, never Ready.
    body = http_server_pod("half", "node-a", port=8081)
    body["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = 8082
    await create(api, body)

    await eventually(lambda: _phase_is(api, "half", "Running"))
    await asyncio.sleep(1.0)
    obj = await get_pod(api, "half")
    assert condition(obj, "Ready") == "False"
    assert obj["status"]["containerStatuses"][0]["ready"] is False


async def _phase_is(api: KubeApi, name: str, phase: str) -> dict[str, Any] | None:
    obj = await get_pod(api, name)
    return obj if (obj.get("status") or {}).get("phase") == phase else None


@pytest.fixture
def mount_target() -> Iterator[Path]:
    """A unique directory on the machine a pod can mount over (created empty, removed after)."""
    path = Path(f"/run/pairvol-test-kubelet-{os.getpid()}")
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_env_downward_api_secret_volume_and_host_path_are_what_the_process_sees(
    sim: NodeSimulator, api: KubeApi, mount_target: Path
) -> None:
    secret_dir = f"{mount_target}/secret"
    await create(
        api,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "creds", "namespace": NS},
            "data": {
                "token": base64.b64encode(b"s3cr3t-token").decode(),
                "psk": base64.b64encode(b"client:0123abcd").decode(),
            },
        },
    )
    script = (
        'echo "hostname=$(hostname)";'
        'echo "env NAME=$MY_NAME NS=$MY_NS NODE=$MY_NODE IP=$MY_IP TOKEN=$TOKEN PLAIN=$PLAIN";'
        f'echo "file psk=$(cat {secret_dir}/psk)";'
        f"if echo x > {secret_dir}/psk 2>/dev/null; then echo secret-writable; fi;"
        "echo from-pod > /var/lib/pairvol/marker;"
        "echo ready; exec sleep 1000"
    )
    body = pod(
        "envpod",
        "node-a",
        ["/bin/sh", "-c", script],
        container={
            "env": [
                {"name": "PLAIN", "value": "plain-$(MY_NAME)"},
                {"name": "MY_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "MY_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "MY_NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            ],
            "volumeMounts": [
                {"name": "creds", "mountPath": secret_dir},
                {"name": "data", "mountPath": "/var/lib/pairvol"},
            ],
            # Exec probes run inside the pod's mounts: the marker exists only there.
            "readinessProbe": {"exec": {"command": ["test", "-f", "/var/lib/pairvol/marker"]}, "periodSeconds": 0.2},
        },
        volumes=[
            {"name": "creds", "secret": {"secretName": "creds"}},
            {"name": "data", "hostPath": {"path": "/var/lib/pairvol", "type": "DirectoryOrCreate"}},
        ],
    )
    body["spec"]["containers"][0]["env"][0]["value"] = "plain-$(MY_NAME)"
    await create(api, body)
    log = sim.log_path("node-a", NS, "envpod")

    async def logged() -> str | None:
        text = await asyncio.to_thread(lambda: log.read_text() if log.exists() else "")
        return text if "ready" in text else None

    text = await eventually(logged)

    # PLAIN is defined before MY_NAME: $(MY_NAME) stays unexpanded, as in Kubernetes.
    pod_ip = (await get_pod(api, "envpod"))["status"]["podIP"]
    assert (f"env NAME=envpod NS={NS} NODE=node-a IP={pod_ip} TOKEN=s3cr3t-token PLAIN=plain-$(MY_NAME)") in text
    assert "file psk=client:0123abcd" in text
    assert "hostname=envpod" in text
    assert "secret-writable" not in text  # secret volumes are read-only
    marker = sim.host_path("node-a", "/var/lib/pairvol/marker")
    assert marker.read_text() == "from-pod\n"
    # The pod wrote into its node's directory, not into the machine's /var/lib/pairvol.
    assert not await asyncio.to_thread(Path("/var/lib/pairvol/marker").exists)
    assert not await asyncio.to_thread(sim.host_path("node-b", "/var/lib/pairvol/marker").exists)
    await eventually(lambda: running_ready(api, "envpod"))
    # `kubectl exec` equivalent: same mounts as the container.
    result = await sim.exec_in_pod(NS, "envpod", ["cat", f"{secret_dir}/token"])
    assert (result.returncode, result.stdout) == (0, "s3cr3t-token")


async def test_pod_waits_with_a_clear_reason_until_its_secret_exists(sim: NodeSimulator, api: KubeApi) -> None:
    body = pod(
        "needs-secret",
        "node-a",
        ["/bin/sh", "-c", "echo $KEY; exec sleep 1000"],
        container={"env": [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "later", "key": "k"}}}]},
    )
    await create(api, body)

    async def waiting_reason() -> dict[str, Any] | None:
        obj = await get_pod(api, "needs-secret")
        statuses = (obj.get("status") or {}).get("containerStatuses") or []
        waiting = statuses[0]["state"].get("waiting") if statuses else None
        if waiting and waiting.get("reason") == "CreateContainerConfigError":
            return waiting
        return None

    waiting = await eventually(waiting_reason)
    assert "later" in waiting["message"] and "not found" in waiting["message"]

    await create(
        api,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "later", "namespace": NS},
            "data": {"k": base64.b64encode(b"v").decode()},
        },
    )
    await eventually(lambda: _phase_is(api, "needs-secret", "Running"))


async def test_kill_pod_crashes_the_container_and_it_is_restarted_once(sim: NodeSimulator, api: KubeApi) -> None:
    await create(api, http_server_pod("crashy", "node-a"))
    await eventually(lambda: running_ready(api, "crashy"))
    (old_pid,) = sim.pod_pids(NS, "crashy")

    await sim.kill_pod(NS, "crashy")

    assert not alive(old_pid)

    async def restarted() -> dict[str, Any] | None:
        obj = await running_ready(api, "crashy")
        if obj and obj["status"]["containerStatuses"][0]["restartCount"] == 1:
            return obj
        return None

    obj = await eventually(restarted)
    last = obj["status"]["containerStatuses"][0]["lastState"]["terminated"]
    assert last["exitCode"] == 137 and last["signal"] == signal.SIGKILL
    (new_pid,) = sim.pod_pids(NS, "crashy")
    assert new_pid != old_pid and alive(new_pid)


async def test_restart_policy_decides_what_happens_after_exit(sim: NodeSimulator, api: KubeApi) -> None:
    await create(api, pod("fails", "node-a", ["/bin/sh", "-c", "exit 3"], restartPolicy="Never"))
    await create(api, pod("works", "node-a", ["/bin/true"], restartPolicy="OnFailure"))
    await create(api, pod("loops", "node-b", ["/bin/sh", "-c", "exit 1"], restartPolicy="Always"))

    failed = await eventually(lambda: _phase_is(api, "fails", "Failed"))
    container = failed["status"]["containerStatuses"][0]
    assert container["state"]["terminated"]["exitCode"] == 3
    assert container["restartCount"] == 0
    succeeded = await eventually(lambda: _phase_is(api, "works", "Succeeded"))
    assert succeeded["status"]["containerStatuses"][0]["restartCount"] == 0

    async def crash_looping() -> dict[str, Any] | None:
        obj = await get_pod(api, "loops")
        statuses = (obj.get("status") or {}).get("containerStatuses") or [{}]
        return obj if statuses[0].get("restartCount", 0) >= 2 else None

    looping = await eventually(crash_looping)
    assert looping["status"]["phase"] == "Running"


async def test_failing_liveness_probe_restarts_the_container(sim: NodeSimulator, api: KubeApi) -> None:
    # It exits 0 on SIGTERM, yet a liveness kill is a failure: OnFailure restarts it.
    body = pod(
        "unlive",
        "node-b",
        ["/bin/sh", "-c", 'trap "exit 0" TERM; while :; do sleep 0.1; done'],
        container={"livenessProbe": {"tcpSocket": {"port": 9}, "periodSeconds": 0.2, "failureThreshold": 2}},
        terminationGracePeriodSeconds=5,
        restartPolicy="OnFailure",
    )
    await create(api, body)

    async def restarted() -> bool:
        obj = await get_pod(api, "unlive")
        statuses = (obj.get("status") or {}).get("containerStatuses") or [{}]
        return bool(statuses[0].get("restartCount", 0) >= 1)

    await eventually(restarted)


async def test_deleting_a_pod_sends_sigterm_and_waits_for_a_clean_exit(sim: NodeSimulator, api: KubeApi) -> None:
    script = 'trap "echo got-sigterm; exit 0" TERM; echo started; while :; do sleep 0.1; done'
    await create(api, pod("polite", "node-a", ["/bin/sh", "-c", script], terminationGracePeriodSeconds=20))
    await eventually(lambda: _phase_is(api, "polite", "Running"))
    (pid,) = sim.pod_pids(NS, "polite")
    log = sim.log_path("node-a", NS, "polite")
    await eventually(lambda: asyncio.to_thread(lambda: "started" in log.read_text()))

    started = time.monotonic()
    await api.request("DELETE", f"/api/v1/namespaces/{NS}/pods/polite")
    await eventually(lambda: asyncio.to_thread(lambda: not alive(pid)))

    assert time.monotonic() - started < 10  # it exited on SIGTERM, not after the grace
    assert "got-sigterm" in log.read_text()
    await eventually(lambda: pod_gone(api, "polite"))


async def test_deleting_a_pod_that_ignores_sigterm_kills_it_after_the_grace_period(
    sim: NodeSimulator, api: KubeApi
) -> None:
    script = 'trap "" TERM; echo started; while :; do sleep 0.1; done'
    await create(api, pod("stubborn", "node-a", ["/bin/sh", "-c", script], terminationGracePeriodSeconds=1))
    await eventually(lambda: _phase_is(api, "stubborn", "Running"))
    (pid,) = sim.pod_pids(NS, "stubborn")
    log = sim.log_path("node-a", NS, "stubborn")
    await eventually(lambda: asyncio.to_thread(lambda: "started" in log.read_text()))

    started = time.monotonic()
    await api.request("DELETE", f"/api/v1/namespaces/{NS}/pods/stubborn")
    await eventually(lambda: asyncio.to_thread(lambda: not alive(pid)))

    assert 0.9 <= time.monotonic() - started < 8


async def test_a_pod_marked_for_deletion_is_terminated_and_then_finalized_by_the_kubelet(
    sim: NodeSimulator, api: KubeApi
) -> None:
    # A finalizer keeps the object around, so the kubelet sees deletionTimestamp (the
    # graceful path of a real API server) instead of the object vanishing.
    script = 'trap "echo got-sigterm; exit 0" TERM; echo started; while :; do sleep 0.1; done'
    body = pod("held", "node-b", ["/bin/sh", "-c", script], terminationGracePeriodSeconds=20)
    body["metadata"]["finalizers"] = ["test.pairvol.io/hold"]
    await create(api, body)
    await eventually(lambda: _phase_is(api, "held", "Running"))
    (pid,) = sim.pod_pids(NS, "held")
    log = sim.log_path("node-b", NS, "held")
    await eventually(lambda: asyncio.to_thread(lambda: "started" in log.read_text()))

    await api.request("DELETE", f"/api/v1/namespaces/{NS}/pods/held")

    await eventually(lambda: asyncio.to_thread(lambda: not alive(pid)))
    assert "got-sigterm" in log.read_text()

    async def reported_terminated() -> dict[str, Any] | None:
        obj = await get_pod(api, "held")
        state = obj["status"]["containerStatuses"][0]["state"]
        return obj if "terminated" in state else None

    obj = await eventually(reported_terminated)
    assert obj["metadata"]["deletionTimestamp"]
    assert obj["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    # Once the finalizer goes, the kubelet's final delete has nothing left to wait for.
    await api.request(
        "PATCH",
        f"/api/v1/namespaces/{NS}/pods/held",
        body={"metadata": {"finalizers": None}},
        content_type="application/merge-patch+json",
    )

    await eventually(lambda: pod_gone(api, "held"))


@pytest.mark.parametrize("sim", ["cgroups", "no-cgroups"], indirect=True)
async def test_kill_node_kills_every_process_and_the_node_turns_not_ready(sim: NodeSimulator, api: KubeApi) -> None:
    # The container forks a child into its own session: it must die with the node too.
    script = "setsid sleep 1001 & echo started; exec sleep 1000"
    await create(api, pod("victim", "node-a", ["/bin/sh", "-c", script]))
    await create(api, http_server_pod("bystander", "node-b"))
    await eventually(lambda: _phase_is(api, "victim", "Running"))
    await eventually(lambda: running_ready(api, "bystander"))
    log = sim.log_path("node-a", NS, "victim")
    await eventually(lambda: asyncio.to_thread(lambda: "started" in log.read_text()))
    pids = sim.node_pids("node-a")
    assert len(pids) >= 2

    await sim.kill_node("node-a")

    assert not [p for p in pids if alive(p)]

    async def node_unknown_pod_not_ready() -> bool:
        node = await api.request("GET", "/api/v1/nodes/node-a")
        taints = {(t["key"], t["effect"]) for t in node["spec"].get("taints") or []}
        victim = await get_pod(api, "victim")
        return (
            condition(node, "Ready") == "Unknown"
            and ("node.kubernetes.io/unreachable", "NoExecute") in taints
            and condition(victim, "Ready") == "False"
        )

    await eventually(node_unknown_pod_not_ready, within=GRACE + 5)
    # The other node is unaffected.
    other = await api.request("GET", "/api/v1/nodes/node-b")
    assert condition(other, "Ready") == "True"
    assert condition(await get_pod(api, "bystander"), "Ready") == "True"

    # Power on again: Ready, and the pod runs again (counted as a restart).
    await sim.restart_node("node-a")

    async def back() -> bool:
        node = await api.request("GET", "/api/v1/nodes/node-a")
        obj = await get_pod(api, "victim")
        statuses = (obj.get("status") or {}).get("containerStatuses") or [{}]
        return (
            condition(node, "Ready") == "True"
            and not node["spec"].get("taints")
            and "running" in statuses[0].get("state", {})
            and statuses[0].get("restartCount") == 1
        )

    await eventually(back)
    assert [p for p in sim.node_pids("node-a") if alive(p)]


async def test_partition_silently_drops_traffic_both_ways_until_healed(sim: NodeSimulator, api: KubeApi) -> None:
    await create(api, http_server_pod("island", "node-b"))
    b_ip = (await eventually(lambda: running_ready(api, "island")))["status"]["podIP"]
    assert (await http_get(sim, "node-a", b_ip, 8080)).startswith(b"HTTP/1.0 200")

    await sim.partition_node("node-b")

    # No RST, no ICMP: the connection attempt just times out (both directions).
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await sim.net.open_connection("node-a", b_ip, 8080, time_limit=1.0)
    assert time.monotonic() - started >= 0.9
    with pytest.raises(TimeoutError):
        await sim.net.open_connection("node-b", sim.node_ip("node-a"), 22, time_limit=1.0)
    # The pod itself keeps running and is still reachable inside its own node.
    assert (await http_get(sim, "node-b", b_ip, 8080)).startswith(b"HTTP/1.0 200")

    async def node_unknown() -> bool:
        node = await api.request("GET", "/api/v1/nodes/node-b")
        return condition(node, "Ready") == "Unknown"

    await eventually(node_unknown, within=GRACE + 5)

    await sim.heal_node("node-b")

    assert (await http_get(sim, "node-a", b_ip, 8080)).startswith(b"HTTP/1.0 200")

    async def node_ready_pod_ready() -> bool:
        node = await api.request("GET", "/api/v1/nodes/node-b")
        return condition(node, "Ready") == "True" and bool(await running_ready(api, "island"))

    await eventually(node_ready_pod_ready)


async def test_pods_reach_the_api_server_through_the_node_network(sim: NodeSimulator, api: KubeApi) -> None:
    script = (
        "import json, os, urllib.request;"
        "url = 'http://%s:%s/api/v1/nodes' % (os.environ['KUBERNETES_SERVICE_HOST'],"
        " os.environ['KUBERNETES_SERVICE_PORT']);"
        "items = json.load(urllib.request.urlopen(url, timeout=5))['items'];"
        "print('nodes:', sorted(i['metadata']['name'] for i in items), flush=True);"
        "print('kubeconfig:', os.path.exists(os.environ['KUBECONFIG']), flush=True)"
    )
    await create(api, pod("client", "node-a", [sys.executable, "-c", script], restartPolicy="Never"))

    await eventually(lambda: _phase_is(api, "client", "Succeeded"))
    text = sim.log_path("node-a", NS, "client").read_text()
    assert "nodes: ['node-a', 'node-b']" in text
    assert "kubeconfig: True" in text


async def test_pairvol_resolves_to_this_venv_inside_pods(sim: NodeSimulator, api: KubeApi) -> None:
    await create(api, pod("which", "node-b", ["/bin/sh", "-c", "command -v pairvol"], restartPolicy="Never"))
    await eventually(lambda: _phase_is(api, "which", "Succeeded"))
    text = sim.log_path("node-b", NS, "which").read_text().strip()
    assert text == str(Path(sys.executable).parent / "pairvol")


async def test_run_in_node_uses_the_node_network(sim: NodeSimulator) -> None:
    result = await sim.run_in_node("node-a", ["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
    assert result.returncode == 0
    assert sim.node_ip("node-a") in result.stdout


async def test_leftovers_of_a_dead_simulator_are_removed_by_the_next_one(cluster: LocalCluster, tmp_path: Path) -> None:
    # A bridge and a netns named as if owned by a PID that cannot exist (> pid_max).
    dead = "pvb7fffffx1"
    dead_ns = "pvn7fffffx1-0"
    await run_command(["ip", "link", "add", dead, "type", "bridge"])
    await run_command(["ip", "netns", "add", dead_ns])
    try:
        async with NodeSimulator(cluster.url, nodes=["n1"], root=tmp_path / "n"):
            links = await run_command(["ip", "-o", "link", "show"])
            namespaces = await run_command(["ip", "netns", "list"])
            assert dead not in links.stdout
            assert dead_ns not in namespaces.stdout
    finally:
        await run_command(["ip", "link", "del", dead], check=False)
        await run_command(["ip", "netns", "del", dead_ns], check=False)


async def test_init_containers_run_to_completion_before_the_containers_start(sim: NodeSimulator, api: KubeApi) -> None:
    shared = {"name": "work", "mountPath": f"/run/pairvol-test-init-{os.getpid()}"}
    body = pod(
        "initialized",
        "node-a",
        ["/bin/sh", "-c", f'echo "main sees: $(cat {shared["mountPath"]}/note)"; exec sleep 1000'],
        container={"volumeMounts": [shared]},
        initContainers=[
            {
                "name": "first",
                "command": ["/bin/sh", "-c", f"sleep 0.3; echo one > {shared['mountPath']}/note"],
                "volumeMounts": [shared],
            },
            {
                "name": "second",
                "command": ["/bin/sh", "-c", f"echo two >> {shared['mountPath']}/note"],
                "volumeMounts": [shared],
            },
        ],
        volumes=[{"name": "work", "emptyDir": {}}],
    )
    await create(api, body)
    try:
        obj = await eventually(lambda: _phase_is(api, "initialized", "Running"))
        assert condition(obj, "Initialized") == "True"
        assert [s["state"]["terminated"]["exitCode"] for s in obj["status"]["initContainerStatuses"]] == [0, 0]
        log = sim.log_path("node-a", NS, "initialized")
        await eventually(lambda: asyncio.to_thread(lambda: "main sees: one\ntwo" in log.read_text()))
    finally:
        await asyncio.to_thread(shutil.rmtree, shared["mountPath"], True)


async def test_a_failed_init_container_fails_a_pod_that_never_restarts(sim: NodeSimulator, api: KubeApi) -> None:
    body = pod(
        "doomed",
        "node-b",
        ["/bin/sh", "-c", "echo main-ran"],
        initContainers=[{"name": "check", "command": ["/bin/sh", "-c", "exit 7"]}],
        restartPolicy="Never",
    )
    await create(api, body)

    obj = await eventually(lambda: _phase_is(api, "doomed", "Failed"))
    assert condition(obj, "Initialized") == "False"
    assert obj["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 7
    assert "waiting" in obj["status"]["containerStatuses"][0]["state"]
    assert "main-ran" not in sim.log_path("node-b", NS, "doomed").read_text()


# --------------------------------------------------------------------- securityContext


def _status_of(text: str) -> dict[str, str]:
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines()) if v}


async def _finished_log(sim: NodeSimulator, api: KubeApi, node: str, name: str) -> str:
    await eventually(lambda: _phase_is(api, name, "Succeeded"))
    return sim.log_path(node, NS, name).read_text()


SHOW_PRIVILEGES = (
    "grep -E '^(Uid|Gid|Groups|Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs):' /proc/self/status;"
    "if (echo x > /written-by-pod) 2>/dev/null; then echo 'Root: rw'; rm /written-by-pod; else echo 'Root: ro'; fi"
)


async def test_container_without_security_context_gets_the_runtime_default_capabilities_as_root(
    sim: NodeSimulator, api: KubeApi
) -> None:
    await create(api, pod("plain", "node-a", ["/bin/sh", "-c", SHOW_PRIVILEGES], restartPolicy="Never"))
    status = _status_of(await _finished_log(sim, api, "node-a", "plain"))
    default = capability_mask(RUNTIME_DEFAULT_CAPABILITIES)
    assert int(status["CapBnd"], 16) == int(status["CapEff"], 16) == int(status["CapPrm"], 16) == default
    assert int(status["CapInh"], 16) == int(status["CapAmb"], 16) == 0
    assert status["Uid"].split() == ["0"] * 4
    assert status["NoNewPrivs"] == "0"
    assert status["Root"] == "rw"


async def test_security_context_sets_user_groups_capabilities_no_new_privs_and_a_read_only_root(
    sim: NodeSimulator, api: KubeApi
) -> None:
    body = pod(
        "locked",
        "node-b",
        ["/bin/sh", "-c", SHOW_PRIVILEGES],
        restartPolicy="Never",
        securityContext={"runAsUser": 1234, "runAsGroup": 2345, "supplementalGroups": [3456]},
        container={
            "securityContext": {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE", "CAP_KILL"]},
            }
        },
    )
    await create(api, body)
    status = _status_of(await _finished_log(sim, api, "node-b", "locked"))
    assert int(status["CapBnd"], 16) == capability_mask(frozenset({"NET_BIND_SERVICE", "KILL"}))
    # a uid other than 0 holds none of them (no ambient capabilities, as in Kubernetes)
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 0
    assert status["Uid"].split() == ["1234"] * 4
    assert status["Gid"].split() == ["2345"] * 4
    assert status["Groups"].split() == ["3456"]
    assert status["NoNewPrivs"] == "1"
    assert status["Root"] == "ro"


async def test_exec_runs_with_the_container_privileges(sim: NodeSimulator, api: KubeApi) -> None:
    body = pod(
        "dropped",
        "node-a",
        ["sleep", "1000"],
        container={"securityContext": {"capabilities": {"drop": ["ALL"]}, "allowPrivilegeEscalation": False}},
    )
    await create(api, body)
    await eventually(lambda: running_ready(api, "dropped"))
    result = await sim.exec_in_pod(NS, "dropped", ["grep", "-E", "^(CapBnd|CapEff|NoNewPrivs):", "/proc/self/status"])
    assert result.returncode == 0
    status = _status_of(result.stdout)
    assert int(status["CapBnd"], 16) == int(status["CapEff"], 16) == 0
    assert status["NoNewPrivs"] == "1"


async def test_run_as_non_root_with_a_root_user_does_not_start(sim: NodeSimulator, api: KubeApi) -> None:
    body = pod("rootless", "node-a", ["true"], securityContext={"runAsNonRoot": True})
    await create(api, body)

    async def refused() -> dict[str, Any] | None:
        obj = await get_pod(api, "rootless")
        statuses = (obj.get("status") or {}).get("containerStatuses") or [{}]
        waiting = statuses[0].get("state", {}).get("waiting") or {}
        return waiting if waiting.get("reason") == "CreateContainerConfigError" else None

    waiting = await eventually(refused)
    assert "runAsNonRoot and image will run as root" in waiting["message"]
