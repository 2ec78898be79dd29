"""A pod's attachment cannot write to an old primary once the secondary was promoted, on the
local cluster (Latest mode).

The split brain a CSI volume could fall into: the primary's node loses the API server, the
operator and the secondary, but *not* the pod's node, whose attachment still has its
connection to the old primary's export. The operator promotes the secondary; if the old
primary still took the attachment's writes, the pod would write to a disk the volume no
longer uses. It must not: without its Lease the old primary stops serving its export
before the operator may promote (DESIGN.md §4), and it acknowledges no write its secondary
lacks before it has durably marked the secondary OutOfSync, on the API server it cannot
reach.

The pod writes numbered, checksummed 4 KiB blocks into a Block claim, one after the other,
each fsynced before it is reported. The old primary's node is cut off (iptables inside its
network namespace: everything to and from the API server's proxy and the operator — the
machine's bridge address — and the secondary's node and pods; the pod's node still reaches
it). After the failover the pod writes on, through the new primary, without an error or a
restart. Then, with the old primary still cut off, its disk is read block by block and
compared with the write log and with the new primary's volume: the old disk holds nothing
the new primary does not hold, and no block the pod began after the cut was made (at most
the one write in flight then).
"""

from __future__ import annotations

import asyncio
import hashlib
import textwrap
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from tests.e2e.test_e2e_csi import (  # noqa: F401 - the csi fixture
    PODS,
    acked_at_least,
    claimed,
    copy_export,
    csi,
    pod,
    pod_log,
    records_acked,
)

from pairvol.localcluster.csi_plugins import LocalCsi
from pairvol.localcluster.demo import Stack

pytestmark = pytest.mark.timeout(150)

BLOCK = 4096

# Writes block after block until stopped, each fsynced before it is reported ("acked N").
BLOCK_STREAM_WRITER = textwrap.dedent(
    """
    import hashlib, os, signal, sys, time
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    fd = os.open("/var/run/pairvol-disk", os.O_RDWR)
    seq = 0
    while True:
        body = f"block {seq}".encode()
        record = (hashlib.sha256(body).hexdigest().encode() + b" " + body).ljust(4096, b"\\0")
        os.pwrite(fd, record, seq * 4096)
        os.fsync(fd)
        print("acked", seq, flush=True)
        seq += 1
        time.sleep(0.02)
    """
)


def records(image: bytes) -> dict[int, bytes]:
    """The writer's blocks in ``image``, by number (a block that is not all zeros must be one
    of them, intact and at its place)."""
    found = {}
    for index in range(len(image) // BLOCK):
        raw = image[index * BLOCK : (index + 1) * BLOCK]
        if not raw.strip(b"\0"):
            continue
        digest, _, body = raw.rstrip(b"\0").partition(b" ")
        assert hashlib.sha256(body).hexdigest().encode() == digest and body == f"block {index}".encode(), (
            f"block {index} holds {raw[:80]!r}"
        )
        found[index] = raw
    return found


@asynccontextmanager
async def cut_off(stack: Stack, node: str, peer: str) -> AsyncIterator[None]:
    """``node`` loses the API server, the operator (both reach it from the machine's bridge
    address) and ``peer`` (its node address and its pods), silently (DROP) and both ways, its
    kubelet too; every other node still reaches it."""
    sim = stack.sim
    rules = []
    for address in (sim.net.bridge_ip, sim.node_ip(peer), sim.net.pod_cidr(peer)):
        rules += [["INPUT", "-s", address], ["OUTPUT", "-d", address]]
        rules += [["FORWARD", "-s", address], ["FORWARD", "-d", address]]
    for rule in rules:
        await sim.run_in_node(node, ["iptables", "-w", "-I", *rule, "-j", "DROP"])
    await sim.kubelets[node].partition()
    try:
        yield
    finally:
        for rule in rules:
            await sim.run_in_node(node, ["iptables", "-w", "-D", *rule, "-j", "DROP"])
        await sim.kubelets[node].heal()


async def read_export(stack: Stack, status: dict[str, Any], blocks: int) -> bytes:
    """The first ``blocks`` blocks of the volume, read through the primary's export."""
    image = await copy_export(stack, status, stack.root / "fencing-export.img")
    data = await asyncio.to_thread(image.read_bytes)
    await asyncio.to_thread(image.unlink)
    return data[: blocks * BLOCK]


async def read_disk(path: Path, blocks: int) -> bytes:
    def read() -> bytes:
        with path.open("rb") as f:
            return f.read(blocks * BLOCK)

    return await asyncio.to_thread(read)


async def test_an_old_primary_cut_off_from_the_cluster_takes_no_write_of_the_attachment_after_the_failover(
    stack: Stack,
    csi: LocalCsi,  # noqa: F811
) -> None:
    pv_name = await claimed(stack, "disk", "Block")
    st = await stack.status(pv_name)
    old, secondary = st["primary"]["node"], st["secondary"]["node"]
    (node,) = sorted(set(stack.sim.node_names) - {old, secondary})  # the pod's: neither replica's
    await stack.kube.create(PODS, pod("writer", node, "disk", BLOCK_STREAM_WRITER, "0", block=True))

    def at_least(n: int) -> Awaitable[int | None]:
        return acked_at_least(stack, node, "writer", n)

    await stack.wait_for("the writer's first blocks", lambda: at_least(20), 30)
    old_disk = stack.sim.host_path(old, f"/var/lib/pairvol/default/{pv_name}/disk.raw")
    async with cut_off(stack, old, secondary):
        # the cut as meant: the pod's node still reaches the old primary's export, its secondary does not
        export = (st["primary"]["address"], 7802)
        _, conn = await stack.sim.net.open_connection(node, *export)
        conn.close()
        with pytest.raises(TimeoutError):
            await stack.sim.net.open_connection(secondary, *export, time_limit=1.0)
        # what the pod had acknowledged when the cut came is in its log within a moment; the
        # block after it may have been in flight
        await asyncio.sleep(0.5)
        in_flight = await records_acked(stack, node, "writer")

        async def failed_over() -> dict[str, Any] | None:
            now = await stack.status(pv_name)
            done = (now.get("lastFailover") or {}).get("durationMs") is not None
            return now if done and now["primary"]["node"] == secondary else None

        st = await stack.wait_for("the failover to the secondary", failed_over, 60)
        promoted = await records_acked(stack, node, "writer")
        written = await stack.wait_for("blocks written through the new primary", lambda: at_least(promoted + 30), 30)

        writer = await stack.kube.get(f"{PODS}/writer")
        (status,) = writer["status"]["containerStatuses"]
        assert writer["status"]["phase"] == "Running" and status["restartCount"] == 0, writer["status"]
        assert "Error" not in await pod_log(stack, node, "writer")  # no I/O error reached the pod

        # still cut off: what the old primary's disk holds, against the new primary's volume
        blocks = written + 100
        on_old = records(await read_disk(old_disk, blocks))
        on_new = records(await read_export(stack, st, blocks))

    assert set(range(written)) <= set(on_new), "every block the pod had acknowledged is on the new primary"
    assert on_old, "the old primary's disk holds the blocks written before the cut"
    beyond = sorted(i for i in on_old if i > in_flight)
    assert not beyond, (
        f"blocks {beyond[:10]} (of {len(beyond)}) were written to the old primary after it was cut off "
        f"(the pod had {in_flight} acknowledged then)"
    )
    differ = sorted(i for i, raw in on_old.items() if on_new.get(i) != raw)
    assert not differ, f"the old primary holds blocks the new one does not: {differ[:10]}"
