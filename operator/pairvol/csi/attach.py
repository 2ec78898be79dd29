"""A volume's attachment on the node that consumes it, built and torn down step by step.

An attachment is a ``qemu-storage-daemon`` (the *attacher*) that is an NBD client of the
volume's export over TLS-PSK and serves the volume to the node as a block device, by one of
two *transports* (:data:`Transport`, chosen when the attachment is made and kept in its
record):

* ``fuse``: the attacher serves a FUSE export (a regular file) and a loop device is set up
  over that file. Works on any node with FUSE and loop devices;
* ``nbd``: the attacher serves a local NBD export on a unix socket in the attachment's
  directory, and the kernel's NBD client connects ``/dev/nbdN`` to it (negotiated here and
  handed to the kernel over netlink under the attachment's backend identifier: the kernel
  holds the connection, no process does). Needs the ``nbd`` module on the node
  (:mod:`pairvol.csi.nbd`, which says why a device is provably the attachment's). No
  FUSE round trips, the workload's queue depth reaches the attacher; but QEMU's NBD
  export does not let its node grow, so such an attachment takes a larger size only when
  it is made anew (docs/csi.md).

Either device is what mkfs, mount and Block-mode pods see.

Everything an attachment is lives in its directory under the node plugin's state
directory, so a restarted node plugin finds it again from disk alone:

* ``attachment.json`` — the volume, its export, the staging path and the access type,
  written (fsynced, renamed into place) *before* anything is started: whatever a crash
  leaves behind is named by a record, and unstaging tears it down;
* ``keys.psk`` — the volume's TLS-PSK key (mode 0600, the directory 0700);
* ``disk`` — the FUSE export's mount point; the loop device is found with ``losetup -j``;
* ``nbd.sock``, ``nbd.device`` — the local NBD export and the kernel device chosen for it,
  written (fsynced) before the device is connected, so a crash never leaves a connected
  device that no record names;
* ``attacher.pid``, ``attacher.log``, ``qmp.sock`` — the daemon.

Who starts and stops the attacher is an :class:`Attachers`: on a Kubernetes node the
*attacher host* (:mod:`pairvol.csi.attacher_host`), a process in a container of its own
next to the node plugin's, so that a restart of the node plugin's container — whose
processes the container runtime kills all together — leaves the attachers running; or the
node plugin itself (:class:`DirectAttachers`, for a plugin started without
``--attacher-host``). Either way the argv is built here (:func:`attacher_argv`) from the
attachment's record, and whether the attacher runs is answered where its PID is visible.
The attacher daemonizes (``--daemonize``): it is no child of the process that started it.
Its NBD client reconnects to the same address (the Service that follows the
primary) for ``reconnect-delay`` seconds, during which requests wait instead of failing.

Which export the attacher asks for decides what it may reconnect to:

* a Latest-mode volume's attachment asks for ``volume``: after a failover the new primary
  holds every acknowledged write, so reconnecting to it is the point (the pod sees a stall);
* a Checkpoint-mode volume's attachment is *pinned*: it asks for the export under the name
  of the primary's lineage (``volume-l<epoch>``, found with ``qemu-nbd --list`` when the
  attacher starts). Every failover starts a new lineage, so after one, no server offers the
  name any more: the attacher's reconnects are refused at the NBD handshake and, after
  ``PINNED_RECONNECT_DELAY_S``, its I/O fails — the mounted file system never sees the disk
  go back to the checkpoint under it. Only a new attachment (unstage, stage: the pod is
  replaced) reaches the rolled-back disk, and it mounts it fresh (journal replay). The
  same disk coming back within the delay (an agent restart, a broken link) keeps its
  lineage and its clients.

Teardown order protects data, by structure: the file system is unmounted first (the
kernel flushes it, and the flush travels loop → FUSE fsync → the attacher, or nbd → the
attacher, → NBD FLUSH to the primary), then the device is flushed and detached (``losetup
--detach``, or a netlink disconnect), then the attacher is stopped with SIGTERM
(which flushes and closes its block graph). Nothing is killed while a layer above it is
still in place, except a daemon that does not exit within its grace period. Each step
looks at what is there, so a node plugin restarted between any two of them carries on.

An unmount here ends the file system only if no other mount namespace holds a copy of the
mount (a container started on the node while the volume was mounted): the kernel shuts it
down — journal checkpoint, clean superblock — when the last copy goes. So the device is
flushed through an *exclusive* open, which the kernel refuses while a file system still
has it anywhere, and a flush that fails is an error while the attacher could still carry
it: the unstage then stops before anything is detached, and the kubelet retries
(:meth:`Attachment.unstage`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import threading
import weakref
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal, Protocol

from pairvol.agent import crashpoints
from pairvol.aio import bounded
from pairvol.csi import nbd
from pairvol.csi.params import size_problem
from pairvol.qemu.img import require_binary

log = logging.getLogger(__name__)

UNSTAGE_UNMOUNTED = crashpoints.point(
    "csi.unstage.unmounted", "the staged file system is unmounted; the device and the attacher remain"
)
UNSTAGE_LOOP_DETACHED = crashpoints.point(
    "csi.unstage.loop-detached", "the device (loop or nbd) is detached; the attacher still runs"
)
STAGE_NBD_RECORDED = crashpoints.point(
    "csi.stage.nbd-recorded", "the nbd device is chosen and recorded; it is not connected yet"
)
UNSTAGE_ATTACHER_STOPPED = crashpoints.point(
    "csi.unstage.attacher-stopped", "the attacher is stopped; the attachment's files remain"
)

#: how long the attacher's NBD client keeps reconnecting (and requests keep waiting) after
#: losing the export, e.g. across a failover; past it, I/O fails with EIO.
RECONNECT_DELAY_S = 60
#: the same for a pinned (Checkpoint-mode) attachment: only its own primary can come back,
#: since a failover ends its lineage; the pod's I/O fails soon after losing it
PINNED_RECONNECT_DELAY_S = 5
#: the export's name that a Latest-mode attachment asks for (the agent's workload export)
WORKLOAD_EXPORT = "volume"
LINEAGE_PREFIX = "volume-l"
START_TIMEOUT_S = 30.0
STOP_GRACE_S = 10.0
#: bytes at each end of a device that must read as zeros before it counts as blank
BLANK_PROBE = 1 << 20
#: how an attachment reaches the node's kernel (module docstring)
Transport = Literal["fuse", "nbd"]
#: the local NBD export's name in an ``nbd`` attacher
LOCAL_EXPORT = "volume"
#: how long an unstage waits for a disconnected nbd device to be released (it stays
#: configured while anything still holds it open, e.g. a mount namespace that copied its mount)
NBD_RELEASE_WAIT_S = 3.0
#: how long an unstage waits for a detached loop device to be released by the kernel
LOOP_RELEASE_WAIT_S = 3.0
#: an exclusive open of the device refused this long is a holder, not a passing prober (blkid)
EXCLUSIVE_RETRY_S = 1.0
#: how long an unstage waits for its flush by default (``pairvol csi --unstage-flush-timeout``);
#: one still running after that (a primary that does not answer) fails the call and goes on
#: in its thread, and a retry waits for it
FLUSH_WAIT_S = 120.0
#: flushes running in their own threads, by device (see _flush_in_its_own_thread)
_pending_flushes: dict[str, threading.Thread] = {}
#: nbd devices are chosen one stage at a time in this process (a lock per event loop)
_nbd_choice_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


def _nbd_choice() -> asyncio.Lock:
    return _nbd_choice_locks.setdefault(asyncio.get_running_loop(), asyncio.Lock())


class AttachError(Exception):
    """A step of attaching or detaching failed; the text says which and why."""


class NotBlank(AttachError):
    """The device holds data but no file system this driver may mount: never formatted."""


class Broken(AttachError):
    """The attachment lost its attacher; only unstaging repairs it."""


class Busy(AttachError):
    """The volume is still published; it must be unpublished before it is unstaged."""


class HeldElsewhere(Busy):
    """The file system is unmounted here but still alive elsewhere (a copy of its mount in
    another mount namespace): detaching now would drop the writes it makes when it ends."""


class TooSmall(AttachError):
    """The volume is too small for the requested file system."""


class Superseded(AttachError):
    """A pinned attachment's lineage ended (a failover): only a new attachment may use the
    volume."""


@dataclass(frozen=True)
class Record:
    volume_id: str
    export_host: str
    export_port: int
    psk_identity: str
    staging_path: str
    block: bool
    fs_type: str
    #: a Checkpoint-mode volume: the attacher asks for the lineage export ``export_name``
    pinned: bool = False
    export_name: str = WORKLOAD_EXPORT
    #: how the attachment reaches the kernel; records written before there was a choice
    #: are ``fuse``
    transport: Transport = "fuse"

    def same_volume_as(self, other: Record) -> bool:
        """The same request: equal but for the lineage a pinned attachment found."""
        return replace(self, export_name=other.export_name) == other


async def run(*argv: str, timeout: float = 60.0, check: bool = True, finish_on_cancel: bool = False) -> tuple[int, str]:
    """Run a command; (exit status, stdout+stderr). ``check``: raise AttachError on failure.

    The command never outlives this call. gRPC cancels a handler when the kubelet's
    deadline passes or its connection drops, and the kubelet's retry runs as soon as the
    volume's lock is free: a command still running then (a mount, an mkfs) would overlap
    with the retry's own. So when the call ends any other way than by the command's exit
    (cancelled, past ``timeout``), the command's process group (a session of its own) is
    killed and waited for before the call returns or the cancellation goes on.
    ``finish_on_cancel``: on cancellation the command is waited for instead (within
    ``timeout``), for a command that must not be cut short (mkfs: killed half-way it
    leaves a device that is neither blank nor formatted)."""
    deadline = asyncio.get_running_loop().time() + timeout
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    exited = False
    try:
        try:
            async with asyncio.timeout_at(deadline):
                out, _ = await proc.communicate()
        except asyncio.CancelledError:
            if finish_on_cancel:
                await _outlast(proc, deadline)
            raise
        exited = True
    except TimeoutError:
        raise AttachError(f"{argv[0]} did not finish within {timeout:g} s") from None
    finally:
        if not exited:
            await _kill_and_wait(proc)
    text = out.decode(errors="replace").strip()
    assert proc.returncode is not None
    if check and proc.returncode != 0:
        raise AttachError(f"{' '.join(argv)} failed (exit status {proc.returncode}): {text}")
    return proc.returncode, text


async def _kill_and_wait(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the process group of ``proc`` (what it started, too) and wait until ``proc``
    has exited. A cancellation that arrives meanwhile is held back until then."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    exit_status = asyncio.ensure_future(proc.wait())
    cancelled = False
    while not exit_status.done():
        try:
            await asyncio.wait([exit_status])
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError()


async def _outlast(proc: asyncio.subprocess.Process, deadline: float) -> None:
    """Wait until ``proc`` has exited or the loop's clock passes ``deadline``, whatever
    cancellations arrive meanwhile (the caller goes on with its own)."""
    loop = asyncio.get_running_loop()
    exit_status = asyncio.ensure_future(proc.wait())
    while not exit_status.done() and loop.time() < deadline:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait([exit_status], timeout=deadline - loop.time())


def unescape_mountinfo(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mount_points(mountinfo: str) -> dict[str, str]:
    """Mount point -> mount source of every mount in a /proc/*/mountinfo text (the last
    mount on a path wins: it is the one that is visible)."""
    out = {}
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        after = line.split(" - ", 1)[1].split()
        out[unescape_mountinfo(fields[4])] = unescape_mountinfo(after[1]) if len(after) > 1 else ""
    return out


def device_users(mountinfo: str, device: str, dev_numbers: str | list[str]) -> list[str]:
    """Mount points that use the block device ``device`` (e.g. ``/dev/loop3``, number
    ``7:3``; an nbd device's partitions' numbers too): file systems mounted from it (the
    mount's device number) and the device node itself bind-mounted onto a file (a devtmpfs
    mount whose root is the node)."""
    numbers = {dev_numbers} if isinstance(dev_numbers, str) else set(dev_numbers)
    node = "/" + Path(device).name
    out = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        fstype = line.split(" - ", 1)[1].split()[0]
        if fields[2] in numbers or (fstype == "devtmpfs" and unescape_mountinfo(fields[3]) == node):
            out.append(unescape_mountinfo(fields[4]))
    return out


async def mounted(path: Path) -> bool:
    text = await asyncio.to_thread(Path("/proc/self/mountinfo").read_text)
    return str(path) in mount_points(text)


async def _mount_at(path: Path) -> tuple[str, str] | None:
    """(device number, source) of the mount visible at ``path``; None: nothing is mounted
    there."""
    text = await asyncio.to_thread(Path("/proc/self/mountinfo").read_text)
    return mount_at(text, str(path))


def mount_at(mountinfo: str, path: str) -> tuple[str, str] | None:
    """(device number ``MAJOR:MINOR``, source) of the mount at ``path`` in a mountinfo text
    that is visible: the last one, when several are stacked there."""
    found = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5 or unescape_mountinfo(fields[4]) != path:
            continue
        after = line.split(" - ", 1)[1].split()
        found = (fields[2], unescape_mountinfo(after[1]) if len(after) > 1 else "")
    return found


def _is_zero(device: str, size: int) -> bool:
    with open(device, "rb", buffering=0) as f:
        head = f.read(min(BLANK_PROBE, size))
        f.seek(max(0, size - BLANK_PROBE))
        tail = f.read(BLANK_PROBE)
    return not head.strip(b"\0") and not tail.strip(b"\0")


def _dev_number(device: str) -> str:
    st = os.stat(device)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def _device_size(device: str) -> int:
    with open(device, "rb", buffering=0) as f:
        return f.seek(0, os.SEEK_END)


class Attachment:
    """One volume's attachment under ``state_dir`` (see the module docstring)."""

    def __init__(
        self, state_dir: Path, volume_id: str, attachers: Attachers | None = None, flush_wait_s: float = FLUSH_WAIT_S
    ) -> None:
        self.volume_id = volume_id
        self.attachers: Attachers = attachers or DirectAttachers()
        #: how long an unstage waits for the device's flush before it fails (and is retried)
        self.flush_wait_s = flush_wait_s
        self.dir = state_dir / volume_id.replace("/", "_")
        self.record_path = self.dir / "attachment.json"
        self.disk = self.dir / "disk"
        self.pidfile = self.dir / "attacher.pid"
        self.log_path = self.dir / "attacher.log"
        self.qmp = self.dir / "qmp.sock"
        self.nbd_sock = self.dir / "nbd.sock"
        self.nbd_device_file = self.dir / "nbd.device"

    # -- record

    def read_record(self) -> Record | None:
        try:
            return Record(**json.loads(self.record_path.read_text()))
        except FileNotFoundError:
            return None

    def _write_record(self, record: Record) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_synced(self.record_path, json.dumps(asdict(record)))

    def _write_psk(self, identity: str, key: str) -> None:
        path = self.dir / "keys.psk"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{identity}:{key}\n")

    # -- the attacher daemon

    def attacher_pid(self) -> int | None:
        """The running attacher's PID (checked against /proc: a reused PID is not ours)."""
        try:
            pid = int(self.pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return None
        if not cmdline or not cmdline[0].endswith(b"qemu-storage-daemon"):
            return None
        return pid if any(str(self.qmp).encode() in arg for arg in cmdline) else None

    async def attacher_running(self) -> bool:
        """Whether the attacher runs, asked of whoever started it (AttachError: they
        cannot say)."""
        return await self.attachers.running(self)

    async def _lineages(self, record: Record, timeout: float) -> list[str] | str:
        """The lineage exports the volume's export server offers (NBD option LIST over
        TLS-PSK with the volume's key), or why they could not be listed."""
        creds = f"tls-creds-psk,id=tls0,endpoint=client,dir={_opt(self.dir)},username={_opt(record.psk_identity)}"
        rc, out = await run(
            require_binary("qemu-nbd"), "--list", "--object", creds, "--tls-creds", "tls0",
            "--bind", record.export_host, "--port", str(record.export_port),
            timeout=timeout, check=False,
        )  # fmt: skip
        if rc != 0:
            return out.splitlines()[-1] if out else f"qemu-nbd --list exit status {rc}"
        return lineage_names(out)

    async def _lineage_export(self, record: Record) -> str:
        """The name of the primary's lineage export, for a new pinned attachment."""
        where = f"{record.export_host}:{record.export_port}"
        names = await self._lineages(record, START_TIMEOUT_S)
        if isinstance(names, str):
            raise AttachError(f"could not list the exports of {where}: {names}")
        if len(names) != 1:
            raise AttachError(
                f"the export at {where} offers {'no' if not names else 'more than one'} lineage export "
                f"({', '.join(names) or 'its agent predates them, or it is not serving'}); a Checkpoint-mode "
                "volume is attached only to its primary's lineage"
            )
        return names[0]

    async def superseded(self, record: Record) -> bool:
        """Whether a pinned attachment's lineage has ended: the export's server answers and
        offers a lineage export, but not this one (a failover happened). An unreachable
        server proves nothing either way."""
        if not record.pinned:
            return False
        names = await self._lineages(record, 5.0)
        return isinstance(names, list) and bool(names) and record.export_name not in names

    # -- the loop device

    async def loop_devices(self) -> list[str]:
        """The loop devices over the FUSE export (one, unless an earlier attacher died and
        left its device behind). The file itself is not touched: on a dead FUSE mount even
        stat fails."""
        if not await asyncio.to_thread(self.dir.is_dir):
            return []
        _, out = await run("losetup", "--noheadings", "--output", "NAME,BACK-FILE", "--list", check=False)
        found = []
        for line in out.splitlines():
            name, _, back = line.strip().partition(" ")
            if back.strip().removesuffix(" (deleted)") == str(self.disk):
                found.append(name)
        return found

    # -- the kernel nbd device

    def recorded_nbd_device(self) -> str | None:
        try:
            return self.nbd_device_file.read_text().strip() or None
        except FileNotFoundError:
            return None

    @property
    def nbd_identifier(self) -> str:
        """What the kernel shows as the backend of this attachment's nbd device."""
        return f"pairvol-csi:{self.dir}"

    def _owns(self, device: str) -> bool:
        return nbd.backend(device) == self.nbd_identifier

    async def nbd_devices(self) -> list[str]:
        """The nbd device this attachment recorded, if it is still set up: configured by
        this attachment (its backend identifier), or not configured any more but still used
        (mounted, or bind-mounted into a pod): its connection was taken away under a mount.
        A recorded device that is neither (a node restart, a crash before the connect) is
        not the attachment's any more, nor is one another program has connected since."""
        device = await asyncio.to_thread(self.recorded_nbd_device)
        if device is None:
            return []
        if await asyncio.to_thread(nbd.connected, device):
            return [device] if await asyncio.to_thread(self._owns, device) else []
        return [device] if await _device_in_use(device) else []

    async def _attach_nbd(self) -> str:
        """Connect a kernel nbd device to the attacher's local export: the recorded one if
        this attachment configured it already, else a free one, recorded before it is
        connected."""
        recorded = await asyncio.to_thread(self.recorded_nbd_device)
        if recorded is not None:
            if await asyncio.to_thread(nbd.connected, recorded):
                if await asyncio.to_thread(self._owns, recorded):
                    return recorded
            elif await _device_in_use(recorded):
                raise Broken(
                    f"the nbd device {recorded} of {self.volume_id} lost its connection while it is still mounted "
                    "(I/O on it fails); unpublish and unstage the volume, then stage it again (its pods must restart)"
                )
        async with _nbd_choice():
            refused = []
            for device in await self._free_nbd_devices(prefer=recorded):
                await asyncio.to_thread(_write_synced, self.nbd_device_file, device + "\n")
                crashpoints.hit(STAGE_NBD_RECORDED)
                try:
                    await nbd.connect(device, self.nbd_sock, LOCAL_EXPORT, self.nbd_identifier)
                except nbd.KernelRefused as exc:  # held open by another program: try the next
                    refused.append(str(exc))
                    continue
                except nbd.NbdError as exc:
                    raise AttachError(f"attaching {self.volume_id} through the kernel failed: {exc}") from exc
                log.info("connected %s to the attacher of %s", device, self.volume_id)
                return device
        raise AttachError(
            f"no free nbd device on this node for {self.volume_id} ({'; '.join(refused) or 'all are in use'}); "
            "load the nbd module with more devices (modprobe nbd nbds_max=N)"
        )

    async def _free_nbd_devices(self, prefer: str | None) -> list[str]:
        """The nbd devices nothing uses: not configured, not mounted, not held, not recorded
        by another attachment of this node plugin; ``prefer`` first."""
        claimed = await asyncio.to_thread(_recorded_nbd_devices, self.dir.parent, self.dir)
        candidates = await asyncio.to_thread(nbd.free_devices)
        if prefer in candidates:
            candidates.insert(0, candidates.pop(candidates.index(prefer)))
        return [d for d in candidates if d not in claimed and not await _device_in_use(d)]

    async def _detach_nbd(self, device: str) -> None:
        """Disconnect the device if this attachment configured it (another program's
        connection on a device the record names is left alone), then forget it."""
        if await asyncio.to_thread(nbd.connected, device) and await asyncio.to_thread(self._owns, device):
            try:
                # returns once the kernel has shut its socket down: nothing reaches the attacher any more
                await asyncio.to_thread(nbd.disconnect, device)
            except nbd.NbdError as exc:
                raise AttachError(str(exc)) from exc
            deadline = asyncio.get_running_loop().time() + NBD_RELEASE_WAIT_S
            while await asyncio.to_thread(nbd.connected, device):
                if asyncio.get_running_loop().time() > deadline:
                    log.warning(
                        "%s of %s is disconnected but still held open elsewhere (a mount namespace that copied "
                        "its mount?); the kernel releases it when the last holder closes it",
                        device, self.volume_id,
                    )  # fmt: skip
                    break
                await asyncio.sleep(0.05)
        await asyncio.to_thread(self.nbd_device_file.unlink, True)

    # -- either device

    async def devices(self) -> list[str]:
        """The block devices this attachment set up (normally one)."""
        return [*await self.loop_devices(), *await self.nbd_devices()]

    async def device(self) -> str | None:
        """The block device mkfs, mount and Block-mode pods use, if there is one."""
        devices = await self.devices()
        return devices[0] if devices else None

    async def _attach_device(self, record: Record) -> str:
        return await (self._attach_nbd() if record.transport == "nbd" else self._attach_loop())

    async def _attach_loop(self) -> str:
        devices = await self.loop_devices()
        device = devices[0] if devices else None
        if device is None:
            # buffered, not --direct-io=on: the loop device's direct I/O onto QEMU 7.2's FUSE
            # export misdirected writes by 512 KiB in about half the runs on these machines
            # (docs/csi.md, "The loop device"); buffered writes to a FUSE file without a
            # writeback cache go through to the export at once, and a flush of the loop
            # device is an fsync of the file, i.e. a FLUSH to the primary
            _, device = await run("losetup", "--find", "--show", "--direct-io=off", str(self.disk))
        return device

    # -- the file system

    async def _file_system(self, device: str) -> str | None:
        """The file system type on ``device``; None when blank; NotBlank when it holds
        anything else (a partition table, raw data)."""
        rc, out = await run("blkid", "-p", "-o", "export", device, check=False)
        if rc == 0:
            found = dict(line.partition("=")[::2] for line in out.splitlines() if "=" in line)
            if found.get("TYPE"):
                return found["TYPE"]
            raise NotBlank(f"{self.volume_id} holds no file system but other data ({out.replace(chr(10), ' ')})")
        if rc != 2:  # 2: nothing found; anything else is a failed probe, not a blank disk
            raise AttachError(f"cannot probe {device} of {self.volume_id} (blkid exit status {rc}): {out}")
        size = await asyncio.to_thread(_device_size, device)
        if not await asyncio.to_thread(_is_zero, device, size):
            raise NotBlank(
                f"{self.volume_id} has no file system signature but is not blank (its first or last MiB "
                "holds data); refusing to format it — was it used as a Block volume?"
            )
        return None

    async def _make_fs(self, device: str, fs_type: str) -> None:
        problem = size_problem(fs_type, await asyncio.to_thread(_device_size, device))
        if problem is not None:
            raise TooSmall(f"{self.volume_id}: {problem}")
        # a cancelled stage lets mkfs finish: cut short, it would leave the device neither
        # blank nor formatted (the next stage would refuse it as holding data)
        if fs_type == "xfs":
            await run("mkfs.xfs", "-q", "-K", device, timeout=300, finish_on_cancel=True)
        else:
            await run(f"mkfs.{fs_type}", "-q", "-E", "nodiscard", device, timeout=300, finish_on_cancel=True)
        log.info("made an %s file system on %s (%s)", fs_type, self.volume_id, device)

    # -- stage / unstage

    async def stage(self, record: Record, psk_key: str, mount_flags: tuple[str, ...] = ()) -> str:
        """Build the attachment (idempotent: each step checks what is there); returns the
        device (loop or nbd)."""
        current = await asyncio.to_thread(self.read_record)
        if record.pinned and current is not None and current.pinned:
            record = replace(record, export_name=current.export_name)
        await asyncio.to_thread(self._write_record, record)
        await asyncio.to_thread(self._write_psk, record.psk_identity, psk_key)
        if not await self.attacher_running():
            stale = await self.devices()
            if stale:
                # The attacher died under a device that may still be mounted or published:
                # a new attacher cannot be put under it, only a new attachment can be made.
                raise Broken(
                    f"the attacher of {self.volume_id} is gone while its device {', '.join(stale)} is still "
                    "set up (I/O on it fails); unpublish and unstage the volume, then stage it again "
                    "(its pods must restart)"
                )
            if await mounted(self.disk):  # a dead daemon's FUSE mount
                await run("umount", "-l", str(self.disk))
            if record.pinned:  # a new attachment: to the lineage that serves now
                record = replace(record, export_name=await self._lineage_export(record))
                await asyncio.to_thread(self._write_record, record)
            await self.attachers.start(self)  # it reads the record just written
        elif record.pinned and await self.superseded(record):
            raise Superseded(
                f"{self.volume_id} failed over since it was attached (its lineage {record.export_name} ended; "
                "a Checkpoint-mode failover rolls the disk back): its I/O fails; unpublish and unstage the "
                "volume, then stage it again (its pods must restart and mount it fresh)"
            )
        device = await self._attach_device(record)
        if record.block:
            return device
        staging = Path(record.staging_path)
        if await self._staged(device, staging):
            return device
        found = await self._file_system(device)
        if found is None:
            await self._make_fs(device, record.fs_type)
        elif found != record.fs_type:
            raise NotBlank(
                f"{self.volume_id} holds an {found} file system but {record.fs_type} was requested; "
                "it is never reformatted (request fsType "
                f"{found} or use a new volume)"
            )
        await asyncio.to_thread(staging.mkdir, parents=True, exist_ok=True)
        options = ["-o", ",".join(mount_flags)] if mount_flags else []
        await run("mount", "-t", record.fs_type, *options, device, str(staging))
        return device

    async def _staged(self, device: str, staging: Path) -> bool:
        """Whether the file system on ``device`` is what is mounted at ``staging``. Anything
        else mounted there (an earlier attachment's file system, whose device is gone or
        dead, or a mount that is not the driver's) is unmounted: it is never taken for the
        volume, nor left under the new mount."""
        ours = await asyncio.to_thread(_dev_number, device)
        while (found := await _mount_at(staging)) is not None:
            number, source = found
            if number == ours:
                return True
            log.warning(
                "%s has %s (device %s) mounted on it, not the device %s of %s; unmounting it",
                staging, source, number, device, self.volume_id,
            )  # fmt: skip
            rc, out = await run("umount", str(staging), check=False)
            if rc != 0:
                raise AttachError(
                    f"the staging path {staging} of {self.volume_id} has {source} mounted on it, not the volume's "
                    f"device {device}, and it cannot be unmounted ({out}); find what uses it, unmount it "
                    f"(umount {staging}) and stage the volume again"
                )
        return False

    async def unstage(self, staging_path: Path | None) -> None:
        """Tear down in the order of the module docstring; nothing left is not an error."""
        record = await asyncio.to_thread(self.read_record)
        paths = {staging_path} if staging_path else set()
        if record is not None:
            paths.add(Path(record.staging_path))
        devices = await self.devices()
        # Refuse before changing anything while a pod still uses the device: detaching it
        # and stopping the attacher under a publication would fail the pod's I/O.
        for device in devices:
            users = sorted(set(await _device_users(device)) - {str(p) for p in paths})
            if users:
                raise Busy(f"{self.volume_id} is still used at {', '.join(users)}; unpublish it (or release it) first")
        for path in paths:
            # every mount stacked there: one left over would keep a file system unflushed
            # while its device goes, and the next stage would find it
            while (record is None or not record.block) and await mounted(path):
                await run("umount", str(path))
        crashpoints.hit(UNSTAGE_UNMOUNTED)
        for device in devices:
            await self._flush_before_detach(device, record, paths)
            if Path(device).name.startswith("nbd"):
                await self._detach_nbd(device)
            else:
                await self._detach_loop(device)
        crashpoints.hit(UNSTAGE_LOOP_DETACHED)
        await self.attachers.stop(self)
        crashpoints.hit(UNSTAGE_ATTACHER_STOPPED)
        await asyncio.to_thread(shutil.rmtree, self.dir, True)
        log.info("detached %s", self.volume_id)

    async def _flush_before_detach(self, device: str, record: Record | None, paths: set[Path]) -> None:
        """Flush ``device`` to the primary, opened exclusively: the kernel refuses that open
        while a file system still has the device, e.g. through a copy of its mount in
        another mount namespace, whose last writes (journal checkpoint, superblock) come
        only when that copy goes. Then HeldElsewhere, and nothing is detached. A failed flush
        is an error too (the file system's writes may not all have reached the primary),
        unless nothing can carry them any more: a dead attacher, an ended lineage. A flush
        that does not return in time (a primary that stopped answering) fails the call; it
        goes on in its thread, holding the device, and a retry waits for it."""
        pending = _pending_flushes.get(device)
        if pending is not None and pending.is_alive():
            raise AttachError(
                f"the flush of {device} of {self.volume_id} that an earlier unstage started has not returned yet (the "
                "volume's primary does not answer it); nothing was detached, and the unstage is retried. If it stays "
                "so, check that the volume's primary serves its export"
            )
        fd = await self._open_exclusively(device, paths)
        failed = await _flush_in_its_own_thread(device, fd, self.flush_wait_s, self.volume_id)
        if failed is None:
            return
        if await self.attacher_running() and not (record is not None and await self.superseded(record)):
            raise AttachError(
                f"flushing {device} of {self.volume_id} to the volume's primary failed ({failed.strerror}): writes of "
                "its file system may not have reached the primary, so nothing was detached; the unstage is retried "
                "(if it keeps failing, check that the volume's primary serves its export)"
            )
        log.warning(
            "flushing %s of %s failed before its detach (%s); its attacher is gone or its lineage ended, so "
            "nothing more can reach the volume",
            device, self.volume_id, failed.strerror,
        )  # fmt: skip

    async def _open_exclusively(self, device: str, paths: set[Path]) -> int:
        """An exclusive descriptor of ``device``. A refusal that lasts EXCLUSIVE_RETRY_S (not a
        passing prober such as blkid) is a file system still alive elsewhere: HeldElsewhere."""
        deadline = asyncio.get_running_loop().time() + EXCLUSIVE_RETRY_S
        while True:
            try:
                return await asyncio.to_thread(os.open, device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise AttachError(
                        f"cannot open {device} of {self.volume_id} to flush it: {exc.strerror}"
                    ) from exc
                if asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.1)
                    continue
                number = await asyncio.to_thread(_dev_number, device)
                holders = await asyncio.to_thread(_holders, device)
                where = ", ".join(holders) or (
                    "by a mount in a mount namespace this plugin cannot see (on the node: "
                    f"grep -l ' {number} ' /proc/*/mountinfo), or by a program that opened it exclusively"
                )
                raise HeldElsewhere(
                    f"{self.volume_id} is unmounted at {', '.join(sorted(map(str, paths))) or 'its staging path'} "
                    f"but its file system is still in use: {device} ({number}) is held {where}. A process started on "
                    "this node while the volume was mounted keeps a copy of the mount unless its mounts receive the "
                    "node's unmounts (mountPropagation HostToContainer), and the file system writes its journal and "
                    "superblock only when the last copy goes; nothing was detached, so those writes still reach the "
                    "volume. End those processes (or unmount the volume in their mount namespace); the unstage is "
                    "retried"
                ) from exc

    async def _detach_loop(self, device: str) -> None:
        """Detach the loop device and wait until the kernel has released it. A loop device
        that something still holds open is only marked to detach at its last close, while
        the holder may still write to it: then the attacher must stay (AttachError)."""
        await run("losetup", "--detach", device)
        deadline = asyncio.get_running_loop().time() + LOOP_RELEASE_WAIT_S
        while device in await self.loop_devices():
            if asyncio.get_running_loop().time() > deadline:
                raise AttachError(
                    f"{device} of {self.volume_id} is still open elsewhere after its detach (the kernel detaches it "
                    "at its last close); its attacher is kept so that what the holder writes still reaches the "
                    f"volume; find it (fuser -v {device}), end it, and the unstage is retried"
                )
            await asyncio.sleep(0.05)

    async def discard_if_left_over(self) -> str:
        """At the node plugin's start: ``"running"`` when the attacher runs (only the
        plugin restarted) and ``"broken"`` when it is gone under a device that is still set
        up (the CO must unstage it), both kept as they are; ``"discarded"`` when only files
        were left — no attacher, no device of its own, so nothing mounted on it either: what
        a node restart leaves (its processes, loop and nbd devices and mounts are gone), or a
        crash before the attacher started. Those files (the record, the volume's key, a dead FUSE
        mount point) are removed: a later NodeStageVolume builds the attachment anew, an
        unstage finds nothing to do."""
        if await self.attacher_running():
            return "running"
        if await self.devices():
            return "broken"
        if await mounted(self.disk):
            await run("umount", "-l", str(self.disk))
        await asyncio.to_thread(shutil.rmtree, self.dir, True)
        return "discarded"


