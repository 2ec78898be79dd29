"""NodeStageVolume cut off by the kubelet, and what earlier calls left at the staging path.

gRPC cancels the node plugin's handler when the kubelet's deadline passes or its
connection drops (a kubelet restart), and the kubelet then calls again. The retry runs
once the volume's lock is free, so the first call's commands must be over by then: a
mount that went on running would be stacked on the retry's, an mkfs racing another mkfs
corrupts the file system, a second attacher fights the first for its files. Here the
node plugin's ``mount``, ``mkfs.ext4`` and ``qemu-storage-daemon`` are slowed down (shims
on its PATH that log and then run the real program), and the tests check that exactly one
of them completes and that the file system is whole.

A staged mount counts only if it is this attachment's device, and unstaging removes every
mount stacked at the staging path: a mount left there by an earlier attachment is never
taken for the volume, and none survives an unstage to be found by the next stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from pairvol.csi.attach import run, unescape_mountinfo
from tests.integration.test_csi_node import (  # noqa: F401 - fixtures
    DEVICE_PREFIX,
    Kubelet,
    Volume,
    _root,
    kubelet,
    mounts,
    node_plugin,
    qemu_daemons_under,
    stubs,
    volume,
    volume_size,
)
from tests.support.csi import Stubs

pytestmark = pytest.mark.timeout(120)


def mounts_at(path: Path) -> list[str]:
    """The sources of every mount on ``path``, stacked ones included, bottom first."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if unescape_mountinfo(fields[4]) == str(path):
            found.append(unescape_mountinfo(line.split(" - ", 1)[1].split()[1]))
    return found


@dataclass
class SlowTools:
    """Shims for ``mkfs.ext4``, ``mount`` and ``qemu-storage-daemon`` in ``bin_dir``, put
    first on the node plugin's PATH. Each runs the real program at once unless made slow
    (:meth:`slow`; ``mount`` only when it mounts on the staging path): then it logs ``start
    PID`` to ``<name>.log``, waits (mkfs: until :meth:`release`; the others: 4 s), runs the
    real program and logs ``done PID STATUS``. A shim killed while it waits never runs the
    real program."""

    bin_dir: Path
    staging: Path

    def __post_init__(self) -> None:
        self.bin_dir.mkdir()
        self.gate = self.bin_dir / "release-mkfs"
        for name, wait in (
            ("mkfs.ext4", f'while [ ! -e "{self.gate}" ]; do sleep 0.05; done'),
            ("mount", "sleep 4"),
            ("qemu-storage-daemon", "sleep 4"),
        ):
            real = shutil.which(name)
            assert real is not None, f"{name} is not installed"
            log = self.bin_dir / f"{name}.log"
            fast = f'[ -e "{self.bin_dir / name}.slow" ] || exec "{real}" "$@"\n'
            if name == "mount":
                fast = f'for arg; do last=$arg; done\n[ "$last" = "{self.staging}" ] || exec "{real}" "$@"\n' + fast
            slow = f'echo "start $$" >> "{log}"\n{wait}\n"{real}" "$@"\nrc=$?\n'
            slow += f'echo "done $$ $rc" >> "{log}"\nexit $rc\n'
            shim = self.bin_dir / name
            shim.write_text("#!/bin/sh\n" + fast + slow)
            shim.chmod(0o755)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}

    def slow(self, name: str, slow: bool = True) -> None:
        path = self.bin_dir / f"{name}.slow"
        if slow:
            path.touch()
        else:
            path.unlink()

    def log(self, name: str) -> list[str]:
        """The shim's log, PIDs left out: ``["start", "done 0", ...]``."""
        path = self.bin_dir / f"{name}.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return [" ".join(word for i, word in enumerate(line.split()) if i != 1) for line in lines]

    async def started(self, name: str, count: int, within: float) -> bool:
        deadline = asyncio.get_running_loop().time() + within
        while self.log(name).count("start") < count:
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def release(self) -> None:
        self.gate.touch()


def slow_tools(tmp_path: Path) -> SlowTools:
    """The shims for the node plugin of ``node_plugin(tmp_path, ...)`` (its staging path)."""
    return SlowTools(tmp_path / "slow-bin", tmp_path / "kubelet/plugins/kubernetes.io/csi/pairvol.io/vol/globalmount")


async def stage(k: Kubelet, timeout: float) -> Any:
    """NodeStageVolume with the kubelet's deadline ``timeout``."""
    req = k.pb.NodeStageVolumeRequest(
        volume_id="apps/pvc-1",
        staging_target_path=str(k.staging),
        volume_capability=k.capability(),
        secrets={"psk": k.psk},
        volume_context={"exportAddress": k.export},
    )
    return await k.node.NodeStageVolume(req, timeout=timeout)


async def files_survive_unstage_and_restage(k: Kubelet) -> None:
    """The staged file system is whole: a file written into it (not fsynced: the unmount
    at unstage flushes it) reads back after unstage and restage; nothing stays mounted."""
    data = os.urandom(2 << 20)
    await asyncio.to_thread((k.staging / "data.bin").write_bytes, data)
    await k.unstage()
    assert mounts_at(k.staging) == [], "something stayed mounted at the staging path after unstage"
    await k.stage()
    assert len(mounts_at(k.staging)) == 1
    assert await asyncio.to_thread((k.staging / "data.bin").read_bytes) == data
    await k.unstage()
    assert mounts_at(k.staging) == []


