"""Where a failover spends its time, and the two things taken off its critical path:
the relay of ``--export-listen`` is started while the failover runs (a process start was
most of a failover's time) and exports only once the workload export serves; the overlay
files are removed after serving. Nothing here is timed: the tests check the order, the
result and what is left behind."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from pairvol.agent.procs import AgentCallError
from pairvol.nbd import NBDClient
from pairvol.qemu import QemuError, img
from pairvol.qemu import recipes as r
from pairvol.qemu.qsd import Qsd
from tests.support.agents import Agent, free_port

MiB = 1 << 20


async def test_a_node_that_is_gone_is_told_apart_from_one_in_use(tmp_path: Path) -> None:
    """The link's teardown deletes nodes that may already be gone (the full sync's target
    after the sync): QEMU's answer for those must end the retry loop at once, and the
    answer for a node still in use must not."""
    qsd = Qsd(tmp_path / "run", tmp_path / "qsd.log")
    await qsd.start()
    try:
        await img.create(tmp_path / "base.raw", "raw", MiB)
        await img.create(tmp_path / "top.qcow2", "qcow2", MiB)
        await qsd.execute("blockdev-add", r.file_node(tmp_path / "base.raw", "base", "raw"))
        await qsd.execute("blockdev-add", r.file_node(tmp_path / "top.qcow2", "top", "qcow2", backing="base"))
        with pytest.raises(QemuError) as gone:
            await qsd.execute("blockdev-del", {"node-name": r.SYNC_TARGET_NODE})
        with pytest.raises(QemuError) as busy:
            await qsd.execute("blockdev-del", {"node-name": "base"})
        assert r.node_is_gone(gone.value), gone.value
        assert not r.node_is_gone(busy.value), busy.value
    finally:
        await qsd.kill()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


async def test_a_failover_with_export_listen_serves_over_tcp_and_reports_its_steps(tmp_path: Path) -> None:
    relay_port = free_port()
    secondary = Agent("vol", tmp_path / "s", "16Mi", extra_args=["--export-listen", f"127.0.0.1:{relay_port}"])
    primary = Agent("vol", tmp_path / "p", "16Mi")
    try:
        await asyncio.gather(secondary.start(), primary.start())
        await secondary.secondary(1)
        await primary.primary(2, secondary.replication_address, "full")
        await primary.wait_replicating()
        assert _refused(relay_port), "a secondary serves no workload export over TCP"
        data = os.urandom(2 * MiB)
        async with await primary.nbd() as nbd:
            await nbd.pwrite(data, 5 * MiB)
        await secondary.checkpoint()
        primary.kill()
        await primary.wait_exit()
        result = await secondary.failover(3, "checkpoint")
        steps = list(result["stepsMs"])
        assert steps[:2] == ["saveEpoch", "fence"], steps
        assert steps.index("commit") < steps.index("saveRole") < steps.index("export") < steps.index("relay"), steps
        assert steps[-1] == "removeFiles", steps
        assert all(v >= 0 for v in result["stepsMs"].values())
        assert not list(secondary.data_dir.glob("*-*.qcow2")), "overlay files left behind"
        tcp = await NBDClient.connect_tcp("127.0.0.1", relay_port)
        try:
            assert await tcp.pread(2 * MiB, 5 * MiB) == data
        finally:
            await tcp.close()
    finally:
        await asyncio.gather(primary.stop(), secondary.stop(), return_exceptions=True)


async def test_a_relay_that_cannot_listen_fails_the_serving_not_the_failover(tmp_path: Path) -> None:
    """The relay's port is taken when the failover starts: the disk is promoted (role
    primary, every acknowledged write kept), the answer says the workload export is not
    served and why, no relay daemon is left behind, and POST /v1/primary with a newer epoch
    serves once the port is free."""
    relay_port = free_port()
    secondary = Agent("vol", tmp_path / "s", "16Mi", extra_args=["--export-listen", f"127.0.0.1:{relay_port}"])
    primary = Agent("vol", tmp_path / "p", "16Mi")
    squatter = socket.socket()
    try:
        await asyncio.gather(secondary.start(), primary.start())
        await secondary.secondary(1)
        await primary.primary(2, secondary.replication_address, "full")
        await primary.wait_replicating()
        data = os.urandom(MiB)
        async with await primary.nbd() as nbd:
            await nbd.pwrite(data, 0)
        primary.kill()
        await primary.wait_exit()
        squatter.bind(("127.0.0.1", relay_port))
        squatter.listen(1)
        with pytest.raises(AgentCallError) as refused:
            await secondary.failover(3, "latest")
        text = refused.value.body["error"]
        assert "not served" in text and "--export-listen" in text and str(relay_port) in text, text
        assert not (secondary.data_dir / ".run" / "relay.pid").exists(), "a relay daemon was left behind"
        st = await secondary.status()
        assert (st["role"], st["export"]["serving"]) == ("primary", False), st
        squatter.close()
        await secondary.primary(4, None, "none")
        tcp = await NBDClient.connect_tcp("127.0.0.1", relay_port)
        try:
            assert await tcp.pread(MiB, 0) == data
        finally:
            await tcp.close()
    finally:
        squatter.close()
        await asyncio.gather(primary.stop(), secondary.stop(), return_exceptions=True)
