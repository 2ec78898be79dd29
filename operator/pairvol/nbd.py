"""A small asyncio NBD client: what tests, the demo and the write-log verifier need.

Workloads use the kernel, qemu or libnbd; pairvol itself only needs to write known data
and read it back, with many requests in flight, without a C binding in the virtualenv.
It speaks fixed-newstyle negotiation with ``NBD_OPT_GO`` and simple replies, over a unix
socket or plain TCP (TLS-PSK exports are for qemu/libnbd clients: Python's ``ssl`` has no
PSK before 3.13).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import struct
from dataclasses import dataclass

from pairvol.aio import cancel_and_wait
from pairvol.errors import PairvolError

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
INFO_EXPORT = 0
REP_ERR_BIT = 1 << 31

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_WRITE_ZEROES = 6
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
FLAG_SEND_WRITE_ZEROES = 1 << 6

REQUEST_HEADER = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")


class NBDError(PairvolError):
    """The NBD server refused the connection or failed a request."""


@dataclass(frozen=True)
class ExportInfo:
    size: int
    flags: int

    @property
    def read_only(self) -> bool:
        return bool(self.flags & (1 << 1))


class NBDClient:
    """One connection to one export. Requests may be issued concurrently."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, info: ExportInfo):
        self._reader = reader
        self._writer = writer
        self.info = info
        self._handles = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future[bytes], int]] = {}
        self._send_lock = asyncio.Lock()
        self._reply_task = asyncio.create_task(self._read_replies())
        self._closed_error: BaseException | None = None

    @property
    def size(self) -> int:
        return self.info.size

    @classmethod
    async def connect_unix(cls, path: str, export: str = "volume") -> NBDClient:
        try:
            reader, writer = await asyncio.open_unix_connection(path, limit=1 << 24)
        except OSError as exc:
            raise NBDError(f"cannot connect to NBD socket {path}: {exc}") from exc
        return await cls._handshake(reader, writer, export)

    @classmethod
    async def connect_tcp(cls, host: str, port: int, export: str = "volume") -> NBDClient:
        try:
            reader, writer = await asyncio.open_connection(host, port, limit=1 << 24)
        except OSError as exc:
            raise NBDError(f"cannot connect to NBD server {host}:{port}: {exc}") from exc
        return await cls._handshake(reader, writer, export)

    @classmethod
    async def _handshake(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, export: str) -> NBDClient:
        return cls(reader, writer, await client_handshake(reader, writer, export))

    async def _read_replies(self) -> None:
        try:
            while True:
                magic, error, handle = SIMPLE_REPLY.unpack(await self._reader.readexactly(SIMPLE_REPLY.size))
                if magic != SIMPLE_REPLY_MAGIC:
                    raise NBDError(f"bad reply magic {magic:#x}")
                fut, read_len = self._pending.pop(handle)
                data = await self._reader.readexactly(read_len) if read_len and not error else b""
                if not fut.done():
                    if error:
                        fut.set_exception(NBDError(f"request failed with errno {error}"))
                    else:
                        fut.set_result(data)
        except (asyncio.IncompleteReadError, ConnectionError, NBDError, KeyError) as exc:
            self._closed_error = exc
            for fut, _ in self._pending.values():
                if not fut.done():
                    fut.set_exception(NBDError(f"NBD connection lost: {exc!r}"))
            self._pending.clear()

    async def _request(self, cmd: int, offset: int, length: int, payload: bytes = b"", flags: int = 0) -> bytes:
        if self._closed_error is not None:
            raise NBDError(f"NBD connection lost: {self._closed_error!r}")
        handle = next(self._handles)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[handle] = (fut, length if cmd == CMD_READ else 0)
        try:
            async with self._send_lock:
                self._writer.write(REQUEST_HEADER.pack(REQUEST_MAGIC, flags, cmd, handle, offset, length) + payload)
                await self._writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            self._pending.pop(handle, None)
            fut.cancel()
            raise NBDError(f"NBD connection lost: {exc!r}") from exc
        return await fut

    async def pwrite(self, data: bytes, offset: int, fua: bool = False) -> None:
        await self._request(CMD_WRITE, offset, len(data), data, CMD_FLAG_FUA if fua else 0)

    async def pread(self, length: int, offset: int) -> bytes:
        return await self._request(CMD_READ, offset, length)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = True) -> None:
        """NBD_CMD_WRITE_ZEROES (what filesystems and mkfs send); NO_HOLE unless may_unmap."""
        if not self.info.flags & FLAG_SEND_WRITE_ZEROES:
            raise NBDError("the export does not accept NBD_CMD_WRITE_ZEROES")
        await self._request(CMD_WRITE_ZEROES, offset, length, b"", 0 if may_unmap else CMD_FLAG_NO_HOLE)

    async def flush(self) -> None:
        await self._request(CMD_FLUSH, 0, 0)

    async def read_all(self, chunk: int = 4 << 20) -> bytes:
        parts = [await self.pread(min(chunk, self.size - off), off) for off in range(0, self.size, chunk)]
        return b"".join(parts)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._closed_error is None:
                self._writer.write(REQUEST_HEADER.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
                await self._writer.drain()
        await cancel_and_wait(self._reply_task)
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    async def __aenter__(self) -> NBDClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def client_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, export: str) -> ExportInfo:
    """Fixed-newstyle negotiation with ``NBD_OPT_GO`` and simple replies; closes the
    connection and raises NBDError when the server refuses."""
    try:
        magic, opt_magic, hflags = struct.unpack(">QQH", await reader.readexactly(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT or not hflags & FLAG_FIXED_NEWSTYLE:
            raise NBDError("server does not speak fixed-newstyle NBD")
        writer.write(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES)))
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        writer.write(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        await writer.drain()
        info: ExportInfo | None = None
        while True:
            rmagic, _opt, rtype, rlen = struct.unpack(">QIII", await reader.readexactly(20))
            payload = await reader.readexactly(rlen) if rlen else b""
            if rmagic != OPT_REPLY_MAGIC:
                raise NBDError("bad option reply magic")
            if rtype & REP_ERR_BIT:
                text = payload.decode(errors="replace") or f"error {rtype:#x}"
                raise NBDError(f"export {export!r} refused: {text}")
            if rtype == REP_INFO and len(payload) >= 12:
                kind, size, flags = struct.unpack(">HQH", payload[:12])
                if kind == INFO_EXPORT:
                    info = ExportInfo(size=size, flags=flags)
            elif rtype == REP_ACK:
                break
        if info is None:
            raise NBDError("server sent no export size")
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        writer.close()
        raise NBDError(f"NBD handshake failed: {exc}") from exc
    except NBDError:
        writer.close()
        raise
    return info