async def test_a_mount_whose_call_the_kubelet_dropped_is_killed_before_the_retry_mounts(
    tmp_path: Path,
    volume: Volume,  # noqa: F811 (the fixture)
    stubs: Stubs,  # noqa: F811 (the fixture)
) -> None:
    """The kubelet drops the call while the plugin's mount runs (it restarted); its retry
    mounts the file system once: the first mount was killed, not left to land on top."""
    tools = slow_tools(tmp_path)
    async with node_plugin(tmp_path, volume, stubs, env=tools.env) as k:
        assert k.staging == tools.staging
        tools.slow("mount")
        first = asyncio.create_task(stage(k, timeout=60))
        assert await tools.started("mount", 1, within=30), "the first call never reached its mount"
        first.cancel()  # the connection to the plugin goes: the call is cancelled there
        with contextlib.suppress(asyncio.CancelledError):
            await first
        await k.stage()  # the kubelet's retry
        assert tools.log("mount") == ["start", "start", "done 0"], "the dropped call's mount ran on"
        tools.slow("mount", False)
        assert len(mounts_at(k.staging)) == 1, f"mounts stacked at the staging path: {mounts_at(k.staging)}"
        assert mounts()[str(k.staging)].startswith(DEVICE_PREFIX)
        await files_survive_unstage_and_restage(k)


async def test_a_file_system_being_made_when_the_deadline_passes_is_made_once(
    tmp_path: Path,
    volume: Volume,  # noqa: F811 (the fixture)
    stubs: Stubs,  # noqa: F811 (the fixture)
) -> None:
    """The kubelet's deadline passes while mkfs runs; its retry waits until that mkfs has
    finished and then finds the file system: there is never a second mkfs on a device that
    only looked blank because the first one had not written its superblock yet."""
    tools = slow_tools(tmp_path)
    async with node_plugin(tmp_path, volume, stubs, env=tools.env) as k:
        tools.slow("mkfs.ext4")
        first = asyncio.create_task(stage(k, timeout=15))
        assert await tools.started("mkfs.ext4", 1, within=15), "the first call never reached mkfs"
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await first
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        retry = asyncio.create_task(k.stage())
        # a retry that does not wait would start its own mkfs now
        await tools.started("mkfs.ext4", 2, within=3)
        tools.release()
        await retry
        assert tools.log("mkfs.ext4") == ["start", "done 0"], "more than one mkfs ran"
        assert len(mounts_at(k.staging)) == 1
        assert mounts()[str(k.staging)].startswith(DEVICE_PREFIX)
        await files_survive_unstage_and_restage(k)


async def test_an_attacher_whose_start_the_kubelet_dropped_is_killed_before_the_retry_starts_one(
    tmp_path: Path,
    volume: Volume,  # noqa: F811 (the fixture)
    stubs: Stubs,  # noqa: F811 (the fixture)
) -> None:
    """The kubelet drops the call while the attacher starts; its retry starts one attacher,
    the only one: the first start was killed before it could daemonize."""
    tools = slow_tools(tmp_path)
    async with node_plugin(tmp_path, volume, stubs, env=tools.env) as k:
        tools.slow("qemu-storage-daemon")
        first = asyncio.create_task(stage(k, timeout=60))
        assert await tools.started("qemu-storage-daemon", 1, within=30), "the first call never started an attacher"
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        await k.stage()
        assert tools.log("qemu-storage-daemon") == ["start", "start", "done 0"], "the dropped call's start ran on"
        tools.slow("qemu-storage-daemon", False)
        assert len(await qemu_daemons_under(k.state_dir)) == 1
        await files_survive_unstage_and_restage(k)
        assert await qemu_daemons_under(k.state_dir) == []


async def test_a_mount_of_something_else_at_the_staging_path_is_replaced_by_the_volume(kubelet: Kubelet) -> None:  # noqa: F811 - fixtures
    """Whatever is mounted at the staging path but is not the attachment's device (left by
    an earlier attachment, or anything else) is unmounted, and the volume mounted there."""
    await asyncio.to_thread(kubelet.staging.mkdir, parents=True)
    await run("mount", "-t", "tmpfs", "leftover", str(kubelet.staging))
    await kubelet.stage()
    assert len(mounts_at(kubelet.staging)) == 1, f"stacked: {mounts_at(kubelet.staging)}"
    assert mounts()[str(kubelet.staging)].startswith(DEVICE_PREFIX), "the staged 'file system' is the leftover"
    await files_survive_unstage_and_restage(kubelet)


async def test_unstage_unmounts_every_mount_stacked_at_the_staging_path(kubelet: Kubelet) -> None:  # noqa: F811 - fixtures
    """The staged file system with more mounted over it at the staging path (a second mount
    of it, and another file system on top, as an overlapping stage or anything else may
    leave): unstaging unmounts them all, so the file system is flushed before its device
    goes, and nothing is left there for the next stage to take for the volume."""
    await kubelet.stage()
    device = mounts()[str(kubelet.staging)]
    data = os.urandom(2 << 20)
    await asyncio.to_thread((kubelet.staging / "data.bin").write_bytes, data)  # not fsynced
    await run("mount", "--bind", str(kubelet.staging), str(kubelet.staging))
    await run("mount", "-t", "tmpfs", "over", str(kubelet.staging))
    # the kubelet directory is a shared mount, as on a node: the tmpfs propagates to the
    # bind's peer at the same place too, so it may be stacked twice
    stack = mounts_at(kubelet.staging)
    assert stack[:2] == [device, device] and stack[2:] in (["over"], ["over", "over"]), stack
    await kubelet.unstage()
    assert mounts_at(kubelet.staging) == [], "something stayed mounted at the staging path after unstage"
    await kubelet.stage()
    assert await asyncio.to_thread((kubelet.staging / "data.bin").read_bytes) == data
    await files_survive_unstage_and_restage(kubelet)
