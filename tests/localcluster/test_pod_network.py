"""Pod networking of the local cluster, specified by what a cluster user observes.

Pods have their own network namespace and IP (several pods on one node may use the same
port); a container that fails shows why in its status and Events, as with a kubelet;
Services route to the ready pods behind them from every node and pod and follow them
when they move. Real processes, real namespaces, real iptables; needs root (``netns``).
The fixture checks that namespaces, veths, routes and processes are gone afterwards,
also when a test fails.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from tests.localcluster.test_kubelet import alive, condition, eventually, get_pod, running_ready

from pairvol.aio import bounded
from pairvol.localcluster.cluster import LocalCluster
from pairvol.localcluster.kubelet import NodeSimulator
from pairvol.localcluster.kubelet_api import ApiError, KubeApi
from pairvol.localcluster.netns import run_command

pytestmark = [
    pytest.mark.netns,
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

NODES = ["node-a", "node-b", "node-c"]
NS = "default"

#: A TCP server that answers every connection with its pod's name.
ECHO = (
    "import os, socket\n"
    "s = socket.socket()\n"
    "s.bind(('0.0.0.0', int(os.environ['PORT'])))\n"
    "s.listen()\n"
    "print('listening on', os.environ['PORT'], flush=True)\n"
    "while True:\n"
    "    c, _ = s.accept()\n"
    "    c.sendall(os.environ['HOSTNAME'].encode() + b'\\n')\n"
    "    c.close()\n"
)

#: Connects to argv[1]:argv[2] and prints the first line, or the error's type.
CLIENT = (
    "import socket, sys\n"
    "try:\n"
    "    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)\n"
    "    print(s.makefile().readline().strip())\n"
    "except OSError as exc:\n"
    "    print(type(exc).__name__)\n"
)


@pytest.fixture
async def sim(cluster: LocalCluster, tmp_path: Path) -> AsyncIterator[NodeSimulator]:
    simulator = NodeSimulator(
        cluster.url,
        nodes=NODES,
        root=tmp_path / "nodes",
        status_interval=0.3,
        node_monitor_grace=1.5,
        backoff_base=0.2,
        config_retry=0.3,
    )
    async with simulator:
        yield simulator
    # Nothing of ours is left: pod and node namespaces (and the veths and iptables rules
    # that live in them), the bridge and the routes to the pod CIDRs through it.
    plan = simulator.net.plan
    assert plan is not None
    netns = await run_command(["ip", "netns", "list"])
    assert f"pvn{plan.token}-" not in netns.stdout
    links = await run_command(["ip", "-o", "link", "show"])
    assert plan.bridge not in links.stdout
    routes = await run_command(["ip", "-4", "route", "show"])
    assert not any(str(node.pod_cidr) in routes.stdout for node in plan.nodes)


def echo_pod(name: str, node: str, port: int, labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "echo",
        "image": "ignored",
        "command": [sys.executable, "-c", ECHO],
        "env": [{"name": "PORT", "value": str(port)}],
        "ports": [{"name": "echo", "containerPort": port, "protocol": "TCP"}],
        "readinessProbe": {"tcpSocket": {"port": "echo"}, "periodSeconds": 0.2},
    }
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": labels or {"test": name}},
        "spec": {"nodeName": node, "containers": [container], **spec},
    }


async def create(api: KubeApi, plural: str, obj: dict[str, Any]) -> dict[str, Any]:
    return await api.request("POST", f"/api/v1/namespaces/{NS}/{plural}", body=obj)


async def ask(sim: NodeSimulator, node: str, host: str, port: int) -> str:
    """Connect from ``node``'s own network namespace and read the first line."""
    reader, writer = await sim.net.open_connection(node, host, port, time_limit=3.0)
    try:
        return (await bounded(reader.readline(), 5)).decode().strip()
    finally:
        writer.close()


async def ask_from_pod(sim: NodeSimulator, pod: str, host: str, port: int) -> str:
    """Connect from inside a pod (its network namespace) and read the first line."""
    result = await sim.exec_in_pod(NS, pod, [sys.executable, "-c", CLIENT, host, str(port)], time_limit=15)
    assert result.returncode == 0, result
    return result.stdout.strip()


