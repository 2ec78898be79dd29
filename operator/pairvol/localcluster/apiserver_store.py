"""The object store of the emulated API server: Kubernetes' rules for changing objects.

Why a separate module: this is the part that decides what a write does — status
subresource isolation, ``metadata.generation``, resourceVersion conflicts, finalizers and
deletion, namespaces, garbage collection by owner, CRD registration and schema admission,
watch history — independent of HTTP (see :mod:`apiserver` for the wire side). It keeps
everything in memory; every change is a synchronous method, so one event loop
serialises them without locks, and watchers get events through in-memory queues.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import copy
import datetime
import random
import string
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pairvol.localcluster import apiserver_schema as schema_mod
from pairvol.localcluster import storage_admission
from pairvol.localcluster.apiserver_builtin import (
    BUILTIN_TYPES,
    KOPF_CRDS,
    ResourceType,
    event_from_core,
    event_to_core,
)
from pairvol.localcluster.apiserver_logic import (
    RequestError,
    Requirement,
    bad_request,
    name_problem,
    now_rfc3339,
    selector_matches,
)
from pairvol.localcluster.workload_defaults import apply_defaults as apply_workload_defaults

ObjKey = tuple[str, str]  # (namespace or "", name)
TypeKey = tuple[str, str]  # (group, plural)
WatchEntry = tuple[int, str, dict[str, Any], dict[str, Any] | None]  # rv, type, object, old

HISTORY = 5000  # watch events kept per resource for resourceVersion replay


@dataclass
class Watch:
    """One open watch stream: events arrive on the queue, None ends the stream."""

    queue: asyncio.Queue[WatchEntry | None]
    namespace: str | None


@dataclass
class _Kind:
    """Storage and watchers of one (group, plural), shared by all its versions."""

    objects: dict[ObjKey, dict[str, Any]] = field(default_factory=dict)
    history: collections.deque[WatchEntry] = field(default_factory=lambda: collections.deque(maxlen=HISTORY))
    watches: list[Watch] = field(default_factory=list)
    compacted_rv: int = 0  # oldest rv we can no longer replay from


def _random_suffix() -> str:
    return "".join(random.choices(string.ascii_lowercase + string.digits, k=5))


def _fold_string_data(secret: dict[str, Any]) -> None:
    """Secrets store ``stringData`` base64-encoded in ``data``, as Kubernetes does."""
    string_data = secret.pop("stringData", None)
    if isinstance(string_data, dict):
        data = secret.setdefault("data", {}) or {}
        for key, value in string_data.items():
            data[key] = base64.b64encode(str(value).encode()).decode()
        secret["data"] = data


def _propagation(options: dict[str, Any] | None) -> str:
    """DeleteOptions' propagation policy: Background (default), Foreground or Orphan."""
    opts = options or {}
    policy = opts.get("propagationPolicy")
    if policy in ("Background", "Foreground", "Orphan"):
        return str(policy)
    return "Orphan" if opts.get("orphanDependents") else "Background"


