"""The attacher host: a node's attachers outlive the node plugin's container.

As in the node DaemonSet's pod, the node plugin and the attacher host run as two
containers: each in a cgroup of its own with the privileges of its container
(pairvol.csi.manifests), sharing the state directory; the plugin is started with
``--attacher-host``. The volume is a replicating pair of real agents serving its export
over TLS-PSK; the attachment is real (qemu-storage-daemon, FUSE, loop device, ext4).
Killing the plugin's container is what a container runtime does when it exits: every
process of its cgroup is SIGKILLed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest

from pairvol.agent import crashpoints
from pairvol.aio import bounded
from pairvol.csi.attach import (
    UNSTAGE_ATTACHER_STOPPED,
    UNSTAGE_LOOP_DETACHED,
    UNSTAGE_UNMOUNTED,
    AttachError,
    Attachment,
    run,
)
from pairvol.localcluster.kubelet import ContainerProcess
from tests.integration.test_csi_node import (  # noqa: F401 (fixtures)
    TRANSPORT,
    Kubelet,
    Volume,
    devices_of,
    mounts,
    stubs,
    volume,
    volume_size,
    write_synced,
)
from tests.support.agents import privileges, running_as
from tests.support.ci import unavailable
from tests.support.csi import (
    Driver,
    Host,
    Stubs,
    attacher_host,
    attacher_host_security,
    container_cgroups,
    driver,
    node_plugin_security,
)

pytestmark = pytest.mark.timeout(90)

VOLUME = "apps/pvc-1"


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        unavailable("the attacher host mounts FUSE exports and the node plugin loop devices: needs root")


@pytest.fixture
def cgroup() -> Iterator[Callable[[str], Path]]:
    with container_cgroups() as make:
        yield make


@pytest.fixture
async def host(tmp_path: Path, cgroup: Callable[[str], Path]) -> AsyncIterator[Host]:
    state = tmp_path / "csi-state"
    plan = attacher_host_security()
    async with attacher_host(tmp_path, state, plan, cgroup("attacher-host")) as h:
        assert privileges(h.proc.pid) == running_as(plan)
        try:
            yield h
        finally:
            # whatever a failed test left is torn down (so nothing outlives it), then it fails
            leftover = [m for m in mounts() if str(tmp_path) in m]
            for path in sorted(leftover, key=len, reverse=True):
                await run("umount", "-l", path, check=False)
            await Attachment(state, VOLUME).unstage(None)
            assert not leftover, f"mounts left behind: {leftover}"


def plugin(
    tmp_path: Path, host: Host, cgroup: Path, name: str, env: dict[str, str] | None = None
) -> contextlib.AbstractAsyncContextManager[Driver]:
    """The node plugin's container: in ``cgroup``, asking ``host`` for its attachers."""
    return driver(
        tmp_path, "node", "--node-id", "node-a", "--state-dir", str(host.socket.parents[1]),
        "--attacher-host", f"unix://{host.socket}", "--attach-transport", TRANSPORT,
        security=node_plugin_security(), name=name, cgroup=cgroup, env=env,
    )  # fmt: skip


def kubelet_of(tmp_path: Path, d: Driver, csi: Stubs, vol: Volume, state: Path) -> Kubelet:
    """The kubelet's calls for one pod, through ``d``."""
    pods = tmp_path / "kubelet"
    return Kubelet(
        pb=csi.pb, node=csi.grpc.NodeStub(d.channel), identity=csi.grpc.IdentityStub(d.channel),
        state_dir=state, staging=pods / "plugins/kubernetes.io/csi/pairvol.io/vol/globalmount",
        target=pods / "pods/uid-1/volumes/kubernetes.io~csi/pvc-1/mount",
        psk=vol.psk, export=f"127.0.0.1:{vol.export_port}", plugin=d,
    )  # fmt: skip


async def built_under(tmp_path: Path, state: Path) -> dict[str, list[str]]:
    """The loop devices over the attachments and the mounts of the test: what staging built."""
    return {"loops": await devices_of(state), "mounts": sorted(m for m in mounts() if str(tmp_path) in m)}


def runs(pid: int) -> bool:
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
    except (FileNotFoundError, ProcessLookupError):
        return False


def read_uncached(path: Path, fuse_file: Path) -> bytes:
    """Read ``path`` from the device, not the page cache: the file's and the FUSE export's
    cached pages (an nbd attachment has no FUSE file) are dropped first, so the bytes come
    through the attacher."""
    for p in (path, fuse_file) if TRANSPORT == "fuse" else (path,):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return path.read_bytes()


