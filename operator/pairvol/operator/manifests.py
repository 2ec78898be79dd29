"""Kubernetes objects the operator creates for a volume, built as plain dicts (no I/O).

Separate from the handlers so that what we ask Kubernetes for (the agent pod's command,
probes, mounts, labels; the Services; the Secret) is testable and reviewable on its own.
Operator-wide settings come from environment variables (documented by the chart in
docs/configuration.md) and are parsed once into :class:`OperatorConfig`.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pairvol import __version__
from pairvol.api.spec import GROUP, KIND, VERSION, VolumeSpec
from pairvol.errors import PairvolError
from pairvol.operator.decisions import (
    API_PORT,
    EXPORT_PORT,
    LABEL_ROLE,
    LABEL_VOLUME,
    REPLICATION_PORT,
)

APP_LABEL = "app.kubernetes.io/name"
AGENT_APP = "pairvol-agent"
SECRET_MOUNT = "/etc/pairvol/secret"
PSK_IDENTITY = "pairvol"


class ConfigError(PairvolError):
    """An operator setting (environment variable) is malformed."""


def _json_env(env: Mapping[str, str], name: str, default: Any) -> Any:
    raw = env.get(name, "")
    if not raw.strip() or raw.strip() == "null":
        return default
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be JSON, got {raw!r}: {exc}") from exc


def _float_env(env: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    raw = env.get(name, "")
    if not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from exc
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class OperatorConfig:
    # The chart's default (image.repository : appVersion) and the tag the Dockerfile builds.
    agent_image: str = f"pairvol/pairvol:{__version__}"
    agent_pull_policy: str = "IfNotPresent"
    agent_command: tuple[str, ...] = ("pairvol",)
    agent_service_account: str = ""
    agent_resources: Mapping[str, Any] = field(
        default_factory=lambda: {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}
    )
    agent_node_selector: Mapping[str, str] = field(default_factory=dict)
    agent_tolerations: tuple[Mapping[str, Any], ...] = ()
    agent_image_pull_secrets: tuple[Mapping[str, Any], ...] = ()
    per_volume_network_policy: bool = False
    agent_env: Mapping[str, str] = field(default_factory=dict)
    lease_duration_s: float = 3.0
    lease_margin_s: float = 0.5
    reconcile_interval_s: float = 0.5
    # a primary that lost only its Lease is restarted in place at most once per this many
    # seconds (docs/correctness.md H10); 0 turns the restart in place off (always fail over)
    restart_in_place_window_s: float = 60.0
    # re-protection waits for the failovers of other volumes at most this many seconds
    # (docs/correctness.md H20); 0: it never waits
    reprotect_hold_max_s: float = 30.0
    watch_namespaces: tuple[str, ...] = ()
    peering: str = ""
    # kopf pauses *all* peers of equal priority, so replicas need distinct ones: by default
    # each process draws a random priority (the highest live one acts, the others wait)
    peering_priority: int = 0
    peering_lifetime_s: int = 5
    metrics_port: int = 8080
    health_port: int = 8081

    @staticmethod
    def from_env(env: Mapping[str, str] | None = None) -> OperatorConfig:
        e = os.environ if env is None else env
        command = tuple(shlex.split(e.get("PAIRVOL_AGENT_COMMAND", "pairvol")))
        if not command:
            raise ConfigError("PAIRVOL_AGENT_COMMAND is empty; default is 'pairvol'")
        agent_env = _json_env(e, "PAIRVOL_AGENT_ENV", {})
        if not isinstance(agent_env, dict):
            raise ConfigError("PAIRVOL_AGENT_ENV must be a JSON object of strings")
        return OperatorConfig(
            agent_image=e.get("PAIRVOL_AGENT_IMAGE") or OperatorConfig.agent_image,
            agent_pull_policy=e.get("PAIRVOL_AGENT_PULL_POLICY") or "IfNotPresent",
            agent_command=command,
            agent_service_account=e.get("PAIRVOL_AGENT_SERVICE_ACCOUNT", ""),
            agent_resources=_json_env(e, "PAIRVOL_AGENT_RESOURCES", OperatorConfig().agent_resources),
            agent_node_selector=_json_env(e, "PAIRVOL_AGENT_NODE_SELECTOR", {}),
            agent_tolerations=tuple(_json_env(e, "PAIRVOL_AGENT_TOLERATIONS", [])),
            agent_image_pull_secrets=tuple(_json_env(e, "PAIRVOL_AGENT_IMAGE_PULL_SECRETS", [])),
            per_volume_network_policy=e.get("PAIRVOL_PER_VOLUME_NETWORK_POLICY", "").strip().lower() == "true",
            agent_env={str(k): str(v) for k, v in agent_env.items()},
            lease_duration_s=_float_env(e, "PAIRVOL_LEASE_DURATION", 3.0, 1.0),
            lease_margin_s=_float_env(e, "PAIRVOL_LEASE_MARGIN", 0.5, 0.0),
            reconcile_interval_s=_float_env(e, "PAIRVOL_RECONCILE_INTERVAL", 0.5, 0.05),
            restart_in_place_window_s=_float_env(e, "PAIRVOL_RESTART_IN_PLACE_WINDOW", 60.0, 0.0),
            reprotect_hold_max_s=_float_env(e, "PAIRVOL_REPROTECT_HOLD_MAX", 30.0, 0.0),
            watch_namespaces=tuple(n for n in e.get("PAIRVOL_WATCH_NAMESPACES", "").split(",") if n.strip()),
            peering=e.get("PAIRVOL_PEERING", ""),
            peering_priority=int(_float_env(e, "PAIRVOL_PEERING_PRIORITY", 0, 0)) or secrets.randbelow(2**30) + 1,
            peering_lifetime_s=int(_float_env(e, "PAIRVOL_PEERING_LIFETIME", 5, 2)),
            metrics_port=int(_float_env(e, "PAIRVOL_OPERATOR_METRICS_PORT", 8080, 0)),
            health_port=int(_float_env(e, "PAIRVOL_OPERATOR_HEALTH_PORT", 8081, 0)),
        )


def agent_security_context() -> dict[str, Any]:
    """How the agent's container runs (and the wipe pod's): the least the agent needs.

    Root uid, because the hostPath data directory is created root-owned by the kubelet and
    the agent creates and owns the files in it; no capabilities at all, because as the
    owner it needs no DAC override, and its network work (listening on ports above 1024,
    cutting a stuck replication link by killing its own link daemon) needs none; the root file system
    read-only, because everything it writes lives in its data directory. docs/security.md
    explains each line; the test suite runs every agent with exactly this context.
    """
    return {
        "runAsUser": 0,
        "runAsGroup": 0,
        "privileged": False,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def secret_name(volume: str) -> str:
    return f"pairvol-{volume}"


#: what every volume's Lease name begins with
LEASE_PREFIX = "pairvol-"


def lease_name(volume: str) -> str:
    return f"{LEASE_PREFIX}{volume}"


def agents_service_name(volume: str) -> str:
    return f"{volume}-agents"


def data_dir(spec: VolumeSpec, namespace: str, volume: str) -> str:
    return f"{spec.host_path}/{namespace}/{volume}"


def owner_ref(body: Mapping[str, Any]) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": meta.get("name"),
        "uid": meta.get("uid"),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    """Whether ``obj`` belongs to the volume whose uid is ``uid`` (one of its ownerReferences).

    Derived names can coincide across volumes (Secret ``pairvol-db-export`` is volume
    ``db-export``'s agents' Secret and volume ``db``'s export Secret; Service ``db-agents``
    is ``db-agents``'s and ``db``'s), and a user may own an object of such a name: only what
    names this very volume (by uid, as the garbage collector judges it) is used or deleted.
    """
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return bool(uid) and any(isinstance(r, Mapping) and r.get("uid") == uid for r in refs)


def name_taken_message(obj: Mapping[str, Any]) -> str:
    """Why a volume cannot use ``obj``, which holds a name it needs, and what to do."""
    kind = str(obj.get("kind") or "object")
    name = str((obj.get("metadata") or {}).get("name"))
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    owners = ", ".join(f"{r.get('kind')} {r.get('name')}" for r in refs if isinstance(r, Mapping))
    return (
        f"{kind} {name}, which this volume needs, already exists and belongs to "
        f"{owners or 'no ReplicatedVolume'}: the operator neither uses nor deletes it, and "
        "starts no agents for this volume. Recreate this volume under another name (one that "
        f"does not end in -export or -agents avoids this), or delete {kind} {name} if nothing uses it"
    )


def labels(volume: str, role: str | None = None) -> dict[str, str]:
    out = {LABEL_VOLUME: volume, APP_LABEL: AGENT_APP, "app.kubernetes.io/managed-by": "pairvol-operator"}
    if role:
        out[LABEL_ROLE] = role
    return out


def export_secret_name(volume: str) -> str:
    return f"pairvol-{volume}-export"


def secret_manifest(volume: str, namespace: str, owner: Mapping[str, Any]) -> dict[str, Any]:
    """Per-volume credentials of the agents: the API token, the replication link's TLS-PSK
    key and the workload export's, which differs (workloads get only the latter, in
    :func:`export_secret_manifest`: with the link's key they could write to a secondary)."""
    key, export_key = secrets.token_hex(32), secrets.token_hex(32)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": secret_name(volume),
            "namespace": namespace,
            "labels": labels(volume),
            "ownerReferences": [owner_ref(owner)],
        },
        "stringData": {
            "token": secrets.token_urlsafe(32),
            # qsd tls-creds-psk file format: "<identity>:<hex key>" per line
            "psk": f"{PSK_IDENTITY}:{key}\n",
            "psk-identity": PSK_IDENTITY,
            "psk-key": key,
            "export-psk": f"{PSK_IDENTITY}:{export_key}\n",
        },
    }


