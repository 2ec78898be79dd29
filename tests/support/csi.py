"""The CSI driver in tests: its processes, started with the privileges of their pods, and
clients compiled from the upstream CSI definitions, as the kubelet and the sidecars have.

The upstream ``csi.proto`` (v1.12.0) is not part of the repository: it is found next to the
checkout as ``<repo>/../shared/csi/csi.proto`` (or at ``$PAIRVOL_CSI_REFERENCE``). When it is
there, every CSI test calls the driver through stubs generated from it. In a clone without
it (CI), the tests call through stubs generated from the driver's own definition instead,
and only the comparison of the two definitions (test_csi_wire.py) skips, on CI too
(tests/support/ci.py, OUTSIDE_REPOSITORY).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import shlex
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

from pairvol.aio import bounded
from pairvol.csi.attach import run
from pairvol.csi.attacher_host import HostAttachers
from pairvol.csi.manifests import ATTACHER_HOST_CONTAINER, ATTACHER_HOST_SOCKET, NODE_PLUGIN_CONTAINER, node_pod
from pairvol.localcluster.csi_plugins import make_shared
from pairvol.localcluster.kubelet import _prepare_cgroup_root, _sweep_cgroup_tree, own_bounding_set
from pairvol.localcluster.kubelet_pods import SecurityPlan, security_plan
from tests.support.agents import SLOWDOWN
from tests.support.ci import REPO, outside_repository, unavailable


def reference_proto() -> Path | None:
    env = os.environ.get("PAIRVOL_CSI_REFERENCE")
    path = Path(env) if env else REPO.parent / "shared" / "csi" / "csi.proto"
    return path if path.is_file() else None


OWN_PROTO = Path(__file__).resolve().parents[2] / "operator" / "pairvol" / "csi" / "csi.proto"


def require_reference() -> Path:
    proto = reference_proto()
    if proto is None:
        outside_repository(
            f"the upstream CSI reference {REPO.parent / 'shared' / 'csi' / 'csi.proto'} is not next to this "
            "checkout (set PAIRVOL_CSI_REFERENCE to a csi.proto v1.12.0)"
        )
    return proto


@dataclass(frozen=True)
class Stubs:
    """Messages and stubs generated from a csi.proto; ``upstream``: from the reference."""

    pb: ModuleType
    grpc: ModuleType
    upstream: bool


def compile_stubs(out: Path) -> Stubs:
    """Generate Python modules from the upstream csi.proto (else the driver's own) into
    ``out`` and import them (once per process: the generated module registers itself in
    protobuf's default pool)."""
    proto = reference_proto() or OWN_PROTO
    if "csi_pb2" not in sys.modules:
        import grpc_tools
        from grpc_tools import protoc

        include = Path(grpc_tools.__file__).parent / "_proto"
        out.mkdir(parents=True, exist_ok=True)
        rc = protoc.main(
            [
                "protoc",
                f"--proto_path={proto.parent}",
                f"--proto_path={include}",
                f"--python_out={out}",
                f"--grpc_python_out={out}",
                proto.name,
            ]
        )
        assert rc == 0, f"protoc failed on {proto}"
        sys.path.insert(0, str(out))
    pb = importlib.import_module("csi_pb2")
    return Stubs(pb=pb, grpc=importlib.import_module("csi_pb2_grpc"), upstream=hasattr(pb, "ListVolumesRequest"))


async def call_raw(channel: grpc.aio.Channel, path: str, body: bytes = b"") -> bytes:
    """A unary call by its path with an encoded request: for methods a stub may lack."""
    method = channel.unary_unary(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    result: bytes = await method(body, timeout=30)
    return result


def node_plugin_security(node: str = "node-a") -> SecurityPlan:
    """How a node's container runtime starts the node plugin: privileged means every
    capability this machine can pass on (as the node simulator grants it)."""
    return _container_security(node, NODE_PLUGIN_CONTAINER)


def attacher_host_security(node: str = "node-a") -> SecurityPlan:
    """How a node's container runtime starts the attacher host (privileged, as the plugin)."""
    return _container_security(node, ATTACHER_HOST_CONTAINER)


def _container_security(node: str, name: str) -> SecurityPlan:
    pod = node_pod(node)
    (container,) = [c for c in pod["spec"]["containers"] if c["name"] == name]
    return security_plan(pod, container, own_bounding_set())


@dataclass
class Driver:
    """A running ``pairvol csi`` process and a channel to its socket."""

    proc: asyncio.subprocess.Process
    socket: Path
    log_path: Path
    channel: grpc.aio.Channel

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@contextlib.asynccontextmanager
async def driver(
    tmp: Path,
    mode: str,
    *args: str,
    security: SecurityPlan | None = None,
    name: str = "csi",
    env: Mapping[str, str] | None = None,
    cgroup: Path | None = None,
) -> AsyncIterator[Driver]:
    """Start ``pairvol csi --mode MODE`` on a socket under ``tmp`` (with ``env``, else this
    process's environment; in ``cgroup``, as a container's processes are); stopped by PID."""
    socket = tmp / f"{name}.sock"
    log_path = tmp / f"{name}.log"
    argv = [sys.executable, "-m", "pairvol", "-v", "csi", "--mode", mode, "--endpoint", f"unix://{socket}", *args]
    if security is not None:
        argv = [*security.setpriv_argv(), *argv]
    argv = in_cgroup(argv, cgroup)
    with log_path.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=log, stderr=log, start_new_session=True, env=dict(env) if env is not None else None
        )
    channel: grpc.aio.Channel | None = None
    try:
        deadline = asyncio.get_running_loop().time() + 30 * SLOWDOWN  # a Python start-up under emulation: longer
        while not socket.exists():
            if proc.returncode is not None or asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"pairvol csi did not start: {log_path.read_text(errors='replace')[-2000:]}")
            await asyncio.sleep(0.05)
        channel = grpc.aio.insecure_channel(f"unix://{socket}")
        yield Driver(proc, socket, log_path, channel)
    finally:
        if channel is not None:
            await channel.close()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await bounded(proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()


def in_cgroup(argv: list[str], cgroup: Path | None) -> list[str]:
    """``argv`` started in ``cgroup`` (so is every process it starts)."""
    if cgroup is None:
        return argv
    return ["/bin/sh", "-c", f"echo $$ > {shlex.quote(str(cgroup / 'cgroup.procs'))}\nexec {shlex.join(argv)}"]


@contextlib.contextmanager
def container_cgroups() -> Iterator[Callable[[str], Path]]:
    """``cgroup(name)``: a new cgroup (v2) per container, as a container runtime gives each
    container; whatever is left in them is killed at the end. Without cgroup v2 and
    cgroup.kill the test cannot kill a container as a runtime does: unavailable."""
    root = _prepare_cgroup_root(f"csitest{os.getpid()}")
    if root is None:
        unavailable("needs cgroup v2 with cgroup.kill (kernel >= 5.14) to kill a container's processes")

    def cgroup(name: str) -> Path:
        path = root / name
        path.mkdir(exist_ok=True)
        return path

    try:
        yield cgroup
    finally:
        _sweep_cgroup_tree(root)


@dataclass
class Host:
    """A running attacher host."""

    proc: asyncio.subprocess.Process
    socket: Path
    log_path: Path
    attachers: HostAttachers


@contextlib.asynccontextmanager
async def attacher_host(
    tmp: Path, state_dir: Path, security: SecurityPlan, cgroup: Path | None = None, name: str = "attacher-host"
) -> AsyncIterator[Host]:
    """``pairvol csi attacher-host`` with the privileges of its container, its socket in
    the state directory as the chart puts it; stopped by PID."""
    socket = state_dir / ATTACHER_HOST_SOCKET
    log_path = tmp / f"{name}.log"
    argv = [
        *security.setpriv_argv(), sys.executable, "-m", "pairvol", "-v", "csi", "attacher-host",
        "--socket", str(socket), "--state-dir", str(state_dir),
    ]  # fmt: skip
    with log_path.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            *in_cgroup(argv, cgroup), stdout=log, stderr=log, start_new_session=True
        )
    try:
        attachers = HostAttachers(socket)
        await attachers.wait_ready(30 * SLOWDOWN)
        yield Host(proc, socket, log_path, attachers)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            await proc.wait()


async def call(stub: Any, method: str, request: Any, timeout: float = 60) -> Any:
    """One unary call; a refusal raises grpc.aio.AioRpcError (``.code()``, ``.details()``)."""
    return await getattr(stub, method)(request, timeout=timeout)


@contextlib.asynccontextmanager
async def shared_mounts(*paths: Path) -> AsyncIterator[None]:
    """Each of ``paths`` bound onto itself as a shared mount for the block, as a node's kubelet
    directory is (the chart's Bidirectional propagation): an agent or pod started meanwhile
    gets copies of the plugin's mounts that its unmounts reach; then unmounted."""
    for path in paths:
        await make_shared(path)
    try:
        yield
    finally:
        for path in reversed(paths):
            await run("umount", "-l", str(path), check=False)
