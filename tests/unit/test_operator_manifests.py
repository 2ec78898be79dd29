"""What the operator asks Kubernetes for: agent pods, Services, Secret, operator settings.

The objects are validated against the official Kubernetes OpenAPI schema (strict: unknown
fields are errors), so a typo in a field name cannot slip through to a real cluster.
"""

from __future__ import annotations

import kubernetes_validate
import pytest

from pairvol.api.spec import parse_spec
from pairvol.operator.handlers import lease_view, node_view, pod_view
from pairvol.operator.manifests import (
    ConfigError,
    OperatorConfig,
    cleanup_pod_manifest,
    export_secret_manifest,
    network_policy_manifest,
    pod_manifest,
    secret_manifest,
    services_manifests,
)

OWNER = {"metadata": {"name": "vol", "uid": "1234"}}
K8S = "1.30"


def agent_pod(export_key: bool = True, **cfg: object) -> dict[str, object]:
    spec = parse_spec({"size": "1Gi", "replication": {"peerTimeoutSeconds": 2},
                       "storage": {"hostPath": "/srv/pv"}}, name="vol")
    return pod_manifest(pod="vol-3", node="n2", role="secondary", volume="vol", namespace="ns",
                        spec=spec, owner=OWNER, config=OperatorConfig(**cfg),  # type: ignore[arg-type]
                        export_key=export_key)


def test_agent_pod_is_valid_kubernetes_and_follows_the_agent_contract() -> None:
    pod = agent_pod(agent_command=("/opt/venv/bin/pairvol",), lease_duration_s=2.0)
    kubernetes_validate.validate(pod, K8S, strict=True)
    c = pod["spec"]["containers"][0]  # type: ignore[index]
    cmd = c["command"]
    assert cmd[:2] == ["/opt/venv/bin/pairvol", "agent"]
    flags = dict(zip(cmd[2::2], cmd[3::2], strict=True))
    assert flags == {
        "--name": "vol", "--data-dir": "/srv/pv/ns/vol", "--size": str(1 << 30),
        "--listen": "0.0.0.0:7800", "--replication-listen": "0.0.0.0:7801",
        "--export-socket": "/srv/pv/ns/vol/export.sock", "--export-listen": "0.0.0.0:7802",
        "--token-file": "/etc/pairvol/secret/token", "--psk-file": "/etc/pairvol/secret/psk",
        "--export-psk-file": "/etc/pairvol/secret/export-psk", "--peer-timeout": "2",
        "--lease-namespace": "ns", "--lease-name": "pairvol-vol", "--lease-duration": "2",
    }
    assert pod["spec"]["nodeName"] == "n2"  # type: ignore[index]
    assert pod["metadata"]["labels"] == {  # type: ignore[index]
        "pairvol.io/volume": "vol", "pairvol.io/role": "secondary",
        "app.kubernetes.io/name": "pairvol-agent", "app.kubernetes.io/managed-by":
        "pairvol-operator"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": 7800}
    # the same data-path verdict ends the pod when it stays bad: restartPolicy Never turns a
    # failed liveness probe into phase Failed, which the operator treats as a dead replica
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 7800}
    assert pod["spec"]["restartPolicy"] == "Never"  # type: ignore[index]
    live = c["livenessProbe"]
    assert live["initialDelaySeconds"] >= 5 and live["periodSeconds"] * live["failureThreshold"] <= 10
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "api": 7800, "replication": 7801, "export": 7802}
    # fixed ports on the pod's own IP (no hostNetwork, no hostPort): any number of agents
    # share a node; the operator and the peer reach them by podIP
    assert "hostNetwork" not in pod["spec"] and all("hostPort" not in p for p in c["ports"])  # type: ignore[operator]
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}  # type: ignore[index]
    assert vols["data"]["hostPath"]["path"] == "/srv/pv/ns/vol"
    assert vols["credentials"]["secret"]["secretName"] == "pairvol-vol"


def test_services_select_the_primary_and_the_agents() -> None:
    workload, agents = services_manifests("vol", "ns", OWNER)
    for svc in (workload, agents):
        kubernetes_validate.validate(svc, K8S, strict=True)
    assert workload["metadata"]["name"] == "vol"
    assert workload["spec"]["selector"] == {"pairvol.io/volume": "vol", "pairvol.io/role":
                                            "primary"}
    assert agents["spec"]["clusterIP"] == "None"


