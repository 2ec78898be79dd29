"""The local cluster's DNS, specified by what a pod's resolver sees: which names exist, what
they resolve to, the resolv.conf a pod gets, and the answers on the wire (RFC 1035), from
a real UDP socket. Live resolution inside pods: test_pod_network.py."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pairvol.localcluster.dns import (
    RCODE_FORMERR,
    RCODE_NXDOMAIN,
    RCODE_OK,
    ClusterDNS,
    cluster_records,
    lookup,
    parse_query,
    resolv_conf,
)


def service(name: str, cluster_ip: str = "10.96.0.20", **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "apps"},
        "spec": {"selector": {"app": name}, "clusterIP": cluster_ip, **spec},
    }


def pod(name: str, ip: str, app: str, *, ready: bool = True, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "apps", "labels": {"app": app}},
        "spec": spec,
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def query(name: str, qtype: int = 1, qid: int = 0x1234) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", qtype, 1)


def answer_of(reply: bytes) -> tuple[int, int, list[str]]:
    """(id, rcode, A addresses) of a reply to one of :func:`query`'s questions."""
    qid, flags, _, ancount = struct.unpack("!HHHH", reply[:8])
    at = 12
    while reply[at]:
        at += reply[at] + 1
    at += 5  # the root label, type, class
    addresses = []
    for _ in range(ancount):
        _, rtype, _, _, length = struct.unpack("!HHHIH", reply[at : at + 12])
        at += 12
        if rtype == 1:
            addresses.append(socket.inet_ntoa(reply[at : at + length]))
        at += length
    return qid, flags & 0xF, addresses


# ------------------------------------------------------------------------------ names


def test_a_service_resolves_to_its_cluster_ip_and_a_headless_one_to_its_ready_pods() -> None:
    records = cluster_records(
        [service("web"), service("db", cluster_ip="None")],
        [pod("db-0", "10.1.1.5", "db"), pod("db-1", "10.1.2.5", "db", ready=False), pod("w", "10.1.1.9", "web")],
    )
    assert records["web.apps.svc.cluster.local"] == ("10.96.0.20",)
    assert records["db.apps.svc.cluster.local"] == ("10.1.1.5",)


def test_a_headless_service_that_publishes_not_ready_pods_resolves_to_them_too() -> None:
    records = cluster_records(
        [service("db", cluster_ip="None", publishNotReadyAddresses=True)],
        [pod("db-0", "10.1.1.5", "db"), pod("db-1", "10.1.2.5", "db", ready=False)],
    )
    assert records["db.apps.svc.cluster.local"] == ("10.1.1.5", "10.1.2.5")


def test_statefulset_pods_get_their_own_names_under_their_headless_service() -> None:
    records = cluster_records(
        [service("db", cluster_ip="None")],
        [pod("db-0", "10.1.1.5", "db", hostname="db-0", subdomain="db"), pod("x", "10.1.1.6", "db")],
    )
    assert records["db-0.db.apps.svc.cluster.local"] == ("10.1.1.5",)
    assert not any(name.startswith("x.") for name in records)


