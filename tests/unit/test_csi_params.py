"""The CSI driver's pure rules: capacity rounding, StorageClass parameters, access modes,
what makes a repeated CreateVolume the same request, volume IDs, mountinfo."""

from __future__ import annotations

import pytest

from pairvol.csi.attach import device_users, lineage_names, mount_points
from pairvol.csi.params import (
    DEFAULT_SIZE,
    MIB,
    Capability,
    CapacityError,
    ParameterError,
    capability_problem,
    fits,
    parse_volume_id,
    pinned_to_lineage,
    replication_problem,
    same_request,
    topology_nodes,
    volume_context,
    volume_id,
    volume_request,
    volume_size,
)

NAME = "pvc-0b7e9d2c-4f51-4b8e-9a43-1f6a5c1d2e3f"


@pytest.mark.parametrize(
    ("required", "limit", "size"),
    [
        (1, 0, MIB),  # at least 1 MiB
        (MIB, 0, MIB),
        (MIB + 1, 0, 2 * MIB),  # required rounds up
        (0, 5 * MIB + 7, 5 * MIB),  # only a limit: rounds down
        (0, 0, DEFAULT_SIZE),
        (10 * MIB, 10 * MIB, 10 * MIB),
    ],
)
def test_capacity_rounds_to_whole_mib_within_the_range(required: int, limit: int, size: int) -> None:
    assert volume_size(required, limit) == size


@pytest.mark.parametrize(("required", "limit"), [(MIB + 1, MIB + 100), (0, MIB - 1), (-1, 0), (3 * MIB, 2 * MIB)])
def test_a_range_without_a_whole_mib_is_out_of_range(required: int, limit: int) -> None:
    with pytest.raises(CapacityError):
        volume_size(required, limit)


def test_an_existing_size_fits_a_range_it_lies_in() -> None:
    assert fits(10 * MIB, 10 * MIB, 0) and fits(10 * MIB, 0, 10 * MIB)
    assert not fits(10 * MIB, 11 * MIB, 0) and not fits(10 * MIB, 0, 9 * MIB)


def test_only_single_node_writers_and_known_file_systems_are_served() -> None:
    assert capability_problem(Capability(block=False, access_mode=1, fs_type="ext4")) is None
    assert capability_problem(Capability(block=True, access_mode=6)) is None
    for mode in (0, 2, 3, 4, 5, 7):
        problem = capability_problem(Capability(block=True, access_mode=mode))
        assert problem is not None and "ReadWriteOnce" in problem
    assert "btrfs" in (capability_problem(Capability(block=False, access_mode=1, fs_type="btrfs")) or "")


def test_storage_class_parameters_become_the_volume_spec() -> None:
    req = volume_request(
        NAME,
        64 * MIB,
        {
            "failoverMode": "Latest",
            "checkpointIntervalSeconds": "0",
            "peerTimeoutSeconds": "7",
            "gracePeriodSeconds": "2",
            "automaticFailover": "false",
            "nodeSelector": "disk=ssd, zone=a",
            "fsType": "xfs",
            "csi.storage.k8s.io/pvc/name": "data",
            "csi.storage.k8s.io/pvc/namespace": "apps",
        },
    )
    assert req.spec == {
        "size": str(64 * MIB),
        "failover": {"mode": "Latest", "gracePeriodSeconds": 2, "automatic": False},
        "checkpoint": {"intervalSeconds": 0},
        "replication": {"peerTimeoutSeconds": 7},
        "nodeSelector": {"disk": "ssd", "zone": "a"},
        "reclaimPolicy": "Delete",
    }
    assert req.fs_type == "xfs"
    assert req.labels["pairvol.io/pvc-name"] == "data" and req.labels["pairvol.io/pvc-namespace"] == "apps"


@pytest.mark.parametrize(
    ("name", "params", "says"),
    [
        ("pvc-" + "x" * 40, {}, "at most 40"),
        (NAME, {"replicas": "3"}, "unknown StorageClass parameter(s) replicas"),
        (NAME, {"peerTimeoutSeconds": "0"}, "at least 1"),
        (NAME, {"checkpointIntervalSeconds": "-1"}, "whole number"),
        (NAME, {"automaticFailover": "yes"}, "'true' or 'false'"),
        (NAME, {"nodeSelector": "ssd"}, "label=value"),
        (NAME, {"nodes": "only-one"}, "at least two distinct nodes"),
        (NAME, {"hostPath": "relative"}, "absolute path"),
        (NAME, {"reclaimPolicy": "Recycle"}, "reclaimPolicy"),
        (NAME, {"failoverMode": "Soon"}, "spec.failover.mode must be one of"),
    ],
)
def test_bad_parameters_say_what_to_fix(name: str, params: dict[str, str], says: str) -> None:
    with pytest.raises(ParameterError) as err:
        volume_request(name, MIB, params)
    assert says in str(err.value)


