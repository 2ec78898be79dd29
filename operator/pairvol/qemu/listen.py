"""TCP listening sockets the agent creates for a qemu-storage-daemon, with TCP_NODELAY.

QEMU 7.2's NBD server leaves TCP_NODELAY off on the connections it accepts and does not
push pending frames after a reply (QEMU 8.0 fixed that: "nbd/server: push pending frames
after sending reply"). With many requests in flight a short reply then waits for the
peer's delayed ACK, up to 40 ms on Linux: 4 KiB random writes at queue depth 16 over the
replication link ran at a fraction of the same graph over a unix socket (issue 11).
Linux copies TCP_NODELAY from a listening socket to every socket it accepts, so a
listener created here with the flag set fixes every connection the daemon accepts, on
any QEMU version, without node tuning.

qemu-storage-daemon takes a socket descriptor only on its command line: its QMP has no
``getfd``/``add-fd`` (7.2; upstream's storage-daemon schema still leaves out
``qapi/misc.json`` where they live, so 10.0 has none either), and
``nbd-server-start`` with ``addr.type=fd`` answers "only QEMU supports file descriptor
passing". So a daemon that serves TCP is started with ``--nbd-server addr.type=fd`` and
the listener inherited (``nbd_server_fd_args``); its NBD server lives and dies with the
process. The agent closes its own copy right after the start: once the daemon is killed,
nothing listens on the port and a client is refused at once.

(QEMU's NBD *client* sets TCP_NODELAY on the connection it makes, 7.2 included: the
primary's side of the link needs nothing.)
"""

from __future__ import annotations

import asyncio
import socket

BACKLOG = 16


def _open(host: str, port: int) -> socket.socket:
    family, kind, proto, _, addr = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restarted agent rebinds at once
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by every accepted socket
        sock.bind(addr)
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


async def tcp_listener(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket with TCP_NODELAY, not yet inheritable (the start of
    the daemon passes it). Raises OSError (port in use, no such address) with the reason."""
    return await asyncio.to_thread(_open, host, port)


def _opt(value: str) -> str:
    return value.replace(",", ",,")  # QEMU's option syntax: a comma in a value is written twice


def nbd_server_fd_args(fd: int, tls_object: str | None) -> list[str]:
    """qemu-storage-daemon's command line for an NBD server on an inherited listener."""
    opts = f"addr.type=fd,addr.str={fd}"
    if tls_object is not None:
        opts += f",tls-creds={_opt(tls_object)}"
    return ["--nbd-server", opts]


def tls_psk_server_args(object_id: str, directory: str) -> list[str]:
    """The TLS-PSK server credentials an ``--nbd-server`` names; they must exist before it."""
    return ["--object", f"tls-creds-psk,id={_opt(object_id)},dir={_opt(directory)},endpoint=server"]
