"""`pairvol demo-agent`: the data path alone, on this machine, no Kubernetes.

Two agents (two qemu-storage-daemons) form a pair over NBD on loopback; a writer puts a
verifiable write log on the primary's export while the secondary cuts checkpoints; the
primary is killed with SIGKILL at full speed; the secondary fails over; the volume is
read back through the new primary's export and checked byte for byte against the log.
Exit status 0 only if every check holds.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import shutil
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

from pairvol.agent.procs import Agent
from pairvol.aio import bounded
from pairvol.errors import PairvolError

BLOCK = 4096
_HDR = struct.Struct(">8sQQI")
MAGIC = b"PVDEMO01"


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("demo-agent", help="two agents, checkpoints, SIGKILL, failover, verify")
    p.add_argument("--size", default="64Mi")
    p.add_argument("--mode", choices=["checkpoint", "latest", "both"], default="both")
    p.add_argument("--seconds", type=float, default=3.0, help="how long to write before the kill")
    p.add_argument("--keep", action="store_true", help="keep the data dirs")
    p.set_defaults(run=run)


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def block(slot: int, seq: int) -> bytes:
    body = hashlib.sha256(f"{slot}:{seq}".encode()).digest() * ((BLOCK - _HDR.size) // 32 + 1)
    body = body[: BLOCK - _HDR.size]
    return _HDR.pack(MAGIC, slot, seq, zlib.crc32(body)) + body


def seq_of(data: bytes, slot: int) -> int:
    """Which write of this slot the block holds (0 = never written); raises on a torn block."""
    if data == bytes(BLOCK):
        return 0
    magic, got_slot, seq, _ = _HDR.unpack_from(data)
    if magic != MAGIC or got_slot != slot or data != block(slot, seq):
        raise PairvolError(f"slot {slot}: block is torn or foreign")
    return int(seq)


async def scenario(root: Path, size: str, mode: str, seconds: float) -> dict[str, Any]:
    primary = Agent("demo", root / f"{mode}-a", size)
    secondary = Agent("demo", root / f"{mode}-b", size)
    try:
        say(f"[{mode}] starting two agents (qemu-storage-daemon each)")
        await asyncio.gather(primary.start(), secondary.start())
        await secondary.secondary(1)
        say(f"[{mode}] secondary up: hidden/active overlays, NBD export, copy-before-write")
        await primary.primary(2, secondary.replication_address, "full")
        st = await primary.wait_replicating()
        say(f"[{mode}] primary up: quorum(local disk, NBD peer), full sync done, state {st['replication']['state']}")

        slots = (await primary.status())["size"] // BLOCK // 4
        rng = random.Random(mode)
        latest = [0] * slots  # last acknowledged seq per slot
        at_checkpoint: list[int] | None = None
        checkpoint_ids: list[int] = []
        acked = 0
        stop = asyncio.Event()
        async with await primary.nbd() as nbd:

            async def checkpointer() -> None:
                nonlocal at_checkpoint
                while not stop.is_set():
                    await asyncio.sleep(0.5)
                    stop_writes.set()
                    await asyncio.sleep(0.05)  # quiesce so the checkpoint has one exact expected image
                    snapshot = list(latest)
                    cp = await secondary.checkpoint()
                    at_checkpoint = snapshot
                    checkpoint_ids.append(cp["id"])
                    say(
                        f"[{mode}] checkpoint {cp['id']} cut in {cp['durationMs']:.1f} ms "
                        f"(transaction {cp['cutMs']:.1f} ms), {acked} writes acknowledged so far"
                    )
                    stop_writes.clear()

            stop_writes = asyncio.Event()

            async def paced(lane: int, lanes: int) -> None:
                while not stop.is_set():
                    if stop_writes.is_set():
                        await asyncio.sleep(0.01)
                        continue
                    await bounded(writer_step(lane, lanes), 30)

            async def writer_step(lane: int, lanes: int) -> None:
                nonlocal acked
                slot = rng.randrange(lane, slots, lanes)
                seq = latest[slot] + 1
                await nbd.pwrite(block(slot, seq), slot * BLOCK)
                latest[slot] = seq
                acked += 1

            lanes = 8
            tasks = [asyncio.create_task(paced(i, lanes)) for i in range(lanes)]
            cps = asyncio.create_task(checkpointer())
            await asyncio.sleep(seconds)
            cps.cancel()
            await asyncio.gather(cps, return_exceptions=True)
            stop_writes.clear()
            await asyncio.sleep(0.2)
            say(f"[{mode}] SIGKILL primary (agent and its qemu-storage-daemon) with writes in flight")
            primary.kill()
            t_kill = time.monotonic()
            await primary.wait_exit()
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        result = await secondary.failover(3, mode)
        async with await secondary.nbd() as nbd2:
            first = await nbd2.pread(BLOCK, 0)
            await nbd2.pwrite(first, 0)  # the new primary accepts writes
            t_ready = time.monotonic()
            image = await nbd2.read_all()
        say(f"[{mode}] failover done in {result['durationMs']:.1f} ms; new primary serves {secondary.export_socket}")

        expect = at_checkpoint if mode == "checkpoint" else latest
        assert expect is not None, "no checkpoint was cut"
        bad = 0
        for slot in range(slots):
            got = seq_of(image[slot * BLOCK : (slot + 1) * BLOCK], slot)
            # latest: a write in flight at the kill may or may not have landed
            if got != expect[slot] and not (mode == "latest" and got == expect[slot] + 1):
                bad += 1
        verified = slots * BLOCK
        say(f"[{mode}] verified {verified >> 20} MiB in {slots} blocks: {bad} mismatches")
        return {
            "mode": mode,
            "acked": acked,
            "checkpoints": checkpoint_ids,
            "failover_ms": result["durationMs"],
            "kill_to_export_ms": (t_ready - t_kill) * 1000,
            "verified_bytes": verified,
            "mismatches": bad,
        }
    finally:
        await asyncio.gather(primary.stop(), secondary.stop(), return_exceptions=True)


async def main(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="pairvol-demo-"))
    modes = ["checkpoint", "latest"] if args.mode == "both" else [args.mode]
    results = []
    try:
        for mode in modes:
            results.append(await scenario(root, args.size, mode, args.seconds))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print("summary")
    ok = True
    for res in results:
        good = res["mismatches"] == 0
        ok &= good
        cps = res["checkpoints"] or ["-"]
        print(
            f"  {res['mode']:<10} {'OK  ' if good else 'FAIL'} writes acknowledged {res['acked']}, "
            f"checkpoints {cps[0]}..{cps[-1]}, "
            f"failover {res['failover_ms']:.1f} ms, kill→writable {res['kill_to_export_ms']:.0f} ms, "
            f"verified {res['verified_bytes'] >> 20} MiB, mismatches {res['mismatches']}"
        )
    return 0 if ok else 1


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(main(args))
    except (PairvolError, AssertionError, OSError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
