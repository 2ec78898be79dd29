"""The node simulator's pure rules (no processes, no root): what a Pod spec means.

These pin the Kubernetes semantics the simulator promises: env resolution order and
``$(VAR)`` expansion, downward API fields, Secret volume files, path safety, restart
policy and back-off, probe thresholds, pod phase, securityContext as a container runtime
applies it, and the network plan's names and addresses.
"""

from __future__ import annotations

import base64
import ipaddress
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pairvol.localcluster import netns
from pairvol.localcluster.images import ImagePullError
from pairvol.localcluster.kubelet_pods import (
    CAPABILITY_NUMBERS,
    RUNTIME_DEFAULT_CAPABILITIES,
    ContainerState,
    Mount,
    PodConfigError,
    PodRuntimeInfo,
    ProbeSpec,
    ProbeTracker,
    SecurityPlan,
    VolumeDir,
    VolumeFiles,
    backoff_delay,
    container_argv,
    expand_vars,
    host_path_on_node,
    keep_code_visible,
    launch_script,
    parse_probe,
    plan_mounts,
    plan_volumes,
    pod_phase,
    referenced_objects,
    render_pod_status,
    resolve_env,
    security_plan,
    should_restart,
    termination_message,
)
from pairvol.localcluster.netns import (
    NetnsError,
    allocate_pod_ip,
    choose_subnet,
    make_token,
    owner_pid_of,
    partition_rules,
    plan_network,
    used_prefixes,
)

INFO = PodRuntimeInfo(pod_ip="10.200.0.2", host_ip="10.200.0.2", node_name="node-a")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def a_pod(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "namespace": "ns1", "uid": "u-1", "labels": {"app": "x"}, "annotations": {"a": "b"}},
        "spec": {"nodeName": "node-a", **spec},
    }


class TestEnv:
    def test_values_downward_api_and_secret_keys_resolve_in_order(self) -> None:
        container = {
            "env": [
                {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "GREETING", "value": "hi $(NAME) on $(NODE)"},
                {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "s", "key": "pw"}}},
                {"name": "CM", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}},
            ]
        }
        objects = {("secrets", "s"): {"data": {"pw": b64("pass")}}, ("configmaps", "c"): {"data": {"k": "v"}}}

        env = resolve_env(container, a_pod(), INFO, objects, base={"PATH": "/bin"})

        assert env == {
            "PATH": "/bin",
            "NAME": "p",
            "GREETING": "hi p on $(NODE)",
            "NODE": "node-a",
            "IP": "10.200.0.2",
            "APP": "x",
            "PW": "pass",
            "CM": "v",
        }

    def test_missing_secret_or_key_is_a_config_error_unless_optional(self) -> None:
        ref = {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "s", "key": "pw"}}}
        with pytest.raises(PodConfigError, match="secret 's' not found"):
            resolve_env({"env": [ref]}, a_pod(), INFO, {("secrets", "s"): None})
        with pytest.raises(PodConfigError, match="key 'pw' not found"):
            resolve_env({"env": [ref]}, a_pod(), INFO, {("secrets", "s"): {"data": {}}})
        ref["valueFrom"]["secretKeyRef"]["optional"] = True
        assert resolve_env({"env": [ref]}, a_pod(), INFO, {("secrets", "s"): None}) == {}

    def test_env_from_with_prefix(self) -> None:
        container = {"envFrom": [{"secretRef": {"name": "s"}, "prefix": "S_"}]}
        objects = {("secrets", "s"): {"data": {"a": b64("1"), "b": b64("2")}}}
        assert resolve_env(container, a_pod(), INFO, objects) == {"S_a": "1", "S_b": "2"}

    def test_unsupported_field_path_names_the_supported_ones(self) -> None:
        container = {"env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.x"}}}]}
        with pytest.raises(PodConfigError, match=r"unsupported fieldRef.*metadata\.name"):
            resolve_env(container, a_pod(), INFO, {})

    def test_referenced_objects_cover_env_env_from_and_volumes(self) -> None:
        pod = a_pod(
            containers=[
                {
                    "env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s1", "key": "k"}}}],
                    "envFrom": [{"configMapRef": {"name": "c1"}}],
                }
            ],
            volumes=[{"name": "v", "secret": {"secretName": "s2"}}],
        )
        assert referenced_objects(pod) == {("secrets", "s1"), ("configmaps", "c1"), ("secrets", "s2")}


