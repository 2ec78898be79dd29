"""The examples and the chart's own custom resources, applied with the real kubectl.

The target is the project's emulated API server (`pairvol localcluster up`, no nodes), which
registers crds/ and enforces their structural schemas, defaults and CEL rules as Kubernetes
does. It serves only the kinds the operator needs, so Deployments, RBAC and NetworkPolicies
are checked by schema validation (test_chart.py) instead; what it serves is applied here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from chart_support import EXAMPLES, ROOT, kinds, load_yaml_docs, render, tool

NAMESPACE = f"chart-test-{os.getpid()}"


@pytest.fixture(scope="module")
def kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    workdir = tmp_path_factory.mktemp(f"localcluster-{os.getpid()}")
    config = workdir / "kubeconfig"
    log = (workdir / "localcluster.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pairvol", "localcluster", "up", "--nodes", "0",
         "--no-simulate-nodes", "--kubeconfig", str(config), "--crds", str(ROOT / "crds")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"pairvol localcluster exited {proc.returncode}:\n" + (workdir / "localcluster.log").read_text()
                )
            if config.exists() and kubectl(config, "get", "crd", check=False).returncode == 0:
                break
            assert time.monotonic() < deadline, "local API server did not come up in 60 s"
            time.sleep(0.2)
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
        kubectl(config, "apply", "-f", "-", stdin=yaml.safe_dump(namespace))
        yield config
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        log.close()


def kubectl(config: Path, *args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [tool("kubectl"), "--kubeconfig", str(config), *args],
        capture_output=True, text=True, timeout=60, input=stdin,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return proc


RV_EXAMPLES = sorted(
    p for p in EXAMPLES.glob("*.yaml") if any(o["kind"] == "ReplicatedVolume" for o in load_yaml_docs(p))
)


@pytest.mark.parametrize("path", RV_EXAMPLES, ids=lambda p: p.name)
def test_replicatedvolume_examples_apply(kubeconfig: Path, path: Path) -> None:
    out = kubectl(kubeconfig, "apply", "-n", NAMESPACE, "-f", str(path))
    assert "created" in out.stdout or "configured" in out.stdout or "unchanged" in out.stdout


def test_api_server_fills_in_the_defaults(kubeconfig: Path) -> None:
    kubectl(kubeconfig, "apply", "-n", NAMESPACE, "-f", str(EXAMPLES / "basic.yaml"))
    obj = yaml.safe_load(kubectl(kubeconfig, "get", "rv", "basic", "-n", NAMESPACE, "-o", "yaml").stdout)
    assert obj["spec"]["failover"] == {
        "automatic": True,
        "mode": "Checkpoint",
        "gracePeriodSeconds": 3,
    }
    assert obj["spec"]["storage"] == {"hostPath": "/var/lib/pairvol"}
    assert obj["spec"]["reclaimPolicy"] == "Retain"


def test_kubectl_shows_the_printer_columns(kubeconfig: Path) -> None:
    kubectl(kubeconfig, "apply", "-n", NAMESPACE, "-f", str(EXAMPLES / "basic.yaml"))
    header = kubectl(kubeconfig, "get", "rv", "-n", NAMESPACE).stdout.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "PRIMARY", "SECONDARY", "CHECKPOINT", "SYNC", "AGE"]
    # -o wide: what an on-call engineer reads next, the operator's message among it
    kubectl(kubeconfig, "patch", "rv", "basic", "-n", NAMESPACE, "--subresource=status", "--type", "merge",
            "-p", json.dumps({"status": {"phase": "Failed", "message": "primary down; waiting-for-node-n2"}}))
    wide = kubectl(kubeconfig, "get", "rv", "-n", NAMESPACE, "-o", "wide").stdout.splitlines()
    assert wide[0].split() == [
        "NAME", "PHASE", "PRIMARY", "SECONDARY", "CHECKPOINT", "SYNC", "SIZE", "MODE", "EPOCH", "MESSAGE", "AGE"
    ], wide[0]
    assert "primary down; waiting-for-node-n2" in wide[1], wide


def test_kubectl_shows_a_running_resync_in_the_sync_column(kubeconfig: Path) -> None:
    """What the operator writes while a resync runs (decisions.sync_status) is what the SYNC
    column shows: kind, percent and bytes to go."""
    kubectl(kubeconfig, "apply", "-n", NAMESPACE, "-f", str(EXAMPLES / "basic.yaml"))
    sync = {"kind": "bitmap", "reason": "r", "progress": 0.42, "doneBytes": 1, "totalBytes": 2,
            "summary": "bitmap 42% (12 MiB to go)"}
    kubectl(kubeconfig, "patch", "rv", "basic", "-n", NAMESPACE, "--subresource=status", "--type", "merge",
            "-p", json.dumps({"status": {"phase": "Syncing", "sync": sync}}))
    out = kubectl(kubeconfig, "get", "rv", "basic", "-n", NAMESPACE).stdout
    assert "bitmap 42% (12 MiB to go)" in out, out
    explained = kubectl(kubeconfig, "explain", "rv.status.sync.totalBytes").stdout
    assert "for a bitmap resync the changed regions" in explained, explained


def test_size_cannot_shrink(kubeconfig: Path) -> None:
    kubectl(kubeconfig, "apply", "-n", NAMESPACE, "-f", str(EXAMPLES / "basic.yaml"))
    proc = kubectl(
        kubeconfig, "patch", "rv", "basic", "-n", NAMESPACE, "--type", "merge",
        "-p", '{"spec": {"size": "1Mi"}}', check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "spec.size may grow but never shrink" in proc.stderr


@pytest.mark.parametrize(
    ("patch", "complaint"),
    [
        ('{"spec": {"failover": {"mode": "latest"}}}', "spec.failover.mode"),
        ('{"spec": {"storage": {"hostPath": "/var/lib/../../etc"}}}', "without '..'"),
        (
            '{"spec": {"replication": {"peerTimeoutSeconds": 0}}}',
            "spec.replication.peerTimeoutSeconds",
        ),
    ],
)
def test_invalid_changes_are_rejected_with_a_reason(kubeconfig: Path, patch: str, complaint: str) -> None:
    kubectl(kubeconfig, "apply", "-n", NAMESPACE, "-f", str(EXAMPLES / "latest-mode.yaml"))
    proc = kubectl(
        kubeconfig, "patch", "rv", "orders-db", "-n", NAMESPACE, "--type", "merge", "-p", patch,
        check=False,
    )  # fmt: skip
    assert proc.returncode != 0, f"{patch} was accepted"
    assert complaint in proc.stderr, proc.stderr


def test_operator_status_is_kept_whole(kubeconfig: Path) -> None:
    """A full status written through the status subresource comes back unpruned."""
    from test_crds import FULL_STATUS

    kubectl(kubeconfig, "apply", "-n", NAMESPACE, "-f", str(EXAMPLES / "basic.yaml"))
    patch = yaml.safe_dump({"status": FULL_STATUS})
    kubectl(
        kubeconfig, "patch", "rv", "basic", "-n", NAMESPACE, "--subresource", "status",
        "--type", "merge", "-p", patch,
    )  # fmt: skip
    obj = yaml.safe_load(kubectl(kubeconfig, "get", "rv", "basic", "-n", NAMESPACE, "-o", "yaml").stdout)
    assert obj["status"] == FULL_STATUS


def test_charts_kopf_peerings_apply(kubeconfig: Path, tmp_path: Path) -> None:
    objs = kinds(render({"watchNamespaces": [NAMESPACE]}, tmp=tmp_path), "KopfPeering")
    assert objs
    manifest = yaml.safe_dump_all(objs)
    out = kubectl(kubeconfig, "apply", "-f", "-", stdin=manifest)
    assert "kopfpeering.kopf.dev/pairvol" in out.stdout
