"""`pairvol agent`: run one replica of one volume (flags: DESIGN.md §3)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from pairvol.agent import state as persist
from pairvol.agent import validate as v
from pairvol.agent.config import MAX_PEER_TIMEOUT, MIN_PEER_TIMEOUT, AgentConfig, Psk
from pairvol.agent.http import make_runner
from pairvol.agent.metrics import AgentMetrics
from pairvol.agent.replica import Replica, StoppedWaiting
from pairvol.aio import cancel_and_wait
from pairvol.errors import PairvolError

log = logging.getLogger(__name__)


MAX_SECRET_FILE = 64 * 1024  # token and PSK files are a line; never read /dev/zero to the end
MIN_LEASE_DURATION, MAX_LEASE_DURATION = 1.0, 3600.0


def register(sub: Any) -> None:
    # Every value is taken as text and checked by pairvol.agent.validate (the same checks as
    # the HTTP API), so a bad value gets one line that says what to do, and exit status 2.
    p: argparse.ArgumentParser = sub.add_parser("agent", help="run one replica of one volume")
    p.add_argument("--name", required=True, help="volume name (a DNS label)")
    p.add_argument("--data-dir", required=True, help="where this replica's images live (created if missing)")
    p.add_argument("--size", required=True, help="volume size: bytes or with Ki/Mi/Gi/Ti")
    p.add_argument("--listen", default="127.0.0.1:7800", help="HTTP API HOST:PORT")
    p.add_argument(
        "--replication-listen",
        default="127.0.0.1:7801",
        help="HOST:PORT of the NBD server the primary writes to while secondary",
    )
    p.add_argument(
        "--export-socket",
        default=None,
        help="unix socket of the workload NBD export (default DATA_DIR/export.sock)",
    )
    p.add_argument("--export-listen", default=None, help="the workload export over TCP too (TLS-PSK)")
    p.add_argument("--token-file", default=None, help="bearer token for the API")
    p.add_argument("--psk-file", default=None, help="TLS-PSK key of the replication link (USERNAME:HEXKEY)")
    p.add_argument(
        "--export-psk-file",
        default=None,
        help="TLS-PSK key of the workload export over TCP (USERNAME:HEXKEY), different from --psk-file's; "
        "default: --psk-file's",
    )
    p.add_argument(
        "--peer-timeout",
        default="5",
        help="seconds primary writes may stall on a dead or partitioned peer (default 5)",
    )
    p.add_argument(
        "--auto-reprotect",
        choices=("on", "off"),
        default="on",
        help="re-pair a dropped peer that is still reachable on its own, a bounded number of times "
        "(default on); off: only POST /v1/primary re-pairs",
    )
    p.add_argument("--lease-namespace", default=None, help="namespace of the primary's Lease")
    p.add_argument("--lease-name", default=None, help="name of the primary's Lease")
    p.add_argument("--lease-duration", default="10", help="Lease duration in seconds")
    p.set_defaults(run=run)


def _read_small(path_text: str, flag: str) -> bytes:
    """A token or key file: a regular file (a FIFO or device would block or never end), read
    up to MAX_SECRET_FILE bytes."""
    path = v.parse_path(path_text, flag)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise v.InvalidInput(f"{flag} {path} is not a regular file: point it at the file that holds the key")
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(MAX_SECRET_FILE + 1)
        finally:
            os.close(fd)
    except OSError as exc:
        raise v.InvalidInput(f"{flag}: cannot read {path}: {exc.strerror}") from exc
    if len(data) > MAX_SECRET_FILE:
        raise v.InvalidInput(f"{flag} {path}: more than {MAX_SECRET_FILE} bytes; it should hold one line")
    return data


def _resolve(path_text: str, flag: str) -> Path:
    try:
        return Path(v.parse_path(path_text, flag)).resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise v.InvalidInput(f"{flag} {path_text}: cannot resolve it: {exc}") from exc


def _read_psk(path_text: str | None, flag: str) -> Psk | None:
    if path_text is None:
        return None
    raw = _read_small(path_text, flag)
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        text = ""  # Psk.parse says what the format is
    return Psk.parse(text, f"{flag} {path_text}")


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    """Check every flag (no side effects; reads the token and PSK files)."""
    name = v.parse_name(args.name)
    data_dir = _resolve(args.data_dir, "--data-dir")
    token = None
    if args.token_file is not None:
        token = v.parse_token(_read_small(args.token_file, "--token-file"), f"--token-file {args.token_file}")
    psk = _read_psk(args.psk_file, "--psk-file")
    export_psk = _read_psk(args.export_psk_file, "--export-psk-file")
    export_listen = v.parse_hostport(args.export_listen, "--export-listen") if args.export_listen is not None else None
    export_socket = (
        _resolve(args.export_socket, "--export-socket") if args.export_socket is not None else data_dir / "export.sock"
    )
    cfg = AgentConfig(
        name=name,
        data_dir=data_dir,
        size=v.parse_size(args.size),
        listen=v.parse_hostport(args.listen, "--listen"),
        replication_listen=v.parse_hostport(args.replication_listen, "--replication-listen"),
        export_socket=export_socket,
        export_listen=export_listen,
        token=token,
        psk=psk,
        export_psk=export_psk,
        peer_timeout=v.parse_seconds(args.peer_timeout, "--peer-timeout", MIN_PEER_TIMEOUT, MAX_PEER_TIMEOUT),
        auto_reprotect=getattr(args, "auto_reprotect", "on") == "on",
    )
    cfg.check()
    return cfg


def check_lease_flags(args: argparse.Namespace) -> argparse.Namespace:
    """The Lease flags, checked; returns the flags with --lease-duration as a number."""
    checked = argparse.Namespace(**vars(args))
    if args.lease_name is not None:
        checked.lease_name = v.parse_k8s_name(args.lease_name, "--lease-name")
    if args.lease_namespace is not None:
        checked.lease_namespace = v.parse_k8s_name(args.lease_namespace, "--lease-namespace", label=True)
    checked.lease_duration = v.parse_seconds(
        args.lease_duration, "--lease-duration", MIN_LEASE_DURATION, MAX_LEASE_DURATION
    )
    return checked


def prepare_data_dir(cfg: AgentConfig) -> None:
    """Create the data dir and refuse what the agent would trip over later: a data dir that
    is a file or not writable, a disk or state file that is not a regular file, an export
    socket path that holds something else (starting to serve would delete it). Runs before
    the event loop starts, so blocking calls are fine here."""
    d = cfg.data_dir
    try:
        if d.exists() and not d.is_dir():
            raise v.InvalidInput(f"--data-dir {d} exists and is not a directory: give a directory (created if missing)")
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise v.InvalidInput(f"--data-dir {d}: cannot create it: {exc.strerror}") from exc
        if not os.access(d, os.W_OK | os.X_OK):
            raise v.InvalidInput(
                f"--data-dir {d} is not writable by this user (uid {os.getuid()}): fix its permissions"
            )
        for file_name in (persist.DISK_FILE, *persist.STATE_SLOTS):
            path = d / file_name
            if path.exists() and not path.is_file():
                raise v.InvalidInput(
                    f"{path} is not a regular file, so not a replica's {file_name}: move it away or use another "
                    "--data-dir"
                )
        sock = cfg.export_socket
        if not sock.parent.is_dir():
            raise v.InvalidInput(f"--export-socket {sock}: {sock.parent} is not a directory; create it first")
        if sock.exists() and not sock.is_socket():
            raise v.InvalidInput(
                f"--export-socket {sock} exists and is not a socket: the agent would replace it; move it away"
            )
    except OSError as exc:  # e.g. a directory on the way that this user may not search
        raise v.InvalidInput(f"--data-dir {d}: {exc.strerror}: {exc.filename}") from exc


def check_addresses(cfg: AgentConfig) -> None:
    """Refuse listen addresses that cannot work before anything starts: otherwise a bad
    --replication-listen would surface as a 500 on a later POST /v1/secondary, and a busy
    --listen port only after the replica was restored. The API port is bind-tested whole;
    the NBD listeners only for their address (port 0), as a previous daemon of this replica
    may still hold their port until it is reaped at start-up."""
    checks = [("--listen", cfg.listen, True), ("--replication-listen", cfg.replication_listen, False)]
    if cfg.export_listen is not None:
        checks.append(("--export-listen", cfg.export_listen, False))
    for flag, (host, port), whole in checks:
        shown = v.format_hostport(host, port)
        try:
            infos = socket.getaddrinfo(host, port if whole else 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise v.InvalidInput(f"{flag} {shown}: cannot resolve {host}: {exc.strerror}") from exc
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(address)
            except OSError as exc:
                hint = {
                    errno.EADDRINUSE: "the port is taken (is another agent running?)",
                    errno.EADDRNOTAVAIL: "that is not an address of this machine",
                    errno.EACCES: "ports below 1024 need privileges",
                }.get(exc.errno or 0, "choose another address")
                raise v.InvalidInput(f"{flag} {shown}: cannot listen there: {exc.strerror}; {hint}") from exc


async def serve(cfg: AgentConfig, args: argparse.Namespace) -> int:
    metrics = AgentMetrics(cfg.name)
    replica = Replica(cfg, metrics)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        # a pod that ends "Completed" with no reason in its log is a mystery at 3 a.m.
        log.info("received %s: stopping", sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await replica.open(give_up=stop)  # may wait for another agent on the data dir (I5)
    except StoppedWaiting as exc:
        log.info("%s", exc)
        return 0
    lease_task = await _start_lease(replica, args)
    runner = make_runner(replica, cfg.token)
    await runner.setup()
    host, port = cfg.listen
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await replica.close()
        raise PairvolError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    log.info("agent %s listening on %s:%d (role %s)", cfg.name, host, port, replica.state.role.value)
    dead = asyncio.create_task(replica.qsd.dead.wait())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({dead, stopping}, return_when=asyncio.FIRST_COMPLETED)
    for task in (dead, stopping):
        task.cancel()
    # A dead daemon cannot be replaced in place (its graph, jobs and exports died with it).
    # The Lease keeper has seen it too (the same event wakes it): it stops renewing, fences
    # the relay and releases the Lease. The agent stays up so that /v1/status explains what
    # happened; /healthz fails, so a liveness probe ends the pod and the operator replaces it.
    if not stop.is_set():
        log.warning(
            "qemu-storage-daemon died (%s): this replica cannot serve; /healthz fails until the agent is replaced",
            replica.qsd.exit_error or "no exit status",
        )
        await stop.wait()
    await cancel_and_wait(lease_task)
    await runner.cleanup()
    await replica.close()
    return 0


async def _start_lease(replica: Replica, args: argparse.Namespace) -> asyncio.Task[None] | None:
    if not args.lease_name:
        return None
    from pairvol.agent.lease import attach_lease  # only agents run by the operator use Kubernetes

    return await attach_lease(replica, args)


Serve = Callable[[AgentConfig, argparse.Namespace], Coroutine[Any, Any, int]]


def run(args: argparse.Namespace, serve: Serve = serve) -> int:
    """Check the flags and the data dir, then ``serve`` (the fuzzer passes a stand-in to
    run every check without starting an agent). Bad flags: one line, exit status 2."""
    try:
        cfg = config_from_args(args)
        args = check_lease_flags(args)
        check_addresses(cfg)
        prepare_data_dir(cfg)
        return asyncio.run(serve(cfg, args))
    except PairvolError as exc:
        print(f"pairvol agent: {exc}", file=sys.stderr)
        log.debug("traceback", exc_info=True)
        return 2
    except OSError as exc:  # the machine, not the flags: say what, keep the traceback for -v
        print(f"pairvol agent: cannot start: {exc}", file=sys.stderr)
        log.debug("traceback", exc_info=True)
        return 1