class TestExpansion:
    def test_kubernetes_rules(self) -> None:
        env = {"A": "1"}
        assert expand_vars("$(A)-$(B)-$$(A)-$A", env) == "1-$(B)-$(A)-$A"

    @given(st.text(alphabet=st.characters(blacklist_characters="$")))
    def test_text_without_dollars_is_unchanged(self, text: str) -> None:
        assert expand_vars(text, {"A": "x"}) == text

    def test_command_and_args_are_expanded_and_required(self) -> None:
        container = {"name": "c", "command": ["srv", "--ip=$(IP)"], "args": ["$(NOPE)"]}
        assert container_argv(container, {"IP": "1.2.3.4"}) == ["srv", "--ip=1.2.3.4", "$(NOPE)"]
        with pytest.raises(ImagePullError, match="has no command and image 'ignored' is not available"):
            container_argv({"name": "c", "image": "ignored", "args": ["x"]}, {})


class TestVolumes:
    def test_secret_volume_becomes_files_under_the_pod_dir(self) -> None:
        pod = a_pod(
            volumes=[
                {
                    "name": "creds",
                    "secret": {"secretName": "s", "defaultMode": 0o400, "items": [{"key": "psk", "path": "keys/psk"}]},
                }
            ]
        )
        objects = {("secrets", "s"): {"data": {"psk": b64("k"), "other": b64("o")}}}

        volumes = plan_volumes(pod, Path("/n"), Path("/n/pods/u"), objects)

        assert volumes == {"creds": VolumeFiles(Path("/n/pods/u/volumes/creds"), {"keys/psk": (b"k", 0o400)})}

    def test_host_path_lives_under_the_node_root(self) -> None:
        pod = a_pod(volumes=[{"name": "d", "hostPath": {"path": "/var/lib/pairvol"}}])
        volumes = plan_volumes(pod, Path("/n"), Path("/n/pods/u"), {})
        assert volumes == {"d": VolumeDir(Path("/n/hostpath/var/lib/pairvol"))}

    @pytest.mark.parametrize("bad", ["relative/path", "/var/../etc"])
    def test_host_path_must_be_absolute_without_dotdot(self, bad: str) -> None:
        with pytest.raises(PodConfigError, match="absolute"):
            host_path_on_node(Path("/n"), bad)

    def test_secret_item_paths_cannot_escape_the_volume(self) -> None:
        pod = a_pod(
            volumes=[{"name": "v", "secret": {"secretName": "s", "items": [{"key": "k", "path": "../../etc/passwd"}]}}]
        )
        with pytest.raises(PodConfigError, match="stay inside"):
            plan_volumes(pod, Path("/n"), Path("/p"), {("secrets", "s"): {"data": {"k": b64("x")}}})

    def test_unsupported_volume_types_are_named(self) -> None:
        pod = a_pod(volumes=[{"name": "v", "iscsi": {"targetPortal": "10.0.0.1:3260"}}])
        with pytest.raises(PodConfigError, match="iscsi"):
            plan_volumes(pod, Path("/n"), Path("/p"), {})

    def test_mounts_map_mount_paths_to_volume_sources_and_secrets_are_read_only(self) -> None:
        volumes = {"d": VolumeDir(Path("/n/hostpath/data")), "s": VolumeFiles(Path("/p/volumes/s"), {})}
        container = {
            "volumeMounts": [
                {"name": "d", "mountPath": "/var/lib/pairvol", "subPath": "vol1"},
                {"name": "s", "mountPath": "/etc/secret"},
            ]
        }
        assert plan_mounts(container, volumes) == [
            Mount(Path("/n/hostpath/data/vol1"), PurePosixPath("/var/lib/pairvol"), False),
            Mount(Path("/p/volumes/s"), PurePosixPath("/etc/secret"), True),
        ]
        with pytest.raises(PodConfigError, match="no volume"):
            plan_mounts({"volumeMounts": [{"name": "x", "mountPath": "/x"}]}, volumes)


