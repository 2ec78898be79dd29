"""ControllerExpandVolume against the local API server with the repository's CRDs, from the
spec's text: required fields, the capacity rounding CreateVolume states, idempotency (a
volume already that large is a success and is not touched), the codes (INVALID_ARGUMENT,
NOT_FOUND, OUT_OF_RANGE, ABORTED while the replicas grow), and node_expansion_required (for
Filesystem and Block volumes alike: the node's attachment has to take the new size). The
operator is played by patching the status as it writes it once both replicas have the new
size and replicate again."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from pairvol.kube.paths import volume_path
from tests.integration.test_csi_controller import (  # noqa: F401 - fixtures
    MIB,
    NAME,
    NS,
    Provisioner,
    provisioner,
    stubs,
)


async def expand(p: Provisioner, required: int, limit: int = 0, volume_id: str = f"{NS}/{NAME}", **kw: Any) -> Any:
    req = p.pb.ControllerExpandVolumeRequest(
        volume_id=volume_id,
        capacity_range=p.pb.CapacityRange(required_bytes=required, limit_bytes=limit),
        volume_capability=kw.pop("cap", p.cap()),
        **kw,
    )
    return await p.controller.ControllerExpandVolume(req, timeout=30)


async def grown(p: Provisioner, size: int) -> None:
    """The operator's status once both replicas are at ``size`` and replicate."""
    await p.kube.merge_patch(volume_path(NS, NAME, status=True), {"status": {"phase": "Replicating", "size": size}})


async def made(p: Provisioner) -> None:
    await p.refused(p.create())  # 101 MiB, ABORTED until it replicates
    await grown(p, 101 * MIB)
    await p.create()


async def test_a_volume_grows_and_the_answer_waits_for_both_replicas(provisioner: Provisioner) -> None:  # noqa: F811
    p = provisioner
    await made(p)
    code, text = await p.refused(expand(p, 200 * MIB + 1))
    assert code == grpc.StatusCode.ABORTED and "growing to 210763776 bytes" in text and "retry" in text
    rv = await p.kube.get(volume_path(NS, NAME))
    assert rv["spec"]["size"] == str(201 * MIB)  # rounded up to a whole MiB, as at CreateVolume
    code, _ = await p.refused(expand(p, 200 * MIB + 1))  # retried before the grow finished
    assert code == grpc.StatusCode.ABORTED
    await grown(p, 201 * MIB)
    resp = await expand(p, 200 * MIB + 1)
    assert (resp.capacity_bytes, resp.node_expansion_required) == (201 * MIB, True)
    again = await expand(p, 200 * MIB + 1)  # idempotent
    assert again == resp


async def test_a_block_volume_needs_node_expansion_for_its_attachment(
    provisioner: Provisioner,  # noqa: F811
) -> None:
    p = provisioner
    await made(p)
    await grown(p, 101 * MIB)
    resp = await expand(p, 50 * MIB, cap=p.cap(block=True))  # already larger: nothing to do
    # the node's loop device and NBD client must take the size: NodeExpandVolume, also for Block
    assert (resp.capacity_bytes, resp.node_expansion_required) == (101 * MIB, True)
    rv = await p.kube.get(volume_path(NS, NAME))
    assert rv["spec"]["size"] == str(101 * MIB), "a smaller request never shrinks the volume"


@pytest.mark.parametrize(
    ("change", "code", "says"),
    [
        ({"volume_id": ""}, grpc.StatusCode.INVALID_ARGUMENT, "volume_id"),
        ({"volume_id": f"{NS}/pvc-does-not-exist"}, grpc.StatusCode.NOT_FOUND, "does not exist"),
        ({"volume_id": "not-a-pairvol-id"}, grpc.StatusCode.NOT_FOUND, "does not exist"),
        ({"required": 2 << 50}, grpc.StatusCode.OUT_OF_RANGE, "largest volume"),
        ({"required": 0, "limit": 100 * MIB}, grpc.StatusCode.OUT_OF_RANGE, "volumes never shrink"),
        ({"required": 300 * MIB + 1, "limit": 300 * MIB + 2}, grpc.StatusCode.OUT_OF_RANGE, "no volume size fits"),
    ],
)
async def test_bad_expand_requests(
    provisioner: Provisioner, change: dict[str, Any], code: Any, says: str  # noqa: F811
) -> None:
    p = provisioner
    await made(p)
    args: dict[str, Any] = {"required": 200 * MIB, **change}
    got, text = await p.refused(expand(p, args.pop("required"), **args))
    assert got == code and says in text, text
    rv = await p.kube.get(volume_path(NS, NAME))
    assert rv["spec"]["size"] == str(101 * MIB), "a refused request changes nothing"


async def test_capacity_range_is_required(provisioner: Provisioner) -> None:  # noqa: F811
    p = provisioner
    req = p.pb.ControllerExpandVolumeRequest(volume_id=f"{NS}/{NAME}")
    code, text = await p.refused(p.controller.ControllerExpandVolume(req, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "capacity_range" in text
