"""Health that means something (issue 7, failures 4 and 7), with real agents, real
qemu-storage-daemons and the emulated Kubernetes API server for the Lease.

* A primary whose daemon is killed must stop holding its Lease — fenced first, then released
  — and /healthz must say why; before, the agent kept renewing and failover waited for ever.
* A promoted secondary that cannot serve (its Lease is held by someone else) must not report
  the failover as done; asked again with a newer epoch once the Lease is free, it serves.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pairvol.agent.health import Health
from pairvol.aio import bounded
from pairvol.kube.client import KubeClient
from pairvol.kube.config import load_config
from pairvol.kube.lease import LeaseKeeper
from pairvol.kube.paths import lease_path
from pairvol.localcluster.cluster import LocalCluster
from pairvol.nbd import NBDClient, NBDError
from tests.support.agents import Agent, AgentCallError, free_port
from tests.support.promtext import value

pytestmark = pytest.mark.timeout(120)

LEASE = "pairvol-vol"


@pytest.fixture
async def cluster(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[LocalCluster]:
    """An API server for the Lease; agents started from here find it through KUBECONFIG."""
    async with LocalCluster(nodes=0) as c:
        monkeypatch.setenv("KUBECONFIG", str(c.kubeconfig_path))
        monkeypatch.setenv("POD_NAMESPACE", "default")
        yield c


def leased(tmp: Path, name: str, duration: float, *extra: str) -> Agent:
    """An agent holding the Lease as pod ``name`` (set POD_NAME to it before starting)."""
    args = ["--lease-namespace", "default", "--lease-name", LEASE, "--lease-duration", f"{duration:g}", *extra]
    return Agent("vol", tmp / name, "16Mi", extra_args=args)


async def read_lease(cluster: LocalCluster) -> dict[str, Any] | None:
    async with KubeClient(await load_config(str(cluster.kubeconfig_path))) as kube:
        return await kube.get_or_none(lease_path("default", LEASE))


async def holder(cluster: LocalCluster) -> str | None:
    lease = await read_lease(cluster)
    return None if lease is None else (lease.get("spec") or {}).get("holderIdentity")


async def eventually(what: str, check: Any, within: float) -> Any:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        got = await check()
        if got:
            return got
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.05)


def fenced_log(agent: Agent) -> str:
    assert agent.log_path is not None
    return "\n".join(line for line in agent.log_path.read_text().splitlines() if "fencing" in line)


async def healthz(agent: Agent) -> tuple[int, dict[str, Any]]:
    try:
        return 200, await agent.call("GET", "/healthz")
    except AgentCallError as exc:
        return exc.status, exc.body


async def test_killing_only_the_daemon_of_a_primary_fences_it_and_gives_up_its_lease(
    tmp_path: Path, cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POD_NAME", "vol-2-a")
    port = free_port()
    # a long Lease, so that only giving it up (not its expiry) can pass the deadline below
    a = leased(tmp_path, "vol-2-a", 30.0, "--export-listen", f"127.0.0.1:{port}")
    try:
        await a.start()
        await a.primary(2, None)
        assert await holder(cluster) == "vol-2-a"
        assert await healthz(a) == (200, {"ok": True})
        tcp = await NBDClient.connect_tcp("127.0.0.1", port)  # a client of the relay
        await tcp.pwrite(b"x" * 4096, 0)

        qsd_pid = (await a.status())["qsd"]["pid"]
        os.kill(qsd_pid, signal.SIGKILL)  # only the daemon: the agent lives on

        async def released() -> bool:
            return await holder(cluster) is None

        await eventually("the Lease released", released, within=5.0)
        code, body = await healthz(a)
        assert code == 503 and "qemu-storage-daemon is not running" in body["error"], body
        st = await a.status()
        assert st["qsd"]["alive"] is False and st["export"]["serving"] is False
        assert "fencing: workload export stopped: data path unhealthy" in fenced_log(a)
        # the relay was fenced too: nothing reaches the old primary's disk any more
        with pytest.raises(NBDError):
            await bounded(tcp.pwrite(b"y" * 4096, 0), 5)
        with pytest.raises(NBDError):
            await NBDClient.connect_tcp("127.0.0.1", port)
        await tcp.close()
        assert a.proc is not None and a.proc.returncode is None, "the agent stays up to explain"
    finally:
        await a.stop()


async def test_a_primary_whose_relay_dies_stops_renewing_and_fails_healthz(
    tmp_path: Path, cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POD_NAME", "vol-2-a")
    port = free_port()
    a = leased(tmp_path, "vol-2-a", 3.0, "--export-listen", f"127.0.0.1:{port}")
    try:
        await a.start()
        await a.primary(2, None)
        relay_pid = int((a.data_dir / ".run" / "relay.pid").read_text())
        os.kill(relay_pid, signal.SIGKILL)

        async def given_up() -> bool:
            return await holder(cluster) is None

        # the daemon still has the unix export until the fence; after it, nothing serves
        await eventually("the Lease released", given_up, within=5.0)
        st = await a.status()
        assert st["qsd"]["alive"] is True and st["export"]["serving"] is False
        assert "data path unhealthy: the relay daemon of --export-listen is not running" in fenced_log(a)
        # fenced, not broken: a replica that no longer means to serve is healthy (the
        # operator fails it over by its Lease; killing the pod would gain nothing)
        assert (await healthz(a))[0] == 200
        with pytest.raises(NBDError):
            await NBDClient.connect_unix(str(a.export_socket))
    finally:
        await a.stop()


async def test_a_frozen_daemon_is_not_renewed_for(
    tmp_path: Path, cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SIGSTOP: alive but silent. Nothing proves it broken, so the Lease is not released;
    # but it is not renewed for long either, so it runs out and the operator may fail over
    monkeypatch.setenv("POD_NAME", "vol-2-a")
    a = leased(tmp_path, "vol-2-a", 3.0)
    qsd_pid = 0
    try:
        await a.start()
        await a.primary(2, None)
        qsd_pid = (await a.status())["qsd"]["pid"]
        seen: set[str] = set()

        async def renewed_after_a_check() -> bool:
            # taken when serving started, then renewed after a "healthy" verdict
            seen.add(str(((await read_lease(cluster)) or {})["spec"]["renewTime"]))
            return len(seen) >= 3 or "renewed" in a.log_tail(50)

        await asyncio.sleep(1.2)  # the first renewal comes one period (1 s) after serving
        await eventually("a renewal", renewed_after_a_check, within=5.0)
        os.kill(qsd_pid, signal.SIGSTOP)
        stopped_at = asyncio.get_running_loop().time()

        async def lost() -> bool:
            return "lost by vol-2-a: could not renew before expiry" in a.log_tail(200)

        # renewed on the last "healthy" for at most the stall limit (10 s), then valid for
        # less than one more duration
        await eventually("the Lease lost", lost, within=16.0)
        assert asyncio.get_running_loop().time() - stopped_at >= 3.0
        last = str(((await read_lease(cluster)) or {})["spec"]["renewTime"])
        await asyncio.sleep(1.5)
        assert str(((await read_lease(cluster)) or {})["spec"]["renewTime"]) == last, "renewed for a frozen daemon"
        code, body = await healthz(a)
        assert code == 503 and "did not answer" in body["error"], body
        assert await holder(cluster) == "vol-2-a"  # not released: nothing proved it cannot serve
    finally:
        if qsd_pid:
            os.kill(qsd_pid, signal.SIGCONT)
        await a.stop()


async def test_a_promoted_secondary_without_the_lease_does_not_claim_the_failover(
    tmp_path: Path, cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the old primary (here a Lease holder in the test) still renews: the promoted secondary
    # cannot take the Lease, so it must not serve and must not say the failover succeeded
    async def always_healthy(timeout_s: float) -> Health:
        del timeout_s
        return Health(True)

    async def nothing() -> None:
        return None

    old = LeaseKeeper(namespace="default", name=LEASE, holder="vol-2-a", duration_s=2.0,
                      kubeconfig=str(cluster.kubeconfig_path), on_lost=nothing)
    await old.acquire(5)
    renewing = asyncio.create_task(old.run(healthy=always_healthy))
    monkeypatch.setenv("POD_NAME", "vol-2-b")
    b = leased(tmp_path, "vol-2-b", 2.0)
    try:
        await b.start()
        await b.secondary(1)
        with pytest.raises(AgentCallError) as info:
            await b.failover(3, "latest")
        assert info.value.status == 500
        error = info.value.body["error"]
        assert "promoted to primary at epoch 3 but the workload export is not served" in error, error
        assert "held by vol-2-a" in error and "retry with POST /v1/primary" in error, error
        st = await b.status()
        assert (st["role"], st["stage"], st["epoch"]) == ("primary", "done", 3)
        assert st["export"]["serving"] is False
        assert not b.export_socket.exists()
        # counted as not serving yet, not as failed: "failed" pages PairvolFailoverFailed
        text = await b.metrics()
        unsaid = {"volume": "vol", "trigger": "unspecified"}  # the caller did not say who asked
        assert value(text, "pairvol_failovers_total", mode="latest", result="not_serving", **unsaid) == 1
        assert value(text, "pairvol_failovers_total", mode="latest", result="failed", **unsaid) == 0
        assert value(text, "pairvol_failover_last_timestamp_seconds", result="not_serving", **unsaid) > 0
        assert value(text, "pairvol_failover_last_timestamp_seconds", result="failed", **unsaid) == 0
        assert (await healthz(b))[0] == 200  # deliberate state: the operator retries, do not kill it
        assert await holder(cluster) == "vol-2-a"

        # the old primary is gone for good (it gave the Lease up); the operator asks again
        renewing.cancel()
        await old.release()
        st = await b.primary(4, None)
        assert (st["role"], st["epoch"], st["export"]["serving"]) == ("primary", 4, True)
        assert await holder(cluster) == "vol-2-b"
        async with await b.nbd() as nbd:
            await nbd.pwrite(b"z" * 4096, 0)
    finally:
        renewing.cancel()
        await old.release()
        await b.stop()
