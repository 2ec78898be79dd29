"""What the local cluster's endpoints controller and kube-proxy decide, without any I/O:
which pods back a Service, the Endpoints/EndpointSlice objects, the iptables rules."""

from __future__ import annotations

from typing import Any

from pairvol.localcluster.services import (
    REJECT_CHAIN,
    SERVICES_CHAIN,
    endpoint_slice_object,
    endpoints_object,
    endpoints_of,
    nat_rules,
    reject_rules,
)


def service(name: str = "web", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "selector": {"app": "web"},
        "clusterIP": "10.96.0.10",
        "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
    }
    body.update(spec)
    return {"metadata": {"name": name, "namespace": "apps", "uid": "svc-uid"}, "spec": body}


def pod(name: str, ip: str, *, ready: bool = True, port: int = 8080, **extra: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": extra.pop("namespace", "apps"),
            "uid": f"{name}-uid",
            "labels": extra.pop("labels", {"app": "web"}),
            **extra.pop("meta", {}),
        },
        "spec": {
            "nodeName": "node-1",
            "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": port}]}],
        },
        "status": {
            "phase": extra.pop("phase", "Running"),
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def test_ready_matching_pods_of_the_namespace_are_the_endpoints_with_the_named_port_resolved() -> None:
    pods = [
        pod("a", "10.1.1.2"),
        pod("b", "10.1.2.2", port=9090),
        pod("not-ready", "10.1.1.3", ready=False),
        pod("other-app", "10.1.1.4", labels={"app": "db"}),
        pod("other-ns", "10.1.1.5", namespace="default"),
        pod("done", "10.1.1.6", phase="Succeeded"),
        pod("going", "10.1.1.7", meta={"deletionTimestamp": "2026-01-01T00:00:00Z"}),
        pod("no-ip", ""),
    ]
    (port,) = endpoints_of(service(), pods).ports
    assert [(e.pod, e.ip, e.port, e.ready) for e in port.endpoints] == [
        ("a", "10.1.1.2", 8080, True),
        ("b", "10.1.2.2", 9090, True),
        ("not-ready", "10.1.1.3", 8080, False),
    ]


def test_publish_not_ready_addresses_counts_every_running_pod_as_ready() -> None:
    view = endpoints_of(service(publishNotReadyAddresses=True), [pod("a", "10.1.1.2", ready=False)])
    assert [e.ready for e in view.ports[0].endpoints] == [True]


def test_a_service_without_selector_selects_nothing() -> None:
    view = endpoints_of(service(selector=None), [pod("a", "10.1.1.2")])
    assert view.ports[0].endpoints == ()


def test_endpoints_object_separates_ready_and_not_ready_addresses_per_target_port() -> None:
    view = endpoints_of(service(), [pod("a", "10.1.1.2"), pod("n", "10.1.1.3", ready=False)])
    obj = endpoints_object(view)
    assert obj["metadata"]["name"] == "web" and obj["metadata"]["namespace"] == "apps"
    (subset,) = obj["subsets"]
    assert subset["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]
    assert [a["ip"] for a in subset["addresses"]] == ["10.1.1.2"]
    assert [a["ip"] for a in subset["notReadyAddresses"]] == ["10.1.1.3"]
    assert subset["addresses"][0]["targetRef"] == {"kind": "Pod", "name": "a", "uid": "a-uid"}


def test_endpoint_slice_is_owned_by_its_service_and_labelled_with_its_name() -> None:
    view = endpoints_of(service(), [pod("a", "10.1.1.2"), pod("n", "10.1.1.3", ready=False)])
    obj = endpoint_slice_object(view)
    assert obj["metadata"]["labels"]["kubernetes.io/service-name"] == "web"
    assert obj["metadata"]["ownerReferences"][0]["uid"] == "svc-uid"
    assert obj["addressType"] == "IPv4" and obj["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"}]
    assert [(e["addresses"], e["conditions"]["ready"]) for e in obj["endpoints"]] == [
        (["10.1.1.2"], True),
        (["10.1.1.3"], False),
    ]


def test_nat_rules_send_the_cluster_ip_to_one_ready_endpoint_each_equally_likely() -> None:
    pods = [pod("a", "10.1.1.2"), pod("b", "10.1.2.2"), pod("c", "10.1.3.2"), pod("n", "10.1.1.3", ready=False)]
    text = nat_rules([endpoints_of(service(), pods)])
    lines = text.splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT"
    assert f'-A PREROUTING -m comment --comment "pairvol local cluster services" -j {SERVICES_CHAIN}' in lines
    assert f'-A OUTPUT -m comment --comment "pairvol local cluster services" -j {SERVICES_CHAIN}' in lines
    assert "-A POSTROUTING -m conntrack --ctstate DNAT -j MASQUERADE" in lines
    (jump,) = [line for line in lines if line.startswith(f"-A {SERVICES_CHAIN} ")]
    assert "-d 10.96.0.10/32 -p tcp -m tcp --dport 80" in jump
    svc_chain = jump.rsplit(" ", 1)[1]
    picks = [line for line in lines if line.startswith(f"-A {svc_chain} ")]
    # 1/3, then 1/2 of the rest, then the last: each endpoint gets a third
    assert ["--probability 0.3333333333" in picks[0], "--probability 0.5000000000" in picks[1]] == [True, True]
    assert "statistic" not in picks[2]
    dnat = sorted(line.rsplit(" ", 1)[1] for line in lines if "DNAT --to-destination" in line)
    assert dnat == ["10.1.1.2:8080", "10.1.2.2:8080", "10.1.3.2:8080"]
    assert all(len(line[1:].split()[0]) <= 28 for line in lines if line.startswith(":")), "iptables limit"


def test_headless_services_and_services_without_ready_endpoints_get_no_dnat() -> None:
    headless = endpoints_of(service("agents", clusterIP="None"), [pod("a", "10.1.1.2")])
    empty = endpoints_of(service("empty", clusterIP="10.96.0.11"), [pod("n", "10.1.1.3", ready=False)])
    assert "-j DNAT" not in nat_rules([headless, empty])
    # a Service nobody serves refuses at once, as with kube-proxy; a headless one has no address to refuse
    rejects = [line for line in reject_rules([headless, empty]).splitlines() if line.startswith(f"-A {REJECT_CHAIN}")]
    assert len(rejects) == 1 and "-d 10.96.0.11/32" in rejects[0] and "REJECT" in rejects[0]
