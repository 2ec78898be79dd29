"""The CSI node plugin lives and dies with its node, on the local cluster.

A node that is killed takes its node plugin with it, and everything the plugin had built
there: the attachers (their NBD connections to the volume's export), the loop devices, the
mounts. Nothing of a dead node can reach a volume afterwards. The pod that used the volume
on it is replaced on another node (a StatefulSet's pod, force-deleted as an administrator
does for a node that is gone), which stages the volume at once and finds every record the
old pod had fsynced. The node powered on again starts its plugin, which finds the
attachment the node left on disk and removes it; a pod still bound to it gets its volume
staged anew. A crash of the plugin alone changes nothing for a pod: the attachment is not
the plugin's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest
from tests.e2e.test_e2e_csi import (  # noqa: F401 - the csi fixture
    FS_SIZE,
    PREFIX_VERIFIER,
    RECOVERING_WRITER,
    STREAM_WRITER,
    acked_at_least,
    claimed,
    csi,
    delete_pod,
    finished,
    kubectl,
    node_mounts,
    pod,
    pod_log,
    records_acked,
    until_writing,
)

from pairvol.localcluster.csi_plugins import LocalCsi
from pairvol.localcluster.demo import Stack

pytestmark = pytest.mark.timeout(150)

PODS = "/api/v1/namespaces/default/pods"


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def loop_devices_under(root: Path) -> list[str]:
    proc = await asyncio.create_subprocess_exec(
        "losetup", "--noheadings", "--output", "NAME,BACK-FILE", "--list", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    return [
        ln.split()[0]
        for ln in out.decode().splitlines()
        if len(ln.split()) > 1 and ln.split()[1].startswith(f"{root}/")
    ]


def statefulset(name: str, claim: str, script: str) -> dict[str, Any]:
    template = pod(name, "", claim, script, "0")["spec"]
    del template["nodeName"]  # the scheduler places it
    template["restartPolicy"] = "Always"
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "replicas": 1,
            "serviceName": name,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": template},
        },
    }


async def test_a_killed_node_takes_its_attachments_with_it_and_its_pod_moves_to_another_node(
    stack: Stack,
    csi: LocalCsi,  # noqa: F811
) -> None:
    pv_name = await claimed(stack, "data", "Filesystem", FS_SIZE)
    st = await stack.status(pv_name)
    replicas = {st["primary"]["node"], st["secondary"]["node"]}
    await stack.kube.create(
        "/apis/apps/v1/namespaces/default/statefulsets", statefulset("db", "data", RECOVERING_WRITER)
    )

    async def db_pod() -> dict[str, Any] | None:
        got = await stack.kube.get_or_none(f"{PODS}/db-0")
        return got if got and got["spec"].get("nodeName") and not got["metadata"].get("deletionTimestamp") else None

    first = await stack.wait_for("db-0 scheduled", db_pod, 30)
    doomed = first["spec"]["nodeName"]
    # the scheduler puts it on the node without agents: killing that node is no failover
    assert doomed not in replicas, f"db-0 went to {doomed}, a replica's node"

    def acked(node: str) -> Awaitable[int]:
        return records_acked(stack, node, "db-0")

    def at_least(node: str, n: int) -> Awaitable[int | None]:
        return acked_at_least(stack, node, "db-0", n)

    await until_writing(stack, "db-0", "db-0's first records", lambda: at_least(doomed, 20), 30)
    plugin = csi.node_plugins[doomed].proc.pid
    (pidfile,) = csi.state_dir(doomed).glob("*/attacher.pid")
    attacher = int(pidfile.read_text())
    assert running(plugin) and running(attacher)

    await stack.sim.kill_node(doomed)
    fsynced = await acked(doomed)
    # nothing of the dead node can reach the volume: its plugin and attacher are gone, and
    # so are the loop device and the mounts a power-off takes with it
    assert not running(plugin) and not running(attacher)
    assert await node_mounts(csi, doomed) == []
    assert await loop_devices_under(csi.state_dir(doomed)) == []
    assert csi.staged_on(f"default/{pv_name}") == [], "the dead node's kubelet holds the volume no more"
    assert [p.parent.name for p in csi.state_dir(doomed).glob("*/attachment.json")] == [f"default_{pv_name}"], (
        "the attachment's record stays on the node's disk"
    )

    async def not_ready() -> bool:
        node = await stack.kube.get(f"/api/v1/nodes/{doomed}")
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        return ready[0]["status"] == "Unknown"

    await stack.wait_for(f"{doomed} NotReady", not_ready, 15)
    code, _, err = await kubectl(stack, "delete", "pod", "db-0", "--force", "--grace-period=0")
    assert code == 0, err

    async def replaced() -> dict[str, Any] | None:
        got = await db_pod()
        return got if got and got["metadata"]["uid"] != first["metadata"]["uid"] else None

    second = await stack.wait_for("db-0 replaced", replaced, 15)
    moved = second["spec"]["nodeName"]
    assert moved != doomed

    async def recovered() -> int | None:
        lines = (await pod_log(stack, moved, "db-0")).splitlines()
        found = [int(ln.split()[1]) for ln in lines if ln.startswith("recovered ")]
        return found[0] if found and await acked(moved) >= found[0] + 5 else None

    count = await until_writing(stack, "db-0", f"db-0 on {moved} recovering the log", recovered, 30)
    assert count >= fsynced, f"{count} records found on {moved}; {fsynced} were fsynced on {doomed}"

    # powered on again: a new plugin, which removes the attachment the node left behind
    await stack.sim.restart_node(doomed)
    again = csi.node_plugins[doomed].proc.pid
    assert again != plugin and running(again)
    assert list(csi.state_dir(doomed).glob("*/attachment.json")) == []
    csinode = await stack.kube.get(f"/apis/storage.k8s.io/v1/csinodes/{doomed}")
    assert csinode["spec"]["drivers"][0]["nodeID"] == doomed


async def test_a_node_powered_on_again_mounts_its_pods_volume_anew(stack: Stack, csi: LocalCsi) -> None:  # noqa: F811
    pv_name = await claimed(stack, "data", "Filesystem", FS_SIZE)
    st = await stack.status(pv_name)
    (node,) = sorted(set(stack.sim.node_names) - {st["primary"]["node"], st["secondary"]["node"]})
    app = pod("app", node, "data", RECOVERING_WRITER, "0")
    app["spec"]["restartPolicy"] = "Always"
    await stack.kube.create(PODS, app)

    async def log_lines(prefix: str) -> list[int]:
        lines = (await pod_log(stack, node, "app")).splitlines()
        return [int(ln.split()[1]) for ln in lines if ln.startswith(prefix)]

    async def acked_at_least(n: int) -> int | None:
        acks = await log_lines("acked ")
        return acks[-1] + 1 if acks and acks[-1] + 1 >= n else None

    await until_writing(stack, "app", "the pod's first records", lambda: acked_at_least(20), 30)
    await stack.sim.kill_node(node)
    fsynced = (await log_lines("acked "))[-1] + 1
    assert await node_mounts(csi, node) == []

    # the pod is still bound to the node: powered on, the node runs it again; its new plugin
    # removed what the old one had left, and the kubelet stages the volume anew
    await stack.sim.restart_node(node)

    async def recovered_again() -> int | None:
        found = await log_lines("recovered ")
        return found[1] if len(found) == 2 and await acked_at_least(found[1] + 5) else None

    count = await until_writing(stack, "app", "the pod recovering its log after the restart", recovered_again, 30)
    assert count >= fsynced, f"{count} records after the restart; {fsynced} were fsynced before the power-off"
    assert await node_mounts(csi, node), "the volume is mounted on the node again"


async def test_a_node_plugin_crashing_under_a_mounted_volume_changes_nothing_for_the_pod(
    stack: Stack,
    csi: LocalCsi,  # noqa: F811
) -> None:
    """The attachment is the attacher's, and the attacher is the attacher host's, in the
    node pod's other container: the node plugin's container dies (every process in its
    cgroup SIGKILLed, as the container runtime does) and starts again, the pod writes on,
    and the new plugin tears down what the old one built when the pod goes."""
    pv_name = await claimed(stack, "data", "Filesystem", FS_SIZE)
    st = await stack.status(pv_name)
    (node,) = sorted(set(stack.sim.node_names) - {st["primary"]["node"], st["secondary"]["node"]})
    await stack.kube.create(PODS, pod("writer", node, "data", STREAM_WRITER, "0"))

    def acked() -> Awaitable[int]:
        return records_acked(stack, node, "writer")

    def at_least(n: int) -> Awaitable[int | None]:
        return acked_at_least(stack, node, "writer", n)

    await until_writing(stack, "writer", "the writer's first records", lambda: at_least(20), 30)
    (pidfile,) = csi.state_dir(node).glob("*/attacher.pid")
    attacher = int(pidfile.read_text())
    old = csi.node_plugins[node].proc.pid
    host = csi.attacher_hosts[node].proc.pid
    await csi.crash_node_plugin(node)
    assert not running(old) and running(csi.node_plugins[node].proc.pid)
    assert running(attacher), "the attacher outlives the plugin's container"
    assert csi.attacher_hosts[node].proc.pid == host and running(host)
    before = await acked()
    await stack.wait_for("records written after the plugin's crash", lambda: at_least(before + 20), 30)
    assert "Error" not in await pod_log(stack, node, "writer")

    await delete_pod(stack, "writer")  # unpublished and unstaged by the new plugin
    assert await node_mounts(csi, node) == []
    assert not running(attacher) and await loop_devices_under(csi.state_dir(node)) == []
    written = await acked()
    survivor = st["secondary"]["node"]
    await stack.kube.create(PODS, pod("reader", survivor, "data", PREFIX_VERIFIER, str(written)))
    log = await finished(stack, survivor, "reader")
    assert int(log.split()[-1]) >= written
