"""Cluster DNS for the local cluster: Service and pod names resolve inside pods.

Why: workloads find pairvol volumes by their Service's name (``basic`` from namespace
``apps``, ``basic.apps.svc``), as examples/workload.yaml does; without cluster DNS only
IP addresses would work and the examples would not run as they would in a real cluster.

What a real cluster does, kept: CoreDNS's ``kubernetes`` plugin answers from Services and
Endpoints, and the kubelet writes every pod a resolv.conf (``dnsPolicy: ClusterFirst``)
whose search path makes a short name find the Service of the pod's own namespace first.
Here :class:`ClusterDNS` answers UDP queries on the cluster bridge's address in the root
namespace (reachable from every node and pod, cut off from a partitioned node like
everything else); the records come from the Service router's view of Services and Pods
(:func:`cluster_records`); names outside ``cluster.local`` go to this machine's resolver.
Answered: A (and empty answers for other types of known names, so a resolver asking for
AAAA first does not give up), for

* ``<service>.<namespace>.svc.cluster.local``: the ClusterIP, or for a headless Service
  the IPs of its ready pods;
* ``<hostname>.<subdomain>.<namespace>.svc.cluster.local``: a pod with ``hostname`` and
  ``subdomain`` naming a headless Service (StatefulSet pods);
* ``<a-b-c-d>.<namespace>.pod.cluster.local``: that address.

The wire format is RFC 1035's (header, one question, A records with a compression pointer
to the question's name); parsing and answering are pure and tested without sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pairvol.aio import bounded, cancel_and_wait
from pairvol.errors import PairvolError

logger = logging.getLogger(__name__)

DOMAIN = "cluster.local"
TTL_SECONDS = 5
TYPE_A, TYPE_ANY, CLASS_IN = 1, 255, 1
RCODE_OK, RCODE_FORMERR, RCODE_SERVFAIL, RCODE_NXDOMAIN, RCODE_NOTIMP = 0, 1, 2, 3, 4
FORWARD_TIMEOUT_S = 2.0

Records = Mapping[str, tuple[str, ...]]


class DnsFormatError(PairvolError):
    """A datagram that is not a DNS query this server understands."""


@dataclass(frozen=True)
class Query:
    id: int
    flags: int
    name: str  # lower case, no trailing dot
    qtype: int
    qclass: int
    question: bytes  # the question section as received (echoed in the answer)


def parse_query(data: bytes) -> Query:
    """The first question of a standard query; :class:`DnsFormatError` for anything else."""
    if len(data) < 12:
        raise DnsFormatError("shorter than a DNS header")
    qid, flags, qdcount = struct.unpack("!HHH", data[:6])
    if flags & 0x8000:
        raise DnsFormatError("a response, not a query")
    if qdcount < 1:
        raise DnsFormatError("no question")
    labels, at = [], 12
    while True:
        if at >= len(data):
            raise DnsFormatError("name runs past the end")
        length = data[at]
        at += 1
        if length == 0:
            break
        if length & 0xC0:
            raise DnsFormatError("compressed name in a question")
        labels.append(data[at : at + length].decode("ascii", errors="replace"))
        at += length
    if at + 4 > len(data):
        raise DnsFormatError("question without type and class")
    qtype, qclass = struct.unpack("!HH", data[at : at + 4])
    return Query(qid, flags, ".".join(labels).lower(), qtype, qclass, data[12 : at + 4])


def encode_response(query: Query, rcode: int, addresses: Iterable[str] = (), authoritative: bool = True) -> bytes:
    """The answer to ``query``: its question echoed, then one A record per address."""
    answers = b""
    count = 0
    for address in addresses:
        rdata = ipaddress.IPv4Address(address).packed
        # 0xC00C: the name at offset 12, the question's
        answers += struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, TTL_SECONDS, len(rdata)) + rdata
        count += 1
    opcode_rd = query.flags & 0x7900  # opcode and RD as asked
    flags = 0x8000 | opcode_rd | 0x0080 | (0x0400 if authoritative else 0) | (rcode & 0xF)
    return struct.pack("!HHHHHH", query.id, flags, 1, count, 0, 0) + query.question + answers


def _is_ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _serving(pod: Mapping[str, Any], namespace: str) -> bool:
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    return (
        str(meta.get("namespace") or "default") == namespace
        and not meta.get("deletionTimestamp")
        and bool(status.get("podIP"))
        and status.get("phase") not in ("Succeeded", "Failed")
    )


def cluster_records(
    services: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]], domain: str = DOMAIN
) -> dict[str, tuple[str, ...]]:
    """Every name the cluster DNS knows, with its addresses (possibly none: a headless
    Service without ready pods exists but has no address)."""
    pods = list(pods)
    records: dict[str, tuple[str, ...]] = {}
    for service in services:
        meta, spec = service.get("metadata") or {}, service.get("spec") or {}
        name, namespace = str(meta.get("name")), str(meta.get("namespace") or "default")
        fqdn = f"{name}.{namespace}.svc.{domain}"
        cluster_ip = str(spec.get("clusterIP") or "")
        selector = spec.get("selector") or {}
        if cluster_ip not in ("", "None"):
            records[fqdn] = (cluster_ip,)
            continue
        members = [
            p
            for p in pods
            if _serving(p, namespace)
            and selector
            and all(((p.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in selector.items())
        ]
        publish_not_ready = bool(spec.get("publishNotReadyAddresses", False))
        chosen = sorted(str(p["status"]["podIP"]) for p in members if publish_not_ready or _is_ready(p))
        records[fqdn] = tuple(chosen)
        for pod in members:
            pod_spec = pod.get("spec") or {}
            named = pod_spec.get("subdomain") == name and pod_spec.get("hostname")
            if named and (publish_not_ready or _is_ready(pod)):
                records[f"{pod_spec['hostname']}.{fqdn}"] = (str(pod["status"]["podIP"]),)
    return records


def lookup(name: str, records: Records, domain: str = DOMAIN) -> tuple[int, tuple[str, ...]] | None:
    """(rcode, addresses) for a name in the cluster's domain; None for a name outside it."""
    if name != domain and not name.endswith("." + domain):
        return None
    if name in records:
        return RCODE_OK, records[name]
    pod_suffix = f".pod.{domain}"
    if name.endswith(pod_suffix):  # a-b-c-d.<namespace>.pod.cluster.local
        head = name[: -len(pod_suffix)].split(".")
        if len(head) == 2:
            with contextlib.suppress(ValueError):
                return RCODE_OK, (str(ipaddress.IPv4Address(head[0].replace("-", "."))),)
    # a name below an existing one (e.g. svc.cluster.local itself) exists without records
    if any(known.endswith("." + name) for known in records):
        return RCODE_OK, ()
    return RCODE_NXDOMAIN, ()


