"""Specification of the Helm chart, checked with the real helm v4 and Kubernetes schemas.

Each scenario is a values file a user might write. For every one, `helm lint --strict`
passes and every object `helm template` renders is valid for the Kubernetes versions we
support (our own kinds against our CRDs). The rest pins down behaviour: what the operator
is told about agents, least-privilege RBAC, and which traffic the NetworkPolicy admits.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_support import (
    CHART,
    CRDS,
    Obj,
    helm_template,
    ingress_allowed,
    kinds,
    one,
    render,
    run,
    validate_any,
)

MONITORING_ON = {
    "serviceMonitor": {"enabled": True},
    "podMonitor": {"enabled": True},
    "prometheusRule": {"enabled": True},
    "dashboard": {"enabled": True},
}

SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "multi-namespace-with-monitoring": {
        "watchNamespaces": ["team-a", "team-b"],
        "monitoring": MONITORING_ON,
        "networkPolicy": {
            "apiFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
        },
        "alerts": {"labels": {"team": "storage"}, "degradedFor": "10m"},
    },
    "single-operator-no-peering-no-policy": {
        "operator": {"replicas": 1, "peering": {"enabled": False}, "verbose": True},
        "networkPolicy": {"enabled": False},
    },
    "custom-agent": {
        "image": {"repository": "registry.example.com/pairvol", "tag": "0.1.0-rc1"},
        "imagePullSecrets": [{"name": "regcred"}],
        "agent": {
            "image": {
                "repository": "registry.example.com/pairvol-agent",
                "tag": "0.1.1",
                "pullPolicy": "Always",
            },
            "resources": {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
            "nodeSelector": {"pairvol.io/storage": "true"},
            "tolerations": [{"key": "storage", "operator": "Exists", "effect": "NoSchedule"}],
            "hostPathBase": "/mnt/nvme/pairvol",
            "serviceAccountName": "pv-agent",
        },
        "volumeDefaults": {"checkpointIntervalSeconds": 30, "failoverMode": "Latest"},
        "networkPolicy": {"perVolumeReplication": True, "exportFrom": []},
        "operator": {
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {
                                        "key": "node-role.kubernetes.io/control-plane",
                                        "operator": "DoesNotExist",
                                    }
                                ]
                            }
                        ]
                    }
                }
            },
            "podAnnotations": {"example.com/owner": "storage"},
        },
        "monitoring": {"prometheusRule": {"enabled": True}},
        "alerts": {"checkpointIntervalSeconds": 60, "checkpointStaleFactor": 5},
    },
    "csi-driver-with-storage-class": {
        "watchNamespaces": ["apps"],
        "csi": {
            "enabled": True,
            "volumeNamespace": "apps",
            "storageClass": {"create": True, "isDefault": True, "parameters": {"checkpointIntervalSeconds": "5"}},
        },
    },
    "existing-service-account-no-rbac": {
        "rbac": {"create": False},
        "serviceAccount": {"create": False, "name": "pairvol-preinstalled"},
        "fullnameOverride": "pv",
    },
}


def env_of(objs: list[Obj]) -> dict[str, str]:
    deploy = one(objs, "Deployment")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", "<from field>") for e in container["env"]}


def test_helm_is_version_4(helm: str) -> None:
    out = run([helm, "version", "--short"]).stdout
    assert out.startswith("v4."), f"expected helm v4, got {out!r}"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_strict_passes(helm: str, scenario: str, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(SCENARIOS[scenario]))
    out = run([helm, "lint", "--strict", str(CHART), "--values", str(values)])
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_rendered_object_is_valid(scenario: str, tmp_path: Path) -> None:
    objs = render(SCENARIOS[scenario], tmp=tmp_path)
    assert objs, "nothing rendered"
    for obj in objs:
        validate_any(obj)
    names = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"


def test_defaults_render_the_operator_and_no_monitoring_objects(tmp_path: Path) -> None:
    objs = render(tmp=tmp_path)
    deploy = one(objs, "Deployment", "pv-pairvol-operator", "storage")
    assert deploy["spec"]["replicas"] == 2
    pod = deploy["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "pv-pairvol-operator"
    (container,) = pod["containers"]
    assert container["image"] == "pairvol/pairvol:0.1.0"
    assert container["args"] == ["operator"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert one(objs, "KopfPeering", "pairvol", "storage")
    assert one(objs, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    assert not [o for o in objs if o["apiVersion"].startswith("monitoring.coreos.com")]
    assert not kinds(objs, "ConfigMap")


def test_operator_is_told_the_agent_settings_through_env(tmp_path: Path) -> None:
    env = env_of(render(SCENARIOS["custom-agent"], tmp=tmp_path))
    assert env["PAIRVOL_AGENT_IMAGE"] == "registry.example.com/pairvol-agent:0.1.1"
    assert env["PAIRVOL_AGENT_PULL_POLICY"] == "Always"
    assert json.loads(env["PAIRVOL_AGENT_IMAGE_PULL_SECRETS"]) == [{"name": "regcred"}]
    assert env["PAIRVOL_AGENT_SERVICE_ACCOUNT"] == "pv-agent"
    assert json.loads(env["PAIRVOL_AGENT_RESOURCES"]) == {
        "requests": {"cpu": "1", "memory": "512Mi"},
        "limits": {"memory": "2Gi"},
    }
    assert json.loads(env["PAIRVOL_AGENT_NODE_SELECTOR"]) == {"pairvol.io/storage": "true"}
    assert json.loads(env["PAIRVOL_AGENT_TOLERATIONS"]) == [
        {"key": "storage", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert env["PAIRVOL_HOSTPATH_BASE"] == "/mnt/nvme/pairvol"
    assert env["PAIRVOL_DEFAULT_CHECKPOINT_INTERVAL"] == "30"
    assert env["PAIRVOL_DEFAULT_FAILOVER_MODE"] == "Latest"
    assert env["PAIRVOL_PER_VOLUME_NETWORK_POLICY"] == "true"
    assert env["PAIRVOL_WATCH_NAMESPACES"] == "storage"
    assert env["PAIRVOL_PEERING"] == "pairvol"


def test_agent_image_defaults_to_the_operator_image(tmp_path: Path) -> None:
    env = env_of(render({"image": {"repository": "r/pv", "tag": "9", "pullPolicy": "Never"}}, tmp=tmp_path))
    assert env["PAIRVOL_AGENT_IMAGE"] == "r/pv:9"
    assert env["PAIRVOL_AGENT_PULL_POLICY"] == "Never"
    assert json.loads(env["PAIRVOL_AGENT_RESOURCES"])["limits"] == {"memory": "1Gi"}
    assert json.loads(env["PAIRVOL_AGENT_NODE_SELECTOR"]) == {}
    assert json.loads(env["PAIRVOL_AGENT_TOLERATIONS"]) == []


def test_every_env_var_is_documented_in_configuration_md(tmp_path: Path) -> None:
    doc = (CRDS.parent / "docs" / "configuration.md").read_text()
    for name in env_of(render(SCENARIOS["custom-agent"], tmp=tmp_path)):
        assert f"`{name}`" in doc, f"{name} is not documented in docs/configuration.md"


def test_single_replica_without_peering(tmp_path: Path) -> None:
    objs = render(SCENARIOS["single-operator-no-peering-no-policy"], tmp=tmp_path)
    assert not kinds(objs, "KopfPeering") and not kinds(objs, "PodDisruptionBudget")
    assert not kinds(objs, "NetworkPolicy")
    env = env_of(objs)
    assert env["PAIRVOL_PEERING"] == ""
    container = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["--verbose", "operator"]
    role = one(objs, "Role", "pv-pairvol-operator")
    assert not [r for r in role["rules"] if "kopf.dev" in r["apiGroups"]]


def test_operators_without_peering_never_run_two_at_a_time(helm: str, tmp_path: Path) -> None:
    """Operators without peering each act on every volume: two of them overwrite each other's
    decisions. More than one replica without peering is refused, saying what to do, and the
    single one is replaced by Recreate (a rolling update's surge would run a second beside it)."""
    proc = run([helm, "template", "pv", str(CHART), "--set", "operator.peering.enabled=false"], check=False)
    assert proc.returncode != 0, "two operators without peering were rendered"
    assert "operator.replicas is 2 but operator.peering.enabled is false" in proc.stderr, proc.stderr
    assert "Set operator.replicas to 1, or enable operator.peering" in proc.stderr, proc.stderr
    single = one(render(SCENARIOS["single-operator-no-peering-no-policy"], tmp=tmp_path), "Deployment")
    assert single["spec"]["replicas"] == 1 and single["spec"]["strategy"] == {"type": "Recreate"}
    peered = one(render(tmp=tmp_path), "Deployment")
    assert peered["spec"]["strategy"]["type"] == "RollingUpdate"


def test_every_watched_namespace_gets_agent_account_roles_policy_and_peering(
    tmp_path: Path,
) -> None:
    objs = render(SCENARIOS["multi-namespace-with-monitoring"], tmp=tmp_path)
    for ns in ("team-a", "team-b"):
        one(objs, "ServiceAccount", "pairvol-agent", ns)
        one(objs, "Role", "pv-pairvol-agent", ns)
        one(objs, "Role", "pv-pairvol-operator", ns)
        binding = one(objs, "RoleBinding", "pv-pairvol-operator", ns)
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "pv-pairvol-operator", "namespace": "storage"}
        ]
        one(objs, "NetworkPolicy", "pv-pairvol-agent", ns)
        one(objs, "KopfPeering", "pairvol", ns)
    assert not [o for o in objs if o["metadata"].get("namespace") == "storage" and o["kind"] == "Role"]
    assert env_of(objs)["PAIRVOL_WATCH_NAMESPACES"] == "team-a,team-b"
    monitor = one(objs, "PodMonitor")
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == ["team-a", "team-b"]


