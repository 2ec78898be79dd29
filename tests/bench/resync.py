"""Re-protection after a transient secondary outage: bitmap and checksum resync against full sync.

    .venv/bin/python -m tests.bench.resync                      # 256 MiB volume, 1/4/16 MiB changed
    .venv/bin/python -m tests.bench.resync --size 1Gi --changed 8,64 --workdir /var/tmp

Numbers, not assertions. One pair of real agents (the primary and a secondary on the same
machine, loopback, no TLS). For each amount changed: the volume is written whole and
replicated, the secondary is killed, the primary writes that amount (64 KiB writes
scattered over the volume) while it is away, the secondary restarts on the same data
dir, and the pair is re-protected — once with ``sync: auto`` (a bitmap resync); once with
``sync: auto`` and ``peerApi`` after the primary was also killed (SIGKILL: its record of
what the secondary lacks dies with its daemon, so both sides compare checksums); then,
after the same outage again, with ``sync: full``. Reported per re-protection: the kind
the agent chose, the time from the request to ``replicating``, the bytes the sync
copied (``lastSync.copiedBytes``) and the bytes the primary sent over the replication
link (``pairvol_replication_sent_bytes_total``, which counts every write payload that
left through the link gate), against the bytes changed.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pairvol.agent.procs import Agent
from pairvol.agent.validate import parse_size
from pairvol.nbd import NBDClient

MiB = 1 << 20
CHUNK = 64 * 1024
KINDS = ("auto", "checksum", "full")  # requested: a bitmap resync, a comparison, a full copy


def sent_bytes(metrics: str) -> float:
    m = re.search(r'^pairvol_replication_sent_bytes_total\{volume="vol"\} (\S+)$', metrics, re.M)
    return float(m.group(1)) if m else 0.0


async def wait_state(agent: Agent, state: str, within: float = 600.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        st = await agent.status()
        if st["replication"]["state"] == state:
            return st
        if time.monotonic() > deadline:
            raise TimeoutError(f"{agent.data_dir.name} not {state} within {within} s: {st['replication']}")
        await asyncio.sleep(0.02)


async def primary_call(primary: Agent, secondary: Agent, epoch: int, sync: str, peer_disk: str) -> None:
    body = {"epoch": epoch, "peer": secondary.replication_address, "sync": sync, "peerEpoch": 1, "peerDisk": peer_disk}
    if sync == "checksum":  # the same request as a bitmap resync, with the peer's API to compare through
        body.update(sync="auto", peerApi=secondary.api.removeprefix("http://"))
    await primary.call("POST", "/v1/primary", body)


async def outage(
    primary: Agent, secondary: Agent, size: int, changed: int, rng: random.Random, lose_record: bool
) -> None:
    secondary.kill()
    await secondary.wait_exit()
    async with await NBDClient.connect_unix(str(primary.export_socket)) as nbd:
        offsets = rng.sample(range(0, size, CHUNK), changed // CHUNK)
        for off in offsets:
            await nbd.pwrite(rng.randbytes(CHUNK), off)
        await nbd.flush()
    await wait_state(primary, "degraded")
    if lose_record:
        primary.kill()
        await primary.wait_exit()
        await primary.start()
    await secondary.start()


async def reprotect(primary: Agent, secondary: Agent, epoch: int, sync: str, disk: str) -> dict[str, Any]:
    before = sent_bytes(await primary.metrics())
    t0 = time.monotonic()
    await primary_call(primary, secondary, epoch, sync, disk)
    st = await wait_state(primary, "replicating")
    seconds = time.monotonic() - t0
    last = st["replication"]["lastSync"]
    return {
        "kind": last["kind"],
        "seconds": seconds,
        "copied": last["copiedBytes"],
        "sent": sent_bytes(await primary.metrics()) - before,
    }


async def run(size: int, changed_mib: list[int], workdir: Path | None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pairvol-bench-resync-", dir=workdir) as tmp:
        primary = Agent("vol", Path(tmp) / "primary", str(size))
        secondary = Agent("vol", Path(tmp) / "secondary", str(size))
        try:
            await asyncio.gather(primary.start(), secondary.start())
            await secondary.secondary(1)
            disk = (await secondary.status())["disk"]["id"]
            await primary_call(primary, secondary, 2, "full", disk)
            await wait_state(primary, "replicating")
            epoch = 2
            rng = random.Random(10)
            async with await NBDClient.connect_unix(str(primary.export_socket)) as nbd:
                for off in range(0, size, 4 * MiB):
                    await nbd.pwrite(rng.randbytes(min(4 * MiB, size - off)), off)
            for mib in changed_mib:
                for sync in KINDS:
                    await outage(primary, secondary, size, mib * MiB, rng, lose_record=sync == "checksum")
                    epoch += 1
                    row = await reprotect(primary, secondary, epoch, sync, disk)
                    rows.append({"changedMiB": mib, "requested": sync, **row})
                    print(line(rows[-1]), flush=True)
        finally:
            await asyncio.gather(primary.stop(), secondary.stop(), return_exceptions=True)
    return rows


def line(row: dict[str, Any]) -> str:
    changed = row["changedMiB"] * MiB
    return (
        f"changed {row['changedMiB']:>5} MiB  sync {row['requested']:<8} -> {row['kind']:<8}  "
        f"{row['seconds']:7.2f} s  copied {row['copied'] / MiB:9.1f} MiB  "
        f"sent {row['sent'] / MiB:9.1f} MiB  sent/changed {row['sent'] / changed:7.2f}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tests.bench.resync", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", default="256Mi", help="volume size (default 256Mi)")
    p.add_argument("--changed", default="1,4,16", help="MiB written during each outage, comma-separated")
    p.add_argument("--workdir", type=Path, default=None, help="parent of the temporary directory (default /tmp)")
    args = p.parse_args(argv)
    size = parse_size(args.size)
    changed = [int(x) for x in args.changed.split(",") if x.strip()]
    print(f"volume {size / MiB:.0f} MiB; each outage writes the amount in 64 KiB writes at random offsets")
    rows = asyncio.run(run(size, changed, args.workdir))
    for mib in changed:
        auto, cksum, full = (next(r for r in rows if r["changedMiB"] == mib and r["requested"] == s) for s in KINDS)
        print(
            f"{mib} MiB changed: bitmap resync {auto['seconds']:.2f} s / {auto['sent'] / MiB:.1f} MiB sent, "
            f"checksum resync {cksum['seconds']:.2f} s / {cksum['sent'] / MiB:.1f} MiB sent, "
            f"full sync {full['seconds']:.2f} s / {full['sent'] / MiB:.1f} MiB sent"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
