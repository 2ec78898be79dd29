"""The agent's side of the primary's Lease: hold it while serving, fence when it is lost.

The Lease protocol itself — acquiring, renewing after a health verdict, releasing, the
out-of-sync mark, and how expiry is judged — is :mod:`pairvol.kube.lease`, shared with the
operator; this module wires a :class:`~pairvol.kube.lease.LeaseKeeper` into a replica
(:func:`attach_lease`): the Lease is taken before the workload export is served, renewed
while the data path is healthy and the replica serves, released once nothing can serve, and
its loss fences the export.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from pairvol.agent.health import Health
from pairvol.agent.stages import FenceCause
from pairvol.aio import cancel_and_wait
from pairvol.kube.lease import LeaseError, LeaseKeeper

log = logging.getLogger(__name__)


class _Daemon(Protocol):
    dead: asyncio.Event


class _Fenceable(Protocol):
    """What :func:`attach_lease` needs from the agent's replica (pairvol.agent.replica)."""

    out_of_sync_hooks: list[Callable[[int], Awaitable[None]]]
    serving: bool
    last_error: str | None
    lock: asyncio.Lock
    fenced: asyncio.Event

    @property
    def state(self) -> Any: ...

    @property
    def qsd(self) -> _Daemon: ...

    async def fence_workload(self, reason: str, cause: FenceCause) -> None: ...

    async def health(self, timeout_s: float = ...) -> Health: ...


async def _poll(predicate: Callable[[], bool], every_s: float = 0.05) -> None:
    """The replica has no change notification; its role is cheap to read, so poll it."""
    while True:
        if predicate():
            return
        await asyncio.sleep(every_s)


def _is_primary(replica: _Fenceable) -> bool:
    return str(getattr(replica.state.role, "value", replica.state.role)) == "primary"


def _epoch(replica: _Fenceable) -> int:
    return int(replica.state.epoch)


