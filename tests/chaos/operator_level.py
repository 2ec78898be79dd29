"""Fault classes that need the Kubernetes side: the real operator, the emulated API server
and the node simulator (`pairvol.localcluster.demo.Stack`, as `make demo` and the e2e
suite run them), with agents holding their Lease.

Here the operator does the reacting; the chaos side only writes, injects and checks. The
workload follows the volume's status to the primary's export (the hostPath socket on its
node), and when the status names a new primary it pauses, reads the new primary's image and
checks it (the volume runs in Latest mode: every acknowledged write must be there), then
writes on. Because the agents hold a Lease here, the one-primary check is judged: an old
primary must stop acknowledging writes before the new one acknowledges its first.

* `operator-crash`: the primary's pod is killed and the operator is killed and restarted
  at a seeded moment of its reaction (deciding, failing over, re-protecting).
* `api-unreachable`: the primary's node cannot reach the API server (iptables DROP of its
  traffic to the API proxy, inside the node) for 1.5-4 lease durations; it must fence
  itself before the operator may promote the secondary.
* `primary-isolated`: the primary's node is partitioned from everything (failure 9): its
  workload, local to the node, goes on writing; nothing it acknowledges may be missing on
  the promoted secondary, and it must stop acknowledging before the secondary starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pairvol.aio import bounded
from pairvol.errors import PairvolError
from pairvol.nbd import NBDClient
from tests.chaos.blocks import BLOCK
from tests.chaos.checker import Violation, check_latest, check_one_primary, check_stalls
from tests.chaos.history import History
from tests.chaos.workload import Target, Workload

log = logging.getLogger(__name__)

CLASSES = {
    "operator-crash": "SIGKILL of the primary's pod, and of the operator at a seeded moment of its reaction",
    "api-unreachable": "the primary's node cannot reach the API server for 1.5-4 lease durations",
    "primary-isolated": "the primary's node is cut off from everything (secondary, API server) for 2-5 lease durations",
    "clock-skew": "operator and agents with wall clocks 30 s-10 min apart (libfaketime); primary killed or left alone",
    "api-slow": "the API server answers the primary's node (or every node) 0.3-3 s late for 1.5-4 lease durations",
}
LEASE_S = 2.0
PEER_TIMEOUT_S = 2
VOLUME = "chaos"
SIZE_MIB = 16


def manifest() -> dict[str, Any]:
    return {
        "apiVersion": "pairvol.io/v1alpha1",
        "kind": "ReplicatedVolume",
        "metadata": {"name": VOLUME},
        "spec": {
            "size": f"{SIZE_MIB}Mi",
            "checkpoint": {"intervalSeconds": 1},
            "failover": {"gracePeriodSeconds": 1, "mode": "Latest"},
            "replication": {"peerTimeoutSeconds": PEER_TIMEOUT_S},
        },
    }


class Follower:
    """Moves the workload to whatever primary the status names, checking each new one."""

    def __init__(self, stack: Any, hist: History, workload: Workload) -> None:
        self.stack = stack
        self.hist = hist
        self.workload = workload
        self.pod: str | None = None
        self.term = 0
        self.violations: list[Violation] = []
        self.notes: list[str] = []
        self.fault_at: float | None = None
        self.failovers: list[float] = []
        # status.lastRestart.epoch last checked: a primary restarted in place (it lost only
        # its Lease, docs/correctness.md H10) is checked and excused like a new primary
        self.restart_epoch: int | None = None

    async def status(self) -> dict[str, Any]:
        st: dict[str, Any] = await self.stack.status(VOLUME)
        return st

    async def read(self, sock: Path) -> bytes:
        h = self.hist
        async with await NBDClient.connect_unix(str(sock)) as nbd:
            parts = [await bounded(nbd.pread(BLOCK, h.offset(i)), 30) for i in range(h.slots)]
        return b"".join(parts)

    async def check_primary(self, what: str) -> None:
        """Latest on the current primary: the workload pauses, its writes in flight get
        their outcome, the image must hold every acknowledged write; then it writes on."""
        target = self.workload.target
        self.workload.retarget(None)
        try:
            if not await self.workload.quiesce(10.0):
                self.notes.append(f"{what}: writes still in flight after 10 s; checks of this fault skipped")
                return
            st = await self.status()
            image = await self.read(self.stack.socket_path(st))
            self.violations += check_latest(image, self.hist, time.monotonic(), f"{self.pod} {what}")
        except (OSError, TimeoutError, KeyError, PairvolError) as exc:
            self.notes.append(f"{what}: cannot read the primary: {exc}")
        finally:
            if self.workload.target is None and self.pod == (target.replica if target else None):
                self.workload.retarget(target)

    async def follow(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            try:
                st = await self.status()
            except Exception as exc:  # the API server may be slow; try again
                log.debug("status: %s", exc)
                continue
            prim = (st.get("primary") or {}).get("pod")
            if prim is None or st.get("phase") == "FailingOver" or not st.get("endpoint"):
                continue
            restart = (st.get("lastRestart") or {}).get("epoch")
            if prim == self.pod and restart is not None and restart != self.restart_epoch:
                if await self.adopt(st, prim, "restarted in place"):
                    self.restart_epoch = restart
                continue
            if prim == self.pod:
                continue
            if await self.adopt(st, prim, "failover"):
                self.restart_epoch = restart

    async def adopt(self, st: dict[str, Any], pod: str, why: str) -> bool:
        """Check the primary the status names and move the workload to it (a new primary, or
        the same one restarted in place); False if it could not be read yet."""
        sock = self.stack.socket_path(st)
        if self.pod is not None:
            t0 = time.monotonic()
            self.workload.retarget(None)
            await asyncio.sleep(0.2)
            try:
                image = await self.read(sock)
            except (OSError, TimeoutError, Exception) as exc:
                self.notes.append(f"cannot read the new primary {pod}: {exc}")
                if self.pod == pod:  # restarted in place, not serving yet: go on writing to it
                    self.workload.retarget(Target(pod, self.term, sock))
                return False
            kind = "new primary" if why == "failover" else "primary restarted in place"
            what = f"{kind} {pod} (epoch {st.get('epoch')})"
            self.violations += check_latest(image, self.hist, time.monotonic(), what)
            seen: dict[int, tuple[int, int] | None] = {}
            from tests.chaos.blocks import BadBlock, parse

            for slot in range(self.hist.slots):
                try:
                    s = parse(image[slot * BLOCK : (slot + 1) * BLOCK], self.hist.run, slot)
                except BadBlock:
                    s = None
                seen[slot] = None if s is None else (s.lane, s.seq)
            self.hist.rebase(seen)
            if self.fault_at is not None:
                self.failovers.append(time.monotonic() - self.fault_at)
            self.hist.excuse(self.fault_at or t0, time.monotonic(), why)
            if why == "failover":
                self.notes.append(f"workload moved to {pod} on {st['primary'].get('node')}")
            else:
                self.notes.append(f"{pod} restarted in place at epoch {st.get('epoch')}")
        self.pod = pod
        self.term += 1
        self.workload.retarget(Target(pod, self.term, sock))
        return True


async def settled(stack: Any, f: Follower, within: float = 120, gone: str | None = None) -> None:
    """Until the volume replicates again and the workload writes to the primary it names
    (with `gone`, a killed primary's pod: a primary other than it)."""

    async def check() -> bool:
        st = await f.status()
        prim = (st.get("primary") or {}).get("pod")
        return st.get("phase") == "Replicating" and prim is not None and prim == f.pod and prim != gone

    await stack.wait_for(f"{VOLUME} replicating with the workload on its primary", check, within, every=0.2)


async def run_operator(name: str, seed: int, res: Any, faults: int = 1) -> None:
    """Fill `res` (tests.chaos.run.Result) with one operator-level run: `faults` faults of
    the class in turn, each once the volume replicates again, each followed by the checks."""
    rng = random.Random(f"{name}:{seed}")
    res.mode = "latest"
    hist = History(run=zlib.crc32(f"{name}:{seed}".encode()), lanes=4, slots=256, stride=(SIZE_MIB << 20) // 256)
    workload = Workload(hist, random.Random(rng.random()))
    t = time.monotonic()

    def lap(name: str) -> None:
        nonlocal t
        now = time.monotonic()
        res.phases[name] = res.phases.get(name, 0.0) + now - t
        t = now

    skews = clock_skews(rng) if name == "clock-skew" else {}
    if skews:
        res.notes.append("clocks: " + ", ".join(f"{k} {v:+d} s" for k, v in skews.items()))
    # the stack's logs (operator, agents, daemons) stay after a violation: a short root of
    # the run's own, removed only when the run passed (unix socket paths live under it)
    root = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=f"pvchaos-{seed}-", dir="/tmp"))
    passed = False
    try:
        await _run_on_stack(name, rng, res, faults, hist, workload, skews, root, lap)
        passed = not res.violations
    finally:
        if passed:
            await asyncio.to_thread(shutil.rmtree, root, True)
        else:
            res.notes.append(f"logs kept: {root} (operator.log, nodes/*/pods/*)")
    lap("teardown")
    res.writes = len(hist.all_writes())
    res.acked = sum(1 for w in hist.all_writes() if w.acked is not None)


