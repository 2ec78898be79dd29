"""Specification of the CRDs: what the API server will accept, default and show.

crds/ is the source of truth and the chart ships byte-identical copies. The ReplicatedVolume
schema must hold exactly the status the operator writes (FULL_STATUS below), because the
API server silently prunes anything else.
"""

from __future__ import annotations

from typing import Any

import pytest
from chart_support import CHART, CRDS, CRDSchema, load_yaml_docs, validate_builtin

from pairvol.agent.validate import MAX_SIZE  # the largest volume an agent serves

RV_CRD = CRDS / "replicatedvolumes.yaml"


def rv_schema() -> CRDSchema:
    (crd,) = load_yaml_docs(RV_CRD)
    return CRDSchema(crd, "v1alpha1")


def rv(spec: dict[str, Any], status: dict[str, Any] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "pairvol.io/v1alpha1",
        "kind": "ReplicatedVolume",
        "metadata": {"name": "data", "namespace": "default"},
        "spec": spec,
    }
    if status is not None:
        obj["status"] = status
    return obj


# The full status the operator writes: every field, with realistic values.
FULL_STATUS: dict[str, Any] = {
    "phase": "Replicating",
    "message": "replicating from node-a to node-b",
    "epoch": 3,
    "observedGeneration": 2,
    "primary": {
        "node": "node-a",
        "pod": "data-3-0",
        "state": "replicating",
        "address": "10.0.0.5:7800",
    },
    "secondary": {
        "node": "node-b",
        "pod": "data-3-1",
        "state": "running",
        "address": "10.0.0.6:7800",
        "outOfSync": False,
        "synced": True,
    },
    "checkpoint": {"id": 42, "time": "2026-11-26T10:00:00Z", "durationMs": 3.5},
    "lastFailover": {
        "time": "2026-11-26T09:00:00.123456Z",
        "from": "node-c",
        "to": "node-a",
        "mode": "Latest",
        "durationMs": 812.0,
        "reason": "primary pod deleted",
    },
    "lastRestart": {
        "time": "2026-11-26T09:05:00.000000Z",
        "pod": "basic-7-a",
        "node": "node-a",
        "epoch": 8,
        "reason": "primary basic-7-a lost its lease",
        "secondary": "basic-6-b",
        "secondaryInSync": True,
    },
    "sync": {
        "kind": "bitmap",
        "reason": "the peer's disk lacks at most the regions written since it was dropped",
        "progress": 0.5,
        "doneBytes": 134217728,
        "totalBytes": 268435456,
        "comparedBytes": 1073741824,
        "summary": "bitmap 50% (128 MiB to go)",
    },
    "lastSync": {
        "kind": "full",
        "reason": "requested",
        "copiedBytes": 268435456,
        "seconds": 2.5,
        "time": "2026-01-01T00:00:00.000000Z",
    },
    "endpoint": {
        "node": "node-a",
        "socket": "/var/lib/pairvol/data/export.sock",
        "service": "data.default.svc",
        "port": 7802,
        "exportName": "volume",
    },
    "conditions": [
        {
            "type": "Ready",
            "status": "True",
            "reason": "Replicating",
            "message": "ok",
            "lastTransitionTime": "2026-11-26T10:00:00Z",
            "observedGeneration": 2,
        }
    ],
    "dataNodes": ["node-a", "node-b", "node-c"],
    "size": 268435456,
}


def leaf_paths(schema: dict[str, Any], prefix: str = "") -> set[str]:
    props = schema.get("properties")
    if not props:
        items = schema.get("items")
        if isinstance(items, dict) and items.get("properties"):
            return leaf_paths(items, prefix + "[]")
        return {prefix}
    out: set[str] = set()
    for key, sub in props.items():
        out |= leaf_paths(sub, f"{prefix}.{key}" if prefix else key)
    return out


def value_paths(value: Any, prefix: str = "") -> set[str]:
    if isinstance(value, dict):
        out: set[str] = set()
        for k, v in value.items():
            out |= value_paths(v, f"{prefix}.{k}" if prefix else k)
        return out
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return value_paths(value[0], prefix + "[]")
    return {prefix}


def test_chart_ships_the_very_same_crd_files() -> None:
    ours = sorted(p.name for p in CRDS.glob("*.yaml"))
    shipped = sorted(p.name for p in (CHART / "crds").glob("*"))
    assert ours == shipped, "charts/pairvol/crds/ must hold exactly the files of crds/ (copy them)"
    for name in ours:
        assert (CHART / "crds" / name).read_bytes() == (CRDS / name).read_bytes(), (
            f"charts/pairvol/crds/{name} differs from crds/{name}: cp crds/{name} charts/pairvol/crds/"
        )
        assert not (CHART / "crds" / name).is_symlink(), "helm package does not keep symlinks"


