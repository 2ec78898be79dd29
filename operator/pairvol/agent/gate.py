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
accepts), and forwards every transmission-phase request as it is. It is on the data path,
so both directions are asyncio protocols with back-pressure between the two sides. Requests
are read into a buffer of the gate's own (``BufferedProtocol``) and passed on *cut-through*:
a write's payload goes to the link daemon as it arrives, straight from that buffer, without
waiting for the rest of it and without a copy in Python (issue 11: copying each 1 MiB write
three times, after waiting for all of it, made the gate the busiest process of a sequential
write). A request counts as in flight (``pending``) once all of it has been passed on: the
link daemon cannot answer before that, and nothing answers the quorum about a request it is
still sending.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pairvol import nbd
from pairvol.aio import cancel_and_wait
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
SERVED_EXPORT = "peer"
# The bitmap resync's copy job connects under this name. Its writes are forwarded like any
# other while the gate is healthy; once the gate has failed they are answered with success,
# not EIO, because QEMU 7.2's backup job fails the *workload* write that waits for a
# region's copy when that copy fails (copy-before-write's on-cbw-error is not settable for
# a backup job before 10.1). Nothing trusts those answers: a gate that failed never lets
# its link be declared in sync, and the dirty bitmap keeps every bit (docs/correctness.md, R2).
COPY_EXPORT = "copy"
_COMMANDS = {0: "read", 1: "write", 3: "flush", 4: "trim", 5: "cache", 6: "write-zeroes"}


class GateError(PairvolError):
    """The gate could not start or reach the link daemon."""


@dataclass
class _Request:
    cmd: int
    length: int
    offset: int
    sent_at: float


class _Upstream(asyncio.Protocol):
    """The link daemon's side of one connection: replies."""

    def __init__(self, down: _Downstream) -> None:
        self.down = down
        self.transport: asyncio.Transport | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.down.on_replies(self.buf)

    def connection_lost(self, exc: Exception | None) -> None:
        self.down.on_upstream_lost(exc)

    def pause_writing(self) -> None:  # the link daemon is not reading: stop reading the quorum
        self.down.pause_reading()

    def resume_writing(self) -> None:
        self.down.resume_reading()


# what one read from the quorum's socket may bring; a buffer lent to the link daemon's
# transport (see _Downstream._lent) is replaced by a new one of this size
READ_BUFFER = 1 << 20
# payload pieces at least this long are passed on as views of the read buffer; shorter
# ones are copied into one write with the headers around them (one send for small requests)
ZERO_COPY_MIN = 64 << 10
_HEADER = nbd.REQUEST_HEADER.size