def resolv_conf(pod: Mapping[str, Any], nameserver: str, domain: str = DOMAIN) -> str | None:
    """The resolv.conf the kubelet gives a pod, or None where it keeps the node's
    (``dnsPolicy: Default``, or ``hostNetwork`` without ``ClusterFirstWithHostNet``)."""
    spec = pod.get("spec") or {}
    namespace = str((pod.get("metadata") or {}).get("namespace") or "default")
    policy = str(spec.get("dnsPolicy") or "ClusterFirst")
    config = spec.get("dnsConfig") or {}
    if policy == "Default" or (spec.get("hostNetwork") and policy == "ClusterFirst"):
        return None
    if policy == "None":
        servers, searches, options = [], [], []
    else:
        servers = [nameserver]
        searches = [f"{namespace}.svc.{domain}", f"svc.{domain}", domain]
        options = [{"name": "ndots", "value": "5"}]
    servers += [str(s) for s in config.get("nameservers") or []]
    searches += [str(s) for s in config.get("searches") or [] if s not in searches]
    merged: dict[str, str | None] = {str(o["name"]): o.get("value") for o in options}
    merged.update({str(o.get("name")): o.get("value") for o in config.get("options") or []})
    lines = [f"nameserver {s}" for s in servers[:3]]
    if searches:
        lines.append("search " + " ".join(searches))
    if merged:
        lines.append("options " + " ".join(k if v is None else f"{k}:{v}" for k, v in merged.items()))
    return "\n".join(lines) + "\n"


class ClusterDNS(asyncio.DatagramProtocol):
    """The cluster's DNS server on ``host:53`` (UDP). ``records`` is called per query."""

    def __init__(self, host: str, records: Callable[[], Records], port: int = 53) -> None:
        self.host, self.port = host, port
        self._records = records
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(self.host, self.port))
        self._transport = transport
        self.port = transport.get_extra_info("sockname")[1]

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        await cancel_and_wait(*self._tasks)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            query = parse_query(data)
        except DnsFormatError as exc:
            logger.debug("cluster DNS: malformed query from %s: %s", addr, exc)
            if len(data) >= 2 and self._transport is not None:  # FORMERR with the same id
                self._transport.sendto(struct.pack("!HHHHHH", *struct.unpack("!H", data[:2]), 0x8001, 0, 0, 0, 0), addr)
            return
        answer = self._answer_local(query)
        if answer is not None:
            self._send(answer, addr)
            return
        task = asyncio.get_running_loop().create_task(self._forward(query, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _answer_local(self, query: Query) -> bytes | None:
        if query.qclass != CLASS_IN or (query.flags >> 11) & 0xF:
            return encode_response(query, RCODE_NOTIMP)
        found = lookup(query.name, self._records())
        if found is None:
            return None
        rcode, addresses = found
        return encode_response(query, rcode, addresses if query.qtype in (TYPE_A, TYPE_ANY) else ())

    async def _forward(self, query: Query, addr: tuple[str, int]) -> None:
        """A name outside the cluster: what this machine's resolver says (A only)."""
        loop = asyncio.get_running_loop()
        try:
            infos = await bounded(
                loop.getaddrinfo(query.name, None, family=socket.AF_INET, type=socket.SOCK_STREAM), FORWARD_TIMEOUT_S
            )
        except socket.gaierror:
            self._send(encode_response(query, RCODE_NXDOMAIN, authoritative=False), addr)
            return
        except TimeoutError:
            self._send(encode_response(query, RCODE_SERVFAIL, authoritative=False), addr)
            return
        addresses = sorted({str(info[4][0]) for info in infos})
        wanted = addresses if query.qtype in (TYPE_A, TYPE_ANY) else []
        self._send(encode_response(query, RCODE_OK, wanted, authoritative=False), addr)

    def _send(self, payload: bytes, addr: tuple[str, int]) -> None:
        if self._transport is not None:
            self._transport.sendto(payload, addr)
