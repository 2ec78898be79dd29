"""LeaseKeeper against the emulated API server: the agent-side fence of DESIGN.md §4."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import pytest

from pairvol.agent.health import Health
from pairvol.agent.lease import attach_lease
from pairvol.agent.replica import IN_SYNC_HOOK_TIMEOUT_S
from pairvol.aio import bounded
from pairvol.kube.client import Conflict, KubeClient, KubeError
from pairvol.kube.config import load_config
from pairvol.kube.lease import LeaseError, LeaseKeeper, micro_time, parse_micro_time
from pairvol.kube.names import OUT_OF_SYNC_ANNOTATION, RESYNC_ANNOTATION
from pairvol.kube.paths import lease_path
from pairvol.localcluster.cluster import LocalCluster

pytestmark = pytest.mark.timeout(60)


class Lost:
    def __init__(self) -> None:
        self.at: float | None = None

    async def __call__(self) -> None:
        self.at = time.time()


def keeper(cluster: LocalCluster, holder: str, lost: Lost, duration: float = 2.0) -> LeaseKeeper:
    return LeaseKeeper(namespace="default", name="pairvol-vol", holder=holder,
                       duration_s=duration, kubeconfig=str(cluster.kubeconfig_path), on_lost=lost)


async def healthy(timeout_s: float) -> Health:
    del timeout_s
    return Health(True)


async def read_lease(cluster: LocalCluster) -> dict[str, object]:
    async with KubeClient(await load_config(str(cluster.kubeconfig_path))) as kube:
        return await kube.get(lease_path("default", "pairvol-vol"))


async def test_acquire_creates_the_lease_and_renewals_keep_it_fresh() -> None:
    async with LocalCluster(nodes=0) as cluster:
        k = keeper(cluster, "pod-a", Lost())
        await k.acquire(5)
        assert k.held
        lease = await read_lease(cluster)
        spec = lease["spec"]
        assert isinstance(spec, dict)
        assert spec["holderIdentity"] == "pod-a" and spec["leaseDurationSeconds"] == 2
        first = parse_micro_time(spec["renewTime"])
        task = asyncio.create_task(k.run(healthy=healthy))
        await asyncio.sleep(1.5)
        spec2 = (await read_lease(cluster))["spec"]
        assert isinstance(spec2, dict)
        assert first is not None and (parse_micro_time(spec2["renewTime"]) or 0) > first
        assert k.held and not task.done()
        task.cancel()
        await k.release()
        spec3 = (await read_lease(cluster))["spec"]
        assert isinstance(spec3, dict) and not spec3.get("holderIdentity")


async def test_a_second_holder_waits_until_expiry_then_takes_over() -> None:
    async with LocalCluster(nodes=0) as cluster:
        a = keeper(cluster, "pod-a", Lost())
        await a.acquire(5)
        b = keeper(cluster, "pod-b", Lost())
        with pytest.raises(LeaseError, match="held by pod-a"):
            await b.acquire(0.5)
        # a never renews (as if dead): b gets it once the 2 s have passed, not before
        t0 = time.monotonic()
        await b.acquire(5)
        assert time.monotonic() - t0 >= 0.9
        spec = (await read_lease(cluster))["spec"]
        assert isinstance(spec, dict)
        assert spec["holderIdentity"] == "pod-b" and spec["leaseTransitions"] == 1
        # a finds out at its next renewal and reports the loss
        lost = Lost()
        a.on_lost = lost
        await bounded(a.run(healthy=healthy), 5)
        assert lost.at is not None and not a.held
        await b.release()


async def test_unreachable_api_server_means_lost_before_the_lease_expires() -> None:
    lost = Lost()
    async with LocalCluster(nodes=0) as cluster:
        k = keeper(cluster, "pod-a", lost)
        await k.acquire(5)
        renewed = parse_micro_time((await read_lease(cluster))["spec"]["renewTime"])  # type: ignore[index]
        task = asyncio.create_task(k.run(healthy=healthy))
        await asyncio.sleep(0.8)  # one renewal happens
        renewed = parse_micro_time((await read_lease(cluster))["spec"]["renewTime"])  # type: ignore[index]
    # the API server is gone now: renewals fail
    await bounded(task, 5)
    assert lost.at is not None and renewed is not None
    assert lost.at < renewed + 2.0, "on_lost must run before others may consider it expired"
    assert not k.held
    await k.release()


async def test_out_of_sync_mark_is_stored_on_the_lease() -> None:
    async with LocalCluster(nodes=0) as cluster:
        k = keeper(cluster, "pod-a", Lost())
        await k.acquire(5)
        await k.mark_out_of_sync(7)
        meta = (await read_lease(cluster))["metadata"]
        assert isinstance(meta, dict)
        assert meta["annotations"][OUT_OF_SYNC_ANNOTATION] == "7"
        await k.release()
        with pytest.raises(LeaseError, match="not held"):
            await k.mark_out_of_sync(8)


async def test_an_automatic_resync_is_marked_before_it_copies_and_both_marks_go_once_in_sync() -> None:
    """docs/correctness.md R5: the resync mark is stored next to the out-of-sync mark, and
    one patch removes both once the peer is in sync; without the Lease neither is written."""
    async with LocalCluster(nodes=0) as cluster:
        k = keeper(cluster, "pod-a", Lost())
        await k.acquire(5)
        await k.mark_out_of_sync(7)
        await k.mark_resync(7)
        meta = (await read_lease(cluster))["metadata"]
        assert isinstance(meta, dict)
        assert (meta["annotations"][OUT_OF_SYNC_ANNOTATION], meta["annotations"][RESYNC_ANNOTATION]) == ("7", "7")
        await k.clear_marks(7)
        meta = (await read_lease(cluster))["metadata"]
        assert isinstance(meta, dict)
        marks = meta.get("annotations") or {}
        assert OUT_OF_SYNC_ANNOTATION not in marks and RESYNC_ANNOTATION not in marks, marks
        await k.release()
        with pytest.raises(LeaseError, match="not held"):
            await k.mark_resync(8)
        with pytest.raises(LeaseError, match="not held"):
            await k.clear_marks(8)


async def test_a_lease_not_renewed_in_time_is_not_held_and_takes_no_out_of_sync_mark() -> None:
    """The lost-mark path: once the keeper's own validity ran out (no renewal, e.g. the
    renewer is stuck), it no longer claims the lease, and an out-of-sync mark is refused
    at once (the agent then must not acknowledge) instead of being written by a holder that
    others may already consider gone."""
    async with LocalCluster(nodes=0) as cluster:
        k = keeper(cluster, "pod-a", Lost(), duration=1.0)
        await k.acquire(5)
        assert k.held
        await asyncio.sleep(1.0 - k.safety_s + 0.1)  # validity: duration minus the safety margin
        assert not k.held
        with pytest.raises(LeaseError, match="cannot mark out-of-sync at epoch 3: lease pairvol-vol not held"):
            await bounded(k.mark_out_of_sync(3), 5)
        meta = (await read_lease(cluster))["metadata"]
        assert isinstance(meta, dict)
        assert OUT_OF_SYNC_ANNOTATION not in (meta.get("annotations") or {})
        await k.release()


async def test_a_keeper_that_finds_its_lease_taken_over_stops_and_does_not_overwrite_it() -> None:
    """Within its validity, a renewal that finds another holder reports the loss at once and
    leaves the other holder's Lease alone (it may be the promoted primary's)."""
    lost = Lost()
    async with LocalCluster(nodes=0) as cluster:
        k = keeper(cluster, "pod-a", lost, duration=3.0)
        await k.acquire(5)
        task = asyncio.create_task(k.run(healthy=healthy))
        async with KubeClient(await load_config(str(cluster.kubeconfig_path))) as kube:
            lease = await kube.get(lease_path("default", "pairvol-vol"))
            lease["spec"]["holderIdentity"] = "pod-b"
            await kube.replace(lease_path("default", "pairvol-vol"), lease)
        await bounded(task, 3)  # one renewal period (1 s) and a bit
        assert lost.at is not None and not k.held
        spec = (await read_lease(cluster))["spec"]
        assert isinstance(spec, dict) and spec["holderIdentity"] == "pod-b"
        await k.release()  # not held any more: only closes the client
        assert (await read_lease(cluster))["spec"]["holderIdentity"] == "pod-b"  # type: ignore[index]


def lease_requests(cluster: LocalCluster, verb: str) -> int:
    """Requests on Leases with this verb the API server has served so far, from anyone."""
    return sum(n for (_, v, resource), n in cluster.api.request_counts.items() if v == verb and resource == "leases")


async def test_a_renewal_is_one_write_on_the_holders_own_version_and_keeps_what_others_wrote() -> None:
    """At steady state a renewal costs the API server one request: a PUT conditional on the
    resourceVersion of the holder's own last write — its own marks included, which the
    renewals then carry. A write by someone else in between makes that PUT fail with 409;
    only then is the Lease read, so the renewal never drops what the other write stored."""
    async with LocalCluster(nodes=0) as cluster:
        k = keeper(cluster, "pod-a", Lost(), duration=3.0)
        await k.acquire(5)
        task = asyncio.create_task(k.run(healthy=healthy))
        gets, puts = lease_requests(cluster, "get"), lease_requests(cluster, "update")
        await asyncio.sleep(2.3)  # renewed every second; nobody else asks meanwhile
        assert lease_requests(cluster, "update") - puts >= 2
        assert lease_requests(cluster, "get") - gets == 0

        await k.mark_out_of_sync(7)  # the holder's own write: still one request per renewal
        gets, puts = lease_requests(cluster, "get"), lease_requests(cluster, "update")
        await asyncio.sleep(2.3)
        assert lease_requests(cluster, "update") - puts >= 2
        assert lease_requests(cluster, "get") - gets == 0

        async with KubeClient(await load_config(str(cluster.kubeconfig_path))) as other:
            await other.merge_patch(lease_path("default", "pairvol-vol"),
                                    {"metadata": {"labels": {"written-by": "someone-else"}}})
        gets, puts = lease_requests(cluster, "get"), lease_requests(cluster, "update")
        await asyncio.sleep(2.3)
        # one 409 and one read after the foreign write, then one write per renewal again
        assert lease_requests(cluster, "update") - puts >= 3
        assert lease_requests(cluster, "get") - gets == 1
        lease = await read_lease(cluster)
        assert lease["metadata"]["annotations"][OUT_OF_SYNC_ANNOTATION] == "7"  # type: ignore[index]
        assert lease["metadata"]["labels"]["written-by"] == "someone-else"  # type: ignore[index]
        assert parse_micro_time(lease["spec"]["renewTime"]) > time.time() - 1.5  # type: ignore[index,operator]
        assert k.held and not task.done()
        task.cancel()
        await k.release()


async def test_a_renewal_answered_after_the_validity_ran_out_counts_as_lost(caplog: pytest.LogCaptureFixture) -> None:
    """The answer of a renewal that arrives once the validity it would extend has ended
    cannot tell whether the operator saw the previous record unchanged for a whole duration
    in between: the keeper gives the Lease up (on_lost: the agent fences) and says so, with
    the timings, instead of carrying on as if renewed."""
    lost = Lost()
    async with LocalCluster(nodes=0) as cluster:
        k = keeper(cluster, "pod-a", lost, duration=3.0)
        await k.acquire(5)
        kube = await k._kube()
        real = kube.request
        late = asyncio.Event()

        async def answer_late(method: str, path: str, body: Any = None, **kw: Any) -> dict[str, Any]:
            got = await real(method, path, body, **kw)
            if method == "PUT" and late.is_set():
                # the answer reaches the keeper only after the validity ran out (a stalled
                # event loop, a slow way back from the API server)
                await asyncio.sleep(max(0.0, k._valid_until - time.monotonic()) + 0.2)
            return got

        kube.request = answer_late  # type: ignore[method-assign]
        task = asyncio.create_task(k.run(healthy=healthy))
        await asyncio.sleep(1.2)  # one renewal on time
        assert k.held and lost.at is None
        late.set()
        with caplog.at_level(logging.WARNING, logger="pairvol.kube.lease"):
            assert await bounded(task, 5) is None
        assert lost.at is not None and not k.held
        (line,) = [r for r in caplog.records if r.levelno == logging.WARNING and "validity had run out" in r.message]
        assert "renewal answered" in line.message and "counted as lost" in line.message
        await k.release()


async def test_against_an_api_server_that_never_answers_the_lease_is_lost_when_its_validity_ends() -> None:
    """A renewal waits for its answer at most as long as the validity has left, so a
    black-holed API server makes the keeper give up at the end of the validity, not a
    request timeout later (with a 6 s Lease a request may wait 2 s: a retry started 0.8 s
    before the end would otherwise end after the Lease expired for everybody else)."""
    lost = Lost()
    async with LocalCluster(nodes=0) as cluster:
        k = keeper(cluster, "pod-a", lost, duration=6.0)
        await k.acquire(5)
        kube = await k._kube()
        real = kube.request
        black_hole = asyncio.Event()

        async def unanswered(method: str, path: str, body: Any = None, **kw: Any) -> dict[str, Any]:
            if not black_hole.is_set():
                return await real(method, path, body, **kw)
            timeout = kw.get("timeout_s") or kube.timeout_s
            await asyncio.sleep(timeout)  # what KubeClient does when no answer comes
            raise KubeError(0, f"{method} {path}: no answer within {timeout:.1f}s")

        kube.request = unanswered  # type: ignore[method-assign]
        black_hole.set()
        valid_until = k._valid_until
        task = asyncio.create_task(k.run(healthy=healthy))
        assert await bounded(task, 10) is None
        assert lost.at is not None
        assert time.monotonic() - valid_until < 0.5, "gave up later than the end of its validity"
        await k.release()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(LeaseError, match="at least 1 second"):
        LeaseKeeper(namespace="d", name="n", holder="h", duration_s=0.5, kubeconfig=None,
                    on_lost=Lost())
    with pytest.raises(LeaseError, match="POD_NAME"):
        LeaseKeeper(namespace="d", name="n", holder="", duration_s=2, kubeconfig=None,
                    on_lost=Lost())


class Verdicts:
    """A health check the test steers; counts how often it was asked."""

    def __init__(self) -> None:
        self.now = Health(True)
        self.asked = 0
        self.first = asyncio.Event()

    async def __call__(self, timeout_s: float) -> Health:
        del timeout_s
        self.asked += 1
        self.first.set()
        return self.now


async def renew_times(cluster: LocalCluster, seconds: float) -> set[str]:
    seen = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.add(str((await read_lease(cluster))["spec"]["renewTime"]))  # type: ignore[index]
        await asyncio.sleep(0.1)
    return seen


async def test_renewal_asks_the_health_check_first_and_stops_for_good_when_unhealthy() -> None:
    lost = Lost()
    verdicts = Verdicts()
    async with LocalCluster(nodes=0) as cluster:
        k = keeper(cluster, "pod-a", lost, duration=3.0)
        await k.acquire(5)
        task = asyncio.create_task(k.run(healthy=verdicts))
        assert len(await renew_times(cluster, 2.2)) >= 2  # renewed every second while healthy
        assert verdicts.asked >= 2
        verdicts.now = Health(False, "qemu-storage-daemon is not running: killed")
        why = await bounded(task, 3)
        assert why == "qemu-storage-daemon is not running: killed"
        asked = verdicts.asked
        assert len(await renew_times(cluster, 1.5)) == 1, "renewed after an unhealthy verdict"
        assert verdicts.asked == asked and lost.at is None  # run() returned; fencing is the caller's
        await k.release()
        assert not (await read_lease(cluster))["spec"].get("holderIdentity")  # type: ignore[union-attr]


SILENT = Health(False, "qemu-storage-daemon did not answer in time", True, conclusive=False)


async def test_a_daemon_that_is_only_slow_keeps_its_lease() -> None:
    # no verdict in time (a loaded node, a command building the export): renewed anyway
    # while the last "healthy", or the start of serving, is recent enough
    lost = Lost()
    verdicts = Verdicts()
    verdicts.now = SILENT
    async with LocalCluster(nodes=0) as cluster:
        k = keeper(cluster, "pod-a", lost, duration=2.0)
        assert k.stall_limit_s >= 10.0
        await k.acquire(5)
        task = asyncio.create_task(k.run(healthy=verdicts))
        assert len(await renew_times(cluster, 3.0)) >= 3
        assert lost.at is None and not task.done()
        task.cancel()
        await k.release()


async def test_a_daemon_silent_for_longer_than_the_stall_limit_loses_the_lease() -> None:
    lost = Lost()
    verdicts = Verdicts()
    async with LocalCluster(nodes=0) as cluster:
        k = keeper(cluster, "pod-a", lost, duration=2.0)
        k.stall_limit_s = 1.0
        await k.acquire(5)
        task = asyncio.create_task(k.run(healthy=verdicts))
        await bounded(verdicts.first.wait(), 3)
        healthy_at = time.time()
        verdicts.now = SILENT
        why = await bounded(task, 8)
        assert why is None and lost.at is not None  # lost: on_lost fenced it
        renewed = parse_micro_time((await read_lease(cluster))["spec"]["renewTime"])  # type: ignore[index]
        assert renewed is not None and healthy_at < renewed <= healthy_at + 1.0 + 0.3  # then no more
        assert lost.at < renewed + 2.0  # given up before the Lease expired for others
        assert verdicts.asked >= 4  # it kept asking
        assert k.last_check_ok is False, "a loss after checks without a verdict is the data path's"
        await k.release()


async def test_an_alarm_brings_the_check_forward() -> None:
    verdicts = Verdicts()
    alarm = asyncio.Event()
    async with LocalCluster(nodes=0) as cluster:
        k = keeper(cluster, "pod-a", Lost(), duration=30.0)  # next renewal in 10 s
        await k.acquire(5)
        task = asyncio.create_task(k.run(healthy=verdicts, alarm=alarm))
        await asyncio.sleep(0.3)
        assert verdicts.asked == 0
        verdicts.now = Health(False, "daemon died")
        alarm.set()
        assert await bounded(task, 2) == "daemon died"
        await k.release()


async def test_a_holder_stamped_by_a_clock_an_hour_ahead_is_taken_over_after_one_duration() -> None:
    async with LocalCluster(nodes=0) as cluster:
        async with KubeClient(await load_config(str(cluster.kubeconfig_path))) as kube:
            await kube.create(lease_path("default"), {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": "pairvol-vol", "namespace": "default"},
                "spec": {"holderIdentity": "pod-a", "leaseDurationSeconds": 2,
                         "renewTime": micro_time(time.time() + 3600)},
            })
        b = keeper(cluster, "pod-b", Lost())
        with pytest.raises(LeaseError, match="held by pod-a"):
            await b.acquire(1.0)
        t0 = time.monotonic()
        await b.acquire(3)  # pod-a never renewed: b's own observation says it has expired
        assert time.monotonic() - t0 < 2.0
        assert (await read_lease(cluster))["spec"]["holderIdentity"] == "pod-b"  # type: ignore[index]
        await b.release()


class FakeReplica:
    """What attach_lease uses from the agent's Replica, observable by the test."""

    def __init__(self) -> None:
        self.out_of_sync_hooks: list[Any] = []
        self.serving = False
        self.state = SimpleNamespace(role="none", epoch=1)
        self.fences: list[str] = []
        self.fenced = asyncio.Event()  # set by a fence; a rebuild under the lock is not one
        self.lock = asyncio.Lock()
        self.causes: list[str] = []
        self.qsd = SimpleNamespace(dead=asyncio.Event())
        self.verdict = Health(True)
        self.last_error: str | None = None

    async def fence_workload(self, reason: str, cause: str) -> None:
        self.fences.append(reason)
        self.fenced.set()
        self.causes.append(cause)
        self.serving = False

    async def health(self, timeout_s: float = 1.0) -> Health:
        del timeout_s
        if self.qsd.dead.is_set():
            return Health(False, "qemu-storage-daemon is not running", may_serve=self.serving)
        return self.verdict


