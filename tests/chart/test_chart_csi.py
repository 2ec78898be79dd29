"""The chart's CSI driver objects (``csi.enabled``): what the kubelet and the sidecars need,
with the privileges pairvol.csi.manifests states and nothing more, and a StorageClass the
driver itself accepts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from chart_support import Obj, helm_template, kinds, one, render

from pairvol.csi.manifests import (
    ATTACHER_HOST_CONTAINER,
    ATTACHER_HOST_SOCKET,
    NODE_PLUGIN_CONTAINER,
    attacher_host_security_context,
    controller_security_context,
    node_pod,
    node_security_context,
)
from pairvol.csi.params import volume_request

VALUES: dict[str, Any] = {
    "watchNamespaces": ["apps"],
    "csi": {
        "enabled": True,
        "volumeNamespace": "apps",
        "storageClass": {"create": True, "parameters": {"checkpointIntervalSeconds": "5", "peerTimeoutSeconds": "3"}},
    },
}


@pytest.fixture
def objs(tmp_path: Path) -> list[Obj]:
    return render(VALUES, tmp=tmp_path)


def containers(obj: Obj) -> dict[str, Obj]:
    return {c["name"]: c for c in obj["spec"]["template"]["spec"]["containers"]}


def test_the_driver_is_off_by_default(tmp_path: Path) -> None:
    objs = render(tmp=tmp_path)
    assert not kinds(objs, "CSIDriver") and not kinds(objs, "DaemonSet") and not kinds(objs, "StorageClass")


def test_csidriver_needs_no_attach_step(objs: list[Obj]) -> None:
    driver = one(objs, "CSIDriver", "pairvol.io")
    assert driver["spec"]["attachRequired"] is False
    assert driver["spec"]["volumeLifecycleModes"] == ["Persistent"]


def test_node_plugin_runs_with_the_stated_privileges_and_shares_its_mounts(objs: list[Obj]) -> None:
    ds = one(objs, "DaemonSet")
    c = containers(ds)
    assert c["csi-node"]["securityContext"] == node_security_context()
    mounts = {m["name"]: m for m in c["csi-node"]["volumeMounts"]}
    assert mounts["kubelet-dir"]["mountPropagation"] == "Bidirectional"
    assert mounts["state-dir"]["mountPropagation"] == "Bidirectional"
    assert mounts["dev"]["mountPath"] == "/dev"
    # its token reads the volumes' replication state, nothing else
    account = ds["spec"]["template"]["spec"]["serviceAccountName"]
    assert ds["spec"]["template"]["spec"].get("automountServiceAccountToken", True) is True
    (binding,) = [o for o in objs if o["kind"] == "RoleBinding" and o["subjects"][0]["name"] == account]
    role = one(objs, "Role", binding["roleRef"]["name"])
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"]
    assert role["rules"] == [{"apiGroups": ["pairvol.io"], "resources": ["replicatedvolumes"], "verbs": ["get"]}]
    assert not [o for o in objs if o["kind"] == "ClusterRoleBinding" and o["subjects"][0]["name"] == account]
    for name in ("node-driver-registrar", "liveness-probe"):
        ctx = c[name]["securityContext"]
        assert ctx["capabilities"] == {"drop": ["ALL"]} and ctx["allowPrivilegeEscalation"] is False
    registrar = c["node-driver-registrar"]["args"]
    assert "--kubelet-registration-path=/var/lib/kubelet/plugins/pairvol.io/csi.sock" in registrar


def test_the_attachers_run_in_a_container_of_their_own_that_the_node_plugin_asks(objs: list[Obj]) -> None:
    ds = one(objs, "DaemonSet")
    c = containers(ds)
    host, plugin = c[ATTACHER_HOST_CONTAINER], c[NODE_PLUGIN_CONTAINER]
    # the privileges pairvol.csi.manifests states (the local cluster starts it with them)
    assert host["securityContext"] == attacher_host_security_context()
    assert {x["name"] for x in node_pod("n")["spec"]["containers"]} == {ATTACHER_HOST_CONTAINER, NODE_PLUGIN_CONTAINER}
    assert host["image"] == plugin["image"] and host["args"][:2] == ["csi", "attacher-host"]
    # it mounts the node plugin's state directory, nothing else, and its FUSE exports
    # propagate to the node (and from there into the node plugin's container)
    (mount,) = host["volumeMounts"]
    state = "/var/lib/pairvol-csi"
    assert mount == {"name": "state-dir", "mountPath": state, "mountPropagation": "Bidirectional"}
    assert {"name": "state-dir", "mountPath": state, "mountPropagation": "Bidirectional"} in plugin["volumeMounts"]
    # both name the same socket, in the state directory
    socket = f"{state}/{ATTACHER_HOST_SOCKET}"
    assert f"--socket={socket}" in host["args"] and f"--state-dir={state}" in host["args"]
    assert f"--attacher-host=unix://{socket}" in plugin["args"]
    # a restart would kill every attacher of the node: no liveness probe may cause one
    assert "livenessProbe" not in host


def test_node_pods_are_replaced_only_when_deleted_unless_told_otherwise(tmp_path: Path) -> None:
    ds = one(render(VALUES, tmp=tmp_path), "DaemonSet")
    assert ds["spec"]["updateStrategy"] == {"type": "OnDelete"}
    rolling = {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    values = {**VALUES, "csi": {**VALUES["csi"], "node": {"updateStrategy": rolling}}}
    ds = one(render(values, tmp=tmp_path), "DaemonSet")
    assert ds["spec"]["updateStrategy"] == rolling


def test_the_attach_transport_reaches_the_node_plugin_and_only_known_ones_are_accepted(tmp_path: Path) -> None:
    ds = one(render(VALUES, tmp=tmp_path), "DaemonSet")
    assert "--attach-transport=fuse" in containers(ds)["csi-node"]["args"]
    values = {**VALUES, "csi": {**VALUES["csi"], "node": {"attachTransport": "auto"}}}
    ds = one(render(values, tmp=tmp_path), "DaemonSet")
    assert "--attach-transport=auto" in containers(ds)["csi-node"]["args"]
    values = {**VALUES, "csi": {**VALUES["csi"], "node": {"attachTransport": "iscsi"}}}
    refused = helm_template(values, tmp=tmp_path, check=False)
    assert refused.returncode != 0 and "attachTransport" in refused.stderr


def test_the_unstage_flush_timeout_reaches_the_node_plugin_and_must_be_positive(tmp_path: Path) -> None:
    ds = one(render(VALUES, tmp=tmp_path), "DaemonSet")
    assert "--unstage-flush-timeout=120" in containers(ds)["csi-node"]["args"]
    values = {**VALUES, "csi": {**VALUES["csi"], "node": {"unstageFlushTimeoutSeconds": 30}}}
    ds = one(render(values, tmp=tmp_path), "DaemonSet")
    assert "--unstage-flush-timeout=30" in containers(ds)["csi-node"]["args"]
    values = {**VALUES, "csi": {**VALUES["csi"], "node": {"unstageFlushTimeoutSeconds": 0}}}
    refused = helm_template(values, tmp=tmp_path, check=False)
    assert refused.returncode != 0 and "unstageFlushTimeoutSeconds" in refused.stderr


def test_controller_containers_are_unprivileged_and_wait_less_than_the_provisioner(objs: list[Obj]) -> None:
    deploy = one(objs, "Deployment", "pv-pairvol-csi-controller")
    c = containers(deploy)
    for container in c.values():
        assert container["securityContext"] == controller_security_context(), container["name"]
    args = c["csi-controller"]["args"]
    assert "--volume-namespace=apps" in args
    ready = int(next(a for a in args if a.startswith("--ready-timeout=")).split("=")[1])
    timeout = next(a for a in c["csi-provisioner"]["args"] if a.startswith("--timeout="))
    assert int(timeout.removeprefix("--timeout=").removesuffix("s")) > ready


def test_the_driver_may_manage_only_replicated_volumes_in_their_namespace(objs: list[Obj]) -> None:
    role = one(objs, "Role", "pv-pairvol-csi-volumes", "apps")
    assert role["rules"] == [
        {"apiGroups": ["pairvol.io"], "resources": ["replicatedvolumes"], "verbs": ["get", "create", "delete", "patch"]}
    ]
    for sidecar in ("provisioner", "resizer"):
        rules = one(objs, "ClusterRole", f"pv-pairvol-csi-{sidecar}")["rules"]
        assert all("*" not in r["verbs"] and "*" not in r["resources"] for r in rules)
        assert not any("secrets" in r["resources"] for r in rules)
    resizer = one(objs, "ClusterRole", "pv-pairvol-csi-resizer")["rules"]
    assert {"apiGroups": [""], "resources": ["persistentvolumeclaims/status"], "verbs": ["patch"]} in resizer
    binding = one(objs, "ClusterRoleBinding", "pv-pairvol-csi-resizer")
    assert binding["subjects"][0]["name"] == "pv-pairvol-csi-controller"


def test_sidecars_are_pinned_sig_storage_images(objs: list[Obj]) -> None:
    images = [c["image"] for o in objs if o["kind"] in ("Deployment", "DaemonSet") for c in containers(o).values()]
    sidecars = [i for i in images if "sig-storage" in i]
    assert len(sidecars) == 5  # provisioner, resizer, registrar, two liveness probes
    assert "registry.k8s.io/sig-storage/csi-resizer:v1.13.1" in sidecars
    for image in sidecars:
        assert image.startswith("registry.k8s.io/sig-storage/") and ":v" in image, image


def test_storage_class_hands_the_volume_key_to_the_node_and_passes_the_driver_checks(objs: list[Obj]) -> None:
    sc = one(objs, "StorageClass", "pairvol")
    assert sc["provisioner"] == "pairvol.io"
    assert sc["allowVolumeExpansion"] is True  # claims grow online (docs/csi.md, Expansion)
    params = sc["parameters"]
    assert params["csi.storage.k8s.io/node-stage-secret-name"] == "pairvol-${pv.name}-export"
    assert params["csi.storage.k8s.io/node-stage-secret-namespace"] == "apps"
    spec = volume_request("pvc-0b7e9d2c-4f51-4b8e-9a43-1f6a5c1d2e3f", 1 << 30, params).spec
    assert spec["checkpoint"] == {"intervalSeconds": 5} and spec["replication"] == {"peerTimeoutSeconds": 3}


def test_the_provisioners_topology_feature_may_read_nodes_and_csinodes(objs: list[Obj]) -> None:
    """--feature-gates=Topology=true builds the accessibility requirements from the Nodes'
    topology labels and the CSINodes' topology keys (informers on both)."""
    (deployment,) = [d for d in kinds(objs, "Deployment") if "csi-provisioner" in containers(d)]
    args = containers(deployment)["csi-provisioner"]["args"]
    assert "--feature-gates=Topology=true" in args
    # an Immediate claim without allowedTopologies: no requirement, the operator places it by load
    assert "--immediate-topology=false" in args
    role = one(objs, "ClusterRole", "pv-pairvol-csi-provisioner")
    granted = {
        (group, resource): set(rule["verbs"])
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert {"get", "list", "watch"} <= granted[("", "nodes")]
    assert {"get", "list", "watch"} <= granted[("storage.k8s.io", "csinodes")]


def test_the_storage_class_binds_immediately_unless_told_to_wait_for_the_first_consumer(tmp_path: Path) -> None:
    assert one(render(VALUES, tmp=tmp_path), "StorageClass", "pairvol")["volumeBindingMode"] == "Immediate"
    storage_class = {"create": True, "volumeBindingMode": "WaitForFirstConsumer"}
    waiting = {**VALUES, "csi": {**VALUES["csi"], "storageClass": storage_class}}
    assert one(render(waiting, tmp=tmp_path), "StorageClass", "pairvol")["volumeBindingMode"] == "WaitForFirstConsumer"
