"""Re-protection after a transient outage of the secondary, against a full sync and a plain
copy of the same volume, in one run.

    .venv/bin/python -m tests.bench.resync                       # 256 MiB volume, 8/64 MiB changed
    nice -n 5 .venv/bin/python -m tests.bench.resync --size 4Gi --changed 8,64,512 --workdir /var/tmp

Numbers, not assertions. One pair of real agents on loopback (no TLS), paired as the
operator pairs them (``peerApi`` given, so the primary re-protects a dropped peer on its
own: docs/correctness.md R5). The volume is written whole first. Then, per amount changed:

* **partition** (the default outage): every packet to and from the secondary's
  replication port — and its API port, ``--cut node``, the default: a partition between
  the two nodes — is dropped (iptables on loopback, as the chaos runs' ``partition``
  fault does in a node's namespace) for ``--partition`` seconds, while the primary writes
  the amount (64 KiB writes at random offsets, 8 in flight). The primary's first write
  stalls until its link gate gives up (``--peer-timeout``), then the peer is dropped with
  a dirty bitmap (R1) and the writes go on locally; the partition lasts at least until
  all of them are acknowledged. Then the link heals, and nobody calls anything: the
  primary's next automatic attempt (R5: after 0.5, 1, 2, 4, 8, 16, 30 s) cuts the
  secondary's older connections, links again and copies the tracked regions (a bitmap
  resync). ``--outage kill`` instead SIGKILLs the secondary and starts it again on its
  data dir after the writes; the re-protection is the same automatic one.
* **checksum** (``--no-checksum`` to skip): the same after a secondary kill, but the
  primary is killed too before the secondary returns (its bitmap dies with its daemon),
  and the pair is re-paired by ``POST /v1/primary {sync: auto, peerDisk, peerApi}`` with a
  new epoch, as the operator does for a restarted primary: both sides compare digests (R4).

Then, ``--full-rounds`` times, alternating: a **plain copy** of the primary's image over
NBD — ``qemu-img convert`` from the image file to a stock qemu-storage-daemon exporting a
raw file over TCP loopback (the same bytes over one NBD connection, none of pairvol's
machinery) — and a **full sync** of the same volume (``POST /v1/primary {sync: full}``).

Reported per re-protection: the kind the agent chose, the time from the end of the
outage (heal, or the secondary's restart answering) to ``replicating``, the copy's own
time (``lastSync.seconds``), the automatic attempts that failed before, the bytes copied
(``lastSync.copiedBytes``) and sent over the replication link
(``pairvol_replication_sent_bytes_total``, every write payload that left through the link
gate, from the end of the outage until in sync) against the bytes changed. For the full
sync: its throughput (volume size / ``lastSync.seconds``) against the plain copy's in the
same round. At the end both images are compared byte for byte.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import random
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pairvol.agent.procs import Agent, free_port
from pairvol.agent.resync import REPROTECT_STABLE_S
from pairvol.agent.validate import InvalidInput, parse_size
from pairvol.nbd import NBDClient
from pairvol.qemu import img
from pairvol.qemu import recipes as r
from pairvol.qemu.qsd import Qsd
from tests.bench.errors import BenchError

MiB = 1 << 20
CHUNK = 64 * 1024
LANES = 8  # writes in flight during an outage
REPROTECT_WITHIN = 120.0  # s after the outage for the automatic re-protection (its last delay is 30 s)
OUTAGES = ("partition", "kill")
CUTS = ("node", "link")


@dataclass(frozen=True)
class Settings:
    size: int
    changed_mib: tuple[int, ...]
    outage: str = "partition"
    partition_s: float = 10.0
    cut: str = "node"
    checksum: bool = True
    full_rounds: int = 2
    peer_timeout: float = 5.0  # the agent's default
    # before each outage but the first: in sync this long, so that the drop starts the
    # automatic attempts' count over (R5) as a rare outage would, instead of continuing it
    settle_s: float = REPROTECT_STABLE_S


# `make bench`: small enough to keep the whole run reasonable; 4 GiB by hand (README)
FULL = Settings(size=256 * MiB, changed_mib=(8, 64))
# the smoke test: every step once, in seconds
QUICK = Settings(size=64 * MiB, changed_mib=(1,), partition_s=2.0, full_rounds=1, peer_timeout=1.0, settle_s=0.0)


def metric(metrics: str, name: str, labels: str = "") -> float:
    m = re.search(rf'^{name}\{{volume="vol"{labels}\}} (\S+)$', metrics, re.M)
    return float(m.group(1)) if m else 0.0


def sent_bytes(metrics: str) -> float:
    return metric(metrics, "pairvol_replication_sent_bytes_total")


def failed_attempts(metrics: str) -> float:
    return metric(metrics, "pairvol_resync_automatic_attempts_total", ',result="failed"')


def load1() -> float:
    return os.getloadavg()[0]


async def wait_for(agent: Agent, what: str, ok: Any, within: float) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        st = await agent.status()
        if ok(st):
            return st
        if time.monotonic() > deadline:
            raise BenchError(f"{agent.data_dir.name}: not {what} within {within:g} s: {st['replication']}")
        await asyncio.sleep(0.02)


def state_is(state: str) -> Any:
    return lambda st: st["replication"]["state"] == state


# ------------------------------------------------------------------------------ the cut


async def _iptables(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "iptables", "-w", *args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise BenchError(f"iptables {' '.join(args)}: {out.decode(errors='replace').strip()}")


def _rules(ports: Sequence[int], tag: str) -> list[list[str]]:
    """DROP on loopback of every TCP segment to or from each port: both directions of every
    connection the port serves, silently (no RST), as a partition does."""
    return [
        ["INPUT", "-i", "lo", "-p", "tcp", way, str(port), "-m", "comment", "--comment", tag, "-j", "DROP"]
        for port in ports
        for way in ("--dport", "--sport")
    ]


def cut_available() -> str | None:
    """Why a partition cannot be made here (None: it can)."""
    if shutil.which("iptables") is None:
        return "iptables is not installed (Debian: apt-get install iptables); --outage kill needs no iptables"
    if os.geteuid() != 0:
        return "a partition needs root (iptables); --outage kill needs neither"
    return None


@contextlib.asynccontextmanager
async def cut(ports: Sequence[int]) -> AsyncIterator[None]:
    """The ports unreachable on loopback while inside; the rules are removed on the way out,
    whatever happened (they carry this process's id in a comment)."""
    rules = _rules(ports, f"pairvol-bench-resync-{os.getpid()}")
    added: list[list[str]] = []
    try:
        for rule in rules:
            await _iptables("-I", *rule)
            added.append(rule)
        yield
    finally:
        for rule in added:
            with contextlib.suppress(BenchError):
                await _iptables("-D", *rule)


# ------------------------------------------------------------------------------ steps


async def write_scattered(agent: Agent, size: int, changed: int, rng: random.Random) -> None:
    """``changed`` bytes in 64 KiB writes at distinct random offsets, LANES in flight."""
    offsets = rng.sample(range(0, size, CHUNK), changed // CHUNK)
    async with await NBDClient.connect_unix(str(agent.export_socket)) as nbd:

        async def lane(mine: list[int]) -> None:
            for off in mine:
                await nbd.pwrite(rng.randbytes(CHUNK), off)

        await asyncio.gather(*(lane(offsets[i::LANES]) for i in range(LANES)))
        await nbd.flush()


async def fill(agent: Agent, size: int, rng: random.Random) -> None:
    async with await NBDClient.connect_unix(str(agent.export_socket)) as nbd:
        for off in range(0, size, 4 * MiB):
            await nbd.pwrite(rng.randbytes(min(4 * MiB, size - off)), off)
        await nbd.flush()


async def pair(primary: Agent, secondary: Agent, epoch: int, sync: str, disk: str) -> dict[str, Any]:
    """``POST /v1/primary`` as the operator sends it (the peer's disk and API given)."""
    body = {
        "epoch": epoch,
        "peer": secondary.replication_address,
        "sync": sync,
        "peerEpoch": 1,
        "peerDisk": disk,
        "peerApi": secondary.api.removeprefix("http://"),
    }
    return await primary.call("POST", "/v1/primary", body, timeout=600)


def ended_at(st: dict[str, Any]) -> float | None:
    last = st["replication"].get("lastSync")
    return None if last is None else last.get("endedAt")


async def outage_then_automatic(
    primary: Agent, secondary: Agent, s: Settings, changed: int, rng: random.Random
) -> dict[str, Any]:
    """One outage of the secondary while the primary writes ``changed`` bytes; then the
    primary's own re-protection (R5), timed from the end of the outage."""
    before = await primary.status()
    last_end = ended_at(before)
    failed0 = failed_attempts(await primary.metrics())
    t0 = time.monotonic()
    if s.outage == "partition":
        ports = [secondary.rep_port] + ([secondary.api_port] if s.cut == "node" else [])
        async with cut(ports):
            await write_scattered(primary, s.size, changed, rng)
            written = time.monotonic() - t0
            await wait_for(primary, "degraded", state_is("degraded"), 60)
            await asyncio.sleep(max(0.0, t0 + s.partition_s - time.monotonic()))
            at_end = await primary.status()
        outage_s = time.monotonic() - t0
    else:
        secondary.kill()
        await secondary.wait_exit()
        await write_scattered(primary, s.size, changed, rng)
        written = time.monotonic() - t0
        await wait_for(primary, "degraded", state_is("degraded"), 60)
        at_end = await primary.status()
        await secondary.start()
        outage_s = time.monotonic() - t0
    t_end = time.monotonic()
    sent0 = sent_bytes(await primary.metrics())
    reprotect = at_end["replication"].get("reprotect") or {}
    st = await wait_for(
        primary,
        "re-protected automatically",
        lambda st: st["replication"]["state"] == "replicating" and ended_at(st) != last_end,
        REPROTECT_WITHIN,
    )
    done = time.monotonic()
    last = st["replication"]["lastSync"]
    metrics = await primary.metrics()
    return {
        "outage": s.outage,
        "outage_s": outage_s,
        "write_s": written,
        "kind": last["kind"],
        "seconds": done - t_end,
        "copy_s": last["seconds"],
        "failed_attempts": int(failed_attempts(metrics) - failed0),
        "next_attempt_at_end_s": reprotect.get("nextInSeconds"),
        "copied": last["copiedBytes"],
        "sent": sent_bytes(metrics) - sent0,
    }


async def checksum_resync(
    primary: Agent, secondary: Agent, s: Settings, changed: int, rng: random.Random, epoch: int, disk: str
) -> dict[str, Any]:
    """The secondary killed while the primary writes; the primary killed too (its record of
    what the secondary lacks goes with its daemon); both back, and re-paired with ``auto``."""
    secondary.kill()
    await secondary.wait_exit()
    await write_scattered(primary, s.size, changed, rng)
    await wait_for(primary, "degraded", state_is("degraded"), 60)
    primary.kill()
    await primary.wait_exit()
    await asyncio.gather(primary.start(), secondary.start())
    sent0 = sent_bytes(await primary.metrics())
    t0 = time.monotonic()
    await pair(primary, secondary, epoch, "auto", disk)
    st = await wait_for(primary, "replicating", state_is("replicating"), 600)
    seconds = time.monotonic() - t0
    last = st["replication"]["lastSync"]
    return {
        "outage": "kill",
        "kind": last["kind"],
        "seconds": seconds,
        "copy_s": last["seconds"],
        "copied": last["copiedBytes"],
        "sent": sent_bytes(await primary.metrics()) - sent0,
    }


async def full_sync(primary: Agent, secondary: Agent, size: int, epoch: int, disk: str) -> dict[str, Any]:
    sent0 = sent_bytes(await primary.metrics())
    load = load1()
    t0 = time.monotonic()
    await pair(primary, secondary, epoch, "full", disk)
    st = await wait_for(primary, "replicating", state_is("replicating"), 1800)
    seconds = time.monotonic() - t0
    last = st["replication"]["lastSync"]
    return {
        "kind": last["kind"],
        "seconds": seconds,
        "copy_s": last["seconds"],
        "copied": last["copiedBytes"],
        "sent": sent_bytes(await primary.metrics()) - sent0,
        "mibps": size / MiB / last["seconds"],
        "load1": load,
    }


async def plain_copy(source: Path, target: Path, size: int) -> dict[str, Any]:
    """The image copied whole over one NBD connection on TCP loopback into ``target``, a raw
    file that a stock qemu-storage-daemon exports (its file node as the agent opens its
    disks): the floor a full sync is held against. The source is read with a shared lock
    (``-U``): the primary's daemon holds it open. ``target`` is created if it does not
    exist; a full sync writes over a disk that already holds data, so the rounds copy
    into a file the first copy wrote (into a new file, the file system's block allocation
    makes the copy 2-3x slower here)."""
    workdir = target.parent
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    if not await asyncio.to_thread(target.exists):
        await img.create(target, "raw", size)
    qsd = Qsd(workdir / ".run", workdir / "qsd.log", name="plain-copy", tuned_malloc=False)
    port = free_port()
    try:
        await qsd.start()
        await qsd.execute("blockdev-add", r.file_node(target, "disk", "raw"))
        await qsd.execute(
            "nbd-server-start", {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}}}
        )
        await qsd.execute(
            "block-export-add", {"type": "nbd", "id": "copy", "node-name": "disk", "name": "copy", "writable": True}
        )
        load = load1()
        t0 = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            "qemu-img", "convert", "-n", "-U", "-f", "raw", "-O", "raw", str(source), f"nbd://127.0.0.1:{port}/copy",
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await proc.communicate()
        seconds = time.monotonic() - t0
        if proc.returncode != 0:
            raise BenchError(f"qemu-img convert to the plain copy's export failed: {out.decode(errors='replace')}")
    finally:
        await qsd.kill()
    return {"seconds": seconds, "mibps": size / MiB / seconds, "load1": load}


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while block := f.read(8 * MiB):
            h.update(block)
    return h.hexdigest()