async def stopped(task: asyncio.Task[None]) -> None:
    """Cancel a keeper task and check that it ends by that cancellation, not before."""
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def serving_primary(cluster: LocalCluster, replica: FakeReplica) -> dict[str, Any]:
    replica.state = SimpleNamespace(role="primary", epoch=2)
    replica.serving = True
    for _ in range(50):
        lease = await read_lease_or_none(cluster)
        if lease is not None:
            return lease
        await asyncio.sleep(0.1)
    raise AssertionError("the lease was never taken")


@asynccontextmanager
async def attached(
    monkeypatch: pytest.MonkeyPatch, duration: float
) -> AsyncIterator[tuple[LocalCluster, FakeReplica, asyncio.Task[None]]]:
    """A FakeReplica with attach_lease wired in (holder vol-3-a), on an API server of its own."""
    monkeypatch.setenv("POD_NAME", "vol-3-a")
    replica = FakeReplica()
    args = SimpleNamespace(lease_namespace="default", lease_name="pairvol-vol", lease_duration=duration)
    async with LocalCluster(nodes=0) as cluster:
        monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig_path))
        task = await attach_lease(replica, args)
        yield cluster, replica, task


async def released(cluster: LocalCluster, within: float = 4.0) -> None:
    """Until the Lease has no holder: a fenced primary gives it up."""
    lease: dict[str, Any] = {}
    for _ in range(int(within / 0.1)):
        lease = await read_lease_or_none(cluster) or {}
        if not lease["spec"].get("holderIdentity"):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"a fenced primary kept its Lease: {lease.get('spec')}")


