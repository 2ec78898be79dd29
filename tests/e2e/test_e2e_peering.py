"""Two operator replicas with kopf peering: only the highest-priority live one acts, and the
other one, taking over from a replica that died with a volume's primary, fails that volume
over once the Lease it watched while standing by has expired, without losing an
acknowledged write."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from tests.e2e.test_e2e_failover import _at_least, _truthy, failed_over_from, following, lease_expiry, replicating

from pairvol.api.status import parse_time
from pairvol.localcluster.demo import OperatorProcess, Stack, verify_log
from pairvol.operator.manifests import OperatorConfig

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.timeout(180)]

#: longer than a peering hand-over takes here (about 3.5 s), so that the standby resumes
#: while the dead primary's Lease still runs
LONG_LEASE_S = 8.0


def acted(log: str) -> bool:
    return "created primary pod" in log or "Scheduled" in log


async def read(op: OperatorProcess) -> str:
    return await asyncio.to_thread(op.log_path.read_text, errors="replace")


@asynccontextmanager
async def two_replicas(
    operator_pod: dict[str, Any], lease_duration: float = 2.0
) -> AsyncIterator[tuple[Stack, OperatorProcess]]:
    """A stack whose own operator (priority 100) is the standby, and a second replica
    (priority 200) that is active; the active one is killed on the way out."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    async with Stack.up(3, peering="pairvol-e2e", operator_pod=operator_pod, lease_duration=lease_duration,
                        operator_env={"PAIRVOL_PEERING_PRIORITY": "100"}) as s:
        active = OperatorProcess(s.cluster.kubeconfig_path, s.root / "operator-2.log",
                                 {**s.operator.env, "PAIRVOL_PEERING_PRIORITY": "200"}, operator_pod)
        await active.start()
        try:
            await s.wait_for("the high-priority replica to become active",
                             lambda: _contains(active, "Resuming operations"), within=30)
            # the low-priority replica is paused while a higher one lives (it may have run
            # alone for a moment before the other appeared)
            await s.wait_for("the low-priority replica to be paused",
                             lambda: _paused(s.operator), within=30)
            yield s, active
        finally:
            await active.stop(kill=True)


async def test_only_one_operator_replica_acts_and_the_other_takes_over(
    tmp_path: Any, volume: Any, operator_pod: dict[str, Any]
) -> None:
    async with two_replicas(operator_pod) as (s, second):
        # a volume that never gets agents still shows who acts: only one replica schedules
        await s.apply(volume("peered", nodes=["node-1", "node-2"]))
        await s.wait_for("the active replica to act", lambda: _acts(second), within=30)
        assert not acted(await read(s.operator)), "the paused replica must not act"

        await second.stop(kill=True)  # the active replica dies without saying goodbye
        await s.wait_for("the paused replica to resume",
                         lambda: _contains(s.operator, "Resuming operations"), within=30)
        await s.apply(volume("after", nodes=["node-2", "node-3"]))
        await s.wait_for("the remaining replica to act", lambda: _acts(s.operator),
                         within=30)


async def test_a_primary_that_dies_with_the_active_replica_is_failed_over_by_the_standby_from_what_it_observed(
    volume: Any, operator_pod: dict[str, Any]
) -> None:
    """The node that dies may run the active operator too. The standby takes over once the
    dead replica's peering record expires. It has watched the Lease while it stood by, so it
    does not wait a Lease duration of its own after taking over, but it never promotes before
    the Lease it last saw renewed has expired (plus the margin) either (docs/correctness.md,
    H5, "after a peering hand-over"); every write the old primary acknowledged is on the new
    one. The Lease is longer than the hand-over takes, so both rules are visible."""
    async with two_replicas(operator_pod, lease_duration=LONG_LEASE_S) as (s, active):
        name = "together"
        st = await replicating(s, volume(name, nodes=["node-1", "node-2"]))
        old = st["primary"]
        writer = following(s, name)
        writer.start()
        await s.wait_for("writes", lambda: _at_least(writer, 30), within=30)
        writer.outage_start = time.time()
        await asyncio.gather(active.stop(kill=True), s.sim.kill_pod(s.namespace, old["pod"]))
        expiry = await lease_expiry(s, name)

        st = await failed_over_from(s, name, old["node"])
        await s.wait_for("writes on the new primary", lambda: _truthy(writer.recovered_at), within=30)
        log = await writer.stop()
        decided = parse_time(st["lastFailover"]["time"])
        resumed = _last_resume(await read(s.operator))
        assert decided is not None and resumed is not None
        config = OperatorConfig.from_env(s.operator.env)
        t0 = writer.outage_start
        timeline = (f"from the kill: standby resumed +{resumed - t0:.2f} s, Lease expiry +{expiry - t0:.2f} s, "
                    f"failover decided +{decided - t0:.2f} s")
        print(timeline)
        assert resumed < expiry, f"the hand-over came after the Lease expired: this run shows nothing; {timeline}"
        # both clocks are this machine's; the status's time has millisecond steps
        assert decided - expiry > config.lease_margin_s - 0.01, f"promoted before Lease expiry + margin; {timeline}"
        assert decided - resumed < config.lease_duration_s, (
            f"waited a Lease duration of its own after taking over, as if it had observed nothing; {timeline}")
        v = await verify_log(s.socket_path(st), log, writer.resume_seq)
        assert v.consistent, v.detail


def _last_resume(log: str) -> float | None:
    """When the replica last resumed, by its log line's local time (``%(asctime)s``)."""
    stamps = re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .*Resuming operations", log, re.M)
    if not stamps:
        return None
    day, ms = stamps[-1]
    return time.mktime(time.strptime(day, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000


async def _paused(op: OperatorProcess) -> bool:
    """Alive, taking part in the peering (its keep-alives), and not resumed since its last
    pause. kopf starts with operations paused until it has seen its peers, so a replica
    that met the higher one at once never logs a pause; one that ran alone first logs
    "Pausing operations in favour" afterwards. A crashed process is not paused."""
    alive = op.proc is not None and op.proc.returncode is None
    log = await read(op)
    peering = "Keep-alive in 'pairvol-e2e'" in log
    resumed = log.rfind("Resuming operations")
    paused = log.rfind("Pausing operations in favour")
    return alive and peering and (resumed < 0 or paused > resumed)


async def _contains(op: OperatorProcess, text: str) -> bool:
    return text in await read(op)


async def _acts(op: OperatorProcess) -> bool:
    return acted(await read(op))
