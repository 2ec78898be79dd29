"""`pairvol agent`: run one replica of one volume (flags: DESIGN.md §3)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from pairvol.agent import validate as v
from pairvol.agent.config import AgentConfig, Psk
from pairvol.agent.http import make_app
from pairvol.agent.metrics import AgentMetrics
from pairvol.agent.replica import Replica
from pairvol.errors import PairvolError

log = logging.getLogger(__name__)


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("agent", help="run one replica of one volume")
    p.add_argument("--name", required=True, help="volume name (a DNS label)")
    p.add_argument("--data-dir", required=True, type=Path, help="where this replica's images live")
    p.add_argument("--size", required=True, help="volume size: bytes or with Ki/Mi/Gi/Ti")
    p.add_argument("--listen", default="127.0.0.1:7800", help="HTTP API HOST:PORT")
    p.add_argument(
        "--replication-listen",
        default="127.0.0.1:7801",
        help="HOST:PORT of the NBD server the primary writes to while secondary",
    )
    p.add_argument(
        "--export-socket",
        type=Path,
        default=None,
        help="unix socket of the workload NBD export (default DATA_DIR/export.sock)",
    )
    p.add_argument("--export-listen", default=None, help="the workload export over TCP too (TLS-PSK)")
    p.add_argument("--token-file", type=Path, default=None, help="bearer token for the API")
    p.add_argument("--psk-file", type=Path, default=None, help="TLS-PSK key (USERNAME:HEXKEY)")
    p.add_argument(
        "--peer-timeout",
        type=float,
        default=5.0,
        help="seconds primary writes may stall on a dead or partitioned peer (default 5)",
    )
    p.add_argument("--lease-namespace", default=None, help="namespace of the primary's Lease")
    p.add_argument("--lease-name", default=None, help="name of the primary's Lease")
    p.add_argument("--lease-duration", type=float, default=10.0, help="Lease duration in seconds")
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    name = v.parse_name(args.name)
    data_dir = args.data_dir.resolve()
    token = psk = None
    try:
        if args.token_file is not None:
            token = args.token_file.read_text().strip()
            if len(token) < 16:
                raise v.InvalidInput(f"--token-file {args.token_file}: token shorter than 16 characters")
        if args.psk_file is not None:
            psk = Psk.parse(args.psk_file.read_text(), f"--psk-file {args.psk_file}")
    except OSError as exc:
        raise v.InvalidInput(f"cannot read {exc.filename}: {exc.strerror}") from exc
    export_listen = v.parse_hostport(args.export_listen, "--export-listen") if args.export_listen else None
    cfg = AgentConfig(
        name=name,
        data_dir=data_dir,
        size=v.parse_size(args.size),
        listen=v.parse_hostport(args.listen, "--listen"),
        replication_listen=v.parse_hostport(args.replication_listen, "--replication-listen"),
        export_socket=(args.export_socket or data_dir / "export.sock").resolve(),
        export_listen=export_listen,
        token=token,
        psk=psk,
        peer_timeout=args.peer_timeout,
    )
    cfg.check()
    return cfg


async def serve(cfg: AgentConfig, args: argparse.Namespace) -> int:
    metrics = AgentMetrics(cfg.name)
    replica = Replica(cfg, metrics)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await replica.open()
    lease_task = await _start_lease(replica, args)
    runner = web.AppRunner(make_app(replica, cfg.token), access_log=None)
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
    if lease_task is not None:
        lease_task.cancel()
        with contextlib.suppress(BaseException):
            await lease_task
    await runner.cleanup()
    await replica.close()
    return 0


async def _start_lease(replica: Replica, args: argparse.Namespace) -> asyncio.Task[None] | None:
    if not args.lease_name:
        return None
    from pairvol.agent.lease import attach_lease  # only agents run by the operator use Kubernetes

    return await attach_lease(replica, args)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        return asyncio.run(serve(cfg, args))
    except PairvolError as exc:
        print(f"pairvol agent: {exc}", file=sys.stderr)
        log.debug("traceback", exc_info=True)
        return 2
