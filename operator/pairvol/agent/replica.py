"""One replica of one volume: replication.c's semantics on a qemu-storage-daemon.

qsd cannot start QEMU's replication filter (only qemu-system has ``xen-set-replication``),
so this class does the filter's job with QMP primitives (see ``pairvol.qemu.recipes``):

* secondary start = overlays + NBD export of the secondary disk + ``blockdev-backup
  sync=none`` into the hidden disk (copy-before-write), checkpoint id 0;
* checkpoint = a *new* empty hidden/active pair and one QMP ``transaction`` that starts
  copy-before-write into it, then the old job is cancelled and the old pair deleted. The
  transaction drains in-flight NBD writes, so every write lands wholly before or after the
  cut, and the primary is never paused;
* failover = fence (drop the export and the NBD server: the old primary's connection dies
  and cannot come back), cancel copy-before-write, then ``checkpoint`` mode commits
  active+hidden into the disk (the checkpoint state) and ``latest`` mode drops them (every
  write the primary had acknowledged); then serve the workload export;
* primary = quorum(vote-threshold=1) over the local disk and the peer, reached through
  a :class:`~pairvol.agent.peerlink.PeerLink` (link daemon + gate) that owns everything
  about the pairing, including the full sync and the rule that no write is acknowledged
  without the peer before the peer is durably marked OutOfSync;
* resync after an outage (``sync: auto``, docs/correctness.md R1-R3) = a dirty bitmap on
  the quorum started before the peer can miss a write, recorded against the identity of
  the peer's disk, saved across a clean stop, and copied by a backup job above the quorum
  only to a secondary that answers to that identity; otherwise a full sync, with the reason;
* checksum resync (R4) = where no record vouches for a peer disk that holds data, both
  agents digest their own disks and the regions that differ become bits of that same
  bitmap, started before the comparison (``pairvol.agent.checksum``).
* union resync (R6) = an old primary that stopped cleanly in sync attests it (taken into
  memory and cleared durably at its next start, before anything can write its disk); a
  secondary promoted in Latest mode from that same sync point starts a dirty bitmap before
  its first workload write; when they meet, only that bitmap is copied (``_attest_clean_stop``,
  ``_take_attestation``, ``_give_attestation``, ``_record_since_promotion``).
* automatic re-protection (docs/correctness.md R5) = a peer dropped while the replica serves
  is re-paired by the primary on its own, at the same epoch, with ``auto``: after the failed
  link left the quorum, a bounded number of times with growing delays (``_reprotect``).

Every command is serialised by one lock; background tasks (retire, a link that went down)
take the same lock before they change the graph. Two things never wait for that lock,
because a held write may be what the lock's holder waits for: fencing the workload export,
and the link's mark-then-release (docs/correctness.md).
The secondary's overlays, copy-before-write jobs and failover commit are owned by
:class:`pairvol.agent.secondary.SecondaryChain`; this class keeps the role, stage and
epoch, what is persisted, and the order of the steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pairvol.agent import checksum as cs
from pairvol.agent import crashpoints, dirlock, peerapi, secondary, tcpexport
from pairvol.agent import resync as rs
from pairvol.agent import state as persist
from pairvol.agent.config import AgentConfig, Psk
from pairvol.agent.health import Health, Observed, judge
from pairvol.agent.metrics import AgentMetrics
from pairvol.agent.peerlink import PeerLink, PeerLinkError, PeerRefusedExport
from pairvol.agent.secondary import ChainCheckFailed, SecondaryChain, fsync_paths
from pairvol.agent.stages import (
    FAILOVER_TRIGGERS,
    FailoverMode,
    FenceCause,
    IllegalTransition,
    Position,
    Role,
    Stage,
    check_checkpoint,
    check_failover,
    check_resize,
    check_start_primary,
    check_start_secondary,
    check_stop,
    io_status,
)
from pairvol.agent.state import Checkpoint, PersistedState
from pairvol.agent.tcpexport import start_tcp_export
from pairvol.aio import cancel_and_wait
from pairvol.errors import PairvolError
from pairvol.qemu import QemuError, QsdDied, img
from pairvol.qemu import recipes as r
from pairvol.qemu.qsd import Qsd

log = logging.getLogger(__name__)

# the replica's daemon serves the replication export here; the listener daemon on
# --replication-listen is its only client (pairvol.agent.tcpexport)
REPLICATION_SOCKET = "repl.sock"

Hook = Callable[[int], Awaitable[None]]

CHECKPOINT_SAVED = crashpoints.point(
    "checkpoint.after-save", "the new checkpoint is persisted; the old generation is not yet retired"
)
FAILOVER_EPOCH_SAVED = crashpoints.point(
    "failover.after-epoch-saved", "the new epoch and stage FAILOVER are persisted; the export still serves"
)
FAILOVER_EXPORT_STOPPED = crashpoints.point(
    "failover.after-export-stopped", "the old primary is cut off; copy-before-write still runs"
)
FAILOVER_DURABLE = crashpoints.point(
    "failover.after-overlays-durable", "the overlays are durable and marked so; the commit has not started"
)
TRACK_STARTED = crashpoints.point(
    "track.started", "primary: the dirty bitmap for the dropped peer exists; the record is not yet persisted"
)
CHECKSUM_COMPARED = crashpoints.point(
    "checksum.compared", "primary: both disks compared; the differing regions are not yet in the dirty bitmap"
)
CHECKSUM_MARKED = crashpoints.point(
    "checksum.marked",
    "primary: the differing regions are merged into the dirty bitmap and the record saved; no copy job yet",
)
DIGESTS_READ = crashpoints.point(
    "digests.read", "secondary: a span of its disk read and digested for a checksum resync; not yet answered"
)
FAILOVER_BEFORE_SERVE = crashpoints.point(
    "failover.before-serve",
    "role primary is persisted and the overlay nodes are gone (their files not yet); the workload export is not up",
)
RESIZE_UNEXPORTED = crashpoints.point(
    "resize.after-unexport",
    "grow: the replica's NBD exports are stopped (secondary: no undo log any more); nothing resized",
)
RESIZE_SAVED = crashpoints.point(
    "resize.after-size-saved", "grow: the new size and the disk's old length are persisted; the disk is not grown"
)
RESIZE_GROWN = crashpoints.point(
    "resize.after-disk-grown", "grow: the disk file has its new length; the grow is not yet marked complete"
)
RESIZE_COMPLETE = crashpoints.point(
    "resize.after-complete", "grow: the grow is persisted as complete; the exports are not yet back"
)
UNION_ATTESTED = crashpoints.point(
    "union.attested", "old primary: the final state of a clean stop says its disk stopped in sync with its peer's"
)
UNION_TAKEN = crashpoints.point(
    "union.attestation-taken",
    "restart: a clean stop's attestation was taken into memory and cleared durably; the API does not listen yet",
)
UNION_STARTED = crashpoints.point(
    "union.started",
    "new primary: the bitmap of the writes since the promotion exists and is recorded; the export is not up",
)


class ReplicaError(PairvolError):
    """A replica operation failed (HTTP 500); the message says what and why."""


class NoAutomaticResync(PairvolError):
    """The record does not allow an automatic re-protection of the peer (R5)."""


class InvalidSpan(PairvolError):
    """A digest request outside the volume or off the regions (HTTP 400)."""


class GrowRefused(ReplicaError):
    """The disk could not grow (no space): the replica went back to its old size."""


class ServeRefused(ReplicaError):
    """A hook before serving (taking the Lease) failed: the workload export was not served."""


class StoppedWaiting(ReplicaError):
    """The agent was stopped while another agent held its data dir: nothing was opened."""


# how long starting the dirty bitmap may hold the release of a failed link
TRACK_TIMEOUT_S = 5.0
# how long a clean stop may spend saving the dirty bitmap before it gives up on it
SAVE_BITMAP_TIMEOUT_S = 10.0
# how long asking the peer's agent which disk it has may hold POST /v1/primary
PEER_VIEW_TIMEOUT_S = 5.0
MARKS_FILE = "checksum-marks.qcow2"  # in .run/: scratch, merged at once, never reused
MARKS_NODE = "checksum-marks"
ROLLBACK_MARKS_FILE = "rollback-marks.qcow2"  # in .run/: scratch, merged at once (R6.3)
# how long recording "in sync" (the Lease) may hold a mark that waits for it
IN_SYNC_HOOK_TIMEOUT_S = 2.0


def _reported_at(event: dict[str, Any]) -> float:
    """When QEMU built the event (its "timestamp", CLOCK_REALTIME like time.time()); an
    event without one is judged by the count alone."""
    try:
        ts = event["timestamp"]
        return float(ts["seconds"]) + float(ts["microseconds"]) / 1e6
    except (KeyError, TypeError, ValueError):
        return float("inf")


def new_disk_id() -> str:
    return uuid.uuid4().hex


def boot_id() -> str | None:
    """This boot of the node: a secondary whose daemon died with its node may have lost
    writes it had acknowledged (they were in the page cache), one killed alone did not."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _grow_file(path: Path, size: int, old: int | None = None) -> None:
    """Extend a raw disk file with allocated zeros to ``size`` (as it was made: preallocated,
    so a full file system shows at the grow, not at a later write) and make it durable.
    ``old``: the length the state records as the one before the grow (default: the file's),
    which a failed grow returns the file to."""
    fd = os.open(path, os.O_RDWR)
    try:
        length = os.fstat(fd).st_size
        old = length if old is None else old
        if length < size:
            try:
                os.posix_fallocate(fd, length, size - length)
            except OSError as exc:
                os.ftruncate(fd, old)  # back to the length the state records as the old one
                raise ReplicaError(
                    f"cannot grow {path} from {old} to {size} bytes: {exc.strerror}; free space on its file system"
                ) from exc
        os.fsync(fd)
    finally:
        os.close(fd)


class _Steps:
    """Where a multi-step operation spent its time: milliseconds per step, in order
    (the failover reports them as ``stepsMs`` and in its log line)."""

    def __init__(self, t0: float) -> None:
        self._last = t0
        self.ms: dict[str, float] = {}

    def done(self, step: str) -> None:
        now = time.perf_counter()
        self.ms[step] = round((now - self._last) * 1000, 3)
        self._last = now

    def line(self) -> str:
        return ", ".join(f"{k} {v:.1f}" for k, v in self.ms.items())


