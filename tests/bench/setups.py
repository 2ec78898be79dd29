"""The three data paths under test, each an async context manager that yields the unix
socket of a writable NBD export named ``volume``:

* (a) ``bare``: one qemu-storage-daemon exporting a raw file. The floor: what NBD + qsd
  + the page cache cost without any replication.
* (b) ``quorum``: what pairvol builds, by hand and without pairvol's logic: a primary qsd
  with quorum(vote-threshold=1) over its raw file and an NBD client to a second qsd that
  exports a raw file over TCP loopback (optionally TLS-PSK). This is the price of
  synchronous replication itself; (c)/(b) is the price of pairvol on top of it.
* (c) ``pairvol``: two real ``pairvol agent`` processes (tests.support.agents), primary
  replicating to secondary with ``sync: none``; the secondary runs copy-before-write into
  its hidden overlay exactly as in production.

(a) and (b) are driven over QMP with the project's thin process wrapper
(pairvol.qemu.qsd.Qsd: start, QMP connect, kill by PID) but with their own block graphs,
and as stock QEMU: without the allocator settings pairvol starts its own daemons with
(``Qsd.tuned_malloc``; ``a-bare-tuned`` shows what they give a bare export);
their leaf file nodes use the agent's own options (``recipes.file_node``: aio=threads,
discard=unmap, default writeback cache) so that the comparison differs only in the graph
above the files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pairvol.agent import tcpexport
from pairvol.qemu import img, listen
from pairvol.qemu import recipes as r
from pairvol.qemu.qsd import Qsd
from tests.bench.errors import BenchError
from tests.support.agents import Agent, free_port, pair, write_psk

log = logging.getLogger(__name__)

PSK_USER = "pairvol"
TLS_ID = "tls0"


@dataclass
class Target:
    """One running data path: where the workload connects, and what runs it."""

    name: str
    socket: Path
    size: int
    pids: list[int] = field(default_factory=list)
    primary: Agent | None = None
    secondary: Agent | None = None
    #: the processes of the replica's "node" (the second qsd and its listener, the secondary
    #: agent with its daemons): what ``--two-nodes`` moves to a CPU of its own
    remote_pids: list[int] = field(default_factory=list)


def pin_trees(pids: Sequence[int], cpus: set[int]) -> int:
    """Bind every thread of ``pids`` and of all their descendants to ``cpus`` (threads and
    children made later inherit it). Returns how many threads were bound."""
    bound = 0
    todo = list(pids)
    while todo:
        pid = todo.pop()
        try:
            tids = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
        except FileNotFoundError:
            continue
        for tid in tids:
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(tid, cpus)
                bound += 1
            with contextlib.suppress(FileNotFoundError):
                todo += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    return bound


async def _write_psk_dir(directory: Path, key_hex: str) -> Path:
    def write() -> Path:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        keys = directory / "keys.psk"
        keys.write_text(f"{PSK_USER}:{key_hex}\n")
        keys.chmod(0o600)
        return directory

    return await asyncio.to_thread(write)


def _tls_object(directory: Path, endpoint: str) -> dict[str, Any]:
    args: dict[str, Any] = {"qom-type": "tls-creds-psk", "id": TLS_ID, "dir": str(directory), "endpoint": endpoint}
    if endpoint == "client":
        args["username"] = PSK_USER
    return args


@contextlib.asynccontextmanager
async def _qsd(
    workdir: Path, name: str, args: Sequence[str] = (), pass_fds: Sequence[int] = (), tuned_malloc: bool = False
) -> AsyncIterator[Qsd]:
    """A qemu-storage-daemon, killed by PID on exit; with glibc's default allocator settings
    (stock QEMU, as a user runs it) unless ``tuned_malloc`` (pairvol's, ``Qsd.tuned_malloc``).

    Killed, not quit: a clean quit flushes gigabytes of dirty page cache to the disk,
    which takes long on a busy machine and slows the next configuration down; the
    images are thrown away right after, which drops their dirty pages unwritten.
    """
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    qsd = Qsd(workdir / ".run", workdir / "qsd.log", name=name, tuned_malloc=tuned_malloc)
    try:
        await qsd.start(args=args, pass_fds=pass_fds)
        yield qsd
    finally:
        await qsd.kill()


async def _add_disk(qsd: Qsd, workdir: Path, size: int) -> None:
    disk = workdir / "disk.raw"
    await img.create(disk, "raw", size)
    await qsd.execute("blockdev-add", r.file_node(disk, "disk", "raw"))


async def _export_unix(qsd: Qsd, node: str, socket: Path) -> None:
    await qsd.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(socket)}}})
    await qsd.execute(
        "block-export-add", {"type": "nbd", "id": "volume", "node-name": node, "name": "volume", "writable": True}
    )


@contextlib.asynccontextmanager
async def bare(workdir: Path, size: int, tuned_malloc: bool = False) -> AsyncIterator[Target]:
    """(a) qsd exporting a raw file over NBD on a unix socket. ``tuned_malloc``: with the
    allocator settings pairvol gives its own daemons (diagnostic ``a-bare-tuned``)."""
    async with _qsd(workdir, "bare", tuned_malloc=tuned_malloc) as qsd:
        await _add_disk(qsd, workdir, size)
        socket = workdir / "export.sock"
        await _export_unix(qsd, "disk", socket)
        assert qsd.pid is not None
        yield Target("a-bare-tuned" if tuned_malloc else "a-bare", socket, size, pids=[qsd.pid])


@contextlib.asynccontextmanager
async def quorum(workdir: Path, size: int, tls: bool, link: str = "tcp") -> AsyncIterator[Target]:
    """(b) quorum(local raw, NBD client → second qsd over TCP loopback), no pairvol.

    ``link="unix"`` puts the replica link on a unix socket instead: a diagnostic
    configuration that shows what TCP itself costs (QEMU 7.2's NBD server sends small
    replies without TCP_NODELAY, which shows as 40 ms delayed-ACK waits at QD > 1).
    ``link="nodelay"``: TCP, the second qsd started on a listening socket with TCP_NODELAY
    (``--nbd-server addr.type=fd``, as pairvol's listener daemons are): what the socket
    option alone gives the bare graph. ``link="hop"``: the second qsd serves a unix socket
    and pairvol's own listener daemon (``pairvol.agent.tcpexport``) offers it over TCP with
    TCP_NODELAY, as on a pairvol secondary: ``hop`` vs ``nodelay`` is the hop's cost.
    """
    key = secrets.token_hex(32)
    sec_dir = await _write_psk_dir(workdir / "secondary" / "tls", key) if tls else None
    port = free_port()
    sec_args: list[str] = []
    listener = None
    if link == "nodelay":
        listener = await listen.tcp_listener("127.0.0.1", port)
        if sec_dir is not None:
            sec_args += listen.tls_psk_server_args(TLS_ID, str(sec_dir))
        sec_args += listen.nbd_server_fd_args(listener.fileno(), TLS_ID if tls else None)
    fds = [listener.fileno()] if listener is not None else []
    async with (
        contextlib.AsyncExitStack() as stack,
        _qsd(workdir / "secondary", "qsd-s", sec_args, fds) as sec,
        _qsd(workdir / "primary", "qsd-p") as pri,
    ):
        if listener is not None:
            listener.close()  # the second qsd holds it
        # the second node: a raw file exported over TCP (or a unix socket)
        await _add_disk(sec, workdir / "secondary", size)
        server: dict[str, Any] | None
        client: dict[str, Any] = {"driver": "nbd", "node-name": "peer", "export": "replica"}
        if link in ("unix", "hop"):
            path = str(workdir / "replica.sock")
            server = {"addr": {"type": "unix", "data": {"path": path}}}
            client["server"] = {"type": "unix", "path": path}
            if link == "hop":
                client["server"] = {"type": "inet", "host": "127.0.0.1", "port": str(port)}
        else:
            inet = {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}}
            server = None if link == "nodelay" else {"addr": inet}
            client["server"] = {"type": "inet", "host": "127.0.0.1", "port": str(port)}
        if sec_dir is not None:
            pri_dir = await _write_psk_dir(workdir / "primary" / "tls", key)
            if server is not None and link != "hop":
                await sec.execute("object-add", _tls_object(sec_dir, "server"))
                server["tls-creds"] = TLS_ID
            await pri.execute("object-add", _tls_object(pri_dir, "client"))
            client["tls-creds"] = TLS_ID
        if server is not None:
            await sec.execute("nbd-server-start", server)
        await sec.execute(
            "block-export-add",
            {"type": "nbd", "id": "replica", "node-name": "disk", "name": "replica", "writable": True},
        )
        hop = None
        if link == "hop":
            hop = await tcpexport.start_tcp_export(
                name="hop",
                run_dir=workdir / "secondary" / ".run",
                log_path=workdir / "secondary" / "hop.log",
                listen_on=("127.0.0.1", port),
                tls_dir=sec_dir,
                upstream=workdir / "replica.sock",
                upstream_export="replica",
                export_id="replica",
                what="the bench's replica link",
                flag="b-quorum-hop",
            )
            stack.push_async_callback(hop.kill)
        # the primary: quorum over the local raw file and the NBD client
        await _add_disk(pri, workdir / "primary", size)
        await pri.execute("blockdev-add", client)
        await pri.execute(
            "blockdev-add",
            {
                "driver": "quorum",
                "node-name": "quorum",
                "children": ["disk", "peer"],
                "vote-threshold": 1,
                "read-pattern": "fifo",
            },
        )
        socket = workdir / "export.sock"
        await _export_unix(pri, "quorum", socket)
        assert pri.pid is not None and sec.pid is not None
        name = "b-quorum" + ("" if link == "tcp" else f"-{link}") + ("-tls" if tls else "")
        remote = [sec.pid] + ([hop.pid] if hop is not None and hop.pid is not None else [])
        yield Target(name, socket, size, pids=[pri.pid, sec.pid], remote_pids=remote)


@contextlib.asynccontextmanager
async def pairvol(workdir: Path, size: int, tls: bool) -> AsyncIterator[Target]:
    """(c) a pairvol primary replicating to a pairvol secondary (sync none, loopback)."""
    kw: dict[str, Any] = {}
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    if tls:
        kw["psk_file"] = await asyncio.to_thread(write_psk, workdir / "psk")
    async with pair(workdir, size=str(size), sync="none", **kw) as (primary, secondary):
        try:
            st = await primary.status()
            if st["replication"]["state"] != "replicating" or not st["export"]["serving"]:
                raise BenchError(f"pairvol primary is not replicating and serving: {st}")
            pids = [a.proc.pid for a in (primary, secondary) if a.proc is not None]
            yield Target(
                "c-pairvol-tls" if tls else "c-pairvol",
                primary.export_socket,
                size,
                pids=pids,
                primary=primary,
                secondary=secondary,
                remote_pids=[secondary.proc.pid] if secondary.proc is not None else [],
            )
        finally:
            # SIGKILL to the agents' process groups (agent + its qsd), for the reason given
            # in _qsd; pair() then reaps them.
            for agent in (primary, secondary):
                agent.kill()


def setup(name: str, workdir: Path, size: int) -> contextlib.AbstractAsyncContextManager[Target]:
    """The setup called ``name`` (one of CONFIGS)."""
    if name in ("a-bare", "a-bare-tuned"):
        return bare(workdir, size, tuned_malloc=name == "a-bare-tuned")
    if name in ("b-quorum", "b-quorum-tls"):
        return quorum(workdir, size, tls=name.endswith("-tls"))
    if name == "b-quorum-unix":
        return quorum(workdir, size, tls=False, link="unix")
    if name in ("b-quorum-nodelay", "b-quorum-nodelay-tls"):
        return quorum(workdir, size, tls=name.endswith("-tls"), link="nodelay")
    if name in ("b-quorum-hop", "b-quorum-hop-tls"):
        return quorum(workdir, size, tls=name.endswith("-tls"), link="hop")
    if name in ("c-pairvol", "c-pairvol-tls"):
        return pairvol(workdir, size, tls=name.endswith("-tls"))
    raise BenchError(f"unknown configuration {name!r}; choose from {', '.join(CONFIGS + EXTRA_CONFIGS)}")


CONFIGS: tuple[str, ...] = ("a-bare", "b-quorum", "c-pairvol", "b-quorum-tls", "c-pairvol-tls")
# diagnostics, only when asked for with --configs
EXTRA_CONFIGS: tuple[str, ...] = (
    "a-bare-tuned",
    "b-quorum-unix",
    "b-quorum-nodelay",
    "b-quorum-nodelay-tls",
    "b-quorum-hop",
    "b-quorum-hop-tls",
)
