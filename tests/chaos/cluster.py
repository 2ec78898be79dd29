"""A small controller that plays the operator's part against real agents.

Each replica is a real `pairvol agent`, started by tests.support.agents.Agent exactly as
the suite's launchers start it (with the agent pod's privileges where they apply them),
inside a node's network namespace, with a token and a TLS-PSK replication link.

The controller does what the operator does, in the same order: secondary(N) →
primary(N+1, peer, "full") → checkpoints while the pair replicates → on primary death
failover(epoch, mode) on the secondary (never onto a secondary the primary durably marked
out of sync; then the primary's pod is restarted instead) → re-protection with a new
secondary, as often as peers are lost. It records every fact the checker needs in the
run's History and reports the invariants it can judge itself (failover, re-protection).

What it does *not* have is the Lease: a primary that is alive but unreachable is never
failed over from here (that needs the API server: tests/chaos/operator_level.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from pairvol.agent import state as agent_state
from pairvol.agent.procs import AgentCallError, write_psk
from pairvol.aio import bounded
from pairvol.localcluster.netns import ClusterNetwork
from pairvol.nbd import NBDClient, NBDError
from tests.chaos.blocks import BLOCK, BadBlock, parse
from tests.chaos.checker import Violation, check_checkpoint, check_latest
from tests.chaos.history import Cut, History
from tests.chaos.relay import DelayRelay
from tests.chaos.workload import Target, Workload
from tests.support.agents import Agent

log = logging.getLogger(__name__)

FAILOVER_BOUND = 5.0  # s from the primary's death to the new primary serving (DESIGN.md §4 RTO)
REPROTECT_BOUND = 60.0  # s from a peer loss to replicating again (8 MiB volume)
CALL_TIMEOUT = 30.0
READ_BOUND = 30.0  # s for reading a replica's export whole (connect, handshake, every slot)


@dataclass
class ChaosAgent(Agent):
    """The suite's Agent (tests.support.agents: started as the agent pod runs it) with extra
    environment (crash points)."""

    env: dict[str, str] = field(default_factory=dict)

    def argv(self) -> list[str]:
        argv = super().argv()
        if not self.env:
            return argv
        # right before the interpreter, so that whatever wraps the command line (network
        # namespace, the pod's privileges) still runs it with this environment
        at = argv.index(sys.executable) if sys.executable in argv else 0
        return [*argv[:at], "env", *(f"{k}={v}" for k, v in self.env.items()), *argv[at:]]


@dataclass
class Replica:
    name: str
    node: str
    agent: ChaosAgent
    started: float = 0.0
    died_at: float | None = None
    armed: bool = False
    watcher: asyncio.Task[None] | None = None

    log_from: int = 0
    relay: DelayRelay | None = None  # the link to this secondary goes through it (`delay`)

    def own_log(self) -> str:
        """What this incarnation wrote to the agent's log (a restart appends to it)."""
        if self.agent.log_path is None or not self.agent.log_path.exists():
            return ""
        with self.agent.log_path.open("rb") as f:
            f.seek(self.log_from)
            return f.read().decode(errors="replace")

    @property
    def alive(self) -> bool:
        return self.agent.proc is not None and self.agent.proc.returncode is None

    @property
    def address(self) -> str:
        """Where the primary reaches this replica's NBD server (through the relay, if any)."""
        return self.relay.address if self.relay is not None else self.agent.replication_address


