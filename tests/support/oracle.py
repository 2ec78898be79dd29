"""A reference oracle for the data path: QEMU's own replication driver, no VM.

pairvol re-implements ``block/replication.c`` (secondary mode) with QMP primitives on a
qemu-storage-daemon. The only way to know that the re-implementation means the same thing
as the original is to run the original next to it: ``qemu-system-x86_64 -M none`` (no
guest, no CPU runs) accepts the same ``-blockdev`` graph a COLO secondary uses::

    NBD export "secondary" ──► secondary-disk (raw) ◄── hidden-disk (qcow2) ◄── active-disk (qcow2)
                                                                                   ▲ file
                                                   replication (mode=secondary, top-id=replication)

and drives it with ``xen-set-replication`` / ``xen-colo-do-checkpoint`` /
``query-xen-replication-status``. The "primary" is whoever writes into the NBD export,
exactly like the COLO primary's NBD client. After a failover the driver commits
active+hidden into the raw file; :meth:`Oracle.failover` waits for the driver's stage
DONE (visible in the block graph: the filter's only child is then the secondary disk)
so the raw file can be read as the result.

The module has two halves: pure trace generation and an in-memory model (no I/O), and
the :class:`Oracle` process wrapper (async I/O; the process is always killed by PID).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import random
import shutil
import signal
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError
from qemu.qmp.qmp_client import ExecuteError

from pairvol.aio import bounded
from pairvol.errors import PairvolError
from pairvol.nbd import NBDClient
from pairvol.qemu import img

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    """If the test process dies (even by SIGKILL), its oracle QEMU dies too."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

SECTOR = 512
CLUSTER = 64 * 1024  # qcow2 cluster size of the overlays on both sides

#: QMP commands the oracle needs; a QEMU built without CONFIG_REPLICATION/COLO lacks them.
REQUIRED_COMMANDS = frozenset(
    {"xen-set-replication", "xen-colo-do-checkpoint", "query-xen-replication-status", "x-debug-query-block-graph"}
)

# seeds' texts (block/replication.c), as QEMU reports them
RUNNING_OR_DONE = "Block replication is running or done"
NOT_RUNNING = "Block replication is not running"


class OracleError(PairvolError):
    """The reference oracle (QEMU's replication driver) failed; the text says how."""


class OracleUnavailable(OracleError):
    """This machine's QEMU cannot act as the oracle (missing binary, command or driver)."""


class OracleCommandError(OracleError):
    """QEMU refused a QMP command; ``desc`` is QEMU's own error text."""

    def __init__(self, command: str, desc: str) -> None:
        super().__init__(f"{command}: {desc}")
        self.command = command
        self.desc = desc


# --------------------------------------------------------------------------- traces (pure)


@dataclass(frozen=True)
class Write:
    """A primary write: ``data`` at ``offset`` (both sector aligned)."""

    offset: int
    data: bytes

    def __repr__(self) -> str:
        return f"Write(offset={self.offset}, length={len(self.data)})"


