"""Spec parsing and validation: what users may write, and what they are told when wrong."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pairvol.agent.validate import InvalidInput, parse_size
from pairvol.api.quantity import QuantityError, format_bytes, parse_bytes
from pairvol.api.spec import SpecError, VolumeSpec, parse_spec
from pairvol.api.status import Phase, Replica, VolumeStatus, set_condition


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1Gi", 1 << 30), ("64Mi", 64 << 20), ("1k", 1000), ("2M", 2_000_000), ("1e3", 1000),
        ("1.5Ki", 1536), (4096, 4096), ("4096", 4096), ("  1Ti ", 1 << 40), ("0.5Gi", 1 << 29),
    ],
)
def test_quantities_are_parsed_to_whole_bytes(text: object, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["1.3", "1Qi", "", "Gi", "-1Mi", "1500m", True, 1.5, None, "1e99"])
def test_bad_quantities_are_rejected_with_a_hint(text: object) -> None:
    with pytest.raises(QuantityError):
        parse_bytes(text)


@given(st.integers(min_value=0, max_value=1 << 62))
def test_format_bytes_round_trips(n: int) -> None:
    assert parse_bytes(format_bytes(n)) == n


def test_defaults_follow_the_crd() -> None:
    spec = parse_spec({"size": "64Mi"}, name="vol1")
    assert spec.size == 64 << 20
    assert spec.checkpoint_interval_s == 10
    assert spec.failover_automatic is True
    assert spec.failover_mode == "Checkpoint" and spec.agent_failover_mode == "checkpoint"
    assert spec.grace_period_s == 3 and spec.peer_timeout_s == 5
    assert spec.host_path == "/var/lib/pairvol" and spec.reclaim_policy == "Retain"


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(
            {
                "nodes": ["a", "a"],
                "failover": {"mode": "Eventually"},
                "replication": {"peerTimeoutSeconds": 0},
                "storage": {"hostPath": "relative/dir"},
                "reclaimPolicy": "Shred",
            },
            name="Bad_Name",
        )
    text = str(err.value)
    for fragment in (
        "metadata.name 'Bad_Name'", "spec.size is required", "lists a more than once",
        "at least two distinct nodes", "spec.failover.mode must be one of Checkpoint, Latest",
        "peerTimeoutSeconds must be >= 1", "hostPath must be an absolute path",
        "reclaimPolicy must be one of Retain, Delete",
    ):
        assert fragment in text, fragment
    assert len(err.value.problems) == 8


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"size": "1k"}, "at least 1Mi"),
        ({"size": 1048577}, "multiple of 512"),
        ({"size": "1Mi", "storage": {"hostPath": "/var/../etc"}}, "must not contain '..'"),
        ({"size": "1Mi", "storage": {"hostPath": "/"}}, "must not be '/'"),
        ({"size": "1Mi", "checkpoint": {"intervalSeconds": "10"}}, "must be an integer"),
        ({"size": "1Mi", "failover": {"automatic": "yes"}}, "must be true or false"),
        ({"size": "1Mi", "nodeSelector": {"zone": 1}}, "nodeSelector must map"),
        ({"size": "1Mi", "nodes": ["UPPER", "b"]}, "invalid node names"),
        ({"size": "1Mi", "preferredPrimaryNode": "Node_1"}, "preferredPrimaryNode must be a node name"),
        ({"size": "1Mi", "preferredPrimaryNode": ["n1"]}, "preferredPrimaryNode must be a node name"),
    ],
)
def test_single_problems_say_what_to_fix(spec: dict[str, object], fragment: str) -> None:
    with pytest.raises(SpecError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        parse_spec(spec, name="v")


def test_a_preferred_primary_node_is_any_node_name() -> None:
    longest = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 characters
    assert parse_spec({"size": "1Mi", "preferredPrimaryNode": longest}).preferred_primary == longest
    assert parse_spec({"size": "1Mi"}).preferred_primary == ""
    with pytest.raises(SpecError, match="preferredPrimaryNode must be a node name"):
        parse_spec({"size": "1Mi", "preferredPrimaryNode": longest + "d"})


def test_long_volume_names_are_refused_because_pod_names_derive_from_them() -> None:
    with pytest.raises(SpecError, match="at most 40"):
        parse_spec({"size": "1Mi"}, name="v" * 41)


def test_status_round_trips_through_its_dict_form() -> None:
    status = VolumeStatus(
        phase=Phase.REPLICATING, epoch=7,
        primary=Replica("n1", "v-1-a", "primary/replicating", "10.0.0.1"),
        secondary=Replica("n2", "v-1-b", "secondary/running", "10.0.0.2", out_of_sync=True),
        endpoint={"node": "n1"},
    )
    again = VolumeStatus.from_dict(status.to_dict())
    assert again == status
    assert status.to_dict()["lastFailover"] is None  # cleared fields are deleted by merge patch


def test_every_node_that_held_a_replica_stays_in_data_nodes() -> None:
    """reclaimPolicy Delete wipes status.dataNodes: a replaced secondary's node stays there."""
    first = VolumeStatus(primary=Replica("n1", "v-1-a"), secondary=Replica("n2", "v-1-b"))
    assert first.data_nodes == ("n1", "n2")
    stored = VolumeStatus.from_dict(first.to_dict())
    replaced = stored.with_(secondary=Replica("n3", "v-2-c"))
    assert replaced.data_nodes == ("n1", "n2", "n3")
    gone = VolumeStatus.from_dict(replaced.with_(primary=None, secondary=None).to_dict())
    assert gone.data_nodes == ("n1", "n2", "n3")