class Attachers(Protocol):
    """Who starts, stops and watches the attachers of a node (module docstring)."""

    async def running(self, att: Attachment) -> bool: ...

    async def start(self, att: Attachment) -> None:
        """Start the attacher of ``att`` from its record on disk (nothing if it runs)."""

    async def stop(self, att: Attachment) -> None:
        """Stop it with SIGTERM (nothing if it does not run)."""


class DirectAttachers:
    """This process starts and stops the attachers itself: what the attacher host does,
    and what a node plugin started without ``--attacher-host`` does (its attachers then
    die with its container)."""

    async def running(self, att: Attachment) -> bool:
        return await asyncio.to_thread(_attacher_runs, att)

    async def start(self, att: Attachment) -> None:
        record = await asyncio.to_thread(att.read_record)
        if record is None:
            raise AttachError(f"{att.volume_id} has no attachment record in {att.dir}; stage it first")
        if await self.running(att):
            return
        await start_attacher(att, record)

    async def stop(self, att: Attachment) -> None:
        await stop_attacher(att)


def _attacher_runs(att: Attachment) -> bool:
    """Whether the attacher of ``att`` runs; a dead one that is our zombie is reaped."""
    with contextlib.suppress(OSError, ValueError):
        _running(int(att.pidfile.read_text().strip()))
    return att.attacher_pid() is not None


