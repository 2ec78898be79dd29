"""The chart and the operator agree: what the chart configures is what the operator builds.

The operator reads its settings from the environment the chart's Deployment sets, and
creates agent pods, Services and Secrets the chart cannot see. Here the rendered env is fed
to the operator's own configuration parser and manifest builders; the resulting objects
must be valid Kubernetes objects, use the chart's ServiceAccount, and be admitted by the
chart's NetworkPolicy and found by its PodMonitor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from chart_support import EXAMPLES, Obj, ingress_allowed, kinds, one, render, validate_builtin
from test_chart import SCENARIOS

from pairvol.api.spec import parse_spec
from pairvol.operator.manifests import (
    OperatorConfig,
    pod_manifest,
    secret_manifest,
    services_manifests,
)

OWNER = {"metadata": {"name": "basic", "namespace": "storage", "uid": "0b7c9c2e-1"}}


def operator_config(objs: list[Obj]) -> OperatorConfig:
    deploy = one(objs, "Deployment")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    return OperatorConfig.from_env(env)


def agent_pods(config: OperatorConfig) -> list[Obj]:
    basic: dict[str, Any] = yaml.safe_load((EXAMPLES / "basic.yaml").read_text())
    spec = parse_spec(basic["spec"], "basic")
    return [
        pod_manifest(
            pod=f"basic-1-{i}",
            node=node,
            role=role,
            volume="basic",
            namespace="storage",
            spec=spec,
            owner=OWNER,
            config=config,
        )
        for i, (node, role) in enumerate([("node-a", "primary"), ("node-b", "secondary")])
    ]


def test_operator_parses_the_settings_the_chart_gives_it(tmp_path: Path) -> None:
    config = operator_config(render(SCENARIOS["custom-agent"], tmp=tmp_path))
    assert config.agent_image == "registry.example.com/pairvol-agent:0.1.1"
    assert config.agent_pull_policy == "Always"
    assert config.agent_service_account == "pv-agent"
    assert config.agent_resources == {
        "requests": {"cpu": "1", "memory": "512Mi"},
        "limits": {"memory": "2Gi"},
    }
    assert config.agent_node_selector == {"pairvol.io/storage": "true"}
    assert list(config.agent_tolerations) == [{"key": "storage", "operator": "Exists", "effect": "NoSchedule"}]
    assert config.watch_namespaces == ("storage",)
    assert config.peering == "pairvol"
    assert (config.metrics_port, config.health_port) == (8080, 8081)
    assert config.lease_duration_s == 3.0
    assert config.restart_in_place_window_s == 60.0


def test_the_lease_duration_is_a_chart_value_the_operator_and_its_agents_use(tmp_path: Path) -> None:
    """A slow API server needs a longer Lease (the agents renew every third of it): the
    chart's value reaches the operator, and through it every agent pod's command line."""
    config = operator_config(render({"operator": {"leaseDurationSeconds": 6}}, tmp=tmp_path))
    assert config.lease_duration_s == 6.0
    (primary, *_) = agent_pods(config)
    args = primary["spec"]["containers"][0]["command"]
    assert args[args.index("--lease-duration") + 1] == "6"


def test_the_restart_in_place_window_is_a_chart_value_and_zero_turns_it_off(tmp_path: Path) -> None:
    assert operator_config(render({"operator": {"restartInPlaceWindowSeconds": 0}}, tmp=tmp_path)) \
        .restart_in_place_window_s == 0.0
    assert operator_config(render({"operator": {"restartInPlaceWindowSeconds": 300}}, tmp=tmp_path)) \
        .restart_in_place_window_s == 300.0


def test_agent_objects_the_operator_builds_are_valid_kubernetes_objects(tmp_path: Path) -> None:
    config = operator_config(render(SCENARIOS["custom-agent"], tmp=tmp_path))
    objs = [
        *agent_pods(config),
        *services_manifests("basic", "storage", OWNER),
        secret_manifest("basic", "storage", OWNER),
    ]
    for obj in objs:
        validate_builtin(obj)


def test_agent_pods_use_the_charts_service_account_and_rbac(tmp_path: Path) -> None:
    objs = render(tmp=tmp_path)
    for pod in agent_pods(operator_config(objs)):
        account = pod["spec"]["serviceAccountName"]
        one(objs, "ServiceAccount", account, "storage")
        binding = one(objs, "RoleBinding", "pv-pairvol-agent", "storage")
        assert {"kind": "ServiceAccount", "name": account, "namespace": "storage"} in binding["subjects"]


def test_network_policy_and_pod_monitor_match_the_operators_pods(tmp_path: Path) -> None:
    objs = render({"monitoring": {"podMonitor": {"enabled": True}}}, tmp=tmp_path)
    primary, secondary = agent_pods(operator_config(objs))
    policies = kinds(objs, "NetworkPolicy")
    operator_pod = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    p_labels, s_labels = primary["metadata"]["labels"], secondary["metadata"]["labels"]

    def ok(src: dict[str, str], dst: dict[str, str], port: int) -> bool:
        return ingress_allowed(policies, dst_ns="storage", dst_pod=dst, src_ns="storage", src_pod=src, port=port)

    assert ok(p_labels, s_labels, 7801), "primary must reach the secondary's replication port"
    assert ok(operator_pod, p_labels, 7800) and ok(operator_pod, s_labels, 7800)
    assert not ok({"app": "x"}, p_labels, 7800)
    assert ok({"app": "x"}, p_labels, 7802)

    monitor = one(objs, "PodMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    for pod in (primary, secondary):
        assert selector.items() <= pod["metadata"]["labels"].items()
        (container,) = pod["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"api": 7800, "replication": 7801, "export": 7802}
        assert endpoint["port"] in ports


def test_the_operators_default_agent_image_is_the_charts_default_image() -> None:
    """Run without the chart's env, the operator still names the image the chart and Dockerfile use."""
    chart = yaml.safe_load((Path(__file__).resolve().parents[2] / "charts/pairvol/Chart.yaml").read_text())
    values = yaml.safe_load((Path(__file__).resolve().parents[2] / "charts/pairvol/values.yaml").read_text())
    assert OperatorConfig().agent_image == f"{values['image']['repository']}:{chart['appVersion']}"
    assert OperatorConfig.from_env({}).agent_image == OperatorConfig().agent_image
