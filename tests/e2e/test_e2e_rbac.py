"""The operator and the agents hold exactly the chart's permissions, and need all of them.

The ``stack`` fixture applies the chart's ServiceAccounts and RBAC (``helm template``),
runs the operator with a token of its ServiceAccount and gives every agent pod a token of
its own; the emulated API server enforces RBAC. A volume serving its workload with no
request refused shows that nothing is missing; the same scenario with one permission taken
out of the chart fails, refused by the API server, which shows the enforcement bites.
"""

from __future__ import annotations

import asyncio
import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.e2e.conftest import LEASE_S
from tests.support.ci import unavailable

from pairvol.localcluster.demo import DemoError, Stack

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.timeout(180)]


async def serves_its_workload(stack: Stack, manifest: dict[str, Any], within: float = 60) -> None:
    """The volume reaches Replicating and its primary serves the export (it holds the Lease)."""
    name = manifest["metadata"]["name"]
    await stack.apply(manifest)
    status = await stack.wait_phase(name, "Replicating", within=within)

    async def exported() -> bool:
        status = await stack.status(name)
        return bool(status.get("endpoint")) and stack.socket_path(status).exists()

    await stack.wait_for(f"{name}'s primary to serve its export", exported, within=within)
    assert status["secondary"]["outOfSync"] is False


def refused(stack: Stack) -> list[str]:
    return [f"{user} {a.verb} {a.resource}{'/' + a.subresource if a.subresource else ''}" for user, a in
            stack.cluster.api.denied]


async def test_operator_and_agents_work_with_the_charts_permissions(stack: Stack, volume: Any) -> None:
    kubeconfig = yaml.safe_load(await asyncio.to_thread(Path(stack.operator.kubeconfig).read_text))
    user = stack.cluster.api.authenticate(f"Bearer {kubeconfig['users'][0]['user']['token']}")
    assert user is not None and user.name == "system:serviceaccount:default:pv-pairvol-operator"

    await serves_its_workload(stack, volume("rbac-ok"))

    pods = await stack.pods("rbac-ok")
    assert {p["spec"].get("serviceAccountName") for p in pods} == {"pairvol-agent"}
    assert refused(stack) == [], "a permission the operator or an agent needs is missing from the chart"


async def test_a_permission_removed_from_the_chart_is_refused_and_the_volume_is_not_served(
    tmp_path: Path, operator_pod: dict[str, Any], chart_rbac: list[dict[str, Any]], volume: Any
) -> None:
    if os.geteuid() != 0:
        unavailable("needs root (network namespaces, mounts, cgroups)")
    del tmp_path
    reduced = copy.deepcopy(chart_rbac)
    (agent_role,) = [d for d in reduced if d["kind"] == "Role" and d["metadata"]["name"].endswith("-agent")]
    for rule in agent_role["rules"]:
        if "leases" in rule["resources"]:
            rule["verbs"].remove("create")  # the agent can no longer take its volume's Lease

    env = {"PAIRVOL_PER_VOLUME_NETWORK_POLICY": "true"}
    async with Stack.up(3, lease_duration=LEASE_S, operator_env=env, operator_pod=operator_pod, rbac=reduced) as s:
        with pytest.raises(DemoError):
            await serves_its_workload(s, volume("rbac-less"), within=20)
        assert "system:serviceaccount:default:pairvol-agent create leases" in refused(s)