def test_pods_of_other_namespaces_finished_or_going_are_not_behind_a_headless_service() -> None:
    other = pod("o", "10.1.1.7", "db")
    other["metadata"]["namespace"] = "default"
    done = pod("d", "10.1.1.8", "db")
    done["status"]["phase"] = "Succeeded"
    going = pod("g", "10.1.1.9", "db")
    going["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    records = cluster_records([service("db", cluster_ip="None")], [other, done, going])
    assert records["db.apps.svc.cluster.local"] == ()


def test_lookup_answers_names_of_the_cluster_domain_and_leaves_the_rest_to_the_host() -> None:
    records = {"web.apps.svc.cluster.local": ("10.96.0.20",), "db.apps.svc.cluster.local": ()}
    assert lookup("web.apps.svc.cluster.local", records) == (RCODE_OK, ("10.96.0.20",))
    assert lookup("db.apps.svc.cluster.local", records) == (RCODE_OK, ())  # exists, no ready pod
    assert lookup("apps.svc.cluster.local", records) == (RCODE_OK, ())  # a name above a record
    assert lookup("nope.apps.svc.cluster.local", records) == (RCODE_NXDOMAIN, ())
    assert lookup("web.apps.svc.cluster.local.apps.svc.cluster.local", records) == (RCODE_NXDOMAIN, ())
    assert lookup("10-1-2-3.apps.pod.cluster.local", records) == (RCODE_OK, ("10.1.2.3",))
    assert lookup("10-1-2.apps.pod.cluster.local", records) == (RCODE_NXDOMAIN, ())
    assert lookup("example.org", records) is None


def test_a_pod_gets_the_cluster_dns_and_its_namespace_first_in_the_search_path() -> None:
    conf = resolv_conf(pod("p", "10.1.1.2", "x"), "10.200.0.1")
    assert conf == (
        "nameserver 10.200.0.1\nsearch apps.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
    )


def test_dns_policy_and_dns_config_are_honoured_as_the_kubelet_honours_them() -> None:
    assert resolv_conf(pod("p", "", "x", dnsPolicy="Default"), "10.200.0.1") is None
    assert resolv_conf(pod("p", "", "x", hostNetwork=True), "10.200.0.1") is None
    host_net = resolv_conf(pod("p", "", "x", hostNetwork=True, dnsPolicy="ClusterFirstWithHostNet"), "10.200.0.1")
    assert host_net is not None and host_net.startswith("nameserver 10.200.0.1\n")
    config = {"nameservers": ["1.2.3.4"], "searches": ["corp.example"], "options": [{"name": "edns0"}]}
    custom = resolv_conf(pod("p", "", "x", dnsPolicy="None", dnsConfig=config), "10.200.0.1")
    assert custom == "nameserver 1.2.3.4\nsearch corp.example\noptions edns0\n"
    merged = resolv_conf(pod("p", "", "x", dnsConfig={"options": [{"name": "ndots", "value": "2"}]}), "10.200.0.1")
    assert merged is not None and merged.endswith("options ndots:2\n")


def test_a_query_is_parsed_case_insensitively_and_garbage_is_refused() -> None:
    q = parse_query(query("Web.Apps.SVC.cluster.local", qtype=28))
    assert (q.id, q.name, q.qtype, q.qclass) == (0x1234, "web.apps.svc.cluster.local", 28, 1)
    from pairvol.localcluster.dns import DnsFormatError

    for garbage in (b"", b"\0" * 11, query("a")[:-3], struct.pack("!HHHHHH", 1, 0x8000, 1, 0, 0, 0) + b"\0\0\1\0\1"):
        with pytest.raises(DnsFormatError):
            parse_query(garbage)


# --------------------------------------------------------------------------- the wire


@pytest.fixture
async def dns() -> AsyncIterator[ClusterDNS]:
    records = {"web.apps.svc.cluster.local": ("10.96.0.20",), "db.apps.svc.cluster.local": ("10.1.1.5", "10.1.2.5")}
    server = ClusterDNS("127.0.0.1", lambda: records, port=0)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def ask(server: ClusterDNS, payload: bytes) -> bytes:
    def exchange() -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(payload, ("127.0.0.1", server.port))
            return s.recv(4096)

    return await asyncio.to_thread(exchange)


async def test_the_server_answers_a_records_with_the_query_id(dns: ClusterDNS) -> None:
    assert answer_of(await ask(dns, query("web.apps.svc.cluster.local", qid=7))) == (7, RCODE_OK, ["10.96.0.20"])
    assert answer_of(await ask(dns, query("db.apps.svc.cluster.local"))) == (0x1234, RCODE_OK, ["10.1.1.5", "10.1.2.5"])


async def test_other_types_of_a_known_name_are_empty_answers_and_unknown_names_do_not_exist(dns: ClusterDNS) -> None:
    assert answer_of(await ask(dns, query("web.apps.svc.cluster.local", qtype=28))) == (0x1234, RCODE_OK, [])
    assert answer_of(await ask(dns, query("nope.apps.svc.cluster.local"))) == (0x1234, RCODE_NXDOMAIN, [])


async def test_names_outside_the_cluster_are_resolved_by_this_machine(dns: ClusterDNS) -> None:
    _, rcode, addresses = answer_of(await ask(dns, query("localhost")))
    assert (rcode, addresses) == (RCODE_OK, ["127.0.0.1"])


async def test_a_malformed_query_gets_a_format_error_and_the_server_keeps_serving(dns: ClusterDNS) -> None:
    reply = await ask(dns, b"\x00\x2a" + b"\xff" * 5)
    qid, flags = struct.unpack("!HH", reply[:4])
    assert (qid, flags & 0xF) == (0x2A, RCODE_FORMERR)
    assert answer_of(await ask(dns, query("web.apps.svc.cluster.local")))[2] == ["10.96.0.20"]
