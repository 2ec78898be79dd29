"""The gRPC server: the driver's services on a unix socket, with CSI's error discipline.

Handlers are plain async functions from a request message to a response message; they
signal a refusal by raising :class:`CsiError` with the gRPC code the CSI spec prescribes
and a text that says what to fix. Anything else is a bug or a failed dependency: it is
answered INTERNAL with its text and logged as one ERROR line (the traceback at DEBUG).
RPCs of a service that the driver declares but does not serve answer UNIMPLEMENTED; RPCs
it does not declare at all get gRPC's own UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from pairvol.csi.proto import PACKAGE, messages
from pairvol.errors import PairvolError

log = logging.getLogger(__name__)

#: request message -> response message
Handler = Callable[[Any], Awaitable[Any]]


class CsiError(PairvolError):
    """A refusal with its gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        super().__init__(message)


def invalid(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.INVALID_ARGUMENT, message)


def require(value: str, field: str) -> str:
    """A required string field of a request (INVALID_ARGUMENT when empty)."""
    if not value:
        raise invalid(f"{field} is required")
    return value


def socket_path(endpoint: str) -> Path:
    """The socket of ``unix:///abs/path`` (the form the kubelet and the sidecars use)."""
    prefix = "unix://"
    if not endpoint.startswith(prefix) or not endpoint[len(prefix) :].startswith("/"):
        raise ValueError(f"endpoint must be unix:///ABSOLUTE/PATH, got {endpoint!r}")
    return Path(endpoint[len(prefix) :])


def _wrap(service: str, method: str, impl: Handler | None) -> Callable[[Any, aio.ServicerContext], Awaitable[Any]]:
    async def call(request: Any, context: aio.ServicerContext) -> Any:
        if impl is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{service}.{method} is not served by this driver")
        assert impl is not None
        try:
            return await impl(request)
        except CsiError as exc:
            log.info("%s.%s refused (%s): %s", service, method, exc.code.name, exc)
            await context.abort(exc.code, str(exc))
        except Exception as exc:
            log.error("%s.%s failed: %s", service, method, exc)
            log.debug("%s.%s traceback", service, method, exc_info=True)
            await context.abort(grpc.StatusCode.INTERNAL, f"{method} failed: {exc}")
        raise AssertionError("unreachable: abort raises")

    return call


def service(name: str, impls: Mapping[str, Handler]) -> grpc.GenericRpcHandler:
    """A generic handler for ``csi.v1.<name>`` whose methods come from ``impls``."""
    methods = messages().methods(name)
    unknown = set(impls) - {m for m, _, _ in methods}
    if unknown:
        raise ValueError(f"{name} declares no method(s) {sorted(unknown)}")
    handlers = {
        method: grpc.unary_unary_rpc_method_handler(
            _wrap(name, method, impls.get(method)),
            request_deserializer=req.FromString,
            response_serializer=resp.SerializeToString,
        )
        for method, req, resp in methods
    }
    return grpc.method_handlers_generic_handler(f"{PACKAGE}.{name}", handlers)


def _clear_socket(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_socket():
        os.unlink(path)
    elif os.path.lexists(path):
        raise ValueError(f"{path} exists and is not a socket; refusing to replace it")


async def serve(endpoint: str, handlers: list[grpc.GenericRpcHandler]) -> aio.Server:
    """Start serving on ``endpoint``; a stale socket from a previous run is replaced."""
    path = socket_path(endpoint)
    await asyncio.to_thread(_clear_socket, path)
    server = aio.server()
    for handler in handlers:
        server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"unix://{path}")
    await server.start()
    log.info("CSI driver serving on %s", endpoint)
    return server
