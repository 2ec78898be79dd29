"""An NBD export of the replica's daemon offered over TCP (TLS-PSK with a key) by a
qemu-storage-daemon of its own: the secondary's replication port and the relay of
``--export-listen``.

Why a daemon per TCP listener: the listener must carry TCP_NODELAY (QEMU 7.2's NBD server
stalls on delayed ACKs without it, see :mod:`pairvol.qemu.listen`), and qsd accepts a
listening socket only on its command line, for the one NBD server it will ever run. The
replica's own daemon lives across role changes and serves the workload export on a unix
socket while primary, so it cannot be given a TCP listener at start. A listener daemon is
started with the socket when the export is wanted and killed when it is not; it holds an
NBD client (unix, no reconnect) to the replica's daemon and exports that node under the
name the remote side asks for.

Two phases: :func:`spawn` binds the port and starts the daemon, which exports nothing yet
(a client is refused at the NBD handshake); :func:`serve` adds the client and the export.
The relay is spawned at the start of a failover or a primary start and served only once
the workload export serves (after the Lease): the process start, which was most of a
failover's time, runs while the failover's other steps do.

What this gives fencing: killing the listener daemon drops every TCP connection and the
listening socket with it in one step (the agent closed its own copy after the start), so
from then on the port refuses connections, and no reply the daemon had not sent yet is
ever sent. The daemon dies with the agent (PR_SET_PDEATHSIG), like every daemon here.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pairvol.errors import PairvolError
from pairvol.qemu import listen
from pairvol.qemu import recipes as r
from pairvol.qemu.qsd import Qsd

log = logging.getLogger(__name__)

UPSTREAM_NODE = "upstream"


class TcpExportError(PairvolError):
    """The TCP listener could not be set up; the message says why and what to do."""


async def spawn(*, name: str, run_dir: Path, log_path: Path, listen_on: tuple[str, int], tls_dir: Path | None,
                what: str, flag: str) -> Qsd:
    """Bind ``listen_on`` and start a listener daemon on it, with TLS-PSK credentials from
    ``tls_dir`` if given; it exports nothing yet (a client that connects now is refused
    at the NBD handshake). ``what`` and ``flag`` (the agent option the address came from)
    are for the error message."""
    host, port = listen_on
    try:
        sock = await listen.tcp_listener(host, port)
    except OSError as exc:
        raise TcpExportError(
            f"cannot listen for {what} on {host}:{port} ({flag}): {exc.strerror or exc}; is another process "
            "using the port? free it and ask again"
        ) from exc
    args: list[str] = []
    if tls_dir is not None:
        args += listen.tls_psk_server_args(r.TLS_OBJECT, str(tls_dir))
    args += listen.nbd_server_fd_args(sock.fileno(), r.TLS_OBJECT if tls_dir is not None else None)
    daemon = Qsd(run_dir, log_path, name=name)
    try:
        await daemon.start(args=args, pass_fds=[sock.fileno()])
    finally:
        sock.close()  # the daemon holds the listener now; killing it closes the port
    return daemon


async def serve(
    daemon: Qsd,
    *,
    upstream: Path,
    upstream_export: str,
    export_id: str,
    what: str,
    more: tuple[tuple[str, str], ...] = (),
) -> None:
    """Export ``upstream_export`` of the daemon behind the unix socket ``upstream`` through
    a spawned listener daemon, under the same name; and each ``(export_id, name)`` of
    ``more`` likewise (a connection of its own each). On error the daemon is killed."""
    exports = ((export_id, upstream_export), *more)
    try:
        for i, (eid, export) in enumerate(exports):
            node = UPSTREAM_NODE if i == 0 else f"{UPSTREAM_NODE}-{i}"
            await daemon.execute("blockdev-add", r.nbd_client_unix(node, upstream, export))
            await daemon.execute("block-export-add", r.nbd_export(eid, node, writable=True, name=export))
    except PairvolError as exc:
        tail = daemon.exit_error
        await daemon.kill()
        raise TcpExportError(
            f"the listener daemon for {what} failed to export {upstream_export!r}: {exc}"
            + (f" ({tail})" if tail else "")
        ) from exc
    log.debug("%s: exporting %s", daemon.name, upstream_export)


async def start_tcp_export(
    *,
    name: str,
    run_dir: Path,
    log_path: Path,
    listen_on: tuple[str, int],
    tls_dir: Path | None,
    upstream: Path,
    upstream_export: str,
    export_id: str,
    what: str,
    flag: str,
    more: tuple[tuple[str, str], ...] = (),
) -> Qsd:
    """:func:`spawn` and :func:`serve` in one: on error nothing is left running."""
    daemon = await spawn(
        name=name, run_dir=run_dir, log_path=log_path, listen_on=listen_on, tls_dir=tls_dir, what=what, flag=flag
    )
    await serve(
        daemon, upstream=upstream, upstream_export=upstream_export, export_id=export_id, what=what, more=more
    )
    return daemon