class TestLaunch:
    def test_script_joins_cgroup_binds_mounts_then_execs_in_the_node_netns(self) -> None:
        outer, inner = launch_script(
            cgroup_procs="/cg/p/cgroup.procs",
            mounts=[Mount(Path("/src dir"), PurePosixPath("/dst"), True)],
            netns="pvn1x1-0",
            workdir="/w",
            argv=["echo", "a b", "$(X)"],
        )
        assert outer[:2] == ["/bin/sh", "-c"]
        assert outer[2].startswith("echo $$ > /cg/p/cgroup.procs\nexec unshare --mount")
        assert inner.splitlines() == [
            "set -e",
            "mkdir -p /dst",
            "mount --bind '/src dir' /dst",
            "mount -o remount,bind,ro /dst",
            "cd /w",
            "exec ip netns exec pvn1x1-0 echo 'a b' '$(X)'",
        ]
        assert shlex.split(outer[2].split("-- ", 1)[1])[-1] == inner

    def test_pod_name_becomes_the_host_name_in_its_own_uts_namespace(self) -> None:
        outer, inner = launch_script(
            cgroup_procs=None, mounts=[], netns="n", workdir=None, argv=["true"], hostname="agent-0"
        )
        assert "exec unshare --mount --uts --propagation slave" in outer[2]
        assert "echo $$" not in outer[2]  # no cgroup: nothing to join
        assert inner.splitlines()[1] == "hostname agent-0"


    def test_code_a_volume_covers_is_staged_first_and_bound_back_read_only_on_top(self) -> None:
        """A checkout under /tmp stays visible in a pod with an emptyDir on /tmp: the
        container runs this installation, as the image's own files would be."""
        tmp_volume = Mount(Path("/var/pods/x/empty"), PurePosixPath("/tmp"), False)
        data = Mount(Path("/var/pods/x/data"), PurePosixPath("/data"), False)
        code = [Path("/tmp/checkout/.venv"), Path("/tmp/checkout/operator"), Path("/usr/lib/python3")]
        mounts = keep_code_visible([tmp_volume, data], code)
        assert mounts == [
            Mount(Path("/tmp/checkout/.venv"), PurePosixPath("/run/pairvol-localcluster/code-0"), True),
            Mount(Path("/tmp/checkout/operator"), PurePosixPath("/run/pairvol-localcluster/code-1"), True),
            tmp_volume,
            data,
            Mount(Path("/run/pairvol-localcluster/code-0"), PurePosixPath("/tmp/checkout/.venv"), True),
            Mount(Path("/run/pairvol-localcluster/code-1"), PurePosixPath("/tmp/checkout/operator"), True),
        ]

    def test_code_no_volume_covers_is_left_alone(self) -> None:
        mounts = [Mount(Path("/var/pods/x/data"), PurePosixPath("/data"), False)]
        assert keep_code_visible(mounts, [Path("/work/checkout/.venv")]) == mounts


def with_context(container: dict[str, Any] | None = None, pod: dict[str, Any] | None = None) -> SecurityPlan:
    spec_: dict[str, Any] = {"securityContext": pod} if pod is not None else {}
    return security_plan({"spec": spec_}, {"name": "c", "securityContext": container or {}})


