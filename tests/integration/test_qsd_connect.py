"""How the agent connects to its qemu-storage-daemon's QMP monitor.

QEMU 7.2 could greet a connection twice when it came in before the monitor's I/O thread
had set the monitor up (the main loop accepted it meanwhile); qemu.qmp then failed the
negotiation, a retried connection was closed at once, and the library's own assertion
killed the agent at start-up. The daemon now takes the first connection while it reads
its command line (``wait=on``), and a failed attempt never ends the start with anything
but a retry, or an error that says what happened to the daemon.

The scripted daemons stand in for qemu-storage-daemon on PATH and replay what a real one
sent in that case; the real daemon's tests check the ordering the fix relies on.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from pairvol.aio import bounded
from pairvol.qemu import QemuError, QsdDied
from pairvol.qemu.img import require_binary
from pairvol.qemu.qsd import Qsd, monitor_args

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}

# A stand-in daemon: serves the monitor socket named on its command line, one connection
# after another, as FAKE_QSD_SCRIPT says: per connection, "greet2" (two greetings, as QEMU
# 7.2 sent), "close" (negotiate, then close the connection a moment later), "exit" (negotiate, with the
# connection's end already on its way, then exit with status 3), "serve" (negotiate, then
# answer every command with an empty return).
FAKE_DAEMON = """\
import json, os, socket, sys, time
GREETING = json.dumps({greeting!r}).encode() + b"\\r\\n"
script = os.environ["FAKE_QSD_SCRIPT"].split(",")
path = next(a for a in sys.argv[2].split(",") if a.startswith("path=")).removeprefix("path=")
srv = socket.socket(socket.AF_UNIX)
srv.bind(path)
srv.listen(1)

def recv(conn):
    try:
        return conn.recv(65536)
    except ConnectionResetError:
        return b""

def messages(conn):  # QMP needs no line ends: one JSON object after another
    buf, dec = "", json.JSONDecoder()
    while chunk := recv(conn):
        buf += chunk.decode()
        while buf.strip():
            try:
                msg, end = dec.raw_decode(buf.lstrip())
            except ValueError:
                break
            buf = buf.lstrip()[end:]
            yield msg

def send(conn, data):  # the client may be gone already
    try:
        conn.sendall(data)
    except OSError:
        pass

def reply(conn, msg):
    send(conn, json.dumps({{"return": {{}}, "id": msg.get("id")}}).encode() + b"\\r\\n")

for step in script:
    conn, _ = srv.accept()
    if step == "exit":  # the reply and the end of the connection are there before the command
        conn.sendall(GREETING + json.dumps({{"return": {{}}}}).encode() + b"\\r\\n")
        conn.shutdown(socket.SHUT_WR)
        next(messages(conn), None)
        print("scripted exit", flush=True)
        os._exit(3)
    conn.sendall(GREETING)
    msgs = messages(conn)
    caps = next(msgs, None)
    if caps is None:
        continue
    if step == "greet2":
        send(conn, GREETING)
        reply(conn, caps)
        next(msgs, None)
        conn.close()
        continue
    reply(conn, caps)
    if step == "close":  # after the client has taken the session as up
        time.sleep(0.3)
        conn.close()
        continue
    for msg in msgs:
        reply(conn, msg)
    break
"""


@pytest.fixture
def fake_qsd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "qemu-storage-daemon"
    exe.write_text(f"#!{sys.executable}\n" + FAKE_DAEMON.format(greeting=GREETING))
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


async def test_a_daemon_that_greets_twice_and_then_dies_is_reported_with_its_exit_status(
    fake_qsd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the CI traffic: negotiation fails on the second greeting; the retried connection
    # negotiates and is closed at once (here: the daemon exits)
    monkeypatch.setenv("FAKE_QSD_SCRIPT", "greet2,exit")
    qsd = Qsd(fake_qsd / "run", fake_qsd / "qsd.log")
    try:
        await qsd.start(timeout=10)
    except QsdDied as exc:
        assert "exited with status 3: scripted exit" in str(exc)
    else:
        # the session was up before its end was read (a loaded machine): the death comes next
        await bounded(qsd.dead.wait(), 10)
        assert "exited with status 3: scripted exit" in (qsd.exit_error or "")
    await qsd.kill()


async def test_failed_connects_are_retried_with_a_fresh_client(fake_qsd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_QSD_SCRIPT", "greet2,close,greet2,serve")
    qsd = Qsd(fake_qsd / "run", fake_qsd / "qsd.log")
    await qsd.start(timeout=10)
    try:
        assert await qsd.execute("query-version") == {}
    finally:
        await qsd.kill()


async def test_a_daemon_that_never_negotiates_ends_the_start_at_the_deadline(
    fake_qsd: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QSD_SCRIPT", ",".join(["greet2"] * 1000))
    qsd = Qsd(fake_qsd / "run", fake_qsd / "qsd.log")
    with pytest.raises(QemuError, match="cannot connect to QMP") as caught:
        await qsd.start(timeout=1.5)
    assert not isinstance(caught.value, QsdDied)
    assert not qsd.alive


def _wait_for_path(path: Path, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.001)


def _connect_and_read(path: Path, send: bytes, until: float = 0.5) -> bytes:
    sock = socket.socket(socket.AF_UNIX)
    try:
        while True:
            try:
                sock.connect(str(path))
                break
            except ConnectionRefusedError:  # bound, not listening yet
                continue
        sock.settimeout(5)
        data = sock.recv(65536)  # the greeting
        sock.sendall(send)
        sock.settimeout(until)
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except TimeoutError:
            pass
        return data
    finally:
        sock.close()


async def test_the_daemon_takes_the_agents_connection_before_it_sets_up_anything_else(tmp_path: Path) -> None:
    # with wait=off the daemon went on to its main loop, where an early connection raced
    # the monitor's set-up; now it reads nothing after the monitor's socket until the agent
    # is connected: an invalid option further on is not even looked at before that
    sock_path = tmp_path / "qmp.sock"
    proc = await asyncio.create_subprocess_exec(
        require_binary("qemu-storage-daemon"),
        *monitor_args(sock_path),
        "--blockdev",
        "driver=no-such-driver,node-name=x",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        await asyncio.to_thread(_wait_for_path, sock_path)
        await asyncio.sleep(0.3)
        assert proc.returncode is None, "the daemon did not wait for its QMP client"
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(sock_path))
        assert await bounded(proc.wait(), 10) == 1
        sock.close()
        assert proc.stdout is not None
        assert b"no-such-driver" in await proc.stdout.read()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_an_early_connection_is_greeted_once(tmp_path: Path) -> None:
    # the connection is made while the daemon starts (before its main loop runs), the
    # moment the race needed; many starts at once make the overlap likelier
    async def one(i: int) -> bytes:
        sock_path = tmp_path / f"q{i}.sock"
        proc = await asyncio.create_subprocess_exec(
            require_binary("qemu-storage-daemon"),
            *monitor_args(sock_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            await asyncio.to_thread(_wait_for_path, sock_path)
            caps = json.dumps({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": "c"})
            return await asyncio.to_thread(_connect_and_read, sock_path, caps.encode() + b"\n", 0.2)
        finally:
            proc.kill()
            await proc.wait()

    for round_ in range(5):
        for data in await asyncio.gather(*(one(round_ * 8 + i) for i in range(8))):
            lines = [json.loads(line) for line in data.splitlines() if line.strip()]
            assert [next(iter(msg)) for msg in lines] == ["QMP", "return"], data