async def events_of(api: KubeApi, pod: str) -> list[dict[str, Any]]:
    listed = await api.request("GET", f"/api/v1/namespaces/{NS}/events")
    return [e for e in listed.get("items") or [] if (e.get("involvedObject") or {}).get("name") == pod]


# ---------------------------------------------------------------------------------------


async def test_two_pods_on_one_node_listen_on_the_same_port_each_on_its_own_ip(
    sim: NodeSimulator, api: KubeApi
) -> None:
    await create(api, "pods", echo_pod("first", "node-a", 7800))
    await create(api, "pods", echo_pod("second", "node-a", 7800))

    first = await eventually(lambda: running_ready(api, "first"))
    second = await eventually(lambda: running_ready(api, "second"))

    ips = [first["status"]["podIP"], second["status"]["podIP"]]
    assert ips[0] != ips[1]
    assert all(ipaddress.IPv4Address(ip) in ipaddress.IPv4Network(sim.net.pod_cidr("node-a")) for ip in ips)
    assert first["status"]["hostIP"] == second["status"]["hostIP"] == sim.node_ip("node-a")
    # each pod answers on its own address, from another node and from this machine
    assert await ask(sim, "node-b", ips[0], 7800) == "first"
    assert await ask(sim, "node-c", ips[1], 7800) == "second"
    reader, writer = await bounded(asyncio.open_connection(ips[1], 7800), 3)
    assert (await bounded(reader.readline(), 3)).strip() == b"second"
    writer.close()


async def test_a_port_clash_crash_loops_with_its_real_reason_in_status_and_events(
    sim: NodeSimulator, api: KubeApi
) -> None:
    # hostNetwork pods share their node's network: the second cannot bind the port
    await create(api, "pods", echo_pod("holder", "node-b", 7900, hostNetwork=True))
    await eventually(lambda: running_ready(api, "holder"))
    clash = echo_pod("clash", "node-b", 7900, hostNetwork=True)
    clash["spec"]["containers"][0]["terminationMessagePolicy"] = "FallbackToLogsOnError"
    await create(api, "pods", clash)

    async def crash_looping() -> dict[str, Any] | None:
        status = (await get_pod(api, "clash")).get("status") or {}
        statuses = status.get("containerStatuses") or [{}]
        waiting = (statuses[0].get("state") or {}).get("waiting") or {}
        return statuses[0] if waiting.get("reason") == "CrashLoopBackOff" and statuses[0]["restartCount"] >= 2 else None

    container = await eventually(crash_looping, within=30)

    terminated = container["lastState"]["terminated"]
    assert terminated["exitCode"] == 1 and terminated["reason"] == "Error"
    assert "Address already in use" in terminated["message"]
    assert "Traceback" in terminated["message"], "the last lines of its log"
    assert "back-off" in container["state"]["waiting"]["message"]
    pod = await get_pod(api, "clash")
    assert pod["status"]["phase"] == "Running" and condition(pod, "Ready") == "False"

    async def backoff_event() -> dict[str, Any] | None:
        found = [e for e in await events_of(api, "clash") if e["reason"] == "BackOff"]
        return found[0] if found else None

    event = await eventually(backoff_event)
    assert event["type"] == "Warning" and "Back-off restarting failed container echo" in event["message"]
    assert event["source"] == {"component": "kubelet", "host": "node-b"}
    started = [e for e in await events_of(api, "clash") if e["reason"] == "Started"]
    assert started and started[0]["count"] >= 2, "repeats are counted on one Event"