async def read_lease_or_none(cluster: LocalCluster) -> dict[str, Any] | None:
    async with KubeClient(await load_config(str(cluster.kubeconfig_path))) as kube:
        return await kube.get_or_none(lease_path("default", "pairvol-vol"))


async def test_a_dead_daemon_fences_and_releases_the_lease_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    async with attached(monkeypatch, 30.0) as (cluster, replica, task):
        lease = await serving_primary(cluster, replica)
        assert lease["spec"]["holderIdentity"] == "vol-3-a"
        replica.qsd.dead.set()  # renewal is 10 s away: the alarm must not wait for it
        for _ in range(30):
            lease = await read_lease_or_none(cluster) or {}
            if not lease["spec"].get("holderIdentity"):
                break
            await asyncio.sleep(0.1)
        assert not lease["spec"].get("holderIdentity"), "lease not released"
        assert replica.fences and "data path unhealthy" in replica.fences[0]
        assert replica.causes[0] == "data-path"
        await stopped(task)


async def test_a_fence_that_cannot_be_confirmed_leaves_the_lease_to_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    async with attached(monkeypatch, 3.0) as (cluster, replica, task):
        await serving_primary(cluster, replica)
        replica.verdict = Health(False, "the relay daemon no longer exports 'volume'", may_serve=True)
        for _ in range(30):
            if replica.fences:
                break
            await asyncio.sleep(0.1)
        assert replica.fences
        await asyncio.sleep(0.5)
        first = (await read_lease_or_none(cluster) or {})["spec"]
        assert first["holderIdentity"] == "vol-3-a"  # still there, but no longer renewed
        assert len(await renew_times(cluster, 1.5)) == 1
        await stopped(task)


