"""NodeExpandVolume with real agents: a staged, published volume grows while the pod writes.

The replicas grow as the operator grows them (the primary lets go of its secondary, the
secondary grows, the primary grows, the pair resyncs); then the kubelet's NodeExpandVolume
makes the attachment — the attacher's NBD client, its FUSE export, the loop device — and
the mounted file system take the new size, online. The pod's data stays, and it can use
the new space.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.integration.test_csi_node import (  # noqa: F401 - fixtures
    BYTES,
    Kubelet,
    Volume,
    _root,
    kubelet,
    stubs,
    volume,
    write_synced,
)

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
# xfs needs 300 MiB; ext4 grows online only with CAP_SYS_RESOURCE, which the bounding set of
# the machines this suite runs on lacks (resize2fs: "Permission denied to resize
# filesystem"), so the mounted file system here is xfs (xfs_growfs needs CAP_SYS_ADMIN)
OLD, NEW = 320 * MiB, 400 * MiB


@pytest.fixture
def volume_size() -> str:
    return "320Mi"


async def grow_replicas(v: Volume, size: int) -> None:
    """What the operator does for a larger spec.size (decisions.Grow, then the resync)."""
    await v.primary.call("POST", "/v1/stop", {})
    await v.secondary.call("POST", "/v1/resize", {"epoch": 1, "size": size})
    await v.primary.call("POST", "/v1/resize", {"epoch": 2, "size": size})
    again = {"epoch": 3, "peer": v.secondary.replication_address, "sync": "full", "peerEpoch": 1}
    await v.primary.call("POST", "/v1/primary", again)
    await v.primary.wait_replicating()


async def node_expand(k: Kubelet, size: int, path: Path, **kw: Any) -> Any:
    req = k.pb.NodeExpandVolumeRequest(
        volume_id="apps/pvc-1",
        volume_path=str(path),
        staging_target_path=str(k.staging),
        capacity_range=k.pb.CapacityRange(required_bytes=size),
        volume_capability=k.capability(**kw),
    )
    return await k.node.NodeExpandVolume(req, timeout=60)


async def writing(path: Path, stop: asyncio.Event) -> int:
    """A pod's log: fsynced records until told to stop; returns how many."""
    n = 0
    fd = await asyncio.to_thread(os.open, path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        while not stop.is_set() or n < 5:
            await asyncio.to_thread(os.write, fd, f"record {n:08d}\n".encode())
            await asyncio.to_thread(os.fsync, fd)
            n += 1
            await asyncio.sleep(0.01)
    finally:
        os.close(fd)
    return n


async def test_a_mounted_xfs_volume_grows_online_while_a_pod_writes(kubelet: Kubelet, volume: Volume) -> None:  # noqa: F811 - fixtures
    await kubelet.stage(fs_type="xfs")
    await kubelet.publish(fs_type="xfs")
    before = os.statvfs(kubelet.target)
    write_synced(kubelet.target / "kept", b"k" * MiB)
    stop = asyncio.Event()
    writer = asyncio.create_task(writing(kubelet.target / "log", stop))
    await asyncio.sleep(0.2)
    await grow_replicas(volume, NEW)
    resp = await node_expand(kubelet, NEW, kubelet.target, fs_type="xfs")
    await node_expand(kubelet, NEW, kubelet.target, fs_type="xfs")  # repeated: nothing more to do
    stop.set()
    records = await writer
    assert resp.capacity_bytes == NEW
    after = os.statvfs(kubelet.target)
    assert after.f_blocks * after.f_frsize > before.f_blocks * before.f_frsize + 70 * MiB
    fd = os.open(kubelet.target / "big", os.O_WRONLY | os.O_CREAT, 0o644)
    try:  # more than fitted before the grow
        os.posix_fallocate(fd, 0, before.f_bavail * before.f_frsize + 30 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert (kubelet.target / "kept").read_bytes() == b"k" * MiB
    lines = (kubelet.target / "log").read_text().splitlines()
    assert lines == [f"record {i:08d}" for i in range(records)], "a record written during the grow is missing"
    stats = await kubelet.stats()
    assert next(u.total for u in stats.usage if u.unit == BYTES) == after.f_blocks * after.f_frsize


async def test_a_block_volume_grows_to_the_new_device_size(kubelet: Kubelet, volume: Volume) -> None:  # noqa: F811 - fixtures
    kubelet.target = kubelet.target.parent / "pvc-1-block"
    await kubelet.stage(block=True)
    await kubelet.publish(block=True)
    await grow_replicas(volume, NEW)
    resp = await node_expand(kubelet, NEW, kubelet.target, block=True)
    assert resp.capacity_bytes == NEW
    fd = os.open(kubelet.target, os.O_RDWR)
    try:
        assert os.lseek(fd, 0, os.SEEK_END) == NEW
        os.pwrite(fd, b"end of the grown device".ljust(4096, b"."), NEW - 4096)
        os.fsync(fd)
    finally:
        os.close(fd)
    async with await volume.primary.nbd() as nbd:
        assert (await nbd.pread(4096, NEW - 4096)).startswith(b"end of the grown device")
    with contextlib.suppress(grpc.aio.AioRpcError):
        await kubelet.unpublish()


async def test_node_expand_errors(kubelet: Kubelet, volume: Volume) -> None:  # noqa: F811 - fixtures
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await node_expand(kubelet, NEW, kubelet.target)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND  # not staged here
    await kubelet.stage()
    await kubelet.publish()
    req = kubelet.pb.NodeExpandVolumeRequest(volume_id="apps/pvc-1", volume_path=str(kubelet.target))
    with pytest.raises(grpc.aio.AioRpcError) as no_size:
        await kubelet.node.NodeExpandVolume(req, timeout=60)
    assert no_size.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "required_bytes" in no_size.value.details()
    for bad in ({"volume_id": ""}, {"volume_path": ""}):
        fields = {"volume_id": "apps/pvc-1", "volume_path": str(kubelet.target), **bad}
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await kubelet.node.NodeExpandVolume(kubelet.pb.NodeExpandVolumeRequest(**fields), timeout=60)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as elsewhere:
        await node_expand(kubelet, NEW, kubelet.target.parent / "no-such-path")
    assert elsewhere.value.code() == grpc.StatusCode.NOT_FOUND