def export_secret_manifest(
    volume: str, namespace: str, owner: Mapping[str, Any], export_psk: str
) -> dict[str, Any]:
    """What a workload (or the CSI node plugin) needs to reach the volume's export over TCP:
    its TLS-PSK key, ``export_psk`` (``identity:hexkey``) — nothing else of the volume's."""
    identity, _, key = export_psk.strip().partition(":")
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": export_secret_name(volume),
            "namespace": namespace,
            "labels": labels(volume),
            "ownerReferences": [owner_ref(owner)],
        },
        "stringData": {"psk": f"{identity}:{key}\n", "psk-identity": identity, "psk-key": key},
    }


def services_manifests(volume: str, namespace: str, owner: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The workload Service (follows the primary) and a headless Service for the agents."""
    meta = {"namespace": namespace, "labels": labels(volume), "ownerReferences": [owner_ref(owner)]}
    workload = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": volume, **meta},
        "spec": {
            "selector": {LABEL_VOLUME: volume, LABEL_ROLE: "primary"},
            "ports": [{"name": "nbd", "port": EXPORT_PORT, "targetPort": "export", "protocol": "TCP"}],
        },
    }
    agents = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": agents_service_name(volume), **meta},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_VOLUME: volume, APP_LABEL: AGENT_APP},
            "ports": [
                {"name": "api", "port": API_PORT, "targetPort": "api", "protocol": "TCP"},
                {"name": "replication", "port": REPLICATION_PORT, "targetPort": "replication", "protocol": "TCP"},
            ],
        },
    }
    return [workload, agents]


def network_policy_name(volume: str) -> str:
    return f"pairvol-{volume}-replication"


def network_policy_manifest(volume: str, namespace: str, owner: Mapping[str, Any]) -> dict[str, Any]:
    """Only this volume's agents may reach each other's replication port (7801). Policies are
    additive: the chart's policy still lets the operator reach the API and workloads the export."""
    agents = {APP_LABEL: AGENT_APP, LABEL_VOLUME: volume}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": network_policy_name(volume),
            "namespace": namespace,
            "labels": labels(volume),
            "ownerReferences": [owner_ref(owner)],
        },
        "spec": {
            "podSelector": {"matchLabels": agents},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": agents}}],
                    # the link, and the API for a checksum resync's digests (token-guarded)
                    "ports": [{"port": REPLICATION_PORT, "protocol": "TCP"}, {"port": API_PORT, "protocol": "TCP"}],
                }
            ],
        },
    }


