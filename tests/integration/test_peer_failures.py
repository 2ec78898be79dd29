"""DESIGN.md §4, the secondary's failures as the primary sees them: a dead secondary, a
silently partitioned one (network namespaces and iptables DROP: no RST, no ICMP) and one
that restarts quickly. The primary's writes may stall at most the peer timeout, then go
on; the secondary is marked out of sync before any write it missed is acknowledged."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pairvol.aio import bounded
from pairvol.localcluster.netns import ClusterNetwork
from tests.support.agents import Agent, pair, write_psk
from tests.support.promtext import value

MiB = 1 << 20


async def timed_writes(agent: Agent, seconds: float, block: bytes = b"w" * 4096) -> list[float]:
    """QD1 writes for `seconds`; returns each write's latency."""
    lat: list[float] = []
    async with await agent.nbd() as nbd:
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            t = time.monotonic()
            await bounded(nbd.pwrite(block, (i % 256) * 4096), 60)
            lat.append(time.monotonic() - t)
            i += 1
    return lat


async def wait_for(agent: Agent, pred: Any, within: float) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        st = await agent.status()
        if pred(st):
            return st
        assert time.monotonic() < deadline, f"condition not met within {within} s: {st}"
        await asyncio.sleep(0.1)


async def test_dead_secondary_stalls_writes_at_most_the_peer_timeout(tmp_path: Path) -> None:
    async with pair(tmp_path, size="16Mi", peer_timeout=2) as (primary, secondary):
        failures_before = value(await primary.metrics(), "pairvol_replication_peer_failures_total", volume="vol")
        writes = asyncio.create_task(timed_writes(primary, 5))
        await asyncio.sleep(0.5)
        secondary.kill()
        lat = await writes
        assert max(lat) <= 2 + 1.0, f"a write stalled {max(lat):.2f} s with a 2 s peer timeout"
        assert len(lat) > 50
        st = await wait_for(primary, lambda s: s["replication"]["state"] == "degraded", 5)
        assert st["replication"]["outOfSync"] is True
        assert "lost" in st["replication"]["error"]
        failures = value(await primary.metrics(), "pairvol_replication_peer_failures_total", volume="vol")
        assert failures - failures_before == 1, "one peer loss, counted once"


async def test_hung_secondary_daemon_is_dropped_like_a_partition(tmp_path: Path) -> None:
    """SIGSTOP the secondary's qemu-storage-daemon: TCP still acknowledges, but no NBD reply
    comes; the watchdog judges by replies and breaks the link within the peer timeout."""
    async with pair(tmp_path, size="16Mi", peer_timeout=3) as (primary, secondary):
        qsd_pid = (await secondary.status())["qsd"]["pid"]
        writes = asyncio.create_task(timed_writes(primary, 7))
        await asyncio.sleep(0.5)
        os.kill(qsd_pid, signal.SIGSTOP)
        try:
            lat = await writes
        finally:
            os.kill(qsd_pid, signal.SIGCONT)
        assert max(lat) <= 3 + 1.5, f"a write stalled {max(lat):.2f} s with a 3 s peer timeout"
        st = await wait_for(primary, lambda s: s["replication"]["state"] == "degraded", 5)
        assert st["replication"]["outOfSync"] is True