@pytest.mark.parametrize("path", sorted(CRDS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_crd_is_a_valid_kubernetes_object(path: Any) -> None:
    for crd in load_yaml_docs(path):
        validate_builtin(crd)


def test_replicatedvolume_names_and_scope() -> None:
    (crd,) = load_yaml_docs(RV_CRD)
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "replicatedvolumes.pairvol.io"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["plural"] == "replicatedvolumes"
    assert spec["names"]["shortNames"] == ["rv"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


def test_status_schema_holds_exactly_what_the_operator_writes() -> None:
    schema = rv_schema()
    status_schema = schema.openapi["properties"]["status"]
    assert leaf_paths(status_schema) == value_paths(FULL_STATUS), "schema and written status differ"
    schema.validate(rv({"size": "1Gi"}, FULL_STATUS))


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        (("phase",), "Running"),
        (("conditions", 0, "status"), "yes"),
        (("lastFailover", "mode"), "checkpoint"),
        (("checkpoint", "time"), "yesterday"),
        (("sync", "progress"), 1.5),
        (("secondary", "outOfSync"), "no"),
        (("primary", "zone"), "eu-1"),
    ],
)
def test_status_rejects_values_outside_the_contract(path: tuple[Any, ...], bad: Any) -> None:
    import copy

    status = copy.deepcopy(FULL_STATUS)
    target: Any = status
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = bad
    assert rv_schema().errors(rv({"size": "1Gi"}, status)), f"status.{path} = {bad!r} was accepted"


def test_spec_defaults_are_filled_in_like_the_api_server_does() -> None:
    obj = rv_schema().validate(rv({"size": "256Mi"}))
    assert obj["spec"] == {
        "size": "256Mi",
        "checkpoint": {"intervalSeconds": 10},
        "failover": {"automatic": True, "mode": "Checkpoint", "gracePeriodSeconds": 3},
        "replication": {"peerTimeoutSeconds": 5},
        "storage": {"hostPath": "/var/lib/pairvol"},
        "reclaimPolicy": "Retain",
    }


@pytest.mark.parametrize(
    "spec",
    [
        {"size": "1Gi"},
        {"size": 1073741824},
        {"size": "512M"},
        {"size": "1e9"},
        {"size": "64Mi", "nodes": ["node-a", "node-b"], "nodeSelector": {"disk": "ssd"}},
        {
            "size": "64Mi",
            "checkpoint": {"intervalSeconds": 0},
            "failover": {"mode": "Latest", "automatic": False},
        },
        {"size": "64Mi", "storage": {"hostPath": "/mnt/fast/pairvol"}, "reclaimPolicy": "Delete"},
    ],
)
def test_spec_accepts(spec: dict[str, Any]) -> None:
    rv_schema().validate(rv(spec))


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"size": "-1Gi"},
        {"size": "1GB"},
        {"size": "lots"},
        {"size": 0},
        {"size": True},
        {"size": "1Gi", "nodes": ["node-a", "node-a"]},
        {"size": "1Gi", "nodes": ["Node_A"]},
        {"size": "1Gi", "checkpoint": {"intervalSeconds": -1}},
        {"size": "1Gi", "failover": {"mode": "latest"}},
        {"size": "1Gi", "failover": {"gracePeriodSeconds": "3s"}},
        {"size": "1Gi", "replication": {"peerTimeoutSeconds": 0}},
        {"size": "1Gi", "storage": {"hostPath": "var/lib/pairvol"}},
        {"size": "1Gi", "reclaimPolicy": "Recycle"},
        {"size": "1Gi", "replicas": 3},
    ],
    ids=repr,
)
def test_spec_rejects(spec: dict[str, Any]) -> None:
    errors = rv_schema().errors(rv(spec))
    assert errors, f"spec {spec!r} was accepted"


def test_size_and_host_path_carry_their_cel_rules() -> None:
    spec_props = rv_schema().openapi["properties"]["spec"]["properties"]
    # Evaluated by the emulated API server: tests/localcluster/test_apiserver_quantities.py.
    size_rules = spec_props["size"]["x-kubernetes-validations"]
    assert [r["message"].split(";")[0] for r in size_rules] == [
        "spec.size must be a whole number of bytes, a multiple of 512 and at least 1Mi (e.g. 64Mi, 10Gi, 1G)",
        "spec.size must be at most 1Pi, the largest volume an agent serves",
        "spec.size may grow but never shrink (the end of the file system or data on the volume would be cut off)",
    ]
    assert "compareTo(quantity(string(oldSelf))) >= 0" in size_rules[2]["rule"], "compared as quantities"
    rules = [r["rule"] for r in spec_props["storage"]["properties"]["hostPath"]["x-kubernetes-validations"]]
    assert rules == ["!self.contains('/../') && !self.endsWith('/..')", "self == oldSelf"]


