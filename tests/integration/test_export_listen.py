"""`--export-listen`: the workload export over TCP for a Service that follows the primary,
TLS-PSK when a key is given, and gone the moment the replica stops being primary."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from pairvol.nbd import NBDClient, NBDError
from tests.support.agents import Agent, free_port, write_psk


async def test_tcp_export_serves_the_same_volume_and_dies_with_the_primary_role(tmp_path: Path) -> None:
    port = free_port()
    a = Agent("vol", tmp_path / "a", "16Mi", extra_args=["--export-listen", f"127.0.0.1:{port}"])
    try:
        await a.start()
        st = await a.primary(1, None)
        assert st["export"]["listen"] == f"127.0.0.1:{port}"
        tcp = await NBDClient.connect_tcp("127.0.0.1", port)
        await tcp.pwrite(b"t" * 65536, 4096)
        async with await a.nbd() as local:
            assert await local.pread(65536, 4096) == b"t" * 65536
        await a.secondary(2)  # demoted: no workload export anywhere
        with pytest.raises(NBDError):
            await asyncio.wait_for(tcp.pwrite(b"u" * 4096, 0), 5)
        await tcp.close()
        with pytest.raises(NBDError):
            await NBDClient.connect_tcp("127.0.0.1", port)
    finally:
        await a.stop()


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io (qemu-utils)")
async def test_tcp_export_with_psk_needs_the_key(tmp_path: Path) -> None:
    port = free_port()
    psk = write_psk(tmp_path / "psk")
    keydir = tmp_path / "client-keys"
    keydir.mkdir()
    (keydir / "keys.psk").write_text(psk.read_text())
    a = Agent("vol", tmp_path / "a", "16Mi", psk_file=psk, extra_args=["--export-listen", f"127.0.0.1:{port}"])
    try:
        await a.start()
        await a.primary(1, None)

        async def qemu_io(cmd: str, key_dir: Path) -> tuple[int, str]:
            proc = await asyncio.create_subprocess_exec(
                "qemu-io",
                "--object",
                f"tls-creds-psk,id=tls0,endpoint=client,dir={key_dir},username=pairvol",
                "--image-opts",
                f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=volume,tls-creds=tls0",
                "-c",
                cmd,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await proc.communicate()
            return proc.returncode or 0, out.decode()

        rc, out = await qemu_io("write -P 0x61 0 64k", keydir)
        assert rc == 0, out
        async with await a.nbd() as local:
            assert await local.pread(65536, 0) == b"a" * 65536
        wrong = tmp_path / "wrong-keys"
        wrong.mkdir()
        write_psk(wrong / "keys.psk")
        rc, out = await qemu_io("write -P 0x62 0 64k", wrong)
        assert rc != 0
        async with await a.nbd() as local:
            assert await local.pread(65536, 0) == b"a" * 65536
    finally:
        await a.stop()