def test_condition_transition_time_moves_only_on_status_change() -> None:
    c1 = set_condition((), "Ready", True, "R", "m", now=100.0, generation=1)
    c2 = set_condition(c1, "Ready", True, "R2", "m2", now=200.0, generation=2)
    c3 = set_condition(c2, "Ready", False, "R3", "m3", now=300.0, generation=2)
    assert c1[0].last_transition_time == c2[0].last_transition_time
    assert c2[0].reason == "R2" and c2[0].observed_generation == 2
    assert c3[0].last_transition_time != c2[0].last_transition_time and c3[0].status == "False"


def test_every_problem_is_spelled_out_in_one_message() -> None:
    """The status message is the user's only hint: each problem names the field, the rule and
    what was written, in spec order."""
    problems = [
        "metadata.name 'Bad_Name' must be a DNS label of at most 40 characters (lower case letters, digits, '-'), "
        "because pod and Service names derive from it",
        "spec.size must be at least 1Mi, got '1k'",
        "spec.nodes lists a, c more than once",
        "spec.nodes has invalid node names: 'B', 'D'",
        "spec.nodeSelector must map label names to strings, got {'z': 1}",
        "spec.checkpoint.intervalSeconds must be >= 0, got -1",
        "spec.failover.automatic must be true or false, got 'yes'",
        "spec.failover.mode must be one of Checkpoint, Latest, got 'x'",
        "spec.failover.gracePeriodSeconds must be an integer, got '3'",
        "spec.replication.peerTimeoutSeconds must be >= 1, got 0",
        "spec.storage.hostPath '/a/../b' must not be '/' and must not contain '..'",
        "spec.reclaimPolicy must be one of Retain, Delete, got 'Shred'",
    ]
    with pytest.raises(SpecError) as err:
        parse_spec(
            {
                "size": "1k", "nodes": ["a", "a", "B", "c", "c", "D"], "nodeSelector": {"z": 1},
                "checkpoint": {"intervalSeconds": -1},
                "failover": {"automatic": "yes", "mode": "x", "gracePeriodSeconds": "3"},
                "replication": {"peerTimeoutSeconds": 0}, "storage": {"hostPath": "/a/../b"},
                "reclaimPolicy": "Shred",
            },
            name="Bad_Name",
        )
    assert err.value.problems == problems
    assert str(err.value) == "invalid ReplicatedVolume: " + "; ".join(problems)


