"""The primary agent's Lease: the fence that makes "never two writable primaries" hold.

The operator promotes a secondary only after the primary's Lease has expired
(``renewTime + leaseDurationSeconds`` + a margin, DESIGN.md §4). For that to be safe, the
primary must stop serving *before* the Lease expires whenever it cannot renew — e.g. when it
is partitioned from the API server. :class:`LeaseKeeper` renews every ``duration / 3`` and
calls ``on_lost()`` (the agent then closes its export) as soon as the time since its last
*confirmed* renewal approaches the duration. Local time is measured with the monotonic clock
from the moment the renewal request was *sent*, so a slow answer can only make us give up
earlier, never later.

Updates are resourceVersion-checked (HTTP PUT with ``metadata.resourceVersion``), so two
agents racing for the Lease cannot both believe they won.

The same Lease carries the durable "secondary missed acknowledged writes" mark
(annotation ``pairvol.io/out-of-sync: "<epoch>"``) that the agent sets *before* it
acknowledges a write its peer did not get; the operator never promotes such a secondary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from pairvol.errors import PairvolError
from pairvol.operator.k8s import Conflict, KubeClient, KubeError, NotFound, lease_path, load_config

log = logging.getLogger(__name__)

OUT_OF_SYNC_ANNOTATION = "pairvol.io/out-of-sync"


class LeaseError(PairvolError):
    """The Lease could not be acquired, kept or written."""


def micro_time(t: float | None = None) -> str:
    """Kubernetes MicroTime: RFC 3339 with microseconds, UTC."""
    return datetime.fromtimestamp(time.time() if t is None else t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_micro_time(s: str | None) -> float | None:
    if not s:
        return None
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def lease_expired(lease: dict[str, Any], now: float) -> bool:
    spec = lease.get("spec") or {}
    renew = parse_micro_time(spec.get("renewTime") or spec.get("acquireTime"))
    duration = spec.get("leaseDurationSeconds")
    if not spec.get("holderIdentity") or renew is None or duration is None:
        return True
    return now > renew + float(duration)


class LeaseKeeper:
    """Acquire, renew and release one coordination.k8s.io/v1 Lease for one holder."""

    def __init__(
        self,
        *,
        namespace: str,
        name: str,
        holder: str,
        duration_s: float,
        kubeconfig: str | None,
        on_lost: Callable[[], Awaitable[None]],
    ) -> None:
        if duration_s < 1:
            raise LeaseError(f"lease duration must be at least 1 second, got {duration_s}")
        if not holder:
            raise LeaseError("lease holder identity is empty (set POD_NAME)")
        self.namespace, self.name, self.holder = namespace, name, holder
        self.duration_s = float(duration_s)
        self.kubeconfig = kubeconfig
        self.on_lost = on_lost
        # give up this long before the lease would expire for others
        self.safety_s = min(1.0, self.duration_s / 4)
        self._client: KubeClient | None = None
        self._valid_until = 0.0  # monotonic
        self._held = False
        self._rv: str | None = None
        self._lost_called = False

    @property
    def path(self) -> str:
        return lease_path(self.namespace, self.name)

    @property
    def held(self) -> bool:
        """True while we hold the lease and are safely before its expiry."""
        return self._held and time.monotonic() < self._valid_until

    async def _kube(self) -> KubeClient:
        if self._client is None:
            cfg = await load_config(self.kubeconfig)
            # never wait on one call longer than the lease leaves us
            self._client = KubeClient(cfg, timeout_s=max(0.5, self.duration_s / 3))
        return self._client

    def _body(self, old: dict[str, Any] | None, now: float) -> dict[str, Any]:
        spec: dict[str, Any] = dict((old or {}).get("spec") or {})
        taking_over = spec.get("holderIdentity") != self.holder
        if taking_over:
            spec["acquireTime"] = micro_time(now)
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if old is not None else 0)
        spec.update(
            holderIdentity=self.holder,
            leaseDurationSeconds=math.ceil(self.duration_s),
            renewTime=micro_time(now),
        )
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if old is not None:
            meta = dict(old.get("metadata") or {})
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta, "spec": spec}

    async def _try_take(self) -> str | None:
        """One attempt to create/renew/take over; None on success, else why not."""
        kube = await self._kube()
        sent = time.monotonic()
        now = time.time()
        old = await kube.get_or_none(self.path)
        if old is None:
            try:
                new = await kube.create(lease_path(self.namespace), self._body(None, now))
            except Conflict:
                return "lost a race creating the lease"
        else:
            holder = (old.get("spec") or {}).get("holderIdentity")
            if holder and holder != self.holder and not lease_expired(old, now):
                spec = old.get("spec") or {}
                return f"held by {holder} (renewed {spec.get('renewTime')}, {spec.get('leaseDurationSeconds')}s)"
            try:
                new = await kube.replace(self.path, self._body(old, now))
            except Conflict:
                return "lost a race updating the lease"
        self._rv = (new.get("metadata") or {}).get("resourceVersion")
        self._valid_until = sent + self.duration_s - self.safety_s
        self._held = True
        self._lost_called = False
        return None

    async def acquire(self, timeout_s: float) -> None:
        """Wait until we hold the lease; :class:`LeaseError` after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        why = "no attempt made"
        while True:
            try:
                result = await self._try_take()
            except KubeError as exc:
                result = str(exc)
            if result is None:
                log.info("lease %s/%s acquired by %s", self.namespace, self.name, self.holder)
                return
            why = result
            left = deadline - time.monotonic()
            if left <= 0:
                raise LeaseError(
                    f"could not acquire lease {self.namespace}/{self.name} as {self.holder} "
                    f"within {timeout_s:.1f}s: {why}"
                )
            await asyncio.sleep(min(0.2, left))

    async def _renew(self) -> None:
        kube = await self._kube()
        sent = time.monotonic()
        old = await kube.get(self.path)
        holder = (old.get("spec") or {}).get("holderIdentity")
        if holder != self.holder:
            raise LeaseError(f"lease {self.name} now held by {holder!r}")
        new = await kube.replace(self.path, self._body(old, time.time()))
        self._rv = (new.get("metadata") or {}).get("resourceVersion")
        self._valid_until = sent + self.duration_s - self.safety_s

    async def _lose(self, why: str) -> None:
        self._held = False
        if not self._lost_called:
            self._lost_called = True
            log.error("lease %s/%s lost by %s: %s", self.namespace, self.name, self.holder, why)
            await self.on_lost()

    async def run(self) -> None:
        """Renew every duration/3 until cancelled; on loss call ``on_lost()`` and return."""
        if not self._held:
            raise LeaseError("LeaseKeeper.run() called before acquire()")
        period = self.duration_s / 3
        next_at = time.monotonic() + period
        while True:
            # wake for the next renewal, or just before validity ends, whichever is first
            wake = min(next_at, self._valid_until)
            await asyncio.sleep(max(0.0, wake - time.monotonic()))
            if time.monotonic() >= self._valid_until:
                await self._lose("could not renew before expiry")
                return
            try:
                await self._renew()
                next_at = time.monotonic() + period
            except LeaseError as exc:  # someone else holds it: stop at once
                await self._lose(str(exc))
                return
            except (KubeError, Conflict) as exc:
                log.warning("lease %s renewal failed (will retry): %s", self.name, exc)
                next_at = time.monotonic() + min(0.2, period)

    async def mark_out_of_sync(self, epoch: int) -> None:
        """Durably record that the peer missed acknowledged writes at ``epoch``.

        Returns only once the API server has stored it; raises :class:`LeaseError` if that is
        impossible while we still hold the lease (the caller must then not acknowledge).
        """
        kube = await self._kube()
        patch = {"metadata": {"annotations": {OUT_OF_SYNC_ANNOTATION: str(epoch)}}}
        while True:
            if not self.held:
                raise LeaseError(f"cannot mark out-of-sync at epoch {epoch}: lease {self.name} not held")
            try:
                await kube.merge_patch(self.path, patch)
                log.warning("lease %s: secondary marked out-of-sync at epoch %d", self.name, epoch)
                return
            except NotFound as exc:
                raise LeaseError(f"lease {self.name} vanished: {exc}") from exc
            except KubeError as exc:
                log.warning("marking out-of-sync failed (retrying): %s", exc)
                await asyncio.sleep(0.1)

    async def release(self) -> None:
        """Give the lease up at once (clean shutdown): the operator need not wait for expiry."""
        was_held, self._held = self._held, False
        try:
            if was_held and self._client is not None:
                old = await self._client.get_or_none(self.path)
                if old is not None and (old.get("spec") or {}).get("holderIdentity") == self.holder:
                    old["spec"]["holderIdentity"] = None
                    old["spec"]["renewTime"] = None
                    await self._client.replace(self.path, old)
                    log.info("lease %s/%s released by %s", self.namespace, self.name, self.holder)
        except KubeError as exc:
            log.warning("releasing lease %s failed (it will expire): %s", self.name, exc)
        finally:
            if self._client is not None:
                await self._client.close()
                self._client = None