async def _run_on_stack(
    name: str,
    rng: random.Random,
    res: Any,
    faults: int,
    hist: History,
    workload: Workload,
    skews: dict[str, int],
    root: Path,
    lap: Callable[[str], None],
) -> None:
    from pairvol.localcluster.demo import DemoError, Stack

    env = faketime_env(skews.get("operator", 0))
    async with Stack.up(3, root=root, lease_duration=LEASE_S, operator_env=env) as stack:
        lap("stack up")
        for node, skew in skews.items():
            if node != "operator":
                stack.sim.node_env[node] = faketime_env(skew)
        await stack.apply(manifest())
        st = await stack.wait_phase(VOLUME, "Replicating", within=150)
        lap("volume+sync")
        if skews:
            await asyncio.to_thread(check_faketime_loaded)
        f = Follower(stack, hist, workload)
        await f.adopt(st, st["primary"]["pod"], "failover")
        f.restart_epoch = (st.get("lastRestart") or {}).get("epoch")
        workload.start()
        follow = asyncio.create_task(f.follow())
        w0 = time.monotonic()
        f.notes[:0] = res.notes
        res.notes = f.notes  # the same list: what happened so far, should the run fail
        try:
            for i in range(faults):
                await asyncio.sleep(rng.uniform(1.0, 3.0))
                st = await stack.status(VOLUME)
                f.fault_at = time.monotonic()
                old = st["primary"]
                seen = len(f.failovers)
                killed = False
                if name == "operator-crash":
                    await operator_crash(stack, f, rng, old)
                elif name == "clock-skew":
                    killed = await skewed(stack, f, rng, old)
                else:
                    hold = await FAULTS[name](stack, f, rng, old)
                    if hold:
                        # until the fenced primary is replaced, the workload cannot write
                        hist.excuse(f.fault_at, f.fault_at + hold + LEASE_S + 1 + 5, f"{name}: the primary is fenced")
                res.exercised += 1
                lap("fault")
                killed = killed or name == "operator-crash"
                if name == "api-slow":
                    # a renewal sent late in the slow window may fail after it: the primary
                    # can lose its Lease up to a lease duration (+ the operator's margin) later
                    await asyncio.sleep(LEASE_S + 0.5)
                try:
                    await settled(stack, f, gone=old["pod"] if killed else None)
                except DemoError as exc:
                    f.violations.append(Violation("failover", f"fault {i + 1}: the volume did not recover: {exc}"))
                    break
                if killed and len(f.failovers) == seen:
                    f.violations.append(Violation("failover", f"fault {i + 1}: no new primary after the fault"))
                if name == "clock-skew" and not killed and len(f.failovers) > seen:
                    f.violations.append(
                        Violation("failover", f"fault {i + 1}: a healthy primary was failed over from (clock skew)")
                    )
                lap("settle")
                if i < faults - 1:
                    await f.check_primary(f"after fault {i + 1}")
                    lap("checks")
            await asyncio.sleep(rng.uniform(0.5, 1.5))
            with contextlib.suppress(DemoError):  # the end's checks read the primary it settled on
                await settled(stack, f)
            w1 = time.monotonic()
        finally:
            await _cancel_until_done(follow)
            await workload.stop()
        res.violations = list(f.violations)
        st = await stack.status(VOLUME)
        try:
            image = await f.read(stack.socket_path(st))
        except (OSError, TimeoutError, PairvolError, KeyError) as exc:
            # a volume that serves nowhere at the end did not recover (an earlier check may
            # have said so already): a finding, not an error of the injector
            res.violations.append(
                Violation("failover", f"at the end: the primary the status names cannot be read: {exc}")
            )
        else:
            res.violations += check_latest(image, hist, time.monotonic(), f"{f.pod} at the end")
        res.violations += check_one_primary(hist)
        stalls, res.worst_gap = check_stalls(hist, PEER_TIMEOUT_S + 1.0, w0, w1)
        res.violations += stalls
        res.notes += [f"failover seen {x:.1f} s after the fault" for x in f.failovers]
        await workload.close()
        lap("checks")


