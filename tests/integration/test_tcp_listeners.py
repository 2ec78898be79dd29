"""The agent's TCP listeners: every connection they accept has TCP_NODELAY, each lives in a
daemon of its own, and killing that daemon is a fence.

QEMU 7.2's NBD server leaves Nagle on for the connections it accepts, and with many requests
in flight each short reply then waits for the peer's delayed ACK (issue 11). The agent
creates each listening socket itself with TCP_NODELAY and hands it to a listener daemon at
start; Linux copies the flag to every accepted socket. These tests look at the sockets
from inside the daemons (``pidfd_getfd`` + ``getsockopt``), not at timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from pairvol.aio import bounded
from pairvol.qemu.qsd import MALLOC_TUNING
from tests.support.agents import Agent, free_port, write_psk
from tests.support.sockets import TcpSocket, connections_to, tcp_sockets

MiB = 1 << 20

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="reads another process's sockets (pidfd_getfd): needs root")


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _pid_file(agent: Agent, name: str) -> int:
    return int((agent.data_dir / ".run" / f"{name}.pid").read_text())


async def _until(pred: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await pred():
        assert time.monotonic() < deadline, f"condition not met within {within} s"
        await asyncio.sleep(0.05)


@contextlib.contextmanager
def _raw_connection(port: int) -> Iterator[socket.socket]:
    """A TCP connection that only stays open: enough for the daemon to accept a socket."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        yield conn
    finally:
        conn.close()


