"""The CSI controller against an API server: what the external-provisioner sees.

The calls go through stubs compiled from the upstream csi.proto (the driver's own where a
clone lacks the reference; tests/support/csi.py). The API server is the
local cluster's, with the repository's CRDs; no operator runs, so a test writes the
volume's status itself where the operator would (``phase: Replicating``) and checks what
the controller answers before and after.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from pairvol.csi.params import MANAGED_BY, MANAGED_BY_CSI
from pairvol.kube.client import KubeClient
from pairvol.kube.config import load_config
from pairvol.kube.paths import volume_path
from pairvol.localcluster.cluster import LocalCluster
from tests.support.csi import Stubs, call_raw, compile_stubs, driver

pytestmark = pytest.mark.timeout(90)

NS = "default"
NAME = "pvc-0b7e9d2c-4f51-4b8e-9a43-1f6a5c1d2e3f"
MIB = 1 << 20
SINGLE_NODE_WRITER = 1
MULTI_NODE_MULTI_WRITER = 5
CREATE_DELETE_VOLUME = 1
CONTROLLER_SERVICE = 1
VOLUME_ACCESSIBILITY_CONSTRAINTS = 2
EXPAND_VOLUME = 9
ONLINE = 1  # PluginCapability.VolumeExpansion.ONLINE


@pytest.fixture(scope="session")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Stubs:
    """The kubelet's and the sidecars' view of the protocol (see tests/support/csi.py)."""
    return compile_stubs(tmp_path_factory.mktemp("csi-stubs"))


@dataclass
class Provisioner:
    pb: Any
    controller: Any
    identity: Any
    kube: KubeClient
    channel: grpc.aio.Channel

    def cap(self, mode: int = SINGLE_NODE_WRITER, block: bool = False, fs_type: str = "ext4") -> Any:
        c = self.pb.VolumeCapability(access_mode=self.pb.VolumeCapability.AccessMode(mode=mode))
        if block:
            c.block.SetInParent()
        else:
            c.mount.fs_type = fs_type
        return c

    async def create(self, name: str = NAME, required: int = 100 * MIB + 1, limit: int = 0, **kw: Any) -> Any:
        caps = kw.pop("caps", [self.cap()])
        params = kw.pop("parameters", {"failoverMode": "Latest", "checkpointIntervalSeconds": "5"})
        req = self.pb.CreateVolumeRequest(
            name=name,
            capacity_range=self.pb.CapacityRange(required_bytes=required, limit_bytes=limit),
            volume_capabilities=caps,
            parameters=params,
            **kw,
        )
        return await self.controller.CreateVolume(req, timeout=30)

    async def refused(self, call: Any) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        return err.value.code(), err.value.details()

    async def replicating(self, name: str = NAME) -> None:
        """What the operator writes once both replicas are in sync."""
        await self.kube.merge_patch(volume_path(NS, name, status=True), {"status": {"phase": "Replicating"}})


@pytest.fixture
async def provisioner(tmp_path: Path, stubs: Stubs) -> AsyncIterator[Provisioner]:
    async with LocalCluster(nodes=2) as cluster:
        config = await load_config(str(cluster.kubeconfig_path))
        async with (
            KubeClient(config) as kube,
            driver(
                tmp_path,
                "controller",
                "--kubeconfig",
                str(cluster.kubeconfig_path),
                "--volume-namespace",
                NS,
                "--ready-timeout",
                "1",
            ) as d,
        ):
            yield Provisioner(
                stubs.pb,
                stubs.grpc.ControllerStub(d.channel),
                stubs.grpc.IdentityStub(d.channel),
                kube,
                d.channel,
            )


async def test_controller_advertises_what_it_serves(provisioner: Provisioner) -> None:
    pb = provisioner.pb
    plugin = await provisioner.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest())
    assert [c.service.type for c in plugin.capabilities if c.HasField("service")] == [
        CONTROLLER_SERVICE, VOLUME_ACCESSIBILITY_CONSTRAINTS
    ]
    assert [c.volume_expansion.type for c in plugin.capabilities if c.HasField("volume_expansion")] == [ONLINE]
    caps = await provisioner.controller.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest())
    assert [c.rpc.type for c in caps.capabilities] == [CREATE_DELETE_VOLUME, EXPAND_VOLUME]
    # what it does not advertise, it does not serve
    for method in ("ListVolumes", "ControllerPublishVolume", "CreateSnapshot", "ControllerModifyVolume"):
        code, _ = await provisioner.refused(call_raw(provisioner.channel, f"/csi.v1.Controller/{method}"))
        assert code == grpc.StatusCode.UNIMPLEMENTED, method


async def test_create_makes_a_replicated_volume_and_answers_once_it_replicates(provisioner: Provisioner) -> None:
    code, text = await provisioner.refused(provisioner.create())
    assert code == grpc.StatusCode.ABORTED and "Replicating" in text  # the provisioner retries
    rv = await provisioner.kube.get(volume_path(NS, NAME))
    assert rv["metadata"]["labels"][MANAGED_BY] == MANAGED_BY_CSI
    assert rv["spec"]["size"] == str(101 * MIB)  # rounded up to a whole MiB
    assert rv["spec"]["failover"]["mode"] == "Latest"
    assert rv["spec"]["checkpoint"]["intervalSeconds"] == 5
    assert rv["spec"]["reclaimPolicy"] == "Delete"

    await provisioner.replicating()
    made = await provisioner.create()
    again = await provisioner.create()  # same name, same request: the same volume
    assert made == again
    assert made.volume.capacity_bytes == 101 * MIB
    assert made.volume.volume_id == f"{NS}/{NAME}"
    assert made.volume.volume_context["exportAddress"] == f"{NAME}.{NS}.svc:7802"
    assert made.volume.volume_context["fsType"] == "ext4"
    assert made.volume.volume_context["failoverMode"] == "Latest"
    assert len(await provisioner.kube.list(volume_path(NS))) == 1

    # the same name asking for something else
    code, text = await provisioner.refused(provisioner.create(parameters={"checkpointIntervalSeconds": "30"}))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "checkpoint_interval_s" in text
    code, text = await provisioner.refused(provisioner.create(required=200 * MIB))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "capacity range" in text


async def test_accessibility_requirements_place_the_replicas_only_when_the_class_says_so(
    provisioner: Provisioner,
) -> None:
    pb = provisioner.pb

    def on(*nodes: str) -> Any:
        return pb.TopologyRequirement(
            requisite=[pb.Topology(segments={"topology.pairvol.io/node": n}) for n in nodes],
            preferred=[pb.Topology(segments={"topology.pairvol.io/node": nodes[-1]})],
        )

    # a volume is accessible from every node: the requirement restricts nothing by default
    await provisioner.refused(provisioner.create(accessibility_requirements=on("node-1", "node-2", "node-3")))
    assert "nodes" not in (await provisioner.kube.get(volume_path(NS, NAME)))["spec"]
    await provisioner.replicating()
    made = await provisioner.create(accessibility_requirements=on("node-1", "node-2", "node-3"))
    assert list(made.volume.accessible_topology) == []  # the CO may schedule its pods anywhere

    follow = {"failoverMode": "Latest", "replicasFollowTopology": "true"}
    await provisioner.refused(provisioner.create("pvc-2", parameters=follow, accessibility_requirements=on("a", "b")))
    assert (await provisioner.kube.get(volume_path(NS, "pvc-2")))["spec"]["nodes"] == ["a", "b"]
    both = {**follow, "nodes": "b,c"}  # with the nodes parameter: the nodes both allow
    code, text = await provisioner.refused(
        provisioner.create("pvc-3", parameters=both, accessibility_requirements=on("a", "b", "c"))
    )
    assert code == grpc.StatusCode.ABORTED, text
    assert (await provisioner.kube.get(volume_path(NS, "pvc-3")))["spec"]["nodes"] == ["b", "c"]
    for params, requirement, says in (
        (follow, None, "allowedTopologies"),
        (follow, on("a"), "at least two distinct nodes"),
        ({}, pb.TopologyRequirement(requisite=[pb.Topology(segments={"zone": "z1"})]), "only topology.pairvol.io/node"),
    ):
        kw = {"accessibility_requirements": requirement} if requirement is not None else {}
        code, text = await provisioner.refused(provisioner.create("pvc-4", parameters=params, **kw))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and says in text, text


async def test_the_first_preferred_topology_is_where_the_primary_goes(provisioner: Provisioner) -> None:
    """The spec: the plugin SHOULD make the volume available in the preferred topologies,
    first to last. A pairvol volume is available everywhere; its primary goes to the first
    preferred node (a WaitForFirstConsumer claim's selected node: where its pod runs)."""
    pb = provisioner.pb

    def preferring(*nodes: str) -> Any:
        topologies = [pb.Topology(segments={"topology.pairvol.io/node": n}) for n in nodes]
        return pb.TopologyRequirement(requisite=sorted(topologies, key=str), preferred=topologies)

    await provisioner.refused(provisioner.create(accessibility_requirements=preferring("node-2", "node-3", "node-1")))
    rv = await provisioner.kube.get(volume_path(NS, NAME))
    assert rv["spec"]["preferredPrimaryNode"] == "node-2"
    assert "nodes" not in rv["spec"]  # a preference, not a restriction
    await provisioner.replicating()
    # a repeated call preferring another node is the same volume: where it went is history
    made = await provisioner.create(accessibility_requirements=preferring("node-3", "node-1", "node-2"))
    assert made.volume.volume_id == f"{NS}/{NAME}" and list(made.volume.accessible_topology) == []
    assert (await provisioner.kube.get(volume_path(NS, NAME)))["spec"]["preferredPrimaryNode"] == "node-2"
    # without a preference, the operator chooses
    await provisioner.refused(provisioner.create("pvc-2"))
    assert "preferredPrimaryNode" not in (await provisioner.kube.get(volume_path(NS, "pvc-2")))["spec"]
    for requirement, says in (
        (pb.TopologyRequirement(preferred=[pb.Topology(segments={"zone": "z1"})]), "only topology.pairvol.io/node"),
        (preferring("Node_1"), "preferredPrimaryNode must be a node name"),
    ):
        code, text = await provisioner.refused(provisioner.create("pvc-3", accessibility_requirements=requirement))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and says in text, text


async def test_delete_is_idempotent_and_spares_volumes_it_did_not_create(provisioner: Provisioner) -> None:
    pb = provisioner.pb
    await provisioner.refused(provisioner.create())
    delete = provisioner.controller.DeleteVolume
    await delete(pb.DeleteVolumeRequest(volume_id=f"{NS}/{NAME}"))
    assert await provisioner.kube.get_or_none(volume_path(NS, NAME)) is None
    await delete(pb.DeleteVolumeRequest(volume_id=f"{NS}/{NAME}"))  # gone already: OK
    await delete(pb.DeleteVolumeRequest(volume_id="not a volume id of this driver"))  # OK: nothing to delete

    await provisioner.kube.create(
        volume_path(NS),
        {"apiVersion": "pairvol.io/v1alpha1", "kind": "ReplicatedVolume", "metadata": {"name": "hand"},
         "spec": {"size": "16Mi"}},
    )
    code, text = await provisioner.refused(delete(pb.DeleteVolumeRequest(volume_id=f"{NS}/hand")))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "not created by this driver" in text
    assert await provisioner.kube.get_or_none(volume_path(NS, "hand")) is not None
    code, text = await provisioner.refused(provisioner.create(name="hand", required=16 * MIB))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "not created by this driver" in text


async def test_validate_volume_capabilities(provisioner: Provisioner) -> None:
    pb = provisioner.pb
    await provisioner.refused(provisioner.create())
    validate = provisioner.controller.ValidateVolumeCapabilities
    ok = await validate(
        pb.ValidateVolumeCapabilitiesRequest(
            volume_id=f"{NS}/{NAME}", volume_capabilities=[provisioner.cap(), provisioner.cap(block=True)]
        )
    )
    assert len(ok.confirmed.volume_capabilities) == 2
    no = await validate(
        pb.ValidateVolumeCapabilitiesRequest(
            volume_id=f"{NS}/{NAME}", volume_capabilities=[provisioner.cap(MULTI_NODE_MULTI_WRITER)]
        )
    )
    assert not no.HasField("confirmed") and "MULTI_NODE_MULTI_WRITER" in no.message
    code, _ = await provisioner.refused(
        validate(pb.ValidateVolumeCapabilitiesRequest(volume_id=f"{NS}/nope", volume_capabilities=[provisioner.cap()]))
    )
    assert code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("change", "code", "says"),
    [
        ({"name": ""}, grpc.StatusCode.INVALID_ARGUMENT, "name is required"),
        ({"name": "Not_A_Label"}, grpc.StatusCode.INVALID_ARGUMENT, "DNS label"),
        ({"caps": []}, grpc.StatusCode.INVALID_ARGUMENT, "volume_capabilities is required"),
        ({"caps": "multi"}, grpc.StatusCode.INVALID_ARGUMENT, "ReadWriteOnce"),
        ({"parameters": {"replicas": "3"}}, grpc.StatusCode.INVALID_ARGUMENT, "unknown StorageClass parameter"),
        ({"parameters": {"failoverMode": "Soon"}}, grpc.StatusCode.INVALID_ARGUMENT, "failover.mode"),
        ({"parameters": {"fsType": "btrfs"}}, grpc.StatusCode.INVALID_ARGUMENT, "btrfs"),
        ({"required": 0, "limit": MIB - 1}, grpc.StatusCode.OUT_OF_RANGE, "whole MiB"),
        ({"required": 3 * MIB, "limit": 2 * MIB}, grpc.StatusCode.OUT_OF_RANGE, "capacity range"),
        ({"snapshot": True}, grpc.StatusCode.INVALID_ARGUMENT, "snapshot"),
        ({"caps": "xfs"}, grpc.StatusCode.OUT_OF_RANGE, "xfs file system needs a volume of at least 300 MiB"),
    ],
)
async def test_bad_create_requests(provisioner: Provisioner, change: dict[str, Any], code: Any, says: str) -> None:
    kw = dict(change)
    if kw.get("caps") == "multi":
        kw["caps"] = [provisioner.cap(MULTI_NODE_MULTI_WRITER)]
    if kw.get("caps") == "xfs":
        kw["caps"] = [provisioner.cap(fs_type="xfs")]
    if kw.pop("snapshot", False):
        kw["volume_content_source"] = provisioner.pb.VolumeContentSource(
            snapshot=provisioner.pb.VolumeContentSource.SnapshotSource(snapshot_id="s")
        )
    got, text = await provisioner.refused(provisioner.create(**kw))
    assert got == code and says in text, text
    assert await provisioner.kube.list(volume_path(NS)) == []  # nothing was created
