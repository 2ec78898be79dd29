"""``make bench-csi``: what the CSI driver's attachment costs, and the stall a pod sees
when its volume fails over in Latest mode. Numbers, not assertions.

    .venv/bin/python -m tests.bench.csi [--quick] [--json FILE] [--failovers N] [--rounds N] ...

Why: a pod does not reach the volume's NBD export itself. Its node stages the volume
through an *attachment* (docs/csi.md): a qemu-storage-daemon that is an NBD client of the
export over TCP with TLS-PSK, serving the volume as a FUSE export, and a loop device over
that file; then a file system on it (Filesystem) or the loop device itself (Block). This
measures, in one run, the same fio workloads as ``make bench`` on

* ``export``: the primary's NBD export directly (fio's nbd engine on its unix socket; what
  ``make bench`` calls c-pairvol),
* ``fuse``: the attacher's FUSE export of that volume, the file under the loop device
  (fio, libaio, O_DIRECT),
* ``block``: the published block device of a Block volume (fio, libaio, O_DIRECT),
* ``fs``: a file in the ext4 of a Filesystem volume, mounted and published (libaio, O_DIRECT),

and the ratios ``block/export`` (what the attachment costs: TCP + TLS-PSK to the export,
the attacher's NBD client, FUSE and the loop device), ``fuse/export`` (all of it but the
loop device), ``block/fuse`` (the loop device alone), ``fs/export`` and ``fs/block``
(ext4 on top). fio's nbd engine cannot open the export over TLS-PSK (libnbd refuses a
``tls-psk-file`` in a URI unless the program allows local files, and fio does not), so
TCP + TLS-PSK is not separated from the attacher's FUSE export here. Rounds interleave the configurations
(rotating order) and the ratios are taken within each round.

Then the **failover stall**: a writer in the mounted file system writes 4 KiB and fsyncs,
over and over, timing each write+fsync, while the volume's primary is SIGKILLed and the
secondary promoted in Latest mode at once (``POST /v1/failover``, as the operator does after
its detection and grace period, which are not part of this number); after each failover
a new secondary is synced in (a full sync) before the next. Per failover: the longest
write+fsync (the pod-visible stall), the promotion's ``durationMs`` and when it
returned. Reported: p50/p99/max over the failovers.

The volumes are two pairs of real agents on this machine (tests.support.agents), each
primary serving its export on 127.0.0.1 with TLS-PSK, the promoted secondary taking over
the same address (as the volume's Service would follow it); the node plugin is the real
``pairvol csi --mode node`` with its pod's privileges, called through stubs compiled from
csi.proto, as the kubelet would. Needs root (mounts, loop devices, FUSE).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pairvol.aio import bounded
from tests.bench.errors import BenchError
from tests.bench.fio import WORKLOADS, Workload, nbd_uri, parse_fio, require_fio
from tests.bench.stats import fmt, ratio, summary, table
from tests.support.agents import Agent, free_port, write_psk
from tests.support.csi import Stubs, compile_stubs, driver, node_plugin_security, shared_mounts

log = logging.getLogger(__name__)

CONFIGS = ("export", "fuse", "block", "fs")
RATIOS = (
    ("block/export", "block", "export"),
    ("fs/export", "fs", "export"),
    ("fs/block", "fs", "block"),
    ("fuse/export", "fuse", "export"),
    ("block/fuse", "block", "fuse"),
)
SINGLE_NODE_WRITER = 1


@dataclass(frozen=True)
class Plan:
    size: str  # each volume
    fio_mib: int  # the region (file) fio writes
    runtime_s: float
    rounds: int
    failovers: int


FULL = Plan(size="256Mi", fio_mib=128, runtime_s=5, rounds=3, failovers=12)
QUICK = Plan(size="64Mi", fio_mib=16, runtime_s=1, rounds=1, failovers=2)


# --------------------------------------------------------------------------- volumes


@dataclass
class Volume:
    """A replicating pair serving its export on 127.0.0.1:``port`` (TLS-PSK)."""

    name: str
    workdir: Path
    size: str
    psk_file: Path
    port: int
    primary: Agent
    secondary: Agent
    epoch: int
    generation: int = 0
    retired: list[Agent] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def new_agent(self) -> Agent:
        self.generation += 1
        return Agent(
            name="vol",
            data_dir=self.workdir / f"{self.name}-{self.generation}",
            size=self.size,
            psk_file=self.psk_file,
            extra_args=["--export-listen", self.address],
        )

    async def failover(self) -> tuple[float, float, float]:
        """SIGKILL the primary, promote the secondary in Latest mode at once. Returns
        (monotonic kill time, promotion returned, the agent's durationMs)."""
        killed = time.monotonic()
        self.primary.kill()
        await self.primary.wait_exit()
        answer = await self.secondary.failover(self.epoch + 1, "latest")
        promoted = time.monotonic()
        self.epoch += 1
        self.retired.append(self.primary)
        self.primary, self.secondary = self.secondary, self.primary
        return killed, promoted, float(answer.get("durationMs") or 0.0)

    async def reprotect(self) -> float:
        """A new secondary, fully synced in; seconds it took."""
        start = time.monotonic()
        dead = self.secondary
        fresh = self.new_agent()
        await fresh.start()
        await fresh.secondary(self.epoch + 1)
        await self.primary.primary(self.epoch + 2, fresh.replication_address, "full")
        self.epoch += 2
        self.secondary = fresh
        await self.primary.wait_replicating(120)
        await dead.stop()
        await asyncio.to_thread(shutil.rmtree, dead.data_dir, True)
        return time.monotonic() - start

    async def stop(self) -> None:
        agents = [self.primary, self.secondary, *self.retired]
        await asyncio.gather(*(a.stop() for a in agents), return_exceptions=True)


@contextlib.asynccontextmanager
async def volume(workdir: Path, name: str, size: str) -> AsyncIterator[Volume]:
    psk = write_psk(workdir / f"{name}.psk")
    port = free_port()
    v = Volume(name, workdir, size, psk, port, primary=None, secondary=None, epoch=2)  # type: ignore[arg-type]
    v.primary, v.secondary = v.new_agent(), v.new_agent()
    try:
        await asyncio.gather(v.primary.start(), v.secondary.start())
        await v.secondary.secondary(1)
        await v.primary.primary(2, v.secondary.replication_address, "none")  # both disks new: all zeros
        await v.primary.wait_replicating()
        yield v
    finally:
        await v.stop()


# ------------------------------------------------------------------------ kubelet


@dataclass
class Kubelet:
    """What the kubelet does to one volume: stage, publish, unpublish, unstage."""

    stubs: Stubs
    node: Any
    root: Path

    def capability(self, block: bool) -> Any:
        pb = self.stubs.pb
        cap = pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(mode=SINGLE_NODE_WRITER))
        if block:
            cap.block.SetInParent()
        else:
            cap.mount.fs_type = "ext4"
        return cap

    def paths(self, v: Volume) -> tuple[Path, Path]:
        return self.root / f"staging-{v.name}", self.root / f"pods/uid/{v.name}"

    async def attach(self, v: Volume, block: bool) -> Path:
        pb = self.stubs.pb
        staging, target = self.paths(v)
        await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
        vid = f"bench/{v.name}"
        context = {"exportAddress": v.address}
        psk = (await asyncio.to_thread(v.psk_file.read_text)).strip()
        await self.node.NodeStageVolume(
            pb.NodeStageVolumeRequest(
                volume_id=vid,
                staging_target_path=str(staging),
                volume_capability=self.capability(block),
                secrets={"psk": psk},
                volume_context=context,
            ),
            timeout=120,
        )
        await self.node.NodePublishVolume(
            pb.NodePublishVolumeRequest(
                volume_id=vid,
                staging_target_path=str(staging),
                target_path=str(target),
                volume_capability=self.capability(block),
                volume_context=context,
            ),
            timeout=60,
        )
        return target

    async def detach(self, v: Volume) -> None:
        pb = self.stubs.pb
        staging, target = self.paths(v)
        vid = f"bench/{v.name}"
        await self.node.NodeUnpublishVolume(
            pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target)), timeout=60
        )
        await self.node.NodeUnstageVolume(
            pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging)), timeout=60
        )