class Replica:
    def __init__(self, cfg: AgentConfig, metrics: AgentMetrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.data_dir = cfg.data_dir
        self.disk_path = cfg.data_dir / persist.DISK_FILE
        self.run_dir = cfg.data_dir / ".run"
        self.qsd = Qsd(self.run_dir, cfg.data_dir / "qsd.log")
        self.state = PersistedState(name=cfg.name, size=cfg.size)
        self.lock = asyncio.Lock()
        self.restored: str | None = None
        self.serving = False
        self.replication = "none"
        self.link: PeerLink | None = None
        self.peer_error: str | None = None
        self.fenced = asyncio.Event()
        # what stopped the workload export the last time (None while it serves or never
        # served): the operator restarts a primary fenced only by its Lease in place
        self.fenced_by: FenceCause | None = None
        self._fence: tuple[str, FenceCause] | None = None  # the last fence's reason and cause
        self.last_error: str | None = None
        self.out_of_sync_hooks: list[Hook] = []
        self.before_serve_hooks: list[Hook] = []
        self._tls_dir: Path | None = None  # the replication key, as qsd reads it
        self._export_tls_dir: Path | None = None  # the workload export's key (the relay's)
        self._save_lock = asyncio.Lock()
        self._oos_lock = asyncio.Lock()
        self._peer_marked = False
        self.relay: Qsd | None = None
        self.listener: Qsd | None = None  # the secondary's replication port (its own daemon)
        self._relay_spawn: asyncio.Task[Qsd] | None = None  # the relay's daemon, started ahead
        self._fence_task: asyncio.Task[None] | None = None
        self.undo_log_broken: str | None = None
        self.chain = SecondaryChain(
            self.qsd, self.data_dir, self.run_dir, cfg.size, self.lock, metrics.cow_bytes.labels(cfg.name).inc
        )
        # a cut not yet begun that later requests join, per link serial they name (S3, S5)
        self._queued_cuts: dict[str | None, asyncio.Future[dict[str, Any]]] = {}
        # S5: which link a secondary takes writes from, unique to this process's life and
        # changed by every relink; a primary's: what its peer's relink answered for this link
        self._serial_base, self._serial_count = uuid.uuid4().hex[:12], 0
        self.link_serial = f"{self._serial_base}-0"
        self._peer_link_serial: str | None = None
        self._bitmap_present = False  # the tracking bitmap exists in this daemon
        self._bitmap_to_load = False  # open(): a clean stop saved it, load it into the new daemon
        self.last_sync: dict[str, Any] | None = None
        self.peer_api: str | None = None  # the peer's agent API, for a checksum resync (R4)
        self._digest_lock = asyncio.Lock()  # one digest pass at a time on a secondary
        # automatic re-protection (R5): the current pairing, and what the attempts did
        self.before_resync_hooks: list[Hook] = []  # e.g. record on the Lease that the peer is rewritten
        self.in_sync_hooks: list[Hook] = []  # e.g. clear the Lease's marks once the peer is in sync
        self._pairing: tuple[tuple[str, int], int] | None = None  # (peer, its epoch)
        self._peer_identity: str | None = None  # the disk identity the peer last answered to
        self._reprotect_task: asyncio.Task[None] | None = None
        self._reprotect_running = False  # an attempt holds the lock right now
        self._reprotect_failures = 0
        self._reprotect_due: float | None = None  # monotonic time of the next attempt
        self._reprotect_error: str | None = None
        self._in_sync_at: float | None = None  # monotonic: when the peer was last declared in sync
        self._sync_counted: PeerLink | None = None  # the link whose sync's end was counted
        self._clear_task: asyncio.Task[None] | None = None  # recording "in sync" again after a failure
        # R6: the clean stop's attestation this start took (memory only; handed out once), or why none
        self._attestation: rs.SyncPoint | None = None
        self._no_attestation = "a new replica"
        self._link_epoch: int | None = None  # the peer epoch the current link was made to
        # H13: links whose node may be a child of the quorum (a write may complete from it alone)
        self._peer_children = 0
        # H13: wall time at which the last such link stopped counting; QEMU sends at most one
        # QUORUM_REPORT_BAD per node and second and delays the rest, stamped with their time
        self._peer_left_at = float("-inf")
        metrics.resync_remaining.labels(cfg.name).set_function(self._resync_remaining)
        self._dir_lock: int | None = None  # this agent alone holds the data dir (dirlock)

    # ------------------------------------------------------------------ lifecycle

    @property
    def position(self) -> Position:
        return Position(self.state.role, self.state.stage, self.state.epoch)

    async def open(self, give_up: asyncio.Event | None = None) -> None:
        """Find or create the images, start qsd, and restore the persisted role. Nothing in
        the data dir is read or touched before this agent alone holds it (dirlock); set
        ``give_up`` to stop waiting for it (:class:`StoppedWaiting`)."""
        await asyncio.to_thread(self.data_dir.mkdir, parents=True, exist_ok=True)
        self._dir_lock = await dirlock.hold_data_dir(self.data_dir, give_up)
        if self._dir_lock is None:
            raise StoppedWaiting(f"stopped while another agent held {self.data_dir}: the replica was not opened")
        try:
            await self._open()
        except BaseException:
            dirlock.release(self._dir_lock)
            self._dir_lock = None
            raise

    async def _open(self) -> None:
        found = await asyncio.to_thread(persist.load, self.data_dir)
        disk_exists = await asyncio.to_thread(self.disk_path.exists)
        if found is not None:
            if found.name != self.cfg.name:
                raise ReplicaError(
                    f"{self.data_dir} holds volume {found.name!r}, not {self.cfg.name!r}: use another --data-dir"
                )
            found = await self._reconcile_size(found)
            if not disk_exists:
                raise ReplicaError(
                    f"{self.disk_path} is missing although the replica's state exists: refusing to create an "
                    "empty disk over a replica that had data; restore the file or use a new --data-dir"
                )
            self.state = found
            self._take_attestation(found)
        self.chain.size = self.cfg.size
        await self._forget_what_the_restart_lost(was_clean=found is None or found.clean_shutdown)
        if disk_exists:
            await self._check_disk_length(found)
        else:
            await img.create(self.disk_path, "raw", self.cfg.size)
        await self.qsd.start()
        self.qsd.on_event(self._on_qsd_event)
        if self.cfg.psk is not None:
            self._tls_dir = await self._key_dir(self.cfg.psk)
        if self.cfg.export_psk is not None:
            self._export_tls_dir = await self._key_dir(self.cfg.export_psk)
        await self.qsd.execute("blockdev-add", r.file_node(self.disk_path, r.DISK_NODE, "raw"))
        keep = self.state.generation if self.state.role is Role.SECONDARY else None
        await asyncio.to_thread(self.chain.remove_stale, keep)
        async with self.lock:
            await self._restore(was_clean=found is None or found.clean_shutdown)
            if self._bitmap_to_load:
                await self._load_bitmap()
        # from here the saved bitmap is stale as soon as anything is written: never reload it;
        # and the attestation (out of the state since _take_attestation) is cleared durably
        # (R6) before the API can ask for a write
        await self._save(clean_shutdown=False, bitmap_saved=False)
        if self._attestation is not None:
            crashpoints.hit(UNION_TAKEN)
        self.metrics.size.labels(self.cfg.name).set(self.cfg.size)
        self._observe()

    def _set_size(self, size: int) -> None:
        """The volume's size from here on, for everything that makes images or links."""
        self.cfg = dataclasses.replace(self.cfg, size=size)
        self.metrics.size.labels(self.cfg.name).set(size)

    async def _reconcile_size(self, found: PersistedState) -> PersistedState:
        """``--size`` against the persisted size: the persisted one always wins, because a
        volume grows only through ``POST /v1/resize`` (docs/correctness.md E0-E5), never by
        a flag. A smaller ``--size`` is a pod made before a grow. A larger one is a grow still
        to come: the operator makes every new pod with the volume's current size, also for a
        replica that was away while the volume was expanded, or that died in the middle of a
        grow before saving the new size (E1). Refusing to start then would leave that replica
        down for good; it starts at its size, reports it, and the operator grows it in the
        E0-E5 order once the pair is in sync. The disk file must still have the persisted
        length (``_check_disk_length``)."""
        wanted, held = self.cfg.size, found.size
        if wanted == held:
            return found
        if wanted < held:
            log.info(
                "%s holds the volume at %d bytes (grown since --size %d was set): keeping %d",
                self.data_dir, held, wanted, held,
            )
        else:
            log.warning(
                "%s holds the volume at %d bytes but --size says %d: keeping %d bytes until the volume is "
                "grown (POST /v1/resize, which the operator calls once the pair is in sync); --size never "
                "grows a volume",
                self.data_dir, held, wanted, held,
            )
        self._set_size(held)
        return found

    async def _check_disk_length(self, found: PersistedState | None) -> None:
        """The disk file must have the volume's size; a grow that a crash interrupted is
        completed here. The file is then anywhere from the length persisted before the grow
        to the new size: an allocation does not lengthen a file in one step (ext4 extends it
        chunk by chunk, a file system without ``fallocate`` a block at a time), and a node
        that crashes in the middle keeps what its journal committed. Nothing can have been
        written past the old length (no export offered the new size before the grow was
        recorded complete), so what lies beyond it reads as zeros either way. Any other
        length is refused: nothing else is ever resized or reformatted."""
        actual = (await asyncio.to_thread(os.stat, self.disk_path)).st_size
        size = self.cfg.size
        if actual == size:
            if found is not None and found.resize_from is not None:
                self.state = self.state.evolve(resize_from=None)
            return
        grow_from = found.resize_from if found is not None else None
        if grow_from is not None and grow_from <= actual < size:
            if actual > grow_from:
                log.info("the interrupted grow of %s had reached %d of %d bytes", self.disk_path, actual, size)
            actual = grow_from
            try:
                await asyncio.to_thread(_grow_file, self.disk_path, size, grow_from)
            except ReplicaError as exc:
                log.warning("%s: the volume stays at %d bytes", exc, actual)
                self.state = self.state.evolve(size=actual, resize_from=None)
                self._set_size(actual)
                self.chain.size = actual
                return
            self.state = self.state.evolve(resize_from=None)
            log.info("completed the grow of %s from %d to %d bytes", self.disk_path, actual, size)
            return
        raise ReplicaError(
            f"{self.disk_path} is {actual} bytes but the volume is {size} bytes: refusing to resize or reformat it"
        )

    async def _forget_what_the_restart_lost(self, was_clean: bool) -> None:
        """A restart ends the daemon that held the primary's dirty bitmap, and a node that
        rebooted after an unclean stop may have lost writes its secondary had acknowledged:
        neither side may then vouch for the peer's content (R1, R3)."""
        st = self.state
        boot = await asyncio.to_thread(boot_id)
        changes: dict[str, Any] = {"boot_id": boot}
        saved = self.data_dir / persist.BITMAP_FILE
        if st.peer_disk is not None and st.role is Role.PRIMARY:
            if was_clean and st.tracking and st.bitmap_saved and await asyncio.to_thread(saved.exists):
                self._bitmap_to_load = True
            else:
                why = (
                    "the primary's agent restarted after an unclean stop: its record of what the peer lacks "
                    "lived in its daemon"
                    if not was_clean
                    else "the primary's agent restarted without a saved record of what the peer lacks"
                )
                changes.update(peer_disk=None, tracking=False, full_reason=why)
        if st.promoted_from is not None and st.role is Role.PRIMARY:
            if was_clean and st.bitmap_saved and await asyncio.to_thread(saved.exists):
                self._bitmap_to_load = True
            else:
                changes.update(
                    promoted_from=None,
                    union_reason="the primary's agent restarted after an unclean stop: its record of what it wrote "
                    "since its promotion lived in its daemon"
                    if not was_clean
                    else "the primary's agent restarted without a saved record of what it wrote since its promotion",
                )
        if not self._bitmap_to_load:
            await asyncio.to_thread(lambda: saved.unlink(missing_ok=True))
        if st.disk_id is not None and not was_clean and (boot is None or st.boot_id != boot):
            # acknowledged writes may have been in the page cache of the previous boot
            changes["disk_id"] = new_disk_id() if st.role is Role.SECONDARY else None
        if st.lineage is not None and not was_clean and (boot is None or st.boot_id != boot):
            changes["lineage"] = None  # the same reason: the next primary start begins a new lineage
        self.state = st.evolve(**changes)

    async def _load_bitmap(self) -> None:
        """After a clean stop that saved the tracking bitmap: load it into the new daemon's
        quorum, then delete the file (caller holds the lock; nothing writes yet)."""
        path = self.data_dir / persist.BITMAP_FILE
        try:
            await self.qsd.execute("blockdev-add", r.bitmap_carrier(path, read_only=True))
            try:
                await self._start_bitmap()
                await self.qsd.execute(
                    "block-dirty-bitmap-merge",
                    r.bitmap_merge(r.QUORUM_NODE, r.TRACK_BITMAP, r.BITMAP_CARRIER_NODE, r.TRACK_BITMAP),
                )
            finally:
                with contextlib.suppress(QemuError):
                    await self.qsd.execute("blockdev-del", {"node-name": r.BITMAP_CARRIER_NODE})
        except QemuError as exc:
            why = f"the dirty bitmap saved at the last clean stop could not be loaded ({exc})"
            log.warning("%s; the next resync of the peer copies everything", why)
            self.state = self.state.evolve(
                peer_disk=None, tracking=False, full_reason=why, promoted_from=None, union_reason=why
            )
        else:
            log.info("loaded the record of what peer disk %s lacks, saved at the last clean stop", self.state.peer_disk)
        await asyncio.to_thread(lambda: path.unlink(missing_ok=True))

    async def _save_bitmap(self) -> tuple[bool, rs.SyncPoint | str]:
        """A clean stop of a primary that knows its peer's disk (or what it wrote since its
        promotion, R6): stop the workload export, let in-flight writes finish, judge whether
        this disk now equals the peer's (R6's attestation), take the peer out of the quorum
        (which starts the bitmap if the peer was in sync: nothing can be written without it
        any more), and write the bitmap into a qcow2 carrier that QEMU persists when the node
        is closed. Returns whether it was saved (if not, the next resync copies everything)
        and the sync point this disk stopped in sync with, or why there is none."""
        path = self.data_dir / persist.BITMAP_FILE
        attested: rs.SyncPoint | str = "the clean stop did not drain its writes"
        try:
            async with asyncio.timeout(SAVE_BITMAP_TIMEOUT_S):
                async with self.lock:
                    await self._stop_nbd_server()  # no workload write from here on
                    await self._wait_export_gone(r.WORKLOAD_EXPORT)  # and the ones in flight finished
                    await self._wait_export_gone(r.LINEAGE_EXPORT)
                    attested = self._attest_clean_stop()
                    await self._detach_peer("the agent is stopping", mark=False)
                    tracked = self.state.tracking or self.state.promoted_from is not None
                    if not (tracked and self._bitmap_present):
                        return False, attested
                    await asyncio.to_thread(lambda: path.unlink(missing_ok=True))
                    await img.create(path, "qcow2", self.cfg.size)
                    await self.qsd.execute("blockdev-add", r.bitmap_carrier(path, read_only=False))
                    await self.qsd.execute(
                        "block-dirty-bitmap-add",
                        {**r.track_bitmap(), "node": r.BITMAP_CARRIER_NODE, "persistent": True},
                    )
                    await self.qsd.execute(
                        "block-dirty-bitmap-merge",
                        r.bitmap_merge(r.BITMAP_CARRIER_NODE, r.TRACK_BITMAP, r.QUORUM_NODE, r.TRACK_BITMAP),
                    )
                    await self.qsd.execute("blockdev-del", {"node-name": r.BITMAP_CARRIER_NODE})  # writes it
            await asyncio.to_thread(fsync_paths, [path, self.data_dir])
        except (PairvolError, TimeoutError) as exc:
            log.warning("could not save the dirty bitmap (%s): the next resync of the peer copies everything", exc)
            await asyncio.to_thread(lambda: path.unlink(missing_ok=True))
            return False, f"the clean stop did not finish its steps ({str(exc) or 'timed out'})"
        log.info("saved the record of what peer disk %s lacks", self.state.peer_disk or "(since the promotion)")
        return True, attested

    def _attest_clean_stop(self) -> rs.SyncPoint | str:
        """R6.1: whether this disk now holds exactly what the peer's disk holds, and at which
        sync point (``resync.attest`` decides). Called by ``_save_bitmap`` only, with the lock
        held, once the workload exports are gone — QEMU removes them only after their last
        request completed, and the quorum completes a write only once both children
        answered — and before the peer leaves the quorum."""
        link, st = self.link, self.state
        return rs.attest(rs.StopView(
            linked=link is not None,
            gate_failed=(link.gate.reason or "failed") if link is not None and link.gate.failed.is_set() else None,
            syncing=link is not None and link.syncing,
            marked=self._peer_marked or st.out_of_sync,
            tracking=st.tracking,
            replicating=self.replication == "replicating",
            local_failed=self.state.local_failure,
            link_disk=link.peer_disk if link is not None else None,
            recorded_disk=st.peer_disk,
            link_epoch=self._link_epoch,
        ))

    def _take_attestation(self, found: PersistedState) -> None:
        """R6, at a start (before the API listens): the one reader of a clean stop's
        attestation. It moves into memory and out of the state, which ``open`` persists
        before anything can write this disk; a crash from then on loses it (the next start
        finds none), never reuses it."""
        att: rs.SyncPoint | None = None
        if not found.clean_shutdown:
            why = "its last stop was not clean: writes in flight then may have reached its disk only"
        elif found.resize_from is not None:
            why = "a grow of its disk was in progress at its last stop"
        elif found.local_failure is not None:
            why = f"its local disk failed a request that only its peer served ({found.local_failure})"
        elif found.role is not Role.PRIMARY or found.stopped_in_sync is None:
            why = found.stop_note or f"its last clean stop was as {found.role.value}, not as a primary in sync"
        else:
            att, why = found.stopped_in_sync, ""
        self._attestation, self._no_attestation = att, why
        self.state = self.state.evolve(stopped_in_sync=None, stop_note=None)
        if att is not None:
            log.info("this disk stopped cleanly in sync with disk %s at epoch %d", att.disk, att.epoch)

    def _drop_attestation(self, why: str) -> None:
        if self._attestation is not None:
            log.info("the clean stop's attestation no longer holds: %s", why)
            self._attestation, self._no_attestation = None, why

    def _give_attestation(self) -> tuple[rs.SyncPoint | None, str | None]:
        """Handed out once (``POST /v1/digests`` without a range: the question that precedes a
        resync decision); whoever asks next finds it consumed."""
        att, why = self._attestation, self._no_attestation
        if att is not None:
            self._drop_attestation("it was already handed to a primary deciding a resync")
            return att, None
        return None, why

    async def _wait_export_gone(self, export: str) -> None:
        """QEMU removes an export from its list only once its last in-flight request has
        completed (every request holds a reference on it): waiting for that is a drain of
        the export's writes that does not depend on how a QEMU version drains transactions."""
        while True:
            exports = await self.qsd.execute("query-block-exports")
            if not any(e["id"] == export for e in exports):
                return
            await asyncio.sleep(0.01)

    async def _restore(self, was_clean: bool) -> None:
        st = self.state
        if st.role is Role.NONE:
            return
        what = f"found role {st.role.value}, stage {st.stage.value}, epoch {st.epoch}"
        if st.checkpoint is not None:
            what += f", checkpoint {st.checkpoint.id}"
        self.chain.generation = st.generation
        if st.role is Role.SECONDARY and st.stage is Stage.RUNNING:
            # S5: the disk as found starts new checkpoints and is never a restore point. After
            # an unclean stop the overlays may lack metadata that lived in the dead daemon and
            # the disk may be a mix (a sync or writes were in flight); after a clean one the
            # undo log is intact but cannot be resumed (secondary.restore_running).
            gen = await self.chain.restore_running(st.generation, self._start_replication_export)
            self.state = st.evolve(generation=gen, restore_point=False)
            what += (
                "; copy-before-write cannot resume on the old undo log"
                if was_clean
                else "; the undo log was not closed cleanly"
            ) + ", so there is no restore point until the next checkpoint"
        elif st.role is Role.PRIMARY:
            await self._build_quorum()
            what += "; not serving the workload export until the operator confirms the role with a new epoch"
            self.state = st.evolve(stage=Stage.DONE if st.stage is Stage.RUNNING else st.stage)
        elif st.stage is Stage.FAILOVER:
            what += await self._restore_failover()
        self.restored = what
        log.warning("restored replica state: %s", what)

    async def close(self) -> None:
        await self._cancel_reprotect()
        await cancel_and_wait(self._clear_task)
        await self.chain.close()
        await self._drop_spawned_relay()
        clean = self.qsd.alive
        if self.relay is not None:
            await self.relay.kill()
        saved = False
        st = self.state
        attested: rs.SyncPoint | str = f"it stopped as {st.role.value}, not as a primary in sync"
        if clean and st.role is Role.PRIMARY:
            attested = "the peer's disk identity was not recorded"
            if st.peer_disk is not None or st.promoted_from is not None:
                saved, attested = await self._save_bitmap()
        if self.listener is not None:
            await self.listener.kill()
        exited = await self.qsd.stop()  # in-flight writes drain through a healthy link first
        if clean and not exited:
            # S5: a daemon that was killed or failed may not have written the undo log's qcow2
            # metadata. Nor is a primary's attestation or bitmap vouched for by a daemon that
            # did not close its disk: the next start treats this stop as a crash.
            clean = False
            log.warning(
                "recording this stop as unclean: qemu-storage-daemon did not exit cleanly after quit "
                "(exit status %s), so its images may lack what it held in memory; the next start keeps "
                "no restore point, no saved bitmap and no in-sync attestation",
                self.qsd.proc.returncode if self.qsd.proc is not None else None,
            )
        if self.link is not None:
            link, self.link = self.link, None
            await link.gate.close()  # held requests stay unanswered: a stop, not a release
            await link.link.kill()
        for key_dir in (self._tls_dir, self._export_tls_dir):
            if key_dir is not None:
                await asyncio.to_thread(shutil.rmtree, key_dir, True)
        if clean:
            # the overlays run without flushes; make them durable before calling them clean
            await asyncio.to_thread(fsync_paths, [self.disk_path, *self.chain.paths(self.state.generation)])
            point = attested if isinstance(attested, rs.SyncPoint) else None
            note = attested if isinstance(attested, str) else None
            await self._save(clean_shutdown=True, bitmap_saved=saved, stopped_in_sync=point, stop_note=note)
            if point is not None:
                log.info("stopped cleanly in sync with disk %s at epoch %d", point.disk, point.epoch)
                crashpoints.hit(UNION_ATTESTED)
        if self._dir_lock is not None:
            dirlock.release(self._dir_lock)  # the last write to the data dir is done
            self._dir_lock = None

    # ------------------------------------------------------------------ helpers

    async def _save(self, clean_shutdown: bool = False, **changes: Any) -> None:
        async with self._save_lock:  # two writers must not race for the state slots
            self.state = self.state.evolve(clean_shutdown=clean_shutdown, **changes)
            await asyncio.to_thread(persist.save, self.data_dir, self.state)
        self._observe()

    def _observe(self) -> None:
        st = self.state
        self.metrics.observe_state(st.role.value, st.stage.value, st.epoch, self.replication, st.out_of_sync)
        self.metrics.up.labels(self.cfg.name).set(1 if self.qsd.alive else 0)

    async def _start_replication_export(self, node: str) -> None:
        """Export ``node`` (the secondary's copy-before-write filter over ``disk``): on a
        unix socket of the replica's daemon, offered on --replication-listen by a listener
        daemon whose accepted connections carry TCP_NODELAY (pairvol.agent.tcpexport)."""
        sock = self.run_dir / REPLICATION_SOCKET
        await asyncio.to_thread(lambda: sock.unlink(missing_ok=True))
        await self.qsd.execute("nbd-server-start", r.nbd_server_unix(sock))
        await self._export_replication(node)

    async def _export_replication(self, node: str) -> None:
        """The replication exports on ``node`` and the listener daemon that offers them."""
        name = r.replication_export_name(self.state.epoch)
        sock = self.run_dir / REPLICATION_SOCKET
        await self.qsd.execute("block-export-add", r.nbd_export(r.REPLICATION_EXPORT, node, name=name))
        more: tuple[tuple[str, str], ...] = ()
        if self.state.disk_id is not None:
            # R3: the same node under a name carrying this disk's identity, for a resync of
            # only what this disk lacks (offered by the listener daemon as well)
            ident = r.identity_export_name(self.state.epoch, self.state.disk_id)
            await self.qsd.execute("block-export-add", r.nbd_export(r.IDENTITY_EXPORT, node, name=ident))
            more = ((r.IDENTITY_EXPORT, ident),)
        self.listener = await start_tcp_export(
            name="repl",
            run_dir=self.run_dir,
            log_path=self.data_dir / "repl.log",
            listen_on=self.cfg.replication_listen,
            tls_dir=self._tls_dir if self.cfg.psk is not None else None,
            upstream=sock,
            upstream_export=name,
            export_id=r.REPLICATION_EXPORT,
            what="the replication link",
            flag="--replication-listen",
            more=more,
        )

    async def _stop_nbd_server(self) -> None:
        await self._drop_spawned_relay()
        if self.relay is not None:
            relay, self.relay = self.relay, None
            await relay.kill()  # its clients must not get one more write through
        if self.listener is not None:
            # the old primary's connections and the port go with it: from here on a
            # connect is refused, and no reply not yet sent is ever sent
            listener, self.listener = self.listener, None
            await listener.kill()
        # One nbd-server-stop closes the listener and every export with its connections
        # inside one command. Deleting the exports first returns to the main loop in
        # between: a client that reconnects at once (an NBD client with a reconnect delay)
        # makes QEMU 7.2's nbd-server-stop wait forever for that half-open connection, with
        # the daemon's main loop blocked (seen with a primary writing during a failover).
        with contextlib.suppress(QemuError):
            await self.qsd.execute("nbd-server-stop")
        for export in (r.REPLICATION_EXPORT, r.IDENTITY_EXPORT, r.WORKLOAD_EXPORT, r.LINEAGE_EXPORT):
            with contextlib.suppress(QemuError):
                await self.qsd.execute("block-export-del", {"id": export, "mode": "hard"})
        self.serving = False

    async def _key_dir(self, psk: Psk) -> Path:
        """A private directory holding ``psk`` as qsd's tls-creds-psk reads it (keys.psk),
        and the Diffie-Hellman parameters its TLS server credentials would otherwise
        generate at every daemon start (recipes.FFDHE2048_PEM)."""

        def write() -> Path:
            key_dir = Path(tempfile.mkdtemp(prefix="tls-", dir=self.run_dir))
            (key_dir / "keys.psk").write_text(psk.keys_file())
            os.chmod(key_dir / "keys.psk", 0o600)
            (key_dir / r.DH_PARAMS_FILE).write_text(r.FFDHE2048_PEM)
            return key_dir

        return await asyncio.to_thread(write)

    async def _build_quorum(self) -> None:
        nodes = {n["node-name"] for n in await self.qsd.execute("query-named-block-nodes", {"flat": True})}
        if r.QUORUM_NODE not in nodes:
            await self.qsd.execute("blockdev-add", r.quorum([r.DISK_NODE]))

    async def _serve_workload(self, steps: _Steps | None = None) -> None:
        if self.serving:
            return
        # H13, H17: every path that serves (a start, a grow, a re-pair) ends here
        self._refuse_a_failed_disk()  # the more telling refusal first: a disk that failed never serves
        self._refuse_while_fenced()
        steps = steps or _Steps(time.perf_counter())
        if self.state.peer is not None and (self.link is None or self.link.gate.failed.is_set()):
            # serving while the configured peer is not in the quorum: it misses writes
            await self._mark_out_of_sync(self.peer_error or "the peer is not attached")
        for hook in self.before_serve_hooks:  # e.g. take the primary's Lease first
            try:
                await hook(self.state.epoch)
            except Exception as exc:
                raise ServeRefused(f"refusing to serve the workload export: {exc}") from exc
        steps.done("lease")
        # the record may have come while the hooks ran (a full sync's mirror reads through the
        # quorum before the export serves); the fence it started found nothing to stop
        self._refuse_a_failed_disk()
        sock = self.cfg.export_socket
        await asyncio.to_thread(lambda: sock.unlink(missing_ok=True))
        await self.qsd.execute("nbd-server-start", r.nbd_server_unix(sock))
        try:
            await self.qsd.execute("block-export-add", r.nbd_export(r.WORKLOAD_EXPORT, r.QUORUM_NODE))
            for eid, name in self._lineage_exports():
                await self.qsd.execute("block-export-add", r.nbd_export(eid, r.QUORUM_NODE, name=name))
        except QemuError:
            with contextlib.suppress(QemuError):  # a retry must find no half-started server
                await self.qsd.execute("nbd-server-stop")
            raise
        self.serving = True
        if self.state.local_failure is not None:
            # recorded while the exports were added (set in memory by the event pump at once,
            # so no later record can slip past this check): take them down as a fence would
            await self.fence_workload(f"not serving: {self.state.local_failure}", "local-disk")
            self._refuse_a_failed_disk()
        if self.fenced.is_set():
            # fenced while the exports were added (the fence found nothing serving yet and left
            # them): take them down now; something may have been served, so no ServeRefused
            assert self._fence is not None  # fence_workload records it before it sets ``fenced``
            await self.fence_workload(*self._fence)
            raise ReplicaError(self._fenced_refusal())
        self.fenced_by = None
        steps.done("export")
        if self.cfg.export_listen is not None:
            await self._start_relay()
            steps.done("relay")

    def _refuse_while_fenced(self) -> None:
        """H17: a fence lasts for the epoch it happened in. Its Lease keeper renews nothing
        more at this epoch, so serving again at it would serve without a Lease; only a start
        or a failover at a newer epoch (which clear ``fenced``) serves again."""
        if self.fenced.is_set():
            raise ServeRefused(self._fenced_refusal())

    def _fenced_refusal(self) -> str:
        assert self._fence is not None  # only asked while ``fenced`` is set
        return (
            f"not serving: the workload export was fenced at epoch {self.state.epoch} ({self._fence[0]}), and a "
            "fence lasts for its epoch; the operator serves this replica again with a newer epoch "
            "(POST /v1/primary) or promotes the secondary"
        )

    def _refuse_a_failed_disk(self) -> None:
        """H13: the one refusal of every start and serve on a disk with the record."""
        if self.state.local_failure is not None:
            raise IllegalTransition(
                "not serving: this replica's local disk failed a request that only its peer served "
                f"({self.state.local_failure}): it may lack acknowledged data and never serves as the "
                "primary again; promote the secondary (POST /v1/failover), then make this replica a "
                "secondary (POST /v1/secondary) to copy the volume back onto it"
            )

    def _lineage_exports(self) -> tuple[tuple[str, str], ...]:
        """(id, name) of the workload export under its lineage's name, if the disk has one."""
        lineage = self.state.lineage
        return () if lineage is None else ((r.LINEAGE_EXPORT, r.lineage_export_name(lineage)),)

    def _spawn_relay(self) -> None:
        """Start the relay's daemon now, exporting nothing, so that serving later costs two
        QMP commands instead of a process start (most of a failover's time, measured with
        ``stepsMs``). The caller consumes it in :meth:`_start_relay` or drops it."""
        if self.cfg.export_listen is None or self.serving or self.relay is not None or self._relay_spawn is not None:
            return
        self._relay_spawn = asyncio.create_task(
            tcpexport.spawn(
                name="relay",
                run_dir=self.run_dir,
                log_path=self.data_dir / "relay.log",
                listen_on=self.cfg.export_listen,
                tls_dir=self._workload_key_dir(),
                what="the workload export",
                flag="--export-listen",
            ),
            name="relay-spawn",
        )

    def _workload_key_dir(self) -> Path | None:
        """The relay's TLS-PSK key: the workload export's own, else the replication key."""
        if self.cfg.workload_psk is None:
            return None
        key_dir = self._export_tls_dir if self.cfg.export_psk is not None else self._tls_dir
        assert key_dir is not None
        return key_dir

    async def _drop_spawned_relay(self) -> None:
        """A relay daemon started ahead and not used (the command failed before serving)."""
        task, self._relay_spawn = self._relay_spawn, None
        if task is None:
            return
        try:
            daemon = await task  # not cancelled: a start cut short could leave the process behind
        except Exception:  # its start failed: nothing runs
            return
        await daemon.kill()

    async def _start_relay(self) -> None:
        """The workload export over TCP (TLS-PSK): qsd has one NBD server, which serves the
        unix socket, so a listener daemon re-exports it (pairvol.agent.tcpexport). Killing
        the relay is part of fencing, so it exports only once the workload export serves,
        after the Lease was taken."""
        self._spawn_relay()
        task, self._relay_spawn = self._relay_spawn, None
        assert task is not None
        relay = await task
        await tcpexport.serve(
            relay,
            upstream=self.cfg.export_socket,
            upstream_export=r.WORKLOAD_EXPORT,
            export_id=r.WORKLOAD_EXPORT,
            what="the workload export",
            more=self._lineage_exports(),
        )
        self.relay = relay
        if not self.serving:  # fenced while the relay started: it must not serve either
            self.relay = None
            await relay.kill()
            return
        log.info(
            "workload export also on %s:%d (%s)",
            *(self.cfg.export_listen or ("?", 0)),
            "TLS-PSK" if self.cfg.psk is not None else "plain, loopback",
        )

    async def fence_workload(self, reason: str, cause: FenceCause) -> None:
        """Stop serving the workload export at once (lease lost, local disk failed).

        Never waits for the replica lock: its holder may be waiting for a write that the
        link gate holds, and the gate may be waiting for exactly this fence. The hard
        delete shuts the clients' sockets down before it returns, so once ``fenced`` is
        set no reply reaches a workload client; then the NBD server is stopped."""
        if self.relay is not None:
            relay, self.relay = self.relay, None
            await relay.kill()  # its clients must not get one more write through
        if self.serving:
            log.warning("fencing: workload export stopped: %s", reason)
            # no client can connect again (a half-open connection would make the later
            # nbd-server-stop wait for ever in QEMU 7.2), then the export goes
            sock = self.cfg.export_socket
            await asyncio.to_thread(lambda: sock.unlink(missing_ok=True))
            with contextlib.suppress(QemuError):
                await self.qsd.execute("block-export-del", {"id": r.WORKLOAD_EXPORT, "mode": "hard"})
            self.last_error = reason
            self.fenced_by = cause
        self._fence = (reason, cause)
        self.serving = False
        self.fenced.set()
        # The lineage name is served to remote clients only through the relay, killed above.
        # It goes after the fence: an export without a request in flight is removed at once,
        # and its removal drains the quorum, which waits for the writes the gate holds until
        # this fence (before it, the daemon's main loop would wait for ever).
        with contextlib.suppress(QemuError):
            await self.qsd.execute("block-export-del", {"id": r.LINEAGE_EXPORT, "mode": "hard"})
        with contextlib.suppress(QemuError):
            await self.qsd.execute("nbd-server-stop")

    # ------------------------------------------------------------------ secondary
    # The overlays, copy-before-write and the commit belong to self.chain (agent/secondary.py);
    # these methods own the stage, the epoch and what is persisted, and hold the lock.

    async def start_secondary(self, epoch: int) -> dict[str, Any]:
        async with self.lock:
            check_start_secondary(self.position, epoch)
            if self.state.role is Role.PRIMARY:
                await self._teardown_primary()
            gen = self.state.generation + 1
            # a disk that served as primary, or a new one, gets a new identity (R3)
            disk_id = self.state.disk_id if self.state.role is Role.SECONDARY and self.state.disk_id else new_disk_id()
            await self._save(
                epoch=epoch, role=Role.SECONDARY, stage=Stage.NONE, peer=None, disk_id=disk_id,
                peer_disk=None, tracking=False, full_reason=None, promoted_from=None, union_reason=None,
                local_failure=None,  # H13: the new primary copies this disk anew (a new identity)
            )
            self.chain.generation = gen
            await self.chain.open_generation(gen)
            try:
                await self._start_replication_export(await self.chain.start_cow(gen))
            except PairvolError as exc:
                # the caller must learn why the start failed, not why the undo failed too
                try:
                    await self._stop_nbd_server()
                    await self.chain.discard(gen)
                except PairvolError as undo:
                    log.warning("undoing the failed secondary start: %s", undo)
                    exc.add_note(f"undoing it failed too: {undo}")
                raise
            # checkpoint 0 is the disk before the primary's full sync: not a restore point
            cp = Checkpoint(0, time.time(), 0.0)
            await self._save(
                stage=Stage.RUNNING, generation=gen, checkpoint=cp, restore_point=False, out_of_sync=False
            )
            self.replication = "replicating"
            self.metrics.checkpoint_id.labels(self.cfg.name).set(0)
            self.metrics.checkpoint_last_timestamp.labels(self.cfg.name).set(cp.time)
            self._observe()
            self.chain.prepare_next()
            log.info("secondary started at epoch %d, exporting on %s:%d", epoch, *self.cfg.replication_listen)
            return self.status()

    async def checkpoint(self, link_serial: str | None = None) -> dict[str, Any]:
        """Cut a checkpoint. Requests that arrive while a cut waits for the lock share that
        cut: each caller gets the id of a cut that began after its request arrived, and a
        burst of N requests costs one or two cuts, not N. The cut runs to its end even if
        a caller gives up waiting (it is shielded): the chain stays consistent either way.

        ``link_serial`` (S5): the serial of the link the caller saw in sync, as the primary
        reported it; the cut is refused if a primary linked again since (a resync may be
        rewriting the disk). Without it there is no such check. Only requests naming the
        same serial share a cut."""
        queued = self._queued_cuts.get(link_serial)
        if queued is None:
            queued = self._queued_cuts[link_serial] = asyncio.ensure_future(self._cut(link_serial))
            queued.add_done_callback(lambda f: f.cancelled() or f.exception())
        return await asyncio.shield(queued)

    async def _cut(self, link_serial: str | None) -> dict[str, Any]:
        async with self.lock:
            # requests from here on need a cut that starts later
            self._queued_cuts.pop(link_serial, None)
            check_checkpoint(self.position)
            # S5: checked under the lock the relink takes too, so none comes between
            if link_serial is not None and link_serial != self.link_serial:
                raise IllegalTransition(
                    f"a primary linked to this secondary again since the pair was seen in sync (link serial "
                    f"{link_serial}, now {self.link_serial}): its resync may be rewriting the disk, so no "
                    f"checkpoint was cut and {self._restore_point_note()}; cut the next one once the primary "
                    "reports its link in sync again (replication.link.serial)"
                )
            cut = await self.chain.cut()
            cp = Checkpoint(
                (self.state.checkpoint.id + 1) if self.state.checkpoint else 1, time.time(), cut.duration_s * 1000
            )
            await self._save(generation=cut.generation, checkpoint=cp, restore_point=True)
            crashpoints.hit(CHECKPOINT_SAVED)
            self.chain.schedule_retire()
            if self.undo_log_broken:
                log.warning("undo log complete again from checkpoint %d on", cp.id)
                self.undo_log_broken = self.last_error = None
            m = self.metrics
            m.checkpoint_duration.labels(self.cfg.name).observe(cut.duration_s)
            m.checkpoint_cut.labels(self.cfg.name).observe(cut.cut_s)
            m.checkpoint_id.labels(self.cfg.name).set(cp.id)
            m.checkpoint_last_timestamp.labels(self.cfg.name).set(cp.time)
            log.debug(
                "checkpoint %d in force after %.2f ms (transaction %.2f ms)",
                cp.id,
                cut.duration_s * 1000,
                cut.cut_s * 1000,
            )
            return {"id": cp.id, "durationMs": round(cut.duration_s * 1000, 3), "cutMs": round(cut.cut_s * 1000, 3)}

    def _restore_point_note(self) -> str:
        cp = self.state.checkpoint
        if self.state.restore_point and cp is not None:
            return f"the restore point is still checkpoint {cp.id}"
        return "there is still no restore point"

    def _no_restore_point(self) -> str | None:
        """Why a checkpoint-mode failover cannot return to the current checkpoint."""
        cp = self.state.checkpoint
        if cp is None or cp.id == 0:
            return "no checkpoint had been cut since the secondary started"
        if not self.state.restore_point:
            return (
                f"checkpoint {cp.id} is no restore point since the agent restarted after an unclean stop, "
                "and no checkpoint has been cut since"
            )
        return None

    async def failover(self, epoch: int, mode: FailoverMode, trigger: str = "unspecified") -> dict[str, Any]:
        """Promote this secondary at ``epoch``. ``trigger`` (one of stages.FAILOVER_TRIGGERS)
        only labels the metrics: a planned failover is counted apart from one after a failure."""
        async with self.lock:
            check_failover(self.position, epoch)
            # R6.2: a promoted disk is written as primary; what its clean stop vouched for ends here
            self._drop_attestation(f"it was promoted by a failover at epoch {epoch} since its clean stop")
            if mode is FailoverMode.CHECKPOINT and self.undo_log_broken:
                raise IllegalTransition(
                    f"{self.undo_log_broken}; a checkpoint-mode failover would not be consistent. Cut a new "
                    "checkpoint first, or fail over in mode 'latest'"
                )
            t0 = time.perf_counter()
            steps = _Steps(t0)
            requested = mode
            why_latest = self._no_restore_point() if mode is FailoverMode.CHECKPOINT else None
            if why_latest is not None:
                # Not a state the volume had (checkpoint 0 predates the full sync; after an
                # unclean stop the disk may be a mix): keep everything instead.
                mode = FailoverMode.LATEST
                log.warning("%s: failing over to the latest state", why_latest)
            # R6: the sync point this disk is promoted from (its identity at its secondary epoch)
            source = rs.SyncPoint(self.state.disk_id, self.state.epoch) if self.state.disk_id else None
            rolled_back: list[tuple[int, int]] | str = []
            # The new epoch is durable before anything else: from here on the old primary is fenced.
            await self._save(epoch=epoch, stage=Stage.FAILOVER, failover_mode=mode, overlays_durable=False)
            steps.done("saveEpoch")
            crashpoints.hit(FAILOVER_EPOCH_SAVED)
            await self._stop_nbd_server()
            steps.done("fence")
            crashpoints.hit(FAILOVER_EXPORT_STOPPED)
            self._spawn_relay()  # its process starts while the steps below run
            try:
                if self.chain.retiring is not None:
                    log.info("failover: retiring overlay generation %d first", self.chain.retiring)
                await self.chain.stop_cow()
                steps.done("stopCow")
                crashpoints.hit(secondary.FAILOVER_AFTER_COW)
                if mode is FailoverMode.CHECKPOINT:
                    await self.chain.make_durable()
                    await self._save(overlays_durable=True)
                    steps.done("durable")
                    crashpoints.hit(FAILOVER_DURABLE)
                    rolled_back = await self._rollback_ranges()  # R6.3: what the commit will change
                    await self.chain.commit()
                    steps.done("commit")
            except PairvolError as exc:
                await self._drop_spawned_relay()
                self.last_error = f"failover failed: {exc}"
                await self._save(stage=Stage.FAILOVER_FAILED)
                self.metrics.failover_ended(mode.value, "failed", trigger)
                log.error("%s", self.last_error)
                raise ReplicaError(self.last_error) from exc
            gen = self.state.generation
            try:
                await self._finish_failover(steps, files=False)
                await self._record_since_promotion(source, mode, rolled_back)
            except BaseException:
                await self._drop_spawned_relay()
                raise
            self.fenced.clear()
            crashpoints.hit(FAILOVER_BEFORE_SERVE)
            try:
                try:
                    await self._serve_workload(steps)
                finally:
                    await self.chain.remove_files(gen)  # the role is primary: the overlays are garbage
                    steps.done("removeFiles")
            except PairvolError as exc:
                # promoted but not serving: not a success; undo a half-started export so the
                # retry starts clean
                await self._stop_nbd_server()
                self.last_error = f"promoted to primary at epoch {epoch} but the workload export is not served: {exc}"
                self.metrics.failover_ended(mode.value, "not_serving", trigger)
                raise ReplicaError(f"{self.last_error}; retry with POST /v1/primary and a newer epoch") from exc
            duration = time.perf_counter() - t0
            self.metrics.failover_ended(mode.value, "succeeded", trigger)
            self.metrics.failover_duration.labels(self.cfg.name, mode.value).observe(duration)
            cp_id = self.state.checkpoint.id if self.state.checkpoint else None
            log.info(
                "failover (%s) to epoch %d done in %.1f ms (%s)", mode.value, epoch, duration * 1000, steps.line()
            )
            result: dict[str, Any] = {
                "durationMs": round(duration * 1000, 3),
                "stepsMs": steps.ms,
                "mode": mode.value,
                "checkpointId": cp_id if mode is FailoverMode.CHECKPOINT else None,
            }
            if why_latest is not None:
                result["requestedMode"] = requested.value
                result["note"] = f"{why_latest}; kept the latest state"
            return result

    async def _finish_failover(self, steps: _Steps | None = None, files: bool = True) -> None:
        """The disk holds the failover's result: settle the role, then drop the overlays
        (in this order: a restart in stage FAILOVER needs them to redo the commit). With
        ``files=False`` the overlay files stay for the caller to remove after serving."""
        steps = steps or _Steps(time.perf_counter())
        gen = self.state.generation
        # the role is settled before serving: if serving is refused (no Lease), the
        # operator retries with POST /v1/primary and a newer epoch
        # a new lineage: a client of the old primary's lineage export must not find this disk
        await self._save(
            role=Role.PRIMARY,
            stage=Stage.DONE,
            peer=None,
            failover_mode=None,
            overlays_durable=False,
            disk_id=None,
            lineage=self.state.epoch,
            # R6: set by the failover itself before it serves; a restart mid-failover has none
            promoted_from=None,
            union_reason="nothing recorded what was written since the promotion "
            "(interrupted, or completed by a restart)",
        )
        steps.done("saveRole")
        await self.chain.discard(gen, files=files)
        steps.done("dropOverlays")
        await self._build_quorum()
        steps.done("quorum")
        self.replication = "degraded"
        self.peer_error = "no peer since failover"

    async def _rollback_ranges(self) -> list[tuple[int, int]] | str:
        """R6.3: the regions a Checkpoint-mode commit is about to change, or why they are not
        known. Read from the current overlays' files once they are closed and durable and
        before the commit: the commit writes only clusters allocated in active or hidden, and
        every write to the disk since the cut first copied the old data into hidden (S1)."""
        ranges: list[tuple[int, int]] = []
        try:
            for path in self.chain.paths(self.chain.generation):
                ranges += await img.allocated_ranges(path)
        except QemuError as exc:
            return f"the undo log's allocation map could not be read ({exc})"
        return sorted(ranges)

    async def _record_since_promotion(
        self, source: rs.SyncPoint | None, mode: FailoverMode, rolled_back: list[tuple[int, int]] | str
    ) -> None:
        """R6.3: after a Latest-mode promotion this disk is exactly the secondary's disk at
        ``source`` — every write the old primary's link delivered, nothing else; after a
        Checkpoint-mode one it differs from it only in ``rolled_back``, the regions the commit
        rolled back to the cut. Start the dirty bitmap on the quorum, set the rolled-back
        regions in it, then record it, all before the workload export serves: from then on
        every region written is in the bitmap too. Never raises: without a record the old
        primary is compared (R4), and the reason says why."""
        why: str | None = None
        if isinstance(rolled_back, str):
            why = f"it was promoted in checkpoint mode and {rolled_back}"
        elif source is None:
            why = "its disk had no identity when it was promoted"
        marks = self.run_dir / ROLLBACK_MARKS_FILE
        async with self._oos_lock:
            if why is None and source is not None and not isinstance(rolled_back, str):
                try:
                    async with asyncio.timeout(TRACK_TIMEOUT_S):
                        await self._start_bitmap()
                    if rolled_back:
                        await cs.write_marks(marks, self.cfg.size, rolled_back)
                        await self._merge_marks(marks)
                except (PairvolError, TimeoutError) as exc:
                    why = f"the dirty bitmap could not be started at the promotion ({str(exc) or 'timed out'})"
                else:
                    await self._save(promoted_from=source, union_reason=None)
                    crashpoints.hit(UNION_STARTED)
                    log.info(
                        "recording what is written since the promotion (%s mode, %d bytes rolled back) from disk %s "
                        "at epoch %d", mode.value, sum(n for _, n in rolled_back), source.disk, source.epoch,
                    )
                    return
                finally:
                    await asyncio.to_thread(lambda: marks.unlink(missing_ok=True))
            await self._save(promoted_from=None, union_reason=why)
        log.info("no record of what is written since the promotion: %s", why)

    async def _restore_failover(self) -> str:
        """A restart in stage FAILOVER: finish the failover the crash interrupted. The
        export is gone (the daemon died with the agent) and no copy-before-write runs."""
        st = self.state
        mode = st.failover_mode
        if mode is None:  # written by an agent that did not record the failover's progress
            await self._save(stage=Stage.FAILOVER_FAILED)
            self.last_error = "the agent stopped during failover; the overlays are kept"
            return "; failover was interrupted"
        what = ""
        cp_id = st.checkpoint.id if st.checkpoint else "?"
        if mode is FailoverMode.CHECKPOINT and not (st.overlays_durable and await self.chain.have_files(st.generation)):
            # the overlays may lack metadata that lived in the dead daemon: the checkpoint is lost
            mode = FailoverMode.LATEST
            what = (
                f"; the failover to checkpoint {cp_id} was interrupted before "
                "its undo log was durable, so it kept the latest state instead"
            )
        try:
            if mode is FailoverMode.CHECKPOINT:
                await self.chain.commit()
                what = f"; the interrupted failover's commit was redone: checkpoint {cp_id}"
            elif not what:
                what = "; the interrupted failover (latest) was completed"
        except PairvolError as exc:
            self.last_error = f"failover failed: {exc}"
            await self._save(stage=Stage.FAILOVER_FAILED)
            return f"; redoing the interrupted failover failed: {exc}"
        await self._finish_failover()
        self.metrics.failover_ended(mode.value, "succeeded", "unspecified")  # who asked died with the daemon
        return what + "; not serving the workload export until the operator confirms the role with a new epoch"

    async def stop(self, epoch: int | None = None) -> dict[str, Any]:
        """``epoch``: the caller's view of this replica's epoch; another one is refused before
        anything changes (a stop sent for an earlier incarnation)."""
        async with self.lock:
            if epoch is not None and epoch != self.state.epoch:
                raise IllegalTransition(
                    f"this replica runs at epoch {self.state.epoch}, not {epoch}: a stop meant for another "
                    "incarnation changes nothing; read the status and ask again with its epoch"
                )
            if not check_stop(self.position):
                return self.status()
            if self.state.role is Role.SECONDARY:
                await self._stop_nbd_server()
                await self.chain.stop_cow()
                await self.chain.discard(self.chain.generation)
            else:
                await self._detach_peer("replication stopped by request", mark=True)
            self.replication = "none"
            await self._save(stage=Stage.DONE)
            return self.status()

    # ------------------------------------------------------------------ grow (docs/correctness.md, E1-E5)
    # QEMU 7.2 cannot grow any node of the live graph in place: an NBD export does not share
    # RESIZE on its node, the quorum has no truncate and does not share RESIZE on its
    # children, the copy-before-write filter and its job were sized when they started, and an
    # NBD client cannot grow ("Cannot grow NBD nodes"). So each replica takes the nodes above
    # its disk down, grows the disk, and builds them again at the new size, under the lock.

    async def resize(self, epoch: int, size: int) -> dict[str, Any]:
        """Grow this replica's disk to ``size`` bytes (``POST /v1/resize``). The operator grows
        the secondary first, then the primary: the primary never offers the workload a size
        the secondary cannot hold. A repeated call with the same size changes nothing."""
        async with self.lock:
            if not check_resize(self.position, epoch, self.state.size, size):
                return self.status()
            old = self.state.size
            # R6: a grown disk is not the one the attestation or the record is about
            self._drop_attestation("its disk was grown since its clean stop")
            if self.state.promoted_from is not None:
                async with self._oos_lock:
                    await self._save(promoted_from=None, union_reason="the volume was grown since the promotion")
            try:
                if self.state.role is Role.SECONDARY:
                    await self._resize_secondary(size)
                else:
                    await self._resize_primary(size)
            except GrowRefused as exc:
                raise ReplicaError(
                    f"growing the volume from {old} to {size} bytes failed: {exc}; it stays at {old} bytes"
                ) from exc
            except ServeRefused as exc:
                self.last_error = f"the volume was grown from {old} to {size} bytes but is not served: {exc}"
                raise ReplicaError(self.last_error) from exc
            except PairvolError as exc:
                self.last_error = f"growing the volume from {old} to {size} bytes failed: {exc}"
                raise ReplicaError(
                    f"{self.last_error}; the replica is not serving its exports: restart its agent (the restart "
                    "completes or keeps the grow, the persisted size says which)"
                ) from exc
            log.info("volume grown from %d to %d bytes (%s)", old, size, self.state.role.value)
            return self.status()

    async def _grow_disk(self, size: int) -> str | None:
        """E1: the new size and the disk's old length are persisted before the disk grows, and
        the grow is marked complete once the new length is durable. A restart in between
        finds the file at the old length and completes the grow (zeros; nothing can have been
        written past the old end: no export offered the new size yet). Caller holds the
        lock and has taken every node above ``disk`` away. Returns why the disk could not
        grow (no space on its file system), after going back to the old size; the caller
        then builds its nodes again at that size."""
        old = self.state.size
        await self._save(size=size, resize_from=old)
        crashpoints.hit(RESIZE_SAVED)
        try:
            await asyncio.to_thread(_grow_file, self.disk_path, size)  # the node's length follows
        except ReplicaError as exc:
            await self._save(size=old, resize_from=None)  # the file is back at its old length
            return str(exc)
        await self.qsd.execute("block_resize", {"node-name": r.DISK_NODE, "size": size})
        crashpoints.hit(RESIZE_GROWN)
        await self._save(resize_from=None)
        self._set_size(size)
        crashpoints.hit(RESIZE_COMPLETE)
        return None

    async def relink(self, epoch: int) -> dict[str, Any]:
        """Secondary only: end every connection a primary made to the replication exports,
        and offer them anew under the same names (docs/correctness.md R5, "late writes of an
        earlier link"). When this returns, no write sent
        on an earlier connection can reach the disk any more: the listener daemon is killed
        (its TCP connections go with it, so a segment a partition delayed, or the old
        primary's kernel retransmits, finds no connection and is reset), and the exports
        are deleted and waited for until QEMU removed them, which it does only once their
        last in-flight request has completed. A primary calls this before each new link to
        this incarnation, before it copies a byte. It changes the link serial (S5): a cut
        asked for by someone who saw the pair in sync before is refused."""
        async with self.lock:
            st = self.state
            if st.role is not Role.SECONDARY or st.stage is not Stage.RUNNING:
                raise IllegalTransition(
                    f"only a running secondary ends its replication connections; this replica is "
                    f"{st.role.value}/{st.stage.value}"
                )
            if epoch != st.epoch:
                raise IllegalTransition(
                    f"this secondary runs at epoch {st.epoch}, not {epoch}: a primary links to the incarnation "
                    "it was paired with"
                )
            # S5: a cut asked for with the serial of an earlier link is refused from here on
            self._serial_count += 1
            self.link_serial = f"{self._serial_base}-{self._serial_count}"
            # R6: a primary links now; one that did not ask for the attestation may write
            self._drop_attestation("a primary linked to it without asking for its clean stop first")
            if self.listener is not None:
                listener, self.listener = self.listener, None
                await listener.kill()
            exports = await self.qsd.execute("query-block-exports")
            ours = (r.REPLICATION_EXPORT, r.IDENTITY_EXPORT)
            nodes = {e["id"]: str(e["node-name"]) for e in exports if e["id"] in ours}
            node = nodes.get(r.REPLICATION_EXPORT)
            if node is None:
                raise ReplicaError("the replication export is gone; restart the secondary")
            for export in nodes:
                with contextlib.suppress(QemuError):
                    await self.qsd.execute("block-export-del", {"id": export, "mode": "hard"})
            for export in nodes:
                await self._wait_export_gone(export)
            await self._export_replication(node)
            log.info("replication connections ended at a primary's request; exporting anew on %s:%d",
                     *self.cfg.replication_listen)
            return self.status()

    async def _resize_secondary(self, size: int) -> None:
        """E2: stop the replication export (the primary's link ends: it marks this secondary
        out of sync and records what it writes meanwhile, R1), drop copy-before-write and the
        overlays (there is no restore point until the next checkpoint), grow the disk, and
        start a new generation and the export at the new size. The disk keeps its identity:
        it still holds exactly what the primary sent, plus zeros the primary's disk will
        also have."""
        gen = self.chain.generation
        await self._stop_nbd_server()
        await self.chain.stop_cow()
        await self.chain.discard(gen)
        await self._save(restore_point=False)
        crashpoints.hit(RESIZE_UNEXPORTED)
        refused = await self._grow_disk(size)
        await self.chain.resize(self.cfg.size)
        new = gen + 1
        self.chain.generation = new
        await self.chain.open_generation(new)
        await self._start_replication_export(await self.chain.start_cow(new))
        await self._save(generation=new)
        self.chain.prepare_next()
        if refused:
            raise GrowRefused(refused)

    async def _resize_primary(self, size: int) -> None:
        """E3: stop the workload export and wait until its last request finished (clients
        that reconnect, like the CSI attachment, resend what was in flight), take the peer
        out (durably marked out of sync, the dirty bitmap started, R1), move the bitmap onto
        the disk node, delete the quorum, grow the disk, build the quorum again with the
        bitmap, and serve again at the new size. The operator then resyncs the (already
        grown) secondary with what the bitmap recorded."""
        serving = self.serving
        await self._stop_nbd_server()
        await self._wait_export_gone(r.WORKLOAD_EXPORT)
        await self._wait_export_gone(r.LINEAGE_EXPORT)  # the same node under its lineage's name
        crashpoints.hit(RESIZE_UNEXPORTED)
        if serving:
            self._spawn_relay()  # the relay's process starts while the disk grows
        try:
            await self._detach_peer("the volume grows", mark=self.state.peer is not None)
            carried = await self._carry_bitmap()
            await self.qsd.execute("blockdev-del", {"node-name": r.QUORUM_NODE})
            self._bitmap_present = False
            refused = await self._grow_disk(size)
            await self._build_quorum()
            if carried:
                await self._restore_carried_bitmap()
            if serving:
                await self._serve_workload()
            if refused:
                raise GrowRefused(refused)
        finally:
            await self._drop_spawned_relay()  # if serving did not take it

    async def _carry_bitmap(self) -> bool:
        """Copy the tracking bitmap from the quorum (which must go) onto ``disk``; a bitmap on
        a node grows with it. Nothing writes while it is carried (no export, lock held)."""
        if not self._bitmap_present:
            return False
        try:
            await self.qsd.execute(
                "block-dirty-bitmap-add",
                {"node": r.DISK_NODE, "name": r.CARRIED_BITMAP, "granularity": r.BITMAP_GRANULARITY},
            )
            await self.qsd.execute(
                "block-dirty-bitmap-merge",
                r.bitmap_merge(r.DISK_NODE, r.CARRIED_BITMAP, r.QUORUM_NODE, r.TRACK_BITMAP),
            )
        except QemuError as exc:
            await self._forget_record(f"the dirty bitmap could not be kept across the grow ({exc})")
            return False
        return True

    async def _restore_carried_bitmap(self) -> None:
        try:
            await self._start_bitmap()
            await self.qsd.execute(
                "block-dirty-bitmap-merge",
                r.bitmap_merge(r.QUORUM_NODE, r.TRACK_BITMAP, r.DISK_NODE, r.CARRIED_BITMAP),
            )
        except QemuError as exc:
            await self._forget_record(f"the dirty bitmap could not be restored after the grow ({exc})")
        finally:
            with contextlib.suppress(QemuError):
                await self.qsd.execute("block-dirty-bitmap-remove", {"node": r.DISK_NODE, "name": r.CARRIED_BITMAP})

    async def _forget_record(self, why: str) -> None:
        log.warning("%s; the next resync of the peer copies everything", why)
        async with self._oos_lock:
            await self._save(peer_disk=None, tracking=False, full_reason=why, promoted_from=None, union_reason=why)

    # ------------------------------------------------------------------ primary

    async def start_primary(
        self,
        epoch: int,
        peer: tuple[str, int] | None,
        sync: str,
        peer_epoch: int | None = None,
        peer_disk: str | None = None,
        peer_api: str | None = None,
    ) -> dict[str, Any]:
        async with self.lock:
            check_start_primary(self.position, epoch)
            self._refuse_a_failed_disk()  # H13: before anything changes
            self._drop_attestation(f"it started as primary at epoch {epoch} since its clean stop")
            self.peer_api = peer_api  # where to ask the peer for its checksums (R4)
            self._spawn_relay()  # its process starts while the peer attaches
            try:
                return await self._start_primary(epoch, peer, sync, peer_epoch, peer_disk)
            except ServeRefused:
                # nothing was served at this epoch, and nothing will be: serving again takes a
                # start at a newer epoch (check_start_primary). Said durably, for the operator.
                if self.state.epoch == epoch and not self.serving:
                    await self._save(refused_epoch=epoch)
                raise
            finally:
                await self._drop_spawned_relay()  # if serving did not take it

    async def _start_primary(
        self,
        epoch: int,
        peer: tuple[str, int] | None,
        sync: str,
        peer_epoch: int | None,
        peer_disk: str | None,
    ) -> dict[str, Any]:
        await self._cancel_reprotect()
        self._reprotect_failures, self._reprotect_error, self._in_sync_at = 0, None, None
        self.metrics.resync_gave_up.labels(self.cfg.name).set(0)
        self._pairing = (peer, peer_epoch if peer_epoch is not None else epoch - 1) if peer else None
        await self._detach_peer("peer replaced", mark=False)
        await self._build_quorum()
        st = self.state
        same_disk = st.role is Role.PRIMARY and st.lineage is not None
        # a primary's disk takes the workload's writes: it is nobody's faithful copy (R3)
        await self._save(
            lineage=st.lineage if same_disk else epoch,
            epoch=epoch,
            role=Role.PRIMARY,
            stage=Stage.RUNNING,
            peer=f"{peer[0]}:{peer[1]}" if peer else None,
            disk_id=None,
            # R6: what was written since a promotion is known only on the promoted disk
            promoted_from=st.promoted_from if same_disk else None,
        )
        self.fenced.clear()
        if peer is None:
            self.replication, self.peer_error = "degraded", "no peer"
        else:
            # The peer joins the quorum before the export serves: no write is
            # acknowledged that the peer was not asked to take.
            try:
                await self._attach_peer(peer, sync, epoch - 1 if peer_epoch is None else peer_epoch, peer_disk)
            except PeerLinkError as exc:
                self.replication, self.peer_error = "degraded", str(exc)
                await self._mark_out_of_sync(str(exc))  # durable before the export serves without it
                await self._serve_workload()
                self._observe()
                raise ReplicaError(str(exc)) from exc
        await self._serve_workload()
        if self.link is not None:
            try:
                await self.link.start_copy()  # after the export: it must sit below the job's filter
            except PeerLinkError as exc:
                await self._detach_peer(str(exc), mark=True)
                async with self._oos_lock:  # e.g. a peer of another size: the next resync is full
                    await self._save(peer_disk=None, tracking=False, full_reason=str(exc))
                self.peer_error = str(exc)
                self._observe()
                raise ReplicaError(str(exc)) from exc
        self._observe()
        return self.status()

    async def _attach_peer(
        self, peer: tuple[str, int], sync: str, peer_epoch: int, peer_disk: str | None, automatic: bool = False
    ) -> None:
        """Link to the peer and choose what to copy (R1-R4). ``automatic`` (R5): only a
        bitmap resync, and a refusal is a failed attempt — anything else is left to the
        caller that pairs (``POST /v1/primary``), so an attempt never changes the record."""
        record = rs.Record(
            self.state.peer_disk, self.state.tracking, self._bitmap_present, self.state.full_reason
        )
        plan = rs.choose(sync, peer_disk, record)
        if automatic and not rs.automatic_allowed(plan):
            raise NoAutomaticResync(f"{plan.kind} sync needed ({plan.reason}): left to a new pairing")
        if rs.needs_peer_view(sync, plan) and self.peer_api is not None and plan.peer_disk is not None:
            since = rs.SincePromotion(self.state.promoted_from, self._bitmap_present, self.state.union_reason)
            plan = rs.refine(plan, await self._peer_view(plan.peer_disk), self.cfg.size, since)
        self._peer_link_serial = None  # S5: this link's, if the peer's relink names one
        if self.peer_api is not None:
            # R5: no write of an earlier connection to this incarnation can land after this
            # link's copy; the secondary cuts them and waits for their writes, before we link
            try:
                self._peer_link_serial = await peerapi.relink(self.peer_api, self.cfg.token, peer_epoch)
            except peerapi.PeerApiError as exc:
                raise PeerLinkError(str(exc)) from exc
        try:
            await self._attach_with(peer, plan, peer_epoch)
        except PeerRefusedExport as exc:
            if plan.peer_disk is None or automatic:
                raise
            # R3: the secondary has no export for that disk identity: its disk is another one
            why = f"the secondary refused a resync against disk {plan.peer_disk}: {exc}"
            log.warning("%s; copying the whole volume instead", why)
            await self._attach_with(peer, rs.SyncPlan(rs.FULL, why, None), peer_epoch)

    async def _attach_with(self, peer: tuple[str, int], plan: rs.SyncPlan, peer_epoch: int) -> None:
        export = (
            r.identity_export_name(peer_epoch, plan.peer_disk)
            if plan.peer_disk is not None
            else r.replication_export_name(peer_epoch)
        )
        link = PeerLink(
            qsd=self.qsd,
            cfg=self.cfg,
            metrics=self.metrics,
            tls_dir=self._tls_dir,
            peer=peer,
            export=export,
            mark=self._mark_out_of_sync,
            fenced=self.fenced,
            on_down=self._on_link_down,
            in_sync=self._declare_in_sync,
            track=self._track_divergence,
            compare=self._checksum_marks,
            peer_disk=plan.peer_disk,
            in_quorum=self._count_peer_child,
        )
        # R6: a pairing ends the since-promotion record whatever it copies (a union resync
        # turns it into the record about the peer's disk), durably before anything is written
        consumed = f"the pairing with {peer[0]}:{peer[1]} ({plan.kind} sync) ended it"
        async with self._oos_lock:
            if plan.kind == rs.FULL:
                # until the mirror is READY the peer lacks data: known before a byte is copied;
                # the mirror overwrites the peer, so no record about its old content survives
                self._peer_marked = True
                await self._save(
                    out_of_sync=True, peer_disk=None, tracking=False,
                    full_reason="a full sync to the peer did not finish",
                    promoted_from=None, union_reason=consumed,
                )
                await self._drop_bitmap()
            elif plan.kind == rs.CHECKSUM:
                await self._prepare_checksum(consumed)
            elif plan.kind == rs.BITMAP and plan.union is not None:
                # R6: the bitmap of what was written since the promotion is every region the
                # peer's disk may lack: from here it is the record about that disk (R1)
                if plan.union != self.state.promoted_from or not self._bitmap_present:
                    raise PeerLinkError("the record of what was written since the promotion changed meanwhile")
                self._peer_marked = True
                await self._save(
                    out_of_sync=True, peer_disk=plan.peer_disk, tracking=True, full_reason=None,
                    promoted_from=None, union_reason=consumed,
                )
            elif plan.kind == rs.BITMAP:
                # the peer stays marked (it was, when it was dropped) until the copy is done
                self._peer_marked = True
                await self._save(out_of_sync=True)
            else:
                self._peer_marked = False
                await self._save(
                    out_of_sync=False, peer_disk=None, tracking=False, full_reason=None,
                    promoted_from=None, union_reason=consumed,
                )
                await self._drop_bitmap()
        self.link = link
        try:
            await link.attach(plan.kind, plan.reason)
        except PeerLinkError:
            self.link = None
            raise
        self._link_epoch = peer_epoch
        self._peer_identity = plan.peer_disk or self._peer_identity
        log.info("re-protection of %s: %s sync (%s)", link.address, plan.kind, plan.reason)
        self.peer_error = None
        self.replication = "syncing" if plan.kind != rs.NONE else "replicating"

    def _count_peer_child(self, delta: int) -> None:
        self._peer_children += delta
        if delta < 0:
            self._peer_left_at = time.time()

    async def _declare_in_sync(self, link: PeerLink) -> bool:
        """The full sync finished: the peer has every write from here on, unless the link
        failed meanwhile (then the gate holds, and the mark wins)."""
        async with self._oos_lock:
            if link is not self.link or link.gate.failed.is_set():
                return False
            if self.state.local_failure is not None:
                # H13: copied from a disk that lacks an acknowledged write: the peer stays marked
                return False
            self._peer_marked = False
            # from here the peer has every write: a record about its disk starts over (R1)
            await self._save(
                out_of_sync=False, peer_disk=link.peer_disk, tracking=False, full_reason=None, promoted_from=None
            )
            await self._drop_bitmap()
            self.replication = "replicating"
            # endedAt tells two syncs apart that copied the same in the same time
            self.last_sync = {**link.last_sync, "endedAt": round(time.time(), 3)} if link.last_sync else None
            self._in_sync_at = time.monotonic()
            self._count_sync_end(link, "succeeded")
            if not await self._run_in_sync_hooks():
                self._clear_task = asyncio.create_task(self._record_in_sync_later(link), name="record-in-sync")
            self._observe()
            return True

    async def _drop_bitmap(self) -> None:
        """Remove the tracking bitmap (caller holds ``_oos_lock`` and has persisted that it
        no longer counts)."""
        if not self._bitmap_present:
            return
        try:
            await self.qsd.execute("block-dirty-bitmap-remove", {"node": r.QUORUM_NODE, "name": r.TRACK_BITMAP})
        except QemuError as exc:
            if "not found" not in str(exc).lower() and "find" not in str(exc).lower():
                log.warning("cannot remove the dirty bitmap: %s (a later record starts by clearing it)", exc)
                return
        self._bitmap_present = False

    async def _track_divergence(self, reason: str, flush_failed: bool = False) -> None:
        """R1: start the dirty bitmap of everything the peer may lack. Called before the
        first write can finish without the peer: by the link before it releases a failed
        gate, and by a planned detach before the peer leaves the quorum. Never raises: a
        bitmap that cannot be started is recorded as "the next resync copies everything".

        ``flush_failed``: the peer answered a FLUSH with an error. A storage error on the
        secondary is reported at the flush (a failed writeback), and writes it had
        acknowledged before may then not be on its disk, before any bitmap: R3 no longer
        holds for that disk, so its next resync is full."""
        async with self._oos_lock:
            st = self.state
            if st.peer_disk is not None and flush_failed:
                why = "the secondary failed a flush: writes it had acknowledged may not be on its disk"
                log.warning("%s; its next resync copies the whole volume", why)
                await self._save(peer_disk=None, tracking=False, full_reason=why)
                return
            if st.peer_disk is None or st.tracking:
                return  # nothing known about the peer, or already tracking (a resync was running)
            try:
                async with asyncio.timeout(TRACK_TIMEOUT_S):
                    await self._start_bitmap()
            except (QemuError, TimeoutError) as exc:
                why = f"the dirty bitmap could not be started when the peer was dropped ({str(exc) or 'timed out'})"
                log.warning("%s; its next resync copies the whole volume", why)
                await self._save(peer_disk=None, tracking=False, full_reason=why)
                return
            crashpoints.hit(TRACK_STARTED)
            await self._save(tracking=True, full_reason=None)
            log.info("tracking the regions peer disk %s misses from here on (%s)", st.peer_disk, reason)

    async def _start_bitmap(self) -> None:
        try:
            await self.qsd.execute("block-dirty-bitmap-add", r.track_bitmap())
        except QemuError as exc:
            if "already" not in str(exc).lower():
                raise
            # left over from a record that ended (its removal failed): start it over
            await self.qsd.execute("block-dirty-bitmap-clear", {"node": r.QUORUM_NODE, "name": r.TRACK_BITMAP})
        self._bitmap_present = True

    # ------------------------------------------------------------------ checksum resync (R4)

    async def _peer_view(self, disk: str) -> rs.PeerView:
        """Ask the peer's agent (``peer_api``) which disk it has and how large it is."""
        assert self.peer_api is not None
        try:
            async with asyncio.timeout(PEER_VIEW_TIMEOUT_S):
                async with cs.PeerDigests(self.peer_api, self.cfg.token, disk) as peer:
                    answer = await peer.ask()
        except TimeoutError:
            return rs.PeerView(None, None, f"no answer within {PEER_VIEW_TIMEOUT_S:g} s")
        except cs.ChecksumError as exc:
            return rs.PeerView(None, None, str(exc))
        size, written = answer.get("size"), answer.get("writtenBytes")
        stopped, why = answer.get("stoppedInSync"), answer.get("notInSyncReason")
        point: rs.SyncPoint | None = None
        if isinstance(stopped, dict):
            at_disk, at_epoch = stopped.get("disk"), stopped.get("epoch")
            if isinstance(at_disk, str) and isinstance(at_epoch, int) and not isinstance(at_epoch, bool):
                point = rs.SyncPoint(at_disk, at_epoch)
            else:
                why = f"its attestation is unreadable ({stopped!r})"
        return rs.PeerView(
            str(answer.get("disk")),
            size if isinstance(size, int) and not isinstance(size, bool) else None,
            written=written if isinstance(written, int) and not isinstance(written, bool) else None,
            stopped_in_sync=point,
            not_in_sync=str(why) if why is not None else ("its agent reports no clean stop" if point is None else None),
        )

    async def _prepare_checksum(self, consumed: str) -> None:
        """Before a checksum resync's peer joins the quorum (caller holds ``_oos_lock``): the
        peer is marked, nothing is recorded about its disk until the comparison is complete,
        and the tracking bitmap starts empty now, so every write that completes from here on
        is copied whatever the comparison of its region found (R4)."""
        self._peer_marked = True
        await self._save(
            out_of_sync=True, peer_disk=None, tracking=False,
            full_reason="a checksum resync of the peer did not finish",
            promoted_from=None, union_reason=consumed,
        )
        try:
            await self._start_bitmap()  # added, or a left-over one cleared
        except QemuError as exc:
            raise PeerLinkError(f"cannot start the dirty bitmap of a checksum resync: {exc}") from exc

    async def _checksum_marks(self, link: PeerLink) -> None:
        """The comparison of a checksum resync, run by the link once the export serves: both
        disks digested region by region, each where it lives; the regions that differ set
        bits of the tracking bitmap; then the primary records that this bitmap holds every
        region the peer's disk may lack, the same record a dropped link leaves, so the bitmap
        resync that follows — and any later one — copies exactly those (R4)."""
        disk, api = link.peer_disk, self.peer_api
        if disk is None or api is None:
            raise cs.ChecksumError("a checksum resync needs the peer's disk identity and agent address")
        async with cs.PeerDigests(api, self.cfg.token, disk) as peer:
            found = await cs.compare(self.disk_path, self.cfg.size, peer, link.compared)
        crashpoints.hit(CHECKSUM_COMPARED)
        marks = self.run_dir / MARKS_FILE
        try:
            ranges = cs.runs(found, self.cfg.size)
            if ranges:
                await cs.write_marks(marks, self.cfg.size, ranges)
            async with self._oos_lock:  # the bitmap and the record change together
                if link is not self.link or link.gate.failed.is_set():
                    raise cs.ChecksumError("the link to the peer failed during the comparison")
                if ranges:
                    await self._merge_marks(marks)
                await self._save(peer_disk=disk, tracking=True, full_reason=None)
                crashpoints.hit(CHECKSUM_MARKED)
        finally:
            await asyncio.to_thread(lambda: marks.unlink(missing_ok=True))
        log.info(
            "checksum resync to %s: %d of %d regions differ (%d MiB)",
            link.address, len(found), -(-self.cfg.size // cs.REGION), (len(found) * cs.REGION) >> 20,
        )

    async def _merge_marks(self, marks: Path) -> None:
        carrier = {**r.bitmap_carrier(marks, read_only=True), "node-name": MARKS_NODE}
        try:
            await self.qsd.execute("blockdev-add", carrier)
            try:
                await self.qsd.execute(
                    "block-dirty-bitmap-merge",
                    r.bitmap_merge(r.QUORUM_NODE, r.TRACK_BITMAP, MARKS_NODE, cs.MARKS_BITMAP),
                )
            finally:
                with contextlib.suppress(QemuError):
                    await self.qsd.execute("blockdev-del", {"node-name": MARKS_NODE})
        except QemuError as exc:
            raise cs.ChecksumError(f"cannot merge the differing regions into the dirty bitmap: {exc}") from exc

    async def digests(self, disk: str, offset: int, length: int) -> dict[str, Any]:
        """A secondary's digests of its own disk for a primary's checksum resync (R4). Only
        while it runs as secondary, only for the disk it has (``disk``: a primary that
        compared against another disk would copy too little), read from ``disk.raw`` as the
        daemon has written it. ``length`` 0 answers which disk, its size and how much of it
        was ever written (``writtenBytes``, from the file system's extent map), without reading."""
        st = self.state
        if st.role is not Role.SECONDARY or st.stage is not Stage.RUNNING:
            raise IllegalTransition(
                f"digests are given only by a running secondary; this replica is {st.role.value}/{st.stage.value}"
            )
        if disk != st.disk_id:
            raise IllegalTransition(f"this replica's disk is {st.disk_id}, not {disk}: compare against that one")
        try:
            cs.check_span(self.cfg.size, offset, length)
        except ValueError as exc:
            raise InvalidSpan(str(exc)) from exc
        data, written = b"", None
        attested: rs.SyncPoint | None = None
        not_attested: str | None = None
        if not length:  # the primary decides between a union, a comparison and a full copy
            written = await asyncio.to_thread(cs.written_bytes, self.disk_path)
            attested, not_attested = self._give_attestation()
        else:
            async with self._digest_lock:  # one pass at a time: a second caller waits its turn
                data = await asyncio.to_thread(cs.digest_span, self.disk_path, self.cfg.size, offset, length)
            if self.state.disk_id != disk or self.state.role is not Role.SECONDARY:
                raise IllegalTransition(f"this replica's disk stopped being {disk} while it was read")
            crashpoints.hit(DIGESTS_READ)
        return {
            "disk": st.disk_id,
            "size": self.cfg.size,
            "regionSize": cs.REGION,
            "offset": offset,
            "length": length,
            "digests": data.hex(),
            "writtenBytes": written,
            "stoppedInSync": attested.to_api() if attested is not None else None,
            "notInSyncReason": not_attested,
        }

    async def _mark_out_of_sync(self, reason: str) -> None:
        """Return only once the mark is durable: in the state file and, with a Lease, on it.
        The link gate waits for this (or for fencing) before any write is acknowledged
        without the peer, so a mark that cannot be written holds writes, never loses them."""
        async with self._oos_lock:
            if self._peer_marked:
                return
            log.warning("secondary is out of sync: %s", reason)
            await self._save(out_of_sync=True)
            for hook in self.out_of_sync_hooks:
                delay = 0.05
                while True:
                    try:
                        await hook(self.state.epoch)
                        break
                    except Exception as exc:
                        log.warning("out-of-sync mark not recorded yet (%s); retrying, writes are held", exc)
                        log.debug("out-of-sync hook traceback", exc_info=True)
                        await asyncio.sleep(delay)
                        delay = min(1.0, delay * 2)
            self._peer_marked = True

    async def _on_link_down(self, link: PeerLink, reason: str) -> None:
        """The gate failed and was released (the peer is marked or the export fenced)."""
        async with self.lock:
            if link is not self.link:
                return
            self.link = None
            self.replication, self.peer_error = "degraded", reason
            # R5: the next attempt is announced now (the operator leaves the peer to it), but
            # it runs under this lock, so only after the failed link has left the quorum
            self._after_drop(link, reason)
            self._observe()
            await link.detach()
            self._count_sync_end(link, "failed")

    async def _detach_peer(self, reason: str, mark: bool) -> None:
        """Take the peer out of the quorum (caller holds the lock). With ``mark`` the peer is
        durably marked first: writes acknowledged after the detach do not reach it."""
        link, self.link = self.link, None
        if link is None:
            return
        # R1: the bitmap before the peer leaves the quorum (writes from then on miss it)
        await self._track_divergence(reason)
        if mark:
            await self._mark_out_of_sync(reason)
        self.replication, self.peer_error = "degraded", reason
        self._observe()
        await link.detach()
        log.info("peer %s detached: %s", link.address, reason)

    async def _teardown_primary(self) -> None:
        await self._detach_peer("demoted", mark=False)
        await self._stop_nbd_server()
        with contextlib.suppress(QemuError):
            await self.qsd.execute("blockdev-del", {"node-name": r.QUORUM_NODE})
        self._bitmap_present = False  # it lived on the quorum node

    async def _record_local_failure(self, reason: str) -> None:
        """H13: this disk lacks a write the workload saw acknowledged (the peer took it), so
        it must never serve as the primary again, whatever restarts in between: the first
        reason is kept in the state (memory at once, then the slots). A disk that cannot take
        even that write keeps it in memory; the fence holds either way."""
        if self.state.local_failure is not None:
            return
        # in memory at once (a _save waiting for _save_lock would set it only then)
        self.state = self.state.evolve(local_failure=reason)
        try:
            await self._save(local_failure=reason)
        except (OSError, PairvolError) as exc:
            log.warning("could not record durably that the local disk failed (%s): %s", reason, exc)
        else:
            log.warning("%s: recorded; this replica will not serve as the primary again", reason)

    async def _on_qsd_event(self, event: dict[str, Any]) -> None:
        name = event.get("event")
        data = event.get("data", {})
        if name == "QUORUM_REPORT_BAD" and self.state.role is Role.PRIMARY:
            if data.get("node-name") == r.DISK_NODE:
                # The local disk failed a request the peer served: reads (fifo: local
                # first) would return stale data. Stop serving; the secondary has every
                # acknowledged write, so failing over is the way out.
                reason = f"local disk failed a {data.get('type', 'request')}: {data.get('error', 'I/O error')}"
                self.last_error = f"{reason}; fail over to the secondary"
                self._fence_task = asyncio.create_task(self.fence_workload(self.last_error, "local-disk"))
                # the peer took part: it alone may have completed the write. A report QEMU held
                # back (one per node-name and second) comes after the peer left: its timestamp,
                # taken when the failure happened, says whether the peer was a child then
                if self._peer_children > 0 or _reported_at(event) <= self._peer_left_at:
                    await self._record_local_failure(reason)
            else:
                # the link gate answered EIO after the peer was marked (or the export fenced)
                log.debug("quorum: peer failed a request: %s", data)
        elif (
            name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
            and self.state.role is Role.SECONDARY
            and self.chain.unexpected_cow_end(data.get("device"))
        ):
            # replication.c's backup_job_completed: "cancelled unexpectedly" -> s->error
            self.undo_log_broken = (
                f"copy-before-write stopped unexpectedly ({data.get('error', name)}): the undo log back to "
                f"checkpoint {self.state.checkpoint.id if self.state.checkpoint else '?'} is incomplete"
            )
            self.last_error = self.undo_log_broken
            log.error("%s", self.undo_log_broken)
        elif name == "BLOCK_IO_ERROR":
            log.error("I/O error: %s", event.get("data"))

    # ------------------------------------------------------------------ automatic re-protection
    # docs/correctness.md R5. The decision (whether, and after how long) is pure, in
    # agent/resync.py; the steps are here and run under the replica lock like any command.

    def _reprotect_view(self) -> rs.ReprotectView:
        st = self.state
        return rs.ReprotectView(
            serving=self.serving
            and not self.fenced.is_set()
            and st.role is Role.PRIMARY
            and st.stage is Stage.RUNNING,
            # without the peer's API its older connections cannot be cut before a new link
            peer_configured=self._pairing is not None and self.cfg.auto_reprotect and self.peer_api is not None,
            attached=self.link is not None,
            failures=self._reprotect_failures,
        )

    def _after_drop(self, link: PeerLink, reason: str) -> None:
        """The peer was dropped (caller holds the lock, and detaches the failed link before it
        lets go of it): count the drop, and schedule the next automatic attempt — which takes
        the same lock — or say that there will be none."""
        in_sync_for = None if self._in_sync_at is None else time.monotonic() - self._in_sync_at
        self._in_sync_at = None
        self._reprotect_failures = rs.failures_after_drop(self._reprotect_failures, in_sync_for)
        self._peer_identity = link.peer_disk or self._peer_identity
        self._schedule_reprotect(reason)

    def _schedule_reprotect(self, error: str) -> None:
        self._reprotect_error = error
        delay = rs.reprotect_delay(self._reprotect_view())
        self._reprotect_due = None if delay is None else time.monotonic() + delay
        gave_up = delay is None and self._reprotect_failures > len(rs.REPROTECT_DELAYS_S)
        self.metrics.resync_gave_up.labels(self.cfg.name).set(1 if gave_up else 0)
        if delay is None:
            if gave_up:
                log.warning(
                    "peer %s failed %d times in a row; not re-protecting it automatically any more "
                    "(a new pairing, POST /v1/primary, starts over): %s",
                    self.state.peer, self._reprotect_failures, error,
                )
            return
        log.info("re-protecting peer %s automatically in %.1f s (attempt %d of %d)",
                 self.state.peer, delay, self._reprotect_failures, len(rs.REPROTECT_DELAYS_S))
        self._reprotect_task = asyncio.create_task(self._reprotect(delay), name="reprotect")

    async def _cancel_reprotect(self) -> None:
        task, self._reprotect_task = self._reprotect_task, None
        self._reprotect_due = None
        await cancel_and_wait(task)

    async def _reprotect(self, delay: float) -> None:
        """One automatic attempt: the same peer, the same epochs, ``sync: auto`` — a bitmap
        resync where the record allows (R1-R3), else a full copy, with the reason. The failed
        link is gone before this runs (``_on_link_down`` holds the lock until it is detached),
        and the new one joins the quorum with reads refused until the peer is in sync (R2)."""
        await asyncio.sleep(delay)
        async with self.lock:
            if self._reprotect_task is not asyncio.current_task():
                return  # replaced or cancelled meanwhile
            self._reprotect_task, self._reprotect_due = None, None
            if rs.reprotect_delay(self._reprotect_view()) is None:
                return  # demoted, fenced, stopped, re-paired or attached meanwhile
            self._reprotect_running = True
            try:
                await self._reprotect_attempt()
            finally:
                self._reprotect_running = False

    async def _reprotect_attempt(self) -> None:
        """Caller holds the lock; the peer is not attached."""
        assert self._pairing is not None
        peer, peer_epoch = self._pairing
        try:
            # e.g. the Lease records that the peer is being rewritten (no state the volume
            # had until it is in sync) before the first byte is copied to it
            for hook in self.before_resync_hooks:
                await hook(self.state.epoch)
            await self._attach_peer(peer, "auto", peer_epoch, self._peer_identity, automatic=True)
        except NoAutomaticResync as exc:
            # nothing an attempt may do: the operator (or whoever pairs) re-pairs from here
            log.info("not re-protecting peer %s automatically: %s", self.state.peer, exc)
            self.replication, self._reprotect_error, self._reprotect_due = "degraded", str(exc), None
            self._observe()
            return
        except Exception as exc:  # a refused or unreachable peer, a hook that failed
            log.warning("automatic re-protection of peer %s failed: %s", self.state.peer, exc)
            log.debug("automatic re-protection traceback", exc_info=True)
            # replication.error keeps why the peer was dropped; reprotect.lastError says this
            self.replication = "degraded"
            self.metrics.resync_attempts.labels(self.cfg.name, "failed").inc()
            self._reprotect_failures += 1
            self._schedule_reprotect(str(exc))
            self._observe()
            return
        link = self.link
        assert link is not None
        self.metrics.resync_attempts.labels(self.cfg.name, "started").inc()
        try:
            await link.start_copy()
        except PeerLinkError as exc:
            # the bitmap keeps every bit (R1): the record stands, the next attempt or
            # pairing decides again
            await self._detach_peer(str(exc), mark=True)
            self._count_sync_end(link, "failed")
            self.peer_error = str(exc)
            self._reprotect_failures += 1
            self._schedule_reprotect(str(exc))
        self._observe()

    def _count_sync_end(self, link: PeerLink, result: str) -> None:
        """pairvol_resyncs_total and the last resync's gauges: once per link that synced."""
        if link.sync_kind == rs.NONE or self._sync_counted is link:
            return
        if result == "failed" and not link.syncing:
            return  # it had finished: its end was counted as a success
        self._sync_counted = link
        m, name = self.metrics, self.cfg.name
        m.resyncs.labels(name, link.sync_kind, result).inc()
        if result == "succeeded":
            m.resync_last_duration.labels(name).set(time.monotonic() - link.sync_started)
            m.resync_last_bytes.labels(name).set(link.sync_total)

    def _reprotect_status(self) -> dict[str, Any] | None:
        """``replication.reprotect``: the automatic attempts of this pairing (None: no drop yet)."""
        if self._reprotect_failures == 0 and self._reprotect_error is None:
            return None
        due = self._reprotect_due
        if self._reprotect_running:
            due = time.monotonic()  # an attempt runs now
        return {
            "failures": self._reprotect_failures,
            "limit": len(rs.REPROTECT_DELAYS_S),
            "nextInSeconds": None if due is None else round(max(0.0, due - time.monotonic()), 3),
            "lastError": self._reprotect_error,
            "gaveUp": due is None and self._reprotect_failures > len(rs.REPROTECT_DELAYS_S),
        }

    def _resync_remaining(self) -> float:
        link = self.link
        if link is None or not link.syncing:
            return 0.0
        return float(max(0, link.sync_total - link.sync_done))

    async def _run_in_sync_hooks(self) -> bool:
        """Caller holds ``_oos_lock``: a mark waits for this, so none is stored while a hook
        runs. A hook given up after ``IN_SYNC_HOOK_TIMEOUT_S`` may still reach the API
        server later, after a new mark: the Lease's clear is conditional on the version it
        was computed against and every mark is a new version, so it is refused then
        (``LeaseKeeper.clear_marks``). A hook that fails leaves the marks in place: the safe
        direction, the peer stays OutOfSync for the operator until ``_record_in_sync_later``
        succeeds. Returns whether all succeeded."""
        for hook in self.in_sync_hooks:
            try:
                async with asyncio.timeout(IN_SYNC_HOOK_TIMEOUT_S):
                    await hook(self.state.epoch)
            except Exception as exc:
                log.warning("the peer is in sync but that could not be recorded yet (%s); it stays marked", exc)
                log.debug("in-sync hook traceback", exc_info=True)
                return False
        return True

    async def _record_in_sync_later(self, link: PeerLink) -> None:
        """Retry the in-sync hooks (every 1, 2, 4 … 30 s) while ``link`` stays in sync, under
        the mark's lock like the first try; a new failure ends it (its mark stands)."""
        delay = 1.0
        while True:
            await asyncio.sleep(delay)
            async with self._oos_lock:
                if link is not self.link or link.gate.failed.is_set() or link.syncing or self._peer_marked:
                    return
                if await self._run_in_sync_hooks():
                    log.info("the peer's being in sync is recorded now")
                    return
            delay = min(30.0, delay * 2)

    # ------------------------------------------------------------------ status

    async def health(self, timeout_s: float = 1.0) -> Health:
        """The data path's verdict (pairvol.agent.health): what /healthz and the Lease go by.

        Exports change only under the lock, and a command may be between two steps right
        now (the export deleted, the intent not yet cleared; the relay not started yet): a
        bad verdict from a daemon that answered is therefore confirmed under the lock
        before it counts. If the lock stays busy, a command is changing the data path and
        the daemon answers: healthy as far as can be seen, with a note.
        """
        first = judge(await self._observe_data_path(timeout_s), r.WORKLOAD_EXPORT)
        if first.ok or not first.conclusive or not self.qsd.alive:
            return first
        try:
            async with asyncio.timeout(timeout_s):
                await self.lock.acquire()
        except TimeoutError:
            return Health(True, f"unconfirmed while a command holds the replica lock: {first.reason}",
                          may_serve=True)
        try:
            return judge(await self._observe_data_path(timeout_s), r.WORKLOAD_EXPORT)
        finally:
            self.lock.release()

    async def _observe_data_path(self, timeout_s: float) -> Observed:
        serving, relay = self.serving, self.relay

        async def exports(daemon: Qsd) -> frozenset[str] | None:
            if not daemon.alive:
                return None
            try:
                return frozenset(e["id"] for e in await daemon.execute("query-block-exports"))
            except QemuError:
                return None

        timed_out = None
        mine = theirs = None
        try:
            async with asyncio.timeout(timeout_s):
                mine = await exports(self.qsd)
            if relay is not None:
                timed_out = "the relay daemon"
                async with asyncio.timeout(timeout_s):
                    theirs = await exports(relay)
            timed_out = None
        except TimeoutError:
            timed_out = timed_out or "qemu-storage-daemon"
        return Observed(
            qsd_alive=self.qsd.alive,
            qsd_error=self.qsd.exit_error,
            serving=serving and self.serving,
            exports=mine,
            relay_wanted=self.cfg.export_listen is not None,
            relay_alive=relay is not None and relay.alive,
            relay_exports=theirs,
            timed_out=timed_out,
        )

    def status(self) -> dict[str, Any]:
        st = self.state
        sync = None
        link = self.link
        if link is not None and link.syncing:
            sync = {
                "kind": link.sync_kind,
                "reason": link.sync_reason,
                "doneBytes": link.sync_done,
                "totalBytes": link.sync_total,
                "progress": round(link.sync_done / max(1, link.sync_total), 4),
            }
            if link.sync_kind == rs.CHECKSUM:
                sync["comparedBytes"] = link.compared_bytes
        qsd_error = None if self.qsd.alive else (self.qsd.exit_error or "not running")
        replication, peer_error = self.replication, self.peer_error
        if link is not None and link.gate.failed.is_set():
            replication, peer_error = "degraded", link.gate.reason  # being dropped right now
        listener = self.listener
        if st.role is Role.SECONDARY and listener is not None and not listener.alive:
            peer_error = f"the replication listener on --replication-listen is gone: {listener.exit_error}"
        return {
            "name": st.name,
            "role": st.role.value,
            "stage": st.stage.value,
            "epoch": st.epoch,
            "size": st.size,
            "checkpoint": {**st.checkpoint.to_api(), "restorePoint": st.restore_point}
            if st.checkpoint and st.role is not Role.NONE
            else None,
            "replication": {
                "state": replication,
                "peer": link.address if link is not None else (st.peer if st.role is Role.PRIMARY else None),
                "error": qsd_error
                or (self.last_error if st.role is Role.PRIMARY and not self.serving else None)
                or peer_error
                or self.last_error,
                "outOfSync": st.out_of_sync,
                "sync": sync,
                "lastSync": self.last_sync,
                "resync": {
                    "peerDisk": st.peer_disk,
                    "tracking": st.tracking,
                    "fullReason": st.full_reason,
                }
                if st.role is Role.PRIMARY
                else None,
                "sincePromotion": {
                    "from": st.promoted_from.to_api() if st.promoted_from else None,
                    "reason": st.union_reason,
                }
                if st.role is Role.PRIMARY
                else None,
                "reprotect": self._reprotect_status() if st.role is Role.PRIMARY else None,
                "listener": None
                if listener is None
                else {"pid": listener.pid, "alive": listener.alive},
                "link": None
                if link is None
                else {
                    "export": link.export,
                    "pid": link.link.pid,
                    "failed": link.gate.reason,
                    "heldRequests": link.gate.held,
                    # S5: what a cut names, only while this link is in sync
                    "serial": self._peer_link_serial if replication == "replicating" else None,
                },
                "linkSerial": self.link_serial if st.role is Role.SECONDARY else None,
            },
            "export": {
                "serving": self.serving,
                "fencedBy": self.fenced_by,
                "refusedEpoch": st.refused_epoch,
                "socket": str(self.cfg.export_socket),
                "name": r.WORKLOAD_EXPORT,
                "lineageName": r.lineage_export_name(st.lineage) if st.lineage is not None else None,
                "listen": f"{self.cfg.export_listen[0]}:{self.cfg.export_listen[1]}"
                if self.relay is not None and self.cfg.export_listen
                else None,
            },
            "ioStatus": io_status(st.role, st.stage),
            "qsd": {"alive": self.qsd.alive, "pid": self.qsd.pid, "error": qsd_error},
            "restored": self.restored,
            # a command holds the replica lock (a start may still take the Lease and serve)
            "busy": self.lock.locked(),
            "disk": {
                "id": st.disk_id,
                "stoppedInSync": self._attestation.to_api() if self._attestation else None,
                "localFailure": self.state.local_failure,
            },
            "overlays": self.chain.describe() if st.role is Role.SECONDARY else None,
            # what POST /v1/failover takes as its "trigger" (an operator sends it only then)
            "failoverTriggers": list(FAILOVER_TRIGGERS),
        }


__all__ = ["ChainCheckFailed", "IllegalTransition", "QsdDied", "Replica", "ReplicaError"]
