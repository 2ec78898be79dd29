"""Checksum resync: find the regions in which two disks of unknown shared history differ,
reading each disk only where it lives.

Where the primary has no record of what its peer's disk lacks (the old primary rejoining
after a failover, a primary that crashed, a disk that is not the recorded one), copying
the whole volume is always correct but sends every byte over the link. Instead each side
computes a digest of every region of its own disk (``REGION`` = the dirty bitmap's
granularity, BLAKE2b-128), the secondary answers ``POST /v1/digests`` with its own, and
the primary turns the regions whose digests differ into bits of the dirty bitmap that the
bitmap resync then copies (docs/correctness.md, R4). Only digests (16 bytes per 64 KiB)
and the differing regions cross the network.

QEMU 7.2 has no QMP command that sets bits of a dirty bitmap, so the marks are written
into a scratch qcow2 image that carries a persistent bitmap: one ``qemu-io`` zero-write per
run of differing regions sets exactly those bits (the data is never looked at), and the
primary's daemon merges that bitmap into its own, as it merges one saved at a clean stop.

Everything here that reads a disk or starts a process runs off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import logging
import mmap
import os
import shutil
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp

from pairvol.errors import PairvolError
from pairvol.qemu import img
from pairvol.qemu import recipes as r

log = logging.getLogger(__name__)

REGION = r.BITMAP_GRANULARITY  # a region is one bit of the dirty bitmap
DIGEST_SIZE = 16
SPAN = 32 << 20  # the most one digest request covers (512 regions, 8 KiB of digests)
READ_CHUNK = 4 << 20  # one read of the disk file
PEER_TIMEOUT_S = 60.0  # one span: 32 MiB read and hashed by the peer
MARKS_BITMAP = "marks"


class ChecksumError(PairvolError):
    """The comparison could not be made; the message says which side failed and why."""


# ---------------------------------------------------------------------- digests (blocking)


def digest_span(path: Path, size: int, offset: int, length: int) -> bytes:
    """The digests of the regions in ``[offset, offset+length)`` of the file at ``path``,
    concatenated (the last region of the volume may be shorter). Blocking: run it through
    ``asyncio.to_thread``.

    Read with O_DIRECT where the file system allows it: the scan neither fills the page
    cache nor evicts the workload's cached pages, and a direct read first writes back the
    dirty pages of its range, so every write the daemon completed before a region is read
    is in its digest (the daemon writes through the page cache). Elsewhere (tmpfs) the
    file is read through the page cache, which is as coherent.

    Holes are not read on the file systems of ``HOLES_TRUSTED``: a region the file system
    reports as a hole (``SEEK_DATA`` / ``SEEK_HOLE``, which there count dirty pages in the
    page cache and delayed allocations as data) reads as zeros, so its digest is the digest
    of zeros, the same bytes a read would have hashed. A sparse volume is compared at the
    cost of what it holds, not of its size. Elsewhere everything is read: FUSE asks its
    server without writing the dirty pages back first (with a writeback cache a completed
    write is reported as a hole), and ZFS has reported holes over fresh data."""
    check_span(size, offset, length)
    out = bytearray()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        direct: int | None = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
    except OSError:
        direct = None
    buf = mmap.mmap(-1, READ_CHUNK)  # page-aligned, as O_DIRECT wants
    view = memoryview(buf)
    try:
        file_size = os.fstat(fd).st_size
        if file_size < offset + length:
            raise ChecksumError(f"{path} ends at {file_size}, before the volume's size {size}")
        trusted = holes_trusted(fd)
        pos, end = offset, offset + length
        while pos < end:
            want = min(READ_CHUNK, end - pos)
            data = data_ranges(fd, pos, pos + want) if trusted else [(pos, pos + want)]
            if not data:
                for start in range(0, want, REGION):
                    out += zero_digest(min(want, start + REGION) - start)
                pos += want
                continue
            with_data = [(start, min(want, start + REGION)) for start in _regions_with_data(data, pos, want)]
            for first, last in _joined(with_data):  # read only the regions that hold data
                into = view[first:last]
                if direct is not None and (last - first) % _DIRECT_ALIGN == 0:
                    try:
                        _read_exactly(direct, into, pos + first, path, size)
                    except OSError as exc:
                        if exc.errno != errno.EINVAL:
                            raise
                        os.close(direct)  # the file system refuses this alignment: read through the cache
                        direct = None
                        _read_exactly(fd, into, pos + first, path, size)
                else:
                    _read_exactly(fd, into, pos + first, path, size)
                into.release()
            hashed = dict(with_data)
            for start in range(0, want, REGION):
                stop = min(want, start + REGION)
                if start in hashed:
                    out += hashlib.blake2b(view[start:stop], digest_size=DIGEST_SIZE).digest()
                else:
                    out += zero_digest(stop - start)
            pos += want
    finally:
        view.release()
        with contextlib.suppress(BufferError):  # a slice held by an exception: freed with it
            buf.close()
        if direct is not None:
            os.close(direct)
        os.close(fd)
    return bytes(out)


_ZERO_DIGEST = hashlib.blake2b(bytes(REGION), digest_size=DIGEST_SIZE).digest()


def zero_digest(length: int) -> bytes:
    """The digest of ``length`` zero bytes (a region, or the volume's shorter last one)."""
    if length == REGION:
        return _ZERO_DIGEST
    return hashlib.blake2b(bytes(length), digest_size=DIGEST_SIZE).digest()


MAX_RANGES = 64  # data ranges looked up per read chunk; beyond, the rest of it is read

#: File systems (statfs f_type) whose SEEK_DATA/SEEK_HOLE count dirty and delayed-allocated
#: pages as data (Linux ≥ 4.12 for ext4's unwritten extents): ext2/3/4, xfs, tmpfs, btrfs.
#: Not overlayfs (its upper layer may be anything), FUSE, NFS, ZFS: those are read whole.
HOLES_TRUSTED = {0xEF53: "ext4", 0x58465342: "xfs", 0x01021994: "tmpfs", 0x9123683E: "btrfs"}


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 256)]