def loop_backing_file(device: Path) -> Path:
    """The file a loop device (or a file bound onto one) reads and writes: here the
    attacher's FUSE export of the volume."""
    rdev = os.stat(device).st_rdev
    sysfs = Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/loop/backing_file")
    try:
        return Path(sysfs.read_text().strip())
    except OSError as exc:
        raise BenchError(f"{device} is not a loop device ({exc})") from exc


# ---------------------------------------------------------------------------- fio


def fio_argv(config: str, workload: Workload, target: str, size_mib: int, runtime_s: float, output: Path) -> list[str]:
    """One fio job: the nbd engine for an export URI, libaio with O_DIRECT for a device or a
    file (pure)."""
    argv = [f"--name={config}-{workload.name}"]
    if config.startswith("export"):
        argv += ["--ioengine=nbd", f"--uri={target}"]
    else:
        argv += ["--ioengine=libaio", "--direct=1", f"--filename={target}"]
    argv += [
        f"--rw={workload.rw}",
        f"--bs={workload.bs}",
        f"--iodepth={workload.iodepth}",
        f"--size={size_mib}M",
        "--time_based",
        f"--runtime={max(1, round(runtime_s))}",
        "--randrepeat=0",
        "--norandommap",
        "--output-format=json",
        f"--output={output}",
    ]
    return ["fio", *argv]