async def test_a_termination_message_file_is_reported_and_policy_file_ignores_the_log(
    sim: NodeSimulator, api: KubeApi, tmp_path: Path
) -> None:
    path = tmp_path / "termination" / "reason"
    script = f"echo 'noise in the log'; printf 'disk on fire' > {path}; exit 3"
    wrote = echo_pod("wrote", "node-c", 7000, restartPolicy="Never")
    wrote["spec"]["containers"][0].update(command=["/bin/sh", "-c", script], terminationMessagePath=str(path))
    silent = echo_pod("silent", "node-c", 7000, restartPolicy="Never")
    silent["spec"]["containers"][0].update(command=["/bin/sh", "-c", "echo 'only in the log'; exit 4"])
    await create(api, "pods", wrote)
    await create(api, "pods", silent)

    async def terminated(name: str) -> dict[str, Any] | None:
        status = (await get_pod(api, name)).get("status") or {}
        if status.get("phase") != "Failed":
            return None
        return dict(status["containerStatuses"][0]["state"]["terminated"])

    wrote_state = await eventually(lambda: terminated("wrote"))
    assert (wrote_state["exitCode"], wrote_state["message"]) == (3, "disk on fire")
    silent_state = await eventually(lambda: terminated("silent"))
    assert silent_state["exitCode"] == 4 and "message" not in silent_state  # policy File, nothing written
    # a finished pod keeps its address in the status; its network is gone
    assert (await get_pod(api, "silent"))["status"]["podIP"]


async def test_cluster_ip_routes_from_pods_and_nodes_and_follows_the_pod_when_it_moves(
    sim: NodeSimulator, api: KubeApi
) -> None:
    service = await create(
        api,
        "services",
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "echo", "namespace": NS},
            "spec": {
                "selector": {"app": "echo"},
                "ports": [{"name": "tcp", "port": 80, "targetPort": "echo", "protocol": "TCP"}],
            },
        },
    )
    cluster_ip = service["spec"]["clusterIP"]
    await create(api, "pods", echo_pod("client", "node-b", 7000))
    await create(api, "pods", echo_pod("backend-1", "node-a", 9000, labels={"app": "echo"}))
    await eventually(lambda: running_ready(api, "client"))
    backend = await eventually(lambda: running_ready(api, "backend-1"))

    async def answer(from_pod: str, expected: str) -> str | None:
        got = await ask_from_pod(sim, from_pod, cluster_ip, 80)
        return got if got == expected else None

    # from a pod on another node, and from a node's own network (a hostNetwork client)
    await eventually(lambda: answer("client", "backend-1"))
    assert await ask(sim, "node-c", cluster_ip, 80) == "backend-1"
    assert await ask(sim, "node-a", cluster_ip, 80) == "backend-1"  # same node as the endpoint

    endpoints = await api.request("GET", f"/api/v1/namespaces/{NS}/endpoints/echo")
    (subset,) = endpoints["subsets"]
    assert [a["ip"] for a in subset["addresses"]] == [backend["status"]["podIP"]]
    assert subset["ports"] == [{"name": "tcp", "port": 9000, "protocol": "TCP"}]
    slices = await api.request(
        "GET",
        f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices",
        params={"labelSelector": "kubernetes.io/service-name=echo"},
    )
    (slice_,) = slices["items"]
    assert [e["addresses"] for e in slice_["endpoints"]] == [[backend["status"]["podIP"]]]

    # the pod goes: no endpoint, and clients are refused at once rather than left hanging
    await api.request("DELETE", f"/api/v1/namespaces/{NS}/pods/backend-1")
    started = time.monotonic()
    await eventually(lambda: answer("client", "ConnectionRefusedError"), within=20)
    assert time.monotonic() - started < 20

    # it comes back on another node: the same address leads there
    await create(api, "pods", echo_pod("backend-2", "node-c", 9000, labels={"app": "echo"}))
    await eventually(lambda: running_ready(api, "backend-2"))
    await eventually(lambda: answer("client", "backend-2"))
    assert await ask(sim, "node-a", cluster_ip, 80) == "backend-2"