async def test_a_restarted_secondary_is_marked_out_of_sync_and_a_resync_makes_it_whole(tmp_path: Path) -> None:
    """The link never re-sends a write to a reconnected peer: a secondary that restarts is
    marked OutOfSync before the primary acknowledges anything without it, is not promoted,
    and after a full resync (a new pairing, new epochs) a failover shows every write."""
    async with pair(tmp_path, size="16Mi", peer_timeout=8) as (primary, secondary):
        async with await primary.nbd() as nbd:
            await nbd.pwrite(b"a" * MiB, 0)
            secondary.kill()
            await secondary.wait_exit()
            await bounded(nbd.pwrite(b"b" * MiB, MiB), 10)
            st = await wait_for(primary, lambda s: s["replication"]["state"] == "degraded", 5)
            assert st["replication"]["outOfSync"] is True
            await secondary.start()  # same ports, same data dir
            assert "found role secondary" in (await secondary.status())["restored"]
            await nbd.pwrite(b"c" * MiB, 2 * MiB)
            # the restarted secondary still runs at epoch 1: the new pairing names it
            await primary.primary(4, secondary.replication_address, "full", peer_epoch=1)
            st = await primary.wait_replicating()
            assert st["replication"]["outOfSync"] is False
            await nbd.pwrite(b"d" * MiB, 3 * MiB)
        primary.kill()
        await primary.wait_exit()
        await secondary.failover(epoch=5, mode="latest")
        async with await secondary.nbd() as nbd:
            assert await nbd.pread(4 * MiB, 0) == b"a" * MiB + b"b" * MiB + b"c" * MiB + b"d" * MiB


def node_agent(net: ClusterNetwork, node: str, data_dir: Path, token: str, psk: Path, **kw: Any) -> Agent:
    """An agent inside a node's network namespace, listening on the node's address."""
    return Agent(
        "vol", data_dir, "16Mi", host=net.node_ip(node), netns=net.netns_name(node), token=token, psk_file=psk, **kw
    )


@pytest.fixture
async def two_nodes() -> AsyncIterator[ClusterNetwork]:
    if os.geteuid() != 0 or shutil.which("iptables") is None:
        pytest.skip("needs root, ip netns and iptables")
    async with ClusterNetwork(["pv-a", "pv-b"]) as net:
        yield net


@pytest.mark.netns
async def test_silently_partitioned_secondary_does_not_hang_the_primary(
    tmp_path: Path, two_nodes: ClusterNetwork
) -> None:
    """Packets to the secondary are dropped (no RST): QEMU's NBD client would wait for
    TCP for many minutes; the agent's watchdog breaks the link within the peer timeout."""
    net = two_nodes
    psk = write_psk(tmp_path / "psk")
    token = secrets.token_hex(16)
    p = node_agent(net, "pv-a", tmp_path / "a", token, psk, peer_timeout=3)
    s = node_agent(net, "pv-b", tmp_path / "b", token, psk, peer_timeout=3)
    try:
        await asyncio.gather(p.start(), s.start())
        await s.secondary(1)
        await p.primary(2, s.replication_address, "full")
        await p.wait_replicating()
        writes = asyncio.create_task(timed_writes(p, 8))
        await asyncio.sleep(1)
        await net.partition("pv-b")
        lat = await writes
        stall = max(lat)
        assert stall <= 3 + 1.5, f"a write stalled {stall:.2f} s with a 3 s peer timeout"
        st = await wait_for(p, lambda x: x["replication"]["state"] == "degraded", 5)
        assert st["replication"]["outOfSync"] is True
    finally:
        await asyncio.gather(p.stop(), s.stop(), return_exceptions=True)


@pytest.mark.netns
async def test_replication_link_is_tls_psk_and_refuses_a_wrong_key(tmp_path: Path, two_nodes: ClusterNetwork) -> None:
    net = two_nodes
    token = secrets.token_hex(16)
    s = node_agent(net, "pv-b", tmp_path / "b", token, write_psk(tmp_path / "psk-b"))
    p = node_agent(net, "pv-a", tmp_path / "a", token, write_psk(tmp_path / "psk-a"))
    try:
        await asyncio.gather(p.start(), s.start())
        await s.secondary(1)
        with pytest.raises(Exception, match="cannot connect to peer"):
            await p.primary(2, s.replication_address, "full")
        st = await p.status()
        assert st["replication"]["state"] == "degraded"
    finally:
        await asyncio.gather(p.stop(), s.stop(), return_exceptions=True)


async def test_agents_refuse_to_listen_beyond_loopback_without_token_and_psk(tmp_path: Path) -> None:
    a = Agent("vol", tmp_path / "x", "16Mi", host="0.0.0.0", api_port=7999, rep_port=7998)
    await a.start(wait=False)
    assert await a.wait_exit() == 2
    assert "needs --token-file" in a.log_tail()
