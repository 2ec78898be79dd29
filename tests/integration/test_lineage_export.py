"""The workload export under its lineage's name (``volume-l<epoch>``): what a client that
must never see the disk go back in time asks for (a Checkpoint-mode CSI attachment). The
same disk confirmed as primary again keeps the name; a failover starts a new one, so a
client of the old primary's lineage is refused by the new primary at the NBD handshake."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from pairvol.nbd import NBDClient
from tests.support.agents import Agent, free_port

MiB = 1 << 20


async def exports(port: int) -> list[str]:
    """The export names the server at 127.0.0.1:PORT lists (NBD option LIST)."""
    proc = await asyncio.create_subprocess_exec(
        "qemu-nbd", "--list", "--bind", "127.0.0.1", "--port", str(port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()
    return sorted(line.strip()[len("export: '") : -1] for line in out.decode().splitlines() if "export: '" in line)


async def reads(port: int, export: str) -> tuple[int, str]:
    """qemu-io reading through ``export`` of 127.0.0.1:PORT: (exit status, output)."""
    proc = await asyncio.create_subprocess_exec(
        "qemu-io", "--image-opts",
        f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export={export}",
        "-c", "read 0 4k",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


async def test_a_failover_ends_the_lineage_a_confirmation_keeps_it(tmp_path: Path) -> None:
    p_port, s_port = free_port(), free_port()
    primary = Agent("vol", tmp_path / "p", "16Mi", extra_args=["--export-listen", f"127.0.0.1:{p_port}"])
    secondary = Agent("vol", tmp_path / "s", "16Mi", extra_args=["--export-listen", f"127.0.0.1:{s_port}"])
    try:
        await asyncio.gather(primary.start(), secondary.start())
        await primary.primary(1, None)
        assert await exports(p_port) == ["volume", "volume-l1"]
        st = await primary.primary(2, None)  # the same disk, confirmed again: the same lineage
        assert st["export"]["lineageName"] == "volume-l1"
        assert await exports(p_port) == ["volume", "volume-l1"]

        await secondary.secondary(3)
        await primary.primary(4, secondary.replication_address, "full")
        await primary.wait_replicating()
        assert await exports(p_port) == ["volume", "volume-l1"]  # gaining a peer changes no history
        data = os.urandom(MiB)
        async with await primary.nbd() as nbd:
            await nbd.pwrite(data, 0)
            await nbd.flush()
        await secondary.checkpoint()
        primary.kill()
        await primary.wait_exit()
        await secondary.failover(5, "checkpoint")
        # the rolled-back disk is a new lineage: the old one's clients find no export
        assert await exports(s_port) == ["volume", "volume-l5"]
        rc, out = await reads(s_port, "volume-l1")
        assert rc != 0, out
        rc, out = await reads(s_port, "volume-l5")
        assert rc == 0, out
        tcp = await NBDClient.connect_tcp("127.0.0.1", s_port)
        try:
            assert await tcp.pread(MiB, 0) == data  # written before the checkpoint
        finally:
            await tcp.close()
    finally:
        await asyncio.gather(primary.stop(), secondary.stop(), return_exceptions=True)