def test_secret_holds_a_token_and_a_qsd_psk_file() -> None:
    s1, s2 = secret_manifest("vol", "ns", OWNER), secret_manifest("vol", "ns", OWNER)
    kubernetes_validate.validate(s1, K8S, strict=True)
    ident, key = s1["stringData"]["psk"].strip().split(":")
    assert ident == "pairvol" and len(bytes.fromhex(key)) == 32
    assert s1["stringData"]["token"] != s2["stringData"]["token"], "fresh credentials per volume"


def test_workloads_get_a_secret_with_the_export_key_only_which_is_not_the_link_key() -> None:
    agents = secret_manifest("vol", "ns", OWNER)
    link_key = agents["stringData"]["psk"].strip().split(":")[1]
    ident, export_key = agents["stringData"]["export-psk"].strip().split(":")
    assert ident == "pairvol" and len(bytes.fromhex(export_key)) == 32 and export_key != link_key
    workload = export_secret_manifest("vol", "ns", OWNER, agents["stringData"]["export-psk"])
    kubernetes_validate.validate(workload, K8S, strict=True)
    assert workload["metadata"]["name"] == "pairvol-vol-export"
    assert workload["stringData"] == {
        "psk": f"pairvol:{export_key}\n", "psk-identity": "pairvol", "psk-key": export_key}
    assert workload["metadata"]["ownerReferences"] == agents["metadata"]["ownerReferences"]


def test_an_agent_of_a_volume_whose_secret_predates_the_export_key_serves_the_export_with_the_link_key() -> None:
    pod = agent_pod(agent_command=("/opt/venv/bin/pairvol",), lease_duration_s=2.0, export_key=False)
    command = pod["spec"]["containers"][0]["command"]  # type: ignore[index]
    assert "--psk-file" in command and "--export-psk-file" not in command


def test_cleanup_pod_only_touches_the_volume_directory() -> None:
    spec = parse_spec({"size": "1Gi"}, name="vol")
    pod = cleanup_pod_manifest(volume="vol", namespace="ns", node="n1", spec=spec, owner=OWNER,
                               config=OperatorConfig())
    kubernetes_validate.validate(pod, K8S, strict=True)
    assert pod["spec"]["containers"][0]["command"] == ["rm", "-rf", "--", "/host/vol"]
    assert pod["spec"]["volumes"][0]["hostPath"]["path"] == "/var/lib/pairvol/ns"


