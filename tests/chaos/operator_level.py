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
import logging
import random
import time
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

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

    async def status(self) -> dict[str, Any]:
        st: dict[str, Any] = await self.stack.status(VOLUME)
        return st

    async def read(self, sock: Path) -> bytes:
        h = self.hist
        async with await NBDClient.connect_unix(str(sock)) as nbd:
            parts = [await asyncio.wait_for(nbd.pread(BLOCK, h.offset(i)), 30) for i in range(h.slots)]
        return b"".join(parts)

    async def follow(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            try:
                st = await self.status()
            except Exception as exc:  # the API server may be slow; try again
                log.debug("status: %s", exc)
                continue
            prim = (st.get("primary") or {}).get("pod")
            if prim is None or prim == self.pod or st.get("phase") == "FailingOver" or not st.get("endpoint"):
                continue
            await self.adopt(st, prim)

    async def adopt(self, st: dict[str, Any], pod: str) -> None:
        sock = self.stack.socket_path(st)
        if self.pod is not None:
            t0 = time.monotonic()
            self.workload.retarget(None)
            await asyncio.sleep(0.2)
            try:
                image = await self.read(sock)
            except (OSError, TimeoutError, Exception) as exc:
                self.notes.append(f"cannot read the new primary {pod}: {exc}")
                return
            what = f"new primary {pod} (epoch {st.get('epoch')})"
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
            self.hist.excuse(self.fault_at or t0, time.monotonic(), "failover")
            self.notes.append(f"workload moved to {pod} on {st['primary'].get('node')}")
        self.pod = pod
        self.term += 1
        self.workload.retarget(Target(pod, self.term, sock))


async def run_operator(name: str, seed: int, res: Any) -> None:
    """Fill `res` (tests.chaos.run.Result) with one operator-level run."""
    from pairvol.localcluster.demo import Stack

    rng = random.Random(f"{name}:{seed}")
    res.mode = "latest"
    hist = History(run=zlib.crc32(f"{name}:{seed}".encode()), lanes=4, slots=256, stride=(SIZE_MIB << 20) // 256)
    workload = Workload(hist, random.Random(rng.random()))
    async with Stack.up(3, lease_duration=LEASE_S) as stack:
        await stack.apply(manifest())
        st = await stack.wait_phase(VOLUME, "Replicating", within=150)
        f = Follower(stack, hist, workload)
        await f.adopt(st, st["primary"]["pod"])
        workload.start()
        follow = asyncio.create_task(f.follow())
        w0 = time.monotonic()
        try:
            await asyncio.sleep(rng.uniform(1.0, 3.0))
            f.fault_at = time.monotonic()
            old = st["primary"]
            if name == "operator-crash":
                await operator_crash(stack, f, rng, old)
            else:
                hold = await (api_unreachable if name == "api-unreachable" else isolate)(stack, f, rng, old)
                # until the fenced primary is replaced, the workload cannot write
                hist.excuse(f.fault_at, f.fault_at + hold + LEASE_S + 1 + 5, "API server unreachable from the primary")
            await stack.wait_phase(VOLUME, "Replicating", within=120)
            await asyncio.sleep(rng.uniform(0.5, 1.5))
            w1 = time.monotonic()
        finally:
            follow.cancel()
            await asyncio.gather(follow, return_exceptions=True)
            await workload.stop()
        st = await stack.status(VOLUME)
        image = await f.read(stack.socket_path(st))
        res.violations = f.violations + check_latest(image, hist, time.monotonic(), f"{f.pod} at the end")
        res.violations += check_one_primary(hist)
        stalls, res.worst_gap = check_stalls(hist, PEER_TIMEOUT_S + 1.0, w0, w1)
        res.violations += stalls
        if not f.failovers and name == "operator-crash":
            res.violations.append(Violation("failover", f"no new primary after the fault: {st.get('message')}"))
        res.notes = f.notes + [f"failover seen {x:.1f} s after the fault" for x in f.failovers]
        await workload.close()
    res.writes = len(hist.all_writes())
    res.acked = sum(1 for w in hist.all_writes() if w.acked is not None)


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


async def isolate(stack: Any, f: Follower, rng: random.Random, old: dict[str, Any]) -> float:
    """Failure 9 depends on where in the Lease's renewal period the cut falls, so the cut is
    placed at a seeded phase of it (renewals every third of the duration)."""
    from pairvol.agent.lease import parse_micro_time
    from pairvol.operator.k8s import lease_path

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
