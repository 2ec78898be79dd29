"""The second half of ``make demo``: a pod uses pairvol through a PersistentVolumeClaim.

Why: Kubernetes users do not speak NBD; they write a claim. This part of the demo shows
what they get, on the cluster the first half installed with ``helm install``:

1. the chart's CSI objects (``helm template`` of the same release with ``csi.enabled``:
   the CSIDriver, a StorageClass in Latest mode, the controller's ServiceAccount and
   RBAC) applied, and the driver started on the nodes with the privileges of the chart's
   containers — the controller with a token of the chart's controller ServiceAccount, so
   the API server holds it to the chart's RBAC (:class:`~pairvol.localcluster.csi_plugins.LocalCsi`:
   the chart's Deployment and DaemonSet pods cannot run here, their sidecar images do
   not exist and the node simulator has no mount propagation);
2. a claim, bound to a PV the provisioner created through ``CreateVolume``;
3. a pod on the node of neither replica writes a checksummed, fsynced log into the file
   system its kubelet staged and published through the node plugin, timing each record;
4. the primary's node is killed; the volume fails over in Latest mode, and the pod keeps
   writing without a restart and without an I/O error — the longest write+fsync it saw
   is the stall;
5. the pod is deleted (its node unmounts: the kernel's flush reaches the new primary),
   ``e2fsck -fn`` checks the file system as the new primary holds it, and a pod on
   another node mounts the claim and verifies the log: every record intact and in order,
   at least every acknowledged one there;
6. the claim is deleted, and with it (reclaim policy Delete) the PV and the volume.

Any failed expectation is added to the demo's failures; the numbers go to its summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
import textwrap
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pairvol.aio import bounded
from pairvol.localcluster import chart
from pairvol.localcluster.csi_plugins import LocalCsi

CLAIM = "app-data"
SIZE = "64Mi"
IMAGE = "python:3.12-slim"
STORAGE_CLASS_PARAMETERS = {"failoverMode": "Latest", "checkpointIntervalSeconds": "5", "gracePeriodSeconds": "1"}
RBAC_KINDS = (
    "ServiceAccount",
    "Role",
    "ClusterRole",
    "RoleBinding",
    "ClusterRoleBinding",
)  # any image: the container gives its command, run on its node

# One record per line: "<sha256 of body> <body>\n", each written and fsynced before it is
# reported; the report carries the wall time and how long the write+fsync took.
WRITER = textwrap.dedent(
    """
    import hashlib, os, signal, sys, time
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with open("/data/log", "ab") as f:
        seq = 0
        while True:
            body = f"record {seq} from {os.uname().nodename}".encode()
            start = time.time()
            f.write(hashlib.sha256(body).hexdigest().encode() + b" " + body + b"\\n")
            f.flush()
            os.fsync(f.fileno())
            done = time.time()
            print(f"acked {seq} {done:.3f} {(done - start) * 1000:.1f}", flush=True)
            seq += 1
            time.sleep(0.02)
    """
)

# Every complete record intact and in order, and at least the acknowledged ones there.
VERIFIER = textwrap.dedent(
    """
    import hashlib, sys
    lines = open("/data/log", "rb").read().split(b"\\n")[:-1]
    for seq, line in enumerate(lines):
        digest, body = line.split(b" ", 1)
        if hashlib.sha256(body).hexdigest().encode() != digest:
            sys.exit(f"record {seq} corrupt: {line!r}")
        if not body.startswith(f"record {seq} ".encode()):
            sys.exit(f"record {seq} out of order: {line!r}")
    if len(lines) < int(sys.argv[1]):
        sys.exit(f"{len(lines)} records, but {sys.argv[1]} were acknowledged")
    print("verified", len(lines), flush=True)
    """
)


@dataclass
class Ack:
    seq: int
    at: float  # wall time the fsync returned
    took_ms: float  # write + fsync


def parse_acks(text: str) -> list[Ack]:
    """The writer's reports (pure); a line cut short by a read racing a write is skipped."""
    acks = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] == "acked":
            with contextlib.suppress(ValueError):
                acks.append(Ack(int(parts[1]), float(parts[2]), float(parts[3])))
    return acks


@dataclass
class PvcResult:
    """What the summary shows of the PVC story."""

    lines: list[tuple[str, str]] = field(default_factory=list)

    def add(self, key: str, value: str) -> None:
        self.lines.append((key, value))


def claim_object(namespace: str, storage_class: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": CLAIM, "namespace": namespace},
        "spec": {
            "storageClassName": storage_class,
            "accessModes": ["ReadWriteOnce"],
            "volumeMode": "Filesystem",
            "resources": {"requests": {"storage": SIZE}},
        },
    }


