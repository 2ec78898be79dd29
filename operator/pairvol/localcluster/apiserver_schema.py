"""Structural-schema handling for custom resources: prune, default, validate.

Why: a real API server prunes fields its CRD schema does not declare, fills defaults and
rejects invalid objects with 422. Mocks accept anything, which hides bugs such as the
operator writing a status field the CRD lacks (it would silently vanish in a real
cluster). This module is pure (no I/O) so it is easy to test and reuse.

Order, as in Kubernetes: prune unknown fields, apply defaults, validate (OpenAPI keywords,
then ``x-kubernetes-validations`` CEL rules, transition rules only when an old value
exists). ``apiVersion``, ``kind`` and ``metadata`` at the root are never pruned.

Supported keywords: type, nullable, properties, additionalProperties, items, required,
enum, pattern, format (date-time, int32, int64), minimum/maximum (+exclusive), minLength,
maxLength, minItems, maxItems, minProperties, maxProperties, uniqueItems,
x-kubernetes-list-type=set and =map (unique keys), multipleOf, allOf/anyOf/oneOf/not (validation only),
x-kubernetes-int-or-string, x-kubernetes-preserve-unknown-fields,
x-kubernetes-embedded-resource, default, x-kubernetes-validations.
"""

from __future__ import annotations

import copy
import datetime
import json
import re
from dataclasses import dataclass
from typing import Any

from pairvol.errors import PairvolError
from pairvol.localcluster.apiserver_cel import ABSENT, CELError, Rule, compile_rule

Schema = dict[str, Any]


class SchemaError(PairvolError):
    """A CRD's schema cannot be used (e.g. a CEL rule this emulator cannot compile)."""


@dataclass(frozen=True)
class FieldError:
    """One validation failure, formatted like Kubernetes' field.Error."""

    path: str
    reason: str  # FieldValueInvalid, FieldValueRequired, FieldValueNotSupported, ...
    detail: str
    value: Any = ABSENT

    def message(self) -> str:
        kinds = {
            "FieldValueInvalid": "Invalid value",
            "FieldValueRequired": "Required value",
            "FieldValueNotSupported": "Unsupported value",
            "FieldValueTypeInvalid": "Invalid value",
            "FieldValueForbidden": "Forbidden",
            "FieldValueDuplicate": "Duplicate value",
            "FieldValueTooLong": "Too long",
        }
        parts = [self.path, kinds.get(self.reason, "Invalid value")]
        if self.value is not ABSENT:
            parts.append(json.dumps(self.value, default=str))
        if self.detail:
            parts.append(self.detail)
        return ": ".join(parts)


_JSON_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
}


def _type_ok(value: Any, schema: Schema) -> bool:
    if schema.get("x-kubernetes-int-or-string"):
        return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
    t = schema.get("type")
    if t is None:
        return True
    if t == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer()
        )
    if t == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    expected = _JSON_TYPES.get(t)
    return expected is None or isinstance(value, expected)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _preserves(schema: Schema) -> bool:
    return bool(schema.get("x-kubernetes-preserve-unknown-fields")) or bool(
        schema.get("x-kubernetes-embedded-resource")
    )


def prune(value: Any, schema: Schema, *, root: bool = False) -> Any:
    """Return ``value`` without the object fields ``schema`` does not declare."""
    if isinstance(value, dict):
        props: dict[str, Schema] = schema.get("properties", {})
        addl = schema.get("additionalProperties")
        out: dict[str, Any] = {}
        for key, item in value.items():
            if root and key in ("apiVersion", "kind", "metadata"):
                out[key] = item
            elif key in props:
                out[key] = prune(item, props[key])
            elif isinstance(addl, dict):
                out[key] = prune(item, addl)
            elif addl is True or _preserves(schema):
                out[key] = item
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune(item, schema["items"]) for item in value]
    return value


def apply_defaults(value: Any, schema: Schema) -> Any:
    """Fill ``default`` for absent object properties, recursively (returns a copy)."""
    if isinstance(value, dict):
        out = dict(value)
        props: dict[str, Schema] = schema.get("properties", {})
        for key, sub in props.items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
            if key in out:
                out[key] = apply_defaults(out[key], sub)
        addl = schema.get("additionalProperties")
        if isinstance(addl, dict):
            for key in out:
                if key not in props:
                    out[key] = apply_defaults(out[key], addl)
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(item, schema["items"]) for item in value]
    return value


_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def _format_ok(value: Any, fmt: str) -> bool:
    if fmt == "date-time" and isinstance(value, str):
        try:
            datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return False
        return "T" in value or " " in value
    if fmt in _INT_RANGES and isinstance(value, int):
        lo, hi = _INT_RANGES[fmt]
        return lo <= value <= hi
    return True


