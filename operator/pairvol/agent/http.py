"""The agent's HTTP API (DESIGN.md §3), on aiohttp.

Thin: parse and validate the body, call the replica, map our exceptions to status codes
(400 bad input, 401 no/wrong token, 404/405 no such route or method, 409 illegal in this
role/stage/epoch, 413 body too large, 415 a body declared as something other than JSON,
500 failure).

Bad input never reaches the replica: every body goes through
:func:`pairvol.agent.validate.parse_json_body` and the field parsers before a replica
method is called, so a refused call changes nothing. A 500 means the replica failed; an
exception that is not ours (a bug) is answered 500 too, logged as one line at ERROR with
its traceback at DEBUG.
"""

from __future__ import annotations

import hmac
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pairvol.agent import validate as v
from pairvol.agent.replica import InvalidSpan, Replica
from pairvol.agent.stages import IllegalTransition
from pairvol.errors import PairvolError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PUBLIC = {"/healthz", "/metrics"}
REPLICA: web.AppKey[Replica] = web.AppKey("replica", Replica)
MAX_BODY = 64 * 1024


class _ProtocolLog(logging.Logger):
    """What aiohttp's protocol layer logs, one line each: a request it cannot parse (bad
    request line, header or chunking) is the client's mistake, a WARNING; anything else an
    ERROR; the traceback at DEBUG. (aiohttp's default logs either with a traceback at ERROR.)"""

    def __init__(self) -> None:
        super().__init__(f"{__name__}.protocol")

    def debug(self, msg: object, *args: object, **kwargs: Any) -> None:
        log.debug(msg, *args, **kwargs)

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        what = str(msg) % args if args else str(msg)
        detail = " ".join(str(exc).split())[:300] if exc is not None else ""
        if isinstance(exc, HttpProcessingError) and 400 <= exc.code < 500:
            log.warning("%s: malformed HTTP request: %s", what, detail)
        else:
            log.error("%s: %s%s", what, type(exc).__name__ + ": " if exc is not None else "", detail)
        log.debug("traceback", exc_info=exc_info)


def make_runner(replica: Replica, token: str | None) -> web.AppRunner:
    """The API's runner: the app plus a protocol layer that logs as the rest of the agent."""
    return web.AppRunner(make_app(replica, token), access_log=None, logger=_ProtocolLog())


def _shown(path: str, limit: int = 120) -> str:
    """A request path as an error message may repeat it: one short line, whatever was sent."""
    return path if len(path) <= limit else f"{path[:limit]}… ({len(path)} characters)"


def _error(status: int, text: str) -> web.Response:
    return web.json_response({"error": text}, status=status)


def make_app(replica: Replica, token: str | None) -> web.Application:
    @web.middleware
    async def errors_and_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token is not None and request.path not in PUBLIC:
            given = request.headers.get("Authorization", "")
            # aiohttp decodes header bytes with surrogateescape; encode them back the same way
            if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), f"Bearer {token}".encode()):
                return _error(
                    401, "missing or wrong bearer token (Authorization: Bearer <token from the volume's Secret>)"
                )
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"request body too large: at most {MAX_BODY} bytes")
        except web.HTTPUnsupportedMediaType:
            return _error(415, f"Content-Type {request.content_type} is not JSON: send the body as application/json")
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error(exc.status, f"{exc.reason}: {request.method} {_shown(request.path)}")
        except (v.InvalidInput, InvalidSpan) as exc:
            return _error(400, str(exc))
        except IllegalTransition as exc:
            return _error(409, str(exc))
        except PairvolError as exc:
            # notes say what else went wrong on the way (an undo that failed too)
            message = "; ".join([str(exc), *getattr(exc, "__notes__", ())])
            log.error("%s %s failed: %s", request.method, request.path, message)
            log.debug("traceback", exc_info=True)
            return _error(500, message)
        except Exception as exc:
            log.error("%s %s failed unexpectedly: %s: %s", request.method, request.path, type(exc).__name__, exc)
            log.debug("traceback", exc_info=True)
            return _error(500, f"internal error: {type(exc).__name__}: {exc}")

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
    app.router.add_post("/v1/digests", digests)
    app.router.add_post("/v1/resize", resize)
    app.router.add_post("/v1/relink", relink)
    return app


