"""The driver's protobuf messages, compiled from ``csi.proto`` when first needed.

Why at run time: nothing generated is committed, and a clean clone (CI installs it with
``pip install -e``) must work without a build step. grpcio-tools' protoc writes the file's
descriptor set; the messages are built from it in a private descriptor pool, so they never
clash with another copy of the CSI definitions in the same process (the wire-compatibility
test loads the upstream file next to this one).

Messages are dynamic classes (``Any`` to mypy): the services read and build them only
through :mod:`pairvol.csi.wire`, which gives the rest of the driver typed values.
"""

from __future__ import annotations

import functools
import importlib.resources
import tempfile
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from pairvol.errors import PairvolError

PACKAGE = "csi.v1"
PROTO_NAME = "csi.proto"


class ProtoError(PairvolError):
    """The driver's own protocol definition could not be compiled (a broken install)."""


def _protoc_include() -> str:
    import grpc_tools

    return str(Path(grpc_tools.__file__).parent / "_proto")


def _compile(proto: Path) -> descriptor_pb2.FileDescriptorSet:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory(prefix="pairvol-csi-proto-") as tmp:
        out = Path(tmp) / "csi.desc"
        rc = protoc.main(
            [
                "protoc",
                f"--proto_path={proto.parent}",
                f"--proto_path={_protoc_include()}",
                "--include_imports",
                f"--descriptor_set_out={out}",
                proto.name,
            ]
        )
        if rc != 0 or not out.exists():
            raise ProtoError(f"protoc could not compile {proto} (exit status {rc})")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


class Messages:
    """Message classes by their short name (``Messages.get("NodeStageVolumeRequest")``)."""

    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self._pool = pool

    def get(self, name: str) -> Any:
        try:
            desc = self._pool.FindMessageTypeByName(f"{PACKAGE}.{name}")
        except KeyError as exc:
            raise ProtoError(f"csi.proto declares no message {name}") from exc
        return message_factory.GetMessageClass(desc)

    def methods(self, service: str) -> list[tuple[str, Any, Any]]:
        """(method name, request class, response class) of every RPC of ``service``."""
        desc = self._pool.FindServiceByName(f"{PACKAGE}.{service}")
        return [
            (
                m.name,
                message_factory.GetMessageClass(m.input_type),
                message_factory.GetMessageClass(m.output_type),
            )
            for m in desc.methods
        ]


@functools.cache
def messages() -> Messages:
    """Compile the driver's csi.proto once per process (blocking; call before serving)."""
    with importlib.resources.as_file(importlib.resources.files("pairvol.csi") / PROTO_NAME) as path:
        fds = _compile(Path(path))
    pool = descriptor_pool.DescriptorPool()
    for fd in fds.file:
        pool.Add(fd)
    return Messages(pool)
