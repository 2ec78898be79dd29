"""The CSI driver's gRPC edge: refusals keep their code and text, failures are INTERNAL
with their text, undeclared methods are UNIMPLEMENTED, and the command line refuses bad
flags before serving anything."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from pairvol.csi.proto import messages
from pairvol.csi.server import CsiError, serve, service, socket_path


async def test_refusals_failures_and_unserved_methods_get_their_codes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    m = messages()

    async def refuse(_: Any) -> Any:
        raise CsiError(grpc.StatusCode.FAILED_PRECONDITION, "volume x is not staged; stage it first")

    async def crash(_: Any) -> Any:
        raise RuntimeError("disk on fire")

    async def info(_: Any) -> Any:
        return m.get("GetPluginInfoResponse")(name="pairvol.io")

    endpoint = f"unix://{tmp_path}/csi.sock"
    server = await serve(endpoint, [service("Identity", {"GetPluginInfo": info, "Probe": refuse})])
    server.add_generic_rpc_handlers((service("Node", {"NodeGetInfo": crash}),))
    try:
        async with grpc.aio.insecure_channel(endpoint) as channel:

            async def call(path: str, request: Any) -> Any:
                method = channel.unary_unary(
                    path, request_serializer=lambda r: r.SerializeToString(), response_deserializer=lambda b: b
                )
                return await method(request, timeout=10)

            reply = m.get("GetPluginInfoResponse").FromString(
                await call("/csi.v1.Identity/GetPluginInfo", m.get("GetPluginInfoRequest")())
            )
            assert reply.name == "pairvol.io"
            cases = [
                ("/csi.v1.Identity/Probe", "ProbeRequest", grpc.StatusCode.FAILED_PRECONDITION, "stage it first"),
                ("/csi.v1.Node/NodeGetInfo", "NodeGetInfoRequest", grpc.StatusCode.INTERNAL, "disk on fire"),
                (
                    "/csi.v1.Identity/GetPluginCapabilities",
                    "GetPluginCapabilitiesRequest",
                    grpc.StatusCode.UNIMPLEMENTED,
                    "not served",
                ),
                ("/csi.v1.Node/NodeExpandVolume", "NodeGetInfoRequest", grpc.StatusCode.UNIMPLEMENTED, ""),
            ]
            with caplog.at_level(logging.INFO, logger="pairvol.csi.server"):
                for path, request, code, text in cases:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call(path, m.get(request)())
                    assert err.value.code() == code and text in (err.value.details() or ""), path
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert [r.getMessage() for r in errors] == ["Node.NodeGetInfo failed: disk on fire"]
    finally:
        await server.stop(None)


async def test_a_file_in_the_sockets_place_is_not_replaced(tmp_path: Path) -> None:
    (tmp_path / "csi.sock").write_text("not a socket")
    with pytest.raises(ValueError, match="not a socket"):
        await serve(f"unix://{tmp_path}/csi.sock", [])
    assert (tmp_path / "csi.sock").read_text() == "not a socket"


def test_a_service_cannot_claim_methods_csi_proto_does_not_declare() -> None:
    async def nothing(_: Any) -> Any:
        return None

    with pytest.raises(ValueError, match="NodeFrobnicate"):
        service("Node", {"NodeFrobnicate": nothing})


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:1", "unix://relative.sock", "/abs/csi.sock"])
def test_endpoints_are_unix_sockets_by_absolute_path(endpoint: str) -> None:
    with pytest.raises(ValueError, match="unix:///ABSOLUTE/PATH"):
        socket_path(endpoint)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--mode", "node", "--endpoint", "unix:///tmp/x.sock"], "--node-id must name this node"),
        (["--mode", "node", "--endpoint", "tcp://x", "--node-id", "n"], "unix:///ABSOLUTE/PATH"),
        (["--mode", "node", "--endpoint", "unix:///tmp/x.sock", "--node-id", "n", "--state-dir", "rel"], "absolute"),
        (["--mode", "controller", "--endpoint", "unix:///tmp/x.sock", "--volume-namespace", "Bad_NS"], "namespace"),
        (
            ["--mode", "node", "--endpoint", "unix:///tmp/x.sock", "--node-id", "n", "--unstage-flush-timeout", "0"],
            "more than 0",
        ),
    ],
)
def test_bad_flags_exit_2_with_one_line_before_serving(args: list[str], says: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pairvol", "csi", *args], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], proc.stderr
    assert not Path("/tmp/x.sock").exists()
