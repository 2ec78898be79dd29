"""The gate on the replication link: no reply reaches the quorum after the peer failed,
until the peer is durably marked OutOfSync or the workload export is fenced.

QEMU's quorum with vote-threshold 1 completes a workload write as soon as the local disk
has it once the peer child has answered, *whatever* the peer answered: an error reply
(ENOSPC in the secondary's undo log, EIO), or the NBD client failing the request after a
lost connection, turns into an acknowledgement without the peer at once. The agent's
OutOfSync mark, reacting to QEMU's ``QUORUM_REPORT_BAD`` event, necessarily comes after
that acknowledgement, and QEMU's NBD client has no I/O timeout, so a silent partition
holds every write forever. Neither can be fixed by reacting faster. The gate makes the
order structural instead, by standing where the peer's answers pass::

    quorum ─► "peer" (nbd client, unix) ─► LinkGate ─► link daemon (nbd client, TLS-PSK) ─► secondary

While the link is healthy the gate forwards requests and replies unchanged. The first sign
of trouble — an error reply, a lost connection, a request unanswered for the stall
timeout — *closes* it: the link is cut, no reply of any kind goes to the quorum from then
on, and requests that arrive are held. The only way out is :meth:`LinkGate.release`, which
answers every held request with EIO; the quorum then completes those writes from the local
disk. The owner (:class:`pairvol.agent.peerlink.PeerLink`) calls ``release`` only once the
mark is durable or the export is fenced, so an acknowledgement without the peer is always
preceded by one of the two. Cutting the link is killing a child process, which needs no
capability (the old watchdog needed CAP_NET_ADMIN for ``ss -K``).

The gate speaks just enough NBD: fixed newstyle, ``NBD_OPT_GO``/``INFO``/``EXPORT_NAME``,
simple replies (structured replies and extended headers are declined, which QEMU's client
accepts), and forwards every transmission-phase request as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pairvol import nbd
from pairvol.errors import PairvolError

log = logging.getLogger(__name__)

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_INFO = 6
OPT_GO = 7
REP_ERR_UNSUP = nbd.REP_ERR_BIT | 1
REP_ERR_UNKNOWN = nbd.REP_ERR_BIT | 6
# transmission flags the gate can forward: everything but those that need structured
# replies or extended headers (DF, RESIZE, BLOCK_STAT_PAYLOAD)
_FORWARDABLE_FLAGS = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x20 | 0x40 | 0x100 | 0x400 | 0x800
_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_COMMANDS = {0: "read", 1: "write", 3: "flush", 4: "trim", 5: "cache", 6: "write-zeroes"}


class GateError(PairvolError):
    """The gate could not start or reach the link daemon."""


@dataclass
class _Request:
    cmd: int
    length: int
    offset: int
    sent_at: float


@dataclass(eq=False)
class _Connection:
    """One connection from the quorum's NBD client, and its twin to the link daemon."""

    down_w: asyncio.StreamWriter
    up_w: asyncio.StreamWriter | None
    pending: dict[int, _Request] = field(default_factory=dict)
    ended: bool = False  # the quorum's client disconnected: the link's EOF is expected

    def answer(self, handle: int, error: int, data: bytes = b"") -> None:
        # one write() per reply: replies from the two loops never interleave
        self.down_w.write(nbd.SIMPLE_REPLY.pack(nbd.SIMPLE_REPLY_MAGIC, error, handle) + data)

    def cut(self) -> None:
        if self.up_w is not None:
            self.up_w.transport.abort()