def compile_rules(schema: Schema, path: str = "") -> dict[str, list[tuple[Rule, dict[str, Any]]]]:
    """Compile every CEL rule in ``schema``; raise :class:`SchemaError` on unsupported ones."""
    found: dict[str, list[tuple[Rule, dict[str, Any]]]] = {}

    def walk(s: Schema, p: str) -> None:
        for spec in s.get("x-kubernetes-validations", []) or []:
            try:
                rule = compile_rule(str(spec.get("rule", "")))
            except CELError as exc:
                raise SchemaError(f"{p or '<root>'}.x-kubernetes-validations: {exc}") from None
            found.setdefault(p, []).append((rule, spec))
        for key, sub in (s.get("properties") or {}).items():
            walk(sub, _join(p, key))
        if isinstance(s.get("items"), dict):
            walk(s["items"], p + "[*]")
        if isinstance(s.get("additionalProperties"), dict):
            walk(s["additionalProperties"], p + "[*]")

    walk(schema, path)
    return found


def validate(value: Any, schema: Schema, old: Any = ABSENT, path: str = "") -> list[FieldError]:
    """Validate ``value`` (and transition rules against ``old``); return all errors."""
    errors: list[FieldError] = []
    _validate(value, schema, old, path, errors)
    return errors


def _validate(value: Any, schema: Schema, old: Any, path: str, errors: list[FieldError]) -> None:
    p = path or "<root>"
    if value is None:
        if not schema.get("nullable"):
            errors.append(FieldError(p, "FieldValueTypeInvalid", "must not be null", None))
        return
    if not _type_ok(value, schema):
        int_or_string = schema.get("x-kubernetes-int-or-string")
        expected = "integer or string" if int_or_string else schema.get("type")
        errors.append(FieldError(p, "FieldValueTypeInvalid", f"{p} in body must be of type {expected}", value))
        return
    if "enum" in schema and value not in schema["enum"]:
        supported = ", ".join(json.dumps(v) for v in schema["enum"])
        errors.append(FieldError(p, "FieldValueNotSupported", f"supported values: {supported}", value))
    if isinstance(value, str):
        if "pattern" in schema and re.search(schema["pattern"], value) is None:
            errors.append(FieldError(p, "FieldValueInvalid", f"{p} in body should match '{schema['pattern']}'", value))
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(
                FieldError(p, "FieldValueTooLong", f"may not be more than {schema['maxLength']} bytes", value)
            )
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(
                FieldError(
                    p,
                    "FieldValueInvalid",
                    f"{p} in body should be at least {schema['minLength']} chars long",
                    value,
                )
            )
    if isinstance(value, int | float) and not isinstance(value, bool):
        _check_number(value, schema, p, errors)
    if "format" in schema and not _format_ok(value, schema["format"]):
        errors.append(FieldError(p, "FieldValueInvalid", f"{p} in body must be of type {schema['format']}", value))
    if isinstance(value, dict):
        _validate_object(value, schema, old, path, errors)
    if isinstance(value, list):
        _validate_array(value, schema, old, path, errors)
    _validate_combinators(value, schema, p, errors)
    _validate_rules(value, schema, old, p, errors)


def _check_number(value: float, schema: Schema, p: str, errors: list[FieldError]) -> None:
    if "minimum" in schema:
        lo = schema["minimum"]
        if value < lo or (schema.get("exclusiveMinimum") is True and value == lo):
            op = "greater than" if schema.get("exclusiveMinimum") is True else ("greater than or equal to")
            errors.append(FieldError(p, "FieldValueInvalid", f"{p} in body should be {op} {lo}", value))
    if "maximum" in schema:
        hi = schema["maximum"]
        if value > hi or (schema.get("exclusiveMaximum") is True and value == hi):
            op = "less than" if schema.get("exclusiveMaximum") is True else "less than or equal to"
            errors.append(FieldError(p, "FieldValueInvalid", f"{p} in body should be {op} {hi}", value))
    if "multipleOf" in schema and value % schema["multipleOf"] != 0:
        errors.append(
            FieldError(
                p,
                "FieldValueInvalid",
                f"{p} in body should be a multiple of {schema['multipleOf']}",
                value,
            )
        )


def _validate_object(value: dict[str, Any], schema: Schema, old: Any, path: str, errors: list[FieldError]) -> None:
    for req in schema.get("required", []) or []:
        if req not in value:
            errors.append(FieldError(_join(path, req), "FieldValueRequired", ""))
    props: dict[str, Schema] = schema.get("properties", {}) or {}
    addl = schema.get("additionalProperties")
    old_map = old if isinstance(old, dict) else {}
    for key, item in value.items():
        sub = props.get(key, addl if isinstance(addl, dict) else None)
        if sub is not None:
            _validate(item, sub, old_map.get(key, ABSENT), _join(path, key), errors)
    n = len(value)
    p = path or "<root>"
    if "maxProperties" in schema and n > schema["maxProperties"]:
        errors.append(FieldError(p, "FieldValueTooMany", f"must have at most {schema['maxProperties']} items"))
    if "minProperties" in schema and n < schema["minProperties"]:
        errors.append(
            FieldError(
                p,
                "FieldValueInvalid",
                f"{p} in body should have at least {schema['minProperties']} properties",
            )
        )


