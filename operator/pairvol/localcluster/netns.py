"""Per-node network namespaces for the local cluster.

Why: pairvol's failure semantics (silent partitions, a primary cut off from everything,
a dead node) can only be shown honestly if every simulated node has its own network
stack. Each node gets a Linux network namespace with one veth into a bridge that lives
in the root namespace; the root namespace gets an address on the bridge too, so services
running there (the emulated API server, via :class:`ApiProxy`) are reachable from nodes.

Pods get their own network, as with a bridge CNI plugin: every node namespace holds a
bridge (``cbr0``, the pod gateway) on the node's pod CIDR, and every pod that is not
``hostNetwork`` gets its own network namespace with one veth into that bridge, its own
IP and a default route via the gateway. So any number of pods on a node may listen on
the same port (pairvol's agents all use 7800-7802). Node namespaces forward; each one
routes the other nodes' pod CIDRs via their node IP, and the root namespace does the
same (through the cluster bridge), so the operator running on this machine reaches
agents by pod IP exactly as it would in a real cluster. ``hostNetwork`` pods stay in the
node's namespace with pod IP = node IP.

A partition is an iptables DROP of everything on the node's ``eth0``, in both
directions and for forwarded (pod) traffic too, installed *inside* the node's namespace
so the host's own firewall is never touched. DROP is silent: peers see no RST and no
ICMP, TCP just times out — which is the case pairvol must survive. (Local UDP senders on
the partitioned node get EPERM from the OUTPUT drop; TCP connects and established streams
simply stall.)

Addresses: a free ``10.X.Y.0/20`` in 10.200.0.0 to 10.249.255.0, chosen under a lock file
so concurrent clusters (colleagues' test runs) never collide, avoiding any prefix that
already appears in the root namespace's addresses or routes. Its first /24 is the node
network (bridge + node IPs), the next ones are the nodes' pod CIDRs (so at most 15
nodes). Traffic only ever goes to addresses inside namespaces we created.

Everything is async (``asyncio`` subprocesses for ``ip``/``iptables``), teardown is
idempotent and best-effort so it always runs to the end, and a clear
:class:`NetnsError` is raised when not root or when ``ip netns`` is unusable.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import ipaddress
import itertools
import logging
import os
import shutil
import signal
import socket
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from pairvol.aio import bounded, cancel_and_wait, signal_child
from pairvol.errors import PairvolError

logger = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
IFNAMSIZ_MAX = 15  # Linux interface names: at most 15 characters
SUBNET_POOL_SECOND_OCTETS = range(200, 250)
BLOCK_PREFIX = 20  # one block per cluster: node network + one /24 of pod IPs per node
POD_BRIDGE = "cbr0"  # inside each node namespace
#: Where the API server allocates ClusterIPs (the Kubernetes default service CIDR); node
#: namespaces route it to their pod bridge so that locally sent packets reach the DNAT.
SERVICE_CIDR = ipaddress.IPv4Network("10.96.0.0/12")
LOCK_FILE = Path("/run/lock/pairvol-netns.lock")
NETNS_DIR = Path("/run/netns")

_sequence = itertools.count(1)


class NetnsError(PairvolError):
    """Setting up, changing or tearing down the per-node network failed."""


@dataclass(frozen=True)
class CommandResult:
    """Outcome of one external command."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