@dataclass(frozen=True)
class Zero:
    """NBD_CMD_WRITE_ZEROES: the range reads as zeros afterwards. ``may_unmap`` leaves out
    NBD_CMD_FLAG_NO_HOLE, so the server may punch a hole (a discard that must still be
    undone by a checkpoint failover)."""

    offset: int
    length: int
    may_unmap: bool


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint on the secondary, cut while no write is in flight."""


Op = Write | Zero | Checkpoint


def _extent(op: Write | Zero) -> tuple[int, int]:
    return (op.offset, op.offset + (len(op.data) if isinstance(op, Write) else op.length))


def _apply(image: bytearray, op: Write | Zero) -> None:
    lo, hi = _extent(op)
    image[lo:hi] = op.data if isinstance(op, Write) else bytes(hi - lo)


@dataclass(frozen=True)
class Trace:
    """Writes and checkpoints after replication started; a checkpoint-mode failover follows."""

    seed: int
    size: int
    ops: tuple[Op, ...]

    @property
    def checkpoints(self) -> int:
        return sum(1 for op in self.ops if isinstance(op, Checkpoint))

    @property
    def writes(self) -> int:
        return sum(1 for op in self.ops if isinstance(op, Write))

    @property
    def zeroes(self) -> int:
        return sum(1 for op in self.ops if isinstance(op, Zero))

    def describe(self) -> str:
        written = sum(len(op.data) for op in self.ops if isinstance(op, Write))
        return (
            f"trace seed={self.seed}: {self.writes} writes ({written} bytes), {self.zeroes} write-zeroes, "
            f"{self.checkpoints} checkpoints "
            f"on a {self.size}-byte volume (reproduce: PAIRVOL_ORACLE_SEEDS={self.seed})"
        )


def random_trace(
    seed: int, size: int, writes: int = 48, max_checkpoints: int = 4, checkpoints: int | None = None
) -> Trace:
    """A random trace that can tell checkpoint semantics apart.

    Offsets and lengths are sector aligned and often straddle qcow2 cluster boundaries
    (partial-cluster copy-before-write), half of the writes hit a small hot region so that
    clusters are overwritten within and across checkpoints, some are NBD write-zeroes
    (some of which may punch holes), some write zero bytes, one touches the last sector.
    The trace ends with writes after its last checkpoint, so
    "commit the overlays" (checkpoint state) and "keep everything" (latest) differ.
    ``checkpoints`` fixes their number (default: 0 to ``max_checkpoints``, at random).
    """
    if size % SECTOR or size < 4 * CLUSTER:
        raise ValueError(f"volume size {size} must be a multiple of {SECTOR} and at least {4 * CLUSTER}")
    rng = random.Random(seed)
    hot = min(size, 8 * CLUSTER)
    count = rng.randint(0, max_checkpoints)
    if checkpoints is not None:
        count = checkpoints
    if not 0 <= count <= writes - 2:
        raise ValueError(f"{count} checkpoints do not fit between {writes} writes")
    cut_after = sorted(rng.sample(range(1, writes - 1), count)) if count else []
    ops: list[Op] = []
    for i in range(writes):
        shape = rng.random()
        if shape < 0.4:
            length = rng.randint(1, 16) * SECTOR
        elif shape < 0.8:
            length = rng.randint(1, 3 * CLUSTER // SECTOR) * SECTOR
        else:
            length = rng.randint(1, 8) * CLUSTER
        length = min(length, size)
        region = hot if rng.random() < 0.5 else size
        region = max(region, length)
        if i == writes // 2:
            offset = size - length  # the last sector is written at least once
        elif rng.random() < 0.3:
            # start just before a cluster boundary so the write straddles it
            boundary = rng.randrange(CLUSTER, region, CLUSTER) if region > CLUSTER else 0
            offset = max(0, min(boundary - rng.randint(1, 8) * SECTOR, size - length))
        else:
            offset = rng.randrange(0, region - length + 1, SECTOR)
        kind = rng.random()
        if kind < 0.1:
            ops.append(Zero(offset, length, may_unmap=rng.random() < 0.5))
        else:
            ops.append(Write(offset, bytes(length) if kind < 0.15 else rng.randbytes(length)))
        if i + 1 in cut_after:
            ops.append(Checkpoint())
    return Trace(seed, size, tuple(ops))


def image_at_last_checkpoint(trace: Trace, base: bytes | None = None) -> bytes:
    """The model: what a checkpoint-mode failover must leave (the volume at the last
    checkpoint; replication start is checkpoint 0)."""
    image = bytearray(base if base is not None else bytes(trace.size))
    at_checkpoint = bytes(image)
    for op in trace.ops:
        if isinstance(op, Checkpoint):
            at_checkpoint = bytes(image)
        else:
            _apply(image, op)
    return at_checkpoint


def latest_image(trace: Trace, base: bytes | None = None) -> bytes:
    """The model's image with every write applied (what a latest-mode failover keeps)."""
    image = bytearray(base if base is not None else bytes(trace.size))
    for op in trace.ops:
        if not isinstance(op, Checkpoint):
            _apply(image, op)
    return bytes(image)