async def test_a_mounted_volume_serves_reads_and_writes_while_the_node_plugins_container_is_killed(
    tmp_path: Path,
    volume: Volume,  # noqa: F811 (the fixture)
    stubs: Stubs,  # noqa: F811 (the fixture)
    host: Host,
    cgroup: Callable[[str], Path],
) -> None:
    state = host.socket.parents[1]
    att = Attachment(state, VOLUME)
    async with plugin(tmp_path, host, cgroup("csi-node"), "csi") as d:
        k = kubelet_of(tmp_path, d, stubs, volume, state)
        await k.stage()
        await k.publish()
        built = await built_under(tmp_path, state)
        attacher = att.attacher_pid()
        assert attacher is not None and (await host.attachers.running(att))
        before = os.urandom(1 << 20)
        await asyncio.to_thread(write_synced, k.target / "before.bin", before)

        # the node plugin's container exits: every process in its cgroup is killed
        await ContainerProcess(d.proc, cgroup("csi-node")).kill_all()

        # the pod's volume goes on: its bytes come from the attacher, and writes are durable
        assert att.attacher_pid() == attacher
        assert await asyncio.to_thread(read_uncached, k.target / "before.bin", att.disk) == before
        during = os.urandom(1 << 20)
        await asyncio.to_thread(write_synced, k.target / "during.bin", during)
        assert await asyncio.to_thread(read_uncached, k.target / "during.bin", att.disk) == during

    # the container restarts: the new plugin finds the attachment running (the host says so)
    async with plugin(tmp_path, host, cgroup("csi-node-2"), "csi2") as d2:
        k.node = stubs.grpc.NodeStub(d2.channel)
        stats = await k.stats()
        assert not stats.volume_condition.abnormal, stats.volume_condition.message
        assert "found again, its attacher running" in d2.log_path.read_text()
        await k.stage()  # idempotent: nothing built again
        await k.publish()
        assert await built_under(tmp_path, state) == built
        after = os.urandom(1 << 20)
        await asyncio.to_thread(write_synced, k.target / "after.bin", after)
        for name, data in (("before.bin", before), ("during.bin", during), ("after.bin", after)):
            assert await asyncio.to_thread(read_uncached, k.target / name, att.disk) == data

        # unstaging tears down exactly what was built: mounts, loop device, attacher, files
        await k.unpublish()
        await k.unstage()
        assert not [m for m in mounts() if str(tmp_path) in m]
        assert not await devices_of(state)
        assert not await asyncio.to_thread(runs, attacher)
        assert not att.dir.exists()
        assert not await host.attachers.running(att)
        await k.unstage()  # idempotent

    # staged anew, the volume holds every file
    async with plugin(tmp_path, host, cgroup("csi-node-3"), "csi3") as d3:
        k.node = stubs.grpc.NodeStub(d3.channel)
        await k.stage()
        await k.publish()
        for name, data in (("before.bin", before), ("during.bin", during), ("after.bin", after)):
            assert await asyncio.to_thread((k.target / name).read_bytes) == data
        await k.unpublish()
        await k.unstage()


@pytest.mark.parametrize(
    "crash_at", [UNSTAGE_UNMOUNTED.name, UNSTAGE_LOOP_DETACHED.name, UNSTAGE_ATTACHER_STOPPED.name]
)
async def test_an_unstage_cut_short_by_a_plugin_container_kill_is_finished_by_the_next_plugin(
    tmp_path: Path,
    volume: Volume,  # noqa: F811 (the fixture)
    stubs: Stubs,  # noqa: F811 (the fixture)
    host: Host,
    cgroup: Callable[[str], Path],
    crash_at: str,
) -> None:
    state = host.socket.parents[1]
    att = Attachment(state, VOLUME)
    async with plugin(tmp_path, host, cgroup("csi-node"), "csi") as d:
        k = kubelet_of(tmp_path, d, stubs, volume, state)
        await k.stage()
        await k.publish()
        await asyncio.to_thread(write_synced, k.target / "kept", b"fsynced before the unstage\n")
        await k.unpublish()
    attacher = att.attacher_pid()
    assert attacher is not None

    # the plugin's container dies between two steps of the teardown
    async with plugin(tmp_path, host, cgroup("csi-node-2"), "csi2", {**os.environ, crashpoints.ENV: crash_at}) as d:
        k.node = stubs.grpc.NodeStub(d.channel)
        with pytest.raises(grpc.aio.AioRpcError):
            await k.unstage()
        await d.proc.wait()
        assert f"crash point {crash_at} reached" in d.log_path.read_text()
        await ContainerProcess(d.proc, cgroup("csi-node-2")).kill_all()
    assert str(k.staging) not in mounts(), "the file system is unmounted first"
    if crash_at == UNSTAGE_UNMOUNTED.name:
        assert await devices_of(state), "the loop device is detached after the unmount"
    assert await asyncio.to_thread(runs, attacher) == (crash_at != UNSTAGE_ATTACHER_STOPPED.name)
    assert (att.dir / "attachment.json").exists(), "the record names what is left"

    # the next plugin finishes it: nothing is left, and the volume's data is intact
    async with plugin(tmp_path, host, cgroup("csi-node-3"), "csi3") as d:
        k.node = stubs.grpc.NodeStub(d.channel)
        await k.unstage()
        assert await built_under(tmp_path, state) == {"loops": [], "mounts": []}
        assert not await asyncio.to_thread(runs, attacher) and not att.dir.exists()
        await k.stage()
        await k.publish()
        assert await asyncio.to_thread((k.target / "kept").read_bytes) == b"fsynced before the unstage\n"
        await k.unpublish()
        await k.unstage()


