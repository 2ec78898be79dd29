"""The link gate on its own, in front of a real qemu-storage-daemon export: it forwards
while healthy, answers nothing once failed, and only release() lets held requests go, as
errors. Reads can be refused while the peer is being synced."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pairvol import nbd as nbd_wire
from pairvol.agent.gate import COPY_EXPORT, GateError, LinkGate
from pairvol.aio import bounded
from pairvol.nbd import NBDClient, NBDError
from pairvol.qemu import img
from pairvol.qemu import recipes as r
from pairvol.qemu.qsd import Qsd

MiB = 1 << 20


@contextlib.asynccontextmanager
async def gate_over_qsd(tmp_path: Path, stall_after: float = 5.0) -> AsyncIterator[tuple[LinkGate, Qsd, NBDClient]]:
    run = tmp_path / "run"
    run.mkdir()
    await img.create(tmp_path / "disk.raw", "raw", 4 * MiB)
    qsd = Qsd(run, tmp_path / "qsd.log", name="link")
    await qsd.start()
    gate = LinkGate(run / "gate.sock", run / "link.sock", r.LINK_EXPORT, stall_after)
    try:
        await qsd.execute("blockdev-add", r.file_node(tmp_path / "disk.raw", r.LINK_EXPORT, "raw"))
        await qsd.execute("nbd-server-start", r.nbd_server_unix(run / "link.sock"))
        await qsd.execute("block-export-add", r.nbd_export(r.LINK_EXPORT, r.LINK_EXPORT))
        await gate.start()
        client = await NBDClient.connect_unix(str(run / "gate.sock"), "peer")
        try:
            yield gate, qsd, client
        finally:
            await client.close()
    finally:
        await gate.close()
        await qsd.kill()


async def test_a_healthy_gate_forwards_writes_reads_and_flushes(tmp_path: Path) -> None:
    async with gate_over_qsd(tmp_path) as (gate, _qsd, nbd):
        assert nbd.size == 4 * MiB
        await nbd.pwrite(b"p" * 65536, MiB)
        await nbd.flush()
        assert await nbd.pread(65536, MiB) == b"p" * 65536
        assert not gate.failed.is_set()
    assert (tmp_path / "disk.raw").read_bytes()[MiB : MiB + 65536] == b"p" * 65536


async def test_a_failed_gate_answers_nothing_until_released_and_then_only_errors(tmp_path: Path) -> None:
    async with gate_over_qsd(tmp_path) as (gate, _qsd, nbd):
        await nbd.pwrite(b"1" * 4096, 0)
        gate.fail("test: link lost")
        held = [asyncio.create_task(nbd.pwrite(b"2" * 4096, 4096 * i)) for i in range(4)]
        held.append(asyncio.create_task(nbd.flush()))
        await asyncio.sleep(1.0)
        assert not any(t.done() for t in held), "a failed gate answered before release()"
        assert gate.held == len(held)
        gate.release()
        for t in held:
            with pytest.raises(NBDError, match="errno 5"):
                await bounded(t, 5)
        with pytest.raises(NBDError, match="errno 5"):  # and every later request at once
            await bounded(nbd.pwrite(b"3" * 4096, 0), 5)
    # nothing after the failure reached the disk
    assert (tmp_path / "disk.raw").read_bytes()[:4096] == b"1" * 4096


async def test_release_before_failure_is_a_bug_not_a_shortcut(tmp_path: Path) -> None:
    async with gate_over_qsd(tmp_path) as (gate, _qsd, _nbd):
        with pytest.raises(GateError):
            gate.release()


async def test_an_unanswered_request_fails_the_gate_after_the_stall_timeout(tmp_path: Path) -> None:
    async with gate_over_qsd(tmp_path, stall_after=0.5) as (gate, qsd, nbd):
        assert qsd.pid is not None
        os.kill(qsd.pid, signal.SIGSTOP)
        try:
            write = asyncio.create_task(nbd.pwrite(b"s" * 4096, 0))
            await bounded(gate.failed.wait(), 3)
            assert gate.reason is not None and "did not answer" in gate.reason
            assert not write.done()
            gate.release()
            with pytest.raises(NBDError):
                await bounded(write, 5)
        finally:
            os.kill(qsd.pid, signal.SIGCONT)


async def test_reads_are_refused_while_the_peer_is_incomplete(tmp_path: Path) -> None:
    async with gate_over_qsd(tmp_path) as (gate, _qsd, nbd):
        gate.serve_reads = False
        with pytest.raises(NBDError, match="errno 5"):
            await nbd.pread(4096, 0)
        await nbd.pwrite(b"w" * 4096, 0)  # writes still go through
        assert not gate.failed.is_set()
        gate.serve_reads = True
        assert await nbd.pread(4096, 0) == b"w" * 4096


async def test_an_error_reply_fails_the_gate_and_is_not_forwarded(tmp_path: Path) -> None:
    async with gate_over_qsd(tmp_path) as (gate, _qsd, nbd):
        write = asyncio.create_task(nbd.pwrite(b"x" * 4096, 4 * MiB))  # past the end: EINVAL/ENOSPC
        await bounded(gate.failed.wait(), 5)
        assert gate.reason is not None and "failed on the link" in gate.reason
        assert not gate.flush_failed  # a failed write is in the bitmap's reach; a failed flush is not
        await asyncio.sleep(0.3)
        assert not write.done()
        gate.release()
        with pytest.raises(NBDError):
            await bounded(write, 5)


async def test_the_copy_connection_forwards_while_healthy_and_is_answered_success_after_release(
    tmp_path: Path,
) -> None:
    """The bitmap resync's copy job (export name ``copy``): forwarded like any connection
    while the gate is healthy; after a failure its writes are held like the rest, then
    answered with success — so QEMU's copy-before-write does not fail the workload write
    waiting for it — while nothing reaches the disk and reads still fail (R2)."""
    async with gate_over_qsd(tmp_path) as (gate, _qsd, nbd):
        copy = await NBDClient.connect_unix(str(gate.socket_path), COPY_EXPORT)
        try:
            await copy.pwrite(b"c" * 4096, 0)
            assert await copy.pread(4096, 0) == b"c" * 4096
            gate.fail("test: link lost")
            held_copy = asyncio.create_task(copy.pwrite(b"d" * 4096, 4096))
            held_peer = asyncio.create_task(nbd.pwrite(b"e" * 4096, 8192))
            await asyncio.sleep(0.5)
            assert not held_copy.done() and not held_peer.done(), "answered before release()"
            gate.release()
            await bounded(held_copy, 5)  # success, trusted by nobody
            with pytest.raises(NBDError, match="errno 5"):
                await bounded(held_peer, 5)
            await bounded(copy.pwrite(b"f" * 4096, 12288), 5)
            with pytest.raises(NBDError, match="errno 5"):
                await bounded(copy.pread(4096, 0), 5)
        finally:
            await copy.close()
    disk = (tmp_path / "disk.raw").read_bytes()
    assert disk[:4096] == b"c" * 4096 and disk[4096:16384] == bytes(12288), "nothing after the failure was written"


async def test_a_flush_the_peer_fails_is_told_apart_from_other_failures(tmp_path: Path) -> None:
    """A storage error on the secondary shows at its flush (a failed writeback): what it had
    acknowledged before may not be on its disk, so no bitmap can vouch for that disk (R3)."""
    run = tmp_path / "run"
    run.mkdir()
    await img.create(tmp_path / "disk.raw", "raw", 4 * MiB)
    qsd = Qsd(run, tmp_path / "qsd.log", name="link")
    await qsd.start()
    gate = LinkGate(run / "gate.sock", run / "link.sock", r.LINK_EXPORT, 5.0)
    try:
        await qsd.execute(
            "blockdev-add", {"driver": "file", "node-name": "file", "filename": str(tmp_path / "disk.raw")}
        )
        failing_flush = {"event": "flush_to_disk", "errno": 5}  # EIO when the data should reach the disk
        await qsd.execute(
            "blockdev-add",
            {"driver": "blkdebug", "node-name": "faulty", "image": "file", "inject-error": [failing_flush]},
        )
        await qsd.execute("blockdev-add", {"driver": "raw", "node-name": r.LINK_EXPORT, "file": "faulty"})
        await qsd.execute("nbd-server-start", r.nbd_server_unix(run / "link.sock"))
        await qsd.execute("block-export-add", r.nbd_export(r.LINK_EXPORT, r.LINK_EXPORT))
        await gate.start()
        nbd = await NBDClient.connect_unix(str(run / "gate.sock"), "peer")
        try:
            await nbd.pwrite(b"x" * 4096, 0)  # acknowledged by the peer
            assert not gate.failed.is_set()
            flush = asyncio.create_task(nbd.flush())
            await bounded(gate.failed.wait(), 5)
            assert gate.flush_failed and gate.reason is not None and "flush" in gate.reason
            gate.release()
            with pytest.raises(NBDError):
                await bounded(flush, 5)
        finally:
            await nbd.close()
    finally:
        await gate.close()
        await qsd.kill()


async def _raw_client(gate: LinkGate) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection through the gate on which the test writes NBD requests byte by byte."""
    reader, writer = await asyncio.open_unix_connection(str(gate.socket_path))
    await nbd_wire.client_handshake(reader, writer, "peer")
    return reader, writer