async def test_attach_lease_holds_while_serving_and_fences_when_the_api_is_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with attached(monkeypatch, 2.0) as (cluster, replica, task):
        await asyncio.sleep(0.3)
        async with KubeClient(await load_config(str(cluster.kubeconfig_path))) as kube:
            assert await kube.get_or_none(lease_path("default", "pairvol-vol")) is None
            replica.state = SimpleNamespace(role="primary", epoch=2)
            replica.serving = True
            for _ in range(50):
                lease = await kube.get_or_none(lease_path("default", "pairvol-vol"))
                if lease is not None:
                    break
                await asyncio.sleep(0.1)
            assert lease is not None and lease["spec"]["holderIdentity"] == "vol-3-a"
        # out-of-sync marks go to the Lease through the replica's hook
        await replica.out_of_sync_hooks[0](2)
        meta = (await read_lease(cluster))["metadata"]
        assert isinstance(meta, dict) and meta["annotations"][OUT_OF_SYNC_ANNOTATION] == "2"
        renewed = parse_micro_time((await read_lease(cluster))["spec"]["renewTime"])  # type: ignore[index]
    # API server gone: the export is fenced before the lease would have expired
    for _ in range(50):
        if replica.fences:
            break
        await asyncio.sleep(0.1)
    assert replica.fences and "lease lost" in replica.fences[0]
    assert replica.causes[0] == "lease", "only a fence by the Lease lets the operator restart the primary in place"
    assert renewed is not None and time.time() < renewed + 2.0 + 0.5
    await stopped(task)