async def run_command(
    argv: Sequence[str],
    *,
    check: bool = True,
    time_limit: float = 30.0,
    stdin: bytes | None = None,
) -> CommandResult:
    """Run ``argv`` without blocking the event loop; raise :class:`NetnsError` on failure."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError as exc:
        raise NetnsError(f"cannot run {argv[0]!r}: not found in PATH; install iproute2/iptables") from exc
    try:
        out, err = await bounded(proc.communicate(stdin), time_limit)
    except TimeoutError:
        signal_child(proc, signal.SIGKILL)
        await proc.wait()
        raise NetnsError(f"{' '.join(argv)} did not finish within {time_limit}s") from None
    except asyncio.CancelledError:
        signal_child(proc, signal.SIGKILL)  # e.g. a probe of a node being killed
        await asyncio.shield(proc.wait())
        raise
    result = CommandResult(
        tuple(argv),
        proc.returncode if proc.returncode is not None else -1,
        out.decode(errors="replace"),
        err.decode(errors="replace"),
    )
    if check and result.returncode != 0:
        raise NetnsError(
            f"{' '.join(argv)} failed with exit code {result.returncode}: "
            f"{result.stderr.strip() or result.stdout.strip()}"
        )
    return result


# ---------------------------------------------------------------------------------------
# Pure planning (no I/O): names and addresses
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodePlan:
    """Names and address of one node's network, decided before anything is created."""

    node: str
    index: int
    netns: str
    host_veth: str
    peer_veth: str
    ip: ipaddress.IPv4Address
    pod_cidr: ipaddress.IPv4Network

    @property
    def pod_gateway(self) -> ipaddress.IPv4Address:
        return self.pod_cidr.network_address + 1


@dataclass(frozen=True)
class NetworkPlan:
    """The whole cluster network: bridge, its address, and one :class:`NodePlan` per node."""

    token: str
    bridge: str
    subnet: ipaddress.IPv4Network
    bridge_ip: ipaddress.IPv4Address
    nodes: tuple[NodePlan, ...]


def make_token(pid: int, sequence: int) -> str:
    """Unique-per-cluster token: owner PID and a per-process counter, in hex."""
    return f"{pid:x}x{sequence:x}"


def owner_pid_of(name: str) -> int | None:
    """The owner PID encoded in one of our interface/netns names, or None if not ours."""
    for prefix in ("pvb", "pvn", "pvh", "pvp"):
        if name.startswith(prefix):
            token = name[len(prefix) :].split("-", 1)[0]
            pid_hex, sep, _ = token.partition("x")
            if sep and pid_hex:
                try:
                    return int(pid_hex, 16)
                except ValueError:
                    return None
    return None


def used_prefixes(addr_output: str, route_output: str) -> list[ipaddress.IPv4Network]:
    """Parse ``ip -4 -o addr show`` and ``ip -4 route show`` into the prefixes in use."""
    prefixes: list[ipaddress.IPv4Network] = []
    for line in addr_output.splitlines():
        parts = line.split()
        if "inet" in parts:
            cidr = parts[parts.index("inet") + 1]
            with contextlib.suppress(ValueError):
                prefixes.append(ipaddress.IPv4Interface(cidr).network)
    for line in route_output.splitlines():
        parts = line.split()
        if not parts or parts[0] == "default":
            continue
        with contextlib.suppress(ValueError):
            prefixes.append(ipaddress.IPv4Network(parts[0], strict=False))
    return prefixes


def choose_subnet(
    used: Iterable[ipaddress.IPv4Network], seed: int, prefixlen: int = BLOCK_PREFIX
) -> ipaddress.IPv4Network:
    """First block of ``prefixlen`` in 10.200-249.x.0 (starting at a seed-derived one)
    overlapping nothing used."""
    used_list = list(used)
    pool = [ipaddress.IPv4Network(f"10.{octet}.0.0/16") for octet in SUBNET_POOL_SECOND_OCTETS]
    candidates = [block for net in pool for block in net.subnets(new_prefix=prefixlen)]
    start = seed % len(candidates)
    for offset in range(len(candidates)):
        candidate = candidates[(start + offset) % len(candidates)]
        if not any(candidate.overlaps(prefix) for prefix in used_list):
            return candidate
    raise NetnsError(f"no free /{prefixlen} left in 10.200.0.0-10.249.255.0 for a local cluster network")


