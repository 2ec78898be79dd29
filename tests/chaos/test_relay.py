"""The delaying relay of the `delay` class (tests/chaos/relay.py), over real TCP on loopback."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

import pytest

from pairvol.aio import bounded
from tests.chaos.relay import DelayRelay


@pytest.fixture
async def echo() -> AsyncIterator[str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.close()


async def round_trip(relay: DelayRelay, payload: bytes) -> tuple[bytes, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    t0 = time.monotonic()
    writer.write(payload)
    await writer.drain()
    got = await bounded(reader.readexactly(len(payload)), 10)
    took = time.monotonic() - t0
    writer.close()
    return got, took


async def test_a_slowed_relay_holds_each_way_for_the_latency(echo: str) -> None:
    relay = await DelayRelay("127.0.0.1", echo, random.Random(1)).start()
    try:
        relay.slow(0.15, 0.0)
        got, took = await round_trip(relay, b"x" * 1000)
        assert got == b"x" * 1000
        assert took >= 0.3  # 0.15 s out, 0.15 s back
    finally:
        await relay.close()


async def test_jitter_never_reorders_a_stream(echo: str) -> None:
    relay = await DelayRelay("127.0.0.1", echo, random.Random(2)).start()
    try:
        relay.slow(0.001, 0.05)
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        chunks = [i.to_bytes(4, "big") * 64 for i in range(100)]
        for c in chunks:  # separate writes, each likely its own read at the relay
            writer.write(c)
            await writer.drain()
            await asyncio.sleep(0.001)
        got = await bounded(reader.readexactly(sum(map(len, chunks))), 10)
        assert got == b"".join(chunks)
        writer.close()
    finally:
        await relay.close()


async def test_cleared_relay_copies_without_holding(echo: str) -> None:
    relay = await DelayRelay("127.0.0.1", echo, random.Random(3)).start()
    try:
        relay.slow(6.0, 0.0)
        relay.clear()
        got, _ = await round_trip(relay, b"abc")  # a 6 s hold each way would time the read out
        assert got == b"abc"
        assert relay.latency == 0.0 and relay.jitter == 0.0
    finally:
        await relay.close()