async def test_a_lease_lost_while_the_daemon_gave_no_verdict_fences_for_the_data_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a stalled daemon (a disk that stops answering) loses the Lease through the stall limit:
    # that fence is the data path's, so the operator fails over instead of restarting it
    monkeypatch.setattr("pairvol.kube.lease.STALL_LIMIT_S", 0.5)
    async with attached(monkeypatch, 2.0) as (_, replica, task):
        replica.state = SimpleNamespace(role="primary", epoch=2)
        replica.serving = True
        replica.verdict = SILENT
        for _ in range(100):
            if replica.fences:
                break
            await asyncio.sleep(0.1)
        assert replica.fences and "lease lost" in replica.fences[0]
        assert replica.causes[0] == "data-path", replica.causes
        await stopped(task)


async def test_a_primary_fenced_for_another_reason_gives_its_lease_up(monkeypatch: pytest.MonkeyPatch) -> None:
    # e.g. its local disk failed a write: the export is fenced, the daemon is fine. Holding
    # the Lease would block the failover that is now the only way out.
    async with attached(monkeypatch, 3.0) as (cluster, replica, task):
        await serving_primary(cluster, replica)
        await asyncio.sleep(1.2)  # renewed at least once while serving
        replica.serving = False
        replica.last_error = "local disk failed a write: Input/output error; fail over to the secondary"
        await released(cluster)
        await stopped(task)