def _running(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except FileNotFoundError:
        return False


def _malloc_tuned(pid: int) -> bool:
    """Each of pairvol's settings is in the daemon's environment block (glibc may have cut
    GLIBC_TUNABLES into its items in place while reading it: search the raw bytes)."""
    env = Path(f"/proc/{pid}/environ").read_bytes()
    return b"GLIBC_TUNABLES=" in env and all(item.encode() in env for item in MALLOC_TUNING.split(":"))


def _accepted(pid: int, port: int) -> list[TcpSocket]:
    return [s for s in connections_to(pid, port) if s.local[1] == port]


async def test_every_connection_the_agent_accepts_has_tcp_nodelay(tmp_path: Path) -> None:
    """TLS-PSK on the replication link and on --export-listen: the secondary's listener
    daemon and the primary's relay accept with TCP_NODELAY; the replica daemons hold no TCP
    socket at all; the primary's link daemon (QEMU's NBD client) connects with it too. Each
    of those daemons runs with pairvol's allocator settings (``MALLOC_TUNING``)."""
    psk = write_psk(tmp_path / "psk")
    relay_port = free_port()
    secondary = Agent("vol", tmp_path / "s", "16Mi", psk_file=psk)
    primary = Agent(
        "vol", tmp_path / "p", "16Mi", psk_file=psk, extra_args=["--export-listen", f"127.0.0.1:{relay_port}"]
    )
    try:
        await asyncio.gather(secondary.start(), primary.start())
        await secondary.secondary(1)
        await primary.primary(2, secondary.replication_address, "full")
        st_p = await primary.wait_replicating()
        st_s = await secondary.status()
        rep_port = _port(secondary.replication_address)

        listener_pid = st_s["replication"]["listener"]["pid"]
        accepted = _accepted(listener_pid, rep_port)
        assert accepted, f"the listener daemon holds no connection on {rep_port}: {tcp_sockets(listener_pid)}"
        assert all(s.nodelay for s in accepted), accepted
        listening = [s for s in tcp_sockets(listener_pid) if s.peer is None]
        assert [s.local[1] for s in listening] == [rep_port] and listening[0].nodelay

        link_pid = st_p["replication"]["link"]["pid"]
        outgoing = [s for s in connections_to(link_pid, rep_port) if s.peer is not None and s.peer[1] == rep_port]
        assert outgoing and all(s.nodelay for s in outgoing), outgoing

        relay_pid = _pid_file(primary, "relay")
        with _raw_connection(relay_port):

            async def relay_accepted() -> bool:
                return bool(_accepted(relay_pid, relay_port))

            await _until(relay_accepted)
            assert all(s.nodelay for s in _accepted(relay_pid, relay_port))

        for replica_pid in (st_s["qsd"]["pid"], st_p["qsd"]["pid"]):
            assert tcp_sockets(replica_pid) == [], "a replica's own daemon serves NBD on unix sockets only"

        # every daemon on the data path serves its request buffers from a heap it keeps
        for pid in (st_s["qsd"]["pid"], listener_pid, link_pid, st_p["qsd"]["pid"], relay_pid):
            assert _malloc_tuned(pid), pid

        # and the link carries the data: what the primary wrote is what the secondary has
        data = os.urandom(MiB)
        async with await primary.nbd() as nbd:
            await nbd.pwrite(data, 3 * MiB)
        primary.kill()
        await primary.wait_exit()
        await secondary.failover(3, "latest")
        async with await secondary.nbd() as nbd:
            assert await nbd.pread(MiB, 3 * MiB) == data
    finally:
        await asyncio.gather(primary.stop(), secondary.stop(), return_exceptions=True)


async def test_a_killed_listener_daemon_is_a_lost_peer_and_its_port_is_closed(tmp_path: Path) -> None:
    """SIGKILL of the secondary's listener daemon: the port refuses at once (the agent kept
    no copy of the listener), the primary marks the peer OutOfSync before acknowledging a
    write without it, the secondary says why it cannot replicate, and a failover shows
    exactly the writes acknowledged while the link was up."""
    secondary = Agent("vol", tmp_path / "s", "16Mi", peer_timeout=3)
    primary = Agent("vol", tmp_path / "p", "16Mi", peer_timeout=3)
    try:
        await asyncio.gather(secondary.start(), primary.start())
        await secondary.secondary(1)
        await primary.primary(2, secondary.replication_address, "full")
        await primary.wait_replicating()
        before, after = os.urandom(MiB), os.urandom(MiB)
        async with await primary.nbd() as nbd:
            await nbd.pwrite(before, 0)
            listener_pid = (await secondary.status())["replication"]["listener"]["pid"]
            os.kill(listener_pid, signal.SIGKILL)

            async def reaped() -> bool:  # a zombie leader's threads may still hold its files
                return (await secondary.status())["replication"]["listener"]["alive"] is False

            await _until(reaped)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", _port(secondary.replication_address)), timeout=5).close()
            await bounded(nbd.pwrite(after, MiB), 15)
            st = await primary.status()
            assert st["replication"]["outOfSync"] is True, "acknowledged without the peer before the mark"

        async def secondary_says_why() -> bool:
            error = (await secondary.status())["replication"]["error"] or ""
            return "replication listener" in error

        await _until(secondary_says_why)
        primary.kill()
        await primary.wait_exit()
        await secondary.failover(3, "latest")
        async with await secondary.nbd() as nbd:
            assert await nbd.pread(MiB, 0) == before
            assert await nbd.pread(MiB, MiB) == b"\0" * MiB, "a write after the kill reached the secondary"
    finally:
        await asyncio.gather(primary.stop(), secondary.stop(), return_exceptions=True)


async def test_failover_kills_the_listener_daemon_and_closes_the_replication_port(tmp_path: Path) -> None:
    """Fencing at failover kills the listener daemon: the old primary's connection is cut,
    and from then on the port refuses (nothing the agent kept still listens there)."""
    secondary = Agent("vol", tmp_path / "s", "16Mi", peer_timeout=3)
    primary = Agent("vol", tmp_path / "p", "16Mi", peer_timeout=3)
    try:
        await asyncio.gather(secondary.start(), primary.start())
        await secondary.secondary(1)
        await primary.primary(2, secondary.replication_address, "full")
        await primary.wait_replicating()
        listener_pid = (await secondary.status())["replication"]["listener"]["pid"]
        await secondary.failover(3, "latest")
        assert not _running(listener_pid), "the listener daemon outlived the failover"
        assert (await secondary.status())["replication"]["listener"] is None
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", _port(secondary.replication_address)), timeout=5).close()
    finally:
        await asyncio.gather(primary.stop(), secondary.stop(), return_exceptions=True)