def pod_manifest(
    *,
    pod: str,
    node: str,
    role: str,
    volume: str,
    namespace: str,
    spec: VolumeSpec,
    owner: Mapping[str, Any],
    config: OperatorConfig,
    export_key: bool = True,
) -> dict[str, Any]:
    """One agent pod, pinned to ``node``; its data dir is the volume's hostPath on that node.

    ``export_key``: the volume's Secret holds the export's own key (``export-psk``); False
    for volumes created before there was one, whose export keeps the link's key."""
    ddir = data_dir(spec, namespace, volume)
    args = [
        "agent",
        "--name",
        volume,
        "--data-dir",
        ddir,
        "--size",
        str(spec.size),
        "--listen",
        f"0.0.0.0:{API_PORT}",
        "--replication-listen",
        f"0.0.0.0:{REPLICATION_PORT}",
        "--export-socket",
        f"{ddir}/export.sock",
        "--export-listen",
        f"0.0.0.0:{EXPORT_PORT}",
        "--token-file",
        f"{SECRET_MOUNT}/token",
        "--psk-file",
        f"{SECRET_MOUNT}/psk",
        *(["--export-psk-file", f"{SECRET_MOUNT}/export-psk"] if export_key else []),
        "--peer-timeout",
        str(spec.peer_timeout_s),
        "--lease-namespace",
        namespace,
        "--lease-name",
        lease_name(volume),
        "--lease-duration",
        f"{config.lease_duration_s:g}",
    ]
    env: list[dict[str, Any]] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
    ] + [{"name": k, "value": v} for k, v in sorted(config.agent_env.items())]
    container: dict[str, Any] = {
        "name": "agent",
        "image": config.agent_image,
        "imagePullPolicy": config.agent_pull_policy,
        "command": [*config.agent_command, *args],
        "env": env,
        "ports": [
            {"name": "api", "containerPort": API_PORT, "protocol": "TCP"},
            {"name": "replication", "containerPort": REPLICATION_PORT, "protocol": "TCP"},
            {"name": "export", "containerPort": EXPORT_PORT, "protocol": "TCP"},
        ],
        # Both probes read the data-path verdict the Lease is renewed by (docs/agent.md).
        # Readiness: out of the Service and, for the operator, "suspect" within ~2 s.
        # Liveness: with restartPolicy Never a failed liveness probe ends the pod (phase
        # Failed), which the operator treats as a dead replica; it gives a starting agent
        # 10 s and a stalled daemon ~6 s before that.
        "readinessProbe": {
            "httpGet": {"path": "/healthz", "port": API_PORT},
            "periodSeconds": 1,
            "timeoutSeconds": 3,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": API_PORT},
            "initialDelaySeconds": 10,
            "periodSeconds": 2,
            "timeoutSeconds": 3,
            "failureThreshold": 3,
        },
        "resources": dict(config.agent_resources),
        # a failed agent's last log lines (e.g. "address already in use") become its
        # termination message: the pod status, and the volume's Events, say why
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": "data", "mountPath": ddir},
            {"name": "credentials", "mountPath": SECRET_MOUNT, "readOnly": True},
        ],
        "securityContext": agent_security_context(),
    }
    pod_spec: dict[str, Any] = {
        "nodeName": node,
        "restartPolicy": "Never",  # the operator replaces replicas; a restart loses the role
        "terminationGracePeriodSeconds": 5,
        "containers": [container],
        "volumes": [
            {"name": "data", "hostPath": {"path": ddir, "type": "DirectoryOrCreate"}},
            {"name": "credentials", "secret": {"secretName": secret_name(volume), "defaultMode": 0o400}},
        ],
    }
    if config.agent_service_account:
        pod_spec["serviceAccountName"] = config.agent_service_account
    if config.agent_image_pull_secrets:
        pod_spec["imagePullSecrets"] = [dict(x) for x in config.agent_image_pull_secrets]
    if config.agent_tolerations:
        pod_spec["tolerations"] = [dict(t) for t in config.agent_tolerations]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod,
            "namespace": namespace,
            "labels": labels(volume, role),
            "ownerReferences": [owner_ref(owner)],
        },
        "spec": pod_spec,
    }