async def test_a_grow_that_rebuilds_the_export_under_the_lock_keeps_the_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    # a grow takes the export down, grows the disk and serves again, all under the replica
    # lock, for longer than a Lease duration on a large or slow disk: a reconfiguration, not
    # a failure (H3). Before, the keeper read "not serving" as unhealthy, fenced and released
    # the Lease, and never renewed the one the grow took again.
    async with attached(monkeypatch, 2.0) as (cluster, replica, task):
        await serving_primary(cluster, replica)
        async with replica.lock:  # the grow
            replica.serving = False
            renewed = await renew_times(cluster, 3.0)
            replica.serving = True
        assert len(renewed) >= 2, "the Lease was not renewed during the rebuild"
        assert not replica.fences, replica.fences
        assert (await read_lease(cluster))["spec"]["holderIdentity"] == "vol-3-a"  # type: ignore[index]
        # a fence while a command holds the lock is a fence: renewals stop, the Lease goes
        async with replica.lock:
            await replica.fence_workload("local disk failed a write", "local-disk")
            await released(cluster)
        await stopped(task)


async def test_an_out_of_sync_mark_without_the_lease_fails_while_the_export_serves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a hook that returned would count as "durably marked" and let held writes be
    # acknowledged without the peer while the export still serves
    async with attached(monkeypatch, 3.0) as (_, replica, task):
        mark = replica.out_of_sync_hooks[0]
        replica.serving = True  # serving, but (not yet) holding the Lease
        with pytest.raises(LeaseError, match="out-of-sync at epoch 1 not recorded"):
            await mark(1)
        replica.serving = False  # fenced: nothing more can be acknowledged
        await mark(1)
        await stopped(task)


