"""The secondary's chain: overlay generations, copy-before-write and the failover commit.

One :class:`SecondaryChain` owns every QEMU node of the secondary's undo log and the
invariants about them (docs/correctness.md, S1-S8, states them with their arguments)::

    disk ◄── backing ── hidden-G ◄── backing ── active-G        copy-before-write job cow-G ──► hidden-G

* **At most two live generations.** A generation is live from its ``blockdev-add`` until
  its ``blockdev-del``: the current one (``cow-G`` copies into ``hidden-G``) and at most
  one older one whose retirement is pending after a cut. A cut first retires the pending
  generation, so a burst of cuts cannot stack generations (issue 7, failure 10).
* **Retire first.** The copy-before-write filter of a pending generation sits above
  ``disk`` without sharing WRITE, so nothing that needs WRITE on ``disk`` (the failover
  commit, the new primary's writable export) may run next to it (failure 5). Cut,
  failover and stop all start with :meth:`retire_pending`, under the replica lock; it is
  idempotent, and the retire scheduled after a cut is only an early call of it.
* **The commit starts from durable overlays.** The overlays run with ``cache.no-flush``;
  before a checkpoint-mode commit writes into ``disk`` they are closed (qcow2 writes its
  metadata), fsynced and reopened, which is exactly what a restart would see, and the
  caller persists that fact. A commit interrupted by a crash is then redone from the same
  files with the same result (see :meth:`commit`).

The caller (:class:`pairvol.agent.replica.Replica`) keeps the role/stage/epoch state
machine and persistence; it holds the replica lock around every method here that changes
the graph, and this class checks that it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pairvol.agent import crashpoints
from pairvol.agent.state import DISK_FILE
from pairvol.aio import cancel_and_wait
from pairvol.errors import PairvolError
from pairvol.qemu import QemuError, img
from pairvol.qemu import recipes as r
from pairvol.qemu.qsd import Qsd

log = logging.getLogger(__name__)

AFTER_PREPARE = crashpoints.point(
    "checkpoint.after-prepare", "the next generation's overlay files exist; nothing attached yet"
)
AFTER_ATTACH = crashpoints.point(
    "checkpoint.after-attach", "the next generation is attached and checked; copy-before-write still into the current"
)
AFTER_CUT = crashpoints.point("checkpoint.after-cut", "the new generation is in force, not yet saved")
RETIRE_AFTER_CANCEL = crashpoints.point(
    "retire.after-cancel", "the old generation's copy-before-write job is gone; its nodes are still attached"
)
RETIRE_AFTER_DETACH = crashpoints.point(
    "retire.after-detach", "the old generation's nodes are deleted; its files are not yet removed"
)
FAILOVER_AFTER_COW = crashpoints.point(
    "failover.after-cow-cancelled", "no copy-before-write job is left; the overlays are not yet durable"
)
FAILOVER_MID_COMMIT = crashpoints.point(
    "failover.mid-commit", "the commit job copied everything (READY) but is not completed"
)
FAILOVER_AFTER_COMMIT = crashpoints.point(
    "failover.after-commit", "the disk holds the checkpoint state; the new role is not yet saved"
)
RESTORE_AFTER_DISCARD = crashpoints.point(
    "restore.after-discard", "restart after an unclean stop: the old overlays are removed, no new ones yet"
)
RESTORE_AFTER_COW = crashpoints.point(
    "restore.after-cow", "restart: copy-before-write runs again; the restored state is not yet saved"
)

QCOW2_MAGIC = b"QFI\xfb"
_QCOW2_SIZE = struct.Struct(">Q")  # header offset 24: virtual size


class ChainError(PairvolError):
    """An operation on the secondary's overlays failed (HTTP 500)."""


class ChainCheckFailed(ChainError):
    """replication_start's checks on the active/hidden/secondary chain failed."""


@dataclass(frozen=True)
class Cut:
    generation: int
    cut_s: float  # the QMP transaction: the only moment in-flight writes are drained
    duration_s: float


