"""``make demo`` works from a clone, as the README's first screen promises.

The demo is the newcomer's first contact: it installs pairvol with the real ``helm
install`` into the embedded local cluster (the chart's two peering operator replicas, its
RBAC enforced), replicates, kills the primary's node, fails over and verifies the bytes.
Then a pod writes a checksummed, fsynced log to a PersistentVolumeClaim through the CSI
driver, keeps writing while the volume's primary node is killed (Latest mode, no
restart), and the file system (e2fsck) and the log are verified after the pod moved.
This runs it as ``make demo`` does (``python -m pairvol demo`` with helm and kubectl of
``make tools`` on PATH) and holds it to its own verdict and to a clean console.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from tests.support.ci import tool
from tests.support.localcluster_cli import helm_home, run_session

pytestmark = [
    pytest.mark.netns,
    pytest.mark.timeout(300),
    pytest.mark.skipif(os.geteuid() != 0, reason="the demo needs root for simulated nodes"),
]

REPO = Path(__file__).resolve().parents[2]


async def test_make_demo_installs_with_helm_fails_over_and_verifies_the_data(tmp_path: Path) -> None:
    tools = Path(tool("helm")).parent
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}", **helm_home(tmp_path)}
    # the demo's own RTO limit is for a quiet machine; here the story and the bytes count
    argv = [sys.executable, "-m", "pairvol", "demo", "--rto-limit", "120"]
    code, text = await run_session(argv, cwd=REPO, env=env, within=280)
    assert code == 0, text
    lines = text.splitlines()
    # the story, in order: helm install, the chart's operator, replication, the kill, failover
    story = [
        "helm install pairvol charts/pairvol",
        "operator: helm release pairvol in namespace pairvol: 2 replicas",
        "phase Replicating",
        "killing node",
        "failover:",
        "re-protected:",
        # the second part: a pod on a PersistentVolumeClaim through the CSI driver
        "the CSI driver: helm template pairvol charts/pairvol --set csi.enabled=true",
        "CSI driver pairvol.io running",
        "applied PersistentVolumeClaim app-data",
        "claim Bound",
        "pod writer on",
        "killing node",
        "failover of pvc-",
        "writer kept writing",
        "pod writer deleted after",
        "holds it: clean",
        "mounted app-data: Succeeded, verified",
        "claim app-data deleted: PV and ReplicatedVolume",
        "pod-visible stall",
        "file system         e2fsck -fn clean",
        "log verified        yes",
        "result              PASS",
    ]
    at = 0
    for step in story:
        found = next((i for i in range(at, len(lines)) if step in lines[i]), None)
        assert found is not None, f"the demo never said {step!r} (after line {at}):\n{text}"
        at = found + 1
    # a normal run logs no error to the user's console, and no child process goes astray
    # (a loaded machine may warn about slow teardown; that is not an error)
    noisy = [line for line in lines if " ERROR " in line or "Traceback" in line or "Unknown child process" in line]
    assert not noisy, text