def holes_trusted(fd: int) -> bool:
    """Whether the open file lives on a file system of ``HOLES_TRUSTED``. Blocking."""
    buf = _Statfs()
    if _libc().fstatfs(fd, ctypes.byref(buf)) != 0:
        return False
    return (buf.f_type & 0xFFFFFFFF) in HOLES_TRUSTED


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def data_ranges(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The ranges of ``[start, end)`` of the open file that may hold data; the rest are
    holes and read as zeros. Where the file system has no ``SEEK_DATA`` (it answers EINVAL
    or EOPNOTSUPP), all of it may hold data; after ``MAX_RANGES`` ranges (a fragmented
    file), all the rest may. Blocking."""
    found: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        if len(found) == MAX_RANGES:
            found.append((pos, end))
            break
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only holes from pos to the end of the file
                break
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return [(start, end)]
            raise
        if data >= end:
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        found.append((data, min(hole, end)))
        pos = hole
    return found


def _regions_with_data(ranges: list[tuple[int, int]], pos: int, want: int) -> list[int]:
    """The offsets (from ``pos``) of the regions of ``[pos, pos+want)`` that overlap any of
    the sorted, disjoint ``ranges``: one pass over both."""
    out: list[int] = []
    i = 0
    for start in range(0, want, REGION):
        first, stop = pos + start, pos + min(want, start + REGION)
        while i < len(ranges) and ranges[i][1] <= first:
            i += 1
        if i < len(ranges) and ranges[i][0] < stop:
            out.append(start)
    return out


def _joined(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted ranges with the touching ones joined."""
    out: list[tuple[int, int]] = []
    for start, stop in ranges:
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], stop)
        else:
            out.append((start, stop))
    return out


_DIRECT_ALIGN = 4096