class TestSecurityContext:
    def test_nothing_asked_is_root_with_the_runtime_default_capabilities(self) -> None:
        plan = with_context()
        assert (plan.uid, plan.gid, plan.no_new_privs, plan.read_only_root) == (0, 0, False, False)
        assert plan.capabilities == RUNTIME_DEFAULT_CAPABILITIES
        assert "NET_ADMIN" not in plan.capabilities and "SYS_ADMIN" not in plan.capabilities

    def test_add_and_drop_change_the_default_set_and_accept_the_cap_prefix(self) -> None:
        plan = with_context({"capabilities": {"add": ["NET_ADMIN"], "drop": ["CAP_CHOWN", "kill"]}})
        assert plan.capabilities == RUNTIME_DEFAULT_CAPABILITIES - {"CHOWN", "KILL"} | {"NET_ADMIN"}

    def test_drop_all_keeps_only_what_is_added_and_add_all_gives_everything_but_the_dropped(self) -> None:
        assert with_context({"capabilities": {"drop": ["ALL"]}}).capabilities == frozenset()
        only = with_context({"capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}})
        assert only.capabilities == {"NET_BIND_SERVICE"}
        most = with_context({"capabilities": {"add": ["ALL"], "drop": ["SYS_ADMIN"]}})
        assert most.capabilities == set(CAPABILITY_NUMBERS) - {"SYS_ADMIN"}

    def test_privileged_gets_every_capability_the_node_has(self) -> None:
        node = frozenset({"CHOWN", "SYS_ADMIN", "NET_ADMIN"})
        plan = security_plan({}, {"name": "c", "securityContext": {"privileged": True}}, node)
        assert plan.capabilities == node

    def test_container_fields_override_the_pod_and_groups_come_from_the_pod(self) -> None:
        plan = with_context(
            {"runAsUser": 7},
            {
                "runAsUser": 5,
                "runAsGroup": 6,
                "supplementalGroups": [8, 9],
                "fsGroup": 10,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
        )
        assert (plan.uid, plan.gid, plan.groups, plan.seccomp) == (7, 6, (8, 9, 10), "RuntimeDefault")

    def test_no_new_privs_only_when_escalation_is_forbidden(self) -> None:
        assert with_context({"allowPrivilegeEscalation": False}).no_new_privs
        assert not with_context({"allowPrivilegeEscalation": True}).no_new_privs
        assert not with_context({}).no_new_privs  # the Kubernetes default allows it

    @pytest.mark.parametrize(
        ("container", "pod", "message"),
        [
            ({}, {"runAsNonRoot": True}, "runAsNonRoot and image will run as root"),
            ({"runAsNonRoot": True, "runAsUser": 0}, None, "runAsNonRoot and image will run as root"),
            ({"privileged": True, "allowPrivilegeEscalation": False}, None, "privileged"),
            ({"allowPrivilegeEscalation": False, "capabilities": {"add": ["SYS_ADMIN"]}}, None, "CAP_SYS_ADMIN"),
            ({"capabilities": {"add": ["NET_ADMN"]}}, None, "unknown capability 'NET_ADMN'"),
            ({"capabilities": {"add": "NET_ADMIN"}}, None, "must be a list"),
            ({"runAsUser": -1}, None, "non-negative integer"),
        ],
    )
    def test_contexts_a_runtime_refuses_are_config_errors(
        self, container: dict[str, Any], pod: dict[str, Any] | None, message: str
    ) -> None:
        with pytest.raises(PodConfigError, match=message):
            with_context(container, pod)

    def test_a_capability_the_node_lacks_is_an_error_not_a_smaller_set(self) -> None:
        with pytest.raises(PodConfigError, match=r"NET_ADMIN.*cannot grant"):
            security_plan(
                {},
                {"name": "c", "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}},
                RUNTIME_DEFAULT_CAPABILITIES,
            )

    def test_root_holds_its_bounding_set_and_any_other_uid_holds_nothing(self) -> None:
        caps = frozenset({"KILL", "NET_BIND_SERVICE"})
        mask = (1 << 5) | (1 << 10)
        assert SecurityPlan(uid=0, capabilities=caps).expected_status() == {
            "CapInh": 0,
            "CapPrm": mask,
            "CapEff": mask,
            "CapBnd": mask,
            "CapAmb": 0,
        }
        assert SecurityPlan(uid=1000, capabilities=caps).expected_status() == {
            "CapInh": 0,
            "CapPrm": 0,
            "CapEff": 0,
            "CapBnd": mask,
            "CapAmb": 0,
        }

    def test_setpriv_sets_every_set_user_groups_and_no_new_privs(self) -> None:
        plan = SecurityPlan(uid=5, gid=6, groups=(7,), capabilities=frozenset({"KILL"}), no_new_privs=True)
        assert plan.setpriv_argv() == [
            "setpriv",
            "--bounding-set=-all,+kill",
            "--inh-caps=-all",
            "--ambient-caps=-all",
            "--regid=6",
            "--reuid=5",
            "--groups=7",
            "--no-new-privs",
            "--",
        ]
        assert "--clear-groups" in SecurityPlan().setpriv_argv()

    def test_privileges_are_taken_after_the_namespaces_and_the_read_only_root(self) -> None:
        plan = SecurityPlan(capabilities=frozenset(), read_only_root=True)
        _, inner = launch_script(
            cgroup_procs=None,
            mounts=[Mount(Path("/d"), PurePosixPath("/data"), False)],
            netns="n",
            workdir=None,
            argv=["agent"],
            security=plan,
        )
        lines = inner.splitlines()
        assert lines[-2:] == [
            "mount -o remount,bind,ro /",
            "exec ip netns exec n " + " ".join(plan.setpriv_argv()) + " agent",
        ]
        assert lines.index("mount --bind /d /data") < lines.index("mount -o remount,bind,ro /")

    def test_without_a_network_namespace_the_command_runs_in_ours(self) -> None:
        _, inner = launch_script(cgroup_procs=None, mounts=[], netns=None, workdir=None, argv=["true"])
        assert inner.splitlines()[-1] == "exec true"


class TestRestartsAndProbes:
    @pytest.mark.parametrize(
        ("policy", "code", "restart"),
        [
            ("Always", 0, True),
            ("Always", 1, True),
            ("OnFailure", 0, False),
            ("OnFailure", 2, True),
            ("Never", 1, False),
        ],
    )
    def test_restart_policy(self, policy: str, code: int, restart: bool) -> None:
        assert should_restart(policy, code) is restart

    def test_backoff_doubles_up_to_the_cap(self) -> None:
        assert [backoff_delay(n, 1.0, 5.0) for n in range(6)] == [0, 1, 2, 4, 5, 5]

    def test_probe_thresholds(self) -> None:
        tracker = ProbeTracker(ProbeSpec(kind="tcp", success_threshold=2, failure_threshold=3), healthy=False)
        assert [tracker.record(ok) for ok in (True, True, False, False, True, False, False, False)] == [
            False,
            True,
            True,
            True,
            True,
            True,
            True,
            False,
        ]

    def test_named_probe_port_resolves_from_container_ports(self) -> None:
        container = {"ports": [{"name": "api", "containerPort": 7800}]}
        probe = parse_probe({"httpGet": {"path": "/healthz", "port": "api"}, "periodSeconds": 2}, container)
        assert probe == ProbeSpec(kind="http", port=7800, path="/healthz", period=2.0)
        with pytest.raises(PodConfigError, match="named container port"):
            parse_probe({"tcpSocket": {"port": "nope"}}, container)


class TestTerminationMessage:
    def test_the_file_the_container_wrote_wins(self) -> None:
        assert termination_message("File", "disk full", b"noise\n", failed=True) == "disk full"
        assert termination_message("FallbackToLogsOnError", "bye", b"noise\n", failed=True) == "bye"

    def test_policy_file_without_a_file_reports_nothing(self) -> None:
        assert termination_message("File", "", b"Address already in use\n", failed=True) == ""

    def test_fallback_to_logs_only_on_error_and_keeps_the_last_80_lines_and_2_kib(self) -> None:
        log = b"".join(f"line {i}\n".encode() for i in range(200))
        text = termination_message("FallbackToLogsOnError", "", log, failed=True)
        assert text.splitlines()[-1] == "line 199" and text.splitlines()[0] == "line 120"
        assert termination_message("FallbackToLogsOnError", "", log, failed=False) == ""
        long = termination_message("FallbackToLogsOnError", "", b"x" * 5000 + b"\nend", failed=True)
        assert len(long) == 2048 and long.endswith("\nend")

    def test_a_long_file_is_cut_at_4_kib(self) -> None:
        assert len(termination_message("File", "y" * 10000, b"", failed=True)) == 4096


class TestStatus:
    def test_phase_follows_containers(self) -> None:
        running = ContainerState("a", state={"running": {}})
        done = ContainerState("b", state={"terminated": {"exitCode": 0}})
        failed = ContainerState("c", state={"terminated": {"exitCode": 1}})
        looping = ContainerState("d", restart_count=2, state={"waiting": {}})
        assert pod_phase([running, done], "Always") == "Running"
        assert pod_phase([done], "Never") == "Succeeded"
        assert pod_phase([done, failed], "Never") == "Failed"
        assert pod_phase([looping], "Always") == "Running"
        assert pod_phase([ContainerState("e")], "Always") == "Pending"

    def test_ready_condition_keeps_its_transition_time_while_unchanged(self) -> None:
        ready = ContainerState("a", state={"running": {}}, ready=True)
        first = render_pod_status(containers=[ready], policy="Always", info=INFO, start_time="t0", now="t1")
        second = render_pod_status(
            containers=[ready],
            policy="Always",
            info=INFO,
            start_time="t0",
            now="t2",
            previous_conditions=first["conditions"],
        )
        cond = {c["type"]: c for c in second["conditions"]}
        assert cond["Ready"] == {"type": "Ready", "status": "True", "lastTransitionTime": "t1"}
        assert second["podIP"] == second["hostIP"] == "10.200.0.2"

    def test_a_pod_without_its_network_yet_has_no_pod_ip(self) -> None:
        status = render_pod_status(
            containers=[ContainerState(name="c")],
            policy="Always",
            info=PodRuntimeInfo(pod_ip="", host_ip="10.200.0.2", node_name="node-a"),
            start_time="t0",
            now="t1",
        )
        assert "podIP" not in status and "podIPs" not in status and status["hostIP"] == "10.200.0.2"


class TestNetworkPlan:
    def test_names_fit_interface_limits_and_addresses_follow_the_bridge(self) -> None:
        token = make_token(4194304, 300)
        plan = plan_network(["a", "b"], token, ipaddress.IPv4Network("10.201.16.0/20"))
        assert str(plan.bridge_ip) == "10.201.16.1"
        assert [str(n.ip) for n in plan.nodes] == ["10.201.16.2", "10.201.16.3"]
        assert all(len(n.host_veth) <= 15 and len(n.peer_veth) <= 15 for n in plan.nodes)
        assert owner_pid_of(plan.bridge) == 4194304
        assert owner_pid_of(plan.nodes[1].netns) == 4194304
        assert owner_pid_of("eth0") is None and owner_pid_of("pvbogus") is None

    def test_duplicate_or_no_nodes_are_rejected(self) -> None:
        with pytest.raises(NetnsError, match="unique"):
            plan_network(["a", "a"], "1x1", ipaddress.IPv4Network("10.201.16.0/20"))
        with pytest.raises(NetnsError, match="at least one"):
            plan_network([], "1x1", ipaddress.IPv4Network("10.201.16.0/20"))

    def test_each_node_gets_its_own_pod_cidr_after_the_node_network(self) -> None:
        plan = plan_network(["a", "b", "c"], "1x1", ipaddress.IPv4Network("10.201.16.0/20"))
        assert str(plan.subnet) == "10.201.16.0/24"
        assert [str(n.pod_cidr) for n in plan.nodes] == ["10.201.17.0/24", "10.201.18.0/24", "10.201.19.0/24"]
        assert [str(n.pod_gateway) for n in plan.nodes] == ["10.201.17.1", "10.201.18.1", "10.201.19.1"]

    def test_more_nodes_than_pod_cidrs_in_the_block_are_refused(self) -> None:
        with pytest.raises(NetnsError, match="at most 15 nodes"):
            plan_network([f"n{i}" for i in range(16)], "1x1", ipaddress.IPv4Network("10.201.16.0/20"))

    def test_pod_ips_are_the_lowest_free_after_the_gateway(self) -> None:
        cidr = ipaddress.IPv4Network("10.201.17.0/24")
        assert str(allocate_pod_ip(cidr, [])) == "10.201.17.2"
        taken = [ipaddress.IPv4Address("10.201.17.2"), ipaddress.IPv4Address("10.201.17.4")]
        assert str(allocate_pod_ip(cidr, taken)) == "10.201.17.3"
        with pytest.raises(NetnsError, match="no free pod IP"):
            allocate_pod_ip(cidr, list(cidr.hosts())[1:])

    def test_a_freed_pod_ip_is_handed_out_again_only_after_the_others(self) -> None:
        # a pod replaced on its node must not inherit the address of the one it replaces
        # while neighbour caches still point at the old interface
        cidr = ipaddress.IPv4Network("10.201.17.0/29")  # .2 to .6 for pods
        ip = ipaddress.IPv4Address
        assert allocate_pod_ip(cidr, [], after=ip("10.201.17.2")) == ip("10.201.17.3")
        assert allocate_pod_ip(cidr, [ip("10.201.17.3")], after=ip("10.201.17.3")) == ip("10.201.17.4")
        # wraps around past the end, skipping what is taken
        assert allocate_pod_ip(cidr, [ip("10.201.17.2")], after=ip("10.201.17.6")) == ip("10.201.17.3")
        # an address outside the range (or none) starts from the lowest
        assert allocate_pod_ip(cidr, [], after=ip("10.9.9.9")) == ip("10.201.17.2")

    def test_subnet_avoids_everything_in_use(self) -> None:
        used = used_prefixes(
            "2: eth0    inet 10.200.0.5/16 brd 10.200.255.255 scope global eth0\n"
            "5: pvb1x1    inet 10.201.0.1/24 scope global pvb1x1\n",
            "default via 10.0.0.1 dev eth0\n10.201.1.0/24 dev tun0\n",
        )
        subnet = choose_subnet(used, seed=0)
        assert subnet == ipaddress.IPv4Network("10.201.16.0/20")
        assert not any(subnet.overlaps(u) for u in used)

    @given(st.integers(min_value=0, max_value=2**32))
    def test_any_seed_gives_a_private_20_in_the_pool(self, seed: int) -> None:
        subnet = choose_subnet([], seed)
        assert subnet.prefixlen == 20 and subnet.is_private
        assert 200 <= subnet.network_address.packed[1] < 250

    def test_partition_rules_drop_both_directions_on_the_node_link_only(self) -> None:
        rules = partition_rules("-I")
        assert ["iptables", "-w", "-I", "INPUT", "-i", "eth0", "-j", "DROP"] in rules
        assert ["iptables", "-w", "-I", "OUTPUT", "-o", "eth0", "-j", "DROP"] in rules
        # the pods' traffic is forwarded by the node: cut as well
        assert ["iptables", "-w", "-I", "FORWARD", "-i", "eth0", "-j", "DROP"] in rules
        assert ["iptables", "-w", "-I", "FORWARD", "-o", "eth0", "-j", "DROP"] in rules


class TestPrerequisites:
    async def test_not_root_is_refused_with_what_to_do(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
        with pytest.raises(NetnsError, match=r"need root.*not netns"):
            await netns.check_prerequisites()

    async def test_missing_tools_are_named(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
        monkeypatch.setattr(netns.shutil, "which", lambda tool: None if tool == "iptables" else "/x")
        with pytest.raises(NetnsError, match="'iptables' not found"):
            await netns.check_prerequisites()