async def identical(a: Path, b: Path) -> bool:
    da, db = await asyncio.gather(asyncio.to_thread(_digest, a), asyncio.to_thread(_digest, b))
    return da == db


# ------------------------------------------------------------------------------ the run


async def run(s: Settings, workdir: Path) -> dict[str, Any]:
    """The whole section in ``workdir`` (created; the caller removes it)."""
    if s.outage == "partition" and (why := cut_available()) is not None:
        raise BenchError(f"resync: cannot partition: {why}")
    results: dict[str, Any] = {
        "size": s.size,
        "outage": s.outage,
        "partition_s": s.partition_s if s.outage == "partition" else None,
        "cut": s.cut if s.outage == "partition" else None,
        "peer_timeout_s": s.peer_timeout,
        "load_before": os.getloadavg(),
        "resyncs": [],
        "checksum": [],
        "rounds": [],
    }
    primary = Agent("vol", workdir / "primary", str(s.size), peer_timeout=s.peer_timeout)
    secondary = Agent("vol", workdir / "secondary", str(s.size), peer_timeout=s.peer_timeout)
    try:
        await asyncio.gather(primary.start(), secondary.start())
        await secondary.secondary(1)
        disk = (await secondary.status())["disk"]["id"]
        epoch = 2
        await pair(primary, secondary, epoch, "full", disk)
        await wait_for(primary, "replicating", state_is("replicating"), 600)
        rng = random.Random(10)
        await fill(primary, s.size, rng)
        for i, mib in enumerate(s.changed_mib):
            if i:
                st = await primary.status()
                await asyncio.sleep(max(0.0, (ended_at(st) or 0.0) + s.settle_s + 0.5 - time.time()))
            row = await outage_then_automatic(primary, secondary, s, mib * MiB, rng)
            results["resyncs"].append({"changed_mib": mib, **row})
            print(line(results["resyncs"][-1]), flush=True)
        results["identical_after_resyncs"] = await identical(
            primary.data_dir / "disk.raw", secondary.data_dir / "disk.raw"
        )
        if s.checksum:
            for mib in s.changed_mib:
                epoch += 1
                row = await checksum_resync(primary, secondary, s, mib * MiB, rng, epoch, disk)
                results["checksum"].append({"changed_mib": mib, **row})
                print(line(results["checksum"][-1]), flush=True)
        source, target = primary.data_dir / "disk.raw", workdir / "plain" / "copy.raw"
        if s.full_rounds:
            results["plain_first"] = await plain_copy(source, target, s.size)
        for n in range(s.full_rounds):
            plain = await plain_copy(source, target, s.size)
            epoch += 1
            full = await full_sync(primary, secondary, s.size, epoch, disk)
            results["rounds"].append({"plain": plain, "full": full, "ratio": full["mibps"] / plain["mibps"]})
            print(
                f"round {n + 1}: plain copy {plain['seconds']:.2f} s ({plain['mibps']:.0f} MiB/s), "
                f"full sync {full['copy_s']:.2f} s ({full['mibps']:.0f} MiB/s), "
                f"full/plain {results['rounds'][-1]['ratio']:.2f}",
                flush=True,
            )
        await asyncio.to_thread(shutil.rmtree, workdir / "plain", True)
        results["ratio"] = statistics.median(rd["ratio"] for rd in results["rounds"]) if results["rounds"] else None
        results["identical"] = await identical(primary.data_dir / "disk.raw", secondary.data_dir / "disk.raw")
    finally:
        await asyncio.gather(primary.stop(), secondary.stop(), return_exceptions=True)
    results["load_after"] = os.getloadavg()
    return results


