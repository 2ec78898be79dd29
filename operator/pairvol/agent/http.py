"""The agent's HTTP API (DESIGN.md §3), on aiohttp.

Thin: parse and validate the body, call the replica, map our exceptions to status codes
(400 bad input, 401 no/wrong token, 409 illegal in this role/stage/epoch, 500 failure).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pairvol.agent import validate as v
from pairvol.agent.replica import Replica
from pairvol.agent.stages import IllegalTransition
from pairvol.errors import PairvolError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PUBLIC = {"/healthz", "/metrics"}
REPLICA: web.AppKey[Replica] = web.AppKey("replica", Replica)
MAX_BODY = 64 * 1024


def _error(status: int, text: str) -> web.Response:
    return web.json_response({"error": text}, status=status)


def make_app(replica: Replica, token: str | None) -> web.Application:
    @web.middleware
    async def errors_and_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token is not None and request.path not in PUBLIC:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return _error(
                    401, "missing or wrong bearer token (Authorization: Bearer <token from the volume's Secret>)"
                )
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"request body too large: at most {MAX_BODY} bytes")
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error(exc.status, f"{exc.reason}: {request.method} {request.path}")
        except v.InvalidInput as exc:
            return _error(400, str(exc))
        except IllegalTransition as exc:
            return _error(409, str(exc))
        except PairvolError as exc:
            log.error("%s %s failed: %s", request.method, request.path, exc)
            log.debug("traceback", exc_info=True)
            return _error(500, str(exc))

    app = web.Application(middlewares=[errors_and_auth], client_max_size=MAX_BODY)
    app[REPLICA] = replica
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/status", status)
    app.router.add_post("/v1/secondary", secondary)
    app.router.add_post("/v1/primary", primary)
    app.router.add_post("/v1/checkpoint", checkpoint)
    app.router.add_post("/v1/failover", failover)
    app.router.add_post("/v1/stop", stop)
    return app


async def _body(request: web.Request, allowed: set[str]) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        body: Any = {}
    else:
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise v.InvalidInput(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise v.InvalidInput("request body must be a JSON object")
    v.check_keys(body, allowed)
    return body


async def healthz(request: web.Request) -> web.Response:
    """The data path's verdict (pairvol.agent.health), the same one the Lease is renewed by;
    the pod's liveness and readiness probes read it."""
    health = await request.app[REPLICA].health()
    if not health.ok:
        return _error(503, health.reason)
    return web.json_response({"ok": True, "note": health.reason} if health.reason else {"ok": True})


async def metrics(request: web.Request) -> web.Response:
    replica = request.app[REPLICA]
    replica.metrics.up.labels(replica.cfg.name).set(1 if replica.qsd.alive else 0)
    body = generate_latest(replica.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def status(request: web.Request) -> web.Response:
    return web.json_response(request.app[REPLICA].status())


async def secondary(request: web.Request) -> web.Response:
    body = await _body(request, {"epoch"})
    return web.json_response(await request.app[REPLICA].start_secondary(v.parse_epoch(body)))


async def primary(request: web.Request) -> web.Response:
    body = await _body(request, {"epoch", "peer", "sync"})
    epoch, peer, sync = v.parse_epoch(body), v.parse_peer(body), v.parse_sync(body)
    if sync == "full" and peer is None:
        raise v.InvalidInput("'sync': 'full' needs a 'peer' to copy to")
    return web.json_response(await request.app[REPLICA].start_primary(epoch, peer, sync))


async def checkpoint(request: web.Request) -> web.Response:
    await _body(request, set())
    return web.json_response(await request.app[REPLICA].checkpoint())


async def failover(request: web.Request) -> web.Response:
    body = await _body(request, {"epoch", "mode"})
    epoch, mode = v.parse_epoch(body), v.parse_mode(body)
    return web.json_response(await request.app[REPLICA].failover(epoch, mode))


async def stop(request: web.Request) -> web.Response:
    await _body(request, set())
    return web.json_response(await request.app[REPLICA].stop())
