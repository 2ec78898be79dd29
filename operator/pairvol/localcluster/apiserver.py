"""An emulated Kubernetes API server, strict where mocks are lenient.

Why: these machines have no kube-apiserver, yet the real kopf operator, the ``kubernetes``
client and ``kubectl`` must run against something that behaves like one. kmock's
``KubernetesScaffold`` provides the HTTP server, request parsing, API discovery
(``/api``, ``/apis``, ``/apis/<group>/<version>``, ``/version``) and user reactions; this
subclass replaces kmock's merge-everything object store with Kubernetes semantics that
our operator depends on and that a mock would hide bugs in:

* status subresource (spec writes keep status, ``/status`` writes keep everything else);
* ``metadata.generation`` bumps on non-metadata, non-status changes only;
* a cluster-wide increasing ``resourceVersion``, 409 on stale versions in PUT and
  PATCH/DELETE preconditions, ``uid``, ``creationTimestamp``;
* finalizers: DELETE sets ``deletionTimestamp``, removing the last finalizer deletes;
* CRDs registered at runtime (served in discovery, Table printer columns), custom
  resources pruned, defaulted and validated against their structural schema, with CEL
  ``x-kubernetes-validations`` (see :mod:`apiserver_cel` for the supported subset);
* label and field selectors, watches with resourceVersion replay, 410 Gone for
  too-old versions, bookmarks and ``timeoutSeconds``;
* merge, json and strategic-merge patches (strategic treated as merge: lists replace),
  and server-side apply as a merge without field ownership;
* ``Status`` objects for 400/404/405/409/410/415/422.

Everything is in memory; state mutations are synchronous (no ``await`` inside), so the
single event loop serialises them without locks.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import copy
import hashlib
import json
import logging
import math
import random
import string
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml
from kmock._internal.rendering import ReactionMismatchError  # not re-exported in __all__

from pairvol.errors import PairvolError
from pairvol.localcluster import apiserver_schema as schema_mod
from pairvol.localcluster.apiserver_builtin import (
    BUILTIN_TYPES,
    KOPF_CRDS,
    ResourceType,
    event_from_core,
    event_to_core,
)
from pairvol.localcluster.apiserver_logic import (
    PATCH_TYPES,
    RequestError,
    Requirement,
    ResourcePath,
    bad_request,
    name_problem,
    now_rfc3339,
    parse_field_selector,
    parse_label_selector,
    parse_resource_path,
    selector_matches,
    table,
)

logger = logging.getLogger(__name__)

ObjKey = tuple[str, str]  # (namespace or "", name)
TypeKey = tuple[str, str]  # (group, plural)

_HISTORY = 5000  # watch events kept per resource for resourceVersion replay
_KEEP_REQUESTS = 200  # kmock keeps every request for assertions; bound it for long runs


class APIServerError(PairvolError):
    """The emulated API server could not start or was misused."""


@dataclass
class _Watch:
    queue: asyncio.Queue[tuple[int, str, dict[str, Any], dict[str, Any] | None] | None]
    namespace: str | None


@dataclass
class _Kind:
    """Storage and watchers of one (group, plural), shared by all its versions."""

    objects: dict[ObjKey, dict[str, Any]] = field(default_factory=dict)
    history: collections.deque[tuple[int, str, dict[str, Any], dict[str, Any] | None]] = field(
        default_factory=lambda: collections.deque(maxlen=_HISTORY)
    )
    watches: list[_Watch] = field(default_factory=list)
    compacted_rv: int = 0  # oldest rv we can no longer replay from


def _wants_table(request: kmock.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return "as=Table" in accept


def _status_response(error: RequestError) -> aiohttp.web.Response:
    return aiohttp.web.json_response(error.status(), status=error.code)


def _random_suffix() -> str:
    return "".join(random.choices(string.ascii_lowercase + string.digits, k=5))


@attrs.define(kw_only=True)
class APIServer(kmock.KubernetesScaffold):
    """The request handler; serve it with :func:`serve` or ``kmock.Server(handler)``.

    ``history_limit`` is how many watch events per resource are kept for replay from a
    resourceVersion; older versions get 410 Gone, as after etcd compaction.
    """

    history_limit: int = _HISTORY
    # Where `kubectl logs` reads a pod's output: (pod object) -> log file or None.
    # LocalCluster points it at the node simulator's per-pod log files.
    log_source: Callable[[dict[str, Any]], Path | None] | None = None

    _types: dict[tuple[str, str, str], ResourceType] = attrs.field(factory=dict, init=False)
    _kinds: dict[TypeKey, _Kind] = attrs.field(factory=dict, init=False)
    _rv: int = attrs.field(default=0, init=False)
    _closing: bool = attrs.field(default=False, init=False)
    _schemas: dict[tuple[str, str, str], schema_mod.Schema] = attrs.field(factory=dict, init=False)
    _ips: int = attrs.field(default=0, init=False)
    # Per-request state, only touched in synchronous sections (no await in between).
    _field_validation: str = attrs.field(default="Ignore", init=False)
    _warnings: list[str] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for rtype in BUILTIN_TYPES:
            self._register(rtype)
        for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self.create_object("", "v1", "namespaces", {"metadata": {"name": ns}})
        for crd in KOPF_CRDS:
            self.create_object("apiextensions.k8s.io", "v1", "customresourcedefinitions", crd)

    # ------------------------------------------------------------------ registry

    def _register(self, rtype: ResourceType) -> None:
        self._types[(rtype.group, rtype.version, rtype.plural)] = rtype
        self._kinds.setdefault(
            (rtype.group, rtype.plural),
            _Kind(history=collections.deque(maxlen=self.history_limit)),
        )
        self.resources[kmock.resource(rtype.group, rtype.version, rtype.plural)] = kmock.ResourceInfo(
            kind=rtype.kind,
            singular=rtype.singular,
            namespaced=rtype.namespaced,
            verbs=set(rtype.verbs),
            shortnames=set(rtype.short_names),
            categories=set(rtype.categories),
            subresources={"status"} if rtype.status_subresource else set(),
        )

    def _unregister(self, group: str, plural: str) -> None:
        for key in [k for k in self._types if k[0] == group and k[2] == plural]:
            rtype = self._types.pop(key)
            self._schemas.pop(key, None)
            del self.resources[kmock.resource(rtype.group, rtype.version, rtype.plural)]
        kind = self._kinds.pop((group, plural), None)
        if kind is not None:
            for watch in kind.watches:
                watch.queue.put_nowait(None)

    def resource_type(self, group: str, version: str, plural: str) -> ResourceType:
        try:
            return self._types[(group, version, plural)]
        except KeyError:
            gv = f"{group}/{version}" if group else version
            raise RequestError(
                404,
                "NotFound",
                f"the server could not find the requested resource ({plural} in {gv}); is its CRD applied?",
            ) from None

    # ------------------------------------------------------------------ helpers

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _emit(self, rtype: ResourceType, etype: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        kind = self._kinds[(rtype.group, rtype.plural)]
        rv = int(obj["metadata"]["resourceVersion"])
        entry = (rv, etype, copy.deepcopy(obj), copy.deepcopy(old) if old is not None else None)
        if len(kind.history) == kind.history.maxlen:
            kind.compacted_rv = kind.history[0][0]
        kind.history.append(entry)
        ns = obj["metadata"].get("namespace")
        for watch in kind.watches:
            if watch.namespace is None or watch.namespace == ns:
                watch.queue.put_nowait(entry)

    def _not_found(self, rtype: ResourceType, name: str) -> RequestError:
        return RequestError(
            404,
            "NotFound",
            f'{rtype.resource_name} "{name}" not found',
            {"name": name, "group": rtype.group, "kind": rtype.plural},
        )

    def _conflict(self, rtype: ResourceType, name: str) -> RequestError:
        return RequestError(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {rtype.resource_name} "{name}": the object has '
            "been modified; please apply your changes to the latest version and try again",
            {"name": name, "group": rtype.group, "kind": rtype.plural},
        )

    def _invalid(self, rtype: ResourceType, name: str, errors: list[schema_mod.FieldError]) -> RequestError:
        causes = [
            {"reason": e.reason, "message": e.message().removeprefix(f"{e.path}: "), "field": e.path} for e in errors
        ]
        text = errors[0].message() if len(errors) == 1 else ("[" + ", ".join(e.message() for e in errors) + "]")
        return RequestError(
            422,
            "Invalid",
            f'{rtype.kind}.{rtype.group or "core"} "{name}" is invalid: {text}'.replace(".core ", " "),
            {"name": name, "group": rtype.group, "kind": rtype.kind, "causes": causes},
        )

    def _present(self, rtype: ResourceType, obj: dict[str, Any]) -> dict[str, Any]:
        """The object as served at ``rtype``'s version (no conversion: same schema)."""
        if rtype.group == "events.k8s.io":
            return copy.deepcopy(event_from_core(obj))
        out = copy.deepcopy(obj)
        out["apiVersion"] = rtype.api_version
        out["kind"] = rtype.kind
        return out

    def _check_namespace(self, rtype: ResourceType, namespace: str | None) -> str:
        if not rtype.namespaced:
            if namespace:
                raise RequestError(
                    404,
                    "NotFound",
                    f"{rtype.resource_name} is cluster-scoped: use a URL without /namespaces/",
                )
            return ""
        if not namespace:
            raise RequestError(
                405,
                "MethodNotAllowed",
                f"{rtype.resource_name} is namespaced: the URL must include /namespaces/<ns>/",
            )
        return namespace

    # ------------------------------------------------------------------ validation

    def _admit(self, rtype: ResourceType, obj: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
        """Prune/default/validate custom resources, check names; return the new object."""
        name = obj["metadata"].get("name", "")
        if old is None:
            problem = name_problem(name, label=rtype.plural in ("namespaces", "services"))
            if problem:
                raise self._invalid(
                    rtype, name, [schema_mod.FieldError("metadata.name", "FieldValueInvalid", problem, name)]
                )
        for key in ("labels", "annotations"):
            values = obj["metadata"].get(key)
            if values is not None and (
                not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values())
            ):
                raise self._invalid(
                    rtype,
                    name,
                    [schema_mod.FieldError(f"metadata.{key}", "FieldValueInvalid", "values must be strings")],
                )
        schema = self._schemas.get((rtype.group, rtype.version, rtype.plural))
        if schema is not None:
            unknown = schema_mod.unknown_fields(obj, schema, root=True)
            if unknown and self._field_validation == "Strict":
                listed = ", ".join(f'unknown field "{u}"' for u in unknown)
                raise bad_request(
                    f'{rtype.kind} in version "{rtype.version}" cannot be handled as a '
                    f"{rtype.kind}: strict decoding error: {listed}"
                )
            if self._field_validation != "Ignore":
                self._warnings += [f'unknown field "{u}"' for u in unknown]
            obj, errors = schema_mod.process(obj, schema, old)
            if errors:
                raise self._invalid(rtype, name, errors)
        if rtype.key == ("apiextensions.k8s.io", "customresourcedefinitions"):
            obj = self._admit_crd(rtype, obj)
        return obj

    def _admit_crd(self, rtype: ResourceType, crd: dict[str, Any]) -> dict[str, Any]:
        name = crd["metadata"]["name"]
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        problems: list[schema_mod.FieldError] = []
        group, plural = spec.get("group"), names.get("plural")
        if not group:
            problems.append(schema_mod.FieldError("spec.group", "FieldValueRequired", ""))
        if not plural or not names.get("kind"):
            problems.append(schema_mod.FieldError("spec.names", "FieldValueRequired", "plural and kind are required"))
        if group and plural and name != f"{plural}.{group}":
            problems.append(
                schema_mod.FieldError(
                    "metadata.name",
                    "FieldValueInvalid",
                    f'must be spec.names.plural+"."+spec.group ({plural}.{group})',
                    name,
                )
            )
        if spec.get("scope") not in ("Namespaced", "Cluster"):
            problems.append(
                schema_mod.FieldError(
                    "spec.scope",
                    "FieldValueNotSupported",
                    'supported values: "Cluster", "Namespaced"',
                    spec.get("scope"),
                )
            )
        versions = spec.get("versions") or []
        if not versions:
            problems.append(schema_mod.FieldError("spec.versions", "FieldValueRequired", ""))
        for i, ver in enumerate(versions):
            oas = (ver.get("schema") or {}).get("openAPIV3Schema")
            if not isinstance(oas, dict) or oas.get("type") != "object":
                problems.append(
                    schema_mod.FieldError(
                        f"spec.versions[{i}].schema.openAPIV3Schema",
                        "FieldValueRequired",
                        "a structural schema with type: object is required",
                    )
                )
                continue
            try:
                schema_mod.compile_rules(oas)
            except schema_mod.SchemaError as exc:
                problems.append(
                    schema_mod.FieldError(
                        f"spec.versions[{i}].schema.openAPIV3Schema",
                        "FieldValueInvalid",
                        f"{exc} (this emulator supports a CEL subset, see apiserver_cel.py)",
                    )
                )
        if problems:
            raise self._invalid(rtype, name, problems)
        crd = copy.deepcopy(crd)
        crd["status"] = {
            "acceptedNames": names,
            "storedVersions": [v["name"] for v in versions if v.get("storage")],
            "conditions": [
                {"type": t, "status": "True", "reason": r, "message": m, "lastTransitionTime": now_rfc3339()}
                for t, r, m in (
                    ("NamesAccepted", "NoConflicts", "no conflicts found"),
                    ("Established", "InitialNamesAccepted", "the initial names have been accepted"),
                )
            ],
        }
        return crd

    def _apply_crd(self, crd: dict[str, Any], old: dict[str, Any] | None) -> None:
        """(Re)register the resource types a stored CRD declares."""
        spec = crd["spec"]
        names = spec["names"]
        if old is not None:
            ospec = old["spec"]
            if (ospec["group"], ospec["names"]["plural"]) != (spec["group"], names["plural"]):
                self._unregister(ospec["group"], ospec["names"]["plural"])
        for key in [k for k in self._types if k[0] == spec["group"] and k[2] == names["plural"]]:
            del self._types[key]
            self._schemas.pop(key, None)
        for ver in spec["versions"]:
            if not ver.get("served", True):
                continue
            subresources = ver.get("subresources") or {}
            rtype = ResourceType(
                group=spec["group"],
                version=ver["name"],
                plural=names["plural"],
                kind=names["kind"],
                namespaced=spec["scope"] == "Namespaced",
                singular=names.get("singular") or names["kind"].lower(),
                short_names=tuple(names.get("shortNames") or ()),
                categories=tuple(names.get("categories") or ()),
                status_subresource="status" in subresources,
                printer_columns=tuple(ver.get("additionalPrinterColumns") or ()),
                custom=True,
            )
            self._register(rtype)
            self._schemas[rtype.ident] = ver["schema"]["openAPIV3Schema"]

    # ------------------------------------------------------------------ state changes

    def create_object(
        self,
        group: str,
        version: str,
        plural: str,
        body: dict[str, Any],
        namespace: str | None = None,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """Create an object as POST does; also used directly by LocalCluster."""
        rtype = self.resource_type(group, version, plural)
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        self._check_body_kind(rtype, body)
        if rtype.group == "events.k8s.io":
            body, rtype = event_to_core(body), self._storage_type(rtype)
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise bad_request("metadata must be an object")
        body_ns = meta.get("namespace")
        ns = self._check_namespace(rtype, namespace or body_ns if rtype.namespaced else namespace)
        if body_ns and rtype.namespaced and body_ns != ns:
            raise bad_request("the namespace of the provided object does not match the namespace sent on the request")
        if not meta.get("name"):
            if meta.get("generateName"):
                meta["name"] = meta["generateName"] + _random_suffix()
            else:
                raise self._invalid(
                    rtype,
                    "",
                    [schema_mod.FieldError("metadata.name", "FieldValueRequired", "name or generateName is required")],
                )
        name = meta["name"]
        if rtype.namespaced:
            if ("", "namespaces") in self._kinds and ("", ns) not in self._kinds[("", "namespaces")].objects:
                raise RequestError(404, "NotFound", f'namespaces "{ns}" not found', {"name": ns, "kind": "namespaces"})
            meta["namespace"] = ns
            nsobj = self._kinds[("", "namespaces")].objects[("", ns)]
            if nsobj["metadata"].get("deletionTimestamp"):
                raise RequestError(
                    403, "Forbidden", f"unable to create new content in namespace {ns} because it is being terminated"
                )
        kind = self._kinds[rtype.key]
        if (ns, name) in kind.objects:
            raise RequestError(
                409,
                "AlreadyExists",
                f'{rtype.resource_name} "{name}" already exists',
                {"name": name, "group": rtype.group, "kind": rtype.plural},
            )
        if rtype.status_subresource and rtype.status_on_create == "drop":
            obj.pop("status", None)
        for key in (
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "managedFields",
            "resourceVersion",
            "uid",
            "creationTimestamp",
            "generation",
            "selfLink",
        ):
            meta.pop(key, None)
        obj = self._admit(rtype, obj, None)
        obj = self._builtin_defaults(rtype, obj)
        meta = obj["metadata"]
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_rfc3339()
        meta["generation"] = 1
        obj["apiVersion"], obj["kind"] = rtype.api_version, rtype.kind
        if dry_run:
            meta["resourceVersion"] = str(self._rv)
            return obj
        meta["resourceVersion"] = str(self._next_rv())
        kind.objects[(ns, name)] = obj
        self._emit(rtype, "ADDED", obj, None)
        if rtype.key == ("apiextensions.k8s.io", "customresourcedefinitions"):
            self._apply_crd(obj, None)
        return obj

    def _check_body_kind(self, rtype: ResourceType, body: dict[str, Any]) -> None:
        api_version, kind = body.get("apiVersion"), body.get("kind")
        if api_version and api_version.split("/")[0] != (rtype.group or "v1") and (api_version != rtype.api_version):
            raise bad_request(
                f"the API version in the data ({api_version}) does not match the expected API "
                f"version ({rtype.api_version})"
            )
        if kind and kind != rtype.kind:
            raise bad_request(f"the kind in the data ({kind}) does not match the expected kind ({rtype.kind})")

    def _builtin_defaults(self, rtype: ResourceType, obj: dict[str, Any]) -> dict[str, Any]:
        if rtype.key == ("", "namespaces"):
            obj["status"] = {"phase": "Active"}
            obj.setdefault("spec", {"finalizers": ["kubernetes"]})
        elif rtype.key == ("", "pods"):
            obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
        elif rtype.key == ("", "services"):
            spec = obj.setdefault("spec", {})
            spec.setdefault("type", "ClusterIP")
            if spec.get("clusterIP") in (None, ""):
                self._ips += 1
                spec["clusterIP"] = f"10.96.{self._ips // 250}.{self._ips % 250 + 1}"
            obj["status"] = {"loadBalancer": {}}
        elif rtype.key == ("", "secrets"):
            obj.setdefault("type", "Opaque")
            _fold_string_data(obj)
        return obj

    def update_object(
        self,
        rtype: ResourceType,
        namespace: str,
        name: str,
        body: dict[str, Any],
        subresource: str | None,
        *,
        require_rv: bool,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """Replace an object as PUT does (and PATCH after computing the patched body)."""
        if rtype.group == "events.k8s.io" and isinstance(body, dict):
            self._check_body_kind(rtype, body)
            body, rtype = event_to_core(body), self._storage_type(rtype)
        kind = self._kinds[rtype.key]
        old = kind.objects.get((namespace, name))
        if old is None:
            raise self._not_found(rtype, name)
        if not isinstance(body, dict) or not isinstance(body.get("metadata", {}), dict):
            raise bad_request("the request body must be a JSON object with object metadata")
        self._check_body_kind(rtype, body)
        meta_in = body.get("metadata", {})
        if meta_in.get("name", name) != name:
            raise bad_request(
                f"the name of the object ({meta_in.get('name')}) does not match the name on the URL ({name})"
            )
        rv_in = meta_in.get("resourceVersion")
        if rv_in:
            if str(rv_in) != old["metadata"]["resourceVersion"]:
                raise self._conflict(rtype, name)
        elif require_rv and rtype.custom:
            raise self._invalid(
                rtype,
                name,
                [
                    schema_mod.FieldError(
                        "metadata.resourceVersion", "FieldValueInvalid", "must be specified for an update", 0
                    )
                ],
            )
        if subresource == "status":
            new = copy.deepcopy(old)
            if "status" in body:
                new["status"] = copy.deepcopy(body["status"])
            else:
                new.pop("status", None)
        else:
            new = copy.deepcopy(body)
            new.setdefault("metadata", {})
            if rtype.status_subresource:
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
        meta = new["metadata"]
        for key in (
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "namespace",
            "name",
            "generation",
        ):
            if key in old["metadata"]:
                meta[key] = old["metadata"][key]
            else:
                meta.pop(key, None)
        meta.pop("managedFields", None)
        if meta.get("deletionTimestamp"):
            added = set(meta.get("finalizers") or []) - set(old["metadata"].get("finalizers") or [])
            if added:
                raise self._invalid(
                    rtype,
                    name,
                    [
                        schema_mod.FieldError(
                            "metadata.finalizers",
                            "FieldValueForbidden",
                            f"no new finalizers can be added if the object is being deleted, found new "
                            f"finalizers {sorted(added)}",
                        )
                    ],
                )
        new["apiVersion"], new["kind"] = rtype.api_version, rtype.kind
        new = self._admit(rtype, new, old)
        if rtype.key == ("", "secrets"):
            _fold_string_data(new)
        meta = new["metadata"]
        if rtype.key == ("", "services") and old.get("spec", {}).get("clusterIP"):
            new.setdefault("spec", {})["clusterIP"] = old["spec"]["clusterIP"]
        if not meta.get("finalizers"):
            meta.pop("finalizers", None)
        meta["resourceVersion"] = old["metadata"]["resourceVersion"]
        if new == old:
            return old  # a no-op update changes nothing, not even the resourceVersion
        if _spec_part(new) != _spec_part(old):
            meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        if dry_run:
            return new
        meta["resourceVersion"] = str(self._next_rv())
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            del kind.objects[(namespace, name)]
            self._emit(rtype, "DELETED", new, old)
            self._after_delete(rtype, new)
            return new
        kind.objects[(namespace, name)] = new
        self._emit(rtype, "MODIFIED", new, old)
        if rtype.key == ("apiextensions.k8s.io", "customresourcedefinitions"):
            self._apply_crd(new, old)
        return new

    def delete_object(
        self,
        rtype: ResourceType,
        namespace: str,
        name: str,
        options: dict[str, Any] | None = None,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        kind = self._kinds[rtype.key]
        old = kind.objects.get((namespace, name))
        if old is None:
            raise self._not_found(rtype, name)
        pre = (options or {}).get("preconditions") or {}
        if pre.get("resourceVersion") and pre["resourceVersion"] != old["metadata"]["resourceVersion"]:
            raise self._conflict(rtype, name)
        if pre.get("uid") and pre["uid"] != old["metadata"]["uid"]:
            raise RequestError(
                409,
                "Conflict",
                f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: {old['metadata']['uid']}",
            )
        if dry_run:
            return old
        if rtype.key == ("", "namespaces"):
            return self._delete_namespace(rtype, old)
        if old["metadata"].get("finalizers"):
            if old["metadata"].get("deletionTimestamp"):
                return old
            new = copy.deepcopy(old)
            new["metadata"]["deletionTimestamp"] = now_rfc3339()
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            new["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1
            new["metadata"]["resourceVersion"] = str(self._next_rv())
            kind.objects[(namespace, name)] = new
            self._emit(rtype, "MODIFIED", new, old)
            return new
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = str(self._next_rv())
        del kind.objects[(namespace, name)]
        self._emit(rtype, "DELETED", gone, old)
        orphan = (options or {}).get("propagationPolicy") == "Orphan" or (options or {}).get("orphanDependents")
        self._after_delete(rtype, gone, collect=not orphan)
        return gone

    def _delete_namespace(self, rtype: ResourceType, ns_obj: dict[str, Any]) -> dict[str, Any]:
        """Mark the namespace Terminating, delete its content, finalize when it is empty."""
        ns = ns_obj["metadata"]["name"]
        kind = self._kinds[rtype.key]
        if not ns_obj["metadata"].get("deletionTimestamp"):
            new = copy.deepcopy(ns_obj)
            new["metadata"]["deletionTimestamp"] = now_rfc3339()
            new["status"] = {"phase": "Terminating"}
            new["metadata"]["resourceVersion"] = str(self._next_rv())
            kind.objects[("", ns)] = new
            self._emit(rtype, "MODIFIED", new, ns_obj)
            for other in list(self._types.values()):
                if not other.namespaced or other.ident != self._storage_type(other).ident:
                    continue
                for ons, oname in list(self._kinds[other.key].objects):
                    if ons == ns:
                        self.delete_object(other, ns, oname)
        self._maybe_finalize_namespace(ns)
        return kind.objects.get(("", ns), ns_obj)

    def _storage_type(self, rtype: ResourceType) -> ResourceType:
        """One canonical type per (group, plural), to visit each storage once."""
        return next(t for t in self._types.values() if t.key == rtype.key)

    def _maybe_finalize_namespace(self, ns: str) -> None:
        nskind = self._kinds[("", "namespaces")]
        ns_obj = nskind.objects.get(("", ns))
        if ns_obj is None or not ns_obj["metadata"].get("deletionTimestamp"):
            return
        for rtype in self._types.values():
            if rtype.namespaced and any(k[0] == ns for k in self._kinds[rtype.key].objects):
                return
        gone = copy.deepcopy(ns_obj)
        gone["metadata"]["resourceVersion"] = str(self._next_rv())
        del nskind.objects[("", ns)]
        self._emit(self._types[("", "v1", "namespaces")], "DELETED", gone, ns_obj)

    def _after_delete(self, rtype: ResourceType, obj: dict[str, Any], *, collect: bool = True) -> None:
        if rtype.key == ("apiextensions.k8s.io", "customresourcedefinitions"):
            spec = obj["spec"]
            self._unregister(spec["group"], spec["names"]["plural"])
        if collect:
            self._collect_dependents(obj)
        ns = obj["metadata"].get("namespace")
        if ns:
            self._maybe_finalize_namespace(ns)

    def _collect_dependents(self, owner: dict[str, Any]) -> None:
        """The garbage collector, background propagation: delete what the owner owned.

        A dependent goes once none of its owners exists any more (checked by uid), like
        Kubernetes' GC; its own finalizers still hold it. Runs synchronously, so tests see
        the cascade as soon as the owner's DELETE returns.
        """
        owner_uid = owner["metadata"]["uid"]
        alive = {o["metadata"]["uid"] for k in self._kinds.values() for o in k.objects.values()}
        for other in {self._storage_type(t).ident: self._storage_type(t) for t in self._types.values()}.values():
            for (ns, name), obj in list(self._kinds[other.key].objects.items()):
                refs = obj["metadata"].get("ownerReferences") or []
                uids = {r.get("uid") for r in refs}
                if owner_uid in uids and not (uids & alive) and not obj["metadata"].get("deletionTimestamp"):
                    with contextlib.suppress(RequestError):
                        self.delete_object(other, ns, name)

    # ------------------------------------------------------------------ reading

    def get_object(self, rtype: ResourceType, namespace: str, name: str) -> dict[str, Any]:
        obj = self._kinds[rtype.key].objects.get((namespace, name))
        if obj is None:
            raise self._not_found(rtype, name)
        return self._present(rtype, obj)

    def list_objects(
        self,
        rtype: ResourceType,
        namespace: str | None,
        labels: list[Requirement] | None = None,
        fields: list[Requirement] | None = None,
    ) -> list[dict[str, Any]]:
        objs = [
            self._present(rtype, obj)
            for (ns, _), obj in sorted(self._kinds[rtype.key].objects.items())
            if namespace is None or ns == namespace
        ]
        return [o for o in objs if selector_matches(o, labels or [], fields or [])]

    @property
    def resource_version(self) -> int:
        return self._rv

    # ------------------------------------------------------------------ HTTP

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """Serve resource URLs from the store; everything else through kmock."""
        rpath = parse_resource_path(raw.path)
        if rpath is None or rpath.plural is None:
            if raw.path.startswith("/openapi/"):
                return self._serve_openapi(raw.path)
            if raw.path in ("/healthz", "/readyz", "/livez"):
                return aiohttp.web.Response(text="ok")
            response: aiohttp.web.StreamResponse = await super().__call__(raw)
            return response
        body = await raw.read()
        if "protobuf" in raw.headers.get("Content-Type", ""):
            # We speak JSON only; client-go retries in JSON on 415 (kubectl create ...).
            return _status_response(
                RequestError(
                    415,
                    "UnsupportedMediaType",
                    "the body of the request was in an unknown format "
                    "- accepted media types include: application/json, application/yaml",
                )
            )
        text = body.decode("utf-8", errors="replace")
        try:
            data = json.loads(text) if text else None
        except ValueError:
            data = None
        request = kmock.Request(
            id=len(self._requests),
            raw_request=raw,
            url=raw.url,
            method=raw.method,
            params=dict(raw.query),
            headers=dict(raw.headers),
            cookies=dict(raw.cookies),
            body=body,
            text=text,
            data=data,
            resource=kmock.resource(rpath.group, rpath.version, rpath.plural),
            namespace=rpath.namespace,
            name=rpath.name,
            subresource=rpath.subresource,
        )
        self._requests.append(request)
        del self._requests[:-_KEEP_REQUESTS]
        reaction = await self._user_reaction(request)
        if reaction is not None:
            return reaction
        try:
            return await self._serve_resource(request, rpath)
        except RequestError as exc:
            return _status_response(exc)
        except Exception as exc:
            logger.exception("internal error serving %s %s", raw.method, raw.path_qs)
            return _status_response(
                RequestError(500, "InternalError", f"internal error in the emulated API server: {exc!r}")
            )

    async def _user_reaction(self, request: kmock.Request) -> aiohttp.web.StreamResponse | None:
        """Let kmock DSL reactions (``api['patch', resource] << 503``) override the store.

        This keeps kmock's fault injection: a test can make lease renewals fail or pod
        lists hang. Fallback reactions (kmock's own discovery) never shadow the store.
        """
        candidates = [p for p in self._payloads if not (p.priorities and p.priorities[0] == -math.inf)]
        candidates.sort(key=lambda p: tuple(-x for x in p.priorities), reverse=False)
        for payload in candidates:
            if payload._disabled.is_set() or request not in payload._source:
                continue
            try:
                response: aiohttp.web.StreamResponse = await payload(request)
            except ReactionMismatchError:  # depleted or not matching after all
                payload._disabled.set()
                continue
            except NotImplementedError:
                continue
            return response
        return None

    async def _serve_server_version(self, request: kmock.Request) -> dict[str, Any]:
        # Match the kubectl we ship (1.32) so it does not warn about version skew.
        return {
            "major": "1",
            "minor": "32",
            "gitVersion": "v1.32.0-pairvol-localcluster",
            "gitCommit": "",
            "gitTreeState": "clean",
            "buildDate": "",
            "goVersion": "",
            "compiler": "pairvol",
            "platform": "linux/amd64",
        }

    async def _serve_version(self, request: kmock.Request) -> dict[str, Any]:
        # kmock reports the core group-version as "/v1"; Kubernetes says "v1".
        result = await super()._serve_version(request)
        assert isinstance(result, dict)
        result["groupVersion"] = result["groupVersion"].lstrip("/")
        for entry in result["resources"]:
            if "/" in entry["name"]:  # subresources have no short names or categories
                entry["shortNames"], entry["categories"] = [], []
                entry["verbs"] = ["get", "patch", "update"]
        return result

    async def _serve_log(self, request: kmock.Request, namespace: str, name: str) -> aiohttp.web.StreamResponse:
        """``GET pods/<name>/log`` (``kubectl logs [-f] [--tail N]``) from the pod's log file."""
        rtype = self.resource_type("", "v1", "pods")
        pod = self.get_object(rtype, namespace, name)
        path = self.log_source(pod) if self.log_source is not None else None
        if path is None:
            raise RequestError(
                400,
                "BadRequest",
                f'no logs for pod "{name}": this cluster runs no node simulator, or the pod has not started',
            )
        tail = request.params.get("tailLines")
        try:
            data = await asyncio.to_thread(_read_log, path, int(tail) if tail else None)
        except ValueError:
            raise bad_request("tailLines must be an integer") from None
        follow = str(request.params.get("follow", "")).lower() in ("true", "1")
        if not follow:
            return aiohttp.web.Response(body=data, content_type="text/plain")
        raw = request._raw_request
        assert raw is not None
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(raw)
        await response.write(data)
        offset = await asyncio.to_thread(_file_size, path)
        try:
            while not self._closing and (namespace, name) in self._kinds[rtype.key].objects:
                chunk, offset = await asyncio.to_thread(_read_from, path, offset)
                if chunk:
                    await response.write(chunk)
                else:
                    await asyncio.sleep(0.3)
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return response

    def _serve_openapi(self, path: str) -> aiohttp.web.Response:
        """OpenAPI v3 just deep enough for kubectl to use server-side field validation.

        kubectl looks for a PATCH operation of the kind with a ``fieldValidation`` query
        parameter; finding it, it leaves validation to us (422/400 answers) instead of
        downloading the protobuf OpenAPI v2 document, which we do not serve.
        """
        path = path.rstrip("/")
        gvs = sorted({(t.group, t.version) for t in self._types.values()})

        def gv_path(group: str, version: str) -> str:
            return f"api/{version}" if not group else f"apis/{group}/{version}"

        if path == "/openapi/v3":
            # kubectl caches documents by this hash (~/.kube/cache): it must change with them.
            def url(g: str, v: str) -> str:
                doc = json.dumps(self._openapi_gv(g, v), sort_keys=True).encode()
                digest = hashlib.sha256(doc).hexdigest()[:32].upper()
                return f"/openapi/v3/{gv_path(g, v)}?hash={digest}"

            paths = {gv_path(g, v): {"serverRelativeURL": url(g, v)} for g, v in gvs}
            return aiohttp.web.json_response({"paths": paths})
        for group, version in gvs:
            if path == f"/openapi/v3/{gv_path(group, version)}":
                return aiohttp.web.json_response(self._openapi_gv(group, version))
        raise RequestError(404, "NotFound", f"no OpenAPI document at {path}")

    def _openapi_gv(self, group: str, version: str) -> dict[str, Any]:
        params = [
            {"name": n, "in": "query", "schema": {"type": "string"}}
            for n in ("dryRun", "fieldManager", "fieldValidation", "force")
        ]
        paths: dict[str, Any] = {}
        schemas: dict[str, Any] = {}
        for t in self._types.values():
            if (t.group, t.version) != (group, version):
                continue
            crd_schema = self._schemas.get(t.ident)
            if crd_schema is not None:  # lets `kubectl explain` describe our CRs
                name = ".".join([*reversed(group.split(".")), version, t.kind])
                schemas[name] = {
                    **crd_schema,
                    "x-kubernetes-group-version-kind": [{"group": group, "version": version, "kind": t.kind}],
                }
            prefix = "/api/v1" if not group else f"/apis/{group}/{version}"
            ns = "/namespaces/{namespace}" if t.namespaced else ""
            gvk = {"group": group, "version": version, "kind": t.kind}
            op = {
                "x-kubernetes-group-version-kind": gvk,
                "parameters": params,
                "responses": {"200": {"description": "OK"}},
            }
            paths[f"{prefix}{ns}/{t.plural}"] = {"post": op}
            paths[f"{prefix}{ns}/{t.plural}/{{name}}"] = {"put": op, "patch": op}
        return {
            "openapi": "3.0.0",
            "info": {"title": "pairvol localcluster", "version": version},
            "paths": paths,
            "components": {"schemas": schemas},
        }

    async def _serve_resource(self, request: kmock.Request, rpath: ResourcePath) -> aiohttp.web.StreamResponse:
        assert rpath.plural is not None
        rtype = self.resource_type(rpath.group, rpath.version, rpath.plural)
        sub = rpath.subresource
        if sub == "log" and rtype.key == ("", "pods") and rpath.name and request.method == "GET":
            return await self._serve_log(request, rpath.namespace or "", rpath.name)
        if sub is not None and not (sub == "status" and rtype.status_subresource):
            raise RequestError(
                404, "NotFound", f"the server could not find the requested resource ({rtype.plural}/{sub})"
            )
        params = request.params
        dry_run = params.get("dryRun") == "All"
        mode = params.get("fieldValidation") or "Warn"
        if mode not in ("Strict", "Warn", "Ignore"):
            raise bad_request(f"fieldValidation must be Strict, Warn or Ignore, not {mode!r}")
        self._field_validation, self._warnings = mode, []
        response = await self._dispatch(request, rtype, rpath, params, dry_run)
        if self._warnings and not response.prepared:
            response.headers["Warning"] = ", ".join(f"299 - {json.dumps(w)}" for w in self._warnings)
        self._field_validation, self._warnings = "Ignore", []
        return response

    async def _dispatch(
        self,
        request: kmock.Request,
        rtype: ResourceType,
        rpath: ResourcePath,
        params: Any,
        dry_run: bool,
    ) -> aiohttp.web.StreamResponse:
        name, sub = rpath.name, rpath.subresource
        method = str(request.method.value).upper()
        ns_param = request.namespace
        watch = rpath.legacy_watch or str(params.get("watch", "")).lower() in ("true", "1")
        if method == "GET" and watch:
            namespace = ns_param if rtype.namespaced else None
            return await self._serve_watch(request, rtype, namespace, name)
        if name is None:
            if method == "GET":
                namespace = ns_param if rtype.namespaced else None
                if ns_param and not rtype.namespaced:
                    self._check_namespace(rtype, ns_param)
                return self._serve_list(request, rtype, namespace)
            if method == "POST":
                body = self._body(request)
                obj = self.create_object(rtype.group, rtype.version, rtype.plural, body, ns_param, dry_run=dry_run)
                return aiohttp.web.json_response(self._present(rtype, obj), status=201)
            if method == "DELETE":
                namespace = ns_param if rtype.namespaced else None
                labels = parse_label_selector(params.get("labelSelector", ""))
                fields = parse_field_selector(params.get("fieldSelector", ""))
                items = []
                for obj in self.list_objects(rtype, namespace, labels, fields):
                    meta = obj["metadata"]
                    items.append(self.delete_object(rtype, meta.get("namespace", ""), meta["name"], dry_run=dry_run))
                return aiohttp.web.json_response(self._list_body(rtype, items))
            raise RequestError(405, "MethodNotAllowed", f"{method} is not supported on a collection")
        ns = self._check_namespace(rtype, ns_param)
        if method == "GET":
            obj = self.get_object(rtype, ns, name)
            if _wants_table(request):
                return aiohttp.web.json_response(self._table(request, rtype, [obj]))
            return aiohttp.web.json_response(obj)
        if method == "PUT":
            body = self._body(request)
            obj = self.update_object(rtype, ns, name, body, sub, require_rv=True, dry_run=dry_run)
            return aiohttp.web.json_response(self._present(rtype, obj))
        if method == "PATCH":
            return self._serve_patch(request, rtype, ns, name, sub, dry_run)
        if method == "DELETE":
            options = request.data if isinstance(request.data, dict) else None
            obj = self.delete_object(rtype, ns, name, options, dry_run=dry_run)
            return aiohttp.web.json_response(self._present(rtype, obj))
        raise RequestError(405, "MethodNotAllowed", f"{method} is not supported on an object")

    def _body(self, request: kmock.Request) -> dict[str, Any]:
        data = request.data
        if not isinstance(data, dict):
            text = request.text
            try:
                data = yaml.safe_load(text) if text else None
            except yaml.YAMLError as exc:
                raise bad_request(f"the request body is neither JSON nor YAML: {exc}") from None
        if not isinstance(data, dict):
            raise bad_request("the request body must be a JSON object (the Kubernetes object)")
        return data

    def _serve_patch(
        self,
        request: kmock.Request,
        rtype: ResourceType,
        ns: str,
        name: str,
        sub: str | None,
        dry_run: bool,
    ) -> aiohttp.web.StreamResponse:
        ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
        patcher = PATCH_TYPES.get(ctype)
        if patcher is None or (rtype.custom and "strategic" in ctype):
            accepted = [t for t in PATCH_TYPES if not (rtype.custom and "strategic" in t)]
            raise RequestError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types "
                f"include: {', '.join(accepted)} (got {ctype!r})",
            )
        if ctype.startswith("application/apply-patch"):
            patch: Any = self._body(request)
        else:
            try:
                patch = json.loads(request.text or "null")
            except ValueError as exc:
                raise bad_request(f"the patch is not valid JSON: {exc}") from None
        current = self._kinds[rtype.key].objects.get((ns, name))
        if current is None:
            if ctype.startswith("application/apply-patch") and sub is None:
                obj = self.create_object(rtype.group, rtype.version, rtype.plural, patch, ns, dry_run=dry_run)
                return aiohttp.web.json_response(self._present(rtype, obj), status=201)
            raise self._not_found(rtype, name)
        if ctype.startswith("application/apply-patch") and isinstance(patch, dict):
            patch = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind")}
        patched = patcher(self._present(rtype, current), patch)
        if not isinstance(patched, dict):
            raise bad_request("the patch must result in a JSON object")
        patched.setdefault("metadata", {})
        if isinstance(patched["metadata"], dict):
            patched["metadata"].setdefault("name", name)
        obj = self.update_object(rtype, ns, name, patched, sub, require_rv=False, dry_run=dry_run)
        return aiohttp.web.json_response(self._present(rtype, obj))

    def _list_body(self, rtype: ResourceType, items: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "apiVersion": rtype.api_version,
            "kind": f"{rtype.kind}List",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": items,
        }

    def _table(self, request: kmock.Request, rtype: ResourceType, objs: list[dict[str, Any]]) -> dict[str, Any]:
        result = table(objs, list(rtype.printer_columns), str(self._rv))
        include = request.params.get("includeObject", "Metadata")
        for row, obj in zip(result["rows"], objs, strict=True):
            if include == "Object":
                row["object"] = obj
            elif include == "None":
                row.pop("object")
        return result

    def _serve_list(
        self, request: kmock.Request, rtype: ResourceType, namespace: str | None
    ) -> aiohttp.web.StreamResponse:
        labels = parse_label_selector(request.params.get("labelSelector", ""))
        fields = parse_field_selector(request.params.get("fieldSelector", ""))
        items = self.list_objects(rtype, namespace, labels, fields)
        if _wants_table(request):
            return aiohttp.web.json_response(self._table(request, rtype, items))
        return aiohttp.web.json_response(self._list_body(rtype, items))

    async def _serve_watch(
        self,
        request: kmock.Request,
        rtype: ResourceType,
        namespace: str | None,
        name: str | None,
    ) -> aiohttp.web.StreamResponse:
        params = request.params
        labels = parse_label_selector(params.get("labelSelector", ""))
        fields = parse_field_selector(params.get("fieldSelector", ""))
        if name is not None:
            fields.append(Requirement("metadata.name", "=", (name,)))
        try:
            timeout = float(params.get("timeoutSeconds") or 1800)
        except ValueError:
            raise bad_request("timeoutSeconds must be a number") from None
        bookmarks = str(params.get("allowWatchBookmarks", "")).lower() in ("true", "1")
        as_table = _wants_table(request)
        rv_param = params.get("resourceVersion") or ""
        kind = self._kinds[rtype.key]
        watch = _Watch(asyncio.Queue(), namespace)
        initial: list[tuple[str, dict[str, Any]]] = []
        if rv_param in ("", "0"):
            initial = [("ADDED", o) for o in self.list_objects(rtype, namespace, labels, fields)]
        else:
            try:
                since = int(rv_param)
            except ValueError:
                raise bad_request(f"invalid resourceVersion {rv_param!r}") from None
            if since < kind.compacted_rv:
                return await self._stream_gone(request, since)
            for entry in kind.history:
                if entry[0] > since and (namespace is None or entry[2]["metadata"].get("namespace") == namespace):
                    watch.queue.put_nowait(entry)
        kind.watches.append(watch)
        raw = request._raw_request
        assert raw is not None
        response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        try:
            await response.prepare(raw)
            for etype, obj in initial:
                await self._write_event(response, request, rtype, etype, obj, as_table)
            deadline = time.monotonic() + timeout
            while not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(watch.queue.get(), timeout=min(left, 10.0))
                except TimeoutError:
                    if bookmarks:
                        await self._write_bookmark(response, rtype)
                    continue
                if item is None:
                    break
                _, etype, stored, stored_old = item
                obj = self._present(rtype, stored)
                old = self._present(rtype, stored_old) if stored_old is not None else None
                now_match = selector_matches(obj, labels, fields)
                was_match = old is not None and selector_matches(old, labels, fields)
                if etype == "MODIFIED" and now_match and not was_match:
                    etype = "ADDED"
                elif etype == "MODIFIED" and was_match and not now_match:
                    etype, now_match = "DELETED", True
                elif etype == "DELETED":
                    now_match = now_match or was_match
                if now_match:
                    await self._write_event(response, request, rtype, etype, obj, as_table)
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass  # the client went away; nothing to clean up but the registration
        finally:
            with contextlib.suppress(ValueError):
                kind.watches.remove(watch)
        return response

    async def _write_event(
        self,
        response: aiohttp.web.StreamResponse,
        request: kmock.Request,
        rtype: ResourceType,
        etype: str,
        obj: dict[str, Any],
        as_table: bool,
    ) -> None:
        payload = self._table(request, rtype, [obj]) if as_table else obj
        line = json.dumps({"type": etype, "object": payload}) + "\n"
        await response.write(line.encode())

    async def _write_bookmark(self, response: aiohttp.web.StreamResponse, rtype: ResourceType) -> None:
        obj = {"kind": rtype.kind, "apiVersion": rtype.api_version, "metadata": {"resourceVersion": str(self._rv)}}
        await response.write((json.dumps({"type": "BOOKMARK", "object": obj}) + "\n").encode())

    async def _stream_gone(self, request: kmock.Request, since: int) -> aiohttp.web.StreamResponse:
        raw = request._raw_request
        assert raw is not None
        response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await response.prepare(raw)
        gone = RequestError(410, "Expired", f"too old resource version: {since} ({self._rv})")
        await response.write((json.dumps({"type": "ERROR", "object": gone.status()}) + "\n").encode())
        await response.write_eof()
        return response

    def close_watches(self) -> None:
        """End every open watch stream (clients re-watch); used before shutdown."""
        self._closing = True
        for kind in self._kinds.values():
            for watch in kind.watches:
                watch.queue.put_nowait(None)


def _read_log(path: Path, tail: int | None) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return b""
    if tail is not None:
        lines = data.splitlines(keepends=True)
        data = b"".join(lines[-tail:]) if tail > 0 else b""
    return data


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_from(path: Path, offset: int) -> tuple[bytes, int]:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            chunk = fh.read(1 << 16)
    except FileNotFoundError:
        return b"", offset
    return chunk, offset + len(chunk)


def _action(method: str, rpath: ResourcePath, watch: str) -> kmock.action | None:
    """kmock's name for a request, so DSL filters like ``api['list pods']`` match."""
    if method == "GET" and (rpath.legacy_watch or watch.lower() in ("true", "1")):
        return kmock.action.WATCH
    if method == "GET":
        return kmock.action.FETCH if rpath.name else kmock.action.LIST
    if method == "POST":
        return kmock.action.CREATE
    if method in ("PATCH", "PUT"):
        return kmock.action.UPDATE
    if method == "DELETE":
        return kmock.action.DELETE
    return None


def _fold_string_data(secret: dict[str, Any]) -> None:
    """Secrets store ``stringData`` base64-encoded in ``data``, as Kubernetes does."""
    string_data = secret.pop("stringData", None)
    if isinstance(string_data, dict):
        data = secret.setdefault("data", {}) or {}
        for key, value in string_data.items():
            data[key] = base64.b64encode(str(value).encode()).decode()
        secret["data"] = data


def _spec_part(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


@contextlib.asynccontextmanager
async def serve(
    host: str = "127.0.0.1", port: int = 0, handler: APIServer | None = None
) -> AsyncIterator[tuple[APIServer, str]]:
    """Run an :class:`APIServer` on ``host:port`` (0 = a free port); yield it and its URL."""
    api = handler if handler is not None else APIServer()
    async with api:
        server = kmock.Server(api, host=host, port=port)
        try:
            await server.__aenter__()
        except OSError as exc:
            raise APIServerError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port or 0 for a free one"
            ) from exc
        url = f"http://{host}:{server.port}"
        logger.info("emulated Kubernetes API listening on %s", url)
        try:
            yield api, url
        finally:
            api.close_watches()
            await asyncio.sleep(0)  # let watch handlers see the end of their queues
            await server.__aexit__(None, None, None)
