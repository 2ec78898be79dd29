"""A QD1 4 KiB random-write stream that records every write's start and latency.

Runs as its own process (``python -m tests.bench.writer``) so that the harness's HTTP
calls (checkpoints every second) share no event loop with the writes being timed: a
write's latency is then the NBD round trip plus a few microseconds of Python, and a long
one is a stall of the data path, not of the harness. Timestamps are CLOCK_MONOTONIC
nanoseconds, the same clock in every process on the machine, so the harness can line
writes up with checkpoint calls it made itself.

Record file: native-endian int64 pairs (start_ns, latency_ns), written at the end.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import os
import random
import sys
import time
from pathlib import Path

from pairvol.aio import bounded
from pairvol.nbd import NBDClient, NBDError
from tests.bench.errors import BenchError
from tests.bench.stats import Write

BLOCK = 4096


async def write_stream(socket: Path, seconds: float, seed: int) -> array.array[int]:
    """Write 4 KiB blocks at random aligned offsets, one at a time, for ``seconds``."""
    rng = random.Random(seed)
    record: array.array[int] = array.array("q")
    client = await NBDClient.connect_unix(str(socket))
    try:
        blocks = client.size // BLOCK
        payload = os.urandom(BLOCK)
        deadline = time.monotonic_ns() + int(seconds * 1e9)
        now = time.monotonic_ns()
        while now < deadline:
            offset = rng.randrange(blocks) * BLOCK
            start = time.monotonic_ns()
            await client.pwrite(payload, offset)
            now = time.monotonic_ns()
            record.append(start)
            record.append(now - start)
    finally:
        await client.close()
    return record


def read_record(path: Path) -> list[Write]:
    """The writes recorded by a writer process (blocking; call via asyncio.to_thread)."""
    raw: array.array[int] = array.array("q")
    raw.frombytes(path.read_bytes())
    if len(raw) % 2:
        raise BenchError(f"{path}: truncated write record ({len(raw)} values)")
    return [Write(raw[i], raw[i + 1]) for i in range(0, len(raw), 2)]


async def run_writer(socket: Path, seconds: float, out: Path, seed: int = 1) -> asyncio.subprocess.Process:
    """Start a writer process; the caller awaits ``proc.wait()`` and reads ``out``."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.bench.writer",
        "--socket",
        str(socket),
        "--seconds",
        str(seconds),
        "--out",
        str(out),
        "--seed",
        str(seed),
        stderr=asyncio.subprocess.PIPE,
    )


async def finish_writer(proc: asyncio.subprocess.Process, out: Path, timeout: float) -> list[Write]:
    """Wait for a writer process and return its writes; kill it if it overruns."""
    try:
        _, err = await bounded(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BenchError(f"QD1 writer did not finish within {timeout:.0f} s (is the export hanging?)") from None
    if proc.returncode != 0:
        raise BenchError(f"QD1 writer failed ({proc.returncode}): {err.decode(errors='replace').strip()[-800:]}")
    writes = await asyncio.to_thread(read_record, out)
    if not writes:
        raise BenchError("QD1 writer completed no writes")
    return writes


async def _main(args: argparse.Namespace) -> int:
    try:
        record = await write_stream(Path(args.socket), args.seconds, args.seed)
    except NBDError as exc:
        print(f"writer: {exc}", file=sys.stderr)
        return 1
    await asyncio.to_thread(Path(args.out).write_bytes, record.tobytes())
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--socket", required=True, help="NBD unix socket (export 'volume')")
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--out", required=True, help="record file")
    p.add_argument("--seed", type=int, default=1)
    return asyncio.run(_main(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