class SecondaryChain:
    def __init__(
        self, qsd: Qsd, data_dir: Path, run_dir: Path, size: int, lock: asyncio.Lock, cow_copied: Callable[[int], None]
    ) -> None:
        self.qsd = qsd
        self.data_dir = data_dir
        self.run_dir = run_dir
        self.size = size
        self.lock = lock
        self._cow_copied = cow_copied
        self.generation = 0  # the current generation (the caller persists it)
        self.retiring: int | None = None  # the one older generation still attached, if any
        self.attached: set[int] = set()
        self.peak_live = 0
        self._cancelling: set[str] = set()
        self._prepared: int | None = None
        self._prepare_task: asyncio.Task[None] | None = None
        self._retire_task: asyncio.Task[None] | None = None
        self._closing = False

    # ------------------------------------------------------------------ files

    def paths(self, gen: int) -> tuple[Path, Path]:
        return self.data_dir / f"hidden-{gen}.qcow2", self.data_dir / f"active-{gen}.qcow2"

    def remove_stale(self, keep: int | None) -> None:
        """Overlays of other generations than ``keep`` are leftovers (a pre-created pair, or
        a pair whose deletion a crash interrupted); only the current pair may hold data.
        Blocking: call through asyncio.to_thread."""
        keep_paths = set(self.paths(keep)) if keep is not None else set()
        for pattern in ("hidden-*.qcow2", "active-*.qcow2"):
            for path in self.data_dir.glob(pattern):
                if path not in keep_paths:
                    path.unlink(missing_ok=True)

    async def have_files(self, gen: int) -> bool:
        return await asyncio.to_thread(lambda: all(p.exists() for p in self.paths(gen)))

    async def _create(self, gen: int) -> None:
        """New empty overlays are copies of one empty qcow2 made at start-up: a copy of a
        few hundred KiB costs far less than a qemu-img process per file."""
        template = self.run_dir / f"empty-overlay-{self.size}.qcow2"  # per size: the volume may grow
        if not await asyncio.to_thread(template.exists):
            partial = template.with_suffix(".partial")
            await asyncio.to_thread(lambda: partial.unlink(missing_ok=True))
            await img.create(partial, "qcow2", self.size)
            await asyncio.to_thread(os.replace, partial, template)

        def copy() -> None:
            for path in self.paths(gen):
                if path.exists():
                    raise ChainError(f"refusing to overwrite {path}: it exists already")
                shutil.copyfile(template, path)

        await asyncio.to_thread(copy)

    async def resize(self, size: int) -> None:
        """The volume grew: overlays from here on are made at ``size`` (replication.c's check:
        active, hidden and disk have the same length). Only while no generation is attached."""
        self._require_lock()
        if self.attached:
            raise ChainError(f"cannot change the overlays' size while generations {sorted(self.attached)} are attached")
        if self._prepare_task is not None:
            with contextlib.suppress(Exception):
                await self._prepare_task
            self._prepare_task = None
        self._prepared = None
        self.size = size

    async def _remove_files(self, gen: int) -> None:
        def rm() -> None:
            for path in self.paths(gen):
                path.unlink(missing_ok=True)

        await asyncio.to_thread(rm)

    def prepare_next(self) -> None:
        """Create the next overlay pair ahead of time, so a cut only runs QMP commands."""
        gen = self.generation + 1
        if self._prepared == gen or (self._prepare_task is not None and not self._prepare_task.done()):
            return

        async def prepare() -> None:
            await self._remove_files(gen)
            await self._create(gen)
            self._prepared = gen

        self._prepared = None
        self._prepare_task = asyncio.create_task(prepare(), name="prepare-overlays")

    async def _ensure_files(self, gen: int) -> None:
        if self._prepare_task is not None:
            with contextlib.suppress(Exception):
                await self._prepare_task
            self._prepare_task = None
        if self._prepared != gen:
            await self._remove_files(gen)
            await self._create(gen)
        self._prepared = None

    # ------------------------------------------------------------------ nodes

    async def attach(self, gen: int) -> None:
        """blockdev-add the pair and run the seeds' checks; on failure nothing stays attached."""
        hidden, active = r.overlay_pair(*self.paths(gen), gen)
        self.attached.add(gen)
        self.peak_live = max(self.peak_live, len(self.attached))
        try:
            await self.qsd.execute("blockdev-add", hidden)
            await self.qsd.execute("blockdev-add", active)
            await self.check(gen)
        except PairvolError:
            await self._detach_nodes(gen, tolerant=True)
            raise

    async def _detach_nodes(self, gen: int, tolerant: bool = False) -> None:
        """blockdev-del the pair (closing a qcow2 node writes its metadata to the file).
        Idempotent: a node that is already gone is fine."""
        for node in (r.active_node(gen), r.hidden_node(gen)):
            try:
                await self.qsd.execute("blockdev-del", {"node-name": node})
            except QemuError as exc:
                if not tolerant and not _gone(exc):
                    raise ChainError(f"cannot delete overlay node {node}: {exc}") from exc
        self.attached.discard(gen)

    async def discard(self, gen: int, files: bool = True) -> None:
        """Drop a generation: its copy-before-write job (if one still runs: a start that
        failed after the job began), nodes and files. Dropping the current one ends the
        chain (failover, stop), so the pair prepared for the next cut goes too. With
        ``files=False`` the files stay for :meth:`remove_files` later (a failover serves
        first: unlinking written overlays can take tens of ms; a restart as primary
        removes any left behind, see :meth:`remove_stale`)."""
        await self._cancel_job(r.cow_job(gen))
        await self._detach_nodes(gen)
        if files:
            await self.remove_files(gen)

    async def remove_files(self, gen: int) -> None:
        """The files of a discarded generation (and, for the current one, of the pair
        prepared for the next cut)."""
        await self._remove_files(gen)
        if gen == self.generation:
            if self._prepare_task is not None:
                with contextlib.suppress(Exception):
                    await self._prepare_task
                self._prepare_task = None
            self._prepared = None
            await self._remove_files(gen + 1)

    async def check(self, gen: int) -> None:
        """replication_start's checks, with its messages. Reads the block graph's edges
        (``x-debug-query-block-graph``: names and edges, no file names) and the overlays'
        qcow2 headers: ``query-named-block-nodes`` would make the daemon build every node's
        file name, which grows with the filters above ``disk``."""
        graph = await self.qsd.execute("x-debug-query-block-graph")
        ids = {n["name"]: n["id"] for n in graph["nodes"] if n["type"] == "block-driver"}
        backing = {e["parent"]: e["child"] for e in graph["edges"] if e["name"] == "backing"}
        active, hidden, disk = ids.get(r.active_node(gen)), ids.get(r.hidden_node(gen)), ids.get(r.DISK_NODE)
        if active is None or active not in backing or backing[active] != hidden:
            raise ChainCheckFailed("Active disk doesn't have backing file")
        if hidden is None or hidden not in backing:
            raise ChainCheckFailed("Hidden disk doesn't have backing file")
        if disk is None or backing[hidden] != disk:
            raise ChainCheckFailed("The secondary disk doesn't have block backend")
        headers = await asyncio.to_thread(lambda: [_qcow2_header(p) for p in self.paths(gen)])
        if any(magic != QCOW2_MAGIC for magic, _ in headers):
            raise ChainCheckFailed("Active disk or hidden disk doesn't support make_empty")
        if any(size != self.size for _, size in headers):
            raise ChainCheckFailed("Active disk, hidden disk, secondary disk's length are not the same")

    async def start_cow(self, gen: int) -> str:
        """Start copy-before-write into hidden-G; returns the node to export to the primary.

        The job's filter is inserted above ``disk`` and takes over the parents ``disk``
        has *now*; a parent added later by the name ``disk`` would bypass it. So the
        replication export is added after the job, on the filter node itself: no write can
        reach ``disk`` without the undo log seeing it, not even in the moment between the
        two commands (a primary reconnecting to a restarted secondary). Later cuts insert
        their filters below this one and retiring it hands the export down to the next."""
        job = r.cow_job(gen)
        self.qsd.watch_job(job)
        await self.qsd.execute("blockdev-backup", r.backup_sync_none(gen))
        graph = await self.qsd.execute("x-debug-query-block-graph")
        job_id = next((n["id"] for n in graph["nodes"] if n["type"] == "block-job" and n["name"] == job), None)
        filt = next((e["child"] for e in graph["edges"] if e["parent"] == job_id and e["name"] == "main node"), None)
        name = next((n["name"] for n in graph["nodes"] if n["id"] == filt), None)
        if name is None:
            raise ChainError(f"copy-before-write job {job} has no filter node in the block graph")
        return str(name)

    async def _cancel_job(self, job: str, timeout: float = 30.0) -> dict[str, Any]:
        """Cancel a job and wait until it is gone; returns its final event. Idempotent."""
        self.qsd.watch_job(job)
        self._cancelling.add(job)
        try:
            try:
                await self.qsd.execute("block-job-cancel", {"device": job, "force": True})
            except QemuError as exc:
                if _gone(exc):
                    return {"event": "GONE", "data": {}}
                raise
            try:
                return await self.qsd.wait_job_event(job, {"BLOCK_JOB_CANCELLED", "BLOCK_JOB_COMPLETED"}, timeout)
            except TimeoutError as exc:
                raise ChainError(f"copy-before-write job {job} did not end within {timeout:g} s of its cancel") from exc
        finally:
            self.qsd.unwatch_job(job)
            self._cancelling.discard(job)

    def unexpected_cow_end(self, job: str | None) -> bool:
        """A job-end event that means the current undo log is incomplete."""
        return not self._closing and job == r.cow_job(self.generation) and job not in self._cancelling

    # ------------------------------------------------------------------ operations

    def _require_lock(self) -> None:
        if not self.lock.locked():
            raise RuntimeError("the secondary chain is changed only under the replica lock")

    async def open_generation(self, gen: int) -> None:
        """Files (prepared or new) and nodes of a generation, checked; no job yet."""
        self._require_lock()
        await self._ensure_files(gen)
        await self.attach(gen)

    async def retire_pending(self) -> None:
        """Retire the older generation left by a cut, if any: cancel its copy-before-write
        job (its filter holds ``disk`` without sharing WRITE), delete its nodes and files.
        Every cut, failover and stop calls this first; idempotent."""
        self._require_lock()
        old = self.retiring
        if old is None:
            return
        final = await self._cancel_job(r.cow_job(old))
        self._cow_copied(int(final.get("data", {}).get("offset", 0)))
        crashpoints.hit(RETIRE_AFTER_CANCEL)
        await self._detach_nodes(old)
        crashpoints.hit(RETIRE_AFTER_DETACH)
        await self._remove_files(old)
        self.retiring = None
        log.debug("retired overlay generation %d", old)

    async def cut(self) -> Cut:
        """A checkpoint: a new empty pair and one transaction that starts copy-before-write
        into it. The transaction drains in-flight writes, so each lands wholly before or
        after the cut. The old generation becomes the pending one; the caller persists the
        new generation and then calls :meth:`schedule_retire`."""
        self._require_lock()
        t0 = time.perf_counter()
        await self.retire_pending()
        old, new = self.generation, self.generation + 1
        await self._ensure_files(new)
        crashpoints.hit(AFTER_PREPARE)
        await self.attach(new)
        crashpoints.hit(AFTER_ATTACH)
        self.qsd.watch_job(r.cow_job(new))
        t_cut = time.perf_counter()
        try:
            await self.qsd.execute(
                "transaction", {"actions": [{"type": "blockdev-backup", "data": r.backup_sync_none(new)}]}
            )
        except PairvolError:
            self.qsd.unwatch_job(r.cow_job(new))
            await self.discard(new)
            raise
        cut_s = time.perf_counter() - t_cut
        self.generation, self.retiring = new, old
        crashpoints.hit(AFTER_CUT)
        self.prepare_next()
        return Cut(new, cut_s, time.perf_counter() - t0)

    def schedule_retire(self) -> None:
        """Retire the pending generation soon, off the cut's critical path. It waits for
        the lock like any command; whoever gets the lock first retires it."""

        async def retire() -> None:
            async with self.lock:
                try:
                    await self.retire_pending()
                except PairvolError as exc:  # the next cut, failover or stop retries and reports
                    log.error("could not retire overlay generation %s: %s", self.retiring, exc)

        if self._retire_task is None or self._retire_task.done():
            self._retire_task = asyncio.create_task(retire(), name="retire-overlays")

    async def stop_cow(self) -> None:
        """No copy-before-write job left (failover, stop): the pending generation retired,
        the current job cancelled. The current overlays stay attached."""
        self._require_lock()
        await self.retire_pending()
        final = await self._cancel_job(r.cow_job(self.generation))
        self._cow_copied(int(final.get("data", {}).get("offset", 0)))

    async def make_durable(self) -> None:
        """Close the current overlays (qcow2 writes its metadata, which ``cache.no-flush``
        kept in the daemon), fsync them and the directory: from here on the files alone
        hold the checkpoint, as a restart would find them. Needs :meth:`stop_cow` first."""
        self._require_lock()
        gen = self.generation
        await self._detach_nodes(gen)
        await asyncio.to_thread(fsync_paths, [*self.paths(gen), self.data_dir])

    async def commit(self) -> None:
        """replication_stop(failover=true): active commit of active+hidden into ``disk``.

        Redoing it after a crash gives the same result, so a restart in stage FAILOVER
        simply runs it again from the files. Per cluster c of the volume:

        * c allocated in active or hidden: the checkpoint's value is the top-most
          allocated copy; the commit writes it into ``disk`` and writes nothing else
          (the job's only target is ``disk``; the export is gone and copy-before-write
          cancelled, so nothing writes the overlays). Any number of partial runs write
          the same value;
        * c allocated in neither: nothing wrote ``disk`` at c since the cut (any write
          would have copied the old data into hidden first), so ``disk`` holds the
          checkpoint's value, and the commit never touches c.

        That needs the overlays as they were when the first run began, which
        :meth:`make_durable` (and the caller's persisted mark) guarantees.
        """
        self._require_lock()
        gen = self.generation
        if gen not in self.attached:
            await self.attach(gen)
        self.qsd.watch_job(r.COMMIT_JOB)
        try:
            await self.qsd.execute("block-commit", r.active_commit(gen))
            while True:
                try:
                    event = await self.qsd.wait_job_event(
                        r.COMMIT_JOB, {"BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"}, 1.0
                    )
                    break
                except TimeoutError:
                    for job in await self.qsd.execute("query-block-jobs"):
                        if job["device"] == r.COMMIT_JOB:
                            log.info("failover commit: %d / %d MiB", job["offset"] >> 20, job["len"] >> 20)
            if event["event"] != "BLOCK_JOB_READY":
                raise ChainError(f"commit job ended early: {event['data'].get('error', event['event'])}")
            crashpoints.hit(FAILOVER_MID_COMMIT)
            await self.qsd.execute("block-job-complete", {"device": r.COMMIT_JOB})
            event = await self.qsd.wait_job_event(r.COMMIT_JOB, {"BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"})
            if event["event"] != "BLOCK_JOB_COMPLETED" or "error" in event["data"]:
                raise ChainError(f"commit job failed: {event['data'].get('error', event['event'])}")
        finally:
            self.qsd.unwatch_job(r.COMMIT_JOB)
        # the overlays are deleted once the caller persists the new role: the committed
        # data must be on stable storage before that (a node crash loses the page cache)
        await asyncio.to_thread(fsync_paths, [self.data_dir / DISK_FILE])
        crashpoints.hit(FAILOVER_AFTER_COMMIT)

    async def restore_running(self, gen: int, start_export: Callable[[str], Awaitable[None]]) -> int:
        """A restarted secondary: a new generation from the disk as found; returns it.

        The old undo log is never resumed, however cleanly it was closed: a new
        copy-before-write job starts with every region to copy, so the first write to a
        region after the restart would copy the disk's current data over what the undo
        log already holds for it (the cut's data), and a commit would return the cut
        mixed with later states. After an unclean stop the overlays may lack metadata
        that lived in the dead daemon too. The caller must not call the disk a restore
        point: the next checkpoint makes one."""
        self._require_lock()
        await self._remove_files(gen)
        crashpoints.hit(RESTORE_AFTER_DISCARD)
        gen += 1
        await self._ensure_files(gen)
        self.generation = gen
        await self.attach(gen)
        await start_export(await self.start_cow(gen))
        crashpoints.hit(RESTORE_AFTER_COW)
        self.prepare_next()
        return gen

    async def close(self) -> None:
        """Before the daemon quits (which ends every job)."""
        self._closing = True
        await cancel_and_wait(self._retire_task, self._prepare_task)

    def describe(self) -> dict[str, Any]:
        live = sorted(self.attached)
        return {"generation": self.generation, "live": live, "retiring": self.retiring, "peakLive": self.peak_live}


def _gone(exc: QemuError) -> bool:
    """QEMU's texts for a node or job that does not exist (any more)."""
    text = str(exc)
    return "not found" in text or "Failed to find" in text or "Cannot find" in text


def _qcow2_header(path: Path) -> tuple[bytes, int]:
    with path.open("rb") as f:
        head = f.read(32)
    if len(head) < 32:
        return b"", -1
    return head[:4], _QCOW2_SIZE.unpack_from(head, 24)[0]


def fsync_paths(paths: list[Path]) -> None:
    """fsync files and directories that exist (blocking)."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
