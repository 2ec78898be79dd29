"""The examples in examples/ are what users copy, so they are applied here and never rot.

Each object must be valid for Kubernetes (our ReplicatedVolumes against the CRD, with the
API server's defaults) and acceptable to the operator's own spec validation.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from chart_support import EXAMPLES, load_yaml_docs, our_crds, validate_any

from pairvol.api.spec import parse_spec

EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))


def replicated_volumes() -> dict[str, dict[str, object]]:
    schema = our_crds()[("pairvol.io/v1alpha1", "ReplicatedVolume")]
    out = {}
    for path in EXAMPLE_FILES:
        for obj in load_yaml_docs(path):
            if obj["kind"] == "ReplicatedVolume":
                out[path.name] = schema.validate(obj)
    return out


def test_there_are_examples() -> None:
    names = {p.name for p in EXAMPLE_FILES}
    assert {"basic.yaml", "latest-mode.yaml", "workload.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_is_valid(path: Path) -> None:
    objs = load_yaml_docs(path)
    assert objs, f"{path.name} holds no object"
    for obj in objs:
        validate_any(obj)


def test_replicated_volume_examples_pass_the_operators_validation() -> None:
    volumes = replicated_volumes()
    assert volumes
    for name, obj in volumes.items():
        meta = obj["metadata"]
        assert isinstance(meta, dict)
        parse_spec(obj["spec"], meta["name"])  # type: ignore[arg-type]
        assert name


def test_basic_example_is_the_documented_one() -> None:
    basic = replicated_volumes()["basic.yaml"]
    spec = parse_spec(basic["spec"], "basic")  # type: ignore[arg-type]
    assert spec.size == 256 * 2**20
    assert spec.checkpoint_interval_s == 5
    assert spec.failover_mode == "Checkpoint"


def test_one_example_uses_latest_mode() -> None:
    modes = {
        parse_spec(obj["spec"]).failover_mode  # type: ignore[arg-type]
        for obj in replicated_volumes().values()
    }
    assert modes == {"Checkpoint", "Latest"}