# --- RBAC ---------------------------------------------------------------------------------


def grants(rules: list[Obj], group: str, resource: str, verb: str) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)


def granted(rules: list[Obj]) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> every verb the rules grant on it."""
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


# Exactly what the operator calls in a served namespace, verb by verb: a verb the code does
# not use is a permission an attacker who takes the operator's token gets for free.
OPERATOR_NEEDS: dict[tuple[str, str], set[str]] = {
    # its watch cache and kopf's (list, watch), a read before acting (get), kopf's finalizer
    # and progress annotations and the operator's annotation clear (merge and JSON patch)
    ("pairvol.io", "replicatedvolumes"): {"get", "list", "watch", "patch"},
    ("pairvol.io", "replicatedvolumes/status"): {"patch"},
    # ownerReferences with blockOwnerDeletion (OwnerReferencesPermissionEnforcement)
    ("pairvol.io", "replicatedvolumes/finalizers"): {"update"},
    # agent and cleanup pods: the watch cache, create, delete, the role label; never read one by one
    ("", "pods"): {"create", "delete", "list", "watch", "patch"},
    # the volume's Services and Secrets: made once, read (is it the volume's own? the token),
    # deleted with the volume; never listed, watched or changed
    ("", "services"): {"create", "get", "delete"},
    ("", "secrets"): {"create", "get", "delete"},
    # the agents' Lease: watched and read (who is primary), deleted with the volume; never written
    ("coordination.k8s.io", "leases"): {"get", "list", "watch", "delete"},
    # core/v1 Events, the operator's and kopf's: posted, never updated
    ("", "events"): {"create"},
    # kopf's peering: its watch, and its keep-alive as a patch
    ("kopf.dev", "kopfpeerings"): {"list", "watch", "patch"},
}
# with networkPolicy.perVolumeReplication: one policy per volume, made and deleted like a Service
NETWORK_POLICY_NEEDS = {("networking.k8s.io", "networkpolicies"): {"create", "get", "delete"}}
# cluster-wide: the node watch cache, and placement's one list of agent pods in all namespaces
OPERATOR_CLUSTER_NEEDS = {("", "nodes"): {"list", "watch"}, ("", "pods"): {"list"}}


@pytest.mark.parametrize(
    ("scenario", "needs"),
    [
        ("defaults", OPERATOR_NEEDS),
        ("custom-agent", {**OPERATOR_NEEDS, **NETWORK_POLICY_NEEDS}),
        (
            "single-operator-no-peering-no-policy",
            {k: v for k, v in OPERATOR_NEEDS.items() if k != ("kopf.dev", "kopfpeerings")},
        ),
    ],
)
def test_operator_rbac_grants_exactly_what_the_operator_calls(
    tmp_path: Path, scenario: str, needs: dict[tuple[str, str], set[str]]
) -> None:
    objs = render(SCENARIOS[scenario], tmp=tmp_path)
    (role,) = [r for r in kinds(objs, "Role") if r["metadata"]["name"].endswith("-operator")]
    assert granted(role["rules"]) == needs
    assert granted(one(objs, "ClusterRole", "pv-pairvol-operator")["rules"]) == OPERATOR_CLUSTER_NEEDS


def test_operator_rbac_has_no_wildcards_and_writes_nothing_cluster_wide(tmp_path: Path) -> None:
    objs = render(tmp=tmp_path)
    rules = one(objs, "Role", "pv-pairvol-operator", "storage")["rules"]
    cluster = one(objs, "ClusterRole", "pv-pairvol-operator")["rules"]
    for rule in rules + cluster:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
    assert {v for r in cluster for v in r["verbs"]} <= {"get", "list", "watch"}, "reads only"
    assert not grants(cluster, "", "pods", "get") and not grants(cluster, "", "pods", "watch")
    assert not grants(rules, "coordination.k8s.io", "leases", "update"), "only agents renew leases"
    assert not grants(rules, "", "secrets", "list") and not grants(rules, "", "secrets", "watch"), (
        "a list or watch of Secrets reads every Secret of the namespace"
    )


def test_agent_rbac_is_its_lease_and_reading_pods_only(tmp_path: Path) -> None:
    objs = render(tmp=tmp_path)
    role = one(objs, "Role", "pv-pairvol-agent", "storage")
    assert [(r["apiGroups"], r["resources"], r["verbs"]) for r in role["rules"]] == [
        (["coordination.k8s.io"], ["leases"], ["get", "create", "update", "patch"]),
        ([""], ["pods"], ["get"]),
    ]
    binding = one(objs, "RoleBinding", "pv-pairvol-agent", "storage")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pairvol-agent", "namespace": "storage"}]
    for crb in kinds(objs, "ClusterRoleBinding"):
        assert all(s["name"] != "pairvol-agent" for s in crb["subjects"]), "agents need no cluster rights"


def test_per_volume_replication_policy_lets_the_operator_manage_network_policies(
    tmp_path: Path,
) -> None:
    rules = one(render(SCENARIOS["custom-agent"], tmp=tmp_path), "Role", "pv-pairvol-operator")["rules"]
    assert grants(rules, "networking.k8s.io", "networkpolicies", "create")
    default_rules = one(render(tmp=tmp_path), "Role", "pv-pairvol-operator")["rules"]
    assert not grants(default_rules, "networking.k8s.io", "networkpolicies", "create")


def test_no_rbac_and_an_existing_service_account(tmp_path: Path) -> None:
    objs = render(SCENARIOS["existing-service-account-no-rbac"], tmp=tmp_path)
    assert not [o for o in objs if o["apiVersion"].startswith("rbac.authorization.k8s.io")]
    assert not kinds(objs, "ServiceAccount")
    deploy = one(objs, "Deployment", "pv-operator")
    assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == "pairvol-preinstalled"


# --- NetworkPolicy ------------------------------------------------------------------------

AGENT_A = {
    "app.kubernetes.io/name": "pairvol-agent",
    "pairvol.io/volume": "a",
    "pairvol.io/role": "primary",
}
AGENT_A2 = {
    "app.kubernetes.io/name": "pairvol-agent",
    "pairvol.io/volume": "a",
    "pairvol.io/role": "secondary",
}
OPERATOR = {"app.kubernetes.io/name": "pairvol-operator", "app.kubernetes.io/instance": "pv"}
WORKLOAD = {"app": "postgres"}


def allowed(policies: list[Obj], src_ns: str, src_pod: dict[str, str], port: int, **kw: Any) -> bool:
    return ingress_allowed(policies, dst_ns="storage", dst_pod=AGENT_A, src_ns=src_ns, src_pod=src_pod, port=port, **kw)


def test_network_policy_defaults(tmp_path: Path) -> None:
    policies = kinds(render(tmp=tmp_path), "NetworkPolicy")
    # replication: only from the peer agent
    assert allowed(policies, "storage", AGENT_A2, 7801)
    assert not allowed(policies, "storage", WORKLOAD, 7801)
    assert not allowed(policies, "other", AGENT_A2, 7801)
    # API: the operator of this release, and peer agents (a checksum resync's digests)
    assert allowed(policies, "storage", OPERATOR, 7800)
    assert allowed(policies, "storage", AGENT_A2, 7800)
    assert not allowed(policies, "storage", WORKLOAD, 7800)
    assert not allowed(policies, "other", OPERATOR, 7800)
    assert not allowed(policies, "other", AGENT_A2, 7800)
    # export: any pod of the namespace, nobody outside
    assert allowed(policies, "storage", WORKLOAD, 7802)
    assert not allowed(policies, "other", WORKLOAD, 7802)
    # nothing else
    assert not allowed(policies, "storage", OPERATOR, 22)


def test_network_policy_admits_operator_across_namespaces_and_prometheus_when_asked(
    tmp_path: Path,
) -> None:
    policies = kinds(render(SCENARIOS["multi-namespace-with-monitoring"], tmp=tmp_path), "NetworkPolicy")
    kw: dict[str, Any] = {"dst_pod": AGENT_A, "port": 7800}
    assert ingress_allowed(policies, dst_ns="team-a", src_ns="storage", src_pod=OPERATOR, **kw)
    assert ingress_allowed(policies, dst_ns="team-b", src_ns="monitoring", src_pod={"app": "prometheus"}, **kw)
    assert not ingress_allowed(policies, dst_ns="team-b", src_ns="team-a", src_pod=WORKLOAD, **kw)


def test_per_volume_replication_leaves_the_replication_port_to_the_operator(tmp_path: Path) -> None:
    policies = kinds(render(SCENARIOS["custom-agent"], tmp=tmp_path), "NetworkPolicy")
    assert not allowed(policies, "storage", AGENT_A2, 7801)
    assert not allowed(policies, "storage", WORKLOAD, 7802), "exportFrom: [] admits nobody"
    assert allowed(policies, "storage", OPERATOR, 7800)
    # the per-volume policy the operator creates (examples/networkpolicy-per-volume.yaml)
    # then admits exactly the peer of the same volume
    example = yaml.safe_load((CRDS.parent / "examples" / "networkpolicy-per-volume.yaml").read_text())
    example["metadata"]["namespace"] = "storage"
    assert example["spec"]["podSelector"]["matchLabels"]["pairvol.io/volume"] == "basic"
    basic = {**AGENT_A, "pairvol.io/volume": "basic"}
    peer = {**AGENT_A2, "pairvol.io/volume": "basic"}
    other_volume = {**AGENT_A2, "pairvol.io/volume": "other"}
    kw: dict[str, Any] = {"dst_ns": "storage", "dst_pod": basic, "src_ns": "storage", "port": 7801}
    assert ingress_allowed([*policies, example], src_pod=peer, **kw)
    assert not ingress_allowed([*policies, example], src_pod=other_volume, **kw)
    kw["port"] = 7800  # the API: a checksum resync's digests
    assert ingress_allowed([*policies, example], src_pod=peer, **kw)
    assert not ingress_allowed([*policies, example], src_pod=other_volume, **kw)


# --- values schema and packaging ----------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"volumeDefaults": {"failoverMode": "latest"}}, "/volumeDefaults/failoverMode"),
        ({"alerts": {"degradedFor": 300}}, "/alerts/degradedFor"),
        ({"alerts": {"degradedFor": "five minutes"}}, "/alerts/degradedFor"),
        ({"operator": {"replicas": 0}}, "/operator/replicas"),
        ({"operator": {"leaseDurationSeconds": 0.5}}, "/operator/leaseDurationSeconds"),
        ({"operator": {"restartInPlaceWindowSeconds": -1}}, "/operator/restartInPlaceWindowSeconds"),
        ({"agent": {"hostPathBase": "relative/path"}}, "/agent/hostPathBase"),
        ({"watchNamespaces": ["Not_A_Namespace"]}, "/watchNamespaces/0"),
        ({"agnet": {}}, "agnet"),
    ],
)
def test_values_schema_rejects_mistakes_with_a_pointer_to_them(
    values: dict[str, Any], complaint: str, tmp_path: Path
) -> None:
    proc = helm_template(values, tmp=tmp_path, check=False)
    assert proc.returncode != 0, f"helm accepted {values}"
    assert complaint in proc.stderr, proc.stderr


def test_packaged_chart_carries_the_crds(helm: str, tmp_path: Path) -> None:
    run([helm, "package", str(CHART), "--destination", str(tmp_path)])
    (pkg,) = tmp_path.glob("pairvol-*.tgz")
    with tarfile.open(pkg) as tar:
        for crd in CRDS.glob("*.yaml"):
            member = tar.extractfile(f"pairvol/crds/{crd.name}")
            assert member is not None and member.read() == crd.read_bytes()


def test_values_schema_is_a_valid_json_schema_that_accepts_the_defaults() -> None:
    import jsonschema  # type: ignore[import-untyped]

    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load((CHART / "values.yaml").read_text()), schema)
    for values in SCENARIOS.values():
        jsonschema.validate(values, schema)


@pytest.mark.parametrize(("version", "ok"), [("1.28.9", False), ("1.29.0", True), ("1.35.0", True)])
def test_chart_states_the_kubernetes_versions_it_supports(helm: str, version: str, ok: bool) -> None:
    proc = run([helm, "template", "pv", str(CHART), "--kube-version", version], check=False)
    assert (proc.returncode == 0) == ok, proc.stderr
    if not ok:
        assert "kubeVersion" in proc.stderr or "incompatible" in proc.stderr, proc.stderr


def test_operator_pods_admit_only_metrics_scrapes(tmp_path: Path) -> None:
    operator = {**OPERATOR, "app.kubernetes.io/component": "operator"}

    def reach(policies: list[Obj], src_ns: str, port: int) -> bool:
        return ingress_allowed(
            policies, dst_ns="storage", dst_pod=operator, src_ns=src_ns, src_pod={"app": "p"},
            port=port,
        )  # fmt: skip

    policies = kinds(render(tmp=tmp_path), "NetworkPolicy")
    assert reach(policies, "monitoring", 8080)
    assert not reach(policies, "monitoring", 8081)
    assert not reach(policies, "storage", 22)
    closed = kinds(render({"networkPolicy": {"operatorMetricsFrom": []}}, tmp=tmp_path), "NetworkPolicy")
    assert not reach(closed, "monitoring", 8080)
    assert not reach(closed, "storage", 8080)


def test_helm_installs_exactly_the_repository_crds(helm: str) -> None:
    out = run([helm, "template", "pv", str(CHART), "--include-crds"]).stdout
    rendered = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "CustomResourceDefinition"]
    ours = [d for p in sorted(CRDS.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    key = lambda d: d["metadata"]["name"]  # noqa: E731
    assert sorted(rendered, key=key) == sorted(ours, key=key)
