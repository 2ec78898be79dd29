"""The alerts select their targets by ``job`` (``up{job="pairvol-agent"}``,
``up{job="pairvol-operator"}``), and the ``job`` label is made by the Prometheus Operator
from the monitors: the value of the target's label named by ``jobLabel`` (the Service's for
a ServiceMonitor, the pod's for a PodMonitor), else the Service's name, or
``<namespace>/<PodMonitor name>``. Nothing else ties the two together, so a renamed label, a
changed jobLabel or a monitor that no longer selects the targets would leave the "down"
alerts silent. This test follows that chain on the rendered chart and on the agent pod the
operator really creates."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from chart_support import Obj, _selector_matches, kinds, one, render

from pairvol.api.spec import parse_spec
from pairvol.operator.manifests import OperatorConfig, pod_manifest

NAMESPACE = "storage"
VALUES = {"monitoring": {"prometheusRule": {"enabled": True}, "serviceMonitor": {"enabled": True},
                         "podMonitor": {"enabled": True}}}
JOB_MATCHER = re.compile(r'\bjob\s*=\s*"([^"]+)"')


def jobs_used_by_rules(rule: Obj) -> set[str]:
    return {job for g in rule["spec"]["groups"] for r in g["rules"] for job in JOB_MATCHER.findall(r["expr"])}


def agent_pod() -> dict[str, Any]:
    spec = parse_spec({"size": "1Gi"}, name="vol")
    pod: dict[str, Any] = pod_manifest(pod="vol-3", node="n2", role="primary", volume="vol", namespace=NAMESPACE,
                                       spec=spec, owner={"metadata": {"name": "vol", "uid": "1"}},
                                       config=OperatorConfig())
    return pod


def service_monitor_jobs(objs: list[Obj]) -> set[str]:
    sm = one(objs, "ServiceMonitor")
    spec = sm["spec"]
    namespaces = spec.get("namespaceSelector", {}).get("matchNames") or [sm["metadata"]["namespace"]]
    targets = [s for s in kinds(objs, "Service")
               if s["metadata"]["namespace"] in namespaces
               and _selector_matches(spec["selector"], s["metadata"].get("labels") or {})]
    assert targets, f"ServiceMonitor {sm['metadata']['name']} selects no Service of the chart"
    jobs = set()
    for svc in targets:
        ports = {p.get("name") for p in svc["spec"]["ports"]}
        assert {e["port"] for e in spec["endpoints"]} <= ports, f"{svc['metadata']['name']} has ports {ports}"
        labels = svc["metadata"].get("labels") or {}
        jobs.add(labels.get(spec["jobLabel"], svc["metadata"]["name"]) if "jobLabel" in spec
                 else svc["metadata"]["name"])
    return jobs


def pod_monitor_jobs(objs: list[Obj], pod: dict[str, Any]) -> set[str]:
    pm = one(objs, "PodMonitor")
    spec = pm["spec"]
    labels = pod["metadata"]["labels"]
    assert _selector_matches(spec["selector"], labels), f"PodMonitor selects no agent pod (labels {labels})"
    assert pod["metadata"]["namespace"] in spec["namespaceSelector"]["matchNames"]
    ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    assert {e["port"] for e in spec["podMetricsEndpoints"]} <= ports, f"agent pod ports are {ports}"
    default = f"{pm['metadata']['namespace']}/{pm['metadata']['name']}"
    return {labels.get(spec["jobLabel"], default) if "jobLabel" in spec else default}


def test_every_job_the_alerts_use_is_a_job_the_monitors_produce(tmp_path: Path) -> None:
    objs = render(VALUES, tmp=tmp_path, namespace=NAMESPACE)
    used = jobs_used_by_rules(one(objs, "PrometheusRule"))
    assert used == {"pairvol-agent", "pairvol-operator"}, f"the rules use jobs {used}"
    produced = service_monitor_jobs(objs) | pod_monitor_jobs(objs, agent_pod())
    assert used <= produced, f"alerts use jobs {sorted(used)}; the monitors produce {sorted(produced)}"
    assert service_monitor_jobs(objs) == {"pairvol-operator"}
    assert pod_monitor_jobs(objs, agent_pod()) == {"pairvol-agent"}
