"""Pure helpers of the emulated API server: selectors, patches, names, tables.

Why separate: these are the rules that decide what the server answers; keeping them free
of I/O makes them testable as plain functions and keeps apiserver.py about HTTP and state.
"""

from __future__ import annotations

import copy
import datetime
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pairvol.errors import PairvolError


class RequestError(PairvolError):
    """A client error that maps to a Kubernetes ``Status`` response."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details or {}

    def status(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Status",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }


def bad_request(message: str) -> RequestError:
    return RequestError(400, "BadRequest", message)


# ---------------------------------------------------------------- label & field selectors


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!"
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!":
            return self.key not in labels
        if self.op in ("=", "in"):
            return labels.get(self.key) in self.values
        # "!=" and "notin" match objects without the key, as in Kubernetes.
        return labels.get(self.key) not in self.values


_SET_REQ = re.compile(r"^\s*([^\s!=(),]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_EQ_REQ = re.compile(r"^\s*([^\s!=(),]+)\s*(==|=|!=)\s*([^\s!=(),]*)\s*$")
_EXISTS_REQ = re.compile(r"^\s*(!?)\s*([^\s!=(),]+)\s*$")


def _split_selector(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return parts


def parse_label_selector(text: str) -> list[Requirement]:
    """Parse ``a=b,c!=d,e in (f,g),!h,i`` into requirements (400 on syntax errors)."""
    reqs: list[Requirement] = []
    for part in _split_selector(text or ""):
        if m := _SET_REQ.match(part):
            values = tuple(v.strip() for v in m.group(3).split(",") if v.strip())
            reqs.append(Requirement(m.group(1), m.group(2), values))
        elif m := _EQ_REQ.match(part):
            op = "!=" if m.group(2) == "!=" else "="
            reqs.append(Requirement(m.group(1), op, (m.group(3),)))
        elif m := _EXISTS_REQ.match(part):
            reqs.append(Requirement(m.group(2), "!" if m.group(1) else "exists"))
        else:
            raise bad_request(
                f"unable to parse requirement {part.strip()!r} of labelSelector {text!r}: "
                "expected key=value, key!=value, key in (a,b), key notin (a,b), key or !key"
            )
    return reqs


def parse_field_selector(text: str) -> list[Requirement]:
    """Parse ``metadata.name=x,spec.nodeName!=y`` (only = == != exist for fields)."""
    reqs: list[Requirement] = []
    for part in _split_selector(text or ""):
        m = _EQ_REQ.match(part)
        if not m:
            raise bad_request(
                f"invalid fieldSelector requirement {part.strip()!r}: expected field=value or field!=value"
            )
        op = "!=" if m.group(2) == "!=" else "="
        reqs.append(Requirement(m.group(1), op, (m.group(3),)))
    return reqs


def field_value(obj: dict[str, Any], path: str) -> str:
    """The string form of a dotted field, as field selectors compare it ('' if absent)."""
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return ""
        cur = cur[part]
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return "" if cur is None else str(cur)


def selector_matches(obj: dict[str, Any], labels: list[Requirement], fields: list[Requirement]) -> bool:
    obj_labels = obj.get("metadata", {}).get("labels") or {}
    if not all(r.matches(obj_labels) for r in labels):
        return False
    values = {r.key: field_value(obj, r.key) for r in fields}
    return all(r.matches(values) for r in fields)


# ---------------------------------------------------------------- patches


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (returns a new value)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise RequestError(422, "Invalid", f"json patch path {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _resolve(doc: Any, parts: list[str], op: str) -> Any:
    cur = doc
    for part in parts:
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            raise RequestError(
                422,
                "Invalid",
                f"json patch {op} operation does not apply: doc is missing path: /{'/'.join(parts)}",
            )
    return cur


def json_patch(doc: Any, ops: Any) -> Any:
    """RFC 6902 JSON patch: add, remove, replace, move, copy, test."""
    if not isinstance(ops, list):
        raise bad_request("a json patch must be a list of operations")
    doc = copy.deepcopy(doc)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise bad_request(f"invalid json patch operation {op!r}: needs 'op' and 'path'")
        kind, parts = op["op"], _pointer(op["path"])
        if kind == "test":
            if _resolve(doc, parts, kind) != op.get("value"):
                raise RequestError(422, "Invalid", f"json patch test failed at {op['path']}")
            continue
        value: Any
        if kind in ("move", "copy"):
            src = _pointer(op.get("from", ""))
            value = copy.deepcopy(_resolve(doc, src, kind))
            if kind == "move":
                doc = _remove(doc, src)
            kind = "add"
        else:
            value = op.get("value")
        if kind == "remove":
            doc = _remove(doc, parts)
        elif kind in ("add", "replace"):
            if not parts:
                doc = copy.deepcopy(value)
                continue
            parent = _resolve(doc, parts[:-1], kind)
            last = parts[-1]
            if isinstance(parent, dict):
                if kind == "replace" and last not in parent:
                    _resolve(doc, parts, kind)
                parent[last] = copy.deepcopy(value)
            elif isinstance(parent, list):
                if last == "-" and kind == "add":
                    parent.append(copy.deepcopy(value))
                elif last.isdigit() and int(last) <= len(parent):
                    if kind == "add":
                        parent.insert(int(last), copy.deepcopy(value))
                    else:
                        _resolve(doc, parts, kind)
                        parent[int(last)] = copy.deepcopy(value)
                else:
                    _resolve(doc, parts, kind)
            else:
                _resolve(doc, parts, kind)
        else:
            raise bad_request(f"unknown json patch operation {kind!r}")
    return doc


def _remove(doc: Any, parts: list[str]) -> Any:
    if not parts:
        raise RequestError(422, "Invalid", "json patch cannot remove the whole document")
    parent = _resolve(doc, parts[:-1], "remove")
    _resolve(doc, parts, "remove")
    if isinstance(parent, dict):
        del parent[parts[-1]]
    else:
        del parent[int(parts[-1])]
    return doc


# Merge keys of the built-in list fields we serve (from the Kubernetes API types); lists
# not named here are replaced as a whole, like ``x-kubernetes-list-type: atomic``.
_MERGE_KEYS: dict[str, tuple[str, ...]] = {
    "containers": ("name",),
    "initContainers": ("name",),
    "ephemeralContainers": ("name",),
    "env": ("name",),
    "volumes": ("name",),
    "volumeMounts": ("mountPath",),
    "volumeDevices": ("devicePath",),
    "imagePullSecrets": ("name",),
    "ports": ("containerPort", "port"),
    "conditions": ("type",),
    "hostAliases": ("ip",),
    "ownerReferences": ("uid",),
    "containerStatuses": ("name",),
    "addresses": ("type",),
}
_PRIMITIVE_MERGE_LISTS = {"finalizers"}


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Strategic merge for built-in kinds: lists with a known merge key merge by key.

    Supports the directives kubectl sends: ``$setElementOrder/<list>`` (ignored: we keep
    the existing order and append new items), ``$retainKeys`` (ignored), ``$patch:
    delete|replace`` on list items and maps, and ``$deleteFromPrimitiveList/<list>``.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if patch.get("$patch") == "delete":
        return None
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$setElementOrder/") or key in ("$retainKeys", "$patch"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            field_name = key.split("/", 1)[1]
            result[field_name] = [v for v in result.get(field_name, []) if v not in value]
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list) and isinstance(result.get(key), list):
            result[key] = _merge_list(key, result[key], value)
        else:
            merged = strategic_merge_patch(result.get(key), value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
    return result


def _merge_list(key: str, current: list[Any], patch: list[Any]) -> list[Any]:
    if key in _PRIMITIVE_MERGE_LISTS:
        return current + [v for v in patch if v not in current]
    if not all(isinstance(i, dict) for i in current + patch):
        return copy.deepcopy(patch)
    merge_key = next((k for k in _MERGE_KEYS.get(key, ()) if any(k in i for i in patch)), None)
    if merge_key is None:
        return copy.deepcopy(patch)
    out = copy.deepcopy(current)
    for item in patch:
        idx = next((i for i, c in enumerate(out) if c.get(merge_key) == item.get(merge_key)), None)
        if item.get("$patch") == "delete":
            if idx is not None:
                del out[idx]
        elif idx is None:
            out.append({k: v for k, v in item.items() if k != "$patch"})
        else:
            out[idx] = strategic_merge_patch(out[idx], item)
    return out


PATCH_TYPES: dict[str, Callable[[Any, Any], Any]] = {
    "application/merge-patch+json": merge_patch,
    # Kubernetes refuses strategic merge for custom resources (415); the server checks.
    "application/strategic-merge-patch+json": strategic_merge_patch,
    "application/json-patch+json": json_patch,
    # Server-side apply without field management: the applied config is merged in.
    "application/apply-patch+yaml": merge_patch,
    "application/apply-patch+json": merge_patch,
}


# ---------------------------------------------------------------- names & time

_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


#: Workloads with a ``scale`` subresource (autoscaling/v1 Scale): what ``kubectl scale``
#: and autoscalers write instead of the whole object.
SCALABLE: frozenset[tuple[str, str]] = frozenset(
    {("apps", "deployments"), ("apps", "replicasets"), ("apps", "statefulsets")}
)


def scale_of(obj: dict[str, Any]) -> dict[str, Any]:
    """The autoscaling/v1 Scale view of a Deployment, ReplicaSet or StatefulSet."""
    meta = obj.get("metadata") or {}
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    selector = spec.get("selector") or {}
    terms = [f"{k}={v}" for k, v in (selector.get("matchLabels") or {}).items()]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), ",".join(expr.get("values") or [])
        terms.append(
            {"In": f"{key} in ({values})", "NotIn": f"{key} notin ({values})", "Exists": str(key)}.get(
                str(op), f"!{key}"
            )
        )
    return {
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {
            k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp") if k in meta
        },
        "spec": {"replicas": int(spec.get("replicas", 1))},
        "status": {
            "replicas": int(status.get("replicas", 0)),
            "selector": ",".join(terms),
        },
    }


def scaled(obj: dict[str, Any], scale: Any) -> dict[str, Any]:
    """``obj`` with the replicas a written Scale asks for; 409 for a Scale written against
    another resourceVersion, 422 for replicas that are not a whole number >= 0."""
    if not isinstance(scale, dict):
        raise bad_request("a Scale must be a JSON object")
    wanted_rv = (scale.get("metadata") or {}).get("resourceVersion")
    if wanted_rv and wanted_rv != (obj.get("metadata") or {}).get("resourceVersion"):
        name = (obj.get("metadata") or {}).get("name")
        raise RequestError(
            409,
            "Conflict",
            f"Operation cannot be fulfilled on {name}: the object has been modified; "
            "please apply your changes to the latest version and try again",
        )
    replicas = (scale.get("spec") or {}).get("replicas", 0)  # omitted: zero, as an int32 field
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
        raise RequestError(
            422, "Invalid", f"spec.replicas: Invalid value: {replicas!r}: must be greater than or equal to 0"
        )
    new = copy.deepcopy(obj)
    new.setdefault("spec", {})["replicas"] = replicas
    return new


def name_problem(name: str, *, label: bool = False) -> str | None:
    """Why ``name`` is not a valid object name, or None."""
    limit = 63 if label else 253
    pattern = _DNS1123_LABEL if label else _DNS1123_SUBDOMAIN
    if len(name) > limit:
        return f"must be no more than {limit} characters"
    if not pattern.match(name):
        kind = "RFC 1123 label" if label else "RFC 1123 subdomain"
        return (
            f"a lowercase {kind} must consist of lower case alphanumeric characters, '-' or "
            "'.', and must start and end with an alphanumeric character"
        )
    return None


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def age(timestamp: str | None) -> str:
    """Kubernetes-style short age (``5s``, ``3m``, ``2h``, ``4d``)."""
    if not timestamp:
        return "<unknown>"
    try:
        then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return "<invalid>"
    secs = int((datetime.datetime.now(datetime.UTC) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size * 2 or (unit == "m" and secs >= 120):
            return f"{secs // size}{unit}"
    return f"{max(secs, 0)}s"


# ---------------------------------------------------------------- server-side printing

_JSONPATH_PART = re.compile(r"""\[\?\(@\.(\w+)==["']([^"']*)["']\)\]|\[\d+\]|[^.\[\]]+""")


def jsonpath_value(obj: dict[str, Any], path: str) -> Any:
    """Evaluate the simple JSONPath of printer columns.

    Supports ``.a.b``, ``[0]`` and one filter form, ``[?(@.type=="Ready")]`` (first match).
    """
    cur: Any = obj
    for m in _JSONPATH_PART.finditer(path.strip().lstrip("$")):
        part = m.group(0)
        if m.group(1) is not None:
            key, want = m.group(1), m.group(2)
            cur = (
                next((i for i in cur if isinstance(i, dict) and str(i.get(key)) == want), None)
                if isinstance(cur, list)
                else None
            )
        elif part.startswith("["):
            idx = int(part[1:-1])
            cur = cur[idx] if isinstance(cur, list) and idx < len(cur) else None
        else:
            cur = cur.get(part) if isinstance(cur, dict) else None
        if cur is None:
            return None
    return cur


def table(
    objects: list[dict[str, Any]],
    columns: list[dict[str, Any]],
    resource_version: str,
) -> dict[str, Any]:
    """A meta.k8s.io/v1 Table, which is how kubectl asks for ``get`` output."""
    defs = [{"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0}]
    has_age = False
    for col in columns:
        defs.append(
            {
                "name": col["name"],
                "type": col.get("type", "string"),
                "format": col.get("format", ""),
                "description": col.get("description", ""),
                "priority": col.get("priority", 0),
            }
        )
        has_age = has_age or col.get("jsonPath") == ".metadata.creationTimestamp"
    if not has_age:
        defs.append({"name": "Age", "type": "date", "format": "", "description": "Age", "priority": 0})
    rows = []
    for obj in objects:
        meta = obj.get("metadata", {})
        cells: list[Any] = [meta.get("name")]
        for col in columns:
            value = jsonpath_value(obj, col.get("jsonPath", ""))
            if col.get("jsonPath") == ".metadata.creationTimestamp" or col.get("type") == "date":
                value = age(value) if value else None
            cells.append(value)
        if not has_age:
            cells.append(age(meta.get("creationTimestamp")))
        rows.append(
            {
                "cells": cells,
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": meta,
                },
            }
        )
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": defs,
        "rows": rows,
    }


# ---------------------------------------------------------------- URL parsing


@dataclass(frozen=True)
class ResourcePath:
    """A parsed Kubernetes resource URL (``group`` is "" for the core API)."""

    group: str
    version: str
    plural: str | None = None
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None
    legacy_watch: bool = False


def parse_resource_path(path: str) -> ResourcePath | None:
    """Parse ``/api/v1/...`` and ``/apis/<g>/<v>/...``; None for other paths.

    Unlike a generic ``/namespaces/<ns>/<plural>`` split, this knows that ``namespaces``
    is itself a resource: ``/api/v1/namespaces/default`` is the namespace ``default``.
    """
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    watch = False
    if rest and rest[0] == "watch":
        watch, rest = True, rest[1:]
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if not rest:
        return ResourcePath(group, version, legacy_watch=watch)
    return ResourcePath(
        group,
        version,
        rest[0],
        namespace,
        rest[1] if len(rest) > 1 else None,
        "/".join(rest[2:]) or None,
        watch,
    )
