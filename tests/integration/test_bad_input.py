# ruff: noqa: RUF001  (look-alike Unicode digits are the point of these inputs)
"""Bad input against real agents (issue 7, failure 11): whatever a caller sends, the agent
answers 4xx with {"error": what was wrong and what to do}, changes nothing and logs no
traceback; a bad command line exits 2 with one line, before anything starts. Each case of
the failure report is a test here, and a short seeded fuzz run (tests/support/fuzz.py)
covers the rest of the class in every role."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pairvol.aio import bounded
from tests.support import fuzz
from tests.support.agents import Agent, AgentCallError, agents, free_port, write_psk

POST_ROUTES = [
    "/v1/secondary", "/v1/primary", "/v1/checkpoint", "/v1/failover", "/v1/stop", "/v1/digests", "/v1/relink",
]
NESTED = b'{"epoch": ' + b"[" * 5000 + b"]" * 5000 + b"}"  # about 10 KB, well under the 64 KB limit


@contextlib.asynccontextmanager
async def three_roles(tmp: Path, **kw: Any) -> AsyncIterator[dict[str, Agent]]:
    """An agent in each role: none, secondary, and primary replicating to that secondary."""
    async with agents(tmp, 3, size="16Mi", **kw) as (fresh, sec, pri):
        await sec.secondary(1)
        await pri.primary(2, sec.replication_address, "full")
        await pri.wait_replicating()
        yield {"none": fresh, "secondary": sec, "primary": pri}


async def position(agent: Agent) -> tuple[str, str, int]:
    st = await agent.status()
    return st["role"], st["stage"], st["epoch"]


async def refused(agent: Agent, path: str, raw: bytes, status: int, text: str) -> None:
    with pytest.raises(AgentCallError) as info:
        await agent.call("POST", path, raw=raw)
    assert info.value.status == status, (path, info.value.body)
    assert text in info.value.body["error"], (path, info.value.body)


def no_traceback(agent: Agent) -> None:
    assert "Traceback" not in (agent.log_path.read_text() if agent.log_path else ""), agent.log_tail(40)


async def agent_cli(tmp: Path, *override: str, timeout: float = 30.0) -> tuple[int | None, str]:
    """Run `pairvol agent` with valid flags but ``override`` (FLAG VALUE, or FLAG=VALUE);
    returns (exit status, stderr), or (None, "") if it was still running at ``timeout``: it
    took the flags (it is killed by its PID)."""
    a = Agent("vol", tmp / "cli-data", "16Mi")
    a.api_port, a.rep_port = free_port(), free_port()
    argv = a.argv()
    if override:
        flag = override[0].split("=", 1)[0]
        if flag in argv:
            del argv[argv.index(flag) : argv.index(flag) + 2]
        argv += override
    proc = await asyncio.create_subprocess_exec(*argv, stderr=asyncio.subprocess.PIPE, start_new_session=True)
    try:
        _, err = await bounded(proc.communicate(), timeout)
        return proc.returncode, err.decode(errors="replace")
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return None, ""


def one_line(rc: int | None, err: str, flag: str) -> None:
    assert rc == 2, f"exit {rc} (None: the agent started), stderr: {err}"
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert flag in lines[0], err


# --------------------------------------------------------------------- failure 11, case by case


async def test_deeply_nested_json_is_400_on_every_post_route_in_every_role(tmp_path: Path) -> None:
    async with three_roles(tmp_path) as roles:
        for role, agent in roles.items():
            before = await position(agent)
            for path in POST_ROUTES:
                await refused(agent, path, NESTED, 400, "nested deeper than 32 levels")
                await refused(agent, path, b"[" * 30_000 + b"]" * 30_000, 400, "nested deeper")
            assert await position(agent) == before, f"a refused call changed the {role}"
            no_traceback(agent)


async def test_unicode_digits_and_5000_digit_ports_are_400_and_change_nothing(tmp_path: Path) -> None:
    async with three_roles(tmp_path) as roles:
        for role in ("none", "primary"):
            agent = roles[role]
            before = await position(agent)
            for peer in ("127.0.0.1:²", "127.0.0.1:¹²", "127.0.0.1:٨٠", "127.0.0.1:" + "9" * 5000):
                body = b'{"epoch": 9, "peer": "%s"}' % peer.encode()
                await refused(agent, "/v1/primary", body, 400, "invalid port")
            assert await position(agent) == before
            st = await agent.status()
            assert st["replication"]["state"] == ("replicating" if role == "primary" else "none")
            no_traceback(agent)


async def test_non_finite_seconds_are_refused_before_the_agent_starts(tmp_path: Path) -> None:
    cases = [
        ("--peer-timeout", "nan"),
        ("--peer-timeout", "inf"),
        ("--peer-timeout=-inf",),
        ("--peer-timeout", "NaN"),
        ("--lease-duration", "nan"),
        ("--lease-duration", "inf"),
    ]
    results = await asyncio.gather(*(agent_cli(tmp_path / str(i), *case) for i, case in enumerate(cases)))
    for i, (case, (rc, err)) in enumerate(zip(cases, results, strict=True)):
        one_line(rc, err, case[0].split("=")[0])
        assert "a plain decimal number 1..600" in err or "a plain decimal number 1..3600" in err, err
        assert not (tmp_path / str(i) / "cli-data" / "disk.raw").exists(), "nothing is created for refused flags"


@pytest.mark.parametrize(
    ("override", "flag"),
    [
        (("--listen", "127.0.0.1:²"), "--listen"),
        (("--replication-listen", "127.0.0.1:¹²"), "--replication-listen"),
        (("--listen", "127.0.0.1:" + "9" * 5000), "--listen"),
        (("--data-dir", "FILE"), "--data-dir"),
    ],
)
async def test_bad_addresses_and_a_data_dir_that_is_a_file_exit_2_with_one_line(
    tmp_path: Path, override: tuple[str, str], flag: str
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("mine\n")
    rc, err = await agent_cli(tmp_path, override[0], override[1].replace("FILE", str(a_file)))
    one_line(rc, err, flag)
    assert a_file.read_text() == "mine\n"


# --------------------------------------------------------------------- the rest of the class


FIELD_CASES = [
    ("/v1/secondary", b'{"epoch": true}', 400, "invalid epoch True"),
    ("/v1/secondary", b'{"epoch": 1.0}', 400, "invalid epoch 1.0"),
    ("/v1/secondary", b'{"epoch": 9223372036854775808}', 400, "invalid epoch"),
    ("/v1/secondary", b'{"epoch": ' + b"9" * 30 + b"}", 400, "30 digits"),
    ("/v1/secondary", b'{"epoch": -1}', 400, "invalid epoch -1"),
    ("/v1/secondary", b'{"epoch": "1"}', 400, "invalid epoch '1'"),
    ("/v1/secondary", b'{"epoch": NaN}', 400, "NaN, which is not JSON"),
    ("/v1/secondary", b'{"epoch": 1e400}', 400, "out of range"),
    ("/v1/secondary", b'{"epoch": 1, "epoch": 2}', 400, "'epoch' twice"),
    ("/v1/secondary", b'{"epoch": 1, "Epoch": 2}', 400, "unknown field(s) Epoch"),
    ("/v1/secondary", b'{"epoch": "\xff"}', 400, "not UTF-8"),
    ("/v1/secondary", b"\xef\xbb\xbf{}", 400, "not valid JSON"),
    ("/v1/secondary", b'"epoch"', 400, "must be a JSON object, not str"),
    ("/v1/failover", b'{"epoch": 5, "mode": "chec\xe2\x84\xaapoint"}', 400, "invalid failover mode"),
    ("/v1/failover", b'{"epoch": 5, "mode": null}', 400, "invalid failover mode None"),
    ("/v1/failover", b'{"epoch": 5, "trigger": "planned"}', 400, "invalid failover trigger 'planned'"),
    ("/v1/failover", b'{"epoch": 5, "trigger": 1}', 400, "invalid failover trigger 1"),
    ("/v1/primary", b'{"epoch": 5, "sync": "FULL"}', 400, "invalid sync 'FULL'"),
    ("/v1/primary", b'{"epoch": 5, "peer": "::1:7801"}', 400, "brackets"),
    ("/v1/primary", b'{"epoch": 5, "peer": "[fe80::1%eth0]:7801"}', 400, "zone"),
    ("/v1/primary", b'{"epoch": 5, "peer": ""}', 400, "expected HOST:PORT"),
    ("/v1/primary", b'{"epoch": 5, "peer": " \\t"}', 400, "expected HOST:PORT"),
    ("/v1/primary", b'{"epoch": 5, "peer": "a\\u0000b:80"}', 400, "invalid host"),
    ("/v1/primary", b'{"epoch": 5, "peer": "' + b"a" * 300 + b':80"}', 400, "invalid host"),
    ("/v1/primary", b'{"epoch": 5, "peer": 7801}', 400, "expected HOST:PORT"),
    ("/v1/checkpoint", b'{"now": true}', 400, "unknown field(s) now; allowed: linkSerial"),
    ("/v1/stop", b"[]", 400, "must be a JSON object"),
]


async def test_each_malformed_field_gets_400_with_the_reason_and_changes_nothing(tmp_path: Path) -> None:
    async with agents(tmp_path, 1, size="16Mi") as (a,):
        for path, raw, status, text in FIELD_CASES:
            await refused(a, path, raw, status, text)
        assert await position(a) == ("none", "none", 0)
        no_traceback(a)


async def test_a_body_declared_as_form_or_text_is_415(tmp_path: Path) -> None:
    async with agents(tmp_path, 1, size="16Mi") as (a,):
        for ctype in (b"text/plain", b"application/x-www-form-urlencoded", b"multipart/form-data; boundary=x"):
            case = fuzz.HttpCase("POST", "/v1/secondary", (("Content-Type", ctype),), b'{"epoch": 1}', 415, "")
            answer = await fuzz.send(a.host, a.api_port, case, None)
            assert answer.status == 415 and b"send the body as application/json" in answer.body, answer
        assert await position(a) == ("none", "none", 0), "a form post must not drive the agent"


async def test_an_authorization_header_that_is_not_utf8_gets_401(tmp_path: Path) -> None:
    async with agents(tmp_path, 1, size="16Mi", token=secrets.token_hex(16)) as (a,):
        for value in (b"Bearer \xff\xfe", b"Bearer \xc3\xa9"):
            case = fuzz.HttpCase("GET", "/v1/status", (("Authorization", value),), b"", 401, "")
            answer = await fuzz.send(a.host, a.api_port, case, None)
            assert answer.status == 401 and b"bearer token" in answer.body, answer
        no_traceback(a)


async def test_a_request_the_http_parser_cannot_read_is_400_and_one_warning_line(tmp_path: Path) -> None:
    async with agents(tmp_path, 1, size="16Mi") as (a,):
        for raw in fuzz.BAD_FRAMING:
            case = fuzz.HttpCase("POST", "/", (), b"", 400, "framing", raw=raw)
            answer = await fuzz.send(a.host, a.api_port, case, None)
            assert answer.status == 400, (raw[:60], answer)
        assert await position(a) == ("none", "none", 0)
        no_traceback(a)
        assert "WARNING pairvol.agent.http" in a.log_tail(40)


FLAG_CASES = [
    (("--size", "0"), "size", "out of range"),
    (("--size", "1e3"), "size", "whole bytes"),
    (("--size", "1.5Ki"), "size", "whole bytes"),
    (("--size=-1",), "size", "whole bytes"),
    (("--size", "١٦Mi"), "size", "whole bytes"),
    (("--name", "vol\n"), "volume name", "DNS label"),
    (("--data-dir", "LONG"), "--data-dir", "too long"),
    (("--token-file", "/dev/zero"), "--token-file", "not a regular file"),
    (("--token-file", "BIG"), "--token-file", "more than 65536 bytes"),
    (("--token-file", "EMPTY"), "--token-file", "shorter than 16"),
    (("--token-file", "TMP"), "--token-file", "not a regular file"),
    (("--psk-file", "EMPTY"), "--psk-file", "USERNAME:HEXKEY"),
    (("--export-socket", "FILE"), "--export-socket", "is not a socket"),
    (("--lease-name", "Pairvol_Lease"), "--lease-name", "DNS subdomain"),
    (("--bogus", "1"), "--bogus", "unrecognized"),
    (("--token-file", "FIFO"), "--token-file", "not a regular file"),
    (("--replication-listen", "192.0.2.1:7801", "--psk-file", "PSK"), "--replication-listen", "not an address of this"),
    (("--listen", "192.0.2.1:7800", "--token-file", "TOKEN"), "--listen", "not an address of this machine"),
    (("--listen", "TAKEN"), "--listen", "the port is taken"),
]


async def test_bad_flags_exit_2_with_one_line_that_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("")
    (tmp_path / "a-file").write_text("mine\n")
    (tmp_path / "token").write_text(secrets.token_hex(16))
    (tmp_path / "big").write_bytes(b"a" * 70_000)
    os.mkfifo(tmp_path / "fifo")  # opening it for reading would block until a writer comes
    paths = {
        "EMPTY": tmp_path / "empty",
        "FILE": tmp_path / "a-file",
        "TMP": tmp_path,
        "LONG": tmp_path / ("x" * 120),
        "FIFO": tmp_path / "fifo",
        "PSK": write_psk(tmp_path / "psk"),
        "TOKEN": tmp_path / "token",
        "BIG": tmp_path / "big",
    }
    with socket.create_server(("127.0.0.1", 0)) as taken:
        paths["TAKEN"] = f"127.0.0.1:{taken.getsockname()[1]}"
        results = await asyncio.gather(
            *(
                agent_cli(tmp_path / f"run{i}", *(str(paths.get(o, o)) for o in override))
                for i, (override, _, _) in enumerate(FLAG_CASES)
            )
        )
    for (override, flag, text), (rc, err) in zip(FLAG_CASES, results, strict=True):
        one_line(rc, err, flag)
        assert text in err, (override, err)
    assert (tmp_path / "a-file").read_text() == "mine\n", "nothing is lost"


async def test_a_data_dir_whose_disk_is_a_directory_is_refused_and_left_alone(tmp_path: Path) -> None:
    (tmp_path / "cli-data" / "disk.raw").mkdir(parents=True)
    (tmp_path / "cli-data" / "disk.raw" / "keep").write_text("x")
    rc, err = await agent_cli(tmp_path)
    one_line(rc, err, "disk.raw")
    assert "is not a regular file" in err
    assert (tmp_path / "cli-data" / "disk.raw" / "keep").read_text() == "x"


# --------------------------------------------------------------------- seeded fuzz


async def test_fuzzing_the_api_in_every_role_breaks_no_promise(tmp_path: Path) -> None:
    async with three_roles(tmp_path, token=secrets.token_hex(16)) as roles:
        found = []
        for seed, (role, agent) in enumerate(roles.items()):
            found += [f"{role}: {v}" for v in await fuzz.fuzz_http(agent, rounds=150, seed=seed)]
        assert not found, "\n".join(found)


async def test_fuzzing_a_tokenless_agent_breaks_no_promise(tmp_path: Path) -> None:
    async with agents(tmp_path, 1, size="16Mi") as (a,):
        found = await fuzz.fuzz_http(a, rounds=150, seed=100)
        assert not found, "\n".join(map(str, found))


def test_fuzzing_the_command_line_breaks_no_promise(tmp_path: Path) -> None:
    found = fuzz.fuzz_cli(rounds=250, seed=21, workdir=tmp_path, processes=3)
    assert not found, "\n".join(map(str, found))


async def test_odd_but_valid_data_dir_names_work() -> None:
    """A comma is QEMU's option separator: the daemon's monitor socket path must escape it.
    A short base (not tmp_path, whose length grows with pytest's run counter) keeps the
    path under the unix socket limit the agent enforces."""
    base = Path(tempfile.mkdtemp(prefix="pv-", dir="/tmp"))
    a = Agent("vol", base / "a dir, with:odd\nnames é", "16Mi")
    try:
        await a.start()
        assert (await a.secondary(1))["stage"] == "running"
        assert (await a.checkpoint())["id"] == 1
    finally:
        await a.stop()
        await asyncio.to_thread(shutil.rmtree, base, True)
