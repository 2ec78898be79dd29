"""In the local cluster every process runs with the privileges its manifest gives it.

The agent pods' securityContext is the one the operator wrote (read back from the API
server), applied by the node simulator; the operator's is the chart Deployment's. Both
are checked on the running processes — the agents, their qemu-storage-daemons and the
operator — through /proc.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tests.support.agents import privileges, running_as

from pairvol.localcluster.demo import Stack
from pairvol.localcluster.kubelet_pods import security_plan

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.timeout(240)]


def children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


async def test_agents_their_daemons_and_the_operator_have_exactly_their_manifests_privileges(
    stack: Stack, volume: Any, operator_pod: dict[str, Any]
) -> None:
    await stack.apply(volume("caps"))
    await stack.wait_phase("caps", "Replicating", within=150)
    pods = [p for p in await stack.pods("caps") if p["metadata"]["labels"].get("pairvol.io/role")]
    assert len(pods) == 2
    for pod in pods:
        (container,) = pod["spec"]["containers"]
        plan = security_plan(pod, container)
        assert plan.capabilities == frozenset() and plan.no_new_privs  # what the operator asks for
        (status,) = pod["status"]["containerStatuses"]
        agent = int(status["containerID"].removeprefix("pairvol-local://"))
        daemons = [pid for pid in children(agent) if comm(pid).startswith("qemu-storage")]
        assert daemons, f"no qemu-storage-daemon under agent {agent}: {[comm(p) for p in children(agent)]}"
        for pid in (agent, *daemons):
            assert privileges(pid) == running_as(plan), (pod["metadata"]["name"], comm(pid))

    (operator,) = [c for c in operator_pod["spec"]["containers"] if c["name"] == "operator"]
    plan = security_plan(operator_pod, operator)
    assert plan.uid == 65532 and plan.capabilities == frozenset()
    assert stack.operator.proc is not None
    assert privileges(stack.operator.proc.pid) == running_as(plan)