def attacher_argv(att: Attachment, record: Record, exe: str) -> list[str]:
    """The attacher's command line: the only place that builds it. Every value comes from
    the attachment's record and its directory."""
    return [
        exe,
        "--chardev",
        f"socket,id=qmp0,path={_opt(att.qmp)},server=on,wait=off",
        "--monitor",
        "chardev=qmp0",
        "--object",
        f"tls-creds-psk,id=tls0,endpoint=client,dir={_opt(att.dir)},username={_opt(record.psk_identity)}",
        "--blockdev",
        f"driver=nbd,node-name=volume,export={_opt(record.export_name)},tls-creds=tls0,server.type=inet,"
        f"server.host={_opt(record.export_host)},server.port={record.export_port},"
        f"reconnect-delay={PINNED_RECONNECT_DELAY_S if record.pinned else RECONNECT_DELAY_S}",
        *_export_args(att, record),
        "--pidfile",
        str(att.pidfile),
        "--daemonize",
    ]


def _export_args(att: Attachment, record: Record) -> list[str]:
    """How the attacher serves the volume to the node, by the attachment's transport."""
    if record.transport == "nbd":
        return [
            "--nbd-server",
            f"addr.type=unix,addr.path={_opt(att.nbd_sock)}",
            "--export",
            f"type=nbd,id=disk,node-name=volume,name={LOCAL_EXPORT},writable=on",
        ]
    return ["--export", f"type=fuse,id=disk,node-name=volume,mountpoint={_opt(att.disk)},writable=on,allow-other=off"]