def test_agent_and_wipe_pods_run_as_root_without_any_capability_or_escalation() -> None:
    """docs/security.md: root only to own the hostPath files; nothing else. The test suite
    starts every agent with exactly this context (tests/support/agents.py)."""
    spec = parse_spec({"size": "1Gi", "storage": {"hostPath": "/srv/pv"}}, name="vol")
    wipe = cleanup_pod_manifest(volume="vol", namespace="ns", node="n1", spec=spec, owner=OWNER,
                                config=OperatorConfig())
    for pod in (agent_pod(), wipe):
        (container,) = pod["spec"]["containers"]  # type: ignore[index]
        assert container["securityContext"] == {
            "runAsUser": 0, "runAsGroup": 0, "privileged": False, "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        assert "securityContext" not in pod["spec"]  # type: ignore[operator]
        kubernetes_validate.validate(pod, K8S, strict=True)


def test_settings_from_environment_and_their_errors() -> None:
    cfg = OperatorConfig.from_env({
        "PAIRVOL_AGENT_COMMAND": "/usr/bin/env pairvol", "PAIRVOL_LEASE_DURATION": "4",
        "PAIRVOL_WATCH_NAMESPACES": "a,b", "PAIRVOL_AGENT_ENV": '{"X": "1"}',
        "PAIRVOL_AGENT_RESOURCES": '{"limits": {"memory": "1Gi"}}',
    })
    assert cfg.agent_command == ("/usr/bin/env", "pairvol") and cfg.lease_duration_s == 4
    assert cfg.watch_namespaces == ("a", "b") and cfg.agent_env == {"X": "1"}
    with pytest.raises(ConfigError, match="PAIRVOL_LEASE_DURATION must be >= 1"):
        OperatorConfig.from_env({"PAIRVOL_LEASE_DURATION": "0.2"})
    with pytest.raises(ConfigError, match="PAIRVOL_AGENT_RESOURCES must be JSON"):
        OperatorConfig.from_env({"PAIRVOL_AGENT_RESOURCES": "{cpu: 1"})


def test_observations_are_parsed_from_kubernetes_objects() -> None:
    node = node_view({"metadata": {"name": "n1", "labels": {"z": "a"}},
                      "spec": {"unschedulable": True},
                      "status": {"conditions": [{"type": "Ready", "status": "Unknown"}]}})
    assert (node.name, node.ready, node.schedulable, node.labels) == ("n1", False, False,
                                                                       {"z": "a"})
    pod = pod_view({
        "metadata": {"name": "p", "labels": {"pairvol.io/role": "primary"},
                     "deletionTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"nodeName": "n1"},
        "status": {"phase": "Failed", "podIP": "10.0.0.1",
                   "conditions": [{"type": "Ready", "status": "False"}],
                   "containerStatuses": [{"state": {"terminated": {"reason": "Error",
                                                                    "exitCode": 2}}}]},
    })
    assert (pod.role, pod.phase, pod.ready, pod.ip, pod.deleting) == (
        "primary", "Failed", False, "10.0.0.1", True)
    assert pod.reason == "Error, exit code 2"
    # the termination message's last line says why (the agent falls back to its log)
    crashed = pod_view({"metadata": {"name": "p"}, "status": {"containerStatuses": [{"state": {
        "terminated": {"reason": "Error", "exitCode": 1,
                       "message": "Traceback ...\nOSError: [Errno 98] Address already in use\n"}}}]}})
    assert crashed.reason == "Error, exit code 1: OSError: [Errno 98] Address already in use"
    looping = pod_view({"metadata": {"name": "p"}, "status": {"containerStatuses": [{
        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}},
        "lastState": {"terminated": {"reason": "Error", "exitCode": 2, "message": "bad flag"}}}]}})
    assert looping.reason == "CrashLoopBackOff: back-off 10s (last: Error, exit code 2: bad flag)"
    raw = {"metadata": {"annotations": {"pairvol.io/out-of-sync": "7"}},
           "spec": {"holderIdentity": "p", "leaseDurationSeconds": 3,
                    "renewTime": "2026-01-01T00:00:00.500000Z"}}
    lease = lease_view(raw, 3.6)
    assert lease is not None and lease.holder == "p" and lease.out_of_sync_epoch == 7
    assert lease.duration_s == 3.0 and lease.observed_age_s == 3.6
    assert lease.expired(margin_s=0.5)
    assert not (lease_view(raw, 3.4) or lease).expired(margin_s=0.5)


def test_chart_settings_for_agent_pods_are_applied() -> None:
    cfg = OperatorConfig.from_env(
        {
            "PAIRVOL_AGENT_IMAGE_PULL_SECRETS": '[{"name": "regcred"}]',
            "PAIRVOL_AGENT_TOLERATIONS": '[{"key": "storage", "operator": "Exists"}]',
            "PAIRVOL_AGENT_SERVICE_ACCOUNT": "pairvol-agent",
        }
    )
    spec = parse_spec({"size": "1Gi"}, name="vol")
    pod = pod_manifest(
        pod="vol-1", node="n1", role="primary", volume="vol", namespace="ns", spec=spec, owner=OWNER, config=cfg
    )
    kubernetes_validate.validate(pod, K8S, strict=True)
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["spec"]["tolerations"] == [{"key": "storage", "operator": "Exists"}]
    assert pod["spec"]["serviceAccountName"] == "pairvol-agent"


def test_per_volume_network_policy_admits_only_the_volumes_agents_on_the_replication_and_api_ports() -> None:
    assert OperatorConfig.from_env({"PAIRVOL_PER_VOLUME_NETWORK_POLICY": "true"}).per_volume_network_policy
    assert not OperatorConfig.from_env({}).per_volume_network_policy
    pol = network_policy_manifest("vol", "ns", OWNER)
    kubernetes_validate.validate(pol, K8S, strict=True)
    agents = {"app.kubernetes.io/name": "pairvol-agent", "pairvol.io/volume": "vol"}
    assert pol["spec"]["podSelector"]["matchLabels"] == agents
    assert pol["spec"]["ingress"] == [
        {
            "from": [{"podSelector": {"matchLabels": agents}}],
            # the link, and the API a checksum resync asks the peer's digests on
            "ports": [{"port": 7801, "protocol": "TCP"}, {"port": 7800, "protocol": "TCP"}],
        }
    ]