def plan_network(nodes: Sequence[str], token: str, block: ipaddress.IPv4Network) -> NetworkPlan:
    """Derive every name and address from the token and the cluster's address block: its
    first /24 is the node network, the following /24s are the nodes' pod CIDRs."""
    if not nodes:
        raise NetnsError("a cluster network needs at least one node name")
    if len(set(nodes)) != len(nodes):
        raise NetnsError(f"node names must be unique, got {list(nodes)}")
    if block.prefixlen > 24:
        raise NetnsError(f"address block {block} is smaller than a /24")
    twenty_fours = list(block.subnets(new_prefix=24))
    if len(nodes) + 1 > len(twenty_fours):
        raise NetnsError(
            f"{len(nodes)} nodes do not fit into {block}: each needs a /24 of pod IPs "
            f"(at most {len(twenty_fours) - 1} nodes)"
        )
    subnet = twenty_fours[0]
    hosts = list(subnet.hosts())
    bridge = f"pvb{token}"
    plans = []
    for index, node in enumerate(nodes):
        host_veth = f"pvh{token}-{index}"
        peer_veth = f"pvp{token}-{index}"
        if max(len(bridge), len(host_veth), len(peer_veth)) > IFNAMSIZ_MAX:
            raise NetnsError(f"interface name {host_veth!r} is longer than {IFNAMSIZ_MAX}")
        plans.append(
            NodePlan(
                node=node,
                index=index,
                netns=f"pvn{token}-{index}",
                host_veth=host_veth,
                peer_veth=peer_veth,
                ip=hosts[index + 1],
                pod_cidr=twenty_fours[index + 1],
            )
        )
    return NetworkPlan(token=token, bridge=bridge, subnet=subnet, bridge_ip=hosts[0], nodes=tuple(plans))


def partition_rules(action: str) -> list[list[str]]:
    """iptables argv (to run inside the node's netns) that add (-I) or delete (-D) the drop:
    the node's own traffic (INPUT/OUTPUT) and its pods' (FORWARD), both ways."""
    return [
        ["iptables", "-w", action, "INPUT", "-i", "eth0", "-j", "DROP"],
        ["iptables", "-w", action, "OUTPUT", "-o", "eth0", "-j", "DROP"],
        ["iptables", "-w", action, "FORWARD", "-i", "eth0", "-j", "DROP"],
        ["iptables", "-w", action, "FORWARD", "-o", "eth0", "-j", "DROP"],
    ]


def allocate_pod_ip(
    pod_cidr: ipaddress.IPv4Network,
    in_use: Iterable[ipaddress.IPv4Address],
    after: ipaddress.IPv4Address | None = None,
) -> ipaddress.IPv4Address:
    """A free pod address of a node (the first host is the gateway): the first free one
    after ``after`` (the address handed out last), wrapping around, as host-local IPAM does.

    A freed address is reused last: the neighbour caches of the node and of the pods that
    talked to the old pod still map it to the old pod's interface for a while, and a new
    pod behind that address would be unreachable until they expire."""
    taken = set(in_use)
    hosts = list(pod_cidr.hosts())[1:]
    start = hosts.index(after) + 1 if after in hosts else 0
    for address in hosts[start:] + hosts[:start]:
        if address not in taken:
            return address
    raise NetnsError(f"no free pod IP left in {pod_cidr}: too many pods on this node")


@dataclass(frozen=True)
class PodSandbox:
    """A pod's own network: its namespace (named for cleanup by owner PID) and address."""

    node: str
    netns: str
    ip: ipaddress.IPv4Address
    node_veth: str


# ---------------------------------------------------------------------------------------
# I/O
# ---------------------------------------------------------------------------------------


async def check_prerequisites() -> None:
    """Raise :class:`NetnsError` with what to do if this machine cannot host node namespaces."""
    if os.geteuid() != 0:
        raise NetnsError(
            "per-node network namespaces need root (ip netns, veth, iptables); "
            "run as root or deselect tests marked 'netns' (pytest -m 'not netns')"
        )
    for tool in ("ip", "iptables", "unshare", "mount"):
        if shutil.which(tool) is None:
            raise NetnsError(f"{tool!r} not found in PATH; install iproute2, iptables, util-linux")
    result = await run_command(["ip", "netns", "list"], check=False)
    if result.returncode != 0:
        raise NetnsError(f"'ip netns' is unavailable here: {result.stderr.strip()}")


