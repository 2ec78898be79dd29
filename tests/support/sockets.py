"""Look at the TCP sockets another process holds, from the inside.

``ss`` shows a connection's state but not its socket options, and TCP_NODELAY is a
per-socket flag the peer cannot observe. ``pidfd_getfd(2)`` (Linux 5.6) duplicates a
descriptor out of a running process, so ``getsockopt`` can be asked about the very
socket a qemu-storage-daemon accepted or connected. Needs ptrace rights over the process
(root here, as the integration tests are).
"""

from __future__ import annotations

import ctypes
import os
import socket
from dataclasses import dataclass

_SYS_PIDFD_GETFD = 438  # the same number on x86_64 and aarch64 (the unified syscall table)


@dataclass(frozen=True)
class TcpSocket:
    fd: int  # the descriptor's number inside the process
    local: tuple[str, int]
    peer: tuple[str, int] | None  # None: a listening socket
    nodelay: bool


def _pidfd_getfd(pidfd: int, fd: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    dup = int(libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0))
    if dup < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd(fd {fd}): {os.strerror(err)}")
    return dup


def tcp_sockets(pid: int) -> list[TcpSocket]:
    """Every IPv4/IPv6 TCP socket process ``pid`` holds, with its TCP_NODELAY flag."""
    found: list[TcpSocket] = []
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
                dup = _pidfd_getfd(pidfd, int(name))
            except OSError:
                continue  # closed meanwhile
            sock = socket.socket(fileno=dup)
            try:
                if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
                    continue
                try:
                    peer = sock.getpeername()[:2]
                except OSError:
                    peer = None
                nodelay = bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                found.append(TcpSocket(int(name), sock.getsockname()[:2], peer, nodelay))
            finally:
                sock.close()
    finally:
        os.close(pidfd)
    return found


def connections_to(pid: int, port: int) -> list[TcpSocket]:
    """The connected sockets of ``pid`` whose local or remote port is ``port``."""
    return [s for s in tcp_sockets(pid) if s.peer is not None and (s.local[1] == port or s.peer[1] == port)]
