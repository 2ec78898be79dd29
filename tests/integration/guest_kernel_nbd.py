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
from pathlib import Path

import grpc
import pytest

from pairvol.agent import crashpoints
from pairvol.csi import nbd
from pairvol.csi.attach import STAGE_NBD_RECORDED
from tests.integration.test_csi_expand import NEW, grow_replicas, node_expand
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
    write_synced,
)
from tests.support.csi import Stubs, driver, node_plugin_security

pytestmark = [pytest.mark.timeout(300)]

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _in_a_guest_with_nbd() -> None:
    assert TRANSPORT == "nbd", "run by test_csi_kernel_nbd.py with PAIRVOL_TEST_ATTACH_TRANSPORT=nbd"
    assert nbd.unavailable() is None, nbd.unavailable()


@pytest.fixture
def volume_size() -> str:
    return "320Mi"  # xfs: ext4 grows online only with CAP_SYS_RESOURCE (test_csi_expand.py)


async def test_a_kernel_nbd_attachment_takes_a_new_size_when_it_is_attached_anew(
    kubelet: Kubelet,  # noqa: F811 - fixtures
    volume: Volume,  # noqa: F811 - fixtures
) -> None:
    await kubelet.stage(fs_type="xfs")
    await kubelet.publish(fs_type="xfs")
    device = mounts()[str(kubelet.staging)]
    assert device.startswith("/dev/nbd") and nbd.connected(device)
    before = os.statvfs(kubelet.target)
    await asyncio.to_thread(write_synced, kubelet.target / "kept", b"k" * MiB)
    await grow_replicas(volume, NEW)

    with pytest.raises(grpc.aio.AioRpcError) as offline:
        await node_expand(kubelet, NEW, kubelet.target, fs_type="xfs")
    assert offline.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "restart the pod" in offline.value.details()
    # the volume still serves the pod at its old size, across the primary's restart
    await asyncio.to_thread(write_synced, kubelet.target / "after-the-grow", b"a" * MiB)
    assert nbd.size(device) < NEW

    await kubelet.unpublish()
    await kubelet.unstage()
    assert not await devices_of(kubelet.state_dir)
    await kubelet.stage(fs_type="xfs")  # the pod restarted: a new attachment, at the new size
    await kubelet.publish(fs_type="xfs")
    resp = await node_expand(kubelet, NEW, kubelet.target, fs_type="xfs")  # the kubelet grows the fs
    assert resp.capacity_bytes == NEW
    after = os.statvfs(kubelet.target)
    assert after.f_blocks * after.f_frsize > before.f_blocks * before.f_frsize + 70 * MiB
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