async def start_attacher(att: Attachment, record: Record) -> None:
    """Start the attacher and wait until it has connected and mounted its export."""
    argv = attacher_argv(att, record, require_binary("qemu-storage-daemon"))
    if record.transport == "fuse":
        await asyncio.to_thread(att.disk.touch, 0o600)
    logfile = await asyncio.to_thread(open, att.log_path, "ab")
    try:
        # --daemonize: this process exits once the daemon has connected and mounted
        # its export (or failed to); the daemon itself is in a session of its own.
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=logfile, stderr=logfile, start_new_session=True
        )
    finally:
        logfile.close()
    # as in run(): a start cut short (cancelled, too slow) kills what it started and waits
    # for it, so that a retry never starts a second attacher next to a first one starting
    exited = False
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            rc = await proc.wait()
        exited = True
    except TimeoutError:
        raise AttachError(
            f"could not reach the volume's export at {record.export_host}:{record.export_port} "
            f"within {START_TIMEOUT_S:g} s"
        ) from None
    finally:
        if not exited:
            await _kill_and_wait(proc)
    if rc != 0:
        tail = (await asyncio.to_thread(att.log_path.read_text, errors="replace")).strip().splitlines()[-3:]
        raise AttachError(
            f"could not attach to the volume's export at {record.export_host}:{record.export_port}: " + " | ".join(tail)
        )
    log.info("attached %s to %s:%d", att.volume_id, record.export_host, record.export_port)