def _spec_part(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


class ObjectStore:
    """Objects by resource type, with the Kubernetes rules for changing them.

    A mixin for :class:`~pairvol.localcluster.apiserver.APIServer` (which adds HTTP and
    discovery through the ``_on_register``/``_on_unregister`` hooks); usable alone in
    tests. State changes are synchronous methods: callers in one event loop never see a
    half-applied change.
    """

    _types: dict[tuple[str, str, str], ResourceType]
    _kinds: dict[TypeKey, _Kind]
    _schemas: dict[tuple[str, str, str], schema_mod.Schema]
    _rv: int
    _closing: bool
    _ips: int
    _history_limit: int
    # Per-request state, only touched in synchronous sections (no await in between).
    _field_validation: str
    _warnings: list[str]

    def __init__(self, history_limit: int = HISTORY) -> None:
        """A standalone store (APIServer, an attrs class, calls ``_init_store`` itself)."""
        self._init_store(history_limit)

    def _init_store(self, history_limit: int = HISTORY) -> None:
        """Start empty, then add the built-in types, namespaces and kopf's peering CRDs."""
        self._types, self._kinds, self._schemas = {}, {}, {}
        self._rv, self._closing, self._ips = 0, False, 0
        self._history_limit = history_limit
        self._field_validation, self._warnings = "Ignore", []
        for rtype in BUILTIN_TYPES:
            self._register(rtype)
        for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self.create_object("", "v1", "namespaces", {"metadata": {"name": ns}})
        for crd in KOPF_CRDS:
            self.create_object("apiextensions.k8s.io", "v1", "customresourcedefinitions", crd)

    def _on_register(self, rtype: ResourceType) -> None:
        """Hook: a resource type became served (discovery)."""

    def _on_unregister(self, rtype: ResourceType) -> None:
        """Hook: a resource type is no longer served."""

    # ------------------------------------------------------------------ registry

    def _register(self, rtype: ResourceType) -> None:
        self._types[(rtype.group, rtype.version, rtype.plural)] = rtype
        self._kinds.setdefault(
            (rtype.group, rtype.plural),
            _Kind(history=collections.deque(maxlen=self._history_limit)),
        )
        self._on_register(rtype)

    def _unregister(self, group: str, plural: str) -> None:
        for key in [k for k in self._types if k[0] == group and k[2] == plural]:
            rtype = self._types.pop(key)
            self._schemas.pop(key, None)
            self._on_unregister(rtype)
        kind = self._kinds.pop((group, plural), None)
        if kind is not None:
            for watch in kind.watches:
                watch.queue.put_nowait(None)

    def type_for_kind(self, api_version: str, kind: str) -> ResourceType | None:
        """The served type of ``apiVersion``/``kind`` (as in a manifest), or None."""
        group, _, version = api_version.rpartition("/")
        return next(
            (t for t in self._types.values() if (t.group, t.version, t.kind) == (group, version, kind)),
            None,
        )

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
        if rtype.key == ("", "persistentvolumeclaims") and old is not None:
            self._admit_claim_resize(rtype, old, obj)
        obj = apply_workload_defaults(rtype.key, obj)  # Deployments, Jobs, ...: upstream's defaults
        return obj

    def _admit_claim_resize(self, rtype: ResourceType, old: dict[str, Any], new: dict[str, Any]) -> None:
        """A claim grows only with a StorageClass that allows it, never shrinks (storage_admission)."""
        classes = self._kinds.get(("storage.k8s.io", "storageclasses"))
        class_name = (old.get("spec") or {}).get("storageClassName")
        storage_class = classes.objects.get(("", class_name)) if classes is not None and class_name else None
        problem = storage_admission.resize_problem(old, new, storage_class)
        if problem is None:
            return
        status, message = problem
        name = old["metadata"]["name"]
        if status == 403:
            raise RequestError(
                403, "Forbidden", f'persistentvolumeclaims "{name}" is forbidden: {message}',
                {"name": name, "kind": "persistentvolumeclaims"},
            )
        raise RequestError(
            422, "Invalid", f'PersistentVolumeClaim "{name}" is invalid: {message}',
            {"name": name, "kind": "PersistentVolumeClaim"},
        )

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
            self._on_unregister(self._types.pop(key))  # versions may have been dropped
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
        elif rtype.key in (("", "persistentvolumeclaims"), ("", "persistentvolumes")):
            # as the API server defaults them: a new claim waits for a volume, a new volume
            # for a claim; a PV nobody says otherwise about is kept when released
            spec = obj.setdefault("spec", {})
            spec.setdefault("volumeMode", "Filesystem")
            if rtype.plural == "persistentvolumes":
                spec.setdefault("persistentVolumeReclaimPolicy", "Retain")
            obj["status"] = {"phase": "Pending" if rtype.plural == "persistentvolumeclaims" else "Available"}
        elif rtype.key == ("storage.k8s.io", "storageclasses"):
            obj.setdefault("reclaimPolicy", "Delete")
            obj.setdefault("volumeBindingMode", "Immediate")
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
        if meta.get("deletionTimestamp") and not meta.get("finalizers") and not meta.get("deletionGracePeriodSeconds"):
            # the last finalizer went (a pod in its grace period stays until its kubelet
            # or a zero-grace DELETE finalizes it)
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
        policy = _propagation(options)
        if policy == "Orphan":
            self._orphan_dependents(old)
        elif policy == "Foreground" and self._dependents(old["metadata"]["uid"]):
            return self._delete_foreground(rtype, old)
        if rtype.key == ("", "pods") and (grace := pod_grace_period(old, options)) > 0:
            return self._delete_pod_gracefully(rtype, old, grace)
        if old["metadata"].get("finalizers"):
            if old["metadata"].get("deletionTimestamp"):
                if old["metadata"].get("deletionGracePeriodSeconds"):
                    # a pod's grace is over (its kubelet's zero-grace DELETE): only the
                    # finalizers hold it now, and it goes when the last one does
                    new = copy.deepcopy(old)
                    new["metadata"]["deletionGracePeriodSeconds"] = 0
                    new["metadata"]["resourceVersion"] = str(self._next_rv())
                    kind.objects[(namespace, name)] = new
                    self._emit(rtype, "MODIFIED", new, old)
                    return new
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
        self._after_delete(rtype, gone, collect=policy != "Orphan")
        return gone

    def _delete_pod_gracefully(self, rtype: ResourceType, old: dict[str, Any], grace: int) -> dict[str, Any]:
        """A bound, running pod is only marked: deletionTimestamp = now + grace. Its kubelet
        stops the containers and finalizes with a zero-grace DELETE; a pod whose node is
        dead stays Terminating until someone force-deletes it (as with a real API server)."""
        meta = old["metadata"]
        current = meta.get("deletionGracePeriodSeconds")
        if meta.get("deletionTimestamp") and current is not None and int(current) <= grace:
            return old  # already terminating, at least as soon
        new = copy.deepcopy(old)
        when = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=grace)
        new["metadata"]["deletionTimestamp"] = when.strftime("%Y-%m-%dT%H:%M:%SZ")
        new["metadata"]["deletionGracePeriodSeconds"] = grace
        new["metadata"]["resourceVersion"] = str(self._next_rv())
        self._kinds[rtype.key].objects[(meta.get("namespace", ""), meta["name"])] = new
        self._emit(rtype, "MODIFIED", new, old)
        return new

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
        self._finish_foreground_owners(obj)
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

    # ------------------------------------------------------------------ propagation policies
    # Background (the default) is _collect_dependents above. Orphan: the dependents lose
    # their ownerReference to the owner and stay. Foreground: the owner is marked deleted
    # with the ``foregroundDeletion`` finalizer, its dependents are deleted (foreground
    # too), and the owner goes once none is left — all synchronously, as the GC would.

    def _storage_types(self) -> list[ResourceType]:
        return list({self._storage_type(t).ident: self._storage_type(t) for t in self._types.values()}.values())

    def _dependents(self, owner_uid: str) -> list[tuple[ResourceType, dict[str, Any]]]:
        return [
            (rtype, obj)
            for rtype in self._storage_types()
            for obj in list(self._kinds[rtype.key].objects.values())
            if any(r.get("uid") == owner_uid for r in obj["metadata"].get("ownerReferences") or [])
        ]

    def _orphan_dependents(self, owner: dict[str, Any]) -> None:
        uid = owner["metadata"]["uid"]
        for rtype, obj in self._dependents(uid):
            new = copy.deepcopy(obj)
            refs = [r for r in new["metadata"].get("ownerReferences") or [] if r.get("uid") != uid]
            if refs:
                new["metadata"]["ownerReferences"] = refs
            else:
                new["metadata"].pop("ownerReferences", None)
            new["metadata"]["resourceVersion"] = str(self._next_rv())
            meta = new["metadata"]
            self._kinds[rtype.key].objects[(meta.get("namespace", ""), meta["name"])] = new
            self._emit(rtype, "MODIFIED", new, obj)

    def _delete_foreground(self, rtype: ResourceType, old: dict[str, Any]) -> dict[str, Any]:
        meta = old["metadata"]
        ns, name = meta.get("namespace", ""), meta["name"]
        kind = self._kinds[rtype.key]
        if "foregroundDeletion" not in (meta.get("finalizers") or []):
            new = copy.deepcopy(old)
            new["metadata"]["finalizers"] = [*(meta.get("finalizers") or []), "foregroundDeletion"]
            new["metadata"].setdefault("deletionTimestamp", now_rfc3339())
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            new["metadata"]["resourceVersion"] = str(self._next_rv())
            kind.objects[(ns, name)] = new
            self._emit(rtype, "MODIFIED", new, old)
        for dep_type, dep in self._dependents(meta["uid"]):
            dmeta = dep["metadata"]
            if not dmeta.get("deletionTimestamp"):
                with contextlib.suppress(RequestError):
                    self.delete_object(
                        dep_type, dmeta.get("namespace", ""), dmeta["name"], {"propagationPolicy": "Foreground"}
                    )
        self._finish_foreground(rtype, ns, name)
        return kind.objects.get((ns, name), old)

    def _finish_foreground(self, rtype: ResourceType, namespace: str, name: str) -> None:
        """Drop ``foregroundDeletion`` from an owner whose dependents are all gone."""
        obj = self._kinds[rtype.key].objects.get((namespace, name))
        if obj is None or "foregroundDeletion" not in (obj["metadata"].get("finalizers") or []):
            return
        if self._dependents(obj["metadata"]["uid"]):
            return
        body = copy.deepcopy(obj)
        body["metadata"]["finalizers"] = [f for f in obj["metadata"]["finalizers"] if f != "foregroundDeletion"]
        self.update_object(rtype, namespace, name, body, None, require_rv=False)

    def _finish_foreground_owners(self, gone: dict[str, Any]) -> None:
        for ref in gone["metadata"].get("ownerReferences") or []:
            for rtype in self._storage_types():
                for (ns, name), obj in list(self._kinds[rtype.key].objects.items()):
                    if obj["metadata"]["uid"] == ref.get("uid"):
                        self._finish_foreground(rtype, ns, name)

    # ------------------------------------------------------------------ in-process watchers

    def subscribe(self, group: str, plural: str, queue: asyncio.Queue[WatchEntry | None]) -> Watch:
        """Deliver every change of ``(group, plural)`` to ``queue`` (in-process controllers,
        see :mod:`pairvol.localcluster.controllers`); undo with :meth:`unsubscribe`."""
        watch = Watch(queue, None)
        self._kinds[(group, plural)].watches.append(watch)
        return watch

    def unsubscribe(self, group: str, plural: str, watch: Watch) -> None:
        kind = self._kinds.get((group, plural))
        if kind is not None:
            with contextlib.suppress(ValueError):
                kind.watches.remove(watch)

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
        stored = [obj for (ns, _), obj in sorted(self._kinds[rtype.key].objects.items())
                  if namespace is None or ns == namespace]  # fmt: skip
        if rtype.group == "events.k8s.io":  # its field names are those of the converted object
            objs = [self._present(rtype, obj) for obj in stored]
            return [o for o in objs if selector_matches(o, labels or [], fields or [])]
        # select first, copy only what is answered: a LIST of one node's pods used to copy all
        return [self._present(rtype, o) for o in stored if selector_matches(o, labels or [], fields or [])]

    @property
    def resource_version(self) -> int:
        return self._rv

    def close_watches(self) -> None:
        """End every open watch stream (clients re-watch); used before shutdown."""
        self._closing = True
        for kind in self._kinds.values():
            for watch in kind.watches:
                watch.queue.put_nowait(None)


def pod_grace_period(pod: Mapping[str, Any], options: Mapping[str, Any] | None) -> int:
    """The grace period a DELETE gives a pod (kube-apiserver's rules): the request's
    gracePeriodSeconds, else the pod's terminationGracePeriodSeconds (30); zero for a pod
    that no node runs (not scheduled, or already Succeeded/Failed)."""
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    if not spec.get("nodeName") or status.get("phase") in ("Succeeded", "Failed"):
        return 0
    requested = (options or {}).get("gracePeriodSeconds")
    grace = requested if requested is not None else spec.get("terminationGracePeriodSeconds", 30)
    try:
        return max(0, int(grace))
    except (TypeError, ValueError):
        return 30
