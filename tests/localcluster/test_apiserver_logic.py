"""The pure rules of the emulated API server: CEL, schema handling, selectors, patches."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pairvol.localcluster.apiserver_cel import ABSENT, CELError, compile_rule
from pairvol.localcluster.apiserver_logic import (
    RequestError,
    json_patch,
    jsonpath_value,
    merge_patch,
    parse_field_selector,
    parse_label_selector,
    parse_resource_path,
    scale_of,
    scaled,
    selector_matches,
    strategic_merge_patch,
)
from pairvol.localcluster.apiserver_schema import apply_defaults, process, prune, unknown_fields
from pairvol.localcluster.apiserver_store import ObjectStore

# ------------------------------------------------------------------------------ CEL


@pytest.mark.parametrize(
    ("rule", "value", "old", "expected"),
    [
        ("self == oldSelf", "64Mi", "64Mi", True),
        ("self == oldSelf", "1Gi", "64Mi", False),
        ("!self.contains('/../') && !self.endsWith('/..')", "/var/lib/x", ABSENT, True),
        ("!self.contains('/../') && !self.endsWith('/..')", "/var/../etc", ABSENT, False),
        ("self.min <= self.max", {"min": 1, "max": 2}, ABSENT, True),
        ("has(self.a) ? self.a > 0 : true", {}, ABSENT, True),
        ("has(self.a) ? self.a > 0 : true", {"a": 0}, ABSENT, False),
        (
            "size(self.nodes) <= 2 && self.nodes.all(n, n.startsWith('node-'))",
            {"nodes": ["node-1", "node-2"]},
            ABSENT,
            True,
        ),
        ("self.nodes.exists(n, n == 'x')", {"nodes": ["a"]}, ABSENT, False),
        ("self.nodes.exists_one(n, n in ['a', 'b'])", {"nodes": ["a", "c"]}, ABSENT, True),
        ("self.name.matches('^[a-z]+$') || self.n % 2 == 1", {"name": "A", "n": 3}, ABSENT, True),
        ("int(self.s) + 1 == 3 && string(self.b) == 'true'", {"s": "2", "b": True}, ABSENT, True),
    ],
)
def test_cel_rules_evaluate_like_kubernetes(rule: str, value: Any, old: Any, expected: bool) -> None:
    assert compile_rule(rule).evaluate(value, old) is expected


def test_transition_rules_are_recognised() -> None:
    assert compile_rule("self == oldSelf").transition
    assert not compile_rule("self > 0").transition


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("self.quantity('1')", "method quantity() is not supported"),
        ("isSorted(self)", "function isSorted() is not supported"),
        ("self ==", "unexpected 'end of rule'"),
        ("self @ 1", "unexpected character '@'"),
    ],
)
def test_unsupported_cel_fails_at_compile_time(rule: str, message: str) -> None:
    with pytest.raises(CELError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compile_rule(rule)


def test_cel_errors_at_runtime_name_the_problem() -> None:
    with pytest.raises(CELError, match="no such key: missing"):
        compile_rule("self.missing == 1").evaluate({})


# ------------------------------------------------------------------------------ schema

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "spec": {
            "type": "object",
            "required": ["size"],
            "properties": {
                "size": {"x-kubernetes-int-or-string": True, "pattern": "^[0-9]+(Mi|Gi)?$", "minimum": 1},
                "mode": {"type": "string", "enum": ["A", "B"], "default": "A"},
                "opts": {
                    "type": "object",
                    "default": {},
                    "properties": {"n": {"type": "integer", "default": 10, "maximum": 20}},
                },
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "when": {"type": "string", "format": "date-time"},
                "list": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
            },
        },
    },
}


def obj(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "x/v1", "kind": "X", "metadata": {"name": "n"}, "spec": spec}


def messages(value: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    return [e.message() for e in process(value, SCHEMA, old)[1]]


def test_pruning_keeps_declared_preserved_and_map_fields_only() -> None:
    value = obj(size=1, junk=1, free={"any": {"thing": 1}}, labels={"a": "b"}, opts={"n": 1, "x": 2})
    value["status"] = {"x": 1}
    pruned = prune(value, SCHEMA, root=True)
    assert pruned["spec"] == {"size": 1, "free": {"any": {"thing": 1}}, "labels": {"a": "b"}, "opts": {"n": 1}}
    assert "status" not in pruned and pruned["metadata"] == {"name": "n"}
    assert unknown_fields(value, SCHEMA, root=True) == ["spec.junk", "spec.opts.x", "status"]


def test_defaults_fill_nested_objects() -> None:
    assert apply_defaults(obj(size=1), SCHEMA)["spec"] == {"size": 1, "mode": "A", "opts": {"n": 10}}


def test_validation_messages_name_the_field_and_the_rule() -> None:
    assert messages(obj(size="1Ki")) == [
        "spec.size: Invalid value: \"1Ki\": spec.size in body should match '^[0-9]+(Mi|Gi)?$'"
    ]
    assert messages(obj(size=0)) == [
        "spec.size: Invalid value: 0: spec.size in body should be greater than or equal to 1"
    ]
    assert messages(obj(size=True)) == [
        "spec.size: Invalid value: true: spec.size in body must be of type integer or string"
    ]
    assert messages(obj(size=1, mode="C")) == ['spec.mode: Unsupported value: "C": supported values: "A", "B"']
    assert messages(obj(size=1, opts={"n": 21})) == [
        "spec.opts.n: Invalid value: 21: spec.opts.n in body should be less than or equal to 20"
    ]
    assert messages(obj(size=1, when="yesterday")) == [
        'spec.when: Invalid value: "yesterday": spec.when in body must be of type date-time'
    ]
    assert messages(obj(size=1, list=["a", "a"])) == ['spec.list[1]: Duplicate value: "a"']
    assert messages(obj()) == ["spec.size: Required value"]
    assert messages(obj(size=1, when="2024-01-01T00:00:00Z", list=["a"])) == []


# ------------------------------------------------------------------------------ selectors


def labelled(**labels: str) -> dict[str, Any]:
    return {"metadata": {"name": "p", "labels": labels}, "spec": {"nodeName": "node-1"}}


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("a=1", {"a": "1"}, True),
        ("a==1", {"a": "2"}, False),
        ("a!=1", {}, True),
        ("a in (1, 2),b", {"a": "2", "b": ""}, True),
        ("a notin (1,2)", {"a": "1"}, False),
        ("!a", {"b": "1"}, True),
        ("", {"a": "1"}, True),
    ],
)
def test_label_selectors(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert selector_matches(labelled(**labels), parse_label_selector(selector), []) is expected


def test_field_selectors_compare_dotted_paths() -> None:
    fields = parse_field_selector("spec.nodeName=node-1,metadata.name!=q")
    assert selector_matches(labelled(), [], fields)
    assert not selector_matches(labelled(), [], parse_field_selector("spec.nodeName=node-2"))
    with pytest.raises(RequestError, match="invalid fieldSelector"):
        parse_field_selector("spec.nodeName in (a)")


# ------------------------------------------------------------------------------ patches

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=10,
)
DOCS = st.dictionaries(st.text(max_size=3), JSON, max_size=4)


@given(DOCS, DOCS)
def test_merge_patch_is_idempotent(target: dict[str, Any], patch: dict[str, Any]) -> None:
    once = merge_patch(target, patch)
    assert merge_patch(once, patch) == once


def test_merge_patch_deletes_with_null() -> None:
    assert merge_patch({"a": {"b": 1, "c": 2}}, {"a": {"b": None}, "d": [1]}) == {"a": {"c": 2}, "d": [1]}


def test_json_patch_operations_and_failures() -> None:
    doc = {"metadata": {"finalizers": ["a", "b"]}, "spec": {"x": 1}}
    assert json_patch(
        doc,
        [
            {"op": "test", "path": "/spec/x", "value": 1},
            {"op": "remove", "path": "/metadata/finalizers/0"},
            {"op": "add", "path": "/metadata/finalizers/-", "value": "c"},
            {"op": "replace", "path": "/spec/x", "value": 2},
            {"op": "copy", "from": "/spec/x", "path": "/spec/y"},
            {"op": "move", "from": "/spec/y", "path": "/spec/z"},
        ],
    ) == {"metadata": {"finalizers": ["b", "c"]}, "spec": {"x": 2, "z": 2}}
    assert doc["spec"] == {"x": 1}, "the input is not modified"
    with pytest.raises(RequestError, match="test failed"):
        json_patch(doc, [{"op": "test", "path": "/spec/x", "value": 2}])
    with pytest.raises(RequestError, match="missing path: /spec/nope"):
        json_patch(doc, [{"op": "replace", "path": "/spec/nope", "value": 2}])


def test_strategic_merge_patch_merges_containers_by_name() -> None:
    pod = {
        "spec": {
            "containers": [{"name": "a", "image": "1", "args": ["x"]}, {"name": "b", "image": "1"}],
            "tolerations": [{"key": "t"}],
        },
        "metadata": {"finalizers": ["f1"]},
    }
    patch = {
        "spec": {
            "$setElementOrder/containers": [{"name": "a"}, {"name": "b"}],
            "containers": [{"name": "a", "image": "2"}, {"name": "b", "$patch": "delete"}],
            "tolerations": [{"key": "u"}],
        },
        "metadata": {"finalizers": ["f2"]},
    }
    assert strategic_merge_patch(pod, patch) == {
        "spec": {"containers": [{"name": "a", "image": "2", "args": ["x"]}], "tolerations": [{"key": "u"}]},
        "metadata": {"finalizers": ["f1", "f2"]},
    }


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/api/v1/namespaces", ("", "v1", "namespaces", None, None, None)),
        ("/api/v1/namespaces/default", ("", "v1", "namespaces", None, "default", None)),
        ("/api/v1/namespaces/default/pods/p/status", ("", "v1", "pods", "default", "p", "status")),
        (
            "/apis/pairvol.io/v1alpha1/namespaces/ns/replicatedvolumes",
            ("pairvol.io", "v1alpha1", "replicatedvolumes", "ns", None, None),
        ),
        ("/api/v1/nodes/node-1/status", ("", "v1", "nodes", None, "node-1", "status")),
        ("/apis/kopf.dev/v1", ("kopf.dev", "v1", None, None, None, None)),
    ],
)
def test_resource_paths(path: str, expected: tuple[str | None, ...]) -> None:
    parsed = parse_resource_path(path)
    assert parsed is not None
    assert (parsed.group, parsed.version, parsed.plural, parsed.namespace, parsed.name, parsed.subresource) == expected


def test_non_resource_paths_are_not_parsed() -> None:
    assert parse_resource_path("/version") is None
    assert parse_resource_path("/apis") is None


def test_printer_column_jsonpath() -> None:
    node = {
        "status": {
            "conditions": [{"type": "MemoryPressure", "status": "False"}, {"type": "Ready", "status": "True"}],
            "addresses": [{"address": "10.0.0.1"}],
        }
    }
    assert jsonpath_value(node, '.status.conditions[?(@.type=="Ready")].status') == "True"
    assert jsonpath_value(node, ".status.addresses[0].address") == "10.0.0.1"
    assert jsonpath_value(node, ".status.addresses[3].address") is None
    assert jsonpath_value(node, ".spec.missing") is None


def test_the_object_store_applies_the_write_rules_without_http() -> None:
    store = ObjectStore()
    lease = store.create_object("coordination.k8s.io", "v1", "leases", {"metadata": {"name": "l"}}, "default")
    rtype = store.resource_type("coordination.k8s.io", "v1", "leases")
    updated = store.update_object(rtype, "default", "l", {**lease, "spec": {"holderIdentity": "a"}}, None,
                                  require_rv=True)  # fmt: skip
    assert updated["metadata"]["generation"] == 2
    assert int(updated["metadata"]["resourceVersion"]) > int(lease["metadata"]["resourceVersion"])
    with pytest.raises(RequestError, match="the object has been modified") as conflict:
        store.update_object(rtype, "default", "l", {**lease, "spec": {"holderIdentity": "b"}}, None, require_rv=True)
    assert conflict.value.code == 409
    with pytest.raises(RequestError, match='namespaces "nope" not found'):
        store.create_object("coordination.k8s.io", "v1", "leases", {"metadata": {"name": "l"}}, "nope")



def test_a_scale_sets_only_replicas_refuses_stale_versions_and_bad_numbers() -> None:
    deploy = {
        "metadata": {"name": "web", "namespace": "default", "resourceVersion": "7", "labels": {"a": "b"}},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web", "tier": "front"}}, "paused": True},
        "status": {"replicas": 2},
    }
    scale = scale_of(deploy)
    assert scale["spec"] == {"replicas": 2}
    assert scale["status"] == {"replicas": 2, "selector": "app=web,tier=front"}
    assert "labels" not in scale["metadata"]
    out = scaled(deploy, {**scale, "spec": {"replicas": 4}})
    assert out["spec"] == {**deploy["spec"], "replicas": 4} and deploy["spec"]["replicas"] == 2
    with pytest.raises(RequestError, match="the object has been modified") as stale:
        scaled(deploy, {"metadata": {"resourceVersion": "6"}, "spec": {"replicas": 4}})
    assert stale.value.code == 409
    assert scaled(deploy, {"spec": {}})["spec"]["replicas"] == 0, "an omitted int32 is zero"
    expressions = {"matchLabels": {"app": "web"}, "matchExpressions": [
        {"key": "tier", "operator": "In", "values": ["front", "edge"]},
        {"key": "canary", "operator": "DoesNotExist"},
    ]}  # fmt: skip
    selector = scale_of({**deploy, "spec": {"selector": expressions}})["status"]["selector"]
    assert selector == "app=web,tier in (front,edge),!canary"
    for bad in (-1, "3", None, True):
        with pytest.raises(RequestError, match=r"spec\.replicas: Invalid value") as invalid:
            scaled(deploy, {"spec": {"replicas": bad}})
        assert invalid.value.code == 422