def _validate_array(value: list[Any], schema: Schema, old: Any, path: str, errors: list[FieldError]) -> None:
    items = schema.get("items")
    if isinstance(items, dict):
        for i, item in enumerate(value):
            # Transition rules inside lists apply only to map-type lists in Kubernetes;
            # here list items never get an old value (rules referencing oldSelf are skipped).
            _validate(item, items, ABSENT, f"{path}[{i}]", errors)
    p = path or "<root>"
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        errors.append(FieldError(p, "FieldValueTooMany", f"must have at most {schema['maxItems']} items"))
    if "minItems" in schema and len(value) < schema["minItems"]:
        errors.append(
            FieldError(p, "FieldValueInvalid", f"{p} in body should have at least {schema['minItems']} items")
        )
    if schema.get("x-kubernetes-list-type") == "map":
        keys = schema.get("x-kubernetes-list-map-keys") or []
        seen_keys: list[tuple[Any, ...]] = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                continue
            key_value = tuple(item.get(k) for k in keys)
            if key_value in seen_keys:
                errors.append(FieldError(f"{path}[{i}]", "FieldValueDuplicate", "", {k: item.get(k) for k in keys}))
            seen_keys.append(key_value)
    if schema.get("uniqueItems") or schema.get("x-kubernetes-list-type") == "set":
        seen: list[str] = []
        for i, item in enumerate(value):
            key = json.dumps(item, sort_keys=True)
            if key in seen:
                errors.append(FieldError(f"{path}[{i}]", "FieldValueDuplicate", "", item))
            seen.append(key)


def _validate_combinators(value: Any, schema: Schema, p: str, errors: list[FieldError]) -> None:
    for sub in schema.get("allOf", []) or []:
        _validate(value, sub, ABSENT, p, errors)
    if schema.get("anyOf") and all(validate(value, sub, path=p) for sub in schema["anyOf"]):
        errors.append(FieldError(p, "FieldValueInvalid", "must validate at least one schema (anyOf)", value))
    if schema.get("oneOf"):
        matches = sum(1 for sub in schema["oneOf"] if not validate(value, sub, path=p))
        if matches != 1:
            errors.append(FieldError(p, "FieldValueInvalid", "must validate one and only one schema (oneOf)", value))
    if isinstance(schema.get("not"), dict) and not validate(value, schema["not"], path=p):
        errors.append(FieldError(p, "FieldValueInvalid", "must not validate the schema (not)", value))


def _validate_rules(value: Any, schema: Schema, old: Any, p: str, errors: list[FieldError]) -> None:
    for spec in schema.get("x-kubernetes-validations", []) or []:
        source = str(spec.get("rule", ""))
        try:
            rule = compile_rule(source)
            if rule.transition and old is ABSENT:
                continue  # transition rules only run on update, with an old value
            ok = rule.evaluate(value, old)
        except CELError as exc:
            errors.append(FieldError(p, "FieldValueInvalid", f"rule {source!r} failed: {exc}"))
            continue
        if not ok:
            message = spec.get("message") or f"failed rule: {source}"
            field_path = spec.get("fieldPath")
            where = _join(p, field_path.lstrip(".")) if field_path else p
            reason = {
                "FieldValueForbidden": "FieldValueForbidden",
                "FieldValueRequired": "FieldValueRequired",
                "FieldValueDuplicate": "FieldValueDuplicate",
            }.get(spec.get("reason", ""), "FieldValueInvalid")
            errors.append(FieldError(where, reason, message, value))


def process(obj: dict[str, Any], schema: Schema, old: dict[str, Any] | None) -> tuple[dict[str, Any], list[FieldError]]:
    """Prune, default and validate a whole custom resource against its version's schema."""
    pruned = prune(obj, schema, root=True)
    defaulted = apply_defaults(pruned, schema)
    root_schema = dict(schema)
    root_props = dict(root_schema.get("properties", {}) or {})
    # metadata is validated by the server itself, never by the CRD's schema.
    root_props.pop("metadata", None)
    root_schema["properties"] = root_props
    errors = validate(defaulted, root_schema, ABSENT if old is None else old)
    return defaulted, errors


def unknown_fields(value: Any, schema: Schema, path: str = "", *, root: bool = False) -> list[str]:
    """Paths of the fields :func:`prune` would drop (for ``fieldValidation=Strict|Warn``)."""
    found: list[str] = []
    if isinstance(value, dict):
        props: dict[str, Schema] = schema.get("properties", {}) or {}
        addl = schema.get("additionalProperties")
        for key, item in value.items():
            sub_path = _join(path, key)
            if root and key in ("apiVersion", "kind", "metadata"):
                continue
            if key in props:
                found += unknown_fields(item, props[key], sub_path)
            elif isinstance(addl, dict):
                found += unknown_fields(item, addl, sub_path)
            elif not (addl is True or _preserves(schema)):
                found.append(sub_path)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found
