"""The CSI node plugin with real agents: what the kubelet does to a pod's volume.

The kubelet's calls go through stubs compiled from the upstream csi.proto (the driver's
own where a clone lacks the reference; tests/support/csi.py); the node plugin runs with its pod's privileges
(pairvol.csi.manifests); the volume is a replicating pair of real agents whose primary
serves its export over TCP with TLS-PSK, as the operator runs them. Each test checks what
a user would see: files written through the mounted file system come back after the
volume is unstaged and staged again, a Block volume's bytes are the volume's bytes, a
volume that holds data is never formatted, and a failover of the volume does not reach
the pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shlex
import shutil
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from pairvol.aio import bounded
from pairvol.csi import DRIVER_NAME
from pairvol.csi.attach import Attachment, mount_points, run
from pairvol.csi.identity import VOLUME_ACCESSIBILITY_CONSTRAINTS
from pairvol.kube.client import KubeClient
from pairvol.kube.config import load_config
from pairvol.localcluster.cluster import LocalCluster
from tests.support.agents import Agent, free_port, pair, privileges, running_as, write_psk
from tests.support.ci import unavailable
from tests.support.csi import Driver, Stubs, compile_stubs, driver, node_plugin_security, shared_mounts

pytestmark = pytest.mark.timeout(120)

#: how the node plugin attaches: FUSE + loop here; the kernel's nbd client when these tests
#: run in a guest whose kernel has the module (tests/integration/test_csi_kernel_nbd.py)
TRANSPORT = os.environ.get("PAIRVOL_TEST_ATTACH_TRANSPORT", "fuse")
DEVICE_PREFIX = "/dev/nbd" if TRANSPORT == "nbd" else "/dev/loop"

SINGLE_NODE_WRITER = 1
MULTI_NODE_MULTI_WRITER = 5
STAGE_UNSTAGE_VOLUME, GET_VOLUME_STATS, EXPAND_VOLUME, VOLUME_CONDITION = 1, 2, 3, 4
BYTES, INODES = 1, 2


@pytest.fixture(scope="session")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Stubs:
    """The kubelet's and the sidecars' view of the protocol (see tests/support/csi.py)."""
    return compile_stubs(tmp_path_factory.mktemp("csi-stubs"))


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        unavailable("the node plugin mounts file systems and creates loop devices: needs root")


@dataclass
class Kubelet:
    """The node plugin's caller, with the paths the kubelet would use for one pod."""

    pb: Any
    node: Any
    identity: Any
    state_dir: Path
    staging: Path
    target: Path
    psk: str
    export: str
    plugin: Driver

    def capability(self, block: bool = False, fs_type: str = "", mode: int = SINGLE_NODE_WRITER) -> Any:
        cap = self.pb.VolumeCapability(access_mode=self.pb.VolumeCapability.AccessMode(mode=mode))
        if block:
            cap.block.SetInParent()
        else:
            cap.mount.fs_type = fs_type
        return cap

    async def stage(self, volume_id: str = "apps/pvc-1", **kw: Any) -> Any:
        secrets = kw.pop("secrets", {"psk": self.psk})
        context = kw.pop("volume_context", {"exportAddress": self.export})
        cap = kw.pop("capability") if "capability" in kw else self.capability(**kw)
        req = self.pb.NodeStageVolumeRequest(
            volume_id=volume_id,
            staging_target_path=str(self.staging),
            volume_capability=cap,
            secrets=secrets,
            volume_context=context,
        )
        return await self.node.NodeStageVolume(req, timeout=60)

    async def unstage(self, volume_id: str = "apps/pvc-1") -> Any:
        req = self.pb.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=str(self.staging))
        return await self.node.NodeUnstageVolume(req, timeout=60)

    async def publish(self, volume_id: str = "apps/pvc-1", readonly: bool = False, **kw: Any) -> Any:
        req = self.pb.NodePublishVolumeRequest(
            volume_id=volume_id,
            staging_target_path=str(self.staging),
            target_path=str(self.target),
            volume_capability=self.capability(**kw),
            readonly=readonly,
            volume_context={"exportAddress": self.export},
        )
        return await self.node.NodePublishVolume(req, timeout=60)

    async def stats(self, volume_id: str = "apps/pvc-1") -> Any:
        req = self.pb.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=str(self.target))
        return await self.node.NodeGetVolumeStats(req, timeout=60)

    async def unpublish(self, volume_id: str = "apps/pvc-1") -> Any:
        req = self.pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(self.target))
        return await self.node.NodeUnpublishVolume(req, timeout=60)