class LinkGate:
    """An NBD relay on ``socket_path`` to ``upstream_export`` on the link daemon's socket."""

    def __init__(
        self,
        socket_path: Path,
        upstream_path: Path,
        upstream_export: str,
        stall_after: float,
        count_sent: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.socket_path = socket_path
        self.upstream_path = upstream_path
        self.upstream_export = upstream_export
        self.stall_after = stall_after
        self.count_sent = count_sent
        self.failed = asyncio.Event()
        self.reason: str | None = None
        self.released = False
        # Quorum (read-pattern fifo) reads from the peer only when the local disk failed a
        # read; a peer that is still being synced would answer with stale data.
        self.serve_reads = True
        self._conns: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await asyncio.to_thread(lambda: self.socket_path.unlink(missing_ok=True))
        self._server = await asyncio.start_unix_server(self._serve, str(self.socket_path), limit=1 << 26)
        self._spawn(self._watch_stalls(), "gate-stall-watch")

    async def close(self) -> None:
        """Stop the gate. Held requests are answered with EIO only if it was released."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.cut()
            conn.down_w.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        await asyncio.to_thread(lambda: self.socket_path.unlink(missing_ok=True))

    def _spawn(self, coro: object, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ the one-way door

    def fail(self, reason: str) -> None:
        """Close the gate (idempotent): cut the link, forward nothing, hold everything."""
        if self.failed.is_set() or self._closing:
            return
        self.reason = reason
        self.failed.set()
        held = sum(len(c.pending) for c in self._conns)
        log.warning("replication link failed: %s; holding %d request(s) until the peer is marked", reason, held)
        for conn in self._conns:
            conn.cut()

    def release(self) -> None:
        """Answer every held request with EIO, and every later one at once.

        Call only when an acknowledgement without the peer is allowed: the peer is durably
        marked OutOfSync, or the workload export is fenced."""
        if not self.failed.is_set():
            raise GateError("release() of a gate that has not failed")
        if self.released:
            return
        self.released = True
        answered = 0
        for conn in self._conns:
            for handle in list(conn.pending):
                conn.answer(handle, errno.EIO)
                answered += 1
            conn.pending.clear()
        log.info("replication link released: %d held request(s) answered with EIO", answered)

    @property
    def held(self) -> int:
        return sum(len(c.pending) for c in self._conns) if self.failed.is_set() else 0

    def oldest_age(self, now: float) -> float:
        ages = [now - req.sent_at for c in self._conns for req in c.pending.values()]
        return max(ages, default=0.0)

    async def _watch_stalls(self) -> None:
        loop = asyncio.get_running_loop()
        interval = min(0.1, self.stall_after / 5)
        while not self.failed.is_set():
            age = self.oldest_age(loop.time())
            if age > self.stall_after:
                self.fail(f"the peer did not answer a request for {age:.1f} s (stalled link or hung daemon)")
                return
            await asyncio.sleep(interval)

    # ------------------------------------------------------------------ one connection

    async def _serve(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        conn: _Connection | None = None
        try:
            try:
                up_r, up_w = await asyncio.open_unix_connection(str(self.upstream_path), limit=1 << 26)
                info = await nbd.client_handshake(up_r, up_w, self.upstream_export)
            except (OSError, nbd.NBDError) as exc:
                self.fail(f"cannot reach the link daemon: {exc}")
                return
            conn = _Connection(down_w, up_w)
            if self.failed.is_set():  # a new connection after failure is held like the rest
                conn.cut()
            if not await self._handshake(down_r, down_w, info):
                conn.cut()
                return
            self._conns.add(conn)
            self._spawn(self._replies(conn, up_r), "gate-replies")
            await self._requests(conn, down_r)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the quorum's client went away (blockdev-del, daemon exit)
        finally:
            if conn is not None:
                conn.ended = True
                if conn.pending and not self.released:
                    self.fail("the local daemon disconnected from the link with requests in flight")
                self._conns.discard(conn)
                conn.cut()
            down_w.transport.abort()

    async def _handshake(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, info: nbd.ExportInfo) -> bool:
        """Server side of fixed-newstyle negotiation; True once in transmission."""
        w.write(struct.pack(">QQH", nbd.NBDMAGIC, nbd.IHAVEOPT, nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES))
        (client_flags,) = struct.unpack(">I", await r.readexactly(4))
        flags = info.flags & _FORWARDABLE_FLAGS
        while True:
            magic, opt, length = _OPTION_HEADER.unpack(await r.readexactly(_OPTION_HEADER.size))
            if magic != nbd.IHAVEOPT or length > 1 << 16:
                return False
            data = await r.readexactly(length) if length else b""
            if opt == OPT_EXPORT_NAME:
                w.write(struct.pack(">QH", info.size, flags))
                if not client_flags & nbd.FLAG_NO_ZEROES:
                    w.write(bytes(124))
                return True
            if opt in (OPT_GO, OPT_INFO):
                (name_len,) = struct.unpack(">I", data[:4])
                name = data[4 : 4 + name_len].decode(errors="replace")
                if name not in ("", "peer"):
                    text = f"the gate serves export 'peer', not {name!r}".encode()
                    w.write(_OPTION_REPLY.pack(nbd.OPT_REPLY_MAGIC, opt, REP_ERR_UNKNOWN, len(text)) + text)
                    continue
                export_info = struct.pack(">HQH", nbd.INFO_EXPORT, info.size, flags)
                w.write(_OPTION_REPLY.pack(nbd.OPT_REPLY_MAGIC, opt, nbd.REP_INFO, len(export_info)) + export_info)
                w.write(_OPTION_REPLY.pack(nbd.OPT_REPLY_MAGIC, opt, nbd.REP_ACK, 0))
                await w.drain()
                if opt == OPT_GO:
                    return True
                continue
            if opt == OPT_ABORT:
                w.write(_OPTION_REPLY.pack(nbd.OPT_REPLY_MAGIC, opt, nbd.REP_ACK, 0))
                await w.drain()
                return False
            # structured replies, extended headers, meta contexts, TLS, lists: declined
            w.write(_OPTION_REPLY.pack(nbd.OPT_REPLY_MAGIC, opt, REP_ERR_UNSUP, 0))
            await w.drain()

    async def _requests(self, conn: _Connection, r: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        while True:
            header = await r.readexactly(nbd.REQUEST_HEADER.size)
            magic, _flags, cmd, handle, offset, length = nbd.REQUEST_HEADER.unpack(header)
            if magic != nbd.REQUEST_MAGIC:
                self.fail(f"bad request magic {magic:#x} from the local daemon")
                return
            payload = await r.readexactly(length) if cmd == nbd.CMD_WRITE and length else b""
            if cmd == nbd.CMD_DISC:
                conn.ended = True
                if not self.failed.is_set() and conn.up_w is not None:
                    conn.up_w.write(header)
                    with contextlib.suppress(ConnectionError):
                        await conn.up_w.drain()
                return
            if self.released or (cmd == nbd.CMD_READ and not self.serve_reads):
                conn.answer(handle, errno.EIO)
                continue
            conn.pending[handle] = _Request(cmd, length, offset, loop.time())
            if self.failed.is_set() or conn.up_w is None:
                continue  # held until release()
            conn.up_w.write(header + payload)
            if payload:
                self.count_sent(len(payload))
            try:
                await conn.up_w.drain()
            except ConnectionError as exc:
                self.fail(f"link to the peer lost while sending: {exc}")

    async def _replies(self, conn: _Connection, r: asyncio.StreamReader) -> None:
        try:
            while True:
                magic, error, handle = nbd.SIMPLE_REPLY.unpack(await r.readexactly(nbd.SIMPLE_REPLY.size))
                if magic != nbd.SIMPLE_REPLY_MAGIC:
                    self.fail(f"bad reply magic {magic:#x} from the link daemon")
                    return
                req = conn.pending.get(handle)
                if req is None:
                    self.fail(f"the link daemon answered unknown request {handle:#x}")
                    return
                data = await r.readexactly(req.length) if req.cmd == nbd.CMD_READ and not error else b""
                if self.failed.is_set():
                    return  # release() answers it
                if error:
                    what = _COMMANDS.get(req.cmd, f"command {req.cmd}")
                    self.fail(
                        f"a {what} of {req.length} bytes at offset {req.offset} failed on the link "
                        f"({errno.errorcode.get(error, str(error))}): the peer answered with an error "
                        "or the connection to it was lost"
                    )
                    return
                del conn.pending[handle]
                conn.answer(handle, 0, data)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            if not self._closing and not conn.ended:
                self.fail(f"link to the peer lost: connection closed ({exc.__class__.__name__})")