@pytest.mark.parametrize(("spec", "problems"), [
    ({}, ["spec.size is required (e.g. size: 1Gi)"]),
    ({"size": "1x"}, ["spec.size: '1x' is not a Kubernetes quantity; write e.g. '64Mi', '1Gi', '500M' or a plain "
                      "number of bytes"]),
    ({"size": "1Mi", "nodes": ["a", 1]}, ["spec.nodes must be a list of node names, got ['a', 1]"]),
    ({"size": "1Mi", "nodes": "a"}, ["spec.nodes must be a list of node names, got 'a'"]),
    ({"size": "1Mi", "checkpoint": {"intervalSeconds": "10"}},
     ["spec.checkpoint.intervalSeconds must be an integer, got '10'"]),
    ({"size": "1Mi", "failover": {"gracePeriodSeconds": -1}},
     ["spec.failover.gracePeriodSeconds must be >= 0, got -1"]),
    *(({"size": "1Mi", section: "yes"}, [f"spec.{section} must be an object, got 'yes'"])
      for section in ("checkpoint", "failover", "replication", "storage")),
])
def test_each_problem_alone_names_its_field(spec: dict[str, object], problems: list[str]) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(spec)
    assert err.value.problems == problems


def test_values_at_the_limits_are_accepted() -> None:
    spec = parse_spec(
        {"size": "1Mi", "nodes": ["a" * 253, "b"], "checkpoint": {"intervalSeconds": 0},
         "failover": {"gracePeriodSeconds": 0, "automatic": False, "mode": "Latest"},
         "replication": {"peerTimeoutSeconds": 1}, "storage": {"hostPath": "/data//pv/"},
         "reclaimPolicy": "Delete", "nodeSelector": {"zone": "a"}},
        name="v" * 40,
    )
    assert spec == VolumeSpec(size=1 << 20, nodes=("a" * 253, "b"), node_selector={"zone": "a"},
                              checkpoint_interval_s=0, failover_automatic=False, failover_mode="Latest",
                              grace_period_s=0, peer_timeout_s=1, host_path="/data/pv", reclaim_policy="Delete")
    with pytest.raises(SpecError, match="invalid node names: 'aaa"):
        parse_spec({"size": "1Mi", "nodes": ["a" * 254, "b"]})


def test_an_empty_node_list_means_any_node() -> None:
    assert parse_spec({"size": "1Mi", "nodes": []}).nodes == ()


PiB = 1 << 50
TOO_LARGE = (
    "spec.size must be at most 1Pi ({} bytes), the largest volume an agent serves, got {!r}; give "
    "at most 1Pi (a size beyond it is never applied: the replicas keep the size they have)"
)


def test_the_largest_size_is_1pi_what_an_agent_takes() -> None:
    """A larger size passed here would start agents with a --size they refuse, or grow a pair
    whose secondary refuses the resize after the primary let it go."""
    assert parse_spec({"size": "1Pi"}).size == PiB
    assert parse_spec({"size": PiB}).size == PiB
    for size in (PiB + 512, "2Pi", "1Ei", "8Ei", (1 << 63) - 512):
        with pytest.raises(SpecError) as err:
            parse_spec({"size": size})
        assert err.value.problems == [TOO_LARGE.format(PiB, size)]


@pytest.mark.parametrize(
    "size", [PiB - 512, PiB, PiB + 512, 2 * PiB, 1 << 20, (1 << 20) + 512, (1 << 20) - 512, (1 << 20) + 1]
)
def test_the_spec_accepts_exactly_the_sizes_an_agent_takes(size: int) -> None:
    """The operator starts agents with ``--size`` spec.size and resizes them to it: a size the
    spec accepts and the agent refuses never reaches an agent."""
    try:
        parse_size(size)
        agent_takes = True
    except InvalidInput:
        agent_takes = False
    try:
        parse_spec({"size": size})
        spec_accepts = True
    except SpecError:
        spec_accepts = False
    assert spec_accepts == agent_takes
