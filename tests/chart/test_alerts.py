"""Specification of the alerts, checked with Prometheus' own promtool.

The PrometheusRule rendered by the chart must be valid (`promtool check rules`), behave as
alerts_test.yaml says on synthetic series (`promtool test rules`: each alert fires and stays
silent when it should), follow its threshold values, and refer only to metrics the code
really exports: a rule about a metric nobody exports never fires, silently.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_support import ROOT, Obj, exported_metric_names, one, promql_metric_names, render, run

from pairvol.agent.metrics import METRIC_NAMES, AgentMetrics

HERE = Path(__file__).parent
MONITORING = {
    "monitoring": {
        "prometheusRule": {"enabled": True},
        "serviceMonitor": {"enabled": True},
        "podMonitor": {"enabled": True},
        "dashboard": {"enabled": True},
    }
}
# Metrics of Prometheus itself that the rules may use.
PROMETHEUS_METRICS = {"up"}


def rendered_rules(tmp: Path, values: dict[str, Any] | None = None) -> Obj:
    merged: dict[str, Any] = {**MONITORING, **(values or {})}
    merged["monitoring"] = MONITORING["monitoring"]
    rule: Obj = one(render(merged, tmp=tmp), "PrometheusRule")
    return rule


def write_rules(rule: Obj, path: Path, *, keep_descriptions: bool = True) -> Path:
    groups = rule["spec"]["groups"]
    if not keep_descriptions:
        for group in groups:
            for r in group["rules"]:
                r.get("annotations", {}).pop("description", None)
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def alerts(rule: Obj) -> dict[str, Obj]:
    return {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}


def operator_metric_names() -> set[str]:
    """Sample names of the operator's metrics (operator/pairvol/operator/metrics.py), if any."""
    try:
        mod = importlib.import_module("pairvol.operator.metrics")
    except ModuleNotFoundError as exc:
        if exc.name == "pairvol.operator.metrics":
            return set()
        raise
    names = getattr(mod, "METRIC_NAMES", None)
    return set(names) if names is not None else set()


def test_rendered_rules_pass_promtool_check(promtool: str, tmp_path: Path) -> None:
    rules = write_rules(rendered_rules(tmp_path), tmp_path / "rules.yaml")
    out = run([promtool, "check", "rules", str(rules)])
    assert "SUCCESS" in out.stdout


def test_alerts_fire_and_stay_silent_as_specified(promtool: str, tmp_path: Path) -> None:
    write_rules(rendered_rules(tmp_path), tmp_path / "rules.yaml", keep_descriptions=False)
    shutil.copy(HERE / "alerts_test.yaml", tmp_path / "alerts_test.yaml")
    proc = run([promtool, "test", "rules", "alerts_test.yaml"], check=False, cwd=tmp_path)
    assert proc.returncode == 0, f"promtool test rules failed:\n{proc.stdout}\n{proc.stderr}"
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_every_alert_has_a_firing_and_a_silent_case(tmp_path: Path) -> None:
    spec = yaml.safe_load((HERE / "alerts_test.yaml").read_text())
    fired: set[str] = set()
    silent: set[str] = set()
    for case in spec["tests"]:
        for check in case["alert_rule_test"]:
            (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    names = set(alerts(rendered_rules(tmp_path)))
    assert names == {
        "PairvolReplicationDegraded",
        "PairvolVolumeFailed",
        "PairvolVolumeFailingOver",
        "PairvolVolumePending",
        "PairvolSecondaryOutOfSync",
        "PairvolResyncStalled",
        "PairvolResyncFailing",
        "PairvolCheckpointStale",
        "PairvolFailoverHappened",
        "PairvolFailoverFailed",
        "PairvolAgentDown",
        "PairvolAgentStorageDaemonDown",
        "PairvolOperatorDown",
    }
    assert names - fired == set(), "alerts never shown to fire"
    assert names - silent == set(), "alerts never shown to stay silent"


def test_the_operators_metric_names_are_exactly_the_ones_it_exports() -> None:
    """The rules are checked against METRIC_NAMES: a name missing there could not be used in
    a rule, one listed but not exported would let a rule about it pass unchecked."""
    from pairvol.operator.metrics import METRIC_NAMES as OPERATOR_METRIC_NAMES
    from pairvol.operator.metrics import OperatorMetrics

    assert exported_metric_names(OperatorMetrics().registry) == set(OPERATOR_METRIC_NAMES)


def test_every_metric_in_the_rules_is_exported_by_the_code(tmp_path: Path) -> None:
    agent = AgentMetrics("v")
    really_exported = exported_metric_names(agent.registry)
    assert set(METRIC_NAMES) <= really_exported, (
        f"METRIC_NAMES lists names AgentMetrics does not export: {set(METRIC_NAMES) - really_exported}"
    )
    known = set(METRIC_NAMES) | operator_metric_names() | PROMETHEUS_METRICS
    used: dict[str, set[str]] = {}
    for name, rule in alerts(rendered_rules(tmp_path)).items():
        used[name] = promql_metric_names(rule["expr"])
        assert used[name], f"{name}: found no metric in {rule['expr']!r}"
    unknown = {alert: names - known for alert, names in used.items() if names - known}
    assert not unknown, f"rules use metrics no code exports: {unknown}"


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'max by (namespace, volume) (pairvol_replication_state{state="degraded"}) == 1',
            {"pairvol_replication_state"},
        ),
        (
            "(time() - pairvol_checkpoint_last_timestamp_seconds) > 30 and on (pod) (x_y == 1)",
            {"pairvol_checkpoint_last_timestamp_seconds", "x_y"},
        ),
        (
            "sum(increase(pairvol_failovers_total[15m])) or a unless b offset 15m",
            {"pairvol_failovers_total", "a", "b"},
        ),
        ('sum(up{job="pairvol-operator"}) == 0 or absent(up{job="pairvol-operator"})', {"up"}),
        (
            "rate(pairvol_checkpoint_duration_secondz_bucket[5m])",
            {"pairvol_checkpoint_duration_secondz_bucket"},
        ),
    ],
)
def test_metric_name_extraction_finds_every_selector(expr: str, names: set[str]) -> None:
    assert promql_metric_names(expr) == names