async def stop_attacher(att: Attachment) -> None:
    """SIGTERM (it flushes and closes its block graph), SIGKILL after STOP_GRACE_S; then a
    dead daemon's FUSE mount is removed."""
    pid = await asyncio.to_thread(att.attacher_pid)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = asyncio.get_running_loop().time() + STOP_GRACE_S
        while await asyncio.to_thread(_running, pid):
            if asyncio.get_running_loop().time() > deadline:
                log.warning("attacher %d of %s ignored SIGTERM; killing it", pid, att.volume_id)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                break
            await asyncio.sleep(0.05)
    # a daemon that died without unmounting leaves a dead FUSE mount on the file
    if await mounted(att.disk):
        await run("umount", "-l", str(att.disk))


def _running(pid: int) -> bool:
    """Whether ``pid`` runs. An attacher that exited stays a zombie until its parent reaps
    it: in a container that is the attacher host or the node plugin (PID 1, to which
    daemons are reparented), so it is reaped here."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    if stat.rpartition(")")[2].split()[0] != "Z":
        return True
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return False


async def _device_in_use(device: str) -> bool:
    """Whether anything uses ``device``: a mount of it or of one of its partitions, its node
    bind-mounted, or a device stacked on it."""
    return bool(await _device_users(device))


async def _device_users(device: str) -> list[str]:
    """What uses ``device``: mount points (of it or, for an nbd device, of its partitions)
    and the devices the kernel stacks on it."""
    if Path(device).name.startswith("nbd"):
        numbers = await asyncio.to_thread(nbd.device_numbers, device)
        stacked = await asyncio.to_thread(nbd.holders, device)
    else:
        try:
            numbers = [await asyncio.to_thread(_dev_number, device)]
        except FileNotFoundError:
            return []
        stacked = []
    text = await asyncio.to_thread(Path("/proc/self/mountinfo").read_text)
    return device_users(text, device, numbers) + [f"/dev/{name} (stacked on {device})" for name in stacked]


def _recorded_nbd_devices(state_dir: Path, besides: Path) -> set[str]:
    """The nbd devices the other attachments under ``state_dir`` recorded."""
    found = set()
    for path in state_dir.glob("*/nbd.device"):
        if path.parent != besides:
            with contextlib.suppress(OSError):
                found.add(path.read_text().strip())
    return found


async def _flush_in_its_own_thread(device: str, fd: int, wait_s: float, volume_id: str) -> OSError | None:
    """fsync the exclusive descriptor ``fd`` of ``device`` (closed when done): its dirty pages
    are written and a cache flush is sent down to the attacher (for a loop device an fsync of
    the FUSE file, for nbd an NBD FLUSH), which answers once the primary has. The flush's
    error, or AttachError if it has not returned within ``wait_s``: it then goes on in its
    thread, which is not waited for (a flush that a silent primary blocks must not hold a
    thread of the shared pool, nor this call); its descriptor keeps the device claimed, and
    :data:`_pending_flushes` tells a retry so."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[OSError | None] = loop.create_future()

    def report(result: OSError | None) -> None:
        if not done.done():
            done.set_result(result)

    def work() -> None:
        result: OSError | None = None
        try:
            os.fsync(fd)
        except OSError as exc:
            result = exc
        finally:
            os.close(fd)
            if _pending_flushes.get(device) is threading.current_thread():
                del _pending_flushes[device]
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(report, result)

    thread = threading.Thread(target=work, name=f"flush {device}", daemon=True)
    _pending_flushes[device] = thread
    thread.start()
    try:
        return await bounded(asyncio.shield(done), wait_s)
    except TimeoutError:
        raise AttachError(
            f"the flush of {device} of {volume_id} has not returned within {wait_s:g} s (the volume's primary does not "
            "answer it); nothing was detached, and the unstage is retried once the flush returns"
        ) from None