async def test_a_primary_shutting_down_stops_serving_before_it_releases_the_lease(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Releasing the Lease lets the operator promote at once, so the export must be fenced
    first: when the keeper is cancelled, the fence comes before the release."""
    async with attached(monkeypatch, 2.0) as (cluster, replica, task):
        replica.state = SimpleNamespace(role="primary", epoch=2)
        replica.serving = True
        holders: list[object] = []

        async def fence(reason: str, cause: str) -> None:  # what the Lease says when the fence happens
            holders.append((await read_lease(cluster))["spec"]["holderIdentity"])  # type: ignore[index]
            replica.fences.append(reason)
            replica.causes.append(cause)
            replica.serving = False

        replica.fence_workload = fence  # type: ignore[method-assign]
        async with KubeClient(await load_config(str(cluster.kubeconfig_path))) as kube:
            for _ in range(50):
                lease = await kube.get_or_none(lease_path("default", "pairvol-vol"))
                if lease is not None and lease["spec"].get("holderIdentity") == "vol-3-a":
                    break
                await asyncio.sleep(0.1)
        await stopped(task)
        assert replica.fences == ["agent shutting down"] and replica.causes == ["shutdown"]
        assert holders == ["vol-3-a"], "fenced while still holding the lease"
        spec = (await read_lease(cluster))["spec"]
        assert isinstance(spec, dict) and not spec.get("holderIdentity"), "released after the fence"


async def test_a_keeper_stopped_while_it_winds_its_renewals_down_after_a_demotion_still_stops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A demotion ends the renewal loop; an agent shutting down while that loop is still
    ending must not be ignored: the keeper fences, releases and ends by the cancellation
    (the wait for the loop used to swallow it, and the keeper went on waiting for a
    promotion that never came)."""
    async with attached(monkeypatch, 6.0) as (cluster, replica, task):
        await serving_primary(cluster, replica)
        checking, winding_down = asyncio.Event(), asyncio.Event()

        async def slow_to_stop(timeout_s: float = 1.0) -> Health:
            del timeout_s
            checking.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                winding_down.set()
                await asyncio.sleep(0.5)  # a health check takes a moment to stop
                raise
            raise AssertionError("unreachable")

        replica.health = slow_to_stop  # type: ignore[method-assign]
        await bounded(checking.wait(), 5)  # the next renewal's check is under way
        replica.state = SimpleNamespace(role="secondary", epoch=3)
        await bounded(winding_down.wait(), 5)  # the keeper is ending its renewals
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await bounded(asyncio.shield(task), 5)
        spec = (await read_lease(cluster))["spec"]
        assert isinstance(spec, dict) and not spec.get("holderIdentity"), "released on the way out"


# ---------------------------------------------------------------- clearing the marks (H7)


def is_clear(method: str, body: Any) -> bool:
    """The request removes the out-of-sync mark (the clear of both marks)."""
    if method != "PATCH" or not isinstance(body, dict):
        return False
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    return OUT_OF_SYNC_ANNOTATION in annotations and annotations[OUT_OF_SYNC_ANNOTATION] is None


class AppliedLate:
    """Requests of one client that reach the API server but are applied only once ``release``
    is set. The caller waits for the answer as usual and may give up meanwhile (a timeout);
    the request is applied all the same — as a real API server, which handles requests
    concurrently, may apply one whose client stopped waiting for the answer."""

    def __init__(self, kube: KubeClient, chosen: Callable[[str, Any], bool]) -> None:
        self.real, self.chosen = kube.request, chosen
        self.release = asyncio.Event()
        self.pending: list[asyncio.Task[dict[str, Any]]] = []
        kube.request = self._request  # type: ignore[method-assign]

    async def _request(self, method: str, path: str, body: Any = None, **kw: Any) -> dict[str, Any]:
        if self.release.is_set() or not self.chosen(method, body):
            return await self.real(method, path, body, **kw)

        async def applied() -> dict[str, Any]:
            await self.release.wait()
            return await self.real(method, path, body, **kw)

        self.pending.append(asyncio.create_task(applied()))
        return await asyncio.shield(self.pending[-1])


async def marks_on(cluster: LocalCluster) -> dict[str, str]:
    meta = (await read_lease(cluster))["metadata"]
    assert isinstance(meta, dict)
    annotations = meta.get("annotations") or {}
    return {k: v for k, v in annotations.items() if k in (OUT_OF_SYNC_ANNOTATION, RESYNC_ANNOTATION)}


async def test_a_clear_applied_after_a_new_mark_does_not_remove_it() -> None:
    """The agent waits IN_SYNC_HOOK_TIMEOUT_S for the clear of the marks, then goes on as if
    it had failed (the marks stay: the safe side). The API server may still apply that
    request later. If the link fails again meanwhile, its mark is stored before a write is
    acknowledged without the peer, and the operator must find it: the late clear is
    refused (409), because it is conditional on the version it was computed against and
    every mark is a new version — also one that stores the same epoch again, as a failure
    after an automatic resync (same epoch) does."""
    async with LocalCluster(nodes=0) as cluster:
        k = keeper(cluster, "pod-a", Lost(), duration=10.0)
        await k.acquire(5)
        await k.mark_out_of_sync(7)
        await k.mark_resync(7)
        late = AppliedLate(await k._kube(), is_clear)
        with pytest.raises(TimeoutError):  # the resync is done; the clear is not answered in time
            async with asyncio.timeout(IN_SYNC_HOOK_TIMEOUT_S):
                await k.clear_marks(7)
        assert len(late.pending) == 1, "the clear was sent"
        await k.mark_out_of_sync(7)  # the link fails again: stored before a write is acknowledged
        late.release.set()
        (outcome,) = await asyncio.gather(*late.pending, return_exceptions=True)
        marks = await marks_on(cluster)
        assert marks.get(OUT_OF_SYNC_ANNOTATION) == "7", f"a clear sent before the mark removed it: {marks}"
        assert isinstance(outcome, Conflict), f"the late clear was applied: {outcome}"
        # the keeper goes on: its renewals carry the mark, the next clear removes it
        renewed = (await read_lease(cluster))["spec"]["renewTime"]  # type: ignore[index]
        await k._renew(healthy)
        lease = await read_lease(cluster)
        assert k.held and lease["spec"]["renewTime"] != renewed  # type: ignore[index]
        assert lease["metadata"]["annotations"][OUT_OF_SYNC_ANNOTATION] == "7"  # type: ignore[index]
        await k.clear_marks(7)
        assert await marks_on(cluster) == {}
        await k.release()


async def test_a_clear_that_meets_a_renewal_clears_on_the_renewed_lease() -> None:
    """A write between the version the clear was computed against and its arrival (here the
    keeper's own renewal) makes it a 409; the clear then reads the Lease, checks that it is
    still the holder, and clears on what it read. The renewals go on with one request each."""
    async with LocalCluster(nodes=0) as cluster:
        k = keeper(cluster, "pod-a", Lost(), duration=6.0)
        await k.acquire(5)
        await k.mark_out_of_sync(7)
        await k.mark_resync(7)
        kube = await k._kube()
        real = kube.request
        renewals: list[str] = []

        async def renewal_first(method: str, path: str, body: Any = None, **kw: Any) -> dict[str, Any]:
            if is_clear(method, body) and not renewals:
                renewals.append(method)
                await k._renew(healthy)  # lands just before the clear
            return await real(method, path, body, **kw)

        kube.request = renewal_first  # type: ignore[method-assign]
        patches, gets = lease_requests(cluster, "patch"), lease_requests(cluster, "get")
        await k.clear_marks(7)
        assert (lease_requests(cluster, "patch") - patches, lease_requests(cluster, "get") - gets) == (2, 1)
        assert renewals and await marks_on(cluster) == {}
        puts, gets = lease_requests(cluster, "update"), lease_requests(cluster, "get")
        await k._renew(healthy)  # on the version the clear stored: one PUT, no read
        assert (lease_requests(cluster, "update") - puts, lease_requests(cluster, "get") - gets) == (1, 0)
        assert k.held
        await k.release()


async def test_a_clear_never_touches_a_lease_taken_over_by_another_holder() -> None:
    """The marks on a Lease that another holder took over are not this keeper's to clear:
    the clear fails (the caller keeps them: the safe side) and the Lease stays as it is."""
    async with LocalCluster(nodes=0) as cluster:
        k = keeper(cluster, "pod-a", Lost(), duration=6.0)
        await k.acquire(5)
        await k.mark_out_of_sync(7)
        async with KubeClient(await load_config(str(cluster.kubeconfig_path))) as kube:
            lease = await kube.get(lease_path("default", "pairvol-vol"))
            lease["spec"]["holderIdentity"] = "pod-b"
            await kube.replace(lease_path("default", "pairvol-vol"), lease)
        with pytest.raises(LeaseError, match="held by 'pod-b'"):
            await k.clear_marks(7)
        assert await marks_on(cluster) == {OUT_OF_SYNC_ANNOTATION: "7"}
        await k.release()


async def test_a_clear_that_keeps_meeting_other_writes_gives_up_and_leaves_the_marks() -> None:
    """The retries after a 409 are few: a Lease written before each attempt arrives makes the
    clear fail, and the marks stay (the agent retries later)."""
    async with LocalCluster(nodes=0) as cluster:
        k = keeper(cluster, "pod-a", Lost(), duration=6.0)
        await k.acquire(5)
        await k.mark_out_of_sync(7)
        await k.mark_resync(7)
        kube = await k._kube()
        real = kube.request
        async with KubeClient(await load_config(str(cluster.kubeconfig_path))) as other:

            async def written_first(method: str, path: str, body: Any = None, **kw: Any) -> dict[str, Any]:
                if is_clear(method, body):
                    await other.merge_patch(path, {"metadata": {"labels": {"written-at": str(time.monotonic_ns())}}})
                return await real(method, path, body, **kw)

            kube.request = written_first  # type: ignore[method-assign]
            with pytest.raises(LeaseError, match="clear the marks"):
                await k.clear_marks(7)
        assert await marks_on(cluster) == {OUT_OF_SYNC_ANNOTATION: "7", RESYNC_ANNOTATION: "7"}
        assert k.held
        await k.release()