def test_a_rule_with_a_misspelt_metric_is_caught() -> None:
    used = promql_metric_names("pairvol_replication_out_of_synk == 1")
    assert used - set(METRIC_NAMES) == {"pairvol_replication_out_of_synk"}


def test_thresholds_come_from_values(promtool: str, tmp_path: Path) -> None:
    rule = rendered_rules(
        tmp_path,
        {
            "alerts": {
                "degradedFor": "15m",
                "outOfSyncFor": "1m",
                "checkpointStaleFactor": 5,
                "checkpointIntervalSeconds": 20,
                "checkpointStaleFor": "2m",
                "failoverWindow": "1h",
                "resyncStalledFor": "30m",
                "agentDownFor": "10m",
                "labels": {"team": "storage"},
            }
        },
    )
    a = alerts(rule)
    assert a["PairvolReplicationDegraded"]["for"] == "15m"
    assert a["PairvolSecondaryOutOfSync"]["for"] == "1m"
    assert "> 100" in a["PairvolCheckpointStale"]["expr"] and a["PairvolCheckpointStale"]["for"] == "2m"
    assert "[1h]" in a["PairvolFailoverHappened"]["expr"] and "< 3600)" in a["PairvolFailoverHappened"]["expr"]
    assert a["PairvolResyncStalled"]["for"] == "30m"
    assert a["PairvolAgentDown"]["for"] == "10m"
    assert all(r["labels"]["team"] == "storage" for r in a.values())
    out = run([promtool, "check", "rules", str(write_rules(rule, tmp_path / "rules.yaml"))])
    assert "SUCCESS" in out.stdout


def test_checkpoint_interval_falls_back_to_the_volume_default(tmp_path: Path) -> None:
    rule = rendered_rules(tmp_path, {"volumeDefaults": {"checkpointIntervalSeconds": 60}})
    assert "> 180" in alerts(rule)["PairvolCheckpointStale"]["expr"]


def test_with_manual_checkpoints_by_default_only_each_volumes_own_interval_counts(tmp_path: Path) -> None:
    # no chart-wide interval to stand in for a volume whose interval the operator does not say
    expr = alerts(rendered_rules(tmp_path, {"volumeDefaults": {"checkpointIntervalSeconds": 0}}))[
        "PairvolCheckpointStale"
    ]["expr"]
    assert "pairvol_volume_checkpoint_interval_seconds" in expr and "unless" not in expr
    default = alerts(rendered_rules(tmp_path, {}))["PairvolCheckpointStale"]["expr"]
    assert "> 30" in default and "unless on (namespace, volume) pairvol_volume_checkpoint_interval_seconds" in default


def test_operator_down_needs_the_service_monitor(tmp_path: Path) -> None:
    objs = render({"monitoring": {"prometheusRule": {"enabled": True}}}, tmp=tmp_path)
    assert "PairvolOperatorDown" not in alerts(one(objs, "PrometheusRule"))


def test_dashboard_queries_use_exported_metrics_only(tmp_path: Path) -> None:
    import json

    cm = one(render(MONITORING, tmp=tmp_path), "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (content,) = cm["data"].values()
    dashboard = json.loads(content)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 6
    known = set(METRIC_NAMES) | operator_metric_names() | PROMETHEUS_METRICS
    for expr in exprs:
        names = promql_metric_names(expr.replace("$volume", "x").replace("$namespace", "x"))
        assert names and names <= known, f"dashboard query {expr!r} uses {names - known}"
    assert (ROOT / "charts" / "pairvol" / "dashboards" / "pairvol.json").is_file()


@pytest.mark.parametrize(
    ("window", "seconds"), [("15m", "900"), ("1h30m", "5400"), ("1m30s", "90"), ("500ms", "0.5"), ("1d", "86400")]
)
def test_the_failover_window_is_compared_with_time_in_seconds(tmp_path: Path, window: str, seconds: str) -> None:
    # the agent's timestamp of the failover's end against time(): a duration string would not parse
    a = alerts(rendered_rules(tmp_path, {"alerts": {"failoverWindow": window}}))
    for name in ("PairvolFailoverHappened", "PairvolFailoverFailed"):
        assert f"< {seconds})" in a[name]["expr"], a[name]["expr"]
        assert f"[{window}]" in a[name]["expr"]