class _Downstream(asyncio.BufferedProtocol):
    """One connection from the quorum's NBD client, and its twin to the link daemon."""

    def __init__(self, gate: LinkGate) -> None:
        self.gate = gate
        self.transport: asyncio.Transport | None = None
        self.up: _Upstream | None = None
        self.buf = bytearray()  # the negotiation's bytes
        self.pending: dict[int, _Request] = {}
        self.state = "connecting"  # -> flags -> options -> transmission -> ended
        self.info: nbd.ExportInfo | None = None
        self.client_flags = 0
        self.copy = False  # the bitmap resync's copy connection (COPY_EXPORT)
        self._paused = False
        self._rbuf = bytearray(READ_BUFFER)
        self._header = bytearray()  # a request header split across two reads
        self._current: _Request | None = None  # the write whose payload is arriving
        self._handle = 0  # ... its handle
        self._left = 0  # ... and how much of it is still to come
        self._passing = False  # ... and whether it goes to the link daemon

    # -------------------------------------------------------------- plumbing

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        _big_buffers(transport)
        transport.pause_reading()  # nothing to say before the link daemon answers
        self.gate.conns.add(self)
        self.gate.spawn(self._open_upstream(), "gate-connect")

    async def _open_upstream(self) -> None:
        assert self.transport is not None
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.gate.upstream_path))
            self.info = await nbd.client_handshake(reader, writer, self.gate.upstream_export)
        except (OSError, nbd.NBDError) as exc:
            self.gate.fail(f"cannot reach the link daemon: {exc}")
            self.transport.abort()
            return
        # the server says nothing unprompted after the handshake: nothing is left buffered
        _big_buffers(writer.transport)
        self.up = _Upstream(self)
        self.up.transport = writer.transport  # type: ignore[assignment]
        self.up.writer = writer  # a StreamWriter closes its transport when collected
        writer.transport.set_protocol(self.up)
        if self.gate.failed.is_set():
            self.cut()  # a connection after the failure is held like the rest
        self.transport.write(
            struct.pack(">QQH", nbd.NBDMAGIC, nbd.IHAVEOPT, nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES)
        )
        self.state = "flags"
        self.transport.resume_reading()

    def cut(self) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.abort()
        self.resume_reading()  # held requests must still be read, and answered on release

    def pause_reading(self) -> None:
        if self.transport is not None and not self._paused and not self.gate.failed.is_set():
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self._paused:
            self._paused = False
            self.transport.resume_reading()

    def pause_writing(self) -> None:  # the quorum is not reading replies: stop reading the link
        if self.up is not None and self.up.transport is not None:
            self.up.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None and self.up.transport is not None and not self.up.transport.is_closing():
            self.up.transport.resume_reading()

    def after_release(self, cmd: int) -> int:
        """The answer to a request of this connection once the gate is released: EIO,
        except a copy connection's writes (COPY_EXPORT: success, trusted by nobody)."""
        return 0 if self.copy and self.gate.released and cmd != nbd.CMD_READ else errno.EIO

    def answer(self, handle: int, error: int) -> None:
        assert self.transport is not None
        self.transport.write(nbd.SIMPLE_REPLY.pack(nbd.SIMPLE_REPLY_MAGIC, error, handle))

    def connection_lost(self, exc: Exception | None) -> None:
        ended_cleanly = self.state == "ended"
        self.state = "ended"
        self.gate.conns.discard(self)
        if self.pending and not self.gate.released and not ended_cleanly:
            self.gate.fail("the local daemon disconnected from the link with requests in flight")
        if self.up is not None and self.up.transport is not None:
            self.up.transport.abort()

    def on_upstream_lost(self, exc: Exception | None) -> None:
        if self.state != "ended" and not self.gate.closing:
            self.gate.fail(f"link to the peer lost: connection closed ({exc.__class__.__name__ if exc else 'EOF'})")

    # -------------------------------------------------------------- the quorum's side

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._rbuf)

    def buffer_updated(self, nbytes: int) -> None:
        data = memoryview(self._rbuf)[:nbytes]
        try:
            if self.state in ("flags", "options"):
                self.buf += data
                self._negotiate()
                if self.state == "transmission" and self.buf:
                    data, self.buf = memoryview(bytes(self.buf)), bytearray()
                else:
                    data = data[:0]
            if self.state == "transmission" and data:
                self._requests(data)
        except _ProtocolError as exc:
            self.gate.fail(f"NBD protocol error from the local daemon: {exc}")
            self.state = "ended"
            assert self.transport is not None
            self.transport.abort()

    def _negotiate(self) -> None:
        assert self.transport is not None and self.info is not None
        buf, w = self.buf, self.transport.write
        flags = self.info.flags & _FORWARDABLE_FLAGS
        if self.state == "flags":
            if len(buf) < 4:
                return
            (self.client_flags,) = struct.unpack_from(">I", buf)
            del buf[:4]
            self.state = "options"
        while len(buf) >= _OPTION_HEADER.size:
            magic, opt, length = _OPTION_HEADER.unpack_from(buf)
            if magic != nbd.IHAVEOPT or length > 1 << 16:
                raise _ProtocolError(f"bad option header (magic {magic:#x}, length {length})")
            if len(buf) < _OPTION_HEADER.size + length:
                return
            data = bytes(buf[_OPTION_HEADER.size : _OPTION_HEADER.size + length])
            del buf[: _OPTION_HEADER.size + length]
            if opt == OPT_EXPORT_NAME:
                self.copy = data.decode(errors="replace") == COPY_EXPORT
                w(struct.pack(">QH", self.info.size, flags))
                if not self.client_flags & nbd.FLAG_NO_ZEROES:
                    w(bytes(124))
                self.state = "transmission"
                return
            if opt in (OPT_GO, OPT_INFO):
                (name_len,) = struct.unpack_from(">I", data)
                name = data[4 : 4 + name_len].decode(errors="replace")
                if name not in ("", SERVED_EXPORT, COPY_EXPORT):
                    text = f"the gate serves export {SERVED_EXPORT!r}, not {name!r}".encode()
                    w(_OPTION_REPLY.pack(nbd.OPT_REPLY_MAGIC, opt, REP_ERR_UNKNOWN, len(text)) + text)
                    continue
                self.copy = name == COPY_EXPORT
                export_info = struct.pack(">HQH", nbd.INFO_EXPORT, self.info.size, flags)
                w(_OPTION_REPLY.pack(nbd.OPT_REPLY_MAGIC, opt, nbd.REP_INFO, len(export_info)) + export_info)
                w(_OPTION_REPLY.pack(nbd.OPT_REPLY_MAGIC, opt, nbd.REP_ACK, 0))
                if opt == OPT_GO:
                    self.state = "transmission"
                    return
                continue
            if opt == OPT_ABORT:
                w(_OPTION_REPLY.pack(nbd.OPT_REPLY_MAGIC, opt, nbd.REP_ACK, 0))
                self.state = "ended"
                self.transport.close()
                return
            # structured replies, extended headers, meta contexts, TLS, lists: declined
            w(_OPTION_REPLY.pack(nbd.OPT_REPLY_MAGIC, opt, REP_ERR_UNSUP, 0))

    def _requests(self, data: memoryview) -> None:
        """Parse the requests in ``data`` (and the one whose payload is arriving) and pass on
        what goes to the link daemon, cut-through; answer here what the gate answers itself."""
        gate = self.gate
        up = self.up.transport if self.up is not None else None
        out = bytearray()  # headers and short payloads, sent in one write
        views: list[bytes | bytearray | memoryview] = []  # the writes, in order
        sent = 0
        pos, end = 0, len(data)
        while pos < end and self.state == "transmission":
            if self._left:
                take = min(self._left, end - pos)
                if self._passing and not gate.failed.is_set():
                    piece = data[pos : pos + take]
                    if take >= ZERO_COPY_MIN:
                        if out:
                            views.append(out)
                            out = bytearray()
                        views.append(piece)
                    else:
                        out += piece
                    sent += take
                pos += take
                self._left -= take
                if not self._left:
                    assert self._current is not None
                    self._complete(self._handle, self._current)
                    self._current = None
                continue
            if self._header or end - pos < _HEADER:
                need = _HEADER - len(self._header)
                self._header += data[pos : pos + need]
                pos += min(need, end - pos)
                if len(self._header) < _HEADER:
                    break
                header: bytes | bytearray | memoryview = bytes(self._header)
                self._header.clear()
            else:
                header = data[pos : pos + _HEADER]
                pos += _HEADER
            magic, _flags, cmd, handle, offset, length = nbd.REQUEST_HEADER.unpack(header)
            if magic != nbd.REQUEST_MAGIC:
                raise _ProtocolError(f"bad request magic {magic:#x}")
            if cmd == nbd.CMD_DISC:
                self.state = "ended"
                if not gate.failed.is_set():
                    out += header
                break
            local = gate.released or (cmd == nbd.CMD_READ and not gate.serve_reads)
            passing = not local and not gate.failed.is_set()
            if passing:
                out += header
            req = _Request(cmd, length, offset, asyncio.get_running_loop().time())
            if cmd == nbd.CMD_WRITE and length:
                self._current, self._handle, self._left, self._passing = req, handle, length, passing
            else:
                self._complete(handle, req)
        if out:
            views.append(out)
        if views and up is not None and not gate.failed.is_set():
            for chunk in views:
                up.write(chunk)
            if up.get_write_buffer_size() and any(isinstance(v, memoryview) for v in views):
                # the transport may keep a view of the read buffer (Python >= 3.12 does not
                # copy what it could not send at once): read the next bytes into a new one
                self._rbuf = bytearray(READ_BUFFER)
            if sent:
                gate.count_sent(sent)

    def _complete(self, handle: int, req: _Request) -> None:
        """All of a request has been read (and passed on, unless held): from now on it is in
        flight, or it is answered here at once."""
        gate = self.gate
        if gate.released or (req.cmd == nbd.CMD_READ and not gate.serve_reads):
            self.answer(handle, self.after_release(req.cmd))
        else:
            self.pending[handle] = req  # held until release() if the gate has failed

    # -------------------------------------------------------------- the link's side

    def on_replies(self, buf: bytearray) -> None:
        gate = self.gate
        if gate.failed.is_set():
            buf.clear()  # release() answers everything
            return
        out: list[tuple[int, bytes]] = []
        pos = 0
        size = nbd.SIMPLE_REPLY.size
        while len(buf) - pos >= size:
            magic, error, handle = nbd.SIMPLE_REPLY.unpack_from(buf, pos)
            if magic != nbd.SIMPLE_REPLY_MAGIC:
                gate.fail(f"bad reply magic {magic:#x} from the link daemon")
                break
            req = self.pending.get(handle)
            if req is None:
                gate.fail(f"the link daemon answered unknown request {handle:#x}")
                break
            end = pos + size + (req.length if req.cmd == nbd.CMD_READ and not error else 0)
            if len(buf) < end:
                break
            if error:
                if req.cmd == nbd.CMD_FLUSH:
                    # what the peer acknowledged before may not be on its disk (a failed
                    # writeback is reported at the flush): no bitmap can vouch for it (R3)
                    gate.flush_failed = True
                what = _COMMANDS.get(req.cmd, f"command {req.cmd}")
                gate.fail(
                    f"a {what} of {req.length} bytes at offset {req.offset} failed on the link "
                    f"({errno.errorcode.get(error, str(error))}): the peer answered with an error "
                    "or the connection to it was lost"
                )
                break
            out.append((handle, bytes(buf[pos:end])))
            pos = end
        if gate.failed.is_set():
            buf.clear()
            return  # not even the successful replies parsed with the failure: release() answers them
        del buf[:pos]
        for handle, _ in out:
            del self.pending[handle]
        if out and self.transport is not None:
            self.transport.writelines([reply for _, reply in out])