def _read_exactly(fd: int, into: memoryview, pos: int, path: Path, size: int) -> None:
    done = 0
    while done < len(into):
        n = os.preadv(fd, [into[done:]], pos + done)
        if n == 0:
            raise ChecksumError(f"{path} ends at {pos + done}, before the volume's size {size}")
        done += n


def check_span(size: int, offset: int, length: int) -> None:
    """A span asked for: starts on a region, ends on a region or at the end of the volume,
    at most ``SPAN`` long, inside the volume. Raises ValueError saying what is wrong."""
    if offset < 0 or length < 0 or offset % REGION:
        raise ValueError(f"offset {offset} is not a multiple of the region size {REGION}")
    if offset + length > size:
        raise ValueError(f"offset {offset} + length {length} is beyond the volume's size {size}")
    if length > SPAN:
        raise ValueError(f"length {length} is more than {SPAN} bytes: ask for at most {SPAN // REGION} regions")
    if length % REGION and offset + length != size:
        raise ValueError(f"length {length} is not a multiple of the region size {REGION} and does not end the volume")


# FIEMAP (linux/fiemap.h): which extents of a file hold written data
_FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_FLAG_SYNC = 0x1
_FIEMAP_EXTENT_LAST = 0x1
_FIEMAP_EXTENT_UNWRITTEN = 0x800
_FIEMAP_HEAD = struct.Struct("=QQIIII")
_FIEMAP_EXTENT = struct.Struct("=QQQQQI12x")
_FIEMAP_BATCH = 256


def written_bytes(path: Path) -> int | None:
    """How many bytes of the file were ever written with data, from the file system's
    extent map (preallocated extents that were never written, and ranges zeroed with
    fallocate, count as unwritten): a disk.raw created for a new replica has 4 KiB (QEMU
    writes its first block when it creates the image). ``None`` where the file system has
    no extent map (tmpfs). Dirty pages are written back first (FIEMAP_FLAG_SYNC). Blocking."""
    total = 0
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        start = 0
        while True:
            buf = bytearray(_FIEMAP_HEAD.size + _FIEMAP_EXTENT.size * _FIEMAP_BATCH)
            _FIEMAP_HEAD.pack_into(buf, 0, start, (1 << 64) - 1 - start, _FIEMAP_FLAG_SYNC, 0, _FIEMAP_BATCH, 0)
            try:
                fcntl.ioctl(fd, _FS_IOC_FIEMAP, buf)
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                    return None
                raise
            mapped = _FIEMAP_HEAD.unpack_from(buf, 0)[3]
            if mapped == 0:
                return total
            for i in range(mapped):
                logical, _, length, _, _, flags = _FIEMAP_EXTENT.unpack_from(
                    buf, _FIEMAP_HEAD.size + i * _FIEMAP_EXTENT.size
                )
                if not flags & _FIEMAP_EXTENT_UNWRITTEN:
                    total += length
                start = logical + length
                if flags & _FIEMAP_EXTENT_LAST:
                    return total
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- comparison (pure)


