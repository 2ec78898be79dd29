"""Fixtures for end-to-end tests: the real operator process, real agents (qsd) in simulated
nodes, and the emulated API server — the same :class:`~pairvol.localcluster.demo.Stack` that
``make demo`` runs. Everything a test starts is torn down by the Stack (processes by PID /
cgroup, network namespaces, temp dirs named with our PID) even when the test fails.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from tests.support.ci import unavailable

from pairvol.localcluster.demo import Stack
from pairvol.operator.manifests import OperatorConfig

LEASE_S = 2.0


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    if os.geteuid() != 0:
        unavailable("needs root (network namespaces, mounts, cgroups)")
    # not under tmp_path: unix socket paths (the export under the node's hostPath) are
    # limited to 107 bytes, and pytest's tmp paths are long. Stack.up makes a short
    # /tmp/pairvol-demo-<pid>-* directory and removes it afterwards.
    del tmp_path
    # per-volume NetworkPolicies are created (the simulator does not enforce them)
    async with Stack.up(3, lease_duration=LEASE_S, operator_env={"PAIRVOL_PER_VOLUME_NETWORK_POLICY": "true"}) as s:
        yield s


@pytest.fixture
async def default_stack(tmp_path: Path) -> AsyncIterator[Stack]:
    """The operator with its *default* lease duration, lease margin and reconcile interval
    (OperatorConfig; the chart does not change them), for what the README promises "with
    the defaults". Volumes in it should use the CRD's defaults too (no ``volume`` fixture)."""
    if os.geteuid() != 0:
        unavailable("needs root (network namespaces, mounts, cgroups)")
    del tmp_path
    d = OperatorConfig()
    env = {"PAIRVOL_LEASE_MARGIN": f"{d.lease_margin_s:g}", "PAIRVOL_RECONCILE_INTERVAL": f"{d.reconcile_interval_s:g}"}
    async with Stack.up(3, lease_duration=d.lease_duration_s, operator_env=env) as s:
        yield s


@pytest.fixture
def volume() -> Any:
    return make_volume


def make_volume(name: str, **spec: Any) -> dict[str, Any]:
    """A ReplicatedVolume manifest; defaults keep tests fast (small, frequent checkpoints)."""
    body: dict[str, Any] = {"size": "64Mi", "checkpoint": {"intervalSeconds": 2},
                            "failover": {"gracePeriodSeconds": 1}}
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    return {"apiVersion": "pairvol.io/v1alpha1", "kind": "ReplicatedVolume",
            "metadata": {"name": name}, "spec": body}