def pod_object(name: str, namespace: str, node: str, script: str, *args: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": "pvc-demo"}},
        "spec": {
            "nodeName": node,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 2,
            "containers": [
                {
                    "name": "app",
                    "image": IMAGE,
                    "command": ["python3", "-c", script, *args],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                }
            ],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": CLAIM}}],
        },
    }


async def csi_objects(values: Mapping[str, Any], namespace: str) -> list[dict[str, Any]]:
    """``helm template`` of the installed release with the CSI driver on: its CSI objects
    (CSIDriver, StorageClass, Deployment, ServiceAccount, RBAC)."""
    chart_dir = chart.repo_chart()
    if chart_dir is None:
        raise chart.ChartInstallError("charts/pairvol not found next to this package (run from a clone)")
    fd, values_path = await asyncio.to_thread(tempfile.mkstemp, suffix=".yaml", prefix="pairvol-values-")
    try:
        await asyncio.to_thread(os.write, fd, json.dumps(dict(values)).encode())
        await asyncio.to_thread(os.close, fd)
        argv = ["template", chart.RELEASE, str(chart_dir), "--namespace", chart.NAMESPACE, "-f", values_path]
        text = await chart.run_helm(argv, within=60)
    finally:
        await asyncio.to_thread(os.unlink, values_path)
    docs = [d for d in yaml.safe_load_all(text) if d]
    return [
        d
        for d in docs
        if str(((d.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/component", "")).startswith("csi")
    ]


def controller_arg(deployment: Mapping[str, Any], container: str, flag: str) -> str:
    """The value of ``flag=VALUE`` in a container's args (pure); KeyError when absent."""
    for c in deployment["spec"]["template"]["spec"]["containers"]:
        if c["name"] == container:
            for arg in c.get("args") or []:
                if str(arg).startswith(flag + "="):
                    return str(arg).split("=", 1)[1]
    raise KeyError(f"{container} has no {flag}")


async def fsck_clean(socket: Path, work: Path) -> tuple[bool, str]:
    """``e2fsck -fn`` on a copy of the volume read through its primary's NBD export (the
    file system unmounted everywhere); (clean, e2fsck's last line)."""
    image = work / "fsck.img"
    # a unix socket's path must be shorter than 108 bytes: a short link to it instead
    link_dir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="pvfsck-", dir="/tmp"))
    link = link_dir / "s"
    await asyncio.to_thread(link.symlink_to, socket)
    try:
        copy = await asyncio.create_subprocess_exec(
            "qemu-img", "convert", "-f", "raw", "-O", "raw", f"nbd+unix:///volume?socket={link}", str(image),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await bounded(copy.communicate(), 120)
    finally:
        await asyncio.to_thread(shutil.rmtree, link_dir, True)
    if copy.returncode != 0:
        return False, f"cannot read the volume: {out.decode(errors='replace').strip()}"
    try:
        check = await asyncio.create_subprocess_exec(
            "e2fsck", "-fn", str(image), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await bounded(check.communicate(), 120)
    finally:
        await asyncio.to_thread(image.unlink, True)
    lines = out.decode(errors="replace").strip().splitlines() or ["(no output)"]
    last = lines[-1].removeprefix(f"{image}: ")
    if check.returncode != 0:  # what e2fsck found, not only its summary
        found = [line for line in lines[:-1] if line.strip() and not line.startswith(("Pass ", "e2fsck "))]
        last = f"{last}; exit status {check.returncode}: " + " | ".join(found[:20])
    return check.returncode == 0, last


@dataclass
class Driver:
    """The CSI driver as :func:`start_driver` left it running."""

    csi: LocalCsi
    storage_class: str
    account: str
    took_s: float


async def start_driver(s: Any, values: Mapping[str, Any], token_lifetime_s: int = 3600) -> Driver:
    """The chart's CSI objects applied and the driver started; the controller holds a token
    of its ServiceAccount valid ``token_lifetime_s``."""
    from pairvol.localcluster import kubeconfig as kubeconfig_mod

    started = time.monotonic()
    ns = s.namespace
    csi_values = {
        **values,
        "csi": {
            "enabled": True,
            "volumeNamespace": ns,
            "storageClass": {"create": True, "parameters": STORAGE_CLASS_PARAMETERS},
        },
    }
    docs = await csi_objects(csi_values, ns)
    for doc in docs:
        if doc["kind"] in ("CSIDriver", "StorageClass", *RBAC_KINDS):
            s.cluster.apply(doc)
    (controller,) = [d for d in docs if d["kind"] == "Deployment"]
    (storage_class,) = [d for d in docs if d["kind"] == "StorageClass"]
    account = controller["spec"]["template"]["spec"]["serviceAccountName"]
    token = s.cluster.api.issue_token(chart.NAMESPACE, account, expiration_seconds=token_lifetime_s)
    # the node plugins read the replication state (the volume condition) as the chart's
    # DaemonSet's ServiceAccount
    (daemonset,) = [d for d in docs if d["kind"] == "DaemonSet"]
    node_account = daemonset["spec"]["template"]["spec"]["serviceAccountName"]
    node_token = s.cluster.api.issue_token(chart.NAMESPACE, node_account, expiration_seconds=token_lifetime_s)
    kubeconfig = await kubeconfig_mod.write(s.root / "csi-controller-kube" / "kubeconfig", s.cluster.url, token=token)
    # CreateVolume waits for Replicating as long as the chart's controller does, and the
    # provisioner's call as long as the chart's sidecar (--timeout: 10 s more)
    ready = float(controller_arg(controller, "csi-controller", "--ready-timeout"))
    csi = LocalCsi(
        s.sim,
        controller_kubeconfig=kubeconfig,
        node_token=node_token,
        volume_namespace=ns,
        log_dir=s.root,
        ready_timeout=ready,
        provision_timeout=ready + 10,
    )
    await csi.__aenter__()
    return Driver(csi, str(storage_class["metadata"]["name"]), str(account), time.monotonic() - started)


async def run_story(s: Any, values: Mapping[str, Any], failures: list[str], say: Any) -> PvcResult:
    """The PVC story on the installed stack ``s`` (a :class:`~pairvol.localcluster.demo.Stack`,
    installed with ``values``); the driver is started first and stopped at the end."""
    result = PvcResult()
    params = ",".join(f"{k}={v}" for k, v in STORAGE_CLASS_PARAMETERS.items())
    say(
        "the CSI driver: helm template pairvol charts/pairvol --set csi.enabled=true,csi.volumeNamespace="
        f"{s.namespace},csi.storageClass.create=true — its CSIDriver, StorageClass ({params}) and the "
        "controller's ServiceAccount and RBAC applied"
    )
    driver = await start_driver(s, values)
    try:
        say(
            f"CSI driver pairvol.io running (started in {driver.took_s:.1f} s): node "
            f"plugins on {', '.join(driver.csi.node_plugins)} privileged as the chart's DaemonSet runs them, the "
            f"controller as the chart's Deployment runs it, with ServiceAccount {chart.NAMESPACE}/{driver.account}'s "
            "token (the chart's RBAC)"
        )
        await _claim_story(s, driver.csi, driver.storage_class, failures, say, result)
    finally:
        await driver.csi.close()
    return result


async def _claim_story(
    s: Any, csi: LocalCsi, storage_class: str, failures: list[str], say: Any, result: PvcResult
) -> None:
    ns = s.namespace
    claims = f"/api/v1/namespaces/{ns}/persistentvolumeclaims"
    pods = f"/api/v1/namespaces/{ns}/pods"
    await s.kube.create(claims, claim_object(ns, storage_class))
    say(f"applied PersistentVolumeClaim {CLAIM}: {SIZE}, ReadWriteOnce, StorageClass {storage_class}")
    t0 = time.monotonic()

    async def bound() -> dict[str, Any] | None:
        claim = await s.kube.get(f"{claims}/{CLAIM}")
        return claim if (claim.get("status") or {}).get("phase") == "Bound" else None

    claim = await s.wait_for(f"claim {CLAIM} Bound", bound, within=90, every=0.2)
    pv = str(claim["spec"]["volumeName"])
    st = await s.status(pv)
    old, survivor = st["primary"]["node"], st["secondary"]["node"]
    say(
        f"claim Bound in {time.monotonic() - t0:.1f} s to PV {pv}: ReplicatedVolume {pv} "
        f"{st.get('phase')}, primary {old}, secondary {survivor}"
    )
    others = [n for n in s.sim.node_names if n not in (old, survivor)]
    if not others:
        failures.append("PVC story: no node other than the volume's two replicas for the pod")
        return
    node = others[0]
    await s.kube.create(pods, pod_object("writer", ns, node, WRITER))
    say(f"pod writer on {node} (neither replica's node): a checksummed, fsynced log in /data/log")
    log_path: Path = s.sim.log_path(node, ns, "writer")

    async def acks() -> list[Ack]:
        text = await asyncio.to_thread(lambda: log_path.read_text() if log_path.exists() else "")
        return parse_acks(text)

    async def at_least(n: int) -> list[Ack] | None:
        got = await acks()
        return got if len(got) >= n else None

    first = await s.wait_for("the writer's first 30 records", lambda: at_least(30), within=60, every=0.2)
    say(f"writer: {len(first)} records fsynced (mkfs.ext4 by NodeStageVolume, mounted, published)")

    say(f"killing node {old} (the primary of {pv})")
    t_kill = time.time()
    await s.sim.kill_node(old)
    before = len(await acks())

    async def failed_over() -> dict[str, Any] | None:
        cur = await s.status(pv)
        lf = cur.get("lastFailover") or {}
        return cur if lf.get("durationMs") is not None and (cur.get("primary") or {}).get("node") != old else None

    cur = await s.wait_for(f"{pv} to fail over", failed_over, within=60, every=0.1)
    lf = cur["lastFailover"]
    say(f"failover of {pv}: {lf['from']} -> {lf['to']} mode {lf['mode']} in {lf['durationMs']} ms")
    after = await s.wait_for(
        "the writer to go on on the new primary", lambda: at_least(before + 30), within=60, every=0.2
    )
    writer = await s.kube.get(f"{pods}/writer")
    statuses = (writer.get("status") or {}).get("containerStatuses") or [{}]
    restarts = int(statuses[0].get("restartCount", 0))
    phase = (writer.get("status") or {}).get("phase")
    stall = max((a for a in after if a.at >= t_kill), key=lambda a: a.took_ms)
    # the write that spanned the kill: the first one to complete after it
    resumed = next(a for a in after if a.at >= t_kill)
    say(
        f"writer kept writing: {len(after)} records, pod {phase}, {restarts} restarts; its longest "
        f"write+fsync after the kill took {stall.took_ms / 1000:.2f} s (record {stall.seq}), "
        f"the first one completed {resumed.at - t_kill:.2f} s after the kill"
    )
    if phase != "Running" or restarts:
        failures.append(f"PVC story: the writer pod is {phase} with {restarts} restarts after the failover")
    text = await asyncio.to_thread(log_path.read_text)
    if "Error" in text or "Traceback" in text:
        failures.append("PVC story: an error reached the writer pod")

    await s.kube.delete(f"{pods}/writer")

    async def gone(name: str) -> bool:
        return await s.kube.get_or_none(f"{pods}/{name}") is None

    await s.wait_for("pod writer deleted and its volume unmounted", lambda: gone("writer"), within=30)
    acked = len(await acks())
    say(f"pod writer deleted after {acked} acknowledged records: {node} unmounted (flush) and unstaged {pv}")

    st = await s.status(pv)
    clean, last = await fsck_clean(s.socket_path(st), s.root)
    verdict_fs = "clean" if clean else "ERRORS"
    say(f"e2fsck -fn of {pv} as its new primary {st['primary']['node']} holds it: {verdict_fs} ({last})")
    if not clean:
        failures.append(f"PVC story: e2fsck -fn: {last}")

    await s.sim.restart_node(old)
    say(f"{old} powered on again")
    await s.kube.create(pods, pod_object("verifier", ns, survivor, VERIFIER, str(acked)))

    async def finished() -> str | None:
        got = await s.kube.get(f"{pods}/verifier")
        value = (got.get("status") or {}).get("phase")
        return value if value in ("Succeeded", "Failed") else None

    verdict = await s.wait_for("the verifier pod", finished, within=60, every=0.2)
    vlog = await asyncio.to_thread(s.sim.log_path(survivor, ns, "verifier").read_text)
    vlines = vlog.strip().splitlines() or ["(no output)"]
    say(f"pod verifier on {survivor} mounted {CLAIM}: {verdict}, {vlines[-1]}")
    if verdict != "Succeeded":
        failures.append(f"PVC story: log verification failed: {vlines[-1]}")
    await s.kube.delete(f"{pods}/verifier")
    await s.wait_for("pod verifier deleted", lambda: gone("verifier"), within=30)

    await s.kube.delete(f"{claims}/{CLAIM}")

    async def reclaimed() -> bool:
        pv_gone = await s.kube.get_or_none(f"/api/v1/persistentvolumes/{pv}") is None
        rv_gone = await s.kube.get_or_none(f"/apis/pairvol.io/v1alpha1/namespaces/{ns}/replicatedvolumes/{pv}") is None
        return pv_gone and rv_gone

    await s.wait_for(f"PV and ReplicatedVolume {pv} deleted", reclaimed, within=60, every=0.2)
    say(f"claim {CLAIM} deleted: PV and ReplicatedVolume {pv} deleted with it (reclaimPolicy Delete)")

    result.add("PVC", f"{CLAIM} ({SIZE}, ext4, Latest mode) -> PV/ReplicatedVolume {pv}")
    result.add("PVC failover", f"{lf['from']} -> {lf['to']}, operator-side {lf['durationMs']} ms")
    result.add(
        "pod-visible stall",
        f"{stall.took_ms / 1000:.2f} s longest write+fsync; first record after the kill at "
        f"+{resumed.at - t_kill:.2f} s; pod not restarted ({restarts} restarts), no I/O error",
    )
    result.add("file system", f"e2fsck -fn {verdict_fs}: {last}")
    ok = "yes" if verdict == "Succeeded" else "NO"
    result.add("log verified", f"{ok}: {vlines[-1]} records on {survivor} ({acked} acknowledged)")