async def test_the_attacher_host_listens_only_in_a_directory_of_its_own(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    argv = [
        sys.executable, "-m", "pairvol", "csi", "attacher-host",
        "--socket", str(shared / "host.sock"), "--state-dir", str(tmp_path / "state"),
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(*argv, stderr=asyncio.subprocess.PIPE)
    _, err = await bounded(proc.communicate(), 30)
    assert proc.returncode == 1
    assert f"the socket's directory {shared} must be a directory of its own" in err.decode()
    assert shared.stat().st_mode & 0o777 == 0o755, "a directory it did not make is left as it is"
    assert not (shared / "host.sock").exists()


async def ask(socket: Path, line: bytes) -> dict[str, object]:
    reader, writer = await asyncio.open_unix_connection(str(socket))
    writer.write(line)
    await writer.drain()
    answer: dict[str, object] = json.loads(await reader.readline())
    writer.close()
    return answer


async def test_the_attacher_host_answers_only_for_attachments_in_its_state_directory(
    tmp_path: Path, host: Host
) -> None:
    state = host.socket.parents[1]
    # the socket is its user's alone
    assert host.socket.stat().st_mode & 0o777 == 0o600
    assert host.socket.parent.stat().st_mode & 0o777 == 0o700

    for bad in ("../etc", "apps/../../etc", "/etc/passwd", "apps/pvc-1/../../x", "Apps/X", "apps_pvc-1", ""):
        answer = await ask(host.socket, json.dumps({"op": "start", "volume": bad}).encode() + b"\n")
        assert answer["ok"] is False and "is not a volume ID of this driver" in str(answer["error"]), (bad, answer)
    # a request carries an operation and a volume ID, never a command line or a path
    answer = await ask(host.socket, b'{"op": "start", "volume": "apps/pvc-1", "argv": ["/bin/sh"]}\n')
    assert answer == {"ok": False, "error": "unknown field(s) argv: a request names an operation and a volume ID only"}
    answer = await ask(host.socket, b'{"op": "exec", "volume": "apps/pvc-1"}\n')
    assert answer["ok"] is False and "unknown op 'exec'" in str(answer["error"])
    assert (await ask(host.socket, b"not json\n"))["ok"] is False

    # a volume with no attachment: nothing to start, and nothing runs
    answer = await ask(host.socket, b'{"op": "start", "volume": "apps/pvc-9"}\n')
    assert answer["ok"] is False and "has no attachment in" in str(answer["error"])
    assert await ask(host.socket, b'{"op": "status", "volume": "apps/pvc-9"}\n') == {"ok": True, "running": False}
    assert await ask(host.socket, b'{"op": "stop", "volume": "apps/pvc-9"}\n') == {"ok": True, "running": False}

    # an attachment directory that is a link out of the state directory is not followed
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "attachment.json").write_text("{}")
    (state / "apps_pvc-2").symlink_to(outside)
    answer = await ask(host.socket, b'{"op": "start", "volume": "apps/pvc-2"}\n')
    assert answer["ok"] is False and "leads out of the state directory" in str(answer["error"])
    # a record that names another volume is not used for this one
    (state / "apps_pvc-3").mkdir()
    (state / "apps_pvc-3" / "attachment.json").write_text(json.dumps({
        "volume_id": "apps/pvc-4", "export_host": "127.0.0.1", "export_port": 1, "psk_identity": "x",
        "staging_path": "/x", "block": True, "fs_type": "",
    }))  # fmt: skip
    (state / "apps_pvc-3" / "keys.psk").write_text("x:00\n")
    answer = await ask(host.socket, b'{"op": "start", "volume": "apps/pvc-3"}\n')
    assert answer["ok"] is False and "names volume apps/pvc-4" in str(answer["error"])
    assert not [p for p in state.rglob("attacher.pid")], "nothing was started"
    with pytest.raises(AttachError, match="refused start of apps/pvc-9"):
        await host.attachers.start(Attachment(state, "apps/pvc-9"))
