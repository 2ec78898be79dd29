"""The Node service: stage = attach the volume on this node (and mount its file system at
the staging path), publish = bind it into the pod's target path.

Calls for one volume are serialized (one lock per volume ID); calls for different volumes
run concurrently. Every call is idempotent: it looks at what exists (the attachment's
record, mounts, loop or nbd devices) rather than remembering what it did, so a restarted node
plugin carries on from the state on disk. The attachers themselves are started, stopped
and reported by the attacher host when the plugin is given one (pairvol.csi.attacher_host:
they then outlive restarts of the plugin's container), else by the plugin.

Errors: a missing or malformed field is INVALID_ARGUMENT; an access mode the driver does
not serve, a volume that is not staged, a device that holds something other than the
requested file system, or a file system this node cannot make is FAILED_PRECONDITION; a
target already published differently is ALREADY_EXISTS; an export that cannot be reached
is UNAVAILABLE (the kubelet retries).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import grpc

from pairvol.aio import bounded
from pairvol.csi import DRIVER_NAME, attach, expand, nbd
from pairvol.csi.attach import (
    FLUSH_WAIT_S,
    AttachError,
    Attachers,
    Attachment,
    Broken,
    Busy,
    DirectAttachers,
    NotBlank,
    Record,
    Superseded,
    TooSmall,
    Transport,
    mounted,
    run,
)
from pairvol.csi.params import (
    DEFAULT_FS_TYPE,
    FS_TYPES,
    TOPOLOGY_KEY,
    access_mode_problem,
    capability_problem,
    fs_type_problem,
    parse_volume_id,
    pinned_to_lineage,
    replication_problem,
)
from pairvol.csi.proto import messages
from pairvol.csi.server import CsiError, Handler, invalid, require
from pairvol.csi.wire import capability, string_map
from pairvol.kube.client import KubeClient, KubeError
from pairvol.kube.paths import volume_path

log = logging.getLogger(__name__)

STAGE_UNSTAGE_VOLUME = 1
GET_VOLUME_STATS = 2
EXPAND_VOLUME = 3
VOLUME_CONDITION = 4
BYTES, INODES = 1, 2
#: the node plugin's --attach-transport
TransportChoice = Literal["fuse", "nbd", "auto"]
#: longest wait for the API server in NodeGetVolumeStats (the kubelet's call must not hang)
API_TIMEOUT_S = 5.0
#: the (Debian) package that brings each file system's mkfs, for the error that says it is missing
MKFS_PACKAGES = {"ext4": "e2fsprogs", "xfs": "xfsprogs"}


def _export(context: dict[str, str]) -> tuple[str, int]:
    raw = context.get("exportAddress", "")
    host, _, port = raw.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise invalid(
            f"volume_context.exportAddress must be HOST:PORT of the volume's export, got {raw!r} "
            "(it is set by CreateVolume; was the volume created by this driver?)"
        )
    return host, int(port)


def _psk(secrets: dict[str, str]) -> tuple[str, str]:
    raw = secrets.get("psk", "").strip()
    identity, colon, key = raw.partition(":")
    if not colon or not identity or len(key) < 32 or any(c not in "0123456789abcdefABCDEF" for c in key):
        raise invalid(
            "the node-stage secret must hold key 'psk' as 'IDENTITY:HEXKEY' (the volume's Secret "
            "pairvol-<volume>-export); set csi.storage.k8s.io/node-stage-secret-name: pairvol-${pv.name}-export and "
            "csi.storage.k8s.io/node-stage-secret-namespace in the StorageClass"
        )
    return identity, key


class NodeService:
    def __init__(
        self,
        node_id: str,
        state_dir: Path,
        kube: KubeClient | None = None,
        attachers: Attachers | None = None,
        transport: TransportChoice = "fuse",
        flush_wait_s: float = FLUSH_WAIT_S,
    ) -> None:
        self.node_id = node_id
        self.state_dir = state_dir
        #: how new attachments reach the kernel (attach.Transport), or "auto": the kernel's
        #: nbd client where this node has it, else FUSE + loop
        self.transport = transport
        #: who runs the attachers: the attacher host (whose answers say whether one runs:
        #: its PIDs are not visible here), or this process itself
        self.attachers = attachers or DirectAttachers()
        #: read access to the volumes' ReplicatedVolumes, for their replication state in
        #: NodeGetVolumeStats; None: the condition says only what the node sees
        self.kube = kube
        #: how long an unstage waits for the device's flush to the primary before it fails
        self.flush_wait_s = flush_wait_s
        self._locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self.m = messages()

    def _attachment(self, volume_id: str) -> Attachment:
        """The attachment of a volume ID this driver made (it names a directory: nothing
        else may)."""
        if parse_volume_id(volume_id) is None:
            raise invalid(f"volume_id {volume_id!r} is not a volume of {DRIVER_NAME} (NAMESPACE/NAME)")
        return Attachment(self.state_dir, volume_id, self.attachers, self.flush_wait_s)

    async def recover(self) -> None:
        """Before serving: the attachments the state directory holds, found again from
        disk (Attachment.discard_if_left_over): those whose attacher runs are carried on,
        those a node restart left as files only are removed (a pod that still needs the
        volume gets NodeStageVolume again), broken ones are kept for the CO to unstage."""
        dirs = await asyncio.to_thread(lambda: sorted(self.state_dir.glob("*/attachment.json")))
        for path in dirs:
            try:
                record = Record(**json.loads(await asyncio.to_thread(path.read_text)))
            except (OSError, ValueError, TypeError) as exc:
                log.warning("attachment record %s is unreadable (%s); left as it is", path, exc)
                continue
            att = Attachment(self.state_dir, record.volume_id, self.attachers, self.flush_wait_s)
            if att.dir != path.parent:
                log.warning("attachment record %s names volume %s; left as it is", path, record.volume_id)
                continue
            try:
                found = await att.discard_if_left_over()
            except AttachError as exc:  # the attacher host does not answer: ask again at the next call
                log.warning("attachment of %s: left as it is (%s)", record.volume_id, exc)
                continue
            what = {
                "discarded": "only its files were left (the node restarted); removed",
                "broken": "its attacher is gone under its device; it must be unstaged",
                "running": "found again, its attacher running",
            }[found]
            level = logging.WARNING if found == "broken" else logging.INFO
            log.log(level, "attachment of %s: %s", record.volume_id, what)

    def handlers(self) -> dict[str, Handler]:
        return {
            "NodeStageVolume": self.stage,
            "NodeUnstageVolume": self.unstage,
            "NodePublishVolume": self.publish,
            "NodeUnpublishVolume": self.unpublish,
            "NodeGetVolumeStats": self.volume_stats,
            "NodeGetCapabilities": self.get_capabilities,
            "NodeGetInfo": self.get_info,
            "NodeExpandVolume": self.expand,
        }

    async def get_info(self, _: Any) -> Any:
        resp = self.m.get("NodeGetInfoResponse")(node_id=self.node_id)
        resp.accessible_topology.segments[TOPOLOGY_KEY] = self.node_id
        return resp

    async def get_capabilities(self, _: Any) -> Any:
        resp = self.m.get("NodeGetCapabilitiesResponse")()
        for rpc in (STAGE_UNSTAGE_VOLUME, GET_VOLUME_STATS, EXPAND_VOLUME, VOLUME_CONDITION):
            resp.capabilities.add().rpc.type = rpc
        return resp

    async def volume_stats(self, req: Any) -> Any:
        """Usage of the published file system (bytes and inodes) or the device's size, and
        the attachment's condition: abnormal when its attacher is gone (I/O fails)."""
        volume_id = require(req.volume_id, "volume_id")
        path = _absolute(req.volume_path, "volume_path")
        att = self._attachment(volume_id)
        record = await asyncio.to_thread(att.read_record)
        if record is None:
            raise CsiError(grpc.StatusCode.NOT_FOUND, f"volume {volume_id} is not staged on node {self.node_id}")
        if not await asyncio.to_thread(os.path.lexists, path):
            raise CsiError(grpc.StatusCode.NOT_FOUND, f"{path} does not exist on node {self.node_id}")
        resp = self.m.get("NodeGetVolumeStatsResponse")()
        problem = None
        try:
            running = await att.attacher_running()
        except AttachError as exc:
            running, problem = True, f"whether the attacher of {volume_id} runs is unknown: {exc}"
        if not running:
            problem = (
                f"the attacher of {volume_id} is gone: I/O on the volume fails; restart the pod "
                "(the volume is unstaged and staged again)"
            )
        elif problem is None and await att.superseded(record):
            problem = (
                f"{volume_id} failed over to a checkpoint since it was attached here (lineage "
                f"{record.export_name} ended): I/O on the volume fails; restart the pod so that it mounts "
                "the volume fresh"
            )
        try:
            if record.block:
                size = await asyncio.to_thread(_size_of, path)
                resp.usage.add(unit=BYTES, total=size)
            else:
                st = await asyncio.to_thread(os.statvfs, path)
                resp.usage.add(
                    unit=BYTES,
                    total=st.f_blocks * st.f_frsize,
                    available=st.f_bavail * st.f_frsize,
                    used=(st.f_blocks - st.f_bfree) * st.f_frsize,
                )
                resp.usage.add(unit=INODES, total=st.f_files, available=st.f_favail, used=st.f_files - st.f_ffree)
        except OSError as exc:
            problem = problem or f"{path} cannot be read: {exc}"
        replication, state = await self._replication(volume_id)
        problem = problem or replication
        resp.volume_condition.abnormal = problem is not None
        resp.volume_condition.message = problem or f"attached to {record.export_host}:{record.export_port}; {state}"
        return resp

    async def _replication(self, volume_id: str) -> tuple[str | None, str]:
        """(why the volume's replication makes it abnormal or None, what is known of it)."""
        parsed = parse_volume_id(volume_id)
        if self.kube is None or parsed is None:
            return None, "replication state not known here (the node plugin has no cluster connection)"
        try:
            volume = await bounded(self.kube.get_or_none(volume_path(*parsed)), API_TIMEOUT_S)
        except (KubeError, TimeoutError) as exc:
            return None, f"replication state unknown: the API server did not answer ({exc or 'timeout'})"
        if volume is None:
            return None, f"replication state unknown: ReplicatedVolume {volume_id} does not exist"
        problem = replication_problem(volume)
        return problem, f"replication: {(volume.get('status') or {}).get('phase') or 'Pending'}"

    async def stage(self, req: Any) -> Any:
        volume_id = require(req.volume_id, "volume_id")
        staging = _absolute(req.staging_target_path, "staging_target_path")
        if not req.HasField("volume_capability"):
            raise invalid("volume_capability is required")
        cap = capability(req.volume_capability, "volume_capability")
        problem = access_mode_problem(cap)
        if problem is not None:
            raise CsiError(grpc.StatusCode.FAILED_PRECONDITION, problem)
        problem = fs_type_problem(cap)
        if problem is not None:
            raise invalid(problem)
        context = string_map(req.volume_context)
        host, port = _export(context)
        identity, key = _psk(string_map(req.secrets))
        fs_type = cap.fs_type or context.get("fsType") or DEFAULT_FS_TYPE
        if not cap.block:
            if fs_type not in FS_TYPES:
                raise invalid(f"fsType {fs_type!r} is not supported; use one of {', '.join(FS_TYPES)}")
            if not attach.has_mkfs(fs_type):  # checked before anything is built
                raise CsiError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"fsType {fs_type} is not available on node {self.node_id}: mkfs.{fs_type} is not installed "
                    f"where the node plugin runs; install it (package {MKFS_PACKAGES[fs_type]}) in the node "
                    "plugin's image, or use another fsType (csi.storage.k8s.io/fstype of the StorageClass)",
                )
        record = Record(
            volume_id=volume_id,
            export_host=host,
            export_port=port,
            psk_identity=identity,
            staging_path=str(staging),
            block=cap.block,
            fs_type="" if cap.block else fs_type,
            pinned=pinned_to_lineage(context),
        )
        async with self._locks[volume_id]:
            att = self._attachment(volume_id)
            existing = await asyncio.to_thread(att.read_record)
            # an attachment keeps the transport it was made with
            record = replace(record, transport=existing.transport if existing else await self._transport())
            if existing is not None and not existing.same_volume_as(record):
                raise CsiError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"volume {volume_id} is already staged on this node differently ({_describe(existing)}); "
                    f"unstage it first to stage it as {_describe(record)}",
                )
            try:
                await att.stage(record, key, cap.mount_flags)
            except (NotBlank, TooSmall, Broken, Superseded) as exc:
                raise CsiError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from exc
            except AttachError as exc:
                raise CsiError(grpc.StatusCode.UNAVAILABLE, f"staging {volume_id} failed: {exc}") from exc
        return self.m.get("NodeStageVolumeResponse")()

    async def _transport(self) -> Transport:
        """The transport of a new attachment; FAILED_PRECONDITION when ``nbd`` is demanded
        and this node cannot give it."""
        if self.transport == "fuse":
            return "fuse"
        problem = await asyncio.to_thread(nbd.unavailable)
        if problem is None:
            return "nbd"
        if self.transport == "auto":
            return "fuse"
        raise CsiError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"node {self.node_id} cannot attach through the kernel's nbd client: {problem}; load the module "
            "there, or start the node plugin with --attach-transport fuse or auto",
        )

    async def unstage(self, req: Any) -> Any:
        volume_id = require(req.volume_id, "volume_id")
        staging = _absolute(req.staging_target_path, "staging_target_path")
        async with self._locks[volume_id]:
            try:
                await self._attachment(volume_id).unstage(staging)
            except Busy as exc:
                raise CsiError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from exc
            except AttachError as exc:
                raise CsiError(grpc.StatusCode.INTERNAL, f"unstaging {volume_id} failed: {exc}") from exc
        return self.m.get("NodeUnstageVolumeResponse")()

    async def publish(self, req: Any) -> Any:
        volume_id = require(req.volume_id, "volume_id")
        target = _absolute(req.target_path, "target_path")
        staging = require(req.staging_target_path, "staging_target_path")
        if not req.HasField("volume_capability"):
            raise invalid("volume_capability is required")
        cap = capability(req.volume_capability, "volume_capability")
        problem = capability_problem(cap)
        if problem is not None:
            raise CsiError(grpc.StatusCode.FAILED_PRECONDITION, problem)
        async with self._locks[volume_id]:
            att = self._attachment(volume_id)
            record = await asyncio.to_thread(att.read_record)
            if record is None or record.staging_path != staging:
                raise CsiError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"volume {volume_id} is not staged at {staging} on node {self.node_id}; call NodeStageVolume first",
                )
            if record.block != cap.block:
                raise CsiError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"volume {volume_id} is staged as {_describe(record)}, not as "
                    f"{'a block device' if cap.block else 'a file system'}",
                )
            if await mounted(target):
                if await _read_only(target) != bool(req.readonly):
                    raise CsiError(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"{target} is already published {'read-only' if not req.readonly else 'read-write'}",
                    )
                return self.m.get("NodePublishVolumeResponse")()
            if cap.block:
                device = await att.device()
                if device is None:
                    raise CsiError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"volume {volume_id} has no device on node {self.node_id}; unstage and stage it again",
                    )
                await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
                await asyncio.to_thread(target.touch, 0o600)
                source = device
            else:
                if not await mounted(Path(staging)):
                    raise CsiError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"the file system of {volume_id} is not mounted at {staging}; unstage and stage it again",
                    )
                await asyncio.to_thread(target.mkdir, parents=True, exist_ok=True)
                source = staging
            try:
                await run("mount", "--bind", source, str(target))
                if req.readonly:
                    await run("mount", "-o", "remount,bind,ro", str(target))
            except AttachError as exc:
                with contextlib.suppress(AttachError):
                    if await mounted(target):
                        await run("umount", str(target))
                raise CsiError(grpc.StatusCode.INTERNAL, f"publishing {volume_id} at {target} failed: {exc}") from exc
        return self.m.get("NodePublishVolumeResponse")()

    async def unpublish(self, req: Any) -> Any:
        volume_id = require(req.volume_id, "volume_id")
        target = _absolute(req.target_path, "target_path")
        async with self._locks[volume_id]:
            try:
                while await mounted(target):
                    await run("umount", str(target))
            except AttachError as exc:
                raise CsiError(
                    grpc.StatusCode.INTERNAL, f"unpublishing {volume_id} from {target} failed: {exc}"
                ) from exc
            await asyncio.to_thread(_remove, target)
        return self.m.get("NodeUnpublishVolumeResponse")()

    async def expand(self, req: Any) -> Any:
        """NodeExpandVolume: the attachment and the file system on it take the size the
        replicas grew to (pairvol.csi.expand). ``capacity_range.required_bytes`` says that
        size: the node has no other way to learn it before its NBD client does."""
        volume_id = require(req.volume_id, "volume_id")
        path = _absolute(req.volume_path, "volume_path")
        size = int(req.capacity_range.required_bytes) if req.HasField("capacity_range") else 0
        if size <= 0:
            raise invalid("capacity_range.required_bytes is required: the size the volume grew to")
        async with self._locks[volume_id]:
            att = self._attachment(volume_id)
            record = await asyncio.to_thread(att.read_record)
            if record is None:
                raise CsiError(grpc.StatusCode.NOT_FOUND, f"volume {volume_id} is not staged on node {self.node_id}")
            if not await asyncio.to_thread(os.path.lexists, path):
                raise CsiError(grpc.StatusCode.NOT_FOUND, f"{path} does not exist on node {self.node_id}")
            if req.HasField("volume_capability"):
                cap = capability(req.volume_capability, "volume_capability")
                if cap.block != record.block:
                    raise invalid(f"volume {volume_id} is staged as {_describe(record)}, not as requested")
            try:
                have = await expand.grow(att, record, size)
            except expand.NotYet as exc:
                raise CsiError(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
            except (Broken, expand.OfflineOnly) as exc:
                raise CsiError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from exc
            except AttachError as exc:
                raise CsiError(grpc.StatusCode.INTERNAL, f"growing {volume_id} failed: {exc}") from exc
        resp = self.m.get("NodeExpandVolumeResponse")()
        resp.capacity_bytes = have
        return resp


def _size_of(path: Path) -> int:
    with open(path, "rb", buffering=0) as f:
        return f.seek(0, os.SEEK_END)


def _absolute(value: str, field: str) -> Path:
    path = Path(require(value, field))
    if not path.is_absolute() or ".." in path.parts:
        raise invalid(f"{field} must be an absolute path without '..', got {value!r}")
    return path


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir():
            path.rmdir()
        else:
            path.unlink()


async def _read_only(path: Path) -> bool:
    """Whether the visible mount on ``path`` is read-only (the last mountinfo line wins)."""
    text = await asyncio.to_thread(Path("/proc/self/mountinfo").read_text)
    read_only = False
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 5 and attach.unescape_mountinfo(fields[4]) == str(path):
            read_only = "ro" in fields[5].split(",")
    return read_only


def _describe(record: Record) -> str:
    kind = "a block device" if record.block else f"an {record.fs_type} file system at {record.staging_path}"
    if record.pinned:
        kind += " (Checkpoint mode: pinned to the primary's lineage)"
    return f"{kind} from {record.export_host}:{record.export_port} through {record.transport}"
