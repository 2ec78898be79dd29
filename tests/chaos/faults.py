"""Fault classes: each injects one kind of real fault into a running pair.

A class may `prepare` the run before the agents start (a small file system under a
replica's data dir, a crash point to arm), `inject` the fault at a random moment chosen
from the run's seed, and `cleanup` what it set up. The controller reacts as the operator
would; the checker judges the outcome. `unavailable` says why a class cannot run here
(a missing kernel feature, a module not written yet) so the run is counted as skipped,
with the reason, never as passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import importlib
import importlib.util
import os
import pkgutil
import random
import shutil
import signal
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from pairvol.agent import crashpoints
from pairvol.localcluster.netns import ClusterNetwork, run_command
from tests.chaos.cluster import Controller, Replica


class Fault:
    name = ""
    doc = ""
    size = "8Mi"  # volume size
    # why the one-primary check cannot judge this class at agent level (None: it can)
    one_primary_unjudged: str | None = None
    mode: str | None = None  # force the failover mode of the run
    relay_links = False  # the replication links run through a DelayRelay (tests/chaos/relay.py)
    # the fault can strike again once the pair replicates again: a run injects it
    # --faults times, each followed by the checks (tests.chaos.run)
    repeat = False

    def unavailable(self) -> str | None:
        return None

    def crash_point(self, rng: random.Random, seed: int) -> str | None:
        return None

    def data_dir(self, index: int, workdir: Path) -> Path | None:
        """A data dir for the index-th replica the setup starts (0 primary, 1 secondary)."""
        return None

    async def prepare(self, workdir: Path, rng: random.Random) -> None:
        return None

    during_sync: Callable[[Controller], Awaitable[None]] | None = None  # runs during the first full sync

    async def inject(self, c: Controller, rng: random.Random) -> int | None:
        """Strike; the number of faults injected when it is not one (peer-loss-x3: up to 3)."""
        raise NotImplementedError

    async def cleanup(self) -> None:
        return None


def pick(c: Controller, rng: random.Random) -> tuple[str, Replica]:
    roles = [(n, r) for n, r in (("primary", c.primary), ("secondary", c.secondary)) if r is not None]
    role, rep = rng.choice(roles)
    assert rep is not None
    return role, rep


async def wait_calm(c: Controller, within: float = 30.0) -> None:
    """Until the pair replicates again (or `within` passes)."""
    await asyncio.sleep(0.3)
    await c.settle(within)


class KillAgent(Fault):
    name = "kill-agent"
    doc = "SIGKILL of the primary's or the secondary's agent at a random moment (its daemon dies with it)"
    repeat = True

    async def inject(self, c: Controller, rng: random.Random) -> None:
        role, rep = pick(c, rng)
        assert rep.agent.proc is not None
        c.note(f"fault: SIGKILL {role} agent {rep.name}")
        if role == "primary":
            c.primary_down_at = time.monotonic()
        os.kill(rep.agent.proc.pid, signal.SIGKILL)


class KillDaemon(Fault):
    name = "kill-daemon"
    doc = "SIGKILL of the primary's or the secondary's qemu-storage-daemon; the agent stays up"
    repeat = True

    async def inject(self, c: Controller, rng: random.Random) -> None:
        role, rep = pick(c, rng)
        pid = await c.qsd_pid(rep)
        if pid is None:
            c.note(f"fault: no qsd pid for {rep.name}")
            return
        c.note(f"fault: SIGKILL {role} daemon of {rep.name} (pid {pid})")
        if role == "primary":
            c.primary_down_at = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class KillDuringSync(Fault):
    """Failure 2's story: the secondary dies in the middle of the first full sync and comes
    back on its data dir, the sync is redone, and the primary dies before any new
    checkpoint: a checkpoint failover must give back a state the volume had, never the
    half-copied disk."""

    name = "kill-during-sync"
    doc = "SIGKILL of the secondary at a random point of a full sync, restart on its data dir, then primary death"
    size = "48Mi"
    mode = "checkpoint"

    def __init__(self) -> None:
        self.fraction = 0.0

    async def during_sync(self, c: Controller) -> None:
        s, p = c.secondary, c.primary
        assert s is not None and p is not None
        c.restart_same = 1.0
        c.no_checkpoints = True
        while True:
            st = await c.status(p)
            sync = st and st["replication"].get("sync")
            if not sync or st is None or st["replication"]["state"] != "syncing":
                c.note(f"the sync ended before the fault: {st and st['replication']}")
                return
            if sync["doneBytes"] >= self.fraction * sync["totalBytes"]:
                break
            await asyncio.sleep(0.01)
        c.note(f"fault: SIGKILL {s.name} at {sync['doneBytes'] >> 20} of {sync['totalBytes'] >> 20} MiB of the sync")
        s.agent.kill()
        await asyncio.sleep(0.5)

    async def inject(self, c: Controller, rng: random.Random) -> None:
        c.restart_same = 0.5
        p = c.primary
        if p is None or c.secondary is None:
            return
        c.note(f"fault: SIGKILL primary {p.name} before any new checkpoint")
        c.primary_down_at = time.monotonic()
        p.agent.kill()
        await asyncio.sleep(1.0)
        c.no_checkpoints = False

    async def prepare(self, workdir: Path, rng: random.Random) -> None:
        self.fraction = rng.uniform(0.05, 0.9)


class StopCont(Fault):
    name = "sigstop"
    doc = "SIGSTOP of an agent or a daemon (primary or secondary) for up to 3 peer timeouts, then SIGCONT"
    repeat = True

    async def inject(self, c: Controller, rng: random.Random) -> None:
        role, rep = pick(c, rng)
        what = rng.choice(["agent", "daemon"])
        assert rep.agent.proc is not None
        pid = rep.agent.proc.pid if what == "agent" else await c.qsd_pid(rep)
        if pid is None:
            return
        hold = rng.uniform(0.3, 3 * c.peer_timeout)
        c.note(f"fault: SIGSTOP {role} {what} of {rep.name} for {hold:.2f} s")
        t0 = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(hold)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if role == "primary":
            # a frozen primary stalls its own workload; +1 s for the daemon to catch up
            c.hist.excuse(t0, time.monotonic() + 1.0, f"primary {what} stopped")


class CrashPoint(Fault):
    name = "crash-point"
    doc = "a named crash point (pairvol.agent.crashpoints, all declared ones), armed per run in every agent"

    @staticmethod
    def points() -> list[str]:
        import pairvol.agent

        for m in pkgutil.iter_modules(pairvol.agent.__path__, "pairvol.agent."):
            with contextlib.suppress(Exception):
                importlib.import_module(m.name)
        # the agent's own: a CSI node plugin's points (imported by now, with the tests'
        # support code) are reached only by the CSI tests
        return sorted(n for n, p in crashpoints.POINTS.items() if p.module.startswith("pairvol.agent."))

    def unavailable(self) -> str | None:
        return None if self.points() else "no crash points are declared in pairvol.agent yet"

    def crash_point(self, rng: random.Random, seed: int) -> str | None:
        """Successive seeds take the declared points in turn, so a long run covers them all."""
        points = self.points()
        return points[seed % len(points)]

    async def inject(self, c: Controller, rng: random.Random) -> None:
        # give the point its chances: checkpoints run all along; a peer loss brings a
        # full sync and (the lost secondary coming back on its data dir) a restore; the
        # end of the run brings a failover; a lost primary (the old primary coming back on
        # its data dir as secondary) a checksum resync; a drained primary (SIGTERM: a clean
        # stop in sync) a failover and a union resync
        c.restart_same = 1.0
        for _ in range(2):
            await asyncio.sleep(rng.uniform(1.0, 3.0))
            if c.crash_fired:
                return
            s, p = c.secondary, c.primary
            if (c.crash_point or "").startswith("union."):
                # a planned failover: the primary drained, then back on its data dir (R6)
                if p is not None and p.alive and s is not None and s.alive and c.syncing_since is None:
                    c.note(f"fault: SIGTERM primary {p.name} (a drain) to drive a failover and a union resync")
                    c.primary_down_at = time.monotonic()
                    await p.agent.stop()
                    await wait_calm(c)
            elif (c.crash_point or "").startswith(("checksum.", "digests.")):
                # a checksum resync: the old primary back on its data dir after a failover
                if p is not None and p.alive and s is not None and s.alive and c.syncing_since is None:
                    c.note(f"fault: SIGKILL primary {p.name} to drive a failover and a checksum resync")
                    c.primary_down_at = time.monotonic()
                    p.agent.kill()
                    await wait_calm(c)
            elif s is not None and s.alive and c.syncing_since is None:
                c.note(f"fault: SIGKILL secondary {s.name} to drive a resync")
                s.agent.kill()
                await wait_calm(c)


class Partition(Fault):
    name = "partition"
    doc = "iptables DROP in a node's netns: primary or secondary, both ways or one way, for 1-3 peer timeouts"
    repeat = True

    async def inject(self, c: Controller, rng: random.Random) -> None:
        role, rep = pick(c, rng)
        way = rng.choice(["both", "in", "out"])
        hold = rng.uniform(c.peer_timeout, 3 * c.peer_timeout)
        chains = {"both": ["INPUT", "OUTPUT"], "in": ["INPUT"], "out": ["OUTPUT"]}[way]
        c.note(f"fault: partition {role} node {rep.node} ({way}) for {hold:.2f} s")
        c.cut_nodes.add(rep.node)
        await drop(c.net, rep.node, chains, "-I")
        try:
            await asyncio.sleep(hold)
        finally:
            await drop(c.net, rep.node, chains, "-D")
            c.cut_nodes.discard(rep.node)


async def drop(net: ClusterNetwork, node: str, chains: list[str], action: str, extra: list[str] | None = None) -> None:
    for chain in chains:
        iface = ["-i", "eth0"] if chain == "INPUT" else ["-o", "eth0"]
        await net.run_in_node(node, ["iptables", "-w", action, chain, *iface, *(extra or []), "-j", "DROP"], check=True)


class Loss(Fault):
    name = "loss"
    doc = "random packet loss (iptables statistic, 10-50 %) on a node's link for 1-3 peer timeouts"
    repeat = True

    async def inject(self, c: Controller, rng: random.Random) -> None:
        role, rep = pick(c, rng)
        p = round(rng.uniform(0.1, 0.5), 2)
        hold = rng.uniform(c.peer_timeout, 3 * c.peer_timeout)
        extra = ["-m", "statistic", "--mode", "random", "--probability", str(p)]
        c.note(f"fault: {p:.0%} loss on {role} node {rep.node} for {hold:.2f} s")
        await drop(c.net, rep.node, ["INPUT", "OUTPUT"], "-I", extra)
        try:
            await asyncio.sleep(hold)
        finally:
            await drop(c.net, rep.node, ["INPUT", "OUTPUT"], "-D", extra)


class Delay(Fault):
    """Latency on the replication link, through the relay the link runs over
    (tests/chaos/relay.py: this kernel has no sch_netem for `tc netem`). Most faults add
    5-200 ms each way with jitter, under which the writes must go on within the stall bound;
    some add more than half the peer timeout each way, so a round trip exceeds it: then the
    primary must drop the secondary (durably marking it out of sync first, which the
    failover checks judge) and its writes resume within the bound."""

    name = "delay"
    doc = "latency and jitter on the replication link (a delaying TCP relay: no netem here), 5 ms to > peer timeout"
    repeat = True
    relay_links = True

    async def inject(self, c: Controller, rng: random.Random) -> None:
        s = c.secondary
        if s is None or s.relay is None:
            c.note("fault: no secondary behind a relay to delay")
            return
        if rng.random() < 0.3:
            latency = rng.uniform(0.6, 1.5) * c.peer_timeout
            jitter = rng.uniform(0.0, 0.1)
        else:
            latency = rng.uniform(0.005, 0.2)
            jitter = rng.uniform(0.0, latency)
        hold = rng.uniform(c.peer_timeout, 3 * c.peer_timeout)
        c.note(f"fault: {latency * 1000:.0f} ms (+{jitter * 1000:.0f} ms jitter) each way to {s.name} for {hold:.2f} s")
        s.relay.slow(latency, jitter)
        try:
            await asyncio.sleep(hold)
        finally:
            s.relay.clear()


class Enospc(Fault):
    """The secondary's data dir is a tmpfs; a ballast file leaves a little room, the
    undo log fills it and the secondary answers writes with ENOSPC. The primary is killed
    a few milliseconds after the file system is seen full (failure 1)."""

    name = "enospc"
    doc = "the secondary's data dir on a small tmpfs fills up; SIGKILL of the primary right after"
    mode = "latest"

    def __init__(self) -> None:
        self.mnt: Path | None = None

    def data_dir(self, index: int, workdir: Path) -> Path | None:
        return workdir / "small" if index == 1 else None

    async def prepare(self, workdir: Path, rng: random.Random) -> None:
        self.mnt = workdir / "small"
        self.mnt.mkdir(parents=True)
        await run_command(["mount", "-t", "tmpfs", "-o", "size=32m", "chaos-enospc", str(self.mnt)])

    async def inject(self, c: Controller, rng: random.Random) -> None:
        assert self.mnt is not None and c.primary is not None
        st = os.statvfs(self.mnt)
        room = rng.randint(16, 128) * 4096
        ballast = max(0, st.f_bavail * st.f_frsize - room)
        c.note(f"fault: fill {self.mnt.name} up to {room >> 10} KiB free")
        await asyncio.to_thread(_fill, self.mnt / "ballast", ballast)
        full = await asyncio.to_thread(_wait_full, self.mnt, 20.0)
        if not full:
            c.note("the secondary's file system never filled")
            return
        # the write that fails on the secondary comes right after; the primary must have
        # marked the secondary out of sync before acknowledging it: kill it a few acks later
        n = rng.randint(1, 8)
        await c.workload.after_acks(n)
        p = c.primary
        if p is not None and p.agent.proc is not None:
            c.note(f"fault: file system full; SIGKILL primary {n} acknowledgements later")
            c.primary_down_at = time.monotonic()
            p.agent.kill()

    async def cleanup(self) -> None:
        if self.mnt is not None:
            await run_command(["umount", "-l", str(self.mnt)], check=False)


def _fill(path: Path, n: int) -> None:
    try:
        f = path.open("wb")
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            return  # full already (the replica's own files took the rest): the fault is in place
        raise
    with f:
        chunk = b"\xaa" * (1 << 20)
        while n > 0:
            k = min(n, len(chunk))
            try:
                f.write(chunk[:k])
            except OSError:
                return
            n -= k


def _wait_full(mnt: Path, within: float) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        st = os.statvfs(mnt)
        if st.f_bavail * st.f_frsize < 2 * 4096:
            return True
        time.sleep(0.0005)
    return False


EXT4_IOC_SHUTDOWN = (2 << 30) | (4 << 16) | (ord("X") << 8) | 125
# flush what the file system holds, then fail everything: the disk goes bad, nothing that
# was written before is lost (a power cut would also drop the page cache; that is not EIO)
EXT4_GOING_FLAGS_DEFAULT = 0


class IoError(Fault):
    """A replica's data dir is an ext4 on a loop device; at a random moment the file
    system is shut down (EXT4_IOC_SHUTDOWN, as xfstests' godown does): every read and
    write of its images fails with EIO from then on. On the primary, the workload export
    must stop and the secondary take over; on the secondary, the primary goes on alone and
    must have marked it out of sync before acknowledging anything it missed — checked by
    killing the primary right after and reading the secondary's disk once the file system
    is mounted again."""

    name = "eio"
    doc = "EIO from a replica's file system (ext4 on loop, shut down); SIGKILL of the primary after a secondary EIO"
    mode = "latest"

    def __init__(self) -> None:
        self.mnt: Path | None = None
        self.img: Path | None = None
        self.side = 1

    def unavailable(self) -> str | None:
        if shutil.which("mkfs.ext4") is None or not Path("/dev/loop-control").exists():
            return "needs mkfs.ext4 and loop devices"
        return None

    def data_dir(self, index: int, workdir: Path) -> Path | None:
        return workdir / "ext4" / "data" if index == self.side else None

    async def prepare(self, workdir: Path, rng: random.Random) -> None:
        self.side = rng.choice([0, 1])
        self.mnt = workdir / "ext4"
        self.mnt.mkdir(parents=True)
        self.img = workdir / "ext4.img"
        await run_command(["truncate", "-s", "48M", str(self.img)])
        await run_command(["mkfs.ext4", "-q", "-F", str(self.img)])
        await run_command(["mount", "-o", "loop", str(self.img), str(self.mnt)])

    async def inject(self, c: Controller, rng: random.Random) -> None:
        assert self.mnt is not None
        c.note(f"fault: EIO on the {'primary' if self.side == 0 else 'secondary'}'s file system")
        if self.side == 0:
            await asyncio.to_thread(_shutdown, self.mnt)
            return
        c.hold_reactions = True
        async with c.lock:
            p, s = c.primary, c.secondary
            assert p is not None and s is not None
            await asyncio.to_thread(_shutdown, self.mnt)
            n = rng.randint(1, 8)
            await c.workload.after_acks(n)
            t = time.monotonic()
            p.agent.kill()
            await p.agent.wait_exit()
            c.workload.retarget(None)
            c.primary = None
            marked = await c.durable_out_of_sync(p)
            c.note(f"primary killed {n} acks after the secondary's EIO; durable out-of-sync mark: {marked}")
            await s.agent.stop()
            if marked:
                return
            # no mark: the secondary may be promoted, so it must hold every acknowledged write
            await _remount(self.img, self.mnt)
            image = await c.read_disk_file(s)
            from tests.chaos.checker import check_latest

            c.violations += check_latest(image, c.hist, t, f"{s.name}'s disk after EIO, primary unmarked")

    async def cleanup(self) -> None:
        if self.mnt is not None:
            await run_command(["umount", "-l", str(self.mnt)], check=False)


async def _remount(img: Path, mnt: Path, within: float = 20.0) -> None:
    """Mount the shut-down file system again, to read what reached its disk. The secondary's
    daemon may still hold its images open for a moment after its agent exited (it follows
    by PDEATHSIG): until then umount fails, and mounting over the busy mount would read the
    shut-down one (EIO)."""
    deadline = time.monotonic() + within
    while (await run_command(["umount", str(mnt)], check=False)).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mnt} is still busy {within:.0f} s after its replica stopped")
        await asyncio.sleep(0.1)
    await run_command(["mount", "-o", "loop", str(img), str(mnt)])


def _shutdown(mnt: Path) -> None:
    fd = os.open(mnt, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_DEFAULT))
    finally:
        os.close(fd)


class PeerLosses(Fault):
    name = "peer-loss-x3"
    doc = "three successive secondary losses (SIGKILL) on the same primary, each after re-protection converged"

    async def inject(self, c: Controller, rng: random.Random) -> int | None:
        done = 0
        for i in range(3):
            s = c.secondary
            if s is None or c.primary is None:
                break
            c.note(f"fault: peer loss {i + 1}: SIGKILL {s.name}")
            s.agent.kill()
            done += 1
            await asyncio.sleep(0.5)
            await wait_calm(c, 60)
            if any(v.invariant == "reprotect" for v in c.violations):
                break  # the verdict is in; the next losses would only repeat it
            await asyncio.sleep(rng.uniform(0.2, 1.0))
        return done


class FrozenOldPrimary(Fault):
    """Failure 8, step by step: A (primary) is cut off and frozen with writes in flight; B
    takes over, is re-protected to C; B dies, C takes over; B comes back on the same
    address and data dir as C's secondary; A is resumed. Checked: C and B identical, no
    acknowledgement from A after B's first one, and Latest on C."""

    name = "frozen-old-primary"
    doc = "an old primary frozen with writes in flight, resumed after its peer's address was reused (failure 8)"
    mode = "latest"
    one_primary_unjudged = (
        "the resumed old primary runs without a Lease here, so nothing tells it that it was deposed: "
        "its late acknowledgements are the Lease's to prevent (operator level); what it must not do, "
        "even without one, is write into the current replica (checked: identical, latest)"
    )

    async def inject(self, c: Controller, rng: random.Random) -> None:
        c.hold_reactions = True
        async with c.lock:
            a, b = c.primary, c.secondary
            assert a is not None and b is not None and a.agent.proc is not None
            qa = await c.qsd_pid(a)
            c.note(f"fault: partition and freeze {a.name}")
            await c.net.partition(a.node)
            c.cut_nodes.add(a.node)
            os.kill(a.agent.proc.pid, signal.SIGSTOP)
            if qa:
                os.kill(qa, signal.SIGSTOP)
            t0 = time.monotonic()
            c.primary = None
            c.workload.retarget(None)
            c.primary, c.secondary = None, b
            await c.failover(b, t0)
            c.hist.excuse(t0, time.monotonic() + 1, "old primary frozen")
            if c.primary is not b:
                return
            await c.reprotect()
        cdone = await _converge(c)
        if not cdone:
            return
        async with c.lock:
            cc = c.secondary
            assert cc is not None
            c.note(f"fault: SIGKILL {b.name}, fail over to {cc.name}")
            t1 = time.monotonic()
            b.agent.kill()
            await b.agent.wait_exit()
            c.workload.retarget(None)
            c.primary = None
            await c.failover(cc, t1)
            if c.primary is not cc:
                return
            c.lost = [(b, True)]
            c.restart_same = 1.0
            await c.reprotect()
            c.restart_same = 0.5
        if not await _converge(c):
            return
        # the workload pauses so that nothing the current primary writes hides what the old
        # one may write into the current secondary
        target = c.workload.target
        c.workload.retarget(None)
        await asyncio.sleep(0.2)
        c.note(f"fault: resume {a.name}")
        await c.net.heal(a.node)
        c.cut_nodes.discard(a.node)
        if qa:
            with contextlib.suppress(ProcessLookupError):
                os.kill(qa, signal.SIGCONT)
        os.kill(a.agent.proc.pid, signal.SIGCONT)
        await asyncio.sleep(3 * c.peer_timeout)
        st = await c.status(a)
        c.note(f"old primary {a.name} after resume: {st and st['replication']}")
        async with c.lock:
            cur, sec = c.primary, c.secondary
            if cur is not None and sec is not None:
                from tests.chaos.checker import check_identical

                mine = await c.read_export(cur)
                theirs = await c.read_disk_file(sec)
                c.violations += check_identical(mine, theirs, c.hist, f"{cur.name}/{sec.name} after {a.name} resumed")
        c.workload.retarget(target)
        # the operator would delete A's pod now; stop it before the end-of-run checks
        await a.agent.stop()
        if c.primary is a:
            c.primary = None


async def _converge(c: Controller) -> bool:
    c.hold_reactions = False
    await c.settle(60)
    c.hold_reactions = True
    ok = c.secondary is not None and c.syncing_since is None
    if not ok:
        c.note("re-protection did not converge; scenario stops here")
    return ok


class CheckpointBurst(Fault):
    name = "checkpoint-burst"
    doc = "8-24 concurrent POST /v1/checkpoint on the secondary while writing (failure 10)"
    repeat = True

    async def inject(self, c: Controller, rng: random.Random) -> None:
        s = c.secondary
        if s is None:
            return
        n = rng.randint(8, 24)
        c.note(f"fault: {n} concurrent checkpoints on {s.name}")
        res = await asyncio.gather(*(c.checkpoint(s) for _ in range(n)), return_exceptions=True)
        errors = [r for r in res if isinstance(r, BaseException)]
        if errors:
            c.note(f"{len(errors)} of {n} checkpoint calls failed: {errors[0]}")
        await asyncio.sleep(0.5)
        if c.secondary is not s and s.alive:
            c.violate("checkpoint-burst", f"a healthy secondary {s.name} was dropped during a burst of {n} checkpoints")


class FailoverDuringCheckpoint(Fault):
    """The operator's checkpoint call may time out while the agent goes on working (the
    retire of the old generation runs after the cut); a failover then races it. Here the
    primary is killed and the failover asked for right after the first of 1-4 concurrent
    checkpoint calls answered, or 0-50 ms after they were sent (failure 5)."""

    name = "failover-during-checkpoint"
    doc = "SIGKILL of the primary and failover while checkpoints are being cut and retired (failure 5)"
    repeat = True

    async def inject(self, c: Controller, rng: random.Random) -> None:
        s, p = c.secondary, c.primary
        if s is None or p is None:
            return
        n = rng.randint(1, 4)
        after_answer = rng.random() < 0.7
        c.hold_reactions = True
        async with c.lock:
            when = "after the first answer" if after_answer else "at once"
            c.note(f"fault: {n} checkpoints on {s.name}, SIGKILL {p.name} {when}")
            cps = [asyncio.create_task(c.checkpoint(s)) for _ in range(n)]
            if after_answer:
                await asyncio.wait(cps, timeout=5, return_when=asyncio.FIRST_COMPLETED)
            else:
                await asyncio.sleep(rng.uniform(0, 0.05))
            c.primary_down_at = time.monotonic()
            p.agent.kill()
            await p.agent.wait_exit()
            await c.on_primary_down(p)
            await asyncio.gather(*cps, return_exceptions=True)


class Fuzz(Fault):
    name = "fuzz"
    doc = "malformed input to the agents' HTTP API during the workload (tests.support.fuzz.fuzz_http)"
    repeat = True

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("tests.support.fuzz") is None:
            return "tests/support/fuzz.py (fuzz_http) does not exist yet"
        return None

    async def inject(self, c: Controller, rng: random.Random) -> None:
        fuzz = importlib.import_module("tests.support.fuzz")
        role, rep = pick(c, rng)
        seed = rng.randrange(1 << 30)
        rounds = 200
        c.note(f"fault: fuzz_http on {role} {rep.name} ({rounds} rounds, seed {seed})")
        # the controller holds still meanwhile: fuzz_http checks that the agent's position is
        # what it was, and a re-protection would move it
        c.hold_reactions = True
        try:
            found = await fuzz.fuzz_http(rep.agent, rounds, seed)
        finally:
            c.hold_reactions = False
        for v in found:
            c.violate("fuzz", f"{rep.name} ({role}): {v}")


CLASSES: list[type[Fault]] = [
    KillAgent,
    KillDaemon,
    KillDuringSync,
    StopCont,
    CrashPoint,
    Partition,
    Loss,
    Delay,
    Enospc,
    IoError,
    PeerLosses,
    FrozenOldPrimary,
    CheckpointBurst,
    FailoverDuringCheckpoint,
    Fuzz,
]

NOT_DONE = {
}


def by_name() -> dict[str, type[Fault]]:
    return {cls.name: cls for cls in CLASSES}