async def attach_lease(replica: _Fenceable, args: Any) -> asyncio.Task[None]:
    """Wire a :class:`LeaseKeeper` into an agent: hold the Lease while serving as primary,
    fence the workload export when it is lost or cannot be acquired, record out-of-sync marks.

    A fence lasts for the epoch it happened in: only the operator, with a new epoch (which it
    hands out after the Lease expired), can make this replica serve again. A primary restored
    from disk does not serve (the agent waits for a new epoch) and so does not take the Lease.

    ``args``: the agent's parsed flags (``lease_namespace``, ``lease_name``,
    ``lease_duration``); the holder identity is ``$POD_NAME`` (else the host name).
    """
    namespace = args.lease_namespace or os.environ.get("POD_NAMESPACE") or "default"
    holder = os.environ.get("POD_NAME") or socket.gethostname()

    async def on_lost() -> None:
        # "lease" only when the data path was last found healthy: a loss that follows a health
        # check without a verdict (a stalled daemon or disk) is the data path's
        cause: FenceCause = "lease" if keeper.last_check_ok else "data-path"
        await replica.fence_workload("lease lost: another replica may be promoted", cause)

    keeper = LeaseKeeper(
        namespace=namespace,
        name=args.lease_name,
        holder=holder,
        duration_s=float(args.lease_duration),
        kubeconfig=None,
        on_lost=on_lost,
    )

    async def mark(epoch: int) -> None:
        """Record the mark on the Lease. Without the Lease it cannot be recorded: while the
        export still serves that is an error (the caller must keep holding the writes until
        the fence, which follows the loss of the Lease); once fenced, no write can be
        acknowledged any more and there is nothing left to record."""
        if keeper.held:
            await keeper.mark_out_of_sync(epoch)
        elif replica.serving:
            raise LeaseError(f"out-of-sync at epoch {epoch} not recorded: lease {args.lease_name} not held")
        else:
            log.warning("out-of-sync at epoch %d not recorded: lease %s not held, export fenced", epoch,
                        args.lease_name)

    replica.out_of_sync_hooks.append(mark)

    # Automatic re-protection (docs/correctness.md R5): the resync mark is on the Lease before
    # the agent copies a byte to its peer on its own, and both marks go once the peer is in
    # sync. The replica runs the clear under the same lock as ``mark``; a clear it gave up on
    # may still reach the API server after a new mark, but it is conditional on the Lease's
    # version and every mark makes a new one, so it is refused then (LeaseKeeper.clear_marks).
    before_resync = getattr(replica, "before_resync_hooks", None)
    if isinstance(before_resync, list):
        before_resync.append(keeper.mark_resync)
    in_sync = getattr(replica, "in_sync_hooks", None)
    if isinstance(in_sync, list):
        in_sync.append(keeper.clear_marks)
    await keeper.prepare()  # a promotion then takes the Lease without loading the configuration first

    # If the agent offers a hook that runs before it starts serving the workload export, take
    # the Lease there, so a new primary never serves before it holds it (raises LeaseError:
    # the agent must then refuse to serve). Without the hook the keeper below takes the Lease
    # within ~50 ms of serving; that is safe only because the operator promotes after expiry.
    before_serve = getattr(replica, "before_serve_hooks", None)
    if isinstance(before_serve, list):

        async def take(epoch: int) -> None:
            del epoch
            # a little over one duration: long enough for our own observation to see a
            # holder's record expire even when its renewTime is from a clock far ahead
            await keeper.acquire(timeout_s=keeper.duration_s + 1.0)

        before_serve.append(take)

    async def fit_to_hold(timeout_s: float) -> Health:
        """What the Lease is renewed by: the data path is healthy *and* the replica still
        serves. A primary that was fenced for another reason than its Lease (its local disk
        failed) has nothing to hold the Lease for: holding it would block the failover."""
        verdict = await replica.health(timeout_s)
        if verdict.ok and not replica.serving and replica.lock.locked() and not replica.fenced.is_set():
            # a command rebuilds the export under the lock (a grow takes it down, grows the
            # disk and serves again): a reconfiguration, not a failure (H3)
            return Health(True, "a command is rebuilding the workload export", may_serve=True)
        if verdict.ok and not replica.serving:
            why = replica.last_error or "fenced"
            return Health(False, f"the workload export is no longer served ({why})", may_serve=verdict.may_serve)
        return verdict

    async def give_up(why: str) -> None:
        """The data path failed: fence what is left, then let the Lease go.

        Releasing (instead of waiting for expiry) is safe only once nothing can hand a
        workload write to this replica any more: the Lease stands for "the old primary may
        still acknowledge writes", and after the fence — the daemon dead or its export
        deleted, the relay killed and reaped, confirmed by a fresh look — it cannot. It is
        what a clean shutdown does too, and it spares the operator a full Lease duration.
        If the fence cannot be confirmed, the Lease is left to expire (renewals have stopped).
        """
        await replica.fence_workload(f"data path unhealthy: {why}", "data-path")
        after = await replica.health(keeper.check_timeout_s)
        if after.may_serve:
            log.warning("lease %s: something may still serve after fencing; letting the Lease expire", args.lease_name)
            return
        await keeper.release()

    async def keep() -> None:
        try:
            while True:
                await _poll(lambda: _is_primary(replica) and replica.serving)
                epoch = _epoch(replica)
                try:
                    await keeper.acquire(timeout_s=keeper.duration_s + 1.0)
                except LeaseError as exc:
                    log.error("%s", exc)
                    await on_lost()
                    await _poll(lambda e=epoch: _epoch(replica) != e)  # type: ignore[misc]
                    continue
                renew = asyncio.create_task(keeper.run(healthy=fit_to_hold, alarm=replica.qsd.dead))
                await _poll(
                    lambda r=renew, e=epoch: r.done() or not _is_primary(replica) or _epoch(replica) != e  # type: ignore[misc]
                )
                if renew.done():  # lost (and fenced) or unhealthy: wait for the operator's next decision
                    why = await renew
                    if why is not None:
                        await give_up(why)
                    await _poll(lambda e=epoch: _epoch(replica) != e)  # type: ignore[misc]
                    continue
                # a stop of this task while the renewals wind down is not swallowed (pairvol.aio)
                await cancel_and_wait(renew)
                if not _is_primary(replica):  # demoted: give the lease up at once
                    await keeper.release()
        except asyncio.CancelledError:
            # shutting down: stop serving *before* letting anyone else take over
            if keeper.held or _is_primary(replica):
                with contextlib.suppress(Exception):
                    await replica.fence_workload("agent shutting down", "shutdown")
            await keeper.release()
            raise

    return asyncio.create_task(keep(), name="lease-keeper")