def test_a_repeated_request_is_the_same_unless_a_setting_differs() -> None:
    a = volume_request(NAME, 64 * MIB, {"peerTimeoutSeconds": "5"}).spec
    assert same_request(dict(a), a) == []
    assert same_request({**a, "size": "128Mi"}, a) == []  # size is judged by the capacity range
    b = volume_request(NAME, 64 * MIB, {"peerTimeoutSeconds": "9"}).spec
    assert same_request(dict(a), b) == ["peer_timeout_s: existing 5, requested 9"]


def test_csi_volumes_fail_over_in_latest_mode_unless_the_class_asks_for_checkpoints() -> None:
    assert volume_request(NAME, MIB, {}).spec["failover"] == {"mode": "Latest"}
    assert volume_request(NAME, MIB, {"failoverMode": "Checkpoint"}).spec["failover"] == {"mode": "Checkpoint"}


def test_only_a_checkpoint_mode_volume_is_pinned_to_its_primarys_lineage() -> None:
    assert pinned_to_lineage(volume_context("apps", NAME, "ext4", "Checkpoint"))
    assert not pinned_to_lineage(volume_context("apps", NAME, "ext4", "Latest"))
    assert not pinned_to_lineage({"exportAddress": "x:7802"})  # a volume made before the mode was recorded


def test_a_listing_of_exports_gives_the_lineage_exports() -> None:
    listing = (
        "exports available: 2\n export: 'volume'\n  size:  10485760\n"
        " export: 'volume-l7'\n  size:  10485760\n  available meta contexts: 1\n   base:allocation\n"
    )
    assert lineage_names(listing) == ["volume-l7"]
    assert lineage_names("exports available: 0\n") == []


def test_volume_ids_name_namespace_and_volume() -> None:
    assert parse_volume_id(volume_id("apps", NAME)) == ("apps", NAME)
    for bad in ("", NAME, "apps/", "/x", "Apps/x", "apps/x/y", "apps/" + "x" * 41):
        assert parse_volume_id(bad) is None


def test_mountinfo_gives_each_visible_mount_point_its_source() -> None:
    text = (
        "36 35 98:0 / /mnt/with\\040space rw,noatime master:1 - ext4 /dev/loop3 rw\n"
        "37 36 0:5 /loop3 /var/lib/pod/dev shared:2 - devtmpfs udev rw\n"
        "38 36 7:0 / /mnt/with\\040space rw - xfs /dev/loop4 rw\n"
    )
    assert mount_points(text) == {"/mnt/with space": "/dev/loop4", "/var/lib/pod/dev": "udev"}


def test_a_device_is_used_by_file_systems_mounted_from_it_and_by_its_node_bound_onto_files() -> None:
    text = (
        "40 36 7:3 / /stage rw - ext4 /dev/loop3 rw\n"
        "41 36 7:3 / /pods/a/mount rw - ext4 /dev/loop3 rw\n"
        "42 36 0:5 /loop3 /pods/b/dev rw - devtmpfs udev rw\n"
        "43 36 0:5 /loop30 /pods/c/dev rw - devtmpfs udev rw\n"
        "44 36 7:4 / /other rw - ext4 /dev/loop4 rw\n"
    )
    assert device_users(text, "/dev/loop3", "7:3") == ["/stage", "/pods/a/mount", "/pods/b/dev"]


def test_a_volume_is_abnormal_while_degraded_or_out_of_sync() -> None:
    assert replication_problem({"status": {"phase": "Replicating"}}) is None
    assert replication_problem({}) is None  # not reported yet: nothing known against it
    degraded = replication_problem({"status": {"phase": "Degraded", "message": "no secondary yet"}})
    assert degraded is not None and "Degraded (no secondary yet)" in degraded
    behind = replication_problem({"status": {"phase": "Syncing", "secondary": {"node": "b", "outOfSync": True}}})
    assert behind is not None and "on b is OutOfSync" in behind


def test_accessibility_requirements_name_nodes_requisite_first() -> None:
    def seg(node: str) -> dict[str, str]:
        return {"topology.pairvol.io/node": node}

    assert topology_nodes([seg("b"), seg("a"), seg("b")], [seg("a")]) == ["b", "a"]
    assert topology_nodes([], [seg("c")]) == ["c"]
    with pytest.raises(ParameterError, match=r"only topology\.pairvol\.io/node"):
        topology_nodes([{"topology.kubernetes.io/zone": "z"}], [])


def test_replicas_follow_the_topology_only_when_asked() -> None:
    assert "nodes" not in volume_request(NAME, MIB, {}, ["a", "b"]).spec
    spec = volume_request(NAME, MIB, {"replicasFollowTopology": "true"}, ["a", "b"]).spec
    assert spec["nodes"] == ["a", "b"]
    with pytest.raises(ParameterError, match="allowedTopologies"):
        volume_request(NAME, MIB, {"replicasFollowTopology": "true"})