def line(row: dict[str, Any]) -> str:
    changed = row["changed_mib"] * MiB
    return (
        f"changed {row['changed_mib']:>5} MiB  {row['outage']:<9} -> {row['kind']:<8}  "
        f"in sync after {row['seconds']:6.2f} s (copy {row['copy_s']:6.2f} s)  "
        f"copied {row['copied'] / MiB:8.1f} MiB  sent {row['sent'] / MiB:8.1f} MiB  "
        f"sent/changed {row['sent'] / changed:5.2f}"
    )


TARGET_SENT_OVER_CHANGED = 2.0
TARGET_SMALL_REPROTECT_S = 3.0  # after 8 MiB changed
TARGET_FULL_OVER_PLAIN = 0.8


def render(res: dict[str, Any]) -> str:
    from tests.bench.stats import fmt, table

    parts = []
    if res["outage"] == "partition":
        ports = "replication and API ports" if res["cut"] == "node" else "replication port"
        outage = f"a {res['partition_s']:g} s partition ({ports}, peer timeout {res['peer_timeout_s']:g} s)"
    else:
        outage = "a SIGKILL of the secondary"
    parts.append(
        f"\nResync: {res['size'] / MiB:.0f} MiB volume, after {outage}; the primary re-protects on its own (R5); "
        f"1-min load {res['load_before'][0]:.2f} -> {res['load_after'][0]:.2f}"
    )
    rows = [
        [
            f"{row['changed_mib']} MiB",
            row["outage"],
            fmt(row.get("outage_s"), 1),
            row["kind"],
            fmt(row["seconds"], 2),
            fmt(row["copy_s"], 2),
            str(row.get("failed_attempts", "-")),
            fmt(row["copied"] / MiB, 1),
            fmt(row["sent"] / MiB, 1),
            fmt(row["sent"] / (row["changed_mib"] * MiB), 2),
        ]
        for row in res["resyncs"] + res["checksum"]
    ]
    parts.append(
        table(
            [
                "changed",
                "outage",
                "outage s",
                "kind",
                "in sync after s",
                "copy s",
                "failed attempts",
                "copied MiB",
                "sent MiB",
                "sent/changed",
            ],
            rows,
        )
    )
    parts.append(
        "  in sync after: from the heal (partition) / the secondary answering again (kill) to `replicating`, "
        "automatic attempts' delays included; checksum rows: from the re-pair call"
    )
    rows = [
        [
            str(n + 1),
            fmt(rd["plain"]["seconds"], 2),
            fmt(rd["plain"]["mibps"], 0),
            fmt(rd["full"]["copy_s"], 2),
            fmt(rd["full"]["seconds"], 2),
            fmt(rd["full"]["mibps"], 0),
            fmt(rd["full"]["sent"] / MiB, 0),
            fmt(rd["ratio"], 2),
        ]
        for n, rd in enumerate(res["rounds"])
    ]
    if rows:
        first = res["plain_first"]
        parts.append(
            "Full sync against a plain copy of the image over NBD (qemu-img convert, TCP loopback) into a file "
            f"that holds data (the first copy, into a new file: {first['seconds']:.2f} s, {first['mibps']:.0f} MiB/s)"
        )
        parts.append(
            table(
                [
                    "round",
                    "plain s",
                    "plain MiB/s",
                    "full copy s",
                    "full call s",
                    "full MiB/s",
                    "sent MiB",
                    "full/plain",
                ],
                rows,
            )
        )
    worst = max((row["sent"] / (row["changed_mib"] * MiB) for row in res["resyncs"]), default=None)
    small = [row["seconds"] for row in res["resyncs"] if row["changed_mib"] == 8]
    parts.append(
        f"  targets: sent/changed <= {TARGET_SENT_OVER_CHANGED:g} (worst {fmt(worst, 2)}); "
        f"re-protection after 8 MiB <= {TARGET_SMALL_REPROTECT_S:g} s ({fmt(small[0], 2) if small else 'not run'}); "
        f"full/plain >= {TARGET_FULL_OVER_PLAIN:g} (median {fmt(res.get('ratio'), 2)}); "
        f"images identical after the automatic resyncs: {'yes' if res.get('identical_after_resyncs') else 'NO'}, "
        f"at the end: {'yes' if res.get('identical') else 'NO'}"
    )
    return "\n".join(parts)


