"""The API proxy the nodes reach the API server through, slowed per client (the chaos
injector's `api-slow`): real TCP on loopback, an echo server standing in for the API."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from pairvol.aio import bounded
from pairvol.localcluster.netns import ApiProxy


@pytest.fixture
async def proxy() -> AsyncIterator[ApiProxy]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    p = ApiProxy("127.0.0.1", "127.0.0.1", server.sockets[0].getsockname()[1])
    await p.start()
    try:
        yield p
    finally:
        await p.close()
        server.close()


async def ask(p: ApiProxy) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    t0 = time.monotonic()
    writer.write(b"GET / HTTP/1.1\r\n\r\n")
    await writer.drain()
    assert await bounded(reader.readexactly(18), 10) == b"GET / HTTP/1.1\r\n\r\n"
    took = time.monotonic() - t0
    writer.close()
    return took


async def test_a_request_from_a_slowed_client_is_held_before_it_is_passed_on(proxy: ApiProxy) -> None:
    asked: list[str] = []

    def delay(ip: str) -> float:
        asked.append(ip)
        return 0.3 if ip == "127.0.0.1" else 0.0

    proxy.delay = delay
    assert await ask(proxy) >= 0.3
    assert asked == ["127.0.0.1"]  # judged by the client's address, once per chunk


async def test_other_clients_and_a_cleared_delay_pass_at_once(proxy: ApiProxy) -> None:
    proxy.delay = lambda ip: 30.0 if ip == "10.0.0.9" else 0.0
    await ask(proxy)  # a 30 s hold would time the read out
    proxy.delay = None
    await ask(proxy)