# ------------------------------------------------------------------ agent wiring


class _Fenceable(Protocol):
    """What :func:`attach_lease` needs from the agent's replica (pairvol.agent.replica)."""

    out_of_sync_hooks: list[Callable[[int], Awaitable[None]]]
    serving: bool

    @property
    def state(self) -> Any: ...

    async def fence_workload(self, reason: str) -> None: ...


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
        await replica.fence_workload("lease lost: another replica may be promoted")

    keeper = LeaseKeeper(
        namespace=namespace,
        name=args.lease_name,
        holder=holder,
        duration_s=float(args.lease_duration),
        kubeconfig=None,
        on_lost=on_lost,
    )

    async def mark(epoch: int) -> None:
        if keeper.held:
            await keeper.mark_out_of_sync(epoch)
        else:
            log.error("out-of-sync at epoch %d not recorded: lease %s not held", epoch, args.lease_name)

    replica.out_of_sync_hooks.append(mark)

    # If the agent offers a hook that runs before it starts serving the workload export, take
    # the Lease there, so a new primary never serves before it holds it (raises LeaseError:
    # the agent must then refuse to serve). Without the hook the keeper below takes the Lease
    # within ~50 ms of serving; that is safe only because the operator promotes after expiry.
    before_serve = getattr(replica, "before_serve_hooks", None)
    if isinstance(before_serve, list):

        async def take(epoch: int) -> None:
            del epoch
            await keeper.acquire(timeout_s=keeper.duration_s)

        before_serve.append(take)

    async def keep() -> None:
        try:
            while True:
                await _poll(lambda: _is_primary(replica) and replica.serving)
                epoch = _epoch(replica)
                try:
                    await keeper.acquire(timeout_s=keeper.duration_s)
                except LeaseError as exc:
                    log.error("%s", exc)
                    await on_lost()
                    await _poll(lambda e=epoch: _epoch(replica) != e)  # type: ignore[misc]
                    continue
                renew = asyncio.create_task(keeper.run())
                await _poll(
                    lambda r=renew, e=epoch: r.done() or not _is_primary(replica) or _epoch(replica) != e  # type: ignore[misc]
                )
                if renew.done():  # lost (and fenced): wait for the operator's next decision
                    await renew
                    await _poll(lambda e=epoch: _epoch(replica) != e)  # type: ignore[misc]
                    continue
                renew.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renew
                if not _is_primary(replica):  # demoted: give the lease up at once
                    await keeper.release()
        except asyncio.CancelledError:
            # shutting down: stop serving *before* letting anyone else take over
            if keeper.held or _is_primary(replica):
                with contextlib.suppress(Exception):
                    await replica.fence_workload("agent shutting down")
            await keeper.release()
            raise

    return asyncio.create_task(keep(), name="lease-keeper")