def cleanup_pod_name(volume: str, node: str) -> str:
    """The wipe pod of ``volume`` on ``node``: a valid pod name (a DNS label), one per node.

    Volume and node names together may exceed a name's 63 characters (CSI volumes are
    ``pvc-<uuid>``, cloud node names are long): the readable part is cut, and a hash of
    both names keeps two nodes that share a long prefix apart."""
    digest = hashlib.sha256(f"{volume}\0{node}".encode()).hexdigest()[:10]
    readable = f"{volume}-wipe-{node}".replace(".", "-")[: 63 - len(digest) - 1].rstrip("-")
    return f"{readable}-{digest}"


def cleanup_pod_manifest(
    *,
    volume: str,
    namespace: str,
    node: str,
    spec: VolumeSpec,
    owner: Mapping[str, Any],
    config: OperatorConfig,
) -> dict[str, Any]:
    """reclaimPolicy Delete: a one-shot pod on ``node`` that removes the volume's data dir."""
    parent = f"{spec.host_path}/{namespace}"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": cleanup_pod_name(volume, node),
            "namespace": namespace,
            "labels": {"pairvol.io/cleanup": volume},
        },
        "spec": {
            "nodeName": node,
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "wipe",
                    "image": config.agent_image,
                    "command": ["rm", "-rf", "--", f"/host/{volume}"],
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                    "volumeMounts": [{"name": "parent", "mountPath": "/host"}],
                    "securityContext": agent_security_context(),
                }
            ],
            "volumes": [{"name": "parent", "hostPath": {"path": parent, "type": "Directory"}}],
        },
    }