def write_synced(path: Path, data: bytes) -> None:
    """Write a file as a careful application does: write, fsync."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


async def exited(pid: int) -> None:
    """Until ``pid`` has exited (gone, or a zombie: its cmdline is empty)."""

    def running() -> bool:
        try:
            return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
        except (FileNotFoundError, ProcessLookupError):
            return False

    while True:
        if not await asyncio.to_thread(running):
            return
        await asyncio.sleep(0.02)


def mounts() -> dict[str, str]:
    return mount_points(Path("/proc/self/mountinfo").read_text())


async def devices_of(state_dir: Path) -> list[str]:
    """The loop devices over files under ``state_dir`` and the connected nbd devices its
    attachments recorded: what an attachment sets up, looked at from outside."""
    proc = await asyncio.create_subprocess_exec(
        "losetup", "--noheadings", "--output", "NAME,BACK-FILE", "--list", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    found = [line.split()[0] for line in out.decode().splitlines() if str(state_dir) in line]
    return found + await asyncio.to_thread(connected_nbd_devices, state_dir)


def connected_nbd_devices(state_dir: Path) -> list[str]:
    found = []
    for recorded in state_dir.glob("*/nbd.device"):
        name = Path(recorded.read_text().strip()).name
        if (Path("/sys/block") / name / "pid").exists():
            found.append(f"/dev/{name}")
    return found


@dataclass
class Volume:
    primary: Agent
    secondary: Agent
    export_port: int
    psk: str


@pytest.fixture
def volume_size() -> str:
    return "64Mi"


@pytest.fixture
async def volume(tmp_path: Path, volume_size: str) -> AsyncIterator[Volume]:
    """A replicating pair whose primary serves the volume on 127.0.0.1:PORT with TLS-PSK;
    the secondary serves the same address once promoted (as the Service would). Both disks
    are new (all zeros), so replication starts without a sync."""
    port = free_port()
    psk = write_psk(tmp_path / "psk")
    async with pair(
        tmp_path, size=volume_size, sync="none", psk_file=psk, extra_args=["--export-listen", f"127.0.0.1:{port}"]
    ) as (p, s):
        yield Volume(p, s, port, psk.read_text().strip())


@pytest.fixture
async def kubelet(tmp_path: Path, volume: Volume, stubs: Stubs) -> AsyncIterator[Kubelet]:
    async with node_plugin(tmp_path, volume, stubs) as k:
        yield k


@contextlib.asynccontextmanager
async def node_plugin(
    tmp_path: Path, volume: Volume, stubs: Stubs, *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[Kubelet]:
    """The node plugin (with its pod's privileges, ``args`` and ``env``) and its caller;
    afterwards everything is torn down through the plugin and checked to be gone."""
    state = tmp_path / "csi-state"
    pods = tmp_path / "kubelet"
    plan = node_plugin_security()
    # as on a node: the kubelet directory and the plugin's state directory are shared mounts
    # (the chart's Bidirectional propagation), so a process started meanwhile (an agent of
    # this test, or of another pytest process) gets copies that the plugin's unmounts reach
    async with shared_mounts(pods, state), driver(
        tmp_path,
        "node",
        "--node-id",
        "node-a",
        "--state-dir",
        str(state),
        "--attach-transport",
        TRANSPORT,
        *args,
        security=plan,
        env=env,
    ) as d:
        assert privileges(d.proc.pid) == running_as(plan)
        k = Kubelet(
            pb=stubs.pb,
            node=stubs.grpc.NodeStub(d.channel),
            identity=stubs.grpc.IdentityStub(d.channel),
            state_dir=state,
            staging=pods / "plugins/kubernetes.io/csi/pairvol.io/vol/globalmount",
            target=pods / "pods/uid-1/volumes/kubernetes.io~csi/pvc-1/mount",
            psk=volume.psk,
            export=f"127.0.0.1:{volume.export_port}",
            plugin=d,
        )
        try:
            yield k
        finally:
            # whatever a failed test left: tear it down through the plugin, then check
            for vid in ("apps/pvc-1",):
                for step in (k.unpublish, k.unstage):
                    # refused, or a test replaced the plugin and closed its channel
                    with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):
                        await step(vid)
            # a failed test may leave a publication the plugin refuses to tear down under:
            # clean up by hand first (so nothing outlives the test), then fail
            leftover = [m for m in mounts() if str(tmp_path) in m and m not in (str(pods), str(state))]
            for path in sorted(leftover, key=len, reverse=True):
                await run("umount", "-l", path, check=False)
            await Attachment(state, "apps/pvc-1").unstage(None)
            assert not leftover, f"mounts left behind: {leftover}"
            assert not await devices_of(state), "loop devices left behind"


async def test_node_plugin_identifies_itself_and_its_capabilities(kubelet: Kubelet) -> None:
    pb = kubelet.pb
    info = await kubelet.identity.GetPluginInfo(pb.GetPluginInfoRequest())
    assert info.name == DRIVER_NAME
    assert (await kubelet.identity.Probe(pb.ProbeRequest())).ready.value is True
    caps = await kubelet.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest())
    # no Controller service; a topology, as NodeGetInfo reports one (the spec ties the two);
    # volumes grow while published (this plugin: NodeExpandVolume)
    assert [c.service.type for c in caps.capabilities if c.HasField("service")] == [VOLUME_ACCESSIBILITY_CONSTRAINTS]
    assert [c.volume_expansion.type for c in caps.capabilities if c.HasField("volume_expansion")] == [1]
    node = await kubelet.node.NodeGetInfo(pb.NodeGetInfoRequest())
    assert node.node_id == "node-a"
    assert dict(node.accessible_topology.segments) == {"topology.pairvol.io/node": "node-a"}
    ncaps = await kubelet.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest())
    assert [c.rpc.type for c in ncaps.capabilities] == [
        STAGE_UNSTAGE_VOLUME,
        GET_VOLUME_STATS,
        EXPAND_VOLUME,
        VOLUME_CONDITION,
    ]


async def test_files_survive_unstage_and_restage_and_a_restart_of_the_node_plugin(
    kubelet: Kubelet, tmp_path: Path
) -> None:
    await kubelet.stage()
    await kubelet.stage()  # idempotent
    await kubelet.publish()
    await kubelet.publish()  # idempotent
    assert mounts()[str(kubelet.staging)].startswith(DEVICE_PREFIX)
    data = os.urandom(3 << 20)
    await asyncio.to_thread(write_synced, kubelet.target / "data.bin", data)
    stats = await kubelet.stats()
    usage = {u.unit: u for u in stats.usage}
    assert 32 << 20 < usage[BYTES].total <= 64 << 20  # the file system on the 64 MiB volume
    assert usage[BYTES].used >= len(data) and usage[BYTES].available < usage[BYTES].total - len(data)
    assert usage[INODES].used > 0 and usage[INODES].total > usage[INODES].used
    assert not stats.volume_condition.abnormal and kubelet.export in stats.volume_condition.message

    await kubelet.unpublish()
    await kubelet.unpublish()  # idempotent
    assert not kubelet.target.exists()
    await kubelet.unstage()
    await kubelet.unstage()  # idempotent
    assert str(kubelet.staging) not in mounts()
    assert not await devices_of(kubelet.state_dir)

    await kubelet.stage()  # the file system is there: mounted, not made again
    await kubelet.publish()
    assert (kubelet.target / "data.bin").read_bytes() == data

    with pytest.raises(grpc.aio.AioRpcError) as busy:
        await kubelet.unstage()  # still published: nothing is torn down under the pod
    assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION and str(kubelet.target) in busy.value.details()
    assert (kubelet.target / "data.bin").read_bytes() == data
    await kubelet.unpublish()

    # a read-only publication: reads work, writes are refused by the mount
    kubelet.target = kubelet.target.parent.parent / "pvc-1-ro" / "mount"
    await kubelet.publish(readonly=True)
    assert await asyncio.to_thread((kubelet.target / "data.bin").read_bytes) == data
    with pytest.raises(OSError) as rofs:
        await asyncio.to_thread(write_synced, kubelet.target / "new", b"x")
    assert rofs.value.errno == errno.EROFS
    with pytest.raises(grpc.aio.AioRpcError) as differs:
        await kubelet.publish(readonly=False)  # the same target asked read-write
    assert differs.value.code() == grpc.StatusCode.ALREADY_EXISTS
    await kubelet.unpublish()


async def test_a_restarted_node_plugin_tears_down_what_the_previous_one_built(
    kubelet: Kubelet, tmp_path: Path, stubs: Stubs
) -> None:
    await kubelet.stage()
    await kubelet.publish()
    (kubelet.target / "before").write_text("written before the restart\n")
    plan = node_plugin_security()
    # the plugin crashes; the attachment is no child of it and stays, the pod keeps its files
    os.kill(kubelet.plugin.proc.pid, signal.SIGKILL)
    await kubelet.plugin.proc.wait()
    assert (kubelet.target / "before").read_text() == "written before the restart\n"
    # its successor knows nothing but the state directory
    async with driver(
        tmp_path,
        "node",
        "--node-id",
        "node-a",
        "--state-dir",
        str(kubelet.state_dir),
        "--attach-transport",
        TRANSPORT,
        security=plan,
        name="csi2",
    ) as d:
        kubelet.node = stubs.grpc.NodeStub(d.channel)
        await kubelet.publish()  # idempotent across processes
        assert (kubelet.target / "before").read_text() == "written before the restart\n"
        await kubelet.unpublish()
        await kubelet.unstage()
    assert str(kubelet.staging) not in mounts()
    assert not await devices_of(kubelet.state_dir)


@pytest.mark.parametrize("volume_size", ["300Mi"])
async def test_xfs_is_made_when_asked_and_then_kept(kubelet: Kubelet) -> None:
    await kubelet.stage(fs_type="xfs")
    await kubelet.publish(fs_type="xfs")
    assert mounts()[str(kubelet.staging)].startswith(DEVICE_PREFIX)
    await asyncio.to_thread(write_synced, kubelet.target / "x", b"on xfs\n")
    await kubelet.unpublish()
    await kubelet.unstage()
    # asked for ext4 later, the volume keeps its xfs file system and says so
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await kubelet.stage(fs_type="ext4")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "holds an xfs file system but ext4 was requested" in refused.value.details()
    await kubelet.unstage()
    await kubelet.stage(fs_type="xfs")
    await kubelet.publish(fs_type="xfs")
    assert await asyncio.to_thread((kubelet.target / "x").read_bytes) == b"on xfs\n"


def tools_without(directory: Path, missing: str) -> str:
    """A PATH of one directory holding every program of this process's PATH (links) except
    ``missing``: a node whose image lacks that one tool."""
    directory.mkdir()
    for entry in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/sbin", "/usr/bin", "/sbin", "/bin"]:
        if not entry or not os.path.isdir(entry):
            continue
        for program in os.scandir(entry):
            link = directory / program.name
            if program.name != missing and not link.exists() and os.access(program.path, os.X_OK):
                link.symlink_to(program.path)
    return str(directory)


@pytest.mark.parametrize("volume_size", ["300Mi"])
async def test_a_file_system_the_node_cannot_make_is_refused_before_anything_is_built(
    tmp_path: Path, volume: Volume, stubs: Stubs
) -> None:
    """mkfs.xfs is not installed where the node plugin runs: NodeStageVolume of an xfs volume
    fails with FAILED_PRECONDITION (the spec's "exceeds capabilities": this node cannot give
    the volume the capability asked for) saying what to install, and leaves nothing behind:
    no attacher, no loop device, no mount, no record. Installed, the same call succeeds."""
    bin_dir = tmp_path / "bin"
    env = {**os.environ, "PATH": tools_without(bin_dir, "mkfs.xfs")}
    async with node_plugin(tmp_path, volume, stubs, env=env) as kubelet:
        for _ in range(2):  # the kubelet retries; every try is refused the same way
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await kubelet.stage(fs_type="xfs")
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert refused.value.details() == (
                "fsType xfs is not available on node node-a: mkfs.xfs is not installed where the node plugin runs; "
                "install it (package xfsprogs) in the node plugin's image, or use another fsType "
                "(csi.storage.k8s.io/fstype of the StorageClass)"
            )
        assert [m for m in mounts() if str(tmp_path) in m] == [str(tmp_path / "kubelet"), str(kubelet.state_dir)]
        assert await devices_of(kubelet.state_dir) == []
        assert not kubelet.state_dir.exists() or list(kubelet.state_dir.iterdir()) == [], "no attachment was begun"
        assert not await qemu_daemons_under(kubelet.state_dir), "no attacher was started"

        # xfsprogs installed: the kubelet's next try stages, makes the file system, mounts it
        mkfs = shutil.which("mkfs.xfs")
        assert mkfs is not None
        (bin_dir / "mkfs.xfs").symlink_to(mkfs)
        await kubelet.stage(fs_type="xfs")
        assert await qemu_daemons_under(kubelet.state_dir), "the attacher runs (what was looked for above)"
        await kubelet.publish(fs_type="xfs")
        assert mounts()[str(kubelet.staging)].startswith(DEVICE_PREFIX)
        assert (await run("findmnt", "-n", "-o", "FSTYPE", str(kubelet.staging)))[1].strip() == "xfs"
        await asyncio.to_thread(write_synced, kubelet.target / "x", b"on xfs\n")


async def qemu_daemons_under(directory: Path) -> list[int]:
    """qemu-storage-daemon processes whose command line names ``directory`` (an attacher
    keeps its sockets there)."""

    def scan() -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    argv = (entry / "cmdline").read_bytes().split(b"\0")
                    if argv[0].endswith(b"qemu-storage-daemon") and any(str(directory).encode() in a for a in argv):
                        found.append(int(entry.name))
        return found

    return await asyncio.to_thread(scan)


async def test_block_volume_is_the_volume_and_is_never_formatted(kubelet: Kubelet, volume: Volume) -> None:
    kubelet.target = kubelet.target.parent / "pvc-1-block"
    await kubelet.stage(block=True)
    await kubelet.publish(block=True)
    assert kubelet.target.is_block_device()  # the device, bind-mounted on the file the plugin made
    payload = os.urandom(1 << 20)
    fd = os.open(kubelet.target, os.O_RDWR)
    try:
        os.pwrite(fd, payload, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    async with await volume.primary.nbd() as nbd:
        assert await nbd.pread(1 << 20, 0) == payload  # the pod's bytes are the volume's bytes
    stats = await kubelet.stats()
    assert [(u.unit, u.total) for u in stats.usage] == [(BYTES, 64 << 20)]
    with pytest.raises(grpc.aio.AioRpcError) as busy:
        await kubelet.unstage()  # the device is still bound onto the pod's file
    assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION and str(kubelet.target) in busy.value.details()
    await kubelet.unpublish()
    await kubelet.unstage()

    # the volume holds data but no file system: staging it as a file system refuses
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await kubelet.stage()
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "refusing to format" in refused.value.details()
    await kubelet.unstage()
    async with await volume.primary.nbd() as nbd:
        assert await nbd.pread(1 << 20, 0) == payload


async def test_bad_requests_get_the_codes_of_the_spec(kubelet: Kubelet, volume: Volume) -> None:
    async def code(call: Any) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        return err.value.code(), err.value.details()

    c, text = await code(kubelet.stage(secrets={}))
    assert c == grpc.StatusCode.INVALID_ARGUMENT and "node-stage-secret-name" in text
    c, text = await code(kubelet.stage(volume_context={}))
    assert c == grpc.StatusCode.INVALID_ARGUMENT and "exportAddress" in text
    c, text = await code(kubelet.stage(volume_id=""))
    assert c == grpc.StatusCode.INVALID_ARGUMENT and "volume_id" in text
    c, text = await code(kubelet.stage(capability=kubelet.pb.VolumeCapability()))
    assert c == grpc.StatusCode.INVALID_ARGUMENT and "block or mount" in text
    c, text = await code(kubelet.stage(mode=MULTI_NODE_MULTI_WRITER))
    assert c == grpc.StatusCode.FAILED_PRECONDITION and "MULTI_NODE_MULTI_WRITER" in text
    c, text = await code(kubelet.stage(fs_type="btrfs"))
    assert c == grpc.StatusCode.INVALID_ARGUMENT and "btrfs" in text
    c, text = await code(kubelet.publish())
    assert c == grpc.StatusCode.FAILED_PRECONDITION and "NodeStageVolume first" in text
    c, text = await code(kubelet.stats())
    assert c == grpc.StatusCode.NOT_FOUND and "not staged" in text
    c, text = await code(kubelet.unstage(".."))  # a volume ID names a directory of the plugin
    assert c == grpc.StatusCode.INVALID_ARGUMENT and "NAMESPACE/NAME" in text
    c, text = await code(
        kubelet.node.NodeUnstageVolume(
            kubelet.pb.NodeUnstageVolumeRequest(volume_id="apps/pvc-1", staging_target_path="relative/dir")
        )
    )
    assert c == grpc.StatusCode.INVALID_ARGUMENT and "absolute path" in text
    c, text = await code(kubelet.stage(fs_type="xfs"))  # the volume is 64 MiB
    assert c == grpc.StatusCode.FAILED_PRECONDITION and "at least 300 MiB" in text
    await kubelet.unstage()

    # nothing listens there: the kubelet may retry later
    kubelet.export = f"127.0.0.1:{free_port()}"
    c, text = await code(kubelet.stage(volume_id="apps/pvc-2"))
    assert c == grpc.StatusCode.UNAVAILABLE and kubelet.export in text
    await kubelet.unstage("apps/pvc-2")
    assert not (kubelet.state_dir / "apps_pvc-2").exists()

    # a key that is not the volume's: the TLS handshake fails
    kubelet.export = f"127.0.0.1:{volume.export_port}"
    kubelet.psk = "pairvol:" + "00" * 32
    c, text = await code(kubelet.stage(volume_id="apps/pvc-3"))
    assert c == grpc.StatusCode.UNAVAILABLE
    await kubelet.unstage("apps/pvc-3")


def write_in_place(path: Path, data: bytes) -> None:
    """Overwrite a file's start and fsync (a database page write)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


async def test_the_mounted_file_system_rides_through_a_latest_mode_failover(kubelet: Kubelet, volume: Volume) -> None:
    """The primary dies; the pod's writes wait until the secondary, promoted in Latest
    mode, serves the same address; then they complete and nothing acknowledged is lost."""
    await kubelet.stage()
    await kubelet.publish()
    before = os.urandom(1 << 20)
    await asyncio.to_thread(write_synced, kubelet.target / "before.bin", before)
    await asyncio.to_thread(write_synced, kubelet.target / "during.bin", b"\0" * (256 << 10))

    loop = asyncio.get_running_loop()
    volume.primary.kill()
    await volume.primary.wait_exit()
    killed = loop.time()
    during = os.urandom(256 << 10)
    writing = asyncio.create_task(asyncio.to_thread(write_in_place, kubelet.target / "during.bin", during))
    await asyncio.sleep(1.0)
    assert not writing.done(), "a write completed while no primary served the volume"
    promoting = loop.time()
    await volume.secondary.failover(3, "latest")
    promoted = loop.time()
    await bounded(writing, 30)  # completed: no I/O error reached the pod
    print(
        f"primary killed; promotion began +{promoting - killed:.2f} s, done +{promoted - killed:.2f} s; "
        f"the pod's fsync returned +{loop.time() - killed:.2f} s (attacher reconnect included)"
    )

    assert await asyncio.to_thread((kubelet.target / "before.bin").read_bytes) == before
    assert await asyncio.to_thread((kubelet.target / "during.bin").read_bytes) == during
    await kubelet.unpublish()
    await kubelet.unstage()
    # what the new primary holds is the whole file system, journal and all
    await kubelet.stage()
    await kubelet.publish()
    assert await asyncio.to_thread((kubelet.target / "during.bin").read_bytes) == during


async def mount_namespace_holder(kubelet_dir: Path) -> asyncio.subprocess.Process:
    """A process in a copy of this machine's mount namespace, made now, in which the
    kubelet directory's mounts are private: what a container started on the node while a
    volume is mounted there holds when the node's unmounts do not reach it
    (``mountPropagation: None``). Only that directory is made private there: other tests'
    mounts (another pytest process's local cluster) keep their propagation, so this holder
    holds nothing of theirs."""
    ours = os.readlink("/proc/self/ns/mnt")
    proc = await asyncio.create_subprocess_exec(
        "unshare", "--mount", "--propagation", "unchanged", "sh", "-c",
        f"mount --make-rprivate {shlex.quote(str(kubelet_dir))} && exec sleep 600",
    )  # fmt: skip

    def ready() -> bool:
        with contextlib.suppress(OSError):
            return Path(f"/proc/{proc.pid}/comm").read_text().strip() == "sleep" and (
                os.readlink(f"/proc/{proc.pid}/ns/mnt") != ours
            )
        return False

    while True:
        if await asyncio.to_thread(ready):
            return proc
        await asyncio.sleep(0.02)


async def fsck_through_the_primary(volume: Volume, work: Path) -> tuple[int, str]:
    """``e2fsck -fn`` of the volume as its primary serves it (read through its export)."""
    image = work / "fsck.img"
    client = await volume.primary.nbd()
    try:
        chunks = [await client.pread(min(4 << 20, client.size - at), at) for at in range(0, client.size, 4 << 20)]
    finally:
        await client.close()
    await asyncio.to_thread(image.write_bytes, b"".join(chunks))
    proc = await asyncio.create_subprocess_exec(
        "e2fsck", "-fn", str(image), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def test_an_unstage_never_detaches_a_file_system_still_mounted_in_another_namespace(
    kubelet: Kubelet, volume: Volume, tmp_path: Path
) -> None:
    """The plugin's unmount ends the file system only where nothing else holds a copy of
    the mount. A process whose mount namespace was made while the volume was mounted keeps
    the file system alive: it writes its journal and superblock when that copy goes. The
    unstage is refused (the kubelet retries), nothing is detached, and once the copy is gone
    the retry detaches a clean file system."""
    await kubelet.stage()
    await kubelet.publish()
    data = os.urandom(1 << 20)
    await asyncio.to_thread(write_synced, kubelet.target / "data.bin", data)
    holder = await mount_namespace_holder(tmp_path / "kubelet")
    try:
        await kubelet.unpublish()
        with pytest.raises(grpc.aio.AioRpcError) as held:
            await kubelet.unstage()
        assert held.value.code() == grpc.StatusCode.FAILED_PRECONDITION, held.value.details()
        assert f"process {holder.pid} (sleep)" in held.value.details()
        assert await devices_of(kubelet.state_dir), "the device was detached under a live file system"
        assert await Attachment(kubelet.state_dir, "apps/pvc-1").attacher_running()
    finally:
        holder.kill()
        await holder.wait()
    # the copy went with its process: the file system's last writes went through the attachment
    await kubelet.unstage()
    assert not await devices_of(kubelet.state_dir)
    # clean: not a journal left to replay and counts that were never written (the detach
    # under the live file system left "skipping journal recovery", "Free blocks count wrong")
    rc, out = await fsck_through_the_primary(volume, tmp_path)
    assert rc == 0 and "journal" not in out and "Fix?" not in out, out

    await kubelet.stage()
    await kubelet.publish()
    assert await asyncio.to_thread((kubelet.target / "data.bin").read_bytes) == data


def write_unsynced(path: Path, data: bytes, offset: int) -> int:
    """Write without fsync and keep the device open (its last close would flush it): the bytes
    stay in the device's page cache until something flushes it. Returns the descriptor."""
    fd = os.open(path, os.O_WRONLY)
    os.pwrite(fd, data, offset)
    return fd


async def read_through_the_primary(volume: Volume, length: int, offset: int) -> bytes:
    client = await volume.primary.nbd()
    try:
        return await client.pread(length, offset)
    finally:
        await client.close()


async def test_an_unstage_whose_flush_the_primary_does_not_answer_detaches_nothing_until_the_flush_returns(
    volume: Volume, stubs: Stubs, tmp_path: Path
) -> None:
    """A primary that stopped answering (the daemon serving its TCP export frozen, the
    connection open) keeps the device's flush waiting. The unstage fails after the plugin's
    flush timeout with nothing detached, a retry says that flush has not returned yet, and
    once the primary answers again the flush carries the last writes to it and the retry
    detaches. Detaching at the timeout would have dropped those writes: they were in the
    device's page cache only."""
    async with node_plugin(tmp_path, volume, stubs, "--unstage-flush-timeout", "2") as kubelet:
        await kubelet.stage(block=True)
        await kubelet.publish(block=True)
        data, offset = os.urandom(1 << 20), 8 << 20
        (device,) = await devices_of(kubelet.state_dir)
        # written through the device (the bind would be busy), which stays open: its last
        # close would flush it, and the unstage's flush is to be the one that carries them
        writer = await asyncio.to_thread(write_unsynced, Path(device), data, offset)
        try:
            assert await read_through_the_primary(volume, len(data), offset) == bytes(len(data)), "written back"
            relay = int((volume.primary.data_dir / ".run" / "relay.pid").read_text())
            os.kill(relay, signal.SIGSTOP)
            try:
                await kubelet.unpublish()
                with pytest.raises(grpc.aio.AioRpcError) as late:
                    await kubelet.unstage()
                assert late.value.code() == grpc.StatusCode.INTERNAL, late.value.details()
                assert "has not returned within 2 s" in late.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as pending:
                    await kubelet.unstage()  # the kubelet's retry
                assert "has not returned yet" in pending.value.details(), pending.value.details()
                assert await devices_of(kubelet.state_dir), "the device was detached under a pending flush"
                assert await Attachment(kubelet.state_dir, "apps/pvc-1").attacher_running()
            finally:
                os.kill(relay, signal.SIGCONT)
        finally:
            await asyncio.to_thread(os.close, writer)
        deadline = asyncio.get_running_loop().time() + 30
        while True:  # the kubelet retries until the flush has returned
            try:
                await kubelet.unstage()
                break
            except grpc.aio.AioRpcError as exc:
                assert "has not returned yet" in exc.details(), exc.details()
                assert asyncio.get_running_loop().time() < deadline, "the flush never returned"
                await asyncio.sleep(0.2)
        assert not await devices_of(kubelet.state_dir)
        assert await read_through_the_primary(volume, len(data), offset) == data


async def test_an_unstage_whose_flush_fails_detaches_nothing_while_the_attacher_could_still_carry_the_writes(
    kubelet: Kubelet, volume: Volume
) -> None:
    """The primary's export goes away without a failover (its daemon killed): a pinned
    attachment's I/O fails once its reconnects have been refused for a while, and so does the
    unstage's flush. The unstage fails with nothing detached, since the attacher could still
    carry those writes to a primary that comes back; once nothing can carry them any more
    (the attacher is gone), it goes on."""
    context = {"exportAddress": kubelet.export, "failoverMode": "Checkpoint"}
    await kubelet.stage(volume_context=context, block=True)
    await kubelet.publish(block=True)
    (device,) = await devices_of(kubelet.state_dir)
    writer = await asyncio.to_thread(write_unsynced, Path(device), os.urandom(1 << 20), 8 << 20)
    try:
        relay = int((volume.primary.data_dir / ".run" / "relay.pid").read_text())
        os.kill(relay, signal.SIGKILL)
        await kubelet.unpublish()
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await kubelet.unstage()
        assert failed.value.code() == grpc.StatusCode.INTERNAL, failed.value.details()
        assert "failed (Input/output error)" in failed.value.details(), failed.value.details()
        assert await devices_of(kubelet.state_dir) == [device], "the device was detached after a failed flush"
        att = Attachment(kubelet.state_dir, "apps/pvc-1")
        assert await att.attacher_running()
        pid = att.attacher_pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # e.g. the OOM killer: now nothing can carry those writes
        await bounded(exited(pid), 10)
    finally:
        await asyncio.to_thread(os.close, writer)
    await kubelet.unstage()
    assert not await devices_of(kubelet.state_dir)


async def test_an_attachment_whose_attacher_died_is_reported_and_rebuilt_by_unstaging(kubelet: Kubelet) -> None:
    await kubelet.stage()
    await kubelet.publish()
    data = os.urandom(1 << 20)
    await asyncio.to_thread(write_synced, kubelet.target / "kept.bin", data)
    pidfile = kubelet.state_dir / "apps_pvc-1" / "attacher.pid"
    pid = int(pidfile.read_text())
    os.kill(pid, signal.SIGKILL)  # e.g. the OOM killer
    await bounded(exited(pid), 10)
    stats = await kubelet.stats()
    assert stats.volume_condition.abnormal and "attacher" in stats.volume_condition.message

    with pytest.raises(grpc.aio.AioRpcError) as broken:
        await kubelet.stage()  # what a restarted kubelet asks: it cannot be repaired in place
    assert broken.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "unpublish and unstage" in broken.value.details()
    await kubelet.unpublish()
    await kubelet.unstage()
    assert str(kubelet.staging) not in mounts()
    assert not await devices_of(kubelet.state_dir)

    await kubelet.stage()
    await kubelet.publish()
    assert await asyncio.to_thread((kubelet.target / "kept.bin").read_bytes) == data  # fsynced = on the volume


async def test_a_checkpoint_mode_attachment_fails_instead_of_crossing_a_rollback(
    kubelet: Kubelet, volume: Volume
) -> None:
    """A Checkpoint-mode volume's attachment is pinned to its primary's lineage: after a
    failover it is reported abnormal and refused until unstaged; staged anew, it mounts the
    file system as it was at the checkpoint."""
    context = {"exportAddress": kubelet.export, "failoverMode": "Checkpoint"}
    await kubelet.stage(volume_context=context)
    await kubelet.publish()
    kept = os.urandom(1 << 20)
    await asyncio.to_thread(write_synced, kubelet.target / "kept.bin", kept)
    await volume.secondary.checkpoint()
    await asyncio.to_thread(write_synced, kubelet.target / "after-the-cut.bin", b"x" * (64 << 10))
    stats = await kubelet.stats()
    assert not stats.volume_condition.abnormal, stats.volume_condition.message

    volume.primary.kill()
    await volume.primary.wait_exit()
    await volume.secondary.failover(3, "checkpoint")
    stats = await kubelet.stats()
    assert stats.volume_condition.abnormal and "failed over to a checkpoint" in stats.volume_condition.message
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await kubelet.stage(volume_context=context)  # never stacked on the old lineage
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "unstage" in refused.value.details()
    with pytest.raises(OSError) as failed:  # the pod's I/O fails (after the reconnect delay)
        await bounded(asyncio.to_thread(write_synced, kubelet.target / "lost.bin", b"y" * 4096), 30)
    # EIO, or EROFS once the file system has seen a failed journal write and remounted itself
    # read-only (ext4's errors=remount-ro): either way the write fails and nothing crosses.
    assert failed.value.errno in (errno.EIO, errno.EROFS)

    await kubelet.unpublish()
    await kubelet.unstage()
    await kubelet.stage(volume_context=context)  # a new attachment: the new lineage, mounted fresh
    await kubelet.publish()
    assert await asyncio.to_thread((kubelet.target / "kept.bin").read_bytes) == kept
    assert not (kubelet.target / "after-the-cut.bin").exists()
    assert not (await kubelet.stats()).volume_condition.abnormal


async def test_the_volume_condition_is_abnormal_while_the_volume_is_degraded_or_out_of_sync(
    tmp_path: Path, volume: Volume, stubs: Stubs
) -> None:
    """With a cluster connection (read access to the ReplicatedVolumes), the condition also
    carries the replication state: abnormal while Degraded or OutOfSync, normal otherwise."""
    async with LocalCluster(nodes=1) as cluster:
        config = await load_config(str(cluster.kubeconfig_path))
        async with (
            KubeClient(config) as kube,
            node_plugin(tmp_path, volume, stubs, "--kubeconfig", str(cluster.kubeconfig_path)) as kubelet,
        ):
            namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "apps"}}
            await kube.create("/api/v1/namespaces", namespace)
            rv = "/apis/pairvol.io/v1alpha1/namespaces/apps/replicatedvolumes"
            await kube.create(rv, {
                "apiVersion": "pairvol.io/v1alpha1", "kind": "ReplicatedVolume",
                "metadata": {"name": "pvc-1", "namespace": "apps"}, "spec": {"size": "64Mi"},
            })  # fmt: skip
            await kubelet.stage()
            await kubelet.publish()

            async def condition(status: dict[str, Any]) -> tuple[bool, str]:
                await kube.merge_patch(f"{rv}/pvc-1/status", {"status": status})
                stats = await kubelet.stats()
                return stats.volume_condition.abnormal, stats.volume_condition.message

            abnormal, message = await condition({"phase": "Replicating"})
            assert not abnormal and "replication: Replicating" in message
            abnormal, message = await condition({"phase": "Degraded", "message": "secondary node-b is gone"})
            assert abnormal and "Degraded (secondary node-b is gone)" in message
            abnormal, message = await condition(
                {"phase": "Replicating", "secondary": {"node": "node-b", "outOfSync": True}}
            )
            assert abnormal and "node-b is OutOfSync" in message
            abnormal, message = await condition({"phase": "Replicating", "secondary": {"outOfSync": False}})
            assert not abnormal, message
            await kube.delete(f"{rv}/pvc-1")  # the state cannot be read: the node's own view decides
            stats = await kubelet.stats()
            assert not stats.volume_condition.abnormal
            assert "replication state unknown" in stats.volume_condition.message
