"""Protobuf request bodies (``application/vnd.kubernetes.protobuf``) decoded to JSON objects.

Why: client-go's typed clients send protobuf for built-in kinds. ``kubectl create
namespace|secret|configmap|serviceaccount|role|...`` does, and so does helm's release
storage (a Secret per release revision, created, updated and deleted through the typed
client). Answering 415 breaks both: client-go does not fall back to JSON.

Why not generated code: the message definitions are the ``generated.proto`` files of
``k8s.io/api`` and ``k8s.io/apimachinery``, which no registry reachable from our machines
and CI (PyPI, Debian, npm) ships. So this module decodes the protobuf *wire format*
generically and maps field numbers to JSON names with :data:`SCHEMA`, our own compact
description of the messages those clients send. The field numbers are facts of the
Kubernetes API (protobuf never renumbers a field); ``tools/check-k8s-proto-fields.py``
compares this table with a checkout of the ``generated.proto`` files wherever one can be
fetched, so a typo here shows up there and in the tests that run the real kubectl and
helm against the server.

The envelope (``k8s.io/apimachinery/pkg/runtime``): the 4 bytes ``k8s\\0`` and then a
``runtime.Unknown`` message: typeMeta (apiVersion=1, kind=2), raw=2 (the object's own
message), contentEncoding=3, contentType=4.

Go's protobuf marshalling writes every non-pointer field, including empty strings and
zeros, while its JSON leaves them out (``omitempty``); fields marked ``presence`` are Go
pointers, written only when set, so their zero values are kept.

Responses stay JSON: these clients send ``Accept: application/vnd.kubernetes.protobuf,
application/json`` and decode whatever the response's Content-Type says.
"""

from __future__ import annotations

import base64
import datetime
import json
from dataclasses import dataclass
from typing import Any

from pairvol.localcluster.apiserver_logic import RequestError

MEDIA_TYPE = "application/vnd.kubernetes.protobuf"
MAGIC = b"k8s\x00"


def unsupported(message: str) -> RequestError:
    return RequestError(415, "UnsupportedMediaType", message)


# ---------------------------------------------------------------- schema


@dataclass(frozen=True)
class F:
    """One field: JSON name, wire kind, repeated-ness, Go-pointer presence.

    kind is a scalar (``string``, ``bytes``, ``int``, ``bool``), a message name in
    :data:`SCHEMA`, ``time``/``microtime`` (meta/v1 Time: seconds=1, nanos=2, as RFC 3339),
    ``fields`` (meta/v1 FieldsV1: Raw=1, JSON bytes) or ``map:string``/``map:bytes`` (a
    map<string, X>: repeated entries key=1, value=2).
    """

    name: str
    kind: str
    repeated: bool = False
    presence: bool = False


_META = F("metadata", "ObjectMeta")