def test_printer_columns_point_at_fields_of_the_schema() -> None:
    (crd,) = load_yaml_docs(RV_CRD)
    version = crd["spec"]["versions"][0]
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    default_columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert default_columns == ["Phase", "Primary", "Secondary", "Checkpoint", "Sync", "Age"]
    assert columns["Sync"]["jsonPath"] == ".status.sync.summary", "kind, percent and bytes to go of a resync"
    assert columns["Checkpoint"]["type"] == "date", "kubectl shows a date column as its age"
    assert columns["Checkpoint"]["jsonPath"] == ".status.checkpoint.time"
    paths = leaf_paths(version["schema"]["openAPIV3Schema"])
    for column in columns.values():
        path = column["jsonPath"].lstrip(".")
        if path.startswith("metadata."):
            continue
        assert path in paths, f"printer column {column['name']} shows {path}, which the schema lacks"


def test_schema_is_structural() -> None:
    """Every node has a type, except int-or-string and free-form (preserve-unknown) nodes."""

    def walk(node: dict[str, Any], where: str) -> None:
        if node.get("x-kubernetes-int-or-string"):
            assert node.get("anyOf") == [{"type": "integer"}, {"type": "string"}], where
            assert "type" not in node, where
            return
        assert "type" in node, f"{where} has no type"
        for key, sub in node.get("properties", {}).items():
            walk(sub, f"{where}.{key}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{where}[]")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{where}{{}}")

    for path in sorted(CRDS.glob("*.yaml")):
        for crd in load_yaml_docs(path):
            for v in crd["spec"]["versions"]:
                walk(v["schema"]["openAPIV3Schema"], f"{crd['metadata']['name']}/{v['name']}")


def test_cel_rules_compile_and_mean_what_they_say() -> None:
    """Evaluated with the CEL subset of the local API server (pairvol.localcluster)."""
    from pairvol.localcluster.apiserver_cel import compile_rule

    spec_props = rv_schema().openapi["properties"]["spec"]["properties"]
    valid_rule, limit_rule, grow_rule = spec_props["size"]["x-kubernetes-validations"]
    valid = compile_rule(valid_rule["rule"])
    assert valid.evaluate("1Gi") and valid.evaluate(1 << 30) and valid.evaluate("1G")
    assert not valid.evaluate("0") and not valid.evaluate("1.5Ki") and not valid.evaluate("500M")
    limit = compile_rule(limit_rule["rule"])
    assert limit.evaluate("1Pi") and limit.evaluate(MAX_SIZE) and limit.evaluate("1Gi")
    assert not limit.evaluate(MAX_SIZE + 512) and not limit.evaluate("2Pi") and not limit.evaluate("1e30")
    assert limit.evaluate("lots"), "not a quantity: refused by the first rule, not an evaluation error"
    grows = compile_rule(grow_rule["rule"])
    assert grows.evaluate("1Gi", "1Gi")
    assert grows.evaluate(1024, 1024)
    assert grows.evaluate(268435456, "256Mi"), "the same size spelled differently"
    assert grows.evaluate("2Gi", "1Gi"), "a volume may grow"
    assert not grows.evaluate("1Gi", "2Gi"), "a volume never shrinks"
    assert not grows.evaluate("1Gi", "1Pi"), "1Pi itself is a size a volume can have"
    # a size beyond the limit was never applied (no agent takes it): the way back from it
    assert grows.evaluate("1Pi", "2Pi") and grows.evaluate("10Gi", str(MAX_SIZE + 512))
    path_rule, same_path = spec_props["storage"]["properties"]["hostPath"]["x-kubernetes-validations"]
    no_dotdot = compile_rule(path_rule["rule"])
    assert no_dotdot.evaluate("/var/lib/pairvol")
    assert no_dotdot.evaluate("/srv/my..volumes")
    assert not no_dotdot.evaluate("/var/lib/../../etc")
    assert not no_dotdot.evaluate("/var/lib/..")
    unchanged = compile_rule(same_path["rule"])
    assert unchanged.evaluate("/srv/pairvol", "/srv/pairvol")
    assert not unchanged.evaluate("/data", "/srv/pairvol"), "the replicas' files stay under the old path"


@pytest.mark.parametrize("size", [MAX_SIZE - 512, MAX_SIZE, MAX_SIZE + 512, 2 * MAX_SIZE])
def test_admission_takes_exactly_the_sizes_an_agent_takes(size: int) -> None:
    """A size admitted but refused by the agent starts pods that exit at once, or a grow whose
    secondary refuses the resize after the primary let it go (a detach and resync, forever)."""
    from pairvol.agent.validate import InvalidInput, parse_size
    from pairvol.localcluster.apiserver_cel import compile_rule

    try:
        parse_size(size)
        agent_takes = True
    except InvalidInput:
        agent_takes = False
    rules = rv_schema().openapi["properties"]["spec"]["properties"]["size"]["x-kubernetes-validations"]
    admitted = all(compile_rule(r["rule"]).evaluate(str(size)) for r in rules if "oldSelf" not in r["rule"])
    assert admitted == agent_takes
