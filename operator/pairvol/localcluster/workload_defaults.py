"""Defaults the API server fills into workload objects (apps/v1, batch/v1) on every write.

Why: clients read them back — ``kubectl rollout status`` refuses a DaemonSet or
StatefulSet whose ``updateStrategy.type`` is not ``RollingUpdate``, and the controllers of
:mod:`pairvol.localcluster.controllers` act on the same values a real cluster would store.
Values follow upstream's ``SetDefaults_*`` for these kinds; a value the client set is
kept. Pure functions; the object store calls :func:`apply_defaults` when it admits.
"""

from __future__ import annotations

import copy
from typing import Any


def _rolling(spec: dict[str, Any], key: str, rolling: dict[str, Any]) -> None:
    strategy = spec.setdefault(key, {})
    strategy.setdefault("type", "RollingUpdate")
    if strategy["type"] == "RollingUpdate":
        current = strategy.setdefault("rollingUpdate", {})
        for field, value in rolling.items():
            current.setdefault(field, value)


def _template(spec: dict[str, Any], restart: str | None = "Always") -> None:
    pod = spec.setdefault("template", {}).setdefault("spec", {})
    if restart is not None:
        pod.setdefault("restartPolicy", restart)
    pod.setdefault("terminationGracePeriodSeconds", 30)
    pod.setdefault("dnsPolicy", "ClusterFirst")
    pod.setdefault("schedulerName", "default-scheduler")


def apply_defaults(key: tuple[str, str], obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` (group, plural ``key``) with upstream's defaults filled in."""
    if key[0] not in ("apps", "batch") or not isinstance(obj.get("spec"), dict):
        return obj
    obj = copy.deepcopy(obj)
    spec = obj["spec"]
    if key == ("apps", "deployments"):
        spec.setdefault("replicas", 1)
        _rolling(spec, "strategy", {"maxSurge": "25%", "maxUnavailable": "25%"})
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("progressDeadlineSeconds", 600)
        _template(spec)
    elif key == ("apps", "replicasets"):
        spec.setdefault("replicas", 1)
        _template(spec)
    elif key == ("apps", "daemonsets"):
        _rolling(spec, "updateStrategy", {"maxUnavailable": 1, "maxSurge": 0})
        spec.setdefault("revisionHistoryLimit", 10)
        _template(spec)
    elif key == ("apps", "statefulsets"):
        spec.setdefault("replicas", 1)
        spec.setdefault("podManagementPolicy", "OrderedReady")
        _rolling(spec, "updateStrategy", {"partition": 0})
        spec.setdefault("revisionHistoryLimit", 10)
        _template(spec)
    elif key == ("batch", "jobs"):
        if spec.get("completions") is None and spec.get("parallelism") is None:
            spec["completions"] = 1
        spec.setdefault("parallelism", 1)
        spec.setdefault("backoffLimit", 6)
        spec.setdefault("completionMode", "NonIndexed")
        spec.setdefault("suspend", False)
        _template(spec, restart=None)  # a Job's pods must say OnFailure or Never
    return obj