def without_checkpoint(trace: Trace, index: int) -> Trace:
    """The same trace with its ``index``-th checkpoint (0-based) dropped."""
    ops: list[Op] = []
    seen = 0
    for op in trace.ops:
        if isinstance(op, Checkpoint):
            seen += 1
            if seen - 1 == index:
                continue
        ops.append(op)
    return Trace(trace.seed, trace.size, tuple(ops))


def difference(a: bytes, b: bytes, unit: int = SECTOR) -> str | None:
    """None if equal, else a short description of where two images differ."""
    if a == b:
        return None
    if len(a) != len(b):
        return f"lengths differ: {len(a)} != {len(b)}"
    bad = [off for off in range(0, len(a), unit) if a[off : off + unit] != b[off : off + unit]]
    ranges: list[tuple[int, int]] = []
    for off in bad:
        if ranges and ranges[-1][1] == off:
            ranges[-1] = (ranges[-1][0], off + unit)
        else:
            ranges.append((off, off + unit))
    shown = ", ".join(f"[{lo:#x}, {hi:#x})" for lo, hi in ranges[:6])
    more = f" and {len(ranges) - 6} more ranges" if len(ranges) > 6 else ""
    return f"{len(bad)} of {len(a) // unit} sectors differ: {shown}{more}"


class TraceClient(NBDClient):
    """pairvol's NBD client that applies trace operations."""

    @classmethod
    async def open_unix(cls, path: str, export: str = "volume") -> TraceClient:
        client = await cls.connect_unix(path, export)
        assert isinstance(client, TraceClient)
        return client

    async def __aenter__(self) -> TraceClient:
        return self

    async def apply(self, op: Write | Zero) -> None:
        if isinstance(op, Write):
            await self.pwrite(op.data, op.offset)
        else:
            await self.write_zeroes(op.offset, op.length, op.may_unmap)


async def replay(
    trace: Trace, client: TraceClient, checkpoint: Callable[[], Awaitable[object]], depth: int = 1
) -> None:
    """Apply a trace: its writes through ``client``, its checkpoints with ``checkpoint()``.

    Up to ``depth`` writes are in flight at once, but never two that overlap, so the
    result does not depend on completion order; every write is acknowledged before a
    checkpoint starts and none is issued until it returns (writes quiesced around each
    checkpoint, as QEMU's driver needs).
    """
    pending: list[tuple[int, int, asyncio.Future[None]]] = []

    async def drain() -> None:
        try:
            await asyncio.gather(*(fut for _, _, fut in pending))
        finally:
            pending.clear()

    try:
        for op in trace.ops:
            if isinstance(op, Checkpoint):
                await drain()
                await checkpoint()
                continue
            lo, hi = _extent(op)
            if len(pending) >= depth or any(lo < end and start < hi for start, end, _ in pending):
                await drain()
            pending.append((lo, hi, asyncio.ensure_future(client.apply(op))))
        await drain()
    finally:
        for _, _, fut in pending:
            fut.cancel()


# --------------------------------------------------------------------------- the QEMU process


