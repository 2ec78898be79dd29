"""A primary whose agent lives but whose qemu-storage-daemon is dead is failed over (issue 7,
failure 4): real operator, real agents and daemons on simulated nodes.

Before, the agent kept renewing its Lease and the operator waited for the Lease to expire,
for ever. Now the agent gives the Lease up once fenced, /healthz fails (readiness, then the
liveness probe ends the pod), and the operator promotes the secondary with every
acknowledged write (Latest mode).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest
from tests.e2e.test_e2e_failover import _at_least, _truthy, failed_over_from, following, replicating

from pairvol.kube.paths import lease_path
from pairvol.localcluster.demo import Stack, verify_log

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.timeout(240)]


async def test_a_primary_whose_daemon_died_is_failed_over_without_losing_acknowledged_writes(
    stack: Stack, volume: Any
) -> None:
    name = "qsdkill"
    st = await replicating(stack, volume(name, failover={"mode": "Latest"}))
    old = st["primary"]
    writer = following(stack, name)
    writer.start()
    await stack.wait_for("writes", lambda: _at_least(writer, 30), within=30)

    # only the daemon: the agent process, its pod and its API stay up
    run_dir = stack.socket_path(st).parent / ".run"
    qsd_pid = int((run_dir / "qsd.pid").read_text())
    t_kill = time.time()
    writer.outage_start = t_kill
    os.kill(qsd_pid, signal.SIGKILL)

    st = await failed_over_from(stack, name, old["node"])
    decided = t_kill
    await stack.wait_for("writes on the new primary", lambda: _truthy(writer.recovered_at), within=30)
    log = await writer.stop()
    lf = st["lastFailover"]
    assert lf["to"] != old["node"]
    assert writer.recovered_at is not None
    print(f"daemon killed -> writes on the new primary after {writer.recovered_at - decided:.2f}s ({lf['reason']})")
    # no waiting for a Lease that was being renewed for a dead daemon: well under the
    # 30 s this test would otherwise time out at
    assert writer.recovered_at - t_kill < 20.0
    lease = await stack.kube.get(lease_path(stack.namespace, f"pairvol-{name}"))
    assert lease["spec"]["holderIdentity"] == st["primary"]["pod"]

    v = await verify_log(stack.socket_path(st), log, writer.resume_seq)
    assert v.consistent, v.detail
    assert v.lost_acked == 0, v.detail