SCHEMA: dict[str, dict[int, F]] = {
    # k8s.io/apimachinery/pkg/apis/meta/v1
    "ObjectMeta": {
        1: F("name", "string"),
        2: F("generateName", "string"),
        3: F("namespace", "string"),
        4: F("selfLink", "string"),
        5: F("uid", "string"),
        6: F("resourceVersion", "string"),
        7: F("generation", "int"),
        8: F("creationTimestamp", "time"),
        9: F("deletionTimestamp", "time"),
        10: F("deletionGracePeriodSeconds", "int", presence=True),
        11: F("labels", "map:string"),
        12: F("annotations", "map:string"),
        13: F("ownerReferences", "OwnerReference", repeated=True),
        14: F("finalizers", "string", repeated=True),
        17: F("managedFields", "ManagedFieldsEntry", repeated=True),
    },
    "OwnerReference": {
        1: F("kind", "string"),
        3: F("name", "string"),
        4: F("uid", "string"),
        5: F("apiVersion", "string"),
        6: F("controller", "bool", presence=True),
        7: F("blockOwnerDeletion", "bool", presence=True),
    },
    "ManagedFieldsEntry": {
        1: F("manager", "string"),
        2: F("operation", "string"),
        3: F("apiVersion", "string"),
        4: F("time", "time"),
        6: F("fieldsType", "string"),
        7: F("fieldsV1", "fields"),
        8: F("subresource", "string"),
    },
    "LabelSelector": {
        1: F("matchLabels", "map:string"),
        2: F("matchExpressions", "LabelSelectorRequirement", repeated=True),
    },
    "LabelSelectorRequirement": {
        1: F("key", "string"),
        2: F("operator", "string"),
        3: F("values", "string", repeated=True),
    },
    "DeleteOptions": {
        1: F("gracePeriodSeconds", "int", presence=True),
        2: F("preconditions", "Preconditions"),
        3: F("orphanDependents", "bool", presence=True),
        4: F("propagationPolicy", "string", presence=True),
        5: F("dryRun", "string", repeated=True),
        6: F("ignoreStoreReadErrorWithClusterBreakingPotential", "bool", presence=True),
    },
    "Preconditions": {1: F("uid", "string", presence=True), 2: F("resourceVersion", "string", presence=True)},
    # k8s.io/api/core/v1
    "Namespace": {1: _META, 2: F("spec", "NamespaceSpec"), 3: F("status", "NamespaceStatus")},
    "NamespaceSpec": {1: F("finalizers", "string", repeated=True)},
    "NamespaceStatus": {1: F("phase", "string"), 2: F("conditions", "NamespaceCondition", repeated=True)},
    "NamespaceCondition": {
        1: F("type", "string"),
        2: F("status", "string"),
        4: F("lastTransitionTime", "time"),
        5: F("reason", "string"),
        6: F("message", "string"),
    },
    "Secret": {
        1: _META,
        2: F("data", "map:bytes"),
        3: F("type", "string"),
        4: F("stringData", "map:string"),
        5: F("immutable", "bool", presence=True),
    },
    "ConfigMap": {
        1: _META,
        2: F("data", "map:string"),
        3: F("binaryData", "map:bytes"),
        4: F("immutable", "bool", presence=True),
    },
    "ServiceAccount": {
        1: _META,
        2: F("secrets", "ObjectReference", repeated=True),
        3: F("imagePullSecrets", "LocalObjectReference", repeated=True),
        4: F("automountServiceAccountToken", "bool", presence=True),
    },
    "ObjectReference": {
        1: F("kind", "string"),
        2: F("namespace", "string"),
        3: F("name", "string"),
        4: F("uid", "string"),
        5: F("apiVersion", "string"),
        6: F("resourceVersion", "string"),
        7: F("fieldPath", "string"),
    },
    "LocalObjectReference": {1: F("name", "string")},
    # k8s.io/api/rbac/v1
    "Role": {1: _META, 2: F("rules", "PolicyRule", repeated=True)},
    "ClusterRole": {
        1: _META,
        2: F("rules", "PolicyRule", repeated=True),
        3: F("aggregationRule", "AggregationRule"),
    },
    "PolicyRule": {
        1: F("verbs", "string", repeated=True),
        2: F("apiGroups", "string", repeated=True),
        3: F("resources", "string", repeated=True),
        4: F("resourceNames", "string", repeated=True),
        5: F("nonResourceURLs", "string", repeated=True),
    },
    "AggregationRule": {1: F("clusterRoleSelectors", "LabelSelector", repeated=True)},
    "RoleBinding": {1: _META, 2: F("subjects", "Subject", repeated=True), 3: F("roleRef", "RoleRef")},
    "ClusterRoleBinding": {1: _META, 2: F("subjects", "Subject", repeated=True), 3: F("roleRef", "RoleRef")},
    "Subject": {
        1: F("kind", "string"),
        2: F("apiGroup", "string"),
        3: F("name", "string"),
        4: F("namespace", "string"),
    },
    "RoleRef": {1: F("apiGroup", "string"), 2: F("kind", "string"), 3: F("name", "string")},
    # k8s.io/api/authentication/v1 (kubectl create token)
    "TokenRequest": {1: _META, 2: F("spec", "TokenRequestSpec"), 3: F("status", "TokenRequestStatus")},
    "TokenRequestSpec": {
        1: F("audiences", "string", repeated=True),
        3: F("boundObjectRef", "BoundObjectReference"),
        4: F("expirationSeconds", "int", presence=True),
    },
    "BoundObjectReference": {
        1: F("kind", "string"),
        2: F("apiVersion", "string"),
        3: F("name", "string"),
        4: F("uID", "string"),
    },
    "TokenRequestStatus": {1: F("token", "string"), 2: F("expirationTimestamp", "time")},
    # k8s.io/api/coordination/v1
    "Lease": {1: _META, 2: F("spec", "LeaseSpec")},
    "LeaseSpec": {
        1: F("holderIdentity", "string", presence=True),
        2: F("leaseDurationSeconds", "int", presence=True),
        3: F("acquireTime", "microtime"),
        4: F("renewTime", "microtime"),
        5: F("leaseTransitions", "int", presence=True),
        6: F("strategy", "string", presence=True),
        7: F("preferredHolder", "string", presence=True),
    },
}

