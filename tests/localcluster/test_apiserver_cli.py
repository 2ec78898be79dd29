"""`pairvol localcluster up` runs until signalled and prints a usable kubeconfig."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest
import yaml

from pairvol.aio import bounded


async def test_localcluster_up_serves_kubectl_until_sigterm(tmp_path: Path) -> None:
    kubeconfig = tmp_path / f"kc-{os.getpid()}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pairvol",
        "localcluster",
        "up",
        "--nodes",
        "2",
        "--no-simulate-nodes",
        "--kubeconfig",
        str(kubeconfig),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        while not any(line.startswith("export KUBECONFIG=") for line in lines):
            line = await bounded(proc.stdout.readline(), 30)
            assert line, f"exited early: {lines}"
            lines.append(line.decode().strip())
        assert f"export KUBECONFIG={kubeconfig}" in lines
        assert any("nodes (Ready objects only): node-1, node-2" in line for line in lines)

        config = yaml.safe_load(await asyncio.to_thread(kubeconfig.read_text))
        server = config["clusters"][0]["cluster"]["server"]
        assert server.startswith("http://127.0.0.1:")
        reader, writer = await asyncio.open_connection(*server[len("http://") :].split(":"))
        writer.write(b"GET /api/v1/nodes HTTP/1.0\r\n\r\n")
        response = await bounded(reader.read(), 10)
        writer.close()
        assert b" 200 " in response.split(b"\r\n")[0] and b'"node-2"' in response

        proc.send_signal(signal.SIGTERM)
        assert await bounded(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_localcluster_up_reports_a_busy_port(tmp_path: Path) -> None:
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pairvol",
            "localcluster",
            "up",
            "--no-simulate-nodes",
            "--port",
            str(port),
            "--kubeconfig",
            str(tmp_path / "kc"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, err = await bounded(proc.communicate(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 1
        assert f"cannot listen on 127.0.0.1:{port}" in err.decode()
        assert "pick another --port or 0 for a free one" in err.decode()
    finally:
        blocker.close()
        await blocker.wait_closed()


def test_simulated_nodes_need_root(monkeypatch: pytest.MonkeyPatch) -> None:
    from pairvol.cli import main

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main(["localcluster", "up", "--simulate-nodes"]) == 1