async def test_a_headless_service_gets_endpoints_also_for_pods_not_ready_when_it_publishes_them(
    sim: NodeSimulator, api: KubeApi
) -> None:
    await create(
        api,
        "services",
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "agents", "namespace": NS},
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": True,
                "selector": {"app": "agent"},
                "ports": [{"name": "api", "port": 7800, "targetPort": "echo"}],
            },
        },
    )
    never_ready = echo_pod("agent-1", "node-a", 7800, labels={"app": "agent"})
    never_ready["spec"]["containers"][0]["readinessProbe"] = {"tcpSocket": {"port": 1}, "periodSeconds": 0.2}
    await create(api, "pods", never_ready)

    async def published() -> list[str] | None:
        try:
            endpoints = await api.request("GET", f"/api/v1/namespaces/{NS}/endpoints/agents")
        except ApiError:
            return None
        addresses = [a["ip"] for s in endpoints.get("subsets") or [] for a in s.get("addresses") or []]
        return addresses or None

    addresses = await eventually(published)
    pod = await get_pod(api, "agent-1")
    assert addresses == [pod["status"]["podIP"]] and condition(pod, "Ready") != "True"
    # and it is deleted with its Service
    await api.request("DELETE", f"/api/v1/namespaces/{NS}/services/agents")

    async def endpoints_gone() -> bool:
        try:
            await api.request("GET", f"/api/v1/namespaces/{NS}/endpoints/agents")
        except ApiError as exc:
            return exc.status == 404
        return False

    await eventually(endpoints_gone)


async def test_a_command_that_does_not_exist_is_a_start_error_with_its_reason(sim: NodeSimulator, api: KubeApi) -> None:
    body = echo_pod("typo", "node-a", 7000)
    body["spec"]["containers"][0]["command"] = ["pairvoll", "agent"]
    await create(api, "pods", body)

    async def refused() -> dict[str, Any] | None:
        statuses = ((await get_pod(api, "typo")).get("status") or {}).get("containerStatuses") or [{}]
        last = (statuses[0].get("lastState") or {}).get("terminated") or {}
        return last if last.get("reason") == "StartError" else None

    last = await eventually(refused)
    assert last["exitCode"] == 128
    assert last["message"] == 'exec: "pairvoll": executable file not found in $PATH'
    failed = [e for e in await events_of(api, "typo") if e["reason"] == "Failed"]
    assert failed and failed[0]["type"] == "Warning" and "pairvoll" in failed[0]["message"]


async def test_everything_is_removed_when_the_user_of_the_simulator_fails(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    simulator = NodeSimulator(cluster.url, nodes=["node-a", "node-b"], root=tmp_path / "n", status_interval=0.3)
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="the test failed"):
        async with simulator, KubeApi(cluster.url) as client:
            await create(client, "pods", echo_pod("a", "node-a", 7000))
            await create(client, "pods", echo_pod("b", "node-a", 7000))
            await eventually(lambda: running_ready(client, "b"))
            pids = simulator.node_pids("node-a")
            raise RuntimeError("the test failed")
    assert pids and not [pid for pid in pids if alive(pid)]
    assert simulator.net.plan is not None
    netns = await run_command(["ip", "netns", "list"])
    assert f"pvn{simulator.net.plan.token}-" not in netns.stdout
    links = await run_command(["ip", "-o", "link", "show"])
    assert simulator.net.plan.bridge not in links.stdout


async def test_a_removed_pod_leaves_no_interface_on_its_node_even_while_its_namespace_lingers(
    sim: NodeSimulator,
) -> None:
    # A namespace lives on after `ip netns del` while anything holds it: a socket made in it
    # does (a killed agent's TCP connection retransmitting its FIN to a partitioned peer, for
    # minutes). Its interface must not stay on the node's bridge with the pod's address, or
    # the pod replacing it shares that address with a dead namespace.
    net = sim.net
    assert net.plan is not None
    node_ns = next(n.netns for n in net.plan.nodes if n.node == "node-a")
    old = await net.add_pod("node-a")
    holder = os.open(f"/run/netns/{old.netns}", os.O_RDONLY)
    try:
        await net.remove_pod(old)
        veth = await run_command(["ip", "-n", node_ns, "link", "show", old.node_veth], check=False)
        assert veth.returncode != 0, veth.stdout
        inside = await run_command(["nsenter", f"--net=/proc/{os.getpid()}/fd/{holder}", "ip", "-4", "-o", "addr"])
        assert str(old.ip) not in inside.stdout, "the lingering namespace still has the pod's address"
        new = await net.add_pod("node-a")
        try:
            assert new.ip != old.ip, "a freed address is handed out again only after the others"
            bridge = await run_command(["ip", "-n", node_ns, "-o", "link", "show", "master", "cbr0"])
            assert old.node_veth not in bridge.stdout and new.node_veth in bridge.stdout
        finally:
            await net.remove_pod(new)
    finally:
        os.close(holder)


