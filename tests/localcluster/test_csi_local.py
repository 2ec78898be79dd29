"""The local cluster's CSI machinery, the parts decided without I/O: what the provisioner
asks CreateVolume for and the PV it writes, what the kubelet stages, the service names the
node plugins resolve, and the pvc-protection rule. The whole flow runs in
tests/e2e/test_e2e_csi.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from pairvol.localcluster.csi_plugins import csinode_object, hosts_file, mounts_under
from pairvol.localcluster.csi_provisioner import (
    ProvisionError,
    claim_in_use,
    claim_size,
    create_request,
    node_topologies,
    pv_object,
    resolve_template,
    static_binding_problem,
)
from pairvol.localcluster.kubelet_csi import CsiVolume, VolumeNotReady, csi_volume, publish_path, staging_path
from pairvol.localcluster.kubelet_pods import (
    Mount,
    PodConfigError,
    VolumeClaim,
    VolumeDevice,
    VolumeDir,
    plan_devices,
    plan_mounts,
    plan_volumes,
)

CLAIM: dict[str, Any] = {
    "metadata": {"name": "data", "namespace": "apps", "uid": "1234"},
    "spec": {
        "storageClassName": "pairvol",
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "64Mi"}},
    },
}

CLASS: dict[str, Any] = {
    "metadata": {"name": "pairvol"},
    "provisioner": "pairvol.io",
    "reclaimPolicy": "Delete",
    "parameters": {
        "csi.storage.k8s.io/node-stage-secret-name": "pairvol-${pv.name}",
        "csi.storage.k8s.io/node-stage-secret-namespace": "${pvc.namespace}",
        "csi.storage.k8s.io/fstype": "xfs",
        "checkpointIntervalSeconds": "5",
    },
}


def with_spec(claim: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {**claim, "spec": {**claim["spec"], **spec}}


def test_create_volume_carries_the_class_parameters_without_the_sidecar_keys_plus_the_claim() -> None:
    request, secret_ref = create_request(CLAIM, CLASS, "pvc-1234")
    assert request["name"] == "pvc-1234"
    assert request["capacityRange"] == {"requiredBytes": str(64 << 20)}
    assert request["volumeCapabilities"] == [{"mount": {"fsType": "xfs"}, "accessMode": {"mode": "SINGLE_NODE_WRITER"}}]
    assert request["parameters"] == {
        "checkpointIntervalSeconds": "5",
        "csi.storage.k8s.io/pvc/name": "data",
        "csi.storage.k8s.io/pvc/namespace": "apps",
        "csi.storage.k8s.io/pv/name": "pvc-1234",
    }
    assert secret_ref == ("apps", "pairvol-pvc-1234")


def test_defaults_and_block_mode() -> None:
    plain = {**CLASS, "parameters": {}}
    request, secret_ref = create_request(with_spec(CLAIM, accessModes=["ReadWriteOncePod"]), plain, "pvc-1")
    assert request["volumeCapabilities"][0] == {
        "mount": {"fsType": "ext4"},  # the chart's --default-fstype
        "accessMode": {"mode": "SINGLE_NODE_SINGLE_WRITER"},
    }
    assert secret_ref is None
    request, _ = create_request(with_spec(CLAIM, volumeMode="Block"), CLASS, "pvc-1")
    assert request["volumeCapabilities"][0] == {"block": {}, "accessMode": {"mode": "SINGLE_NODE_WRITER"}}


@pytest.mark.parametrize(
    ("claim", "klass", "message"),
    [
        (with_spec(CLAIM, accessModes=["ReadWriteSometimes"]), CLASS, "accessModes"),
        (with_spec(CLAIM, resources={}), CLASS, "resources.requests.storage"),
        (with_spec(CLAIM, resources={"requests": {"storage": "lots"}}), CLASS, "not a Kubernetes quantity"),
        (CLAIM, {**CLASS, "parameters": {"csi.storage.k8s.io/provisioner-secret-name": "x"}}, "not handled"),
        (CLAIM, {**CLASS, "parameters": {"csi.storage.k8s.io/node-stage-secret-name": "x"}}, "go together"),
        (
            CLAIM,
            {
                **CLASS,
                "parameters": {
                    "csi.storage.k8s.io/node-stage-secret-name": "${pvc.annotations['x']}",
                    "csi.storage.k8s.io/node-stage-secret-namespace": "apps",
                },
            },
            "unknown variable",
        ),
    ],
)
def test_a_claim_that_cannot_be_provisioned_says_what_to_change(
    claim: dict[str, Any], klass: dict[str, Any], message: str
) -> None:
    with pytest.raises(ProvisionError, match=message):
        create_request(claim, klass, "pvc-1")


def test_templates_and_sizes() -> None:
    assert resolve_template("${pvc.namespace}-${pvc.name}-${pv.name}", "k", "pvc-9", CLAIM) == "apps-data-pvc-9"
    assert claim_size(with_spec(CLAIM, resources={"requests": {"storage": "1Gi"}})) == 1 << 30
    assert claim_size(with_spec(CLAIM, resources={"requests": {"storage": "1.5"}})) == 2  # whole bytes, up


def test_the_pv_is_pre_bound_to_its_claim_with_everything_the_node_needs() -> None:
    request, secret_ref = create_request(CLAIM, CLASS, "pvc-1234")
    volume = {"volumeId": "apps/pvc-1234", "capacityBytes": str(64 << 20), "volumeContext": {"exportAddress": "a:1"}}
    pv = pv_object(CLAIM, CLASS, "pvc-1234", "pairvol.io", volume, request, secret_ref)
    assert pv["metadata"] == {"name": "pvc-1234", "annotations": {"pv.kubernetes.io/provisioned-by": "pairvol.io"}}
    spec = pv["spec"]
    assert spec["capacity"] == {"storage": str(64 << 20)}
    assert spec["persistentVolumeReclaimPolicy"] == "Delete"
    assert spec["claimRef"] == {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "namespace": "apps",
        "name": "data",
        "uid": "1234",
    }
    assert spec["csi"] == {
        "driver": "pairvol.io",
        "volumeHandle": "apps/pvc-1234",
        "volumeAttributes": {"exportAddress": "a:1"},
        "fsType": "xfs",
        "nodeStageSecretRef": {"namespace": "apps", "name": "pairvol-pvc-1234"},
    }
    # and what the kubelet reads back from it
    volume_seen = csi_volume(CLAIM, pv, read_only=False)
    assert (volume_seen.driver, volume_seen.volume_handle) == ("pairvol.io", "apps/pvc-1234")
    assert volume_seen.fs_type == "xfs"
    assert volume_seen.secret_ref == ("apps", "pairvol-pvc-1234")
    assert volume_seen.access_mode == "SINGLE_NODE_WRITER"
    with pytest.raises(VolumeNotReady, match="not a CSI volume"):
        csi_volume(CLAIM, {"metadata": {"name": "pv"}, "spec": {"hostPath": {"path": "/x"}}}, read_only=False)


def test_a_claim_naming_its_pv_is_bound_to_it_only_if_the_pv_is_free_or_pre_bound_to_it() -> None:
    request, secret_ref = create_request(CLAIM, CLASS, "pvc-1234")
    volume = {"volumeId": "apps/pvc-1234", "capacityBytes": str(64 << 20)}
    retained = pv_object(CLAIM, CLASS, "pvc-1234", "pairvol.io", volume, request, secret_ref)
    again = {**with_spec(CLAIM, volumeName="pvc-1234"), "metadata": {**CLAIM["metadata"], "uid": "5678"}}
    # the claimRef of the claim it was made for is still there: removing it frees the PV
    assert "bound to an earlier claim of that name (uid 1234); remove its claimRef" in str(
        static_binding_problem(again, retained)
    )
    free = {**retained, "spec": {k: v for k, v in retained["spec"].items() if k != "claimRef"}}
    assert static_binding_problem(again, free) is None
    prebound = {**retained, "spec": {**retained["spec"], "claimRef": {"namespace": "apps", "name": "data"}}}
    assert static_binding_problem(again, prebound) is None
    other = {**retained, "spec": {**retained["spec"], "claimRef": {"namespace": "apps", "name": "logs"}}}
    assert "already bound to a different claim (apps/logs)" in str(static_binding_problem(again, other))
    assert "not found" in str(static_binding_problem(again, None))
    block = with_spec(again, volumeMode="Block")
    assert "volumeMode does not match" in str(static_binding_problem(block, free))
    assert "storageClassName does not match" in str(
        static_binding_problem(with_spec(again, storageClassName="fast"), free)
    )


def test_kubelet_paths_are_the_kubelets() -> None:
    root = Path("/var/lib/kubelet")
    fs = CsiVolume("pvc-1", "pairvol.io", "apps/pvc-1", "ext4", "SINGLE_NODE_WRITER", {}, None, False)
    staging = staging_path(root, fs)
    assert staging.parent.parent == root / "plugins/kubernetes.io/csi/pairvol.io" and staging.name == "globalmount"
    assert len(staging.parent.name) == 64  # sha256 of the volume handle
    assert publish_path(root, "uid", fs) == root / "pods/uid/volumes/kubernetes.io~csi/pvc-1/mount"
    block = dataclasses.replace(fs, block=True, fs_type="")
    devices = root / "plugins/kubernetes.io/csi/volumeDevices"
    assert staging_path(root, block) == devices / "staging/pvc-1"
    assert publish_path(root, "uid", block) == devices / "publish/pvc-1/uid"


def test_a_block_claim_is_a_device_of_the_container_outside_dev() -> None:
    volumes: dict[str, Any] = {"disk": VolumeDevice(Path("/k/publish/pvc-1/uid")), "d": VolumeDir(Path("/n"))}
    container = {"name": "c", "volumeDevices": [{"name": "disk", "devicePath": "/var/run/disk"}]}
    device = Mount(Path("/k/publish/pvc-1/uid"), PurePosixPath("/var/run/disk"), False)
    assert plan_devices(container, volumes) == [device]
    for devices, message in [
        ([{"name": "disk", "devicePath": "/dev/xvda"}], "outside /dev"),
        ([{"name": "d", "devicePath": "/var/run/disk"}], "volumeMode Block"),
        ([{"name": "nope", "devicePath": "/var/run/disk"}], "no volume"),
    ]:
        with pytest.raises(PodConfigError, match=message):
            plan_devices({"name": "c", "volumeDevices": devices}, volumes)
    with pytest.raises(PodConfigError, match="volumeDevices"):
        plan_mounts({"name": "c", "volumeMounts": [{"name": "disk", "mountPath": "/data"}]}, volumes)


def test_a_pod_names_a_claim_and_the_kubelet_mounts_it_before_binding() -> None:
    pod = {
        "spec": {
            "containers": [{"name": "c", "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data", "readOnly": True}}],
        }
    }
    volumes = plan_volumes(pod, Path("/n"), Path("/n/pods/u"), {})
    assert volumes == {"data": VolumeClaim("data", read_only=True)}
    with pytest.raises(PodConfigError, match="not mounted on the node yet"):
        plan_mounts(pod["spec"]["containers"][0], volumes)
    with pytest.raises(PodConfigError, match="claimName is required"):
        plan_volumes({"spec": {"volumes": [{"name": "d", "persistentVolumeClaim": {}}]}}, Path("/n"), Path("/p"), {})


def test_pvc_protection_counts_every_pod_that_names_the_claim() -> None:
    uses = {"name": "v", "persistentVolumeClaim": {"claimName": "data"}}
    pods = [
        {"metadata": {"name": "a"}, "spec": {"volumes": [uses]}},
        {"metadata": {"name": "b"}, "spec": {"volumes": [{"name": "v", "emptyDir": {}}]}},
    ]
    assert claim_in_use(CLAIM, pods) == ["a"]
    assert claim_in_use(CLAIM, pods[1:]) == []


def test_service_names_for_the_node_plugins() -> None:
    services = [
        {"metadata": {"name": "vol", "namespace": "apps"}, "spec": {"clusterIP": "10.96.0.7"}},
        {"metadata": {"name": "headless", "namespace": "apps"}, "spec": {"clusterIP": "None"}},
    ]
    text = hosts_file("127.0.0.1 localhost\n", services)
    assert text.splitlines()[0] == "127.0.0.1 localhost"
    assert "10.96.0.7 vol.apps.svc vol.apps.svc.cluster.local" in text.splitlines()
    assert "headless" not in text


def test_registration_and_teardown_helpers() -> None:
    assert csinode_object("node-1", "node-1", ["topology.pairvol.io/node"])["spec"] == {
        "drivers": [{"name": "pairvol.io", "nodeID": "node-1", "topologyKeys": ["topology.pairvol.io/node"]}]
    }
    info = "\n".join(
        [
            "30 1 0:1 / /k rw shared:1 - ext4 /dev/vda rw",
            "31 30 0:2 / /k/pods/u/mount rw shared:2 - ext4 /dev/loop1 rw",
            "32 30 0:2 / /k/plugins/g/globalmount rw shared:2 - ext4 /dev/loop1 rw",
            "33 1 0:3 / /kx rw - ext4 /dev/vda rw",
        ]
    )
    assert mounts_under(info, [Path("/k")]) == ["/k/plugins/g/globalmount", "/k/pods/u/mount", "/k"]


def test_allowed_topologies_become_the_accessibility_requirement() -> None:
    request, _ = create_request(CLAIM, CLASS, "pvc-1")
    assert "accessibilityRequirements" not in request  # the class allows every node
    key = "topology.pairvol.io/node"
    klass = {**CLASS, "allowedTopologies": [{"matchLabelExpressions": [{"key": key, "values": ["node-1", "node-3"]}]}]}
    requisite = [{"segments": {key: "node-1"}}, {"segments": {key: "node-3"}}]
    # the preferred list is the requisite rotated by a hash of the volume's name, as the
    # sidecar spreads volumes: its first node is where the primary goes
    firsts = set()
    for name in ("pvc-1", "pvc-2", "pvc-3", "pvc-4", "pvc-5", "pvc-6"):
        request, _ = create_request(CLAIM, klass, name)
        wanted = request["accessibilityRequirements"]
        assert wanted["requisite"] == requisite and sorted(map(str, wanted["preferred"])) == sorted(map(str, requisite))
        firsts.add(wanted["preferred"][0]["segments"][key])
        assert create_request(CLAIM, klass, name)[0] == request  # the same claim, the same request
    assert firsts == {"node-1", "node-3"}


def test_a_selected_node_is_preferred_first_among_the_nodes_of_the_driver() -> None:
    key = "topology.pairvol.io/node"
    csinodes = [
        {"metadata": {"name": n}, "spec": {"drivers": [{"name": "pairvol.io", "nodeID": n, "topologyKeys": [key]}]}}
        for n in ("node-1", "node-2", "node-3")
    ] + [{"metadata": {"name": "node-4"}, "spec": {"drivers": [{"name": "other.io", "topologyKeys": [key]}]}}]
    nodes = [{"metadata": {"name": n, "labels": {key: n}}} for n in ("node-1", "node-2", "node-4")]
    nodes.append({"metadata": {"name": "node-3", "labels": {}}})  # not labelled (yet): no topology
    topologies = node_topologies("pairvol.io", csinodes, nodes)
    assert topologies == {"node-1": {key: "node-1"}, "node-2": {key: "node-2"}}

    def selecting(node: str) -> dict[str, Any]:
        return {**CLAIM, "metadata": {**CLAIM["metadata"], "annotations": {"volume.kubernetes.io/selected-node": node}}}

    waiting = selecting("node-2")
    request, _ = create_request(waiting, CLASS, "pvc-1", topologies)
    assert request["accessibilityRequirements"] == {
        "requisite": [{"segments": {key: "node-1"}}, {"segments": {key: "node-2"}}],
        "preferred": [{"segments": {key: "node-2"}}, {"segments": {key: "node-1"}}],
    }
    klass = {**CLASS, "allowedTopologies": [{"matchLabelExpressions": [{"key": key, "values": ["node-1", "node-3"]}]}]}
    with pytest.raises(ProvisionError, match="outside the StorageClass's allowedTopologies"):
        create_request(waiting, klass, "pvc-1", topologies)
    with pytest.raises(ProvisionError, match="selected node node-3 has no topology of the driver"):
        create_request(selecting("node-3"), CLASS, "pvc-1", topologies)