async def _cancel_until_done(task: asyncio.Task[None]) -> None:
    """Cancel a loop that never ends by itself: Python 3.11's ``wait_for`` can lose a
    cancellation that arrives as its inner call completes, and the follower's loop would then
    run on while the run waited for it for ever (seen once, seed 9900 primary-isolated). The
    repository's own code no longer calls it (pairvol.aio.bounded); the libraries' code does."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
    with contextlib.suppress(BaseException):
        task.result()


async def operator_crash(stack: Any, f: Follower, rng: random.Random, old: dict[str, Any]) -> None:
    phase = rng.choice(["FailingOver", "Degraded", "Syncing"])
    delay = rng.uniform(0.0, 1.0)
    f.notes.append(f"fault: kill primary pod {old['pod']}; kill the operator {delay:.2f} s after phase {phase}")
    await stack.sim.kill_pod(stack.namespace, old["pod"])

    async def reached() -> bool:
        return (await f.status()).get("phase") == phase

    with contextlib.suppress(Exception):
        await stack.wait_for(f"phase {phase}", reached, within=30, every=0.02)
    await asyncio.sleep(delay)
    await stack.operator.restart(kill=True)


async def api_unreachable(stack: Any, f: Follower, rng: random.Random, old: dict[str, Any]) -> float:
    url = urlparse(stack.sim.in_cluster_url)
    hold = rng.uniform(1.5, 4.0) * LEASE_S
    match = ["-d", str(url.hostname), "-p", "tcp", "--dport", str(url.port), "-j", "DROP"]
    # the node's own traffic (its kubelet) and what it forwards for its pods (the agent)
    rules = [["OUTPUT", *match], ["FORWARD", *match]]
    f.notes.append(f"fault: {old['node']} cannot reach the API server for {hold:.1f} s")
    for rule in rules:
        await stack.sim.run_in_node(old["node"], ["iptables", "-w", "-I", *rule])
    try:
        await asyncio.sleep(hold)
    finally:
        for rule in rules:
            await stack.sim.run_in_node(old["node"], ["iptables", "-w", "-D", *rule])
    return hold


def from_node(stack: Any, node: str) -> Callable[[str], bool]:
    """Whether a client address is the node's own or, where pods get their own addresses
    from the node's pod CIDR (ClusterNetwork.pod_cidr), one of its pods'."""
    node_ip = ipaddress.ip_address(stack.sim.node_ip(node))
    pod_cidr = getattr(stack.sim.net, "pod_cidr", None)
    pods = ipaddress.ip_network(pod_cidr(node)) if pod_cidr is not None else None

    def match(ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return addr == node_ip or (pods is not None and addr in pods)

    return match


async def api_slow(stack: Any, f: Follower, rng: random.Random, old: dict[str, Any]) -> float:
    """Every request from the primary's node (or from every node) to the API server is held
    0.3-3 s by the API proxy the nodes reach it through. Up to 0.5 s (a third of the faults)
    nothing is excused: the writes must go on within the stall bound, unless the operator
    fails over (the Follower excuses a failover's window, as everywhere). Beyond 0.5 s
    renewals time out (the agent's API requests give up after a third of the lease) and the
    window is excused as for `api-unreachable`: the primary must fence itself before the
    operator promotes the secondary (one primary, latest)."""
    mild = rng.random() < 1 / 3
    late = rng.uniform(0.3, 0.5) if mild else rng.uniform(0.5, 3.0)
    hold = rng.uniform(1.5, 4.0) * LEASE_S
    everyone = rng.random() < 0.3
    where = "every node" if everyone else old["node"]
    f.notes.append(f"fault: API requests from {where} held {late:.2f} s for {hold:.1f} s")
    proxy = stack.sim.proxy
    slow = from_node(stack, old["node"])
    proxy.delay = lambda ip: late if everyone or slow(ip) else 0.0
    try:
        await asyncio.sleep(hold)
    finally:
        proxy.delay = None
    return 0.0 if mild else hold


FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


def clock_skews(rng: random.Random) -> dict[str, int]:
    """Seconds each clock is off by: the operator's and each node's (its agents and their
    daemons), 30 s to 10 min either way or exact; at least one differs from the others."""

    def skew() -> int:
        return rng.choice([-1, 1]) * rng.randint(30, 600) if rng.random() < 2 / 3 else 0

    skews = {"operator": skew(), **{f"node-{i}": skew() for i in (1, 2, 3)}}
    if len(set(skews.values())) == 1:
        skews["operator"] += rng.choice([-1, 1]) * rng.randint(30, 600)
    return skews


def faketime_env(skew: int) -> dict[str, str]:
    """The environment that runs a process (and its children) `skew` seconds off: NTP-like
    skew moves the wall clock only; the monotonic clock is left alone (as it is by a badly
    set wall clock), so the Lease, judged on monotonic time, must not care."""
    if not skew:
        return {}
    return {"LD_PRELOAD": str(FAKETIME_LIB), "FAKETIME": f"{skew:+d}", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def check_faketime_loaded() -> None:
    """Every process started with FAKETIME has libfaketime mapped: a launcher that drops
    LD_PRELOAD (a setuid step, a cleared environment) would make the class test nothing."""
    found = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            if not any(e.startswith(b"FAKETIME=") for e in env):
                continue
            maps = (proc / "maps").read_text()
        except OSError:
            continue
        found += 1
        if "libfaketime" not in maps:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            raise RuntimeError(f"pid {proc.name} ({cmd[:80]}) has FAKETIME but no libfaketime: LD_PRELOAD was dropped")
    if not found:
        raise RuntimeError("no process runs with FAKETIME: the skew was not applied")


async def skewed(stack: Any, f: Follower, rng: random.Random, old: dict[str, Any]) -> bool:
    """One cycle under skewed clocks: half the time the primary's pod is killed (the
    operator must fail over, once), else nothing happens for 2-4 lease durations (it must
    not: a skewed renewTime is no reason). True when the primary was killed."""
    if rng.random() < 0.5:
        f.notes.append(f"fault: kill primary pod {old['pod']} under skewed clocks")
        await stack.sim.kill_pod(stack.namespace, old["pod"])
        return True
    hold = rng.uniform(2.0, 4.0) * LEASE_S
    f.notes.append(f"fault: skewed clocks, healthy primary left alone for {hold:.1f} s")
    await asyncio.sleep(hold)
    return False


async def isolate(stack: Any, f: Follower, rng: random.Random, old: dict[str, Any]) -> float:
    """Failure 9 depends on where in the Lease's renewal period the cut falls, so the cut is
    placed at a seeded phase of it (renewals every third of the duration)."""
    from pairvol.kube.lease import parse_micro_time
    from pairvol.kube.paths import lease_path

    hold = rng.uniform(2.0, 5.0) * LEASE_S
    period = LEASE_S / 3
    phase = rng.uniform(0.0, period)
    with contextlib.suppress(Exception):
        lease = await stack.kube.get(lease_path(stack.namespace, f"pairvol-{VOLUME}"))
        renew = parse_micro_time(lease["spec"].get("renewTime"))
        if renew is not None:
            at = renew + phase
            while at < time.time():
                at += period
            await asyncio.sleep(at - time.time())
    f.fault_at = time.monotonic()
    f.notes.append(f"fault: {old['node']} partitioned from everything for {hold:.1f} s, {phase:.2f} s into a renewal")
    await stack.sim.partition_node(old["node"])
    try:
        await asyncio.sleep(hold)
    finally:
        await stack.sim.heal_node(old["node"])
    return hold


FAULTS = {"api-unreachable": api_unreachable, "primary-isolated": isolate, "api-slow": api_slow}
