"""Volume sizes are validated and compared as Kubernetes quantities at admission.

The CRD's pattern and CEL rules (evaluated here by the emulated API server, with
Kubernetes' quantity library) must refuse exactly the sizes the operator's parser
refuses, so a bad size is a 422 on `kubectl apply`, not a volume stuck in phase Failed;
and a size written another way (268435456 for 256Mi) is the same size, not a shrink or a
grow (the size may grow, never shrink).
"""

from __future__ import annotations

from typing import Any

import pytest

from pairvol.api.spec import SpecError, parse_spec
from pairvol.localcluster.apiserver_logic import RequestError
from pairvol.localcluster.cluster import LocalCluster

GROUP, VERSION, PLURAL = "pairvol.io", "v1alpha1", "replicatedvolumes"


def volume(name: str, size: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ReplicatedVolume",
        "metadata": {"name": name},
        "spec": {"size": size},
    }


def admitted(cluster: LocalCluster, size: Any) -> bool:
    try:
        cluster.api.create_object(GROUP, VERSION, PLURAL, volume("probe", size), "default", dry_run=True)
    except RequestError as exc:
        assert exc.code == 422, exc.message
        return False
    return True


@pytest.mark.parametrize("size", ["0", 0, "1e3", "1.5Ki", "500M", "1048577", "100m", "-1Mi", "1Mb", "1.5"])
async def test_sizes_the_operator_would_fail_on_are_refused_at_admission(api_cluster: LocalCluster, size: Any) -> None:
    with pytest.raises(RequestError) as refused:
        api_cluster.api.create_object(GROUP, VERSION, PLURAL, volume("bad", size), "default")
    assert refused.value.code == 422
    assert "spec.size" in refused.value.message


SIZES = (
    "0", "1", "512", "1e3", "1e6", "1.5Ki", "1.5Mi", "1Mi", "+1Mi", "1048576", 1048576, 1048577, "1048577",
    "256Mi", 268435456, "1e9", "1E9", "1G", "500M", "512M", "0.5Gi", "1.25Gi", "2048k", "1Pi", "100m", "1500m",
    "1e30", "1Ei", "9E", "1.", ".5Gi", "1024Ki", "1024.0Ki", "1Mb", "-1Mi", "", "12Q",
)  # fmt: skip


async def test_the_crd_and_the_operators_parser_agree_on_every_size(api_cluster: LocalCluster) -> None:
    disagreements = []
    for size in SIZES:
        try:
            parse_spec({"size": size})
            parser_accepts = True
        except SpecError:
            parser_accepts = False
        if admitted(api_cluster, size) != parser_accepts:
            disagreements.append((size, "operator accepts" if parser_accepts else "operator refuses"))
    assert disagreements == []


async def test_the_same_size_spelled_differently_is_not_a_change(api_cluster: LocalCluster) -> None:
    api = api_cluster.api
    api.create_object(GROUP, VERSION, PLURAL, volume("data", 268435456), "default")
    for spelling in ("256Mi", "262144Ki", "0.25Gi", "268435456"):
        stored = api.get_object(api.resource_type(GROUP, VERSION, PLURAL), "default", "data")
        stored["spec"]["size"] = spelling
        api.update_object(api.resource_type(GROUP, VERSION, PLURAL), "default", "data", stored, None, require_rv=False)

    stored = api.get_object(api.resource_type(GROUP, VERSION, PLURAL), "default", "data")
    stored["spec"]["size"] = "128Mi"
    with pytest.raises(RequestError) as refused:
        api.update_object(api.resource_type(GROUP, VERSION, PLURAL), "default", "data", stored, None, require_rv=False)
    assert refused.value.code == 422
    assert "spec.size may grow but never shrink" in refused.value.message