def _libc_setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET) failed: {os.strerror(err)}")


def _enter_netns(path: str) -> None:
    """Thread initializer: move this (executor) thread into the given network namespace."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _libc_setns(fd)
    finally:
        os.close(fd)


@dataclass
class _NodeState:
    plan: NodePlan
    partitioned: bool = False
    executor: ThreadPoolExecutor | None = None
    pods: dict[str, PodSandbox] = field(default_factory=dict)  # by netns name
    last_ip: ipaddress.IPv4Address | None = None  # handed out last


class _FileLock:
    """An exclusive flock taken in a thread so the event loop never blocks on it."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    async def __aenter__(self) -> None:
        def acquire() -> int:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            return fd

        self._fd = await asyncio.to_thread(acquire)

    async def __aexit__(self, *exc: object) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            await asyncio.to_thread(os.close, fd)  # closing releases the flock


@dataclass
class ClusterNetwork:
    """The bridge, node namespaces and partitions of one local cluster.

    ``async with ClusterNetwork(["node-a", "node-b"]) as net:`` creates everything;
    leaving the block removes it all (also on errors). Safe to ``close()`` twice.
    """

    node_names: Sequence[str]
    plan: NetworkPlan | None = field(default=None, init=False)
    _nodes: dict[str, _NodeState] = field(default_factory=dict, init=False)
    _created: list[tuple[str, str]] = field(default_factory=list, init=False)
    _closed: bool = field(default=False, init=False)

    async def __aenter__(self) -> ClusterNetwork:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        await check_prerequisites()
        token = make_token(os.getpid(), next(_sequence))
        try:
            async with _FileLock(LOCK_FILE):
                await reap_stale()
                addrs = await run_command(["ip", "-4", "-o", "addr", "show"])
                routes = await run_command(["ip", "-4", "route", "show", "table", "all"])
                used = used_prefixes(addrs.stdout, _main_routes(routes.stdout))
                subnet = choose_subnet(used, seed=zlib.crc32(token.encode()))
                self.plan = plan_network(self.node_names, token, subnet)
                await self._create_bridge(self.plan)
            for node_plan in self.plan.nodes:
                await self._create_node(self.plan, node_plan)
            await self._create_routes(self.plan)
        except BaseException:
            await self.close()
            raise
        logger.info(
            "cluster network %s up: bridge %s %s, nodes %s",
            token,
            self.plan.bridge,
            self.plan.subnet,
            {n.node: str(n.ip) for n in self.plan.nodes},
        )

    async def _create_bridge(self, plan: NetworkPlan) -> None:
        await run_command(["ip", "link", "add", plan.bridge, "type", "bridge"])
        self._created.append(("link", plan.bridge))
        prefix = plan.subnet.prefixlen
        await run_command(["ip", "addr", "add", f"{plan.bridge_ip}/{prefix}", "dev", plan.bridge])
        await run_command(["ip", "link", "set", plan.bridge, "up"])

    async def _create_node(self, plan: NetworkPlan, node: NodePlan) -> None:
        await run_command(["ip", "netns", "add", node.netns])
        self._created.append(("netns", node.netns))
        await run_command(["ip", "link", "add", node.host_veth, "type", "veth", "peer", "name", node.peer_veth])
        self._created.append(("link", node.host_veth))
        await run_command(["ip", "link", "set", node.host_veth, "master", plan.bridge, "up"])
        await run_command(["ip", "link", "set", node.peer_veth, "netns", node.netns])
        inside = ["ip", "-n", node.netns]
        await run_command([*inside, "link", "set", node.peer_veth, "name", "eth0"])
        await run_command([*inside, "addr", "add", f"{node.ip}/{plan.subnet.prefixlen}", "dev", "eth0"])
        await run_command([*inside, "link", "set", "eth0", "up"])
        await run_command([*inside, "link", "set", "lo", "up"])
        self._nodes[node.node] = _NodeState(plan=node)
        # the pod bridge: gateway of the node's pod CIDR; the node forwards for its pods
        await run_command([*inside, "link", "add", POD_BRIDGE, "type", "bridge"])
        await run_command([*inside, "addr", "add", f"{node.pod_gateway}/{node.pod_cidr.prefixlen}", "dev", POD_BRIDGE])
        await run_command([*inside, "link", "set", POD_BRIDGE, "up"])
        await run_command([*inside, "route", "add", str(SERVICE_CIDR), "dev", POD_BRIDGE])
        # per namespace, off in a new one (written directly: no dependency on procps' sysctl)
        await run_command(["ip", "netns", "exec", node.netns, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])

    async def _create_routes(self, plan: NetworkPlan) -> None:
        """Every node, and this machine, reach every pod CIDR via its node's IP."""
        for node in plan.nodes:
            for other in plan.nodes:
                if other is not node:
                    route = ["route", "add", str(other.pod_cidr), "via", str(other.ip), "dev", "eth0"]
                    await run_command(["ip", "-n", node.netns, *route])
            # removed together with the bridge
            await run_command(["ip", "route", "add", str(node.pod_cidr), "via", str(node.ip), "dev", plan.bridge])

    # -- pod sandboxes ------------------------------------------------------------------

    async def add_pod(self, node: str) -> PodSandbox:
        """Create a pod's network namespace with an address from ``node``'s pod CIDR.

        Undone by :meth:`remove_pod` (and by :meth:`close` for whatever is left)."""
        if self._closed or self.plan is None:
            raise NetnsError("cluster network is not running")
        state = self._state(node)
        seq = next(_sequence)
        name = f"{state.plan.netns}p{seq:x}"
        node_veth = f"veth{seq:x}"
        if len(node_veth) > IFNAMSIZ_MAX:
            raise NetnsError(f"interface name {node_veth!r} is longer than {IFNAMSIZ_MAX}")
        ip = allocate_pod_ip(state.plan.pod_cidr, (p.ip for p in state.pods.values()), state.last_ip)
        state.last_ip = ip
        sandbox = PodSandbox(node=node, netns=name, ip=ip, node_veth=node_veth)
        state.pods[name] = sandbox  # the address is taken from here on
        try:
            await run_command(["ip", "netns", "add", name])
            self._created.append(("netns", name))
            await run_command(
                [
                    *("ip", "-n", state.plan.netns, "link", "add", node_veth, "type", "veth"),
                    *("peer", "name", "eth0", "netns", name),
                ]
            )
            await run_command(["ip", "-n", state.plan.netns, "link", "set", node_veth, "master", POD_BRIDGE, "up"])
            inside = ["ip", "-n", name]
            prefix = state.plan.pod_cidr.prefixlen
            await run_command([*inside, "addr", "add", f"{ip}/{prefix}", "dev", "eth0"])
            await run_command([*inside, "link", "set", "eth0", "up"])
            await run_command([*inside, "link", "set", "lo", "up"])
            await run_command([*inside, "route", "add", "default", "via", str(state.plan.pod_gateway)])
            if self._closed:  # close() ran meanwhile and did not see this namespace yet
                raise NetnsError("cluster network closed while a pod network was being set up")
        except BaseException:
            await self.remove_pod(sandbox, force=True)
            raise
        return sandbox

    async def remove_pod(self, sandbox: PodSandbox, *, force: bool = False) -> None:
        """Delete the pod's interface and namespace and free its address. Idempotent.

        The veth is deleted first, as a CNI plugin's DEL does, rather than left to go with
        the namespace: ``ip netns del`` only drops the name, and the namespace lives on while
        anything holds it — a socket made in it does, e.g. a killed agent's TCP connection
        still retransmitting its FIN to a peer behind a partition, for minutes. Until then
        its interface stayed on the node's bridge with the pod's address, and a new pod given
        that address shared it with a dead namespace: replies went to whichever answered ARP
        last (connections refused, the API server unreachable, probes failing)."""
        state = self._nodes.get(sandbox.node)
        if state is not None:
            state.pods.pop(sandbox.netns, None)
        entry = ("netns", sandbox.netns)
        if entry not in self._created and not force:
            return  # never created, or already removed (by close() too)
        if state is not None:
            link = await run_command(["ip", "-n", state.plan.netns, "link", "del", sandbox.node_veth], check=False)
            if link.returncode != 0 and not any(b in link.stderr for b in ("Cannot find", "does not exist", "No such")):
                logger.warning("removing pod interface %s: %s", sandbox.node_veth, link.stderr.strip())
        result = await run_command(["ip", "netns", "del", sandbox.netns], check=False)
        if result.returncode != 0 and "No such" not in result.stderr:
            logger.warning("removing pod network %s: %s", sandbox.netns, result.stderr.strip())
        # forgotten only once gone: if this is cancelled midway, close() still removes it
        if entry in self._created:
            self._created.remove(entry)

    async def close(self) -> None:
        """Remove namespaces, veths and the bridge; best effort, never raises, idempotent."""
        if self._closed:
            return
        self._closed = True
        for state in self._nodes.values():
            if state.executor is not None:
                # The executor thread holds a reference to the netns; let it go first.
                state.executor.shutdown(wait=False, cancel_futures=True)
                state.executor = None
        created, self._created = list(self._created), []
        for kind, name in reversed(created):
            argv = ["ip", "netns", "del", name] if kind == "netns" else ["ip", "link", "del", name]
            try:
                result = await run_command(argv, check=False)
            except Exception as exc:  # keep tearing down the rest
                logger.warning("teardown of %s %s failed: %s", kind, name, exc)
                continue
            benign = ("No such", "Cannot find", "does not exist")
            if result.returncode != 0 and not any(b in result.stderr for b in benign):
                logger.warning("teardown %s: %s", " ".join(argv), result.stderr.strip())

    # -- queries ------------------------------------------------------------------------

    def _state(self, node: str) -> _NodeState:
        try:
            return self._nodes[node]
        except KeyError:
            raise NetnsError(f"unknown node {node!r}; this cluster network has {sorted(self._nodes)}") from None

    def node_ip(self, node: str) -> str:
        return str(self._state(node).plan.ip)

    def pod_cidr(self, node: str) -> str:
        return str(self._state(node).plan.pod_cidr)

    def netns_name(self, node: str) -> str:
        return self._state(node).plan.netns

    @property
    def bridge_ip(self) -> str:
        if self.plan is None:
            raise NetnsError("cluster network not started")
        return str(self.plan.bridge_ip)

    def is_partitioned(self, node: str) -> bool:
        return self._state(node).partitioned

    def exec_argv(self, node: str, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs in the node's network namespace."""
        return ["ip", "netns", "exec", self.netns_name(node), *argv]

    async def run_in_node(
        self, node: str, argv: Sequence[str], *, time_limit: float = 30.0, check: bool = False
    ) -> CommandResult:
        """Run a command inside the node's network namespace and collect its output."""
        return await run_command(self.exec_argv(node, argv), check=check, time_limit=time_limit)

    # -- sockets from inside a node ------------------------------------------------------

    def _executor(self, node: str) -> ThreadPoolExecutor:
        state = self._state(node)
        if state.executor is None:
            state.executor = ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix=f"netns-{state.plan.netns}",
                initializer=_enter_netns,
                initargs=(str(NETNS_DIR / state.plan.netns),),
            )
        return state.executor

    async def socket_in_node(self, node: str) -> socket.socket:
        """A fresh non-blocking TCP socket that lives in the node's network namespace."""
        loop = asyncio.get_running_loop()
        sock = await loop.run_in_executor(self._executor(node), socket.socket, socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        return sock

    async def open_connection(
        self, node: str, host: str, port: int, *, time_limit: float = 5.0
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a TCP connection *from inside* ``node`` (e.g. to reach a pod as a peer would).

        Raises ``TimeoutError`` when nothing answers (e.g. a partition), ``OSError`` otherwise.
        """
        sock = await self.socket_in_node(node)
        loop = asyncio.get_running_loop()
        try:
            await bounded(loop.sock_connect(sock, (host, port)), time_limit)
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    # -- faults -------------------------------------------------------------------------

    async def partition(self, node: str) -> None:
        """Silently drop all of the node's traffic on its link, both ways. Idempotent."""
        state = self._state(node)
        if state.partitioned:
            return
        for argv in partition_rules("-I"):
            await self.run_in_node(node, argv, check=True)
        state.partitioned = True
        logger.info("node %s partitioned (%s)", node, state.plan.ip)

    async def heal(self, node: str) -> None:
        """Remove the partition rules. Idempotent."""
        state = self._state(node)
        for argv in partition_rules("-D"):
            # Delete until gone, so a half-applied partition is healed too.
            for _ in range(10):
                result = await self.run_in_node(node, argv)
                if result.returncode != 0:
                    break
        state.partitioned = False
        logger.info("node %s healed", node)


def _main_routes(route_output: str) -> str:
    """Keep only unicast routes of interest (skip local/broadcast entries of table local)."""
    keep = []
    for line in route_output.splitlines():
        first = line.split(" ", 1)[0]
        if first in ("local", "broadcast", "unreachable", "prohibit", "blackhole", "multicast"):
            continue
        keep.append(line)
    return "\n".join(keep)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def reap_stale() -> list[str]:
    """Delete bridges/veths/namespaces of ours whose owner process no longer exists.

    A test runner killed with SIGKILL cannot tear down; the next cluster cleans up after it.
    Only names with our prefixes and a dead owner PID are touched. Returns what was removed.
    """
    removed: list[str] = []
    links = await run_command(["ip", "-o", "link", "show"], check=False)
    for line in links.stdout.splitlines():
        parts = line.split(":")
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@", 1)[0]
        pid = owner_pid_of(name)
        if pid is not None and name[:3] in ("pvb", "pvh") and not _pid_alive(pid):
            await run_command(["ip", "link", "del", name], check=False)
            removed.append(name)
    namespaces = await run_command(["ip", "netns", "list"], check=False)
    for line in namespaces.stdout.splitlines():
        name = line.split(" ", 1)[0]
        pid = owner_pid_of(name)
        if pid is not None and name.startswith("pvn") and not _pid_alive(pid):
            await run_command(["ip", "netns", "del", name], check=False)
            removed.append(name)
    if removed:
        logger.warning("removed leftovers of dead local clusters: %s", removed)
    return removed


class ApiProxy:
    """TCP forwarder from ``bridge_ip:port`` (reachable from nodes) to the API server.

    The emulated API server may listen on loopback only; pods inside node namespaces reach it
    through this proxy. A partitioned node is cut off from it like from everything else.
    ``delay`` (the fault injector's slow API server) maps a client's address to seconds by
    which each of its requests is held before it is passed on (0: none).
    """

    def __init__(self, listen_host: str, target_host: str, target_port: int) -> None:
        self._listen_host = listen_host
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self.delay: Callable[[str], float] | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._listen_host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        await cancel_and_wait(*self._tasks)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self._target)
            except OSError as exc:
                logger.warning("API proxy cannot reach %s:%s: %s", *self._target, exc)
                return

            peer = str((writer.get_extra_info("peername") or ("",))[0])

            async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, slow: bool = False) -> None:
                try:
                    while data := await src.read(65536):
                        if slow and self.delay is not None and (hold := self.delay(peer)) > 0:
                            await asyncio.sleep(hold)
                        dst.write(data)
                        await dst.drain()
                except (ConnectionError, OSError):
                    pass
                finally:
                    with contextlib.suppress(Exception):
                        dst.close()

            await asyncio.gather(pump(reader, up_writer, slow=True), pump(up_reader, writer))
        except asyncio.CancelledError:
            # close() ends the connections; the server's done-callback would report a
            # cancelled handler task as an error, so it ends normally instead
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()
            if task is not None:
                self._tasks.discard(task)