def differing(offset: int, mine: bytes, theirs: bytes) -> list[int]:
    """Indices (in the volume) of the regions whose digests differ."""
    if len(mine) != len(theirs) or len(mine) % DIGEST_SIZE:
        raise ChecksumError(f"the digests do not cover the same regions ({len(mine)} and {len(theirs)} bytes)")
    first = offset // REGION
    return [
        first + i
        for i in range(len(mine) // DIGEST_SIZE)
        if mine[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE] != theirs[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE]
    ]


def runs(regions: Iterable[int], size: int) -> list[tuple[int, int]]:
    """Sorted region indices as byte ranges ``(offset, length)``, neighbours joined and the
    last one cut at the end of the volume."""
    out: list[tuple[int, int]] = []
    for idx in sorted(regions):
        start = idx * REGION
        length = min(REGION, size - start)
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((start, length))
    return out


def spans(size: int) -> list[tuple[int, int]]:
    return [(off, min(SPAN, size - off)) for off in range(0, size, SPAN)]


# ---------------------------------------------------------------------- the peer's digests


class PeerDigests:
    """The secondary's agent, asked for its digests with the volume's API token (the
    agents of a volume share it; the secondary answers nobody else)."""

    def __init__(self, address: str, token: str | None, disk: str) -> None:
        self.url = f"http://{address}/v1/digests"
        self.headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        self.disk = disk
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> PeerDigests:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PEER_TIMEOUT_S))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def ask(self, offset: int = 0, length: int = 0) -> dict[str, Any]:
        assert self._session is not None
        body = {"disk": self.disk, "offset": offset, "length": length}
        try:
            async with self._session.post(self.url, json=body, headers=self.headers) as resp:
                answer = await resp.json(content_type=None)
                if resp.status != 200:
                    error = answer.get("error") if isinstance(answer, dict) else answer
                    raise ChecksumError(f"the peer's agent answered {resp.status}: {error}")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise ChecksumError(f"cannot ask the peer's agent at {self.url}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(answer, dict):
            raise ChecksumError(f"the peer's agent answered {answer!r}, not an object")
        return answer

    async def digests(self, offset: int, length: int) -> bytes:
        answer = await self.ask(offset, length)
        try:
            data = bytes.fromhex(str(answer["digests"]))
        except (KeyError, ValueError) as exc:
            raise ChecksumError(f"the peer's agent sent no readable digests: {exc}") from exc
        if answer.get("disk") != self.disk or answer.get("regionSize") != REGION:
            raise ChecksumError(f"the peer's agent answered for another disk or region size: {answer.get('disk')}")
        return data


async def compare(
    path: Path, size: int, peer: PeerDigests, progress: Callable[[int, int], None] | None = None
) -> list[int]:
    """Every region of the volume whose digests differ between ``path`` (this side) and the
    peer. The next span's two digest passes run while this one is compared."""
    found: list[int] = []
    compared = 0

    async def both(offset: int, length: int) -> tuple[bytes, bytes]:
        mine, theirs = await asyncio.gather(
            asyncio.to_thread(digest_span, path, size, offset, length), peer.digests(offset, length)
        )
        return mine, theirs

    todo = spans(size)
    pending: asyncio.Task[tuple[bytes, bytes]] | None = None
    try:
        for i, (offset, length) in enumerate(todo):
            current = pending if pending is not None else asyncio.create_task(both(offset, length))
            pending = asyncio.create_task(both(*todo[i + 1])) if i + 1 < len(todo) else None
            mine, theirs = await current
            found += differing(offset, mine, theirs)
            compared += length
            if progress is not None:
                progress(compared, len(found) * REGION)
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
    return found


# ---------------------------------------------------------------------- the marks


async def write_marks(path: Path, size: int, ranges: list[tuple[int, int]]) -> None:
    """A qcow2 image of the volume's size whose persistent bitmap ``marks`` has exactly the
    bits of ``ranges`` set (zero-writes set the bits; the scratch image's data is never
    read). ``cache=unsafe``: the file is merged at once and never read after a crash."""
    await asyncio.to_thread(lambda: path.unlink(missing_ok=True))
    await img.create(path, "qcow2", size)
    await img.run_qemu_img("bitmap", "--add", "-g", str(REGION), str(path), MARKS_BITMAP)
    script = "".join(f"write -z {off} {length}\n" for off, length in ranges).encode()
    exe = shutil.which("qemu-io")
    if exe is None:
        raise ChecksumError("qemu-io not found on PATH; install it (Debian: apt-get install qemu-utils)")
    proc = await asyncio.create_subprocess_exec(
        exe, "-t", "unsafe", "-f", "qcow2", str(path),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await proc.communicate(script)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    text = (out + err).decode(errors="replace")
    wrote = text.count("wrote ")
    if proc.returncode != 0 or wrote != len(ranges):
        raise ChecksumError(
            f"qemu-io set {wrote} of {len(ranges)} runs of marks (exit {proc.returncode}): {text.strip()[-300:]}"
        )
