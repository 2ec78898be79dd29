"""The driver's own csi.proto is the upstream CSI protocol, on the wire.

The kubelet and the sidecars are built from the upstream definitions; the driver serves
its own, smaller file. On the wire only the gRPC paths and, in every message, each field's
number, type and cardinality count. These tests compare the two compiled definitions
field by field, and then call a running driver with requests built from the upstream
classes that carry fields the driver's file leaves out (they must be ignored, not break
the call). The other CSI tests call the driver through the upstream stubs too, whenever
the reference is next to the checkout.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2

from pairvol.csi.proto import _compile
from tests.support.csi import OWN_PROTO, Stubs, compile_stubs, driver, require_reference

Messages = dict[str, descriptor_pb2.DescriptorProto]
Enums = dict[str, descriptor_pb2.EnumDescriptorProto]
Methods = dict[str, tuple[str, str]]
Index = tuple[Messages, Enums, Methods]
MessageList = list[descriptor_pb2.DescriptorProto]
EnumList = list[descriptor_pb2.EnumDescriptorProto]


def index(fds: descriptor_pb2.FileDescriptorSet) -> Index:
    """Messages and enums by full name; methods by gRPC path -> (request, response)."""
    messages: Messages = {}
    enums: Enums = {}
    methods: Methods = {}

    def walk(prefix: str, msgs: MessageList, ens: EnumList) -> None:
        for e in ens:
            enums[f"{prefix}.{e.name}"] = e
        for m in msgs:
            name = f"{prefix}.{m.name}"
            messages[name] = m
            walk(name, list(m.nested_type), list(m.enum_type))

    for f in fds.file:
        if f.package != "csi.v1":
            continue
        walk(".csi.v1", list(f.message_type), list(f.enum_type))
        for svc in f.service:
            for m in svc.method:
                methods[f"/csi.v1.{svc.name}/{m.name}"] = (m.input_type, m.output_type)
    return messages, enums, methods


@pytest.fixture(scope="module")
def both() -> tuple[Index, Index]:
    """(the driver's, upstream's) definitions, compiled by protoc."""
    reference = require_reference()
    return index(_compile(OWN_PROTO)), index(_compile(reference))


def test_every_rpc_of_the_driver_has_the_upstream_path_and_message_types(both: tuple[Index, Index]) -> None:
    (_, _, ours), (_, _, theirs) = both
    assert ours, "the driver declares no RPC"
    for path, types in ours.items():
        assert theirs.get(path) == types, f"{path}: driver {types}, upstream {theirs.get(path)}"


def test_every_field_has_the_upstream_number_type_and_cardinality(both: tuple[Index, Index]) -> None:
    (ours, our_enums, _), (theirs, their_enums, _) = both
    for name, msg in ours.items():
        assert name in theirs, f"message {name} is not upstream"
        upstream = {f.number: f for f in theirs[name].field}
        for field in msg.field:
            other = upstream.get(field.number)
            assert other is not None, f"{name}.{field.name} = {field.number} does not exist upstream"
            assert (field.name, field.type, field.label, field.type_name) == (
                other.name, other.type, other.label, other.type_name
            ), f"{name}.{field.name} differs from upstream"
            assert field.HasField("oneof_index") == other.HasField("oneof_index"), f"{name}.{field.name} oneof"
    for name, enum in our_enums.items():
        assert name in their_enums, f"enum {name} is not upstream"
        upstream_values = {v.number: v.name for v in their_enums[name].value}
        for value in enum.value:
            assert upstream_values.get(value.number) == value.name, f"{name}.{value.name} = {value.number}"


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Stubs:
    require_reference()
    return compile_stubs(tmp_path_factory.mktemp("csi-stubs"))


async def test_fields_the_driver_does_not_declare_are_ignored(stubs: Stubs, tmp_path: Path) -> None:
    """A kubelet newer than the driver's file sends more; the driver still answers."""
    assert stubs.upstream
    pb = stubs.pb
    async with driver(tmp_path, "node", "--node-id", "n1", "--state-dir", str(tmp_path / "state")) as d:
        node = stubs.grpc.NodeStub(d.channel)
        # NodeUnpublishVolume of nothing published: idempotent success, with no fields of
        # its own beyond the two it needs; NodeGetInfo; and an unknown RPC
        await node.NodeUnpublishVolume(
            pb.NodeUnpublishVolumeRequest(volume_id="apps/pvc-1", target_path=str(tmp_path / "nothing"))
        )
        info = await node.NodeGetInfo(pb.NodeGetInfoRequest())
        assert info.node_id == "n1"
        stage = pb.NodeStageVolumeRequest(
            volume_id="apps/pvc-1",
            staging_target_path=str(tmp_path / "stage"),
            volume_capability=pb.VolumeCapability(
                mount=pb.VolumeCapability.MountVolume(fs_type="ext4", volume_mount_group="1000"),
                access_mode=pb.VolumeCapability.AccessMode(mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER),
            ),
            volume_context={},
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await node.NodeStageVolume(stage)
        # decoded as the driver reads it: it got as far as the export address
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "exportAddress" in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await node.NodeExpandVolume(pb.NodeExpandVolumeRequest(volume_id="apps/pvc-1", volume_path="/x"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "required_bytes" in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stubs.grpc.ControllerStub(d.channel).ControllerModifyVolume(
                pb.ControllerModifyVolumeRequest(volume_id="apps/pvc-1")
            )
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED  # not declared by the driver
