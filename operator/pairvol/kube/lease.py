"""The coordination.k8s.io Lease protocol: the fence that makes "never two writable primaries" hold.

It lives below the agent and the operator because both speak it: the primary's agent holds
and renews the Lease (:class:`LeaseKeeper`, wired into the agent by
:func:`pairvol.agent.lease.attach_lease`), the operator judges its expiry
(:class:`LeaseObservation`, :func:`lease_record`) before it promotes a secondary.

The operator promotes a secondary only after the primary's Lease has expired (it has seen
the same record for ``leaseDurationSeconds`` + a margin on its own clock, DESIGN.md §4) or
was released. For that to be safe, the
primary must stop serving *before* the Lease expires whenever it cannot renew — e.g. when it
is partitioned from the API server. :class:`LeaseKeeper` renews every ``duration / 3`` and
calls ``on_lost()`` (the agent then closes its export) as soon as the time since its last
*confirmed* renewal approaches the duration. Local time is measured with the monotonic clock
from the moment the renewal request was *sent*, so a slow answer can only make us give up
earlier, never later.

Renewal is a statement that this primary can serve: :meth:`LeaseKeeper.run` renews only
right after a health check (``healthy``, the replica's data-path verdict) said so — the
check is an argument of the renewal, not a timer running beside it. On a conclusive "not
healthy" it stops renewing for good and returns; the agent then fences what is left and,
once nothing can serve any more, releases the Lease so the operator need not wait for it
to expire (see :func:`pairvol.agent.lease.attach_lease`). Without a verdict (a daemon that
does not answer in time) it renews only while the last "healthy" is at most
``STALL_LIMIT_S`` (or one duration, if longer) old: a slow daemon on a loaded node keeps its
Lease, a frozen one lets it run out.

Expiry of *someone else's* Lease is judged as client-go's leader election does: by how long
this observer has seen the same record (holder, renewTime, resourceVersion) on its own
monotonic clock (:class:`LeaseObservation`), never by comparing the holder's renewTime with
the local wall clock — clocks of different nodes may differ by any amount.

Updates are resourceVersion-checked (HTTP PUT with ``metadata.resourceVersion``), so two
agents racing for the Lease cannot both believe they won. A renewal is one PUT of the Lease
as this holder's own last write stored it (that response's resourceVersion): the API server
stores it only if nobody wrote the Lease since, so the holder is still this one and nothing
of anybody else's is overwritten. The holder's own marks (below) answer with the version they
stored, and the next renewal is made on that. Any other write in between (a takeover, a write
by the operator) makes it a 409 Conflict, and only then is the Lease read (GET), its holder
checked and the PUT made on what was read. One request per renewal instead of two: at steady state
the API server pays 3 / duration requests per second per volume.

A renewal extends the validity only if its answer arrived while the validity it extends
still ran. An answer after that cannot say whether an observer saw the previous record
unchanged for a whole duration in between (the operator may already have decided to fail
over), so such a renewal counts as the loss of the Lease: one WARNING line with the
timings, then ``on_lost()``. Each renewal request is given at most the validity left, and
none is sent once it has run out.

The same Lease carries the durable "secondary missed acknowledged writes" mark
(annotation :data:`pairvol.kube.names.OUT_OF_SYNC_ANNOTATION`, ``"<epoch>"``) that the agent
sets *before* it acknowledges a write its peer did not get; the operator never promotes such
a secondary. Marks are unconditional merge patches (a renewal never makes one fail), each a
new version of the Lease (:data:`MARK_ID_ANNOTATION`); their removal once the peer is in
sync again is conditional on the version it was computed against, so a removal that reaches
the API server late — after its sender stopped waiting, and after a new mark — is refused.

The keeper's API calls go through :class:`pairvol.kube.client.KubeClient`, whose credentials
follow a rotated token file (:mod:`pairvol.kube.config`): a renewal right after the kubelet
replaced the ServiceAccount token carries the new one.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Hashable
from datetime import UTC, datetime
from typing import Any, Protocol

from pairvol.aio import bounded
from pairvol.errors import PairvolError
from pairvol.kube.client import Conflict, KubeClient, KubeError, NotFound
from pairvol.kube.config import load_config
from pairvol.kube.names import OUT_OF_SYNC_ANNOTATION, RESYNC_ANNOTATION
from pairvol.kube.paths import lease_path

log = logging.getLogger(__name__)

__all__ = [
    "MARK_ID_ANNOTATION",
    "OUT_OF_SYNC_ANNOTATION",
    "RESYNC_ANNOTATION",
    "STALL_LIMIT_S",
    "HealthCheck",
    "LeaseError",
    "LeaseKeeper",
    "LeaseObservation",
    "Unhealthy",
    "Verdict",
    "lease_expired",
    "lease_record",
    "micro_time",
    "parse_micro_time",
]


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
    """Wall-clock expiry (renewTime + duration < now): only a shortcut, valid when clocks
    agree; safety never rests on it (see :class:`LeaseObservation`)."""
    spec = lease.get("spec") or {}
    renew = parse_micro_time(spec.get("renewTime") or spec.get("acquireTime"))
    duration = spec.get("leaseDurationSeconds")
    if not spec.get("holderIdentity") or renew is None or duration is None:
        return True
    return now > renew + float(duration)


def lease_record(lease: dict[str, Any]) -> tuple[Any, ...]:
    """What identifies one renewal: any renewal changes the resourceVersion (even one whose
    renewTime came out the same from a stuck clock), any takeover the holder."""
    spec = lease.get("spec") or {}
    meta = lease.get("metadata") or {}
    return (spec.get("holderIdentity"), spec.get("renewTime"), spec.get("acquireTime"), meta.get("resourceVersion"))


class LeaseObservation:
    """How long one observer has seen the same Lease record, by its own monotonic clock.

    The holder measures its validity from the moment it *sent* a renewal, which is before
    the record was stored, which is before any observer can first see it. So once an
    observer has seen one record unchanged for the Lease duration, the holder's validity
    has ended, whatever the two wall clocks say. An observer that starts (or restarts)
    knows nothing and must wait a full duration from its first look.

    Two moments of a look matter, and they differ for a read that takes time (a GET): a
    record *new* to the observer is known to exist only once the answer is in (``seen_at``:
    when it arrived), but a record it already knows is confirmed current only as of the
    moment the read was *sent* (``current_at``): a renewal stored while the answer travelled
    would not be in it. Measuring the age at a later moment would count time in which the
    holder may have renewed.

    The last few records that another one replaced are remembered: one that shows up again
    comes from a view that lags (a watch cache behind the API server), and :meth:`replaced`
    tells the caller to read afresh instead of letting it restart the count. (Counted, it
    would only restart the count: ages can come out too short, never too long.)
    """

    REMEMBERED = 8

    def __init__(self) -> None:
        self._record: Hashable = None
        self._since: float | None = None
        self._replaced: collections.deque[Hashable] = collections.deque(maxlen=self.REMEMBERED)

    def age(self, record: Hashable, seen_at: float, current_at: float | None = None) -> float:
        """Seconds for which ``record`` has been seen unchanged: from its first sight until
        ``current_at`` (default ``seen_at``). A look at another record that was in hand
        before the current one was first seen is older than what it would replace (a tick
        that read the Lease, then waited for the agents while a renewal's event came in): 0,
        and nothing changes."""
        if self._since is not None and record != self._record and seen_at < self._since:
            return 0.0
        if self._since is None or record != self._record:
            if self._since is not None and self._record is not None:
                self._replaced.append(self._record)
            self._record, self._since = record, seen_at
        return max(0.0, (seen_at if current_at is None else current_at) - self._since)

    def replaced(self, record: Hashable) -> bool:
        """Whether ``record`` was followed by another one in this observer's view (and is not
        the current one again: a late event of an older record can come in between)."""
        return record is not None and record != self._record and record in self._replaced


class Verdict(Protocol):
    """What the keeper reads of a health verdict (the agent's :class:`pairvol.agent.health.Health`)."""

    @property
    def ok(self) -> bool: ...

    @property
    def conclusive(self) -> bool: ...

    @property
    def reason(self) -> str: ...


HealthCheck = Callable[[float], Awaitable[Verdict]]

# the longest a primary keeps renewing without a fresh verdict (its daemon does not answer
# in time) when the Lease is shorter than this
STALL_LIMIT_S = 10.0


#: On the Lease, next to the marks: a new random value with every mark, so that storing a
#: mark always makes a new version of the Lease (a patch that changes nothing does not
#: get one), on which a clear computed before it fails. Removed with the marks.
MARK_ID_ANNOTATION = "pairvol.io/mark-id"
_MARKS = (OUT_OF_SYNC_ANNOTATION, RESYNC_ANNOTATION, MARK_ID_ANNOTATION)
# how often a clear of the marks is tried on a Lease that others keep writing
CLEAR_ATTEMPTS = 3


def _mark_patch(annotations: dict[str, str]) -> dict[str, Any]:
    """The merge patch that stores a mark: without a resourceVersion, and never a no-op."""
    return {"metadata": {"annotations": {**annotations, MARK_ID_ANNOTATION: uuid.uuid4().hex}}}


class Unhealthy(LeaseError):
    """The data path is (conclusively) not healthy: do not renew."""


class _NoVerdict(Exception):
    """The health check was inconclusive: skip this renewal, try again shortly."""


class _TooLate(LeaseError):
    """The renewal's answer came after the validity it was to extend had run out."""


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
        # how long the health check before a renewal may take; a slower answer is no verdict
        self.check_timeout_s = self.duration_s / 6
        # without a verdict, renew only if the last "healthy" (or the start of serving) is at
        # most this old: a daemon that is merely slow (a loaded node) keeps the Lease, a
        # daemon frozen for good loses it
        self.stall_limit_s = max(self.duration_s, STALL_LIMIT_S)
        self._healthy_at = 0.0  # monotonic time of the last "healthy"; set when run() starts
        # the last health check before a renewal said "healthy": a loss after it is the API
        # server's doing, not the data path's (the agent fences with that cause)
        self.last_check_ok = True
        self._client: KubeClient | None = None
        self._valid_until = 0.0  # monotonic
        self._held = False
        self._rv: str | None = None
        # the Lease as this holder's last successful write stored it (holder = us): the body
        # of the next renewal's PUT, conditional on its resourceVersion
        self._mine: dict[str, Any] | None = None
        self._lost_called = False
        self._observed = LeaseObservation()  # someone else's record, for takeover

    @property
    def path(self) -> str:
        return lease_path(self.namespace, self.name)

    @property
    def held(self) -> bool:
        """True while we hold the lease and are safely before its expiry."""
        return self._held and time.monotonic() < self._valid_until

    async def prepare(self) -> None:
        """Load the configuration and make the client now, so that taking the Lease when the
        replica is promoted does not wait for it; a failure here is met again at first use."""
        try:
            await self._kube()
        except PairvolError as exc:
            log.warning("lease %s: no Kubernetes client yet (%s); retried when the Lease is needed", self.name, exc)

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
            seen_for = self._observed.age(lease_record(old), time.monotonic(), current_at=sent)
            # the operator hands out the epoch that makes us serve only after *it* observed
            # expiry; this is the second line: our own observation, or (if the clocks agree)
            # the wall clock as a shortcut
            if holder and holder != self.holder and seen_for < self.duration_s and not lease_expired(old, now):
                spec = old.get("spec") or {}
                return (
                    f"held by {holder} (renewed {spec.get('renewTime')}, {spec.get('leaseDurationSeconds')}s; "
                    f"unchanged for {seen_for:.1f}s here)"
                )
            try:
                new = await kube.replace(self.path, self._body(old, now))
            except Conflict:
                return "lost a race updating the lease"
        self._rv = (new.get("metadata") or {}).get("resourceVersion")
        self._mine = new
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

    async def _renew(self, healthy: HealthCheck) -> None:
        """One renewal, only after the health check. The verdict is taken before the
        renewal is sent: validity counts from sending, so a data path that fails right after
        the check is caught by the next one, at most a period later.

        "Healthy" renews. "Not healthy" never does (:class:`Unhealthy`). No verdict in time
        renews only while the last "healthy" (or the start of :meth:`run`, when the agent had
        just started serving) is at most ``stall_limit_s`` old, so a daemon frozen for good
        holds the Lease at most that long plus one duration."""
        checked = time.monotonic()
        verdict = await healthy(self.check_timeout_s)
        self.last_check_ok = verdict.ok
        if verdict.ok:
            self._healthy_at = checked
        elif verdict.conclusive:
            raise Unhealthy(verdict.reason)
        elif checked - self._healthy_at > self.stall_limit_s:
            raise _NoVerdict(verdict.reason)
        else:
            log.info("lease %s renewed without a fresh verdict (%s): last healthy %.1fs ago",
                     self.name, verdict.reason, checked - self._healthy_at)
        kube = await self._kube()
        sent = time.monotonic()
        until = self._valid_until  # the validity this renewal must land within
        if sent >= until:
            raise KubeError(0, f"the health check took until {sent - until:.2f}s past the validity: not sent")
        new = await self._put_renewal(kube, until)
        answered = time.monotonic()
        if answered >= until:
            log.warning(
                "lease %s: renewal answered %.2fs after it was sent, %.2fs after the validity had run out "
                "(sent %.2fs before the end; duration %gs, safety %gs): counted as lost",
                self.name, answered - sent, answered - until, until - sent, self.duration_s, self.safety_s,
            )  # fmt: skip
            raise _TooLate(f"renewal answered {answered - until:.2f}s after the validity had run out")
        self._rv = (new.get("metadata") or {}).get("resourceVersion")
        self._mine = new
        self._valid_until = sent + self.duration_s - self.safety_s

    async def _put_renewal(self, kube: KubeClient, until: float) -> dict[str, Any]:
        """One PUT on our own last write; after a 409 (someone wrote the Lease since) a GET,
        the holder check, and a PUT on what was read. No request waits past ``until``."""

        def left() -> float:
            return max(0.05, min(kube.timeout_s, until - time.monotonic()))

        if self._mine is not None:
            try:
                return await kube.request("PUT", self.path, self._body(self._mine, time.time()), timeout_s=left())
            except Conflict:
                self._mine = None
        old = await kube.request("GET", self.path, timeout_s=left())
        holder = (old.get("spec") or {}).get("holderIdentity")
        if holder != self.holder:
            raise LeaseError(f"lease {self.name} now held by {holder!r}")
        return await kube.request("PUT", self.path, self._body(old, time.time()), timeout_s=left())

    async def _lose(self, why: str) -> None:
        self._held = False
        if not self._lost_called:
            self._lost_called = True
            log.error("lease %s/%s lost by %s: %s", self.namespace, self.name, self.holder, why)
            await self.on_lost()

    async def run(self, *, healthy: HealthCheck, alarm: asyncio.Event | None = None) -> str | None:
        """Renew every duration/3 (counted from the sending of the last renewal), each time
        only after ``healthy`` said so, until cancelled.

        Returns None once the Lease is lost (``on_lost()`` has run), or the reason when the
        data path was found unhealthy: renewing has then stopped for good (the caller fences
        and may release). ``alarm`` (e.g. "the daemon died") makes the next check happen at
        once instead of at the next period.
        """
        if not self._held:
            raise LeaseError("LeaseKeeper.run() called before acquire()")
        period = self.duration_s / 3
        next_at = time.monotonic() + period
        self._healthy_at = time.monotonic()  # serving has just begun: no verdict is owed yet
        while True:
            # wake for the next renewal, or just before validity ends, whichever is first
            wake = min(next_at, self._valid_until)
            if await self._nap(wake - time.monotonic(), alarm):
                alarm, next_at = None, time.monotonic()  # check now; one alarm is enough
            if time.monotonic() >= self._valid_until:
                await self._lose("could not renew before expiry")
                return None
            if time.monotonic() < next_at:
                continue
            try:
                await self._renew(healthy)
                # the period counts from when the renewal was sent, like the validity: a slow
                # answer does not push the next renewal towards the end of the validity (but
                # half a period passes after each answer: a slow API server is not pressed harder)
                sent = self._valid_until - (self.duration_s - self.safety_s)
                next_at = max(sent + period, time.monotonic() + period / 2)
            except Unhealthy as exc:
                log.error("lease %s/%s no longer renewed by %s: %s", self.namespace, self.name, self.holder, exc)
                return str(exc)
            except _NoVerdict as exc:
                log.warning("lease %s not renewed this time: %s", self.name, exc)
                next_at = time.monotonic() + min(0.2, period)
            except LeaseError as exc:  # someone else holds it, or the answer came too late: stop at once
                await self._lose(str(exc))
                return None
            except (KubeError, Conflict) as exc:
                log.warning("lease %s renewal failed (will retry): %s", self.name, exc)
                next_at = time.monotonic() + min(0.2, period)

    @staticmethod
    async def _nap(seconds: float, alarm: asyncio.Event | None) -> bool:
        """Sleep up to ``seconds``; True if woken by ``alarm``."""
        if alarm is None:
            await asyncio.sleep(max(0.0, seconds))
            return False
        try:
            await bounded(alarm.wait(), max(0.0, seconds))
            return True
        except TimeoutError:
            return False

    async def mark_out_of_sync(self, epoch: int) -> None:
        """Durably record that the peer missed acknowledged writes at ``epoch``.

        Returns only once the API server has stored it; raises :class:`LeaseError` if that is
        impossible while we still hold the lease (the caller must then not acknowledge).
        Unconditional (a merge patch without a resourceVersion): a concurrent renewal or a
        foreign write never makes it fail.
        """
        kube = await self._kube()
        patch = _mark_patch({OUT_OF_SYNC_ANNOTATION: str(epoch)})
        while True:
            if not self.held:
                raise LeaseError(f"cannot mark out-of-sync at epoch {epoch}: lease {self.name} not held")
            try:
                self._adopt(await kube.merge_patch(self.path, patch))
                log.warning("lease %s: secondary marked out-of-sync at epoch %d", self.name, epoch)
                return
            except NotFound as exc:
                raise LeaseError(f"lease {self.name} vanished: {exc}") from exc
            except KubeError as exc:
                log.warning("marking out-of-sync failed (retrying): %s", exc)
                await asyncio.sleep(0.1)

    async def mark_resync(self, epoch: int) -> None:
        """Durably record that the primary starts rewriting its peer on its own at ``epoch``
        (one attempt: the caller does not start the resync if this raises). Unconditional like
        the out-of-sync mark; one that lands late, after a clear, leaves a mark: the safe side."""
        what = f"mark a resync at epoch {epoch}"
        if not self.held:
            raise LeaseError(f"cannot {what}: lease {self.name} not held")
        kube = await self._kube()
        try:
            self._adopt(await kube.merge_patch(self.path, _mark_patch({RESYNC_ANNOTATION: str(epoch)})))
        except KubeError as exc:
            raise LeaseError(f"cannot {what} on lease {self.name}: {exc}") from exc
        log.info("lease %s: automatic resync of the secondary at epoch %d recorded", self.name, epoch)

    async def clear_marks(self, epoch: int) -> None:
        """The peer is in sync again at ``epoch``: remove the out-of-sync and resync marks.

        The caller may stop waiting for the answer (a timeout) while the API server still
        applies the request later, after a mark of a new failure was stored. So the clear is
        conditional on the version of the Lease it was computed against (its resourceVersion
        in the patch, a precondition: 409 if anybody wrote the Lease since), and every mark is
        a new version (:func:`_mark_patch`): a late clear is refused instead of removing a
        newer mark. The first attempt is made on our own last write; after a 409 (a renewal,
        a foreign write) the Lease is read, its holder checked and the clear tried again on
        what was read, at most ``CLEAR_ATTEMPTS`` times. Raises if the marks could not be
        removed; they then stay: the safe side.
        """
        what = "clear the marks"
        kube = await self._kube()
        base = self._mine
        for _ in range(CLEAR_ATTEMPTS):
            if not self.held:
                raise LeaseError(f"cannot {what}: lease {self.name} not held")
            try:
                if base is None:
                    base = await kube.get(self.path)
                    holder = (base.get("spec") or {}).get("holderIdentity")
                    if holder != self.holder:
                        raise LeaseError(f"cannot {what}: lease {self.name} now held by {holder!r}")
                version = (base.get("metadata") or {}).get("resourceVersion")
                if not version:  # a null in a merge patch removes: the clear would be unconditional
                    raise LeaseError(f"cannot {what}: lease {self.name} as read has no resourceVersion")
                patch = {"metadata": {"resourceVersion": version, "annotations": dict.fromkeys(_MARKS)}}
                self._adopt(await kube.merge_patch(self.path, patch))
            except Conflict:
                base = None  # written since: read it again
                continue
            except KubeError as exc:
                raise LeaseError(f"cannot {what} on lease {self.name}: {exc}") from exc
            log.info("lease %s: secondary in sync at epoch %d, marks cleared", self.name, epoch)
            return
        raise LeaseError(
            f"cannot {what} on lease {self.name}: the Lease was written again before each of "
            f"{CLEAR_ATTEMPTS} attempts arrived; the marks stay"
        )

    def _adopt(self, stored: dict[str, Any]) -> None:
        """Our own mark was stored: the next renewal is a PUT on that version, so it carries the
        mark and costs one request (not a 409, a GET and a PUT, which a slow API server may not
        answer within the validity). A Lease that shows another holder is not adopted; the next
        renewal then reads it and finds out. Never unsafe: a PUT on a version that someone has
        written since fails with 409, whatever the order in which answers come back."""
        if (stored.get("spec") or {}).get("holderIdentity") == self.holder and self._held:
            self._mine = stored

    async def release(self) -> None:
        """Give the lease up at once (clean shutdown): the operator need not wait for expiry."""
        was_held, self._held = self._held, False
        self._mine = None
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