async def run_fio(argv: Sequence[str], output: Path, limit_s: float) -> dict[str, float | None]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await bounded(proc.communicate(), limit_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BenchError(f"fio did not finish within {limit_s:.0f} s: {' '.join(argv)}") from None
    if proc.returncode != 0:
        raise BenchError(f"fio exited with {proc.returncode}: {(err or out).decode(errors='replace').strip()}")
    text = await asyncio.to_thread(output.read_text)
    return parse_fio(json.loads(text))


async def throughput(targets: dict[str, str], plan: Plan, workdir: Path) -> dict[str, Any]:
    """Every workload on every configuration, ``plan.rounds`` interleaved rounds."""
    results: dict[str, Any] = {c: {w.name: {"rounds": []} for w in WORKLOADS} for c in targets}
    order = list(targets)
    for rnd in range(plan.rounds):
        for wl in WORKLOADS:
            turn = order[rnd % len(order) :] + order[: rnd % len(order)]
            for config in turn:
                output = workdir / f"fio-{config}-{wl.name}.json"
                argv = fio_argv(config, wl, targets[config], plan.fio_mib, plan.runtime_s, output)
                log.info("round %d: %s %s", rnd + 1, config, wl.name)
                got = await run_fio(argv, output, plan.runtime_s + 120)
                got["load1"] = os.getloadavg()[0]
                results[config][wl.name]["rounds"].append(got)
    for per in results.values():
        for entry in per.values():
            rounds = entry["rounds"]
            for key in ("mibps", "iops", "p50_us", "p99_us", "p99.9_us"):
                values = [r[key] for r in rounds if r.get(key) is not None]
                entry[key] = statistics.median(values) if values else None
    return results


def ratios(tp: dict[str, Any]) -> dict[str, Any]:
    """Per pair and workload: the median over rounds of the within-round ratio, and its range."""
    out: dict[str, Any] = {}
    for label, num, den in RATIOS:
        if num not in tp or den not in tp:
            continue
        per: dict[str, Any] = {}
        for wl in WORKLOADS:
            a, b = tp[num][wl.name]["rounds"], tp[den][wl.name]["rounds"]
            entry: dict[str, Any] = {}
            for key in ("mibps", "iops", "p50_us", "p99_us"):
                paired = [r for x, y in zip(a, b, strict=False) if (r := ratio(x.get(key), y.get(key))) is not None]
                entry[key] = statistics.median(paired) if paired else None
                entry[f"{key}_range"] = [min(paired), max(paired)] if paired else None
            per[wl.name] = entry
        out[label] = per
    return out


# ----------------------------------------------------------------------- failover


class StallWriter:
    """A thread writing 4 KiB and fsyncing, over and over, in a file of the mounted file
    system; each (start, end) in monotonic time. An error is recorded, not raised."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writes: list[tuple[float, float]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            seq = 0
            while not self._stop.is_set():
                block = seq.to_bytes(8, "little") * 512
                start = time.monotonic()
                try:
                    os.pwrite(fd, block, (seq % 256) * 4096)
                    os.fsync(fd)
                except OSError as exc:
                    self.errors.append(f"{exc}")
                    time.sleep(0.1)
                    continue
                self.writes.append((start, time.monotonic()))
                seq += 1
                time.sleep(0.005)
        finally:
            os.close(fd)

    def completed_after(self, t: float) -> int:
        return sum(1 for _, end in self.writes if end > t)

    def longest_ending_after(self, t: float) -> float:
        return max((end - start for start, end in self.writes if end > t), default=0.0)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.to_thread(self._thread.join, 120)


async def failover_stalls(v: Volume, mount: Path, count: int) -> dict[str, Any]:
    writer = StallWriter(mount / "stall.dat")
    writer.start()
    points: list[dict[str, float | None]] = []
    try:
        for i in range(count):
            await asyncio.sleep(1.0)  # steady writes first
            baseline = writer.longest_ending_after(time.monotonic() - 1.0)
            killed, promoted, duration_ms = await v.failover()
            deadline = time.monotonic() + 90
            while writer.completed_after(promoted) < 5:
                if time.monotonic() > deadline:
                    raise BenchError(f"failover {i + 1}: no write completed within 90 s (errors: {writer.errors[-3:]})")
                await asyncio.sleep(0.05)
            first = min(end for _, end in writer.writes if end > killed)
            stall = writer.longest_ending_after(killed)
            # the next failover needs a secondary; after the last one, none is needed
            reprotect_s = await v.reprotect() if i + 1 < count else None
            point = {
                "stall_ms": stall * 1000,
                "first_write_after_kill_ms": (first - killed) * 1000,
                "promotion_returned_ms": (promoted - killed) * 1000,
                "duration_ms": duration_ms,
                "steady_max_ms": baseline * 1000,
                "reprotect_s": reprotect_s,
            }
            log.info("failover %d/%d: %s", i + 1, count, {k: x if x is None else round(x, 1) for k, x in point.items()})
            points.append(point)
    finally:
        await writer.stop()
    return {
        "points": points,
        "errors": list(writer.errors),
        "writes": len(writer.writes),
        **{
            key: summary([x for p in points if (x := p[key]) is not None], (50, 99))
            for key in ("stall_ms", "first_write_after_kill_ms", "promotion_returned_ms", "duration_ms")
        },
    }


# --------------------------------------------------------------------------- run


async def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = QUICK if args.quick else FULL
    changes = {k: v for k, v in (("rounds", args.rounds), ("failovers", args.failovers), ("runtime_s", args.runtime))}
    from dataclasses import replace

    plan = replace(plan, **{k: v for k, v in changes.items() if v is not None})
    require_fio()
    base = args.workdir or Path("/tmp")
    # short: an attachment's QMP socket lives in the node plugin's state directory
    workdir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="pvcb-", dir=base))
    results: dict[str, Any] = {
        "meta": {
            "quick": args.quick,
            "plan": plan.__dict__,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "load_start": os.getloadavg(),
            "command": " ".join([sys.executable, "-m", "tests.bench.csi", *sys.argv[1:]]),
            "transport": args.attach_transport,
        }
    }
    stubs = compile_stubs(workdir / "stubs")
    try:
        async with (
            volume(workdir, "fs", plan.size) as fs_vol,
            volume(workdir, "blk", plan.size) as blk_vol,
            # as on a node: the agents the failovers start get copies of the plugin's mounts
            # that its unmounts reach, or the unstage would find the file system still held
            shared_mounts(workdir / "kubelet", workdir / "st"),
            driver(
                workdir,
                "node",
                "--node-id",
                "bench-node",
                "--state-dir",
                str(workdir / "st"),
                "--attach-transport",
                args.attach_transport,
                security=node_plugin_security("bench-node"),
            ) as plugin,
        ):
            kubelet = Kubelet(stubs, stubs.grpc.NodeStub(plugin.channel), workdir / "kubelet")
            mount = await kubelet.attach(fs_vol, block=False)
            device = await kubelet.attach(blk_vol, block=True)
            try:
                targets = {
                    "export": nbd_uri(blk_vol.primary.export_socket),
                    "block": str(device),
                    "fs": str(mount / "fio.dat"),
                }
                if args.attach_transport == "fuse":  # an nbd attachment has no FUSE file
                    targets["fuse"] = str(await asyncio.to_thread(loop_backing_file, device))
                targets = {c: t for c, t in targets.items() if c in args.configs}
                if "throughput" in args.sections:
                    results["throughput"] = await throughput(targets, plan, workdir)
                    results["ratios"] = ratios(results["throughput"])
                    with contextlib.suppress(OSError):
                        await asyncio.to_thread((mount / "fio.dat").unlink)
                if "failover" in args.sections:
                    results["failover"] = await failover_stalls(fs_vol, mount, plan.failovers)
            finally:
                results["detach_failed"] = []
                for v in (fs_vol, blk_vol):
                    try:
                        await kubelet.detach(v)
                    except Exception as exc:  # the report says so; the plugin's teardown follows
                        log.warning("detaching %s failed: %s", v.name, exc)
                        results["detach_failed"].append(f"{v.name}: {exc}")
    finally:
        if args.keep:
            log.warning("kept %s", workdir)
        else:
            await asyncio.to_thread(shutil.rmtree, workdir, True)
    results["meta"]["load_end"] = os.getloadavg()
    return results


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    parts = [
        f"pairvol CSI attachment benchmark ({'quick' if meta['quick'] else 'full'} run, "
        f"transport {meta.get('transport', 'fuse')}), "
        f"{os.cpu_count()} CPUs, 1-min load {meta['load_start'][0]:.2f} -> {meta['load_end'][0]:.2f}",
        f"  {meta['command']}",
    ]
    tp = results.get("throughput")
    if tp:
        rows = []
        for config, per in tp.items():
            for wl in WORKLOADS:
                m = per[wl.name]
                iops = [r["iops"] for r in m["rounds"]]
                rows.append(
                    [config, wl.name, fmt(m["mibps"]), fmt(m["iops"], 0), f"{fmt(min(iops), 0)}-{fmt(max(iops), 0)}",
                     fmt(m["p50_us"], 0), fmt(m["p99_us"], 0), fmt(m["p99.9_us"], 0)]
                )  # fmt: skip
        parts.append(
            f"\nThroughput and latency (fio, median of {meta['plan']['rounds']} interleaved round(s), "
            f"{meta['plan']['fio_mib']} MiB region; completion latency, µs)"
        )
        parts.append(table(["config", "workload", "MiB/s", "IOPS", "IOPS range", "p50", "p99", "p99.9"], rows))
    rat = results.get("ratios")
    if rat:
        rows = []
        for label, per in rat.items():
            for wl, r in per.items():
                rng = r.get("iops_range")
                rows.append(
                    [label, wl, fmt(r["mibps"], 3), fmt(r["iops"], 3),
                     f"{fmt(rng[0], 2)}-{fmt(rng[1], 2)}" if rng else "-", fmt(r["p50_us"], 2), fmt(r["p99_us"], 2)]
                )  # fmt: skip
        parts.append("\nRatios (MiB/s, IOPS: higher is better; latency: lower is better; median of per-round ratios)")
        parts.append(table(["ratio", "workload", "MiB/s", "IOPS", "IOPS range", "p50 lat", "p99 lat"], rows))
    fo = results.get("failover")
    if fo:
        n = len(fo["points"])
        parts.append(
            f"\nLatest-mode failover under a writer in the mounted file system ({n} failovers, "
            f"{fo['writes']} writes, {len(fo['errors'])} I/O errors): primary SIGKILLed, secondary promoted at once"
        )
        rows = [
            [name, fmt(fo[key]["p50"], 0), fmt(fo[key]["p99"], 0), fmt(fo[key]["max"], 0)]
            for name, key in (
                ("pod-visible stall (longest write+fsync)", "stall_ms"),
                ("first write completed after the kill", "first_write_after_kill_ms"),
                ("promotion call returned after the kill", "promotion_returned_ms"),
                ("promotion durationMs (agent)", "duration_ms"),
            )
        ]
        parts.append(table(["ms", "p50", "p99", "max"], rows))
        reprotect = [p["reprotect_s"] for p in fo["points"] if p["reprotect_s"] is not None]
        if reprotect:
            median = statistics.median(reprotect)
            parts.append(f"  re-protection between failovers (new secondary, full sync): median {median:.1f} s")
        if fo["errors"]:
            parts.append(f"  I/O errors seen by the writer: {fo['errors'][:3]}")
    return "\n".join(parts)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench.csi", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny run (small volumes, 1 round, 2 failovers)")
    p.add_argument("--json", type=Path, default=None, help="also write every number as JSON to this file")
    p.add_argument("--sections", default="throughput,failover", help="comma-separated: throughput, failover")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    p.add_argument("--rounds", type=int, default=None, help="interleaved fio rounds (default 3, quick 1)")
    p.add_argument("--runtime", type=float, default=None, help="seconds per fio job (default 5, quick 1)")
    p.add_argument("--failovers", type=int, default=None, help="failovers measured (default 12, quick 2)")
    p.add_argument(
        "--attach-transport",
        choices=("fuse", "nbd"),
        default="fuse",
        help="the node plugin's transport (nbd: the kernel's nbd client, needs the module; no 'fuse' config)",
    )
    p.add_argument("--workdir", type=Path, default=None, help="parent of the temporary directory (default /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    for name, allowed in (("sections", ("throughput", "failover")), ("configs", CONFIGS)):
        chosen = [x for x in getattr(args, name).split(",") if x]
        bad = [x for x in chosen if x not in allowed]
        if bad:
            p.error(f"--{name}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
        setattr(args, name, chosen)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    if os.geteuid() != 0:
        print("bench-csi: needs root (mounts, loop devices, FUSE)", file=sys.stderr)
        return 2
    for tool in ("fio", "qemu-storage-daemon", "mkfs.ext4", "losetup"):
        if shutil.which(tool) is None:
            print(f"bench-csi: {tool} not found on PATH (see .ci/run for the Debian packages)", file=sys.stderr)
            return 2
    try:
        results = asyncio.run(run(args))
    except BenchError as exc:
        print(f"bench-csi: {exc}", file=sys.stderr)
        return 1
    print(render(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nJSON results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
