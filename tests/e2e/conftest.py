"""Fixtures for end-to-end tests: the real operator process, real agents (qsd) in simulated
nodes, and the emulated API server — the same :class:`~pairvol.localcluster.demo.Stack` that
``make demo`` runs. Everything a test starts is torn down by the Stack (processes by PID /
cgroup, network namespaces, temp dirs named with our PID) even when the test fails.

Nothing runs with more privileges than in a cluster: the node simulator applies the agent
pods' securityContext (from the operator's manifests), and the operator runs with the
securityContext of the chart's Deployment, rendered by the real helm.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Generator
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.support.ci import unavailable

from pairvol.localcluster.demo import Stack
from pairvol.operator.manifests import OperatorConfig

LEASE_S = 2.0
REPO = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``scale`` take minutes: only ``make test-scale`` (PAIRVOL_SCALE=1) runs
    them; elsewhere they are deselected (not skipped)."""
    if os.environ.get("PAIRVOL_SCALE") == "1":
        return
    deselected = [item for item in items if item.get_closest_marker("scale") is not None]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item.get_closest_marker("scale") is None]


def render_chart(namespace: str, *values: str) -> list[dict[str, Any]]:
    """``helm template pv charts/pairvol`` (default values plus ``--set`` ``values``)."""
    helm = REPO / ".venv" / "tools" / "helm"
    binary = str(helm) if helm.is_file() else shutil.which("helm")
    if binary is None:
        pytest.fail("helm not found: run `make tools` (bash tools/fetch-k8s-tools.sh .venv/tools)")
    sets = [arg for value in values for arg in ("--set", value)]
    out = subprocess.run(
        [binary, "template", "pv", str(REPO / "charts" / "pairvol"), "--namespace", namespace, *sets],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="session")
def operator_pod() -> dict[str, Any]:
    """The pod template of the chart's operator Deployment (default values)."""
    (deployment,) = [d for d in render_chart("storage") if d.get("kind") == "Deployment"]
    template: dict[str, Any] = deployment["spec"]["template"]
    return template


# ServiceAccount tokens die after this many seconds and their files are replaced at half
# that, for the agents and the operator alike: every test that runs longer than one lifetime
# shows that both follow the rotation (a process that read its token once is refused).
TOKEN_LIFETIME_S = 16


@pytest.fixture(scope="session")
def chart_rbac() -> list[dict[str, Any]]:
    """The chart rendered for namespace ``default``: the Stack applies its ServiceAccounts and
    RBAC and runs the operator and agents with their tokens (exactly the chart's permissions).
    Per-volume NetworkPolicies on, as the ``stack`` fixture runs the operator."""
    return render_chart("default", "networkPolicy.perVolumeReplication=true")


#: set for a test whose call phase failed: the stack's teardown then prints the operator's log
CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[CALL_FAILED] = report.failed


def show_operator_log(request: pytest.FixtureRequest, s: Stack, lines: int = 120) -> None:
    """After a failed test, before the stack's directory (and the log in it) is removed:
    the operator's last INFO-and-above lines, in the report's captured teardown output."""
    path = getattr(s.operator, "log_path", None)
    if not request.node.stash.get(CALL_FAILED, False) or path is None or not Path(path).exists():
        return
    kept = [line for line in Path(path).read_text(errors="replace").splitlines() if " DEBUG " not in line]
    print(f"--- the operator's log {path} (last {lines} lines above DEBUG) ---")
    print("\n".join(kept[-lines:]))


@pytest.fixture
async def stack(
    tmp_path: Path, operator_pod: dict[str, Any], chart_rbac: list[dict[str, Any]], request: pytest.FixtureRequest
) -> AsyncIterator[Stack]:
    if os.geteuid() != 0:
        unavailable("needs root (network namespaces, mounts, cgroups)")
    # not under tmp_path: unix socket paths (the export under the node's hostPath) are
    # limited to 107 bytes, and pytest's tmp paths are long. Stack.up makes a short
    # /tmp/pairvol-demo-<pid>-* directory and removes it afterwards.
    del tmp_path
    # per-volume NetworkPolicies are created (the simulator does not enforce them)
    env = {"PAIRVOL_PER_VOLUME_NETWORK_POLICY": "true"}
    async with Stack.up(
        3, lease_duration=LEASE_S, operator_env=env, operator_pod=operator_pod, rbac=chart_rbac,
        token_lifetime_s=TOKEN_LIFETIME_S,
    ) as s:
        yield s
        show_operator_log(request, s)


@pytest.fixture
async def default_stack(
    tmp_path: Path, operator_pod: dict[str, Any], chart_rbac: list[dict[str, Any]], request: pytest.FixtureRequest
) -> AsyncIterator[Stack]:
    """The operator with its *default* lease duration, lease margin and reconcile interval
    (OperatorConfig; the chart does not change them), for what the README promises "with
    the defaults". Volumes in it should use the CRD's defaults too (no ``volume`` fixture)."""
    if os.geteuid() != 0:
        unavailable("needs root (network namespaces, mounts, cgroups)")
    del tmp_path
    d = OperatorConfig()
    env = {"PAIRVOL_LEASE_MARGIN": f"{d.lease_margin_s:g}", "PAIRVOL_RECONCILE_INTERVAL": f"{d.reconcile_interval_s:g}"}
    async with Stack.up(
        3, lease_duration=d.lease_duration_s, operator_env=env, operator_pod=operator_pod, rbac=chart_rbac,
        token_lifetime_s=TOKEN_LIFETIME_S,
    ) as s:
        yield s
        show_operator_log(request, s)


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