def _write_request(handle: int, offset: int, payload: bytes) -> bytes:
    header = nbd_wire.REQUEST_HEADER.pack(
        nbd_wire.REQUEST_MAGIC, 0, nbd_wire.CMD_WRITE, handle, offset, len(payload)
    )
    return header + payload


async def _replies(reader: asyncio.StreamReader, count: int) -> dict[int, int]:
    out: dict[int, int] = {}
    for _ in range(count):
        magic, error, handle = nbd_wire.SIMPLE_REPLY.unpack(
            await bounded(reader.readexactly(nbd_wire.SIMPLE_REPLY.size), 10)
        )
        assert magic == nbd_wire.SIMPLE_REPLY_MAGIC
        out[handle] = error
    return out


async def test_requests_cut_anywhere_by_the_socket_reach_the_disk_byte_for_byte(tmp_path: Path) -> None:
    """The gate passes a write on while its payload is still arriving (cut-through): however
    the stream of requests is cut into reads — a header in pieces, a payload in pieces, many
    requests in one read, a 1 MiB payload in one read — the disk ends up with exactly the bytes
    written, every write answered once and in full."""
    rng = random.Random(11)
    writes = [(0, MiB), (MiB, 4096), (MiB + 4096, 1), (MiB + 4097, 65535), (2 * MiB, 200_000), (3 * MiB, MiB)]
    # and small ones of random sizes in slots of their own: the requests are all in flight at
    # once and the server may carry them out in any order, so no two may overlap
    slots = [*range(1_200_000, 2 * MiB - 80_000, 80_000), *range(2_300_000, 3 * MiB - 80_000, 80_000)]
    for slot in slots:
        length = rng.choice((1, 512, 4096, 65536, 70_000))
        writes.append((slot + rng.randrange(0, 80_000 - length), length))
    expected = bytearray(4 * MiB)
    stream = bytearray()
    for handle, (offset, length) in enumerate(writes):
        payload = rng.randbytes(length)
        expected[offset : offset + length] = payload
        stream += _write_request(handle, offset, payload)
    async with gate_over_qsd(tmp_path) as (gate, _qsd, _nbd):
        reader, writer = await _raw_client(gate)
        try:
            pos = 0
            cuts = [1, 3, 24, 28, 29, 100, 4095, 70_000, 1 << 20, 7]
            while pos < len(stream):
                step = cuts[rng.randrange(len(cuts))]
                writer.write(bytes(stream[pos : pos + step]))
                await writer.drain()
                if step < 100:
                    await asyncio.sleep(0.001)  # let the gate read this piece on its own
                pos += step
            replies = await _replies(reader, len(writes))
            assert replies == dict.fromkeys(range(len(writes)), 0)
            assert not gate.failed.is_set()
        finally:
            writer.close()
    assert (tmp_path / "disk.raw").read_bytes() == bytes(expected)


async def test_a_write_whose_payload_is_still_arriving_when_the_gate_fails_never_reaches_the_disk(
    tmp_path: Path,
) -> None:
    """Cut-through sends the first part of a payload on before the rest has come; if the gate
    fails in between, the link is cut before the request is whole, so the peer never carries
    it out, and the write is held, then answered with EIO on release like any other."""
    async with gate_over_qsd(tmp_path) as (gate, _qsd, _nbd):
        reader, writer = await _raw_client(gate)
        try:
            request = _write_request(7, 0, b"h" * MiB)
            writer.write(request[: 512 * 1024])
            await writer.drain()
            await asyncio.sleep(0.3)  # the first half is through the gate
            gate.fail("test: link lost mid-payload")
            writer.write(request[512 * 1024 :])
            await writer.drain()
            await asyncio.sleep(0.5)
            assert gate.held == 1
            with pytest.raises(TimeoutError):
                await bounded(reader.readexactly(1), 0.2)  # no answer before release()
            gate.release()
            assert await _replies(reader, 1) == {7: errno.EIO}
        finally:
            writer.close()
    assert (tmp_path / "disk.raw").read_bytes()[:MiB] == bytes(MiB)