async def test_a_partitioned_node_keeps_its_last_rules_until_it_is_healed(sim: NodeSimulator, api: KubeApi) -> None:
    await create(
        api,
        "services",
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "echo", "namespace": NS},
            "spec": {"selector": {"app": "echo"}, "ports": [{"port": 80, "targetPort": 9000}]},
        },
    )
    await create(api, "pods", echo_pod("backend-1", "node-a", 9000, labels={"app": "echo"}))
    old_ip = (await eventually(lambda: running_ready(api, "backend-1")))["status"]["podIP"]

    async def node_dnats_to(node: str, ip: str) -> bool:
        rules = await sim.run_in_node(node, ["iptables-save", "-t", "nat"])
        return f"--to-destination {ip}:9000" in rules.stdout

    await eventually(lambda: node_dnats_to("node-c", old_ip))
    await sim.partition_node("node-c")
    await api.request("DELETE", f"/api/v1/namespaces/{NS}/pods/backend-1")
    await create(api, "pods", echo_pod("backend-2", "node-b", 9000, labels={"app": "echo"}))
    new_ip = (await eventually(lambda: running_ready(api, "backend-2")))["status"]["podIP"]
    await eventually(lambda: node_dnats_to("node-a", new_ip))
    # cut off from the API server, node-c's proxy knows nothing of the move
    assert await node_dnats_to("node-c", old_ip) and not await node_dnats_to("node-c", new_ip)

    await sim.heal_node("node-c")
    await eventually(lambda: node_dnats_to("node-c", new_ip))
    assert not await node_dnats_to("node-c", old_ip)


async def test_service_and_pod_names_resolve_inside_pods_through_the_cluster_dns(
    sim: NodeSimulator, api: KubeApi
) -> None:
    for name, cluster_ip in (("echo", None), ("echo-peers", "None")):
        spec: dict[str, Any] = {
            "selector": {"app": "echo"},
            "ports": [{"name": "tcp", "port": 80, "targetPort": "echo", "protocol": "TCP"}],
        }
        if cluster_ip:
            spec["clusterIP"] = cluster_ip
        metadata = {"name": name, "namespace": NS}
        await create(api, "services", {"apiVersion": "v1", "kind": "Service", "metadata": metadata, "spec": spec})
    await create(api, "pods", echo_pod("client", "node-b", 7000))
    peer = {"hostname": "backend-0", "subdomain": "echo-peers"}
    backend = echo_pod("backend-0", "node-a", 9000, labels={"app": "echo"}, **peer)
    await create(api, "pods", backend)
    await eventually(lambda: running_ready(api, "client"))
    await eventually(lambda: running_ready(api, "backend-0"))

    async def answer(host: str, port: int, expected: str) -> str | None:
        got = await ask_from_pod(sim, "client", host, port)
        return got if got == expected else None

    # the short name finds the Service of the pod's own namespace, as do the longer forms
    for host in ("echo", f"echo.{NS}", f"echo.{NS}.svc", f"echo.{NS}.svc.cluster.local"):
        await eventually(lambda host=host: answer(host, 80, "backend-0"))  # type: ignore[misc]
    # a headless Service's name is its pods' addresses; a StatefulSet-style pod has its own
    await eventually(lambda: answer("echo-peers", 9000, "backend-0"))
    await eventually(lambda: answer("backend-0.echo-peers", 9000, "backend-0"))
    assert await ask_from_pod(sim, "client", "no-such-service", 80) == "gaierror"

    conf = await sim.exec_in_pod(NS, "client", ["cat", "/etc/resolv.conf"])
    assert f"search {NS}.svc.cluster.local svc.cluster.local cluster.local" in conf.stdout
    # a hostNetwork pod keeps the node's resolver
    await create(api, "pods", echo_pod("on-host", "node-c", 7100, hostNetwork=True))
    await eventually(lambda: running_ready(api, "on-host"))
    host_conf = await sim.exec_in_pod(NS, "on-host", ["cat", "/etc/resolv.conf"])
    assert host_conf.stdout == await asyncio.to_thread(Path("/etc/resolv.conf").read_text)