class _ProtocolError(Exception):
    pass


SOCKET_BUFFER = 4 << 20


def _big_buffers(transport: asyncio.BaseTransport) -> None:
    """A 1 MiB write should cross each local socket in one go, not in 200 KiB steps."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    if isinstance(transport, asyncio.WriteTransport):
        transport.set_write_buffer_limits(high=4 * SOCKET_BUFFER)


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
        self.flush_failed = False  # a FLUSH came back with an error (storage or connection)
        self.closing = False
        self.conns: set[_Downstream] = set()
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await asyncio.to_thread(lambda: self.socket_path.unlink(missing_ok=True))
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Downstream(self), str(self.socket_path))
        self.spawn(self._watch_stalls(), "gate-stall-watch")

    async def close(self) -> None:
        """Stop the gate. Held requests are answered with EIO only if it was released."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.conns):
            conn.cut()
            if conn.transport is not None:
                conn.transport.abort()
        await cancel_and_wait(*self._tasks)
        await asyncio.to_thread(lambda: self.socket_path.unlink(missing_ok=True))

    def spawn(self, coro: Any, name: str) -> None:
        task: asyncio.Task[Any] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ the one-way door

    def fail(self, reason: str) -> None:
        """Close the gate (idempotent): cut the link, forward nothing, hold everything."""
        if self.failed.is_set() or self.closing:
            return
        self.reason = reason
        self.failed.set()
        log.warning(
            "replication link failed: %s; holding %d request(s) until the peer is marked", reason, self.held
        )
        for conn in list(self.conns):
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
        for conn in list(self.conns):
            for handle, req in list(conn.pending.items()):
                conn.answer(handle, conn.after_release(req.cmd))
                answered += 1
            conn.pending.clear()
        log.info("replication link released: %d held request(s) answered with EIO", answered)

    @property
    def held(self) -> int:
        return sum(len(c.pending) for c in self.conns) if self.failed.is_set() else 0

    def oldest_age(self, now: float) -> float:
        ages = [now - req.sent_at for c in self.conns for req in c.pending.values()]
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
