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

from pairvol.localcluster.apiserver_logic import RequestError
from pairvol.localcluster.demo import DemoError, Stack

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.timeout(180)]


async def serves_its_workload(stack: Stack, manifest: dict[str, Any], within: float = 60) -> None:
    """The volume reaches Replicating and its primary serves the export (it holds the Lease)."""
    await stack.apply(manifest)
    await is_served(stack, manifest["metadata"]["name"], within)


async def is_served(stack: Stack, name: str, within: float) -> None:
    status = await stack.wait_phase(name, "Replicating", within=within)

    async def exported() -> bool:
        status = await stack.status(name)
        return bool(status.get("endpoint")) and stack.socket_path(status).exists()

    await stack.wait_for(f"{name}'s primary to serve its export", exported, within=within)
    assert status["secondary"]["outOfSync"] is False


def refused(stack: Stack) -> list[str]:
    return [f"{user} {a.verb} {a.resource}{'/' + a.subresource if a.subresource else ''}" for user, a in
            stack.cluster.api.denied]


def operator_token(stack: Stack) -> str:
    path = Path(stack.operator.kubeconfig)
    kubeconfig = yaml.safe_load(path.read_text())
    return (path.parent / kubeconfig["users"][0]["user"]["tokenFile"]).read_text().strip()


async def test_operator_and_agents_work_with_the_charts_permissions(stack: Stack, volume: Any) -> None:
    first = await asyncio.to_thread(operator_token, stack)
    user = stack.cluster.api.authenticate(f"Bearer {first}")
    assert user is not None and user.name == "system:serviceaccount:default:pv-pairvol-operator"

    await serves_its_workload(stack, volume("rbac-ok"))

    pods = await stack.pods("rbac-ok")
    assert {p["spec"].get("serviceAccountName") for p in pods} == {"pairvol-agent"}
    assert refused(stack) == [], "a permission the operator or an agent needs is missing from the chart"

    # The tokens of the operator and the agents expire (TOKEN_LIFETIME_S) and their files are
    # replaced meanwhile: past one lifetime the first token is refused, and the volume is
    # still served, its Lease renewed and checkpoints cut with the tokens read anew.
    lifetime = stack.cluster.api.max_token_expiration_s
    assert lifetime is not None and lifetime <= 30
    before = ((await stack.status("rbac-ok")).get("checkpoint") or {}).get("id", 0)
    await asyncio.sleep(lifetime + 2)
    with pytest.raises(RequestError) as stale:
        stack.cluster.api.authenticate(f"Bearer {first}")
    assert stale.value.code == 401
    assert await asyncio.to_thread(operator_token, stack) != first
    await is_served(stack, "rbac-ok", within=10)
    assert ((await stack.status("rbac-ok")).get("checkpoint") or {}).get("id", 0) > before
    # pairvol's own clients (the agents' Lease keepers, the operator's reconcile calls) never
    # send an expired token: they read the file anew; only kopf's connection learns of a new
    # token through a 401 (then it logs in again, which reads the file)
    lease_refusals = [path for _, path in stack.cluster.api.unauthorized if "/leases" in path]
    assert lease_refusals == []
    assert refused(stack) == []


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
