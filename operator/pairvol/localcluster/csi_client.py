"""A CSI client for the local cluster's kubelets, provisioner and registrar: gRPC calls on a
plugin's unix socket, as the real kubelet and sidecars make them.

Why a client of our own: the sidecars and the kubelet are Go programs that are not
available here, so the local cluster plays their part and must speak the same protocol to
the same socket. Requests and responses are written as the JSON mapping of the CSI
messages (``{"volumeId": ..., "volumeCapability": {...}}``), converted with protobuf's
``json_format`` to the driver's own message definitions (:mod:`pairvol.csi.proto`; their
wire compatibility with the upstream ``csi.proto`` is tested in
``tests/integration/test_csi_wire.py``).

A refusal raises :class:`CsiCallError` with the gRPC code and the plugin's text, which
the callers show as the kubelet and the sidecars do (``rpc error: code = X desc = Y``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from google.protobuf import json_format
from grpc import aio

from pairvol.csi.proto import PACKAGE, messages
from pairvol.errors import PairvolError

JsonDict = dict[str, Any]

#: codes after which the external-provisioner calls CreateVolume again for the same claim
#: (the operation may still be going on, or the plugin was briefly unreachable)
TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
    }
)


class CsiCallError(PairvolError):
    """A CSI call failed: ``code`` is the gRPC status code, the text the plugin's."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        self.method = method
        self.code = code
        self.details = details
        super().__init__(f"rpc error: code = {_code_name(code)} desc = {details}")

    @property
    def transient(self) -> bool:
        return self.code in TRANSIENT_CODES


def _code_name(code: grpc.StatusCode) -> str:
    """gRPC's spelling of a code (``Aborted``, ``FailedPrecondition``), as Go prints it."""
    return "".join(part.capitalize() for part in code.name.split("_"))


class CsiClient:
    """Calls to the CSI plugin listening on ``socket``; ``async with CsiClient(path) as c``."""

    def __init__(self, socket: Path, timeout: float = 60.0) -> None:
        self.socket = socket
        self.timeout = timeout
        self._channel: aio.Channel | None = None

    async def __aenter__(self) -> CsiClient:
        await asyncio.to_thread(messages)  # compiles csi.proto once per process
        self._channel = aio.insecure_channel(f"unix://{self.socket}")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()

    async def call(self, service: str, method: str, request: JsonDict, timeout: float | None = None) -> JsonDict:
        """One unary call, ``request`` and the answer in the JSON mapping of the messages."""
        if self._channel is None:
            raise PairvolError(f"CSI client for {self.socket} is not open (use `async with`)")
        found = [(req, resp) for name, req, resp in messages().methods(service) if name == method]
        if not found:
            raise PairvolError(f"the driver's csi.proto has no {service}.{method}")
        request_cls, response_cls = found[0]
        message = json_format.ParseDict(request, request_cls())
        stub = self._channel.unary_unary(
            f"/{PACKAGE}.{service}/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )
        try:
            answer = await stub(message, timeout=timeout or self.timeout)
        except aio.AioRpcError as exc:
            raise CsiCallError(method, exc.code(), exc.details() or "") from exc
        result: JsonDict = json_format.MessageToDict(answer)
        return result