class Oracle:
    """One ``qemu-system-x86_64 -M none`` holding COLO's secondary block graph.

    Use as an async context manager; the process is killed by its PID on exit, whatever
    happened in between.
    """

    EXPORT = "secondary"
    TOP = "replication"

    def __init__(self, workdir: Path, size: int, binary: str = "qemu-system-x86_64") -> None:
        self.workdir = workdir
        self.size = size
        self.binary = binary
        self.disk_path = workdir / "secondary.raw"
        self.hidden_path = workdir / "hidden.qcow2"
        self.active_path = workdir / "active.qcow2"
        self.log_path = workdir / "qemu.log"
        self.run_dir: Path | None = None  # short path for unix sockets (108-byte limit)
        self.proc: asyncio.subprocess.Process | None = None
        self.qmp = QMPClient("oracle")
        self.version = "unknown"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def nbd_socket(self) -> Path:
        assert self.run_dir is not None, "oracle not started"
        return self.run_dir / "nbd.sock"

    def blockdev_graph(self) -> list[dict[str, Any]]:
        """COLO's secondary graph (docs/COLO-FT.txt), spelled as -blockdev options."""

        def file(path: Path) -> dict[str, Any]:
            return {"driver": "file", "filename": str(path)}

        return [
            {"driver": "raw", "node-name": "secondary-disk", "file": file(self.disk_path)},
            {
                "driver": "qcow2",
                "node-name": "hidden-disk",
                "file": file(self.hidden_path),
                "backing": "secondary-disk",
            },
            {"driver": "qcow2", "node-name": "active-disk", "file": file(self.active_path), "backing": "hidden-disk"},
            {
                "driver": "replication",
                "node-name": self.TOP,
                "mode": "secondary",
                "top-id": self.TOP,
                "file": "active-disk",
            },
        ]

    async def __aenter__(self) -> Oracle:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self, timeout: float = 15.0) -> None:
        exe = shutil.which(self.binary)
        if exe is None:
            raise OracleUnavailable(
                f"{self.binary} not found on PATH: the oracle needs QEMU's system emulator "
                "(Debian: apt-get install qemu-system-x86)"
            )
        await asyncio.to_thread(self.workdir.mkdir, parents=True, exist_ok=True)
        self.run_dir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=f"pv-oracle-{os.getpid()}-"))
        await img.create(self.disk_path, "raw", self.size)
        await img.create(self.hidden_path, "qcow2", self.size)
        await img.create(self.active_path, "qcow2", self.size)
        qmp_path = self.run_dir / "qmp.sock"
        argv = [exe, "-M", "none", "-nodefaults", "-display", "none", "-qmp", f"unix:{qmp_path},server=on,wait=off"]
        for node in self.blockdev_graph():
            argv += ["-blockdev", json.dumps(node)]
        logfile = await asyncio.to_thread(open, self.log_path, "ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logfile,
                stderr=logfile,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            logfile.close()
        log.debug("oracle qemu pid %d: %s", self.proc.pid, " ".join(argv))
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if self.proc.returncode is not None:
                text = await self._log_text()
                if "replication" in text and ("Unknown driver" in text or "Invalid parameter" in text):
                    raise OracleUnavailable(f"this QEMU has no 'replication' block driver: {text.strip()}")
                raise OracleError(f"{self.binary} exited with status {self.proc.returncode}: {text.strip()}")
            if not await asyncio.to_thread(qmp_path.exists):
                if asyncio.get_running_loop().time() > deadline:
                    raise OracleError(f"{self.binary} did not create its QMP socket {qmp_path} in {timeout} s")
                await asyncio.sleep(0.02)
                continue
            try:
                await self.qmp.connect(str(qmp_path))
                break
            except (OSError, QMPError) as exc:
                if asyncio.get_running_loop().time() > deadline:
                    raise OracleError(f"cannot connect to the oracle's QMP socket {qmp_path}: {exc}") from exc
                await asyncio.sleep(0.02)
        info = await self.execute("query-version")
        self.version = f"{info['qemu']['major']}.{info['qemu']['minor']}.{info['qemu']['micro']} {info['package']}"
        commands = {c["name"] for c in await self.execute("query-commands")}
        missing = sorted(REQUIRED_COMMANDS - commands)
        if missing:
            raise OracleUnavailable(
                f"QEMU {self.version} lacks the QMP commands {', '.join(missing)} (built without "
                "CONFIG_REPLICATION/COLO): QEMU's replication driver cannot serve as the oracle here"
            )
        # The driver insists that the secondary disk has a BlockBackend: the NBD export
        # the primary writes into provides it, as in COLO.
        await self.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(self.nbd_socket)}}})
        await self.execute(
            "block-export-add",
            {"type": "nbd", "id": self.EXPORT, "node-name": "secondary-disk", "name": self.EXPORT, "writable": True},
        )

    async def _log_text(self) -> str:
        def read() -> str:
            try:
                return self.log_path.read_text(errors="replace")[-2000:]
            except OSError:
                return ""

        return await asyncio.to_thread(read)

    async def execute(self, command: str, args: dict[str, Any] | None = None) -> Any:
        try:
            return await self.qmp.execute(command, args)
        except ExecuteError as exc:
            raise OracleCommandError(command, str(exc.error.error.desc)) from exc
        except (QMPError, OSError, EOFError) as exc:
            tail = await self._log_text()
            raise OracleError(f"{command}: lost the oracle's QMP connection: {exc!r}; qemu log: {tail}") from exc

    # replication.c through QMP ------------------------------------------------------------

    async def start_replication(self) -> None:
        """replication_start(secondary): backup job secondary → hidden, then a checkpoint."""
        await self.execute("xen-set-replication", {"enable": True, "primary": False})

    async def checkpoint(self) -> None:
        await self.execute("xen-colo-do-checkpoint")

    async def stop_replication(self) -> None:
        """replication_stop(failover=false)."""
        await self.execute("xen-set-replication", {"enable": False, "primary": False})

    async def request_failover(self) -> None:
        """replication_stop(failover=true). QEMU swallows this command's errors."""
        await self.execute("xen-set-replication", {"enable": False, "primary": False, "failover": True})

    async def replication_error(self) -> str | None:
        """query-xen-replication-status: the driver's get_error text, None if no error."""
        status = await self.execute("query-xen-replication-status")
        return str(status.get("desc", "error")) if status.get("error") else None

    async def filter_children(self) -> dict[str, str]:
        """The replication filter's children in the live graph: {child role: node name}."""
        graph = await self.execute("x-debug-query-block-graph")
        names = {node["id"]: node["name"] for node in graph["nodes"]}
        top = [nid for nid, name in names.items() if name == self.TOP]
        if not top:
            raise OracleError(f"the replication node {self.TOP!r} is missing from the block graph")
        return {e["name"]: names.get(e["child"], "?") for e in graph["edges"] if e["parent"] == top[0]}

    async def wait_done(self, timeout: float = 30.0) -> None:
        """Wait for stage DONE after a failover request.

        QEMU's internal jobs send no events, so the stage is read from the block graph:
        during FAILOVER the filter's ``file`` child is the commit job's filter node; at DONE
        ``replication_done`` has dropped the hidden/secondary children and the filter sits
        directly on the secondary disk; at FAILOVER_FAILED the job is gone and ``file`` is
        the active disk again. (get_error is no guide during FAILOVER: cancelling the backup
        job before the stage changes sets the driver's error until the commit succeeds.)
        """
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            children = await self.filter_children()
            if children == {"file": "secondary-disk"}:
                return
            if children.get("file") == "active-disk":
                error = await self.replication_error()
                raise OracleError(
                    f"QEMU's failover did not run or failed (stage FAILOVER_FAILED?): error {error!r}, "
                    f"filter children {children}"
                )
            if asyncio.get_running_loop().time() > deadline:
                raise OracleError(
                    f"QEMU's failover commit did not finish within {timeout} s; filter children {children}"
                )
            await asyncio.sleep(0.02)

    async def failover(self, timeout: float = 30.0) -> bytes:
        """Fail over in checkpoint mode, wait for stage DONE, return the raw disk's bytes."""
        await self.request_failover()
        await self.wait_done(timeout)
        return await self.read_disk()

    async def read_disk(self) -> bytes:
        return await asyncio.to_thread(self.disk_path.read_bytes)

    async def nbd(self) -> TraceClient:
        """A client on the secondary disk's export: the COLO primary's NBD connection."""
        return await TraceClient.open_unix(str(self.nbd_socket), export=self.EXPORT)

    async def close(self) -> None:
        """Quit QEMU (or kill it by PID) and remove the socket directory."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await bounded(self.qmp.execute("quit"), 2.0)
            try:
                await bounded(self.proc.wait(), 5.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        if self.run_dir is not None:
            await asyncio.to_thread(shutil.rmtree, self.run_dir, True)
