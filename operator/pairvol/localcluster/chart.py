"""pairvol installed into the local cluster the way a user installs it: ``helm install``.

Why: the demo and ``pairvol localcluster up --operator`` must show the product as it is
shipped — the chart's Deployment of two peering operator replicas, its ServiceAccounts and
RBAC (enforced by the API server), its agents' Role — not an operator started by hand
with more rights than the chart gives it. The nodes run the chart's image
(``pairvol/pairvol``) from this installation (see :mod:`pairvol.localcluster.images`).

:class:`ChartOperator` is the handle the demo keeps on the installed operator: where its
pods run, their logs, and their metrics (scraped by pod IP, as Prometheus would).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pairvol.aio import bounded, signal_child
from pairvol.errors import PairvolError

RELEASE = "pairvol"
NAMESPACE = "pairvol"
OPERATOR_SELECTOR = "app.kubernetes.io/name=pairvol-operator"


class ChartInstallError(PairvolError):
    """``helm`` could not install (or uninstall) the chart; the message says why."""


def repo_chart() -> Path | None:
    """``charts/pairvol`` of the clone this package runs from, if there is one."""
    candidate = Path(__file__).resolve().parents[3] / "charts" / "pairvol"
    return candidate if candidate.is_dir() else None


def helm_binary() -> str | None:
    """``.venv/tools/helm`` (``make tools``) or a ``helm`` on PATH."""
    local = Path(sys.prefix) / "tools" / "helm"
    return str(local) if local.is_file() else shutil.which("helm")


async def run_helm(args: Sequence[str], *, within: float) -> str:
    """``helm ARGS``; its stdout, or :class:`ChartInstallError` with helm's last error line."""
    helm = helm_binary()
    if helm is None:
        raise ChartInstallError("helm not found (run `make tools`, which puts it in .venv/tools/)")
    proc = await asyncio.create_subprocess_exec(
        helm, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL
    )
    try:
        out, err = await bounded(proc.communicate(), within)
    except TimeoutError:
        signal_child(proc, signal.SIGKILL)
        await proc.wait()
        raise ChartInstallError(f"`helm {args[0]}` did not finish within {within:.0f} s") from None
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines() or ["(no output)"]
        raise ChartInstallError(f"`helm {args[0]}` failed: {lines[-1]}")
    return out.decode(errors="replace")


async def install(
    kubeconfig: Path,
    values: Mapping[str, Any],
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
    within: float = 150,
) -> None:
    """``helm install RELEASE charts/pairvol -n NAMESPACE --create-namespace -f VALUES --wait``.

    The watched namespaces must exist (the chart creates the agents' ServiceAccount and
    Role in each), as for a user following the README."""
    chart = repo_chart()
    if chart is None:
        raise ChartInstallError("charts/pairvol not found next to this package (run from a clone of the repository)")

    def write_values() -> str:
        fd, path = tempfile.mkstemp(suffix=".yaml", prefix="pairvol-values-")
        with os.fdopen(fd, "w") as fh:
            json.dump(dict(values), fh)  # JSON is YAML
        return path

    values_path = await asyncio.to_thread(write_values)
    argv = ["install", release, str(chart), "--namespace", namespace, "--create-namespace", "-f", values_path]
    argv += ["--kubeconfig", str(kubeconfig), "--wait", "--timeout", f"{within:.0f}s"]
    try:
        await run_helm(argv, within=within + 30)
    finally:
        await asyncio.to_thread(os.unlink, values_path)


@dataclass
class OperatorPod:
    name: str
    node: str
    ip: str
    ready: bool


@dataclass
class ChartOperator:
    """The operator Deployment a ``helm install`` created, seen through the API and the nodes.

    ``sim`` is the node simulator (for log paths), ``kube`` any client with
    ``list(path, label_selector)``."""

    kube: Any
    sim: Any
    namespace: str = NAMESPACE
    metrics_port: int = 8080

    async def pods(self) -> list[OperatorPod]:
        items = await self.kube.list(f"/api/v1/namespaces/{self.namespace}/pods", OPERATOR_SELECTOR)
        pods = []
        for pod in items:
            status = pod.get("status") or {}
            ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
            pods.append(
                OperatorPod(
                    name=pod["metadata"]["name"],
                    node=str((pod.get("spec") or {}).get("nodeName") or ""),
                    ip=str(status.get("podIP") or ""),
                    ready=ready and pod["metadata"].get("deletionTimestamp") is None,
                )
            )
        return sorted(pods, key=lambda p: p.name)

    async def running(self) -> bool:
        return any(p.ready for p in await self.pods())

    async def describe(self) -> str:
        pods = await self.pods()
        shown = ", ".join(f"{p.name} on {p.node}{'' if p.ready else ' (not ready)'}" for p in pods)
        return f"helm release {RELEASE} in namespace {self.namespace}: {len(pods)} replicas ({shown or 'none'})"

    @property
    def log_hint(self) -> str:
        return f"operator pods' logs: {self.sim.root}/<node>/logs/{self.namespace}_<pod>.log"

    async def metrics(self) -> list[str]:
        """The ``/metrics`` text of every ready replica (pod IPs are routed from this host)."""
        import aiohttp

        texts = []
        timeout = aiohttp.ClientTimeout(total=3)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for pod in await self.pods():
                if not (pod.ready and pod.ip):
                    continue
                try:
                    async with session.get(f"http://{pod.ip}:{self.metrics_port}/metrics") as resp:
                        texts.append(await resp.text())
                except (aiohttp.ClientError, TimeoutError):
                    continue  # a replica that just died counts nothing
        return texts


def counter_total(texts: Sequence[str], sample: str) -> float:
    """Sum of one sample (``name{labels}``, exactly as exposed) over several ``/metrics`` texts."""
    pattern = re.compile(rf"^{re.escape(sample)} (\S+)$", re.M)
    return sum(float(m.group(1)) for text in texts for m in pattern.finditer(text))