# What a browser may send cross-origin without asking first: refused, so a web page cannot
# drive an agent that listens on loopback without a token.
NOT_JSON = {"application/x-www-form-urlencoded", "multipart/form-data", "text/plain"}


async def _body(request: web.Request, allowed: set[str]) -> dict[str, Any]:
    """The request's JSON object, with only ``allowed`` fields (nothing else is validated
    here: the field parsers in pairvol.agent.validate do that)."""
    if request.content_type in NOT_JSON:
        raise web.HTTPUnsupportedMediaType()
    body = v.parse_json_body(await request.read())
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
    body = await _body(request, {"epoch", "peer", "sync", "peerEpoch", "peerDisk", "peerApi"})
    epoch, peer, sync = v.parse_epoch(body), v.parse_peer(body), v.parse_sync(body)
    if sync != "none" and peer is None:
        raise v.InvalidInput(f"'sync': '{sync}' needs a 'peer' to copy to")
    peer_epoch = v.parse_peer_epoch(body, epoch)
    peer_disk = v.parse_peer_disk(body)
    peer_api = v.parse_peer_api(body)
    return web.json_response(
        await request.app[REPLICA].start_primary(epoch, peer, sync, peer_epoch, peer_disk, peer_api)
    )


async def checkpoint(request: web.Request) -> web.Response:
    """``{"linkSerial"}`` is optional: the serial of the primary's link as the caller saw it
    in sync; the cut is refused (409) if a primary linked again since (docs/correctness.md S5)."""
    body = await _body(request, {"linkSerial"})
    serial = body.get("linkSerial")
    if serial is not None and not (
        isinstance(serial, str) and 0 < len(serial) <= 128 and serial.isascii() and serial.isprintable()
    ):
        raise v.InvalidInput(
            f"invalid linkSerial {v.show(serial)}: expected the primary's replication.link.serial as its status "
            "reports it, or no linkSerial to cut without that check"
        )
    return web.json_response(await request.app[REPLICA].checkpoint(serial))


async def failover(request: web.Request) -> web.Response:
    body = await _body(request, {"epoch", "mode", "trigger"})
    epoch, mode, trigger = v.parse_epoch(body), v.parse_mode(body), v.parse_trigger(body)
    return web.json_response(await request.app[REPLICA].failover(epoch, mode, trigger))


async def stop(request: web.Request) -> web.Response:
    """``{"epoch"}`` is optional: the epoch the caller knows this replica at; a replica at
    another epoch refuses (409), so a stop meant for an earlier incarnation (a grow planned
    before a failover, say) never detaches the peer of the current one."""
    body = await _body(request, {"epoch"})
    epoch = v.parse_epoch(body) if "epoch" in body else None
    return web.json_response(await request.app[REPLICA].stop(epoch))


async def relink(request: web.Request) -> web.Response:
    """A secondary ends its replication connections before its primary links again."""
    body = await _body(request, {"epoch"})
    return web.json_response(await request.app[REPLICA].relink(v.parse_epoch(body)))


async def digests(request: web.Request) -> web.Response:
    """A secondary's digests of its own disk, for its primary's checksum resync. Behind the
    bearer token like every call: only the volume's agents and operator hold it."""
    body = await _body(request, {"disk", "offset", "length"})
    disk, offset, length = v.parse_digest_request(body)
    return web.json_response(await request.app[REPLICA].digests(disk, offset, length))


async def resize(request: web.Request) -> web.Response:
    body = await _body(request, {"epoch", "size"})
    if "size" not in body:
        raise v.InvalidInput("'size' is required: the new size in bytes (e.g. 268435456)")
    epoch, size = v.parse_epoch(body), v.parse_size(body["size"])
    return web.json_response(await request.app[REPLICA].resize(epoch, size))
