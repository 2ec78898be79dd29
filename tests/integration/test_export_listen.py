"""`--export-listen`: the workload export over TCP for a Service that follows the primary,
TLS-PSK when a key is given, and gone the moment the replica stops being primary."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from pairvol.aio import bounded
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
            await bounded(tcp.pwrite(b"u" * 4096, 0), 5)
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


async def qemu_io_tcp(port: int, key_dir: Path, export: str, cmd: str) -> tuple[int, str]:
    """qemu-io as a TLS-PSK NBD client of 127.0.0.1:PORT with the key in ``key_dir``."""
    proc = await asyncio.create_subprocess_exec(
        "qemu-io", "--object", f"tls-creds-psk,id=tls0,endpoint=client,dir={key_dir},username=pairvol",
        "--image-opts",
        f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export={export},tls-creds=tls0",
        "-c", cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await bounded(proc.communicate(), 30)
    return proc.returncode or 0, out.decode()


def key_dir(tmp: Path, name: str, psk: Path) -> Path:
    directory = tmp / name
    directory.mkdir()
    (directory / "keys.psk").write_text(psk.read_text())
    return directory


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io (qemu-utils)")
async def test_the_export_key_opens_the_export_but_not_a_secondarys_replication_port(tmp_path: Path) -> None:
    link_psk, export_psk = write_psk(tmp_path / "link-psk"), write_psk(tmp_path / "export-psk")
    ports = [free_port(), free_port()]
    keys = ["--export-psk-file", str(export_psk)]
    made = [
        Agent(
            "vol",
            tmp_path / f"replica-{i}",
            "16Mi",
            psk_file=link_psk,
            extra_args=[*keys, "--export-listen", f"127.0.0.1:{port}"],
        )
        for i, port in enumerate(ports)
    ]
    primary, secondary = made
    try:
        await asyncio.gather(*(a.start() for a in made))
        await secondary.secondary(1)
        await primary.primary(2, secondary.replication_address, "full")
        await primary.wait_replicating()
        workload_keys = key_dir(tmp_path, "workload-keys", export_psk)
        link_keys = key_dir(tmp_path, "link-keys", link_psk)

        # the workload's key opens the export: the write is replicated
        rc, out = await qemu_io_tcp(ports[0], workload_keys, "volume", "write -P 0x61 0 64k")
        assert rc == 0, out
        # the link's key does not open the export
        rc, out = await qemu_io_tcp(ports[0], link_keys, "volume", "write -P 0x62 0 64k")
        assert rc != 0, out
        # and the workload's key does not open the secondary's replication port: it cannot
        # write to the secondary past the primary (whatever the export is called there)
        host, rep_port = secondary.replication_address.rsplit(":", 1)
        assert host == "127.0.0.1"
        for export in ("volume", "secondary", "replication", ""):
            rc, out = await qemu_io_tcp(int(rep_port), workload_keys, export, "write -P 0x63 0 64k")
            assert rc != 0, out
            assert "handshake" in out.lower() or "tls" in out.lower() or "failed" in out.lower(), out

        # bytes: the primary and, after a failover, the secondary hold the workload's write only
        async with await primary.nbd() as local:
            assert await local.pread(65536, 0) == b"a" * 65536
        await primary.secondary(3)
        await secondary.failover(4, "latest")
        async with await secondary.nbd() as promoted:
            assert await promoted.pread(65536, 0) == b"a" * 65536
    finally:
        await asyncio.gather(*(a.stop() for a in made), return_exceptions=True)


async def test_an_export_key_equal_to_the_link_key_is_refused_with_the_reason(tmp_path: Path) -> None:
    psk = write_psk(tmp_path / "psk")
    same = tmp_path / "same-psk"
    same.write_text(psk.read_text())
    a = Agent("vol", tmp_path / "a", "16Mi", psk_file=psk, extra_args=["--export-psk-file", str(same)])
    with pytest.raises(Exception, match="same key as --psk-file") as failed:
        await a.start()
    await a.stop()
    assert "replication port" in str(failed.value)
