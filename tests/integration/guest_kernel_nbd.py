"""What only an attachment through the kernel's nbd client does.

These run inside the guest that tests/integration/test_csi_kernel_nbd.py boots (a Debian
kernel with the nbd module; this machine's kernel has none), with the node plugin started
with ``--attach-transport nbd``. The file's name keeps the host's collection away from it;
the guest names it on pytest's command line, together with the transport-independent
tests of test_csi_node.py and test_csi_attacher_host.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import struct
from pathlib import Path

import grpc
import pytest

from pairvol.agent import crashpoints
from pairvol.csi import nbd
from pairvol.csi.attach import STAGE_NBD_RECORDED, run
from tests.integration.test_csi_expand import grow_replicas, node_expand
from tests.integration.test_csi_node import (  # noqa: F401 - fixtures
    TRANSPORT,
    Kubelet,
    Volume,
    _root,
    devices_of,
    kubelet,
    mounts,
    stubs,
    volume,
    volume_size,
    write_synced,
)
from tests.support.csi import Stubs, driver, node_plugin_security

pytestmark = [pytest.mark.timeout(300)]

MiB = 1 << 20
#: the 64 MiB volume grows by half: a small full resync under emulation (ext4 grows online
#: here: the guest's bounding set has CAP_SYS_RESOURCE, which the host's lacks)
GROWN = 96 * MiB


@pytest.fixture(autouse=True)
def _in_a_guest_with_nbd() -> None:
    assert TRANSPORT == "nbd", "run by test_csi_kernel_nbd.py with PAIRVOL_TEST_ATTACH_TRANSPORT=nbd"
    assert nbd.unavailable() is None, nbd.unavailable()


async def test_a_kernel_nbd_attachment_takes_a_new_size_when_it_is_attached_anew(
    kubelet: Kubelet,  # noqa: F811 - fixtures
    volume: Volume,  # noqa: F811 - fixtures
) -> None:
    await kubelet.stage()
    await kubelet.publish()
    device = mounts()[str(kubelet.staging)]
    assert device.startswith("/dev/nbd") and nbd.connected(device)
    before = os.statvfs(kubelet.target)
    await asyncio.to_thread(write_synced, kubelet.target / "kept", b"k" * MiB)
    await grow_replicas(volume, GROWN)

    with pytest.raises(grpc.aio.AioRpcError) as offline:
        await node_expand(kubelet, GROWN, kubelet.target)
    assert offline.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "staged anew on this node, once no pod here uses it" in offline.value.details()
    # the volume still serves the pod at its old size, across the primary's restart
    await asyncio.to_thread(write_synced, kubelet.target / "after-the-grow", b"a" * MiB)
    assert nbd.size(device) < GROWN

    await kubelet.unpublish()
    await kubelet.unstage()
    assert not await devices_of(kubelet.state_dir)
    await kubelet.stage()  # no pod uses it any more: a new attachment, at the new size
    await kubelet.publish()
    resp = await node_expand(kubelet, GROWN, kubelet.target)  # the kubelet grows the fs
    assert resp.capacity_bytes == GROWN
    after = os.statvfs(kubelet.target)
    assert after.f_blocks * after.f_frsize > before.f_blocks * before.f_frsize + 24 * MiB
    assert (kubelet.target / "kept").read_bytes() == b"k" * MiB
    assert (kubelet.target / "after-the-grow").read_bytes() == b"a" * MiB


async def test_a_plugin_dying_between_choosing_the_device_and_connecting_it_leaks_no_device(
    kubelet: Kubelet,  # noqa: F811 - fixtures
    tmp_path: Path,
    stubs: Stubs,  # noqa: F811 - fixtures
) -> None:
    plan = node_plugin_security()
    armed = {**os.environ, crashpoints.ENV: STAGE_NBD_RECORDED.name}
    args = ("--node-id", "node-a", "--state-dir", str(kubelet.state_dir), "--attach-transport", "nbd")
    os.kill(kubelet.plugin.proc.pid, signal.SIGTERM)
    await kubelet.plugin.proc.wait()
    async with driver(tmp_path, "node", *args, security=plan, name="csi-crash", env=armed) as d:
        kubelet.node = stubs.grpc.NodeStub(d.channel)
        with pytest.raises(grpc.aio.AioRpcError):
            await kubelet.stage()
        await d.proc.wait()
        assert f"crash point {STAGE_NBD_RECORDED.name} reached" in d.log_path.read_text()
    recorded = (kubelet.state_dir / "apps_pvc-1" / "nbd.device").read_text().strip()
    assert not nbd.connected(recorded), "the device is recorded before it is connected"
    assert await devices_of(kubelet.state_dir) == []

    async with driver(tmp_path, "node", *args, security=plan, name="csi-next") as d:
        kubelet.node = stubs.grpc.NodeStub(d.channel)
        await kubelet.stage()  # the record names a free device: it is used
        await kubelet.publish()
        assert mounts()[str(kubelet.staging)] == recorded and nbd.connected(recorded)
        await asyncio.to_thread(write_synced, kubelet.target / "f", b"x" * 4096)
        await kubelet.unpublish()
        await kubelet.unstage()
    assert not nbd.connected(recorded) and not (kubelet.state_dir / "apps_pvc-1").exists()


async def test_a_device_another_program_connected_is_neither_taken_nor_disconnected(
    kubelet: Kubelet,  # noqa: F811 - fixtures
    tmp_path: Path,
) -> None:
    """Someone else on the node (another driver, ``qemu-nbd -c``) connects the device a
    crashed stage had recorded: the next stage takes another one, the unstage leaves theirs."""
    foreign_disk, foreign_sock = tmp_path / "foreign.img", tmp_path / "foreign.sock"
    await asyncio.to_thread(foreign_disk.write_bytes, b"\x5a" * MiB)
    pidfile = tmp_path / "foreign.pid"
    await run(
        "qemu-storage-daemon", "--blockdev", f"driver=file,node-name=f,filename={foreign_disk}",
        "--nbd-server", f"addr.type=unix,addr.path={foreign_sock}",
        "--export", "type=nbd,id=e,node-name=f,name=theirs,writable=on",
        "--pidfile", str(pidfile), "--daemonize",
    )  # fmt: skip
    try:
        theirs = nbd.free_devices()[0]
        await nbd.connect(theirs, foreign_sock, "theirs", "someone-else")
        left = kubelet.state_dir / "apps_pvc-1"
        left.mkdir(parents=True, mode=0o700)
        (left / "nbd.device").write_text(theirs + "\n")  # what a crash after choosing it leaves

        await kubelet.stage()
        await kubelet.publish()
        ours = mounts()[str(kubelet.staging)]
        assert ours.startswith("/dev/nbd") and ours != theirs
        await asyncio.to_thread(write_synced, kubelet.target / "f", b"ours")
        await kubelet.unpublish()
        await kubelet.unstage()
        assert nbd.connected(theirs) and nbd.backend(theirs) == "someone-else"
        assert not nbd.connected(ours)
        assert await asyncio.to_thread(first_block, theirs) == b"\x5a" * 4096
        await asyncio.to_thread(nbd.disconnect, theirs)
    finally:
        os.kill(int(pidfile.read_text()), signal.SIGTERM)


def first_block(device: str) -> bytes:
    with open(device, "rb") as f:
        return f.read(4096)


async def test_a_mounted_partition_of_a_block_volume_keeps_it_from_being_unstaged(
    kubelet: Kubelet,  # noqa: F811 - fixtures
    tmp_path: Path,
) -> None:
    """A Block volume holding a partitioned disk (a VM's): the node's kernel reads its
    partition table, and a partition mounted on the node (or an LVM on it) uses the device:
    unstaging is refused until it is released, and nothing is lost."""
    kubelet.target = kubelet.target.parent / "pvc-1-block"
    await kubelet.stage(block=True)
    await kubelet.publish(block=True)
    mbr = bytearray(512)
    mbr[446:462] = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + struct.pack("<II", 2048, 64 * 2048)
    mbr[510:512] = b"\x55\xaa"
    fd = os.open(kubelet.target, os.O_RDWR)
    try:
        os.pwrite(fd, bytes(mbr), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    device = next(d for d in await devices_of(kubelet.state_dir))
    await run("blockdev", "--rereadpt", device)
    await run("mkfs.ext4", "-q", f"{device}p1")
    part = tmp_path / "partition"
    part.mkdir()
    await run("mount", f"{device}p1", str(part))
    try:
        await asyncio.to_thread(write_synced, part / "inside", b"a file on a partition")
        await kubelet.unpublish()
        with pytest.raises(grpc.aio.AioRpcError) as busy:
            await kubelet.unstage()
        assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION and str(part) in busy.value.details()
        assert nbd.connected(device)
        assert (part / "inside").read_bytes() == b"a file on a partition"
    finally:
        await run("umount", str(part))
    await kubelet.unstage()
    assert not nbd.connected(device)
