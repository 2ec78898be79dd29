"""One pairing of a primary with one secondary: everything the primary builds to write to
its peer, owned by one object so that it is built, failed and torn down as one.

A :class:`PeerLink` owns

* the *link daemon*: a second qemu-storage-daemon whose only job is the NBD client (TLS-PSK)
  to the secondary's export ``replication-eN`` — killing it cuts the link, no capability
  needed, and a connect that hangs (a blackholed peer) blocks only that daemon;
* the :class:`~pairvol.agent.gate.LinkGate` between the link daemon and the primary daemon;
* the peer's nodes in the primary daemon (the quorum child, the full sync's target) and the
  child's place in the quorum, looked up in QEMU's block graph rather than counted;
* the full sync (a write-blocking mirror) or the bitmap resync (a backup job of the tracked
  regions, source the quorum) and the moment the peer becomes in sync.

The ordering it enforces (docs/correctness.md, "no mark, no acknowledgement"): when the gate
fails, ``_settle`` waits for ``mark`` (the replica's durable OutOfSync mark) or for the
workload export to be fenced, and only then releases the gate. Nothing else releases it.
Before either, it calls ``track``: the primary's dirty bitmap exists before the first write
can finish without the peer (docs/correctness.md, R1).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from pairvol.agent import crashpoints
from pairvol.agent import resync as rs
from pairvol.agent.config import AgentConfig
from pairvol.agent.gate import COPY_EXPORT, LinkGate
from pairvol.agent.metrics import AgentMetrics
from pairvol.aio import cancel_and_wait
from pairvol.errors import PairvolError
from pairvol.qemu import QemuError
from pairvol.qemu import recipes as r
from pairvol.qemu.qsd import Qsd

log = logging.getLogger(__name__)

Mark = Callable[[str], Coroutine[Any, Any, None]]
Track = Callable[[str, bool], Awaitable[None]]  # (reason, the peer failed a flush)
Down = Callable[["PeerLink", str], Awaitable[None]]
InSync = Callable[["PeerLink"], Awaitable[bool]]
Compare = Callable[["PeerLink"], Awaitable[None]]  # checksum resync: mark what differs (R4)

SYNC_STARTED = crashpoints.point("sync.started", "primary: full sync mirror running, peer marked out of sync")
SYNC_READY = crashpoints.point("sync.ready", "primary: mirror READY, not yet cancelled")
SYNC_DONE = crashpoints.point("sync.done", "primary: mirror finished, peer not yet declared in sync")
LINK_FAILED = crashpoints.point("link.failed", "primary: gate closed, requests held, mark not yet written")
LINK_RELEASED = crashpoints.point("link.released", "primary: mark durable, held requests answered")
RESYNC_STARTED = crashpoints.point(
    "resync.started", "primary: bitmap resync job running, peer in the quorum and marked out of sync"
)
RESYNC_ISSUED = crashpoints.point(
    "resync.issued", "primary: bitmap resync job created, its progress not yet read (a small one may end here)"
)
RESYNC_COPIED = crashpoints.point("resync.copied", "primary: bitmap resync job finished, peer not yet declared in sync")
LINK_TRACKED = crashpoints.point("link.tracked", "primary: gate closed, dirty bitmap started, mark not yet written")
CHECKSUM_STARTED = crashpoints.point(
    "checksum.started", "primary: peer in the quorum, marked, dirty bitmap running; no region compared yet"
)

CONNECT_TIMEOUT = 10.0
# H13: how long a teardown waits for the event handlers before it counts the peer as gone
EVENT_BARRIER_TIMEOUT_S = 5.0


class PeerLinkError(PairvolError):
    """The peer could not be attached; the message says why."""


class PeerRefusedExport(PeerLinkError):
    """The peer has no export by the name asked for (another incarnation, another disk)."""


class PeerLink:
    def __init__(
        self,
        *,
        qsd: Qsd,
        cfg: AgentConfig,
        metrics: AgentMetrics,
        tls_dir: Path | None,
        peer: tuple[str, int],
        export: str,
        mark: Mark,
        fenced: asyncio.Event,
        on_down: Down,
        in_sync: InSync,
        track: Track,
        peer_disk: str | None = None,
        compare: Compare | None = None,
        in_quorum: Callable[[int], None] = lambda delta: None,
    ) -> None:
        self.qsd = qsd
        self.cfg = cfg
        self.metrics = metrics
        self.tls_dir = tls_dir
        self.peer = peer
        self.export = export
        self._mark = mark
        self._fenced = fenced
        self._on_down = on_down
        self._in_sync = in_sync
        self._track = track
        self._compare = compare
        # H13: +1 before the peer's node may become a child of the quorum, -1 only once it
        # is not one any more and every event QEMU sent before that was handled
        self._in_quorum = in_quorum
        self._counted = False
        self._joined = False
        self.compared_bytes = 0  # checksum resync: how much of the volume was compared
        self._compare_logged = 0.0
        self.peer_disk = peer_disk  # the identity the peer answered to (its identity export)
        run_dir = cfg.data_dir / ".run"
        self.link = Qsd(run_dir, cfg.data_dir / "link.log", name="link")
        # a socket per link: a client of an earlier link that lingers (its node not yet
        # deleted) can never reconnect into this one's gate
        self.gate = LinkGate(
            run_dir / f"gate-{uuid.uuid4().hex[:8]}.sock",
            run_dir / "link.sock",
            r.LINK_EXPORT,
            cfg.stall_timeout,
            metrics.peer_sent_bytes.labels(cfg.name).inc,
        )
        self.child: str | None = None
        self.syncing = False
        self.sync_kind = rs.NONE
        self.sync_reason = ""
        self.sync_done = 0
        self.sync_total = 0
        self.sync_started = 0.0
        self.last_sync: dict[str, Any] | None = None
        self.down_reason: str | None = None
        self.released = asyncio.Event()
        self._settle_task: asyncio.Task[None] | None = None
        self._sync_task: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return f"{self.peer[0]}:{self.peer[1]}"

    # ------------------------------------------------------------------ attach

    async def attach(self, kind: str, why: str = "") -> None:
        """Connect, join the quorum, and start the copy ``kind`` (none, full, bitmap). On
        error everything built so far is torn down again."""
        try:
            await self._start_link()
        except PairvolError:
            await self.teardown()
            raise
        if kind != rs.NONE:
            # the peer lacks data until the sync is done: no read may fall back to it, from
            # the moment it is a child of the quorum (the workload export may be serving)
            self.gate.serve_reads = False
        try:
            await self.gate.start()
            self._settle_task = asyncio.create_task(self._settle(), name="link-settle")
            gate_sock = self.gate.socket_path
            await self.qsd.execute("blockdev-add", r.nbd_client_gate(r.PEER_NODE, gate_sock))
            if kind == rs.FULL:
                await self.qsd.execute("blockdev-add", r.nbd_client_gate(r.SYNC_TARGET_NODE, gate_sock))
            elif kind in (rs.BITMAP, rs.CHECKSUM):
                await self.qsd.execute("blockdev-add", r.nbd_client_gate(r.SYNC_TARGET_NODE, gate_sock, COPY_EXPORT))
            # R2: the peer is a child of the quorum, so every new write goes to both sides,
            # before any region is copied
            self._counted = True
            self._in_quorum(+1)  # H13: before any write can complete from the peer alone
            # joined from the moment the command is sent: QEMU may carry it out although its
            # reply never arrives here (the caller cancelled): teardown asks QEMU's graph
            self._joined = True
            await self.qsd.execute("x-blockdev-change", {"parent": r.QUORUM_NODE, "node": r.PEER_NODE})
            self.child = await self._child_name()
        except PairvolError as exc:
            reason = self.gate.reason or str(exc)
            await self.teardown()
            raise PeerLinkError(f"cannot attach peer {self.address}: {reason}") from exc
        if kind != rs.NONE:
            self.syncing = True
            self.sync_kind, self.sync_reason = kind, why
            # a bitmap resync's total is what its job reports (the tracked bytes), once it runs
            self.sync_done, self.sync_total = 0, self.cfg.size if kind == rs.FULL else 0
            self.sync_started = time.monotonic()
            self.metrics.sync_total_bytes.labels(self.cfg.name).set(self.sync_total)
            self.metrics.sync_done_bytes.labels(self.cfg.name).set(0)
            self.metrics.sync_compared_bytes.labels(self.cfg.name).set(0)
            self.metrics.sync_progress.labels(self.cfg.name).set(0.0)
        if kind == rs.FULL:
            self.qsd.watch_job(r.SYNC_JOB)
            try:
                await self.qsd.execute("blockdev-mirror", r.mirror_full())
            except PairvolError as exc:
                self.qsd.unwatch_job(r.SYNC_JOB)
                await self.teardown()
                raise PeerLinkError(f"cannot start the full sync to {self.address}: {exc}") from exc
            crashpoints.hit(SYNC_STARTED)
            self._sync_task = asyncio.create_task(self._run_sync(), name="full-sync")
        log.info(
            "replicating to %s (export %s%s)", self.address, self.export, f", {kind} sync" if kind != rs.NONE else ""
        )

    async def _start_link(self) -> None:
        await self.link.start()
        host, port = self.peer
        tls = self.cfg.psk is not None
        try:
            if tls:
                assert self.cfg.psk is not None and self.tls_dir is not None
                await self.link.execute("object-add", r.tls_psk(self.tls_dir, "client", self.cfg.psk.username))
            # a blackholed peer makes the connect hang inside the link daemon: bounded here
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await self.link.execute("blockdev-add", r.nbd_client(r.LINK_EXPORT, host, port, self.export, tls))
            await self.link.execute("nbd-server-start", r.nbd_server_unix(self.gate.upstream_path))
            await self.link.execute("block-export-add", r.nbd_export(r.LINK_EXPORT, r.LINK_EXPORT))
        except TimeoutError as exc:
            raise PeerLinkError(
                f"cannot connect to peer {host}:{port}: no answer within {CONNECT_TIMEOUT:.0f} s"
            ) from exc
        except QemuError as exc:
            text = str(exc)
            if "export" in text.lower() and ("not" in text.lower() or "unknown" in text.lower()):
                text += (
                    f" — the peer has no export {self.export!r}: it is not a running secondary at that epoch "
                    "(pass peerEpoch = the epoch the secondary was started with)"
                    + (f" or its disk is not {self.peer_disk}" if self.peer_disk else "")
                )
                raise PeerRefusedExport(f"cannot connect to peer {host}:{port}: {text}") from exc
            raise PeerLinkError(f"cannot connect to peer {host}:{port}: {text}") from exc

    async def _child_name(self) -> str:
        """The quorum names children ``children.N`` and reuses numbers after deletions:
        ask QEMU which edge leads to the peer instead of counting."""
        graph = await self.qsd.execute("x-debug-query-block-graph")
        ids = {n["id"]: n["name"] for n in graph["nodes"]}
        for edge in graph["edges"]:
            if ids.get(edge["parent"]) == r.QUORUM_NODE and ids.get(edge["child"]) == r.PEER_NODE:
                return str(edge["name"])
        raise PeerLinkError("the peer node is not a child of the quorum after x-blockdev-change")

    # ------------------------------------------------------------------ failure

    async def _settle(self) -> None:
        """The only path that releases the gate: after the mark is durable, or once the
        workload export is fenced and no acknowledgement can reach a client."""
        await self.gate.failed.wait()
        reason = self.gate.reason or "link failed"
        crashpoints.hit(LINK_FAILED)
        # R1: the dirty bitmap exists before the first write can finish without the peer
        # (never raises; a bitmap that cannot be started is recorded as "resync in full")
        await self._track(reason, self.gate.flush_failed)
        crashpoints.hit(LINK_TRACKED)
        marked = asyncio.create_task(self._mark(reason), name="link-mark")
        fenced = asyncio.create_task(self._fenced.wait(), name="link-fenced")
        try:
            pending: set[asyncio.Future[Any]] = {marked, fenced}
            while True:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if fenced in done:
                    break
                if marked in done:
                    if marked.exception() is None:
                        break
                    log.error("cannot mark the secondary out of sync: %s; holding writes", marked.exception())
        finally:
            for task in (marked, fenced):
                if not task.done():
                    task.cancel()
        how = "marked out of sync" if marked.done() and not marked.cancelled() and not marked.exception() else "fenced"
        self.gate.release()
        self.released.set()
        crashpoints.hit(LINK_RELEASED)
        log.warning("peer %s dropped (%s first): %s", self.address, how, reason)
        self.down_reason = reason
        await self.link.kill()
        self.metrics.peer_failures.labels(self.cfg.name).inc()
        await self._on_down(self, reason)

    # ------------------------------------------------------------------ full sync

    async def _run_sync(self) -> None:
        """Follow the mirror; at READY every write reaches both sides synchronously, so the
        mirror is cancelled (no pivot) and the quorum carries on alone."""
        m, name = self.metrics, self.cfg.name
        last_log = 0.0
        try:
            while True:
                try:
                    event = await self.qsd.wait_job_event(
                        r.SYNC_JOB, {"BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"}, 0.5
                    )
                except TimeoutError:
                    for job in await self.qsd.execute("query-block-jobs"):
                        if job["device"] == r.SYNC_JOB:
                            self.sync_done, self.sync_total = int(job["offset"]), int(job["len"]) or 1
                    m.sync_done_bytes.labels(name).set(self.sync_done)
                    m.sync_total_bytes.labels(name).set(self.sync_total)
                    m.sync_progress.labels(name).set(self.sync_done / max(1, self.sync_total))
                    if time.monotonic() - last_log > 2:
                        last_log = time.monotonic()
                        log.info("full sync to %s: %s", self.address, self.sync_line())
                    continue
                if event["event"] == "BLOCK_JOB_READY":
                    break
                raise PeerLinkError(f"full sync failed: {event['data'].get('error', event['event'])}")
            crashpoints.hit(SYNC_READY)
            await self.qsd.execute("block-job-cancel", {"device": r.SYNC_JOB})
            event = await self.qsd.wait_job_event(r.SYNC_JOB, {"BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"}, 30)
            if "error" in event["data"]:
                raise PeerLinkError(f"full sync failed at the end: {event['data']['error']}")
            self.qsd.unwatch_job(r.SYNC_JOB)
            await self._delete_node(r.SYNC_TARGET_NODE)
            crashpoints.hit(SYNC_DONE)
            self.sync_done = self.sync_total
            await self._finish_sync()
        except asyncio.CancelledError:
            raise
        except PairvolError as exc:
            # the peer stays marked; failing the gate drops it through the one path
            self.gate.fail(str(exc))

    async def start_copy(self) -> None:
        """Start the bitmap resync's copy job, once the workload export exists: the job's
        copy-before-write filter takes over the quorum's parents and shares no WRITE on it,
        so an export added after it could not attach (R2: it must sit below the filter)."""
        if self._sync_task is not None:
            return
        if self.sync_kind == rs.CHECKSUM:
            # the comparison reads both disks whole: in the background, the export serves meanwhile
            self._sync_task = asyncio.create_task(self._run_checksum(), name="checksum-resync")
            return
        if self.sync_kind != rs.BITMAP:
            return
        await self._start_backup()
        self._sync_task = asyncio.create_task(self._run_resync(), name="bitmap-resync")

    async def _start_backup(self) -> None:
        self.qsd.watch_job(r.SYNC_JOB)
        try:
            await self.qsd.execute("blockdev-backup", r.backup_bitmap())
            crashpoints.hit(RESYNC_ISSUED)
            if not await self._poll_job():
                await self._take_total_of_an_ended_job()
        except PairvolError as exc:
            self.qsd.unwatch_job(r.SYNC_JOB)
            raise PeerLinkError(f"cannot start the {self.sync_kind} resync to {self.address}: {exc}") from exc
        crashpoints.hit(RESYNC_STARTED)
        log.info(
            "%s resync to %s: the copy started, %d bytes to copy (%s)",
            self.sync_kind, self.address, self.sync_total, self.sync_reason,
        )

    async def _run_checksum(self) -> None:
        """Checksum resync (docs/correctness.md, R4): the replica's ``compare`` turns the
        regions whose digests differ into bits of the tracking bitmap (running since before
        the peer joined), then the same backup job as a bitmap resync copies them."""
        crashpoints.hit(CHECKSUM_STARTED)
        try:
            assert self._compare is not None, "a checksum resync needs the replica's comparison"
            await self._compare(self)
            await self._start_backup()
        except asyncio.CancelledError:
            raise
        except PairvolError as exc:
            # the peer is marked out of sync: failing the gate drops it through the one path
            self.gate.fail(f"checksum resync failed: {exc}")
            return
        await self._run_resync()

    def compared(self, done: int, differing: int) -> None:
        """Progress of the comparison (bytes compared, bytes found to differ so far)."""
        self.compared_bytes = done
        self.metrics.sync_compared_bytes.labels(self.cfg.name).set(done)  # progress while nothing is copied yet
        if time.monotonic() - self._compare_logged > 2 or done >= self.cfg.size:
            self._compare_logged = time.monotonic()
            log.info(
                "checksum resync to %s: compared %d / %d MiB, %d MiB differ",
                self.address, done >> 20, self.cfg.size >> 20, differing >> 20,
            )

    async def _poll_job(self) -> bool:
        """The copy job's progress; False if the job is gone (it ended, its end event queued)."""
        found = False
        for job in await self.qsd.execute("query-block-jobs"):
            if job["device"] == r.SYNC_JOB:
                self.sync_done, self.sync_total = int(job["offset"]), int(job["len"])
                found = True
        m, name = self.metrics, self.cfg.name
        m.sync_done_bytes.labels(name).set(self.sync_done)
        m.sync_total_bytes.labels(name).set(self.sync_total)
        m.sync_progress.labels(name).set(self.sync_done / max(1, self.sync_total))
        return found

    async def _take_total_of_an_ended_job(self) -> None:
        """A small resync can end before its first poll: its total is in its end event, which
        QEMU sent before the answer that no longer lists the job. Read it, and queue the event
        again for :meth:`_run_resync`, which judges how the job ended."""
        ends = {"BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"}
        try:
            event = await self.qsd.wait_job_event(r.SYNC_JOB, ends, 5.0)
        except TimeoutError:
            log.warning("%s resync to %s: its copy job is gone without an end event", self.sync_kind, self.address)
            return
        if "len" in event["data"]:
            self.sync_total = int(event["data"]["len"])
            self.metrics.sync_total_bytes.labels(self.cfg.name).set(self.sync_total)
        self.qsd.watch_job(r.SYNC_JOB).put_nowait(event)

    async def _run_resync(self) -> None:
        """Follow the bitmap resync's backup job to its end; the peer is in sync once it
        finished without error and the gate never failed (``_in_sync`` checks the gate)."""
        last_log = 0.0
        try:
            while True:
                try:
                    event = await self.qsd.wait_job_event(
                        r.SYNC_JOB, {"BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"}, 0.5
                    )
                except TimeoutError:
                    await self._poll_job()
                    if time.monotonic() - last_log > 2:
                        last_log = time.monotonic()
                        log.info("%s resync to %s: %s", self.sync_kind, self.address, self.sync_line())
                    continue
                break
            data = event["data"]
            if event["event"] == "BLOCK_JOB_CANCELLED" or "error" in data:
                raise PeerLinkError(f"{self.sync_kind} resync failed: {data.get('error', 'cancelled')}")
            self.sync_done = self.sync_total = int(data.get("len", self.sync_total))
            self.qsd.unwatch_job(r.SYNC_JOB)
            await self._delete_node(r.SYNC_TARGET_NODE)
            crashpoints.hit(RESYNC_COPIED)
            await self._finish_sync()
        except asyncio.CancelledError:
            raise
        except PairvolError as exc:
            self.gate.fail(str(exc))

    async def _finish_sync(self) -> None:
        m, name = self.metrics, self.cfg.name
        m.sync_total_bytes.labels(name).set(self.sync_total)
        m.sync_done_bytes.labels(name).set(self.sync_done)
        m.sync_progress.labels(name).set(1.0)
        seconds = time.monotonic() - self.sync_started
        # what the replica reports once it declared the peer in sync
        self.last_sync = {
            "kind": self.sync_kind,
            "reason": self.sync_reason,
            "copiedBytes": self.sync_total,
            "seconds": round(seconds, 3),
        }
        if await self._in_sync(self):
            self.syncing = False
            self.gate.serve_reads = True
            log.info(
                "%s sync to %s done: %d bytes in %.2f s; replicating synchronously",
                self.sync_kind, self.address, self.sync_total, seconds,
            )

    def sync_line(self) -> str:
        pct = 100.0 * self.sync_done / max(1, self.sync_total)
        rate = self.sync_done / max(1e-3, time.monotonic() - self.sync_started)
        to_go = max(0, self.sync_total - self.sync_done)
        return (
            f"{self.sync_done >> 20} / {self.sync_total >> 20} MiB ({pct:.1f}%), "
            f"{to_go >> 20} MiB to go at {rate / (1 << 20):.0f} MiB/s"
        )

    # ------------------------------------------------------------------ teardown

    async def detach(self) -> None:
        """Leave the quorum and tear everything down. A failed, unreleased gate is waited
        for first (the mark or the fence), so no held write is answered without it."""
        await cancel_and_wait(self._sync_task)
        if self.gate.failed.is_set() and self._settle_task is not None:
            await self.released.wait()
        await self.teardown()

    async def teardown(self) -> None:
        t0 = time.monotonic()
        with contextlib.suppress(QemuError):
            await self.qsd.execute("block-job-cancel", {"device": r.SYNC_JOB, "force": True})
        self.qsd.unwatch_job(r.SYNC_JOB)
        removed = not self._joined
        if self.child is None and self._joined:
            # the add was sent but its child's name never learnt: QEMU's graph says (H13)
            try:
                self.child = await self._child_name()
            except PeerLinkError:
                removed = True  # no such edge: the peer is not a child
            except QemuError:
                pass  # unknown: it stays counted as a child
        if self.child is not None:
            try:
                await self.qsd.execute("x-blockdev-change", {"parent": r.QUORUM_NODE, "child": self.child})
                removed = True
                self._joined = False  # a later teardown must not find another link's child
            except QemuError:
                pass
            self.child = None
        if self._counted and removed:
            # H13: every event QEMU sent while the peer was a child is handled before the
            # count drops; if the handlers do not get there in time, it stays up (the safe side)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(EVENT_BARRIER_TIMEOUT_S):
                    await self.qsd.event_barrier()
                    self._counted = False
                    self._in_quorum(-1)
        for node in (r.PEER_NODE, r.SYNC_TARGET_NODE):
            await self._delete_node(node)
        await cancel_and_wait(self._settle_task)
        await self.gate.close()
        await self.link.kill()
        log.debug("link to %s torn down in %.0f ms", self.address, (time.monotonic() - t0) * 1000)

    async def _delete_node(self, node: str) -> None:
        for _ in range(50):  # a cancelled job lets go of its target asynchronously
            try:
                await self.qsd.execute("blockdev-del", {"node-name": node})
                return
            except QemuError as exc:
                if r.node_is_gone(exc):
                    return
                await asyncio.sleep(0.02)