# (apiVersion, kind) a client may send -> top-level message. DeleteOptions is sent with
# the group-version of the resource being deleted (or meta.k8s.io/v1).
_DELETE_OPTIONS_VERSIONS = ("v1", "meta.k8s.io/v1", "rbac.authorization.k8s.io/v1", "coordination.k8s.io/v1")
TOP_LEVEL: dict[tuple[str, str], str] = {
    **{("v1", k): k for k in ("Namespace", "Secret", "ConfigMap", "ServiceAccount")},
    **{("rbac.authorization.k8s.io/v1", k): k for k in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")},
    ("coordination.k8s.io/v1", "Lease"): "Lease",
    ("authentication.k8s.io/v1", "TokenRequest"): "TokenRequest",
    **{(v, "DeleteOptions"): "DeleteOptions" for v in _DELETE_OPTIONS_VERSIONS},
}


# ---------------------------------------------------------------- wire format


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("varint longer than 10 bytes")


def fields(buf: bytes) -> list[tuple[int, int, int | bytes]]:
    """A message's (field number, wire type, value) in order; length-delimited as bytes."""
    out: list[tuple[int, int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        value: int | bytes
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise WireError(f"field {number}: length {length} runs past the end")
            value, pos = buf[pos : pos + length], pos + length
        else:
            raise WireError(f"field {number}: unsupported wire type {wire}")
        if pos > len(buf):
            raise WireError(f"field {number}: truncated")
        out.append((number, wire, value))
    return out


def _signed(value: int) -> int:
    """int32/int64 fields are two's complement in 64 bits on the wire."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _rfc3339(seconds: int, nanos: int, micro: bool) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if micro:
        text += f".{nanos // 1000:06d}"
    return text + "Z"


def _scalar(kind: str, wire: int, value: int | bytes, where: str) -> Any:
    if kind in ("string", "bytes"):
        if not isinstance(value, bytes):
            raise WireError(f"{where}: expected a length-delimited {kind}, got wire type {wire}")
        if kind == "bytes":
            return base64.b64encode(value).decode()
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise WireError(f"{where}: string is not UTF-8") from None
    if not isinstance(value, int) or wire != 0:
        raise WireError(f"{where}: expected a varint {kind}, got wire type {wire}")
    return bool(value) if kind == "bool" else _signed(value)


def _zero(value: Any) -> bool:
    return value in ("", 0, False) or value == [] or value == {}


def decode_message(name: str, buf: bytes, where: str = "") -> dict[str, Any]:
    """Decode ``buf`` as message ``name`` of :data:`SCHEMA` into its JSON form."""
    where = where or name
    schema = SCHEMA[name]
    out: dict[str, Any] = {}
    for number, wire, value in fields(buf):
        spec = schema.get(number)
        if spec is None:
            raise WireError(
                f"{where}: field number {number} is not one this server knows; "
                "send the object as JSON (kubectl apply -f / create -f) instead"
            )
        at = f"{where}.{spec.name}"
        decoded: Any
        if spec.kind.startswith("map:"):
            if not isinstance(value, bytes):
                raise WireError(f"{at}: map entry must be length-delimited")
            entry = {n: v for n, _, v in fields(value)}
            key = _scalar("string", 2, entry.get(1, b""), f"{at} key")
            item = _scalar(spec.kind[4:], 2, entry.get(2, b""), f"{at}[{key}]")
            out.setdefault(spec.name, {})[key] = item
            continue
        if spec.kind in ("time", "microtime"):
            if not isinstance(value, bytes):
                raise WireError(f"{at}: expected a Time message")
            parts = {n: v for n, _, v in fields(value)}
            seconds, nanos = parts.get(1, 0), parts.get(2, 0)
            if not isinstance(seconds, int) or not isinstance(nanos, int):
                raise WireError(f"{at}: malformed Time")
            if seconds == 0 and nanos == 0:
                continue  # Go's zero time: null in JSON
            decoded = _rfc3339(_signed(seconds), nanos, spec.kind == "microtime")
        elif spec.kind == "fields":
            if not isinstance(value, bytes):
                raise WireError(f"{at}: expected a FieldsV1 message")
            raw = next((v for n, _, v in fields(value) if n == 1), b"")
            try:
                decoded = json.loads(raw) if isinstance(raw, bytes) and raw else {}
            except ValueError:
                raise WireError(f"{at}: FieldsV1 is not JSON") from None
        elif spec.kind in SCHEMA:
            if not isinstance(value, bytes):
                raise WireError(f"{at}: expected an embedded {spec.kind} message")
            decoded = decode_message(spec.kind, value, at)
        else:
            decoded = _scalar(spec.kind, wire, value, at)
        if spec.repeated:
            out.setdefault(spec.name, []).append(decoded)
        elif spec.presence or not _zero(decoded):
            out[spec.name] = decoded
    return out


# ---------------------------------------------------------------- envelope


def decode_body(body: bytes) -> dict[str, Any]:
    """A protobuf request body (``k8s\\0`` + runtime.Unknown) as the JSON object it encodes.

    Raises a 400 :class:`RequestError` for malformed bytes and a 415 for kinds the
    schema does not describe (saying to send JSON instead).
    """
    if not body.startswith(MAGIC):
        raise RequestError(
            400, "BadRequest", "a protobuf body must start with the 4 bytes 'k8s\\x00' (the Kubernetes envelope)"
        )
    try:
        envelope = {n: v for n, _, v in fields(body[len(MAGIC) :])}
        type_meta = envelope.get(1, b"")
        raw = envelope.get(2, b"")
        encoding = envelope.get(3, b"")
        if not isinstance(type_meta, bytes) or not isinstance(raw, bytes) or not isinstance(encoding, bytes):
            raise WireError("runtime.Unknown fields have the wrong wire types")
        meta = {n: v for n, _, v in fields(type_meta)}
        api_version = _scalar("string", 2, meta.get(1, b""), "typeMeta.apiVersion")
        kind = _scalar("string", 2, meta.get(2, b""), "typeMeta.kind")
    except WireError as exc:
        raise RequestError(400, "BadRequest", f"malformed protobuf envelope: {exc}") from None
    if encoding:
        raise unsupported(f"protobuf contentEncoding {encoding.decode(errors='replace')!r} is not supported")
    message = TOP_LEVEL.get((api_version, kind))
    if message is None:
        known = ", ".join(sorted({f"{k} ({v})" for v, k in TOP_LEVEL if k != "DeleteOptions"}))
        raise unsupported(
            f"this server decodes protobuf bodies of {known} and DeleteOptions only, not {kind} ({api_version}); "
            "send it as JSON instead (kubectl apply -f / kubectl create -f FILE do)"
        )
    try:
        obj = decode_message(message, raw)
    except WireError as exc:
        raise RequestError(400, "BadRequest", f"malformed protobuf {kind}: {exc}") from None
    return {"apiVersion": api_version, "kind": kind, **obj}