def size_arg(text: str) -> int:
    """A volume size on the command line (argparse reports the message)."""
    try:
        return parse_size(text)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench.resync", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=size_arg, default=256 * MiB, help="volume size (default 256Mi)")
    p.add_argument("--changed", default="8,64", help="MiB written during each outage, comma-separated (default 8,64)")
    p.add_argument("--outage", choices=OUTAGES, default="partition", help="partition (default) or kill the secondary")
    p.add_argument("--partition", type=float, default=10.0, help="seconds the partition lasts at least (default 10)")
    p.add_argument(
        "--cut",
        choices=CUTS,
        default="node",
        help="node: replication and API ports (default); link: replication port only",
    )
    p.add_argument("--peer-timeout", type=float, default=5.0, help="the agents' --peer-timeout (default 5)")
    p.add_argument(
        "--settle",
        type=float,
        default=REPROTECT_STABLE_S,
        help=f"seconds in sync before each outage but the first (default {REPROTECT_STABLE_S:g}: "
        "the drop then starts the automatic attempts' count over)",
    )
    p.add_argument("--no-checksum", action="store_true", help="skip the checksum resyncs")
    p.add_argument("--full-rounds", type=int, default=2, help="plain copy + full sync rounds (default 2)")
    p.add_argument("--workdir", type=Path, default=None, help="parent of the temporary directory (default /tmp)")
    args = p.parse_args(argv)
    try:
        changed = tuple(int(x) for x in args.changed.split(",") if x.strip())
    except ValueError:
        p.error(f"--changed {args.changed!r}: expected comma-separated MiB, e.g. 8,64,512")
    s = Settings(
        size=args.size,
        changed_mib=changed,
        outage=args.outage,
        partition_s=args.partition,
        cut=args.cut,
        checksum=not args.no_checksum,
        full_rounds=args.full_rounds,
        peer_timeout=args.peer_timeout,
        settle_s=args.settle,
    )
    if any(mib * MiB > s.size for mib in changed):
        p.error(f"--changed {args.changed}: more than the volume's {s.size // MiB} MiB")
    print(f"uptime: {os.popen('uptime').read().strip()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="pairvol-bench-resync-", dir=args.workdir) as tmp:
        try:
            res = asyncio.run(run(s, Path(tmp)))
        except BenchError as exc:
            print(f"bench: {exc}")
            return 1
    print(render(res))
    print(f"uptime: {os.popen('uptime').read().strip()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