class Controller:
    def __init__(
        self,
        net: ClusterNetwork,
        nodes: list[str],
        workdir: Path,
        hist: History,
        rng: random.Random,
        mode: str,
        peer_timeout: float = 2.0,
        size: str = "8Mi",
        crash_point: str | None = None,
    ) -> None:
        self.net = net
        self.nodes = nodes
        self.workdir = workdir
        self.hist = hist
        self.rng = rng
        self.mode = mode
        self.peer_timeout = peer_timeout
        self.size = size
        self.crash_point = crash_point
        self.crash_fired: list[str] = []
        self.token = secrets.token_hex(16)
        self.psk = write_psk(workdir / "psk")
        self.epoch = 0
        self.term = 0
        self.replicas: list[Replica] = []
        self.primary: Replica | None = None
        self.secondary: Replica | None = None
        self.violations: list[Violation] = []
        self.notes: list[str] = []
        self.lock = asyncio.Lock()
        self.workload = Workload(hist, random.Random(rng.random()))
        self.pstatus: dict[str, Any] | None = None  # the primary's last status
        self.pstatus_at = 0.0  # when it was read
        self.syncing_since: float | None = None
        self.failovers: list[tuple[float, float, int]] = []  # (death, failover answered, new term)
        self.peer_losses = 0
        self.reprotect_failures = 0
        self.stopped = False  # no more automatic reactions (the run is being finished)
        self.hold_reactions = False  # a fault class does the reacting itself for a while
        self._tasks: list[asyncio.Task[None]] = []
        self.fault_at: float | None = None
        self.primary_down_at: float | None = None  # set by faults that kill the daemon only
        self.cut_nodes: set[str] = set()  # partitioned (also one way) right now
        self.lost: list[tuple[Replica, bool]] = []  # lost secondaries, and whether in sync when lost
        self.restart_same = 0.5  # chance that re-protection restarts a lost secondary on its data dir
        self.secondary_name = ""
        self.in_sync_seen: dict[str, float] = {}  # replica -> last time the primary replicated to it in sync
        self.no_checkpoints = False
        self.relay_links = False  # each replication link through a DelayRelay (the `delay` class)

    # ------------------------------------------------------------------ replicas

    def next_epoch(self) -> int:
        self.epoch += 1
        return self.epoch

    def violate(self, invariant: str, detail: str) -> None:
        log.info("VIOLATION [%s] %s", invariant, detail)
        self.violations.append(Violation(invariant, detail))

    def note(self, text: str) -> None:
        log.info("note: %s", text)
        self.notes.append(text)
        self.hist.event(time.monotonic(), text)

    def free_nodes(self) -> list[str]:
        """Nodes a new replica may go to: no live replica, not cut off (the operator does
        not place pods on a NotReady node)."""
        busy = {r.node for r in self.replicas if r.alive}
        return [n for n in self.nodes if n not in busy and n not in self.cut_nodes]

    async def start_replica(self, node: str, data_dir: Path | None = None, armed: bool = True) -> Replica:
        name = f"r{len(self.replicas)}"
        env: dict[str, str] = {}
        arm = armed and self.crash_point is not None and not self.crash_fired
        if arm:
            assert self.crash_point is not None
            env["PAIRVOL_CRASH_AT"] = self.crash_point
        agent = ChaosAgent(
            name="vol",
            data_dir=data_dir or self.workdir / name,
            size=self.size,
            host=self.net.node_ip(node),
            netns=self.net.netns_name(node),
            token=self.token,
            psk_file=self.psk,
            peer_timeout=self.peer_timeout,
            env=env,
        )
        rep = Replica(name, node, agent, armed=arm)
        log_file = agent.data_dir.parent / f"{agent.data_dir.name}.log"  # procs.Agent's log, shared by restarts
        rep.log_from = log_file.stat().st_size if log_file.exists() else 0
        self.replicas.append(rep)
        try:
            await agent.start()
        except (RuntimeError, TimeoutError):
            # a restart runs the agent's restore, which may hit the armed crash point
            if self.crash_point and f"crash point {self.crash_point} reached" in await asyncio.to_thread(rep.own_log):
                self.crash_fired.append(rep.name)
                self.note(f"{rep.name} hit crash point {self.crash_point} while starting")
            raise
        rep.started = time.monotonic()
        rep.watcher = asyncio.create_task(self._watch(rep))
        self.note(f"{name} started on {node} ({agent.data_dir.name}{', crash point armed' if arm else ''})")
        return rep

    async def restart_on(self, node: str, data_dir: Path) -> Replica:
        """A pod coming back on its node and data dir; if its restore hit the crash point,
        it comes back once more (the point fires once per run)."""
        try:
            return await self.start_replica(node, data_dir=data_dir)
        except (RuntimeError, TimeoutError):
            if not self.crash_fired:
                raise
            return await self.start_replica(node, data_dir=data_dir)

    async def _watch(self, rep: Replica) -> None:
        assert rep.agent.proc is not None
        rc = await rep.agent.proc.wait()
        rep.died_at = time.monotonic()
        if self.crash_point and f"crash point {self.crash_point} reached" in await asyncio.to_thread(rep.own_log):
            self.crash_fired.append(rep.name)
            self.note(f"{rep.name} hit crash point {self.crash_point}")
        else:
            self.note(f"{rep.name} exited ({rc})")

    @staticmethod
    async def still_running(*reps: Replica, within: float = 2.0) -> bool:
        """Whether every one of them still runs once a failed call had time to show a death:
        an agent ended by a crash point drops its connections as it exits, and the call's
        error can arrive before the exit is reaped (``alive`` still true)."""
        waits = [asyncio.ensure_future(r.agent.proc.wait()) for r in reps if r.agent.proc is not None]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=within, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
        return all(r.alive for r in reps)

    async def status(self, rep: Replica, timeout: float = 2.0) -> dict[str, Any] | None:
        try:
            return await rep.agent.call("GET", "/v1/status", timeout=timeout)
        except (aiohttp.ClientError, OSError, TimeoutError, AgentCallError):
            return None

    async def health(self, rep: Replica) -> str:
        """ok | dead (process gone or daemon dead) | unreachable."""
        if not rep.alive:
            return "dead"
        try:
            async with (
                aiohttp.ClientSession() as s,
                s.get(f"{rep.agent.api}/healthz", timeout=aiohttp.ClientTimeout(total=1)) as r,
            ):
                return "ok" if r.status == 200 else "dead"
        except (aiohttp.ClientError, OSError, TimeoutError):
            return "unreachable" if rep.alive else "dead"

    async def qsd_pid(self, rep: Replica) -> int | None:
        st = await self.status(rep)
        return int(st["qsd"]["pid"]) if st and st.get("qsd", {}).get("pid") else None

    async def read_export(self, rep: Replica) -> bytes:
        """The workload's slots as the primary serves them, packed (slot i at i * BLOCK);
        TimeoutError past :data:`READ_BOUND` (:func:`read_slots`)."""
        try:
            return await read_slots(rep.agent.export_socket, self.hist)
        except TimeoutError as exc:
            raise TimeoutError(f"{rep.name}'s {exc}") from None

    async def read_disk_file(self, rep: Replica) -> bytes:
        """The slots in a replica's disk file, packed."""
        path = rep.agent.data_dir / agent_state.DISK_FILE
        h = self.hist

        def read() -> bytes:
            with path.open("rb") as f:
                return b"".join(os.pread(f.fileno(), BLOCK, h.offset(i)) for i in range(h.slots))

        return await asyncio.to_thread(read)

    async def durable_out_of_sync(self, rep: Replica) -> bool | None:
        """The primary's durable out-of-sync mark (what the Lease annotation carries)."""
        try:
            st = await asyncio.to_thread(agent_state.load, rep.agent.data_dir)
        except Exception as exc:
            self.note(f"cannot read {rep.name}'s state: {exc}")
            return None
        return None if st is None else bool(st.out_of_sync)

    # ------------------------------------------------------------------ story

    async def setup(
        self,
        data_dirs: tuple[Path | None, Path | None] = (None, None),
        during_sync: Callable[[Controller], Awaitable[None]] | None = None,
    ) -> None:
        """The primary starts alone and the workload writes for a moment (so the full sync
        has data to copy), then the secondary joins as the operator places it."""
        a = await self.start_replica(self.nodes[0], data_dirs[0])
        await a.agent.primary(self.next_epoch(), None)
        self.primary = a
        self.term = 1
        self.workload.retarget(Target(a.name, self.term, a.agent.export_socket))
        self.workload.start()
        await asyncio.sleep(self.rng.uniform(0.3, 1.0))
        b = await self.start_replica(self.nodes[1], data_dirs[1])
        await b.agent.secondary(self.next_epoch())
        self.secondary = b
        try:
            await self.start_primary(a, b, self.epoch)
        except (AgentCallError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            await asyncio.sleep(0.3)
            if not self.crash_point or (a.alive and b.alive):
                raise
            self.note(f"the first primary() was cut short by a crash: {exc}")
        self.syncing_since = time.monotonic()
        self._tasks = [asyncio.create_task(self._monitor()), asyncio.create_task(self._checkpointer())]
        if during_sync is not None:
            await during_sync(self)
        await self.settle(REPROTECT_BOUND)
        if self.crash_fired:
            return  # the run goes on from wherever the crash left it
        if self.primary is None or self.secondary is None or self.syncing_since is not None:
            raise RuntimeError(f"the pair did not reach replicating: {self.pstatus and self.pstatus['replication']}")

    async def checkpoint(self, rep: Replica) -> Cut | None:
        before = await self._in_sync_with(rep)
        t0 = time.monotonic()
        res = await rep.agent.call("POST", "/v1/checkpoint", {}, timeout=CALL_TIMEOUT)
        t1 = time.monotonic()
        after = await self._in_sync_with(rep)
        cut = Cut(rep.name, int(res["id"]), t0, t1, "checkpoint", in_sync=before and after)
        self.hist.cuts.append(cut)
        return cut

    async def _in_sync_with(self, rep: Replica) -> bool:
        p = self.primary
        if p is None:
            return False
        st = await self.status(p)
        return bool(
            st
            and st["replication"]["state"] == "replicating"
            and not st["replication"]["outOfSync"]
            and st["replication"]["peer"] == rep.address
        )

    async def _checkpointer(self) -> None:
        while True:
            await asyncio.sleep(self.rng.uniform(0.4, 1.2))
            if self.stopped or self.hold_reactions or self.no_checkpoints:
                continue
            async with self.lock:
                s, ps = self.secondary, self.pstatus
                if s is None or not s.alive or ps is None or ps["replication"]["state"] != "replicating":
                    continue
                try:
                    await self.checkpoint(s)
                except (AgentCallError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                    self.note(f"checkpoint on {s.name} failed: {exc}")

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            if self.stopped or self.hold_reactions:
                continue
            try:
                async with self.lock:
                    await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("tick failed", exc_info=True)
                self.note(f"controller tick failed: {type(exc).__name__}: {exc}")

    async def tick(self) -> None:
        p, s = self.primary, self.secondary
        if p is None:
            return
        ph = await self.health(p)
        if ph == "dead":
            await self.on_primary_down(p)
            return
        st = await self.status(p) if ph == "ok" else None
        if st is not None:
            self.pstatus = st
            self.pstatus_at = time.monotonic()
            if st["role"] == "primary" and not st["export"]["serving"]:
                self.note(f"primary {p.name} stopped serving: {st['replication']['error']}")
                await self.on_primary_down(p)
                return
        if s is not None:
            sh = await self.health(s)
            if sh == "dead":
                await self.on_secondary_lost(s, f"{s.name} died")
                return
            if st is not None and st["replication"]["peer"] != s.address and self.syncing_since is None:
                return
            if (
                st is not None
                and st["replication"]["state"] == "replicating"
                and not st["replication"]["outOfSync"]
                and st["replication"]["peer"] == s.address
            ):
                self.in_sync_seen[s.name] = time.monotonic()
            if st is not None and st["replication"]["state"] in ("degraded", "none"):
                await self.on_secondary_lost(s, f"primary dropped {s.name}: {st['replication']['error']}")
                return
            if st is not None and self.syncing_since is not None:
                if st["replication"]["state"] == "replicating":
                    last = st["replication"].get("lastSync") or {}
                    self.note(
                        f"re-protected with {s.name} in {time.monotonic() - self.syncing_since:.1f} s "
                        f"({last.get('kind')}: {last.get('reason')})"
                    )
                    self.syncing_since = None
                elif time.monotonic() - self.syncing_since > REPROTECT_BOUND:
                    self.violate(
                        "reprotect",
                        f"{s.name} not in sync {REPROTECT_BOUND:.0f} s after re-protection began: {st['replication']}",
                    )
                    self.syncing_since = None
                    await self.on_secondary_lost(s, "re-protection did not converge")
        elif ph == "ok":
            await self.reprotect()

    async def on_secondary_lost(self, s: Replica, why: str) -> None:
        self.note(f"secondary lost: {why}")
        ps = self.pstatus
        in_sync = (
            bool(ps and ps["replication"]["state"] == "replicating" and ps["replication"]["peer"] == s.address)
            and self.syncing_since is None
        )
        self.lost.append((s, in_sync))
        self.peer_losses += 1
        self.secondary = None
        self.syncing_since = None
        await s.agent.stop()  # the operator deletes the pod

    async def reprotect(self) -> None:
        p = self.primary
        assert p is not None
        if self.reprotect_failures >= 3:
            return
        free = self.free_nodes()
        if not free:
            self.note("no free node for a new secondary")
            return
        old = self.lost[-1] if self.lost else None
        if old is not None and old[0].node in free and not old[0].alive and self.rng.random() < self.restart_same:
            # the old node comes back: same address, same data dir (the agent restores)
            node = old[0].node
            new = await self.restart_on(node, old[0].agent.data_dir)
            self.lost.pop()
            restored = await self.status(new)
            self.note(f"{new.name} restored {old[0].name}'s data dir: {restored and restored.get('restored')}")
        else:
            node = self.rng.choice(free)
            new = await self.start_replica(node)
            restored, old = None, None
        try:
            if (
                restored
                and restored["role"] == "secondary"
                and restored["stage"] == "running"
                and restored.get("checkpoint")
                and old is not None
            ):
                for c in [c for c in self.hist.cuts if c.replica == old[0].name]:
                    self.hist.cuts.append(Cut(new.name, c.id, c.start, c.end, c.how, c.in_sync))
                cid = int(restored["checkpoint"]["id"])
                if self.hist.cut(new.name, cid) is None:
                    # the agent made the disk as it found it a restore point: it claims the
                    # state of the moment it died, which holds every write acknowledged
                    # while the pair was last seen in sync (a half-synced disk does not)
                    died = old[0].died_at or time.monotonic()
                    seen = self.in_sync_seen.get(old[0].name, died)
                    self.hist.cuts.append(Cut(new.name, cid, min(seen, died), died, "restored"))
            else:
                await new.agent.call("POST", "/v1/secondary", {"epoch": self.next_epoch()}, timeout=CALL_TIMEOUT)
            sec_epoch = int(restored["epoch"]) if restored and restored["role"] == "secondary" else self.epoch
            await self.start_primary(p, new, sec_epoch)
        except (AgentCallError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            self.reprotect_failures += 1
            if await self.still_running(p, new):
                self.violate(
                    "reprotect",
                    f"re-protection of {p.name} with {new.name} (peer loss {self.peer_losses}) failed: {exc}",
                )
            else:
                self.note(f"re-protection with {new.name} interrupted: {exc}")
            await new.agent.stop()
            return
        self.secondary = new
        self.syncing_since = time.monotonic()
        self.note(f"re-protecting {p.name} with {new.name} on {node} (epoch {self.epoch})")

    async def start_primary(self, p: Replica, s: Replica, sec_epoch: int) -> None:
        """primary(N+1, peer, "auto") as the operator sends it: with `peerEpoch`, the epoch
        the secondary runs at, when that is not N (an agent without the field refuses it;
        then the call goes without, as before the field existed), and `peerDisk`, the
        identity of the secondary's disk, and `peerApi`, the secondary agent's API: the
        primary copies only what that disk missed when it can vouch for it, only the regions
        whose checksums differ when it cannot but the disk holds data, and everything
        otherwise (docs/correctness.md R1-R4)."""
        if self.relay_links and s.relay is None:
            s.relay = await DelayRelay(self.net.bridge_ip, s.agent.replication_address, random.Random(s.name)).start()
        epoch = self.next_epoch()
        body: dict[str, Any] = {"epoch": epoch, "peer": s.address, "sync": "auto"}
        disk = ((await s.agent.status()).get("disk") or {}).get("id")
        body.update({"peerDisk": disk} if disk else {"sync": "full"})
        if disk:  # where the primary has no record of that disk, both sides compare checksums
            body["peerApi"] = s.agent.api.removeprefix("http://")
        if sec_epoch != epoch - 1:
            body["peerEpoch"] = sec_epoch
        try:
            await p.agent.call("POST", "/v1/primary", body, timeout=CALL_TIMEOUT)
        except AgentCallError as exc:
            if exc.status != 400 or "peerEpoch" not in body or "peerEpoch" not in str(exc):
                raise
            del body["peerEpoch"]
            await p.agent.call("POST", "/v1/primary", body, timeout=CALL_TIMEOUT)

    async def on_primary_down(self, p: Replica) -> None:
        died = self.primary_down_at or p.died_at or time.monotonic()
        self.primary_down_at = None
        self.workload.retarget(None)
        s = self.secondary
        self.primary = None
        self.note(f"primary {p.name} down")
        await p.agent.stop()  # whatever is left of it (a live agent over a dead daemon)
        if s is None or not s.alive or self.syncing_since is not None:
            self.note("no secondary in sync to fail over to: the primary's pod is restarted")
            await self.restart_primary(p, died)
            return
        marked = await self.durable_out_of_sync(p)
        if marked:
            self.note(f"{p.name} marked {s.name} out of sync: no automatic failover; the primary's pod is restarted")
            await self.restart_primary(p, died)
            return
        await self.failover(s, died)
        if self.primary is s:
            # the old primary's node may come back with its data dir as the new secondary, as
            # the operator prefers: its disk diverged from the new primary's by an unknown set
            # of regions (docs/correctness.md, R4)
            self.lost.append((p, False))

    async def restart_primary(self, p: Replica, died: float) -> None:
        """The operator's answer when it may not fail over: the primary's pod comes back on
        its node and data dir and is confirmed with a new epoch; it must hold every write it
        acknowledged (Latest), whatever it was doing when it died."""
        if p.node in self.cut_nodes or p.node not in self.free_nodes():
            self.note(f"{p.name}'s node is not available: the volume stays down")
            return
        try:
            r = await self.restart_on(p.node, p.agent.data_dir)
            st = await self.status(r)
            self.note(f"{r.name} restored {p.name}'s data dir: {st and st.get('restored')}")
            await r.agent.call("POST", "/v1/primary", {"epoch": self.next_epoch(), "peer": None}, timeout=CALL_TIMEOUT)
        except (AgentCallError, aiohttp.ClientError, OSError, TimeoutError, RuntimeError) as exc:
            self.violate("restart", f"the primary cannot come back on its data dir: {exc}")
            return
        try:
            image = await self.read_export(r)
        except (OSError, TimeoutError, NBDError) as exc:
            self.violate("restart", f"{r.name} serves again on {p.name}'s data dir but cannot be read: {exc}")
            return
        self.violations += check_latest(
            image, self.hist, time.monotonic(), f"{r.name} restarted on {p.name}'s data dir"
        )
        self.rebase(image)
        self.term += 1
        self.primary = r
        if self.secondary is not None:  # the restarted primary has no peer: re-protect
            await self.on_secondary_lost(self.secondary, f"{r.name} came back without a peer")
        self.hist.excuse(died, time.monotonic(), "primary down until it restarted")
        self.workload.retarget(Target(r.name, self.term, r.agent.export_socket))

    async def failover(self, s: Replica, died: float) -> None:
        self.secondary_name = s.name
        epoch = self.next_epoch()
        mode = self.mode
        try:
            res = await s.agent.call("POST", "/v1/failover", {"epoch": epoch, "mode": mode}, timeout=CALL_TIMEOUT)
        except (AgentCallError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            await asyncio.sleep(0.2)
            if s.alive:
                self.violate("failover", f"failover of {s.name} ({mode}) failed: {exc}")
                self.secondary = None
                return
            # the secondary died during the failover (a crash point): the operator restarts
            # it and tries again with a newer epoch
            self.note(f"{s.name} died during the failover ({exc}); restarting it on its data dir")
            s = await self.restart_on(s.node, s.agent.data_dir)
            self.hist.cuts += [
                Cut(s.name, c.id, c.start, c.end, c.how, c.in_sync)
                for c in self.hist.cuts
                if c.replica == self.secondary_name
            ]
            epoch = self.next_epoch()
            restored = await self.status(s)
            try:
                if restored is not None and restored["role"] == "primary":
                    # the restart finished the failover itself (docs/correctness.md, S6) and
                    # waits for the operator to confirm the role with a newer epoch
                    self.note(f"{s.name} finished the failover on restart: {restored.get('restored')}")
                    await s.agent.call("POST", "/v1/primary", {"epoch": epoch, "peer": None}, timeout=CALL_TIMEOUT)
                    res = finished_failover(restored, mode)
                else:
                    res = await s.agent.call(
                        "POST", "/v1/failover", {"epoch": epoch, "mode": mode}, timeout=CALL_TIMEOUT
                    )
            except (AgentCallError, aiohttp.ClientError, OSError, TimeoutError) as exc2:
                self.violate("failover", f"failover cannot complete after a crash during the failover: {exc2}")
                self.secondary = None
                return
        done = time.monotonic()
        self.secondary = None
        st = await self.status(s)
        if st is None or not st["export"]["serving"]:
            self.violate("failover", f"failover of {s.name} reported done but the export is not served: {st}")
            return
        if done - died > FAILOVER_BOUND:
            self.violate(
                "failover", f"failover to {s.name} took {done - died:.2f} s after the death (bound {FAILOVER_BOUND})"
            )
        try:
            image = await self.read_export(s)
        except (OSError, TimeoutError, NBDError) as exc:
            self.violate("failover", f"{s.name} serves after the failover but cannot be read: {exc}")
            return
        what = f"{s.name} after {mode} failover (epoch {epoch})"
        if mode == "latest" or res.get("requestedMode"):
            self.violations += check_latest(image, self.hist, time.monotonic(), what)
        else:
            cid = int(res["checkpointId"])
            cut = self.hist.cut(s.name, cid)
            if cut is None:
                self.violate("checkpoint", f"{what}: returned checkpoint {cid}, which {s.name} never reported")
            else:
                vs, note = check_checkpoint(image, self.hist, cut, what)
                self.violations += vs
                if note:
                    self.note(note)
        self.rebase(image)
        self.term += 1
        self.primary = s
        self.pstatus = st
        self.pstatus_at = time.monotonic()
        self.failovers.append((died, done, self.term))
        self.hist.excuse(died, time.monotonic(), "primary down until the failover is checked")
        self.workload.retarget(Target(s.name, self.term, s.agent.export_socket))
        self.note(f"failed over to {s.name} ({mode}, {done - died:.2f} s after the death)")

    def rebase(self, image: bytes) -> None:
        """From a failover on, the new primary's image is the volume (see History.rebase)."""
        seen: dict[int, tuple[int, int] | None] = {}
        for slot in range(self.hist.slots):
            try:
                st = parse(image[slot * BLOCK : (slot + 1) * BLOCK], self.hist.run, slot)
            except BadBlock:
                seen[slot] = None
                continue
            seen[slot] = None if st is None else (st.lane, st.seq)
        n = self.hist.rebase(seen)
        self.hist.event(time.monotonic(), f"rebased on the failover image: {n} writes retired")

    # ------------------------------------------------------------------ end of a run

    async def settle(self, within: float) -> None:
        """Let the controller converge: a primary replicating to a secondary, or give up."""
        start = time.monotonic()
        deadline = start + within
        while time.monotonic() < deadline:
            p, s = self.primary, self.secondary
            if self.reprotect_failures >= 3:
                return
            if p is None:
                if self.lock.locked():  # a failover or a restart is under way
                    await asyncio.sleep(0.2)
                    continue
                return
            if (
                s is not None
                and self.syncing_since is None
                and self.pstatus_at > start  # not a status read before the fault ended
                and self.pstatus is not None
                and (
                    self.pstatus["replication"]["state"] == "replicating"
                    and self.pstatus["replication"]["peer"] == s.address
                )
            ):
                return
            await asyncio.sleep(0.2)

    def replicating(self) -> bool:
        """A primary replicating in sync to a live secondary (a fault may strike again)."""
        p, s, ps = self.primary, self.secondary, self.pstatus
        return (
            p is not None
            and s is not None
            and s.alive
            and self.syncing_since is None
            and ps is not None
            and ps["replication"]["state"] == "replicating"
            and ps["replication"]["peer"] == s.address
        )

    async def check_now(self, what: str) -> None:
        """The checks that follow each fault of a run but the last (the last is followed by
        `finish`): the workload pauses and its writes in flight get their outcome, then the
        primary's export must hold every acknowledged write (Latest) and, with the pair in
        sync, the secondary's disk must equal it. The workload then writes on."""
        from tests.chaos.checker import check_identical

        async with self.lock:
            p, s = self.primary, self.secondary
            if p is None or not p.alive:
                return
            target = self.workload.target
            self.workload.retarget(None)
            try:
                if not await self.workload.quiesce(10.0):
                    self.note(f"{what}: writes still in flight after 10 s; checks of this fault skipped")
                    return
                image = await self.read_export(p)
                self.violations += check_latest(image, self.hist, time.monotonic(), f"{p.name} {what}")
                st = await self.status(p)
                if s is None or not s.alive or st is None:
                    return
                rep = st["replication"]
                if rep["state"] != "replicating" or rep["outOfSync"] or rep["peer"] != s.address:
                    self.note(f"{what}: pair not in sync: {rep}")
                    return
                self.violations += check_identical(
                    image, await self.read_disk_file(s), self.hist, f"{p.name}/{s.name} {what}"
                )
            except (OSError, TimeoutError, AgentCallError, aiohttp.ClientError) as exc:
                self.note(f"{what}: cannot read the replicas: {exc}")
            finally:
                if self.primary is p:
                    self.workload.retarget(target)

    async def finish(self) -> None:
        """Stop the workload, check the primary's image (Latest), the pair (identical),
        then kill the primary and check the failover (the run's mode)."""
        await self.workload.stop()
        self.stopped = True
        for t in self._tasks:
            t.cancel()
        # gather, not suppress: a cancellation of this task itself (Ctrl-C) must go on
        await asyncio.gather(*self._tasks, return_exceptions=True)
        async with self.lock:
            p, s = self.primary, self.secondary
            if p is None or not p.alive:
                return
            try:
                image = await self.read_export(p)
            except TimeoutError as exc:  # a live primary that serves nothing for that long: stalled
                self.violate("stall", f"at the end: {exc}")
                return
            except Exception as exc:
                self.note(f"cannot read {p.name}'s export at the end: {exc}")
                return
            self.violations += check_latest(image, self.hist, time.monotonic(), f"{p.name} at the end")
            st = await self.status(p)
            if s is None or not s.alive or st is None:
                return
            rep = st["replication"]
            if rep["state"] != "replicating" or rep["outOfSync"] or rep["peer"] != s.address:
                self.note(f"pair not in sync at the end: {rep}")
                return
            from tests.chaos.checker import check_identical

            self.violations += check_identical(image, await self.read_disk_file(s), self.hist, f"{p.name}/{s.name}")
            with contextlib.suppress(AgentCallError, aiohttp.ClientError, OSError, TimeoutError):
                await self.checkpoint(s)
            died = time.monotonic()
            p.agent.kill()
            await p.agent.wait_exit()
            self.primary = None
            await self.failover(s, died)
            self.workload.retarget(None)

    async def close(self) -> None:
        self.stopped = True
        for t in self._tasks:
            t.cancel()
        await self.workload.stop(grace=1)
        await self.workload.close()
        await asyncio.gather(*(r.agent.stop() for r in self.replicas), return_exceptions=True)
        await asyncio.gather(*(r.relay.close() for r in self.replicas if r.relay), return_exceptions=True)
        for r in self.replicas:
            if r.watcher is not None:
                r.watcher.cancel()


async def read_slots(socket: Path, hist: History, bound: float = READ_BOUND) -> bytes:
    """The workload's slots as the export on ``socket`` serves them, packed.

    One bound for the whole read, connection and handshake included: a daemon whose main
    loop hangs still accepts the connection (the kernel does) and then answers nothing, and
    the controller reads while it holds its lock. Past the bound: TimeoutError saying so,
    which the callers turn into a violation or a note, never a hung run."""

    async def read() -> bytes:
        async with await NBDClient.connect_unix(str(socket)) as nbd:
            return b"".join([await nbd.pread(BLOCK, hist.offset(i)) for i in range(hist.slots)])

    try:
        return await bounded(read(), bound)
    except TimeoutError:
        raise TimeoutError(f"export did not answer a read of its {hist.slots} slots within {bound:g} s") from None


def finished_failover(status: dict[str, Any], mode: str) -> dict[str, Any]:
    """What a failover that a restart finished returned, read from the restarted agent's
    status: the checkpoint whose commit was redone, the checkpoint a failover that had
    completed before the crash (its role already saved) committed, or the latest state."""
    restored = status.get("restored") or ""
    found = re.search(r"commit was redone: checkpoint (\d+)", restored)
    if mode == "checkpoint" and found:
        return {"mode": "checkpoint", "checkpointId": int(found.group(1))}
    cp = status.get("checkpoint") or {}
    if mode == "checkpoint" and restored.startswith("found role primary") and cp.get("restorePoint") and cp.get("id"):
        # the crash came after the commit and the role change (e.g. union.started): a
        # checkpoint-mode failover falls back to the latest state only without a restore point
        return {"mode": "checkpoint", "checkpointId": int(cp["id"])}
    return {"mode": "latest", "checkpointId": None, "requestedMode": mode} if mode != "latest" else {"mode": "latest"}
