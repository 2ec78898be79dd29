"""The operator's agent client speaks DESIGN.md §3: paths, bodies, bearer token, errors.

The agent side here is a minimal aiohttp application that records what it receives, so
these tests check what the client *sends* and how it turns error statuses into
:class:`AgentError`. Its answers prove nothing about the real agent; the client against a
real agent is tests/integration/test_agentclient_contract.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from pairvol.operator.agentclient import AgentClient, AgentError

TOKEN = "s3cret"


@pytest.fixture
async def agent() -> Any:
    seen: list[tuple[str, str, Any]] = []

    async def handle(request: web.Request) -> web.Response:
        if request.path != "/healthz" and request.headers.get("Authorization") != (
            f"Bearer {TOKEN}"
        ):
            return web.json_response({"error": "missing or wrong bearer token"}, status=401)
        body = await request.json() if request.can_read_body else None
        seen.append((request.method, request.path, body))
        if request.path == "/v1/failover" and body["epoch"] <= 3:
            return web.json_response({"error": "stale epoch 3 <= 5"}, status=409)
        answers: dict[str, Any] = {
            "/healthz": {}, "/v1/status": {"role": "secondary", "stage": "running", "epoch": 5},
            "/v1/checkpoint": {"id": 9, "durationMs": 1.5},
            "/v1/failover": {"durationMs": 12.0, "mode": body and body.get("mode"),
                             "checkpointId": 9},
        }
        return web.json_response(answers.get(request.path, {}))

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"127.0.0.1:{server.port}", seen
    await server.close()


async def test_calls_follow_the_contract(agent: Any) -> None:
    address, seen = agent
    c = AgentClient()
    try:
        assert await c.healthz(address)
        await c.status(address, TOKEN)
        await c.secondary(address, TOKEN, 6)
        await c.primary(address, TOKEN, 7, "10.0.0.2:7801", "full")
        await c.checkpoint(address, TOKEN)
        await c.failover(address, TOKEN, 8, "latest")
        await c.stop(address, TOKEN)
        await c.stop(address, TOKEN, 8)
        await c.resize(address, TOKEN, 8, 1 << 30)
    finally:
        await c.close()
    assert seen[:2] == [("GET", "/healthz", None), ("GET", "/v1/status", None)]
    assert seen[2:] == [
        ("POST", "/v1/secondary", {"epoch": 6}),
        ("POST", "/v1/primary", {"epoch": 7, "peer": "10.0.0.2:7801", "sync": "full"}),
        ("POST", "/v1/checkpoint", {}),
        ("POST", "/v1/failover", {"epoch": 8, "mode": "latest"}),
        ("POST", "/v1/stop", {}),
        ("POST", "/v1/stop", {"epoch": 8}),
        ("POST", "/v1/resize", {"epoch": 8, "size": 1 << 30}),
    ]


async def test_agent_errors_keep_status_and_text(agent: Any) -> None:
    address, _ = agent
    c = AgentClient()
    try:
        with pytest.raises(AgentError) as err:
            await c.failover(address, TOKEN, 3, "checkpoint")
        assert err.value.status == 409 and "stale epoch" in str(err.value)
        with pytest.raises(AgentError) as err:
            await c.status(address, "wrong")
        assert err.value.status == 401
    finally:
        await c.close()


async def test_unreachable_agent_is_status_zero() -> None:
    c = AgentClient(timeout_s=1)
    try:
        with pytest.raises(AgentError) as err:
            await c.status("127.0.0.1:9", TOKEN)  # discard port: nobody listens
        assert err.value.status == 0 and "unreachable" in str(err.value)
        assert not await c.healthz("127.0.0.1:9")
    finally:
        await c.close()


async def test_calls_to_many_agents_at_once_never_queue_behind_each_other() -> None:
    """One operator talks to every agent of every volume: two status polls per volume each
    tick, plus role calls that stay open for a whole full sync. A cap on the client's
    connections (aiohttp's default is 100) would make a status poll wait for a free
    connection inside its short timeout, and a healthy agent would look dead. Here the
    agent answers only once 150 calls are in flight at the same time."""
    calls = 150
    arrived = 0
    all_in = asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        nonlocal arrived
        arrived += 1
        if arrived == calls:
            all_in.set()
        await all_in.wait()
        return web.json_response({"role": "primary", "stage": "none", "epoch": 1})

    app = web.Application()
    app.router.add_get("/v1/status", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    client = AgentClient()
    try:
        answers = await asyncio.gather(
            *(client.status(f"127.0.0.1:{server.port}", TOKEN, timeout_s=5) for _ in range(calls))
        )
        assert len(answers) == calls and arrived == calls
    finally:
        await client.close()
        await server.close()