def _holders(device: str) -> list[str]:
    """What holds ``device`` besides this process's mounts, as far as this process can see:
    one process per other mount namespace in which it (or an nbd partition) is mounted, and
    the devices the kernel stacks on it."""
    numbers = nbd.device_numbers(device) if Path(device).name.startswith("nbd") else [_dev_number(device)]
    ours = os.readlink("/proc/self/ns/mnt")
    seen = {ours}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            namespace = os.readlink(entry / "ns" / "mnt")
            if namespace in seen:
                continue
            mountinfo = (entry / "mountinfo").read_text()
            comm = (entry / "comm").read_text().strip()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        seen.add(namespace)
        # file systems only: a bind of the device node (a Block volume's copy) opens nothing
        rows = (line.split() for line in mountinfo.splitlines())
        points = [unescape_mountinfo(f[4]) for f in rows if len(f) > 4 and f[2] in numbers]
        if points:
            found.append(f"mounted at {points[0]} in the mount namespace of process {entry.name} ({comm})")
    with contextlib.suppress(OSError):
        stacked = (
            nbd.holders(device)
            if Path(device).name.startswith("nbd")
            else sorted(p.name for p in (Path("/sys/class/block") / Path(device).name / "holders").iterdir())
        )
        found += [f"by /dev/{name} (stacked on it)" for name in stacked]
    return found


def _write_synced(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _opt(value: object) -> str:
    """A value inside a QEMU option string (a comma is written twice)."""
    return str(value).replace(",", ",,")


def lineage_names(listing: str) -> list[str]:
    """The lineage exports in ``qemu-nbd --list`` output (lines `` export: 'NAME'``)."""
    names = []
    for line in listing.splitlines():
        line = line.strip()
        if line.startswith("export: '") and line.endswith("'"):
            name = line[len("export: '") : -1]
            if name.startswith(LINEAGE_PREFIX):
                names.append(name)
    return names


def has_mkfs(fs_type: str) -> bool:
    return shutil.which(f"mkfs.{fs_type}") is not None
