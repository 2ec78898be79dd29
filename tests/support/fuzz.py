# ruff: noqa: RUF001  (look-alike Unicode digits and letters are the point of these inputs)
"""A seeded fuzzer for the agent's two inputs: its HTTP API and its command line.

The promise it checks (DESIGN.md §3, issue 7 failure 11): bad input gets a 4xx with
``{"error": text}`` (400 bad value, 401 token, 404/405 route or method, 413 too large, 415
not JSON) — never a 5xx, never a 2xx, never a dropped connection — and changes nothing: the
agent stays alive, as healthy as before, in the same role, stage and epoch, and logs no
traceback. A bad command line exits with status 2 and one line on stderr that names the
flag, before anything starts.

Every generated input is invalid *by construction*. An HTTP case carries one kind of defect
(bad body, bad field, unknown route, wrong method, wrong token, too large, not JSON) whose
answer does not depend on the agent's role, so the expected status is known in advance; an
answer of 409 or 2xx means a check let the defect through. A CLI case has exactly one bad
flag. That is what makes the fuzzer safe to point at a live agent in any role (none,
secondary, primary with a peer): if the agent is right, nothing it does changes.

Replayable: case *i* of a run is a function of ``(seed, i)`` alone (:func:`http_case`,
:func:`cli_case`), so a violation's seed and case number reproduce it.

Reuse (the fault injector's "malformed input" class)::

    violations = await fuzz_http(agent, rounds=300, seed=7)   # a pairvol.agent.procs.Agent
    violations += fuzz_cli(rounds=200, seed=7)

Malformed HTTP framing (a bad request line, header or chunking) is refused by aiohttp's
parser before the agent's code runs, with a plain-text 400; for those only the status and the
agent's log (one WARNING line, no traceback) are judged.

Each :class:`Violation` holds the input, the response and why it breaks the promise.
Plain ``random`` rather than hypothesis: the fault injector needs a function of (seed,
rounds) that runs against live processes and returns every violation, not a test that stops
at the first and shrinks it; hypothesis covers the pure validation layer in the unit tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pairvol.agent.procs import Agent, free_port
from pairvol.aio import bounded

MAX_BODY = 64 * 1024  # the agent's body limit (pairvol.agent.http.MAX_BODY)
POST_ROUTES = {
    "/v1/secondary": {"epoch"},
    "/v1/primary": {"epoch", "peer", "sync", "peerEpoch", "peerDisk", "peerApi"},
    "/v1/checkpoint": {"linkSerial"},
    "/v1/failover": {"epoch", "mode"},
    "/v1/stop": {"epoch"},
    "/v1/digests": {"disk", "offset", "length"},
}
GET_ROUTES = ("/v1/status", "/healthz", "/metrics")
# routes whose epoch may be left out (a check the caller may ask for)
EPOCH_OPTIONAL = {"/v1/stop"}

# Bad values. Each one is refused whatever else the body or command line holds.
# fmt: off
UNICODE_DIGITS = ("²", "¹²", "٨٠", "８０", "߀", "𝟖𝟎", "⑧")
BAD_EPOCHS: tuple[Any, ...] = (
    -1, -(2**63), 2**63, 10**19, True, False, 1.0, 0.5, -0.0, "1", "0", "", "１", None, [], {}, [1], {"n": 1},
)
BAD_MODES: tuple[Any, ...] = (
    "", "soon", "latest ", " latest", "lat\u0435st", "chec\u212apoint", "LATEST\n", "latest\x00", "ｌａｔｅｓｔ",
    1, 0, True, None, [], {}, ["latest"],
)
BAD_PEER_EPOCHS: tuple[Any, ...] = (-1, True, 1.0, "0", None, 2**63, [], "above the epoch")
BAD_PEER_DISKS: tuple[Any, ...] = ("", "A" * 32, "a" * 31, "a" * 33, "../" + "a" * 29, "ａ" * 32, 1, True, [], {})
BAD_BYTE_COUNTS: tuple[Any, ...] = (-1, -(2**63), True, 1.0, 0.5, "0", None, [], {})
BAD_LINK_SERIALS: tuple[Any, ...] = ("", "a" * 129, "a\nb", "\x00", "ｓｅｒｉａｌ", 1, True, [], {})
BAD_SYNCS: tuple[Any, ...] = ("", "half", "FULL", "None", "full ", "ｆｕｌｌ", 1, True, None, [], {})
BAD_HOSTPORTS: tuple[str, ...] = (
    "", " ", ":", "h", "h:", ":80", "h:0", "h:65536", "h:99999", "h:-1", "h:+80", "h: 80", "h:80 ", " h:80",
    "h:0x50", "h:8_0", "h:1e2", "::1:80", "[::1:80", "::1]:80", "[::1]", "[::1]:", "[]:80", "[1.2.3.4]:80",
    "[fe80::1%eth0]:80", "[fe80::1%25eth0]:80", "a b:80", "a\x00b:80", "a\nb:80", "h\n:80", "a_b:80", "-a:80",
    "a-:80", "a..b:80", ".a:80", "a.:80", "999.1.1.1:80", "1.2.3:80", "01.2.3.4:80", "h\u00e9:80", "xn--é:80",
    "a" * 64 + ":80", ("a" * 63 + ".") * 5 + "a:80", "h:" + "9" * 5000, "h:" + "0" * 6 + "80",
    *(f"h:{d}" for d in UNICODE_DIGITS), *(f"127.0.0.1:{d}" for d in UNICODE_DIGITS),
)
BAD_PEERS: tuple[Any, ...] = (*BAD_HOSTPORTS, 80, 8.0, True, [], {}, ["h", 80], {"host": "h", "port": 80})
ODD_KEYS = ("", " ", "\x00", "\ud800", "é", "\u202e", "x" * 300, "Epoch", "epoch ", " epoch", "EPOCH", "peer\x00",
            "force", "epochs", "checkpoint", "id")
NOT_JSON_TYPES = (b"text/plain", b"text/plain; charset=utf-8", b"TEXT/PLAIN", b"application/x-www-form-urlencoded",
                  b"multipart/form-data; boundary=x", b"Multipart/Form-Data; boundary=y")
NOT_OBJECTS = (b"[]", b"[1]", b'"x"', b"1", b"null", b"true", b"-0", b'[{"epoch": 1}]')
NOT_JSON = (b"{'epoch': 1}", b'{"epoch": 1,}', b'{"epoch": 01}', b"{/* c */}", b'{"epoch": 1', b'{"epoch" 1}',
            b"\x00", b"{\x00}", b'{"a": "\x01"}', b'{"a": "\\x41"}', b'{"a": "\\ud800"', b"{}{}", b"{} x")
BAD_UTF8 = (b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\xf8\x88\x80\x80\x80", b"\x80")
BAD_NAMES = ("", "Vol", "vol_1", "-vol", "vol-", "vol.x", "vol\n", "vol ", "v" * 64, "völ", "../etc", "vol/x", "٣")
BAD_SUBDOMAINS = ("", "Vol", "vol_1", "-vol", "vol-", "vol\n", "vol ", "völ", "../etc", "a..b", ".a", "a" * 254)
BAD_SIZES = (
    "", "0", "1", "512", "1000", "1048577", "1e3", "1e6", "1.5Ki", "1.5Mi", "-1", "-1Mi", "+1Mi", "1Pi", "2Pi",
    "1Mb", "1 Gb", "12Q", "Mi", "0x100000", "1_048_576", "١٦Mi", "１６Mi", "16Mi\n16Mi", "9" * 21, "9" * 5000,
    "99999999999999999999Ti",
)
BAD_SECONDS = (
    "nan", "NaN", "inf", "Infinity", "-inf", "-1", "0", "0.5", "0.999", "1e3", "1e1", "5s", "", " ", "5 ", "1.",
    ".5", "٥", "５", "0x5", "1_0", "9" * 5000, "5,5", "+5", "1" * 40,
)
BAD_FRAMING = (  # each refused for its own reason, not for a missing Host header
    b"GARBAGE\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 32,
    b"POST * HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /v1/stop HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    b"POST /v1/stop HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n{}",
    b"POST /v1/stop HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    b"POST /v1/stop HTTP/1.1\r\nHost: a\r\nContent-Type: text/plain\x01\r\n\r\n",
    b"POST /v1/stop HTTP/1.1\r\nHost: a\r\nNo-Colon-Here\r\n\r\n",
    b"POST /v1/stop HTTP/1.1\r\nHost: a\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n",
    b"POST /v1/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /v1/stop HTTP/1.1\r\nHost: a\r\n Folded: header\r\n\r\n",
    b"POST /v1/stop\x00 HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /v1/stop HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
)
TOO_MANY_SECONDS = {"--peer-timeout": "601", "--lease-duration": "3601"}
BEYOND_LOOPBACK = ("0.0.0.0:7800", "10.1.2.3:80", "[::]:80", "node-a:80")
# fmt: on


@dataclass(frozen=True)
class Violation:
    """One broken promise: what was sent, what came back, and why that is wrong."""

    input: str
    response: str
    why: str
    seed: int | None = None
    case: int | None = None

    def __str__(self) -> str:
        where = f" [seed {self.seed} case {self.case}]" if self.case is not None else ""
        return f"{self.why}{where}\n  input:    {self.input}\n  response: {self.response}"


def _cut(data: bytes | str, limit: int = 160) -> str:
    text = repr(data)
    return text if len(text) <= limit else f"{text[:limit]}…({len(data)} long)"


# ================================================================================= HTTP


@dataclass(frozen=True)
class HttpCase:
    method: str
    path: str
    headers: tuple[tuple[str, bytes], ...]
    body: bytes
    expect: int
    defect: str
    raw: bytes | None = None  # the whole request, for malformed HTTP framing

    def describe(self) -> str:
        if self.raw is not None:
            return f"{_cut(self.raw, 200)} ({self.defect})"
        heads = "".join(f" {k}: {_cut(v, 60)}" for k, v in self.headers)
        return f"{self.method} {self.path}{heads} body={_cut(self.body)} ({self.defect})"


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    body: bytes

    def describe(self) -> str:
        return f"HTTP {self.status} {_cut(self.body)}"


def _nested(rng: random.Random) -> bytes:
    depth = rng.choice([33, 40, 100, 1000, 3000, 10_000, 30_000])
    shape = rng.choice(["array", "object", "mixed", "in-field"])
    if shape == "array":
        return b"[" * depth + b"]" * depth
    if shape == "object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    if shape == "mixed":
        return b'[{"a":' * (depth // 2) + b"null" + b"}]" * (depth // 2)
    return b'{"epoch": ' + b"[" * depth + b"]" * depth + b"}"


def _with_field(good: bytes, raw_field: bytes) -> bytes:
    """``good`` (a JSON object) with one more member, written as raw bytes."""
    return good[:-1] + (b", " if good != b"{}" else b"") + raw_field + b"}"


def _json_defect(rng: random.Random, fields: dict[str, Any]) -> tuple[bytes, str]:
    """A body that is not one JSON object in UTF-8 of sane depth and numbers."""
    good = json.dumps(fields).encode()
    kind = rng.choice(["nested", "not-object", "syntax", "utf8", "constant", "duplicate", "long-int", "bom", "float"])
    if kind == "nested":
        return _nested(rng), "JSON nested too deep"
    if kind == "not-object":
        return rng.choice(NOT_OBJECTS), "JSON that is not an object"
    if kind == "syntax":
        cut = rng.randrange(1, max(2, len(good)))
        return rng.choice([good[:cut], good + b"}", good + b" x", good + good, *NOT_JSON]), "not JSON"
    if kind == "utf8":
        return _with_field(good, b'"x": "' + rng.choice(BAD_UTF8) + b'"'), "not UTF-8"
    if kind == "constant":
        return _with_field(good, b'"n": ' + rng.choice([b"NaN", b"Infinity", b"-Infinity"])), "NaN or Infinity"
    if kind == "duplicate":
        key = rng.choice(sorted(fields) or ["epoch"]).encode()
        return b'{"%s": 1, "%s": 2}' % (key, key), "duplicate key"
    if kind == "long-int":
        return b'{"epoch": ' + b"9" * rng.choice([21, 30, 4301, 5000, 20_000]) + b"}", "number too long"
    if kind == "bom":
        return b"\xef\xbb\xbf" + good, "UTF-8 byte order mark"
    return b'{"epoch": 1e' + rng.choice([b"309", b"400", b"99999"]) + b"}", "float out of range"


def _field_defect(rng: random.Random, path: str, fields: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Valid JSON with one field the route refuses."""
    allowed = POST_ROUTES[path]
    kinds = ["unknown", *sorted(allowed)]
    if "epoch" in allowed and path not in EPOCH_OPTIONAL:
        kinds.append("missing-epoch")
    if path == "/v1/primary":
        kinds.append("full-without-peer")
    kind = rng.choice(kinds)
    out = dict(fields)
    if kind == "unknown":
        key = rng.choice([*ODD_KEYS, "mode", "sync", "peer", "epoch"])
        key = key + "_" if key in allowed else key
        out[key] = rng.choice([1, "x", None, True])
        return out, f"unknown field {key!r}"
    if kind == "missing-epoch":
        out.pop("epoch", None)
        return out, "missing epoch"
    if kind == "full-without-peer":
        out["sync"], out["peer"] = "full", None
        return out, "sync full without a peer"
    bad = {"epoch": BAD_EPOCHS, "mode": BAD_MODES, "sync": BAD_SYNCS, "peer": BAD_PEERS, "peerEpoch": BAD_PEER_EPOCHS,
           "peerDisk": BAD_PEER_DISKS, "peerApi": BAD_PEERS, "disk": BAD_PEER_DISKS, "offset": BAD_BYTE_COUNTS,
           "length": BAD_BYTE_COUNTS, "linkSerial": BAD_LINK_SERIALS}
    out[kind] = rng.choice(bad[kind])
    if out[kind] == "above the epoch":  # the peer cannot have been started at a later epoch than the primary's
        out[kind] = (out["epoch"] if type(out.get("epoch")) is int else 0) + 1
    return out, f"bad {kind} {_cut(out[kind], 40)}"


def _valid_fields(rng: random.Random, path: str, epoch: int) -> dict[str, Any]:
    allowed = POST_ROUTES[path]
    fields: dict[str, Any] = {"epoch": epoch} if "epoch" in allowed else {}
    if "peer" in allowed and rng.random() < 0.5:
        fields["peer"] = "127.0.0.1:9"
    if "sync" in allowed and rng.random() < 0.5:
        fields["sync"] = "none"
    if "disk" in allowed:
        fields["disk"] = "0" * 32
    if "mode" in allowed and rng.random() < 0.5:
        fields["mode"] = rng.choice(["checkpoint", "latest"])
    return fields


def _unknown_path(rng: random.Random) -> str:
    known = set(POST_ROUTES) | set(GET_ROUTES)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789-_/"
    while True:
        path = rng.choice(
            [
                *("/", "/v1", "/v1/", "/v2/status", "/v1/primary/", "/v1/PRIMARY", "/V1/status", "/v1/status/"),
                *("/v1/failover/now", "/healthz/", "/v1/" + "a" * rng.randrange(1, 2000)),
                "/" + "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40))),
            ]
        )
        if path not in known:  # (no dot segments or %-escapes: they could normalise to a real route)
            return path


def _auth_values(token: str) -> list[bytes | None]:
    t = token.encode()
    upper = token.upper().encode()
    return [
        *(None, b"", b"Bearer", b"Bearer ", b"bearer " + t, b"Bearer " + t + b"x", b"Bearer " + t[:-1]),
        *(b"Basic " + t, b"Bearer \xff\xfe", b"Bearer \xc3\xa9" * 3, b"Bearer  " + t),
        *([b"Bearer " + upper] if upper != t else []),
    ]


def http_case(seed: int, index: int, epoch: int = 0, token: str | None = None) -> HttpCase:
    """Case ``index`` of the run with ``seed``: one request with one kind of defect.
    ``epoch`` is what otherwise valid bodies carry (the target's current epoch: should a
    check let a defect through, the call is refused as not advancing rather than obeyed, in
    every role but a fresh one). ``token``: the agent's, if it has one (adds wrong-token cases)."""
    rng = random.Random(f"http:{seed}:{index}")
    kinds = ["json", "json", "field", "field", "field", "route", "method", "too-large", "content-type", "framing"]
    kind = rng.choice([*kinds, "auth"] if token is not None else kinds)
    path = rng.choice(sorted(POST_ROUTES))
    fields = _valid_fields(rng, path, epoch)
    body = json.dumps(fields).encode()
    json_type: tuple[tuple[str, bytes], ...] = (("Content-Type", b"application/json"),) if rng.random() < 0.7 else ()
    if kind == "json":
        bad_body, defect = _json_defect(rng, fields)
        if len(bad_body) > MAX_BODY:  # the size is judged before the content
            return HttpCase("POST", path, json_type, bad_body, 413, f"{defect}, body too large")
        return HttpCase("POST", path, json_type, bad_body, 400, defect)
    if kind == "field":
        bad, defect = _field_defect(rng, path, fields)
        if rng.random() < 0.3:  # a second bad field: still one answer, 400
            bad, more = _field_defect(rng, path, bad)
            defect += f", {more}"
        return HttpCase("POST", path, json_type, json.dumps(bad).encode(), 400, defect)
    if kind == "route":
        method = rng.choice(["GET", "POST", "PUT", "DELETE"])
        return HttpCase(method, _unknown_path(rng), json_type, body, 404, "no such route")
    if kind == "method":
        if rng.random() < 0.6:
            method, target = rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS"]), path
        else:
            method, target = rng.choice(["POST", "PUT", "DELETE", "PATCH"]), rng.choice(GET_ROUTES)
        return HttpCase(method, target, json_type, body, 405, "wrong method")
    if kind == "too-large":
        size = rng.choice([MAX_BODY + 1, MAX_BODY + 100, 2 * MAX_BODY, 100_000])
        padded = body + rng.choice([b" ", b"x", b"["]) * (size - len(body))
        return HttpCase("POST", path, json_type, padded, 413, "body too large")
    if kind == "framing":
        return HttpCase("POST", path, (), b"", 400, "malformed HTTP", raw=rng.choice(BAD_FRAMING))
    if kind == "content-type":
        return HttpCase("POST", path, (("Content-Type", rng.choice(NOT_JSON_TYPES)),), body, 415, "not JSON")
    assert token is not None
    value = rng.choice(_auth_values(token))
    target = rng.choice([*sorted(POST_ROUTES), "/v1/status"])
    heads = json_type + ((("Authorization", value),) if value is not None else ())
    method = "GET" if target == "/v1/status" else "POST"
    return HttpCase(method, target, heads, body, 401, "wrong or missing token")


async def send(host: str, port: int, case: HttpCase, token: str | None, timeout: float = 10.0) -> HttpAnswer:
    """One request over a fresh connection, written byte for byte (no client library to
    normalise headers or bodies on the way). ``token`` is added unless the case is about it."""
    heads = list(case.headers)
    if token is not None and case.expect != 401:
        heads.append(("Authorization", f"Bearer {token}".encode()))
    request = (
        case.raw
        if case.raw is not None
        else (
            f"{case.method} {case.path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n".encode()
            + b"".join(k.encode() + b": " + v + b"\r\n" for k, v in heads)
            + f"Content-Length: {len(case.body)}\r\n\r\n".encode()
            + case.body
        )
    )

    async def exchange() -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(request)
            with contextlib.suppress(ConnectionError):
                await writer.drain()  # the agent may answer 413 and close before reading it all
            return await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    raw = await bounded(exchange(), timeout)
    head, _, payload = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise ConnectionError(f"no HTTP answer: {_cut(raw)}")
    return HttpAnswer(int(status_line[1]), payload)


def judge_http(case: HttpCase, answer: HttpAnswer) -> str | None:
    """Why the answer breaks the promise, or None."""
    if answer.status >= 500:
        return f"server error {answer.status} for bad input (expected {case.expect})"
    if answer.status < 400:
        return f"bad input accepted with {answer.status} (expected {case.expect})"
    if answer.status != case.expect:
        return f"answered {answer.status}, expected {case.expect}: a check let the defect through or misjudged it"
    if case.raw is not None:
        return None  # refused by the HTTP parser, before the agent's code: its answer is plain text
    try:
        payload = json.loads(answer.body)
    except ValueError:
        return "error answer is not JSON"
    if not isinstance(payload, dict) or not isinstance(payload.get("error"), str) or not payload["error"].strip():
        return 'error answer is not {"error": text}'
    if "Traceback" in payload["error"] or "\n" in payload["error"] or len(payload["error"]) > 2000:
        return "error text is not one short line"
    return None


async def _position(agent: Agent) -> tuple[Any, ...]:
    st = await agent.status()
    return st["role"], st["stage"], st["epoch"]


async def _health(agent: Agent) -> int:
    return (await send(agent.host, agent.api_port, HttpCase("GET", "/healthz", (), b"", 200, "-"), None)).status


def _log_size(agent: Agent) -> int:
    return agent.log_path.stat().st_size if agent.log_path and agent.log_path.exists() else 0


def _log_since(agent: Agent, offset: int) -> str:
    if not agent.log_path or not agent.log_path.exists():
        return ""
    with agent.log_path.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


@dataclass(frozen=True)
class Snapshot:
    """What must not change while an agent is fuzzed."""

    position: tuple[Any, ...]
    health: int
    log_offset: int


async def snapshot(agent: Agent) -> Snapshot:
    return Snapshot(await _position(agent), await _health(agent), _log_size(agent))


async def check_unharmed(agent: Agent, before: Snapshot, seed: int | None = None) -> list[Violation]:
    """The agent is alive, as healthy as before, in the same role/stage/epoch, and logged no
    traceback and no ERROR from request handling since ``before``."""
    after_fuzz = f"after fuzzing (seed {seed})"
    if agent.proc is not None and agent.proc.returncode is not None:
        return [Violation(after_fuzz, f"exit status {agent.proc.returncode}", "the agent died", seed)]
    found: list[Violation] = []
    try:
        now = await _position(agent)
        if now != before.position:
            found.append(Violation(after_fuzz, f"role/stage/epoch {now}, was {before.position}", "state changed", seed))
        health = await _health(agent)
        if health != before.health:
            found.append(Violation(after_fuzz, f"/healthz {health}, was {before.health}", "health changed", seed))
    except Exception as exc:
        found.append(Violation(after_fuzz, f"{type(exc).__name__}: {exc}", "status no longer answers", seed))
    request_errors = [
        line
        for line in _log_since(agent, before.log_offset).splitlines()
        if "Traceback" in line or (" ERROR " in line and ("pairvol.agent.http" in line or "aiohttp" in line))
    ]
    if request_errors:
        found.append(Violation(after_fuzz, _cut("\n".join(request_errors[:5]), 600), "traceback or ERROR logged", seed))
    return found


async def fuzz_http(agent: Agent, rounds: int, seed: int) -> list[Violation]:
    """Send ``rounds`` bad requests to a running agent (any role), judge each answer, then
    check the agent is unharmed (:func:`check_unharmed`)."""
    violations: list[Violation] = []
    before = await snapshot(agent)
    for index in range(rounds):
        case = http_case(seed, index, epoch=before.position[2], token=agent.token)
        try:
            answer = await send(agent.host, agent.api_port, case, agent.token)
        except (OSError, TimeoutError) as exc:
            violations.append(Violation(case.describe(), f"{type(exc).__name__}: {exc}", "no answer", seed, index))
            if agent.proc is not None and agent.proc.returncode is not None:
                break
            continue
        why = judge_http(case, answer)
        if why is not None:
            violations.append(Violation(case.describe(), answer.describe(), why, seed, index))
    return violations + await check_unharmed(agent, before, seed)


# ================================================================================= CLI


@dataclass(frozen=True)
class CliCase:
    argv: tuple[str, ...]
    flag: str  # what the one line on stderr must name
    defect: str

    def describe(self) -> str:
        shown = (a if a.isprintable() and len(a) <= 60 else _cut(a, 60) for a in self.argv)
        return f"pairvol {' '.join(shown)} ({self.defect})"


def make_cli_fixtures(root: Path) -> None:
    """The files and directories CLI cases point at, made once per run under ``root``."""
    (root / "a-file").write_text("not a directory\n")
    for name, entry in (("disk-is-dir", "disk.raw"), ("state-is-dir", "state.a"), ("slot-b-is-dir", "state.b")):
        (root / name / entry).mkdir(parents=True, exist_ok=True)
    files = {
        "empty": b"",
        "short-token": b"short\n",
        "space-token": b"a token with spaces in it\n",
        "nonascii-token": "tökentökentökentöken".encode(),
        "binary": b"\xff\xfe\x00\x01" * 8,
        "two-lines": b"aaaaaaaaaaaaaaaaaaaa\nbbbbbbbbbbbbbbbbbbbb\n",
        "big": b"a" * (65 * 1024),
        "psk-short": b"pairvol:abcd\n",
        "psk-nonhex": b"pairvol:" + b"zz" * 32 + b"\n",
        "psk-nonascii": ("pairvol:" + "ａｂ" * 32 + "\n").encode(),
        "psk-user": b"pair vol:" + b"ab" * 32 + b"\n",
        "good-token": b"0123456789abcdef0123456789abcdef\n",
        "good-psk": b"pairvol:" + b"ab" * 32 + b"\n",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)


def _bad_path(rng: random.Random, flag: str, root: Path) -> str:
    if flag == "--data-dir":
        options = [
            root / "a-file", root / "a-file" / "sub", root / "disk-is-dir", root / "state-is-dir",
            root / "slot-b-is-dir", root / ("x" * 256), root / ("y" * 120), root / "nul\x00dir",
        ]  # fmt: skip
        return rng.choice([*map(str, options), "", str(root) + "/" + "z/" * 2100])
    if flag == "--export-socket":
        options = [root / "a-file", root / "missing-dir" / "s.sock", root / ("s" * 120), root, root / "a-file" / "s"]
        return rng.choice([*map(str, options), ""])
    names = ["missing", "empty", "binary", "big", "two-lines"]
    if flag == "--token-file":
        names += ["short-token", "space-token", "nonascii-token"]
    else:
        names += ["psk-short", "psk-nonhex", "psk-nonascii", "psk-user", "good-token"]
    return rng.choice([*(str(root / n) for n in names), str(root), "/dev/zero", ""])


def cli_case(seed: int, index: int, root: Path, ports: tuple[int, int, int] = (7800, 7801, 7802)) -> CliCase:
    """Case ``index`` of the run with ``seed``: a command line with exactly one bad flag,
    every path under ``root`` (made by :func:`make_cli_fixtures`). ``ports``: two free ones
    for the good flags (a taken API port would be a second defect) and one that is taken."""
    rng = random.Random(f"cli:{seed}:{index}")
    flags: dict[str, str] = {
        "--name": "vol",
        "--data-dir": str(root / f"d{index}"),
        "--size": rng.choice(["16Mi", "1Mi", "16777216", "1Gi"]),
        "--listen": f"127.0.0.1:{ports[0]}",
        "--replication-listen": f"127.0.0.1:{ports[1]}",
    }
    if rng.random() < 0.3:
        flags["--peer-timeout"] = rng.choice(["1", "5", "2.5", "600"])
    if rng.random() < 0.3:
        flags["--token-file"] = str(root / "good-token")
    if rng.random() < 0.2:
        flags["--lease-name"], flags["--lease-namespace"] = "pairvol-vol", "default"
    kind = rng.choice(
        [
            *("--name", "--size", "--listen", "--replication-listen", "--export-listen", "--peer-timeout"),
            *("--lease-duration", "--lease-name", "--lease-namespace", "--data-dir", "--export-socket"),
            *("--token-file", "--psk-file", "beyond-loopback", "unusable-address", "unknown", "missing"),
            "no-value",
        ]
    )
    if kind == "--name":
        flags[kind] = rng.choice(BAD_NAMES)
    elif kind == "--size":
        flags[kind] = rng.choice(BAD_SIZES)
    elif kind in ("--listen", "--replication-listen", "--export-listen"):
        flags[kind] = rng.choice(BAD_HOSTPORTS)
    elif kind in ("--peer-timeout", "--lease-duration"):
        flags[kind] = rng.choice([*BAD_SECONDS, TOO_MANY_SECONDS[kind]])
    elif kind == "--lease-name":
        flags[kind] = rng.choice(BAD_SUBDOMAINS)
    elif kind == "--lease-namespace":
        flags[kind] = rng.choice(BAD_NAMES)
    elif kind in ("--data-dir", "--export-socket", "--token-file", "--psk-file"):
        flags[kind] = _bad_path(rng, kind, root)
    elif kind == "beyond-loopback":
        flag = rng.choice(["--listen", "--replication-listen", "--export-listen"])
        flags[flag] = rng.choice(BEYOND_LOOPBACK)
        flags.pop("--token-file", None)
        return _cli(flags, [], flag, f"{flag} beyond loopback without a secret")
    elif kind == "unusable-address":
        flag = rng.choice(["--listen", "--replication-listen", "--export-listen"])
        flags["--token-file"], flags["--psk-file"] = str(root / "good-token"), str(root / "good-psk")
        taken = f"127.0.0.1:{ports[2]}"
        flags[flag] = rng.choice(["192.0.2.1:7800", "[2001:db8::1]:7800"] + ([taken] if flag == "--listen" else []))
        return _cli(flags, [], flag, f"{flag} {flags[flag]}: not this machine's or taken")
    elif kind == "unknown":
        extra = [rng.choice(["--bogus", "--Name", "--peer_timeout", "-x", "--size-bytes", "--listen-port"]), "1"]
        return _cli(flags, extra, extra[0], "unknown flag")
    elif kind == "missing":
        flag = rng.choice(["--name", "--data-dir", "--size"])
        flags.pop(flag)
        return _cli(flags, [], flag, "missing flag")
    else:
        flag = rng.choice(["--peer-timeout", "--size", "--listen", "--name"])
        flags.pop(flag, None)
        return _cli(flags, [flag], flag, "flag without a value")
    return _cli(flags, [], kind, f"bad {kind} {_cut(flags[kind], 40)}")


def _cli(flags: dict[str, str], extra: list[str], flag: str, defect: str) -> CliCase:
    argv = ["agent"]
    for name, value in flags.items():
        # a value that starts with '-' would read as a flag: pass it as --flag=value
        argv += [f"{name}={value}"] if value.startswith("-") else [name, value]
    return CliCase(tuple(argv + extra), flag.lstrip("-"), defect)


def run_cli_in_process(argv: list[str]) -> tuple[int, str, bool]:
    """``pairvol ARGV`` in this process, up to the point where the agent would start serving:
    returns (exit status, stderr, whether it would have started). The real parser and every
    real check run; only serving is replaced."""
    from pairvol import cli as top
    from pairvol.agent import cli as agent_cli

    started = False

    async def would_serve(cfg: Any, args: Any) -> int:
        nonlocal started
        started = True
        return 0

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = agent_cli.run(top.build_parser(argv).parse_args(argv), serve=would_serve)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception:
            code = -1
            err.write(traceback.format_exc())
    return code, err.getvalue(), started


def run_cli_process(argv: list[str], timeout: float = 30.0) -> tuple[int, str, bool]:
    """``python -m pairvol ARGV`` as a real process. One still running at the timeout took
    the flags: it is killed (by its own PID; it is ours) and reported as started."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pairvol", *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err.decode(errors="replace"), False
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        return proc.returncode, err.decode(errors="replace"), True


def judge_cli(case: CliCase, code: int, err: str, started: bool) -> str | None:
    """Why the outcome breaks the promise (exit 2, one line naming the flag), or None."""
    if started:
        return "bad flags accepted: the agent would start"
    if "Traceback" in err:
        return f"traceback on stderr (exit {code})"
    if code != 2:
        return f"exit status {code}, expected 2"
    lines = err.rstrip("\n").split("\n") if err.strip() else []
    if len(lines) != 1:
        return f"{len(lines)} lines on stderr, expected one"
    if case.flag not in lines[0]:
        return f"the message does not name {case.flag!r}"
    return None


def fuzz_cli(rounds: int, seed: int, workdir: Path | None = None, processes: int = 0) -> list[Violation]:
    """Run ``rounds`` command lines with one bad flag each through the real parser and
    checks (in this process, stopped before serving); ``processes`` of them, spread over the
    run, also as real ``pairvol agent`` processes. Everything lives in a temporary directory
    (under ``workdir`` if given), removed afterwards.

    Synchronous, about 10 ms a round in process and 0.5 s a process: from asyncio code call
    it through ``asyncio.to_thread``. The in-process runs swap ``sys.stderr`` while they run
    (logging handlers keep their own stream and are not affected)."""
    root = Path(tempfile.mkdtemp(prefix="fuzz-cli-", dir=workdir))
    held = socket.create_server(("127.0.0.1", 0))  # a port that is taken for the whole run
    try:
        make_cli_fixtures(root)
        ports = (free_port(), free_port(), held.getsockname()[1])
        every = max(1, rounds // processes) if processes else 0
        violations: list[Violation] = []
        for index in range(rounds):
            case = cli_case(seed, index, root, ports)
            runs: list[Callable[[list[str]], tuple[int, str, bool]]] = [run_cli_in_process]
            if every and index % every == 0 and not any("\0" in a for a in case.argv):  # exec takes no NUL
                runs.append(run_cli_process)
            for run in runs:
                code, err, started = run(list(case.argv))
                why = judge_cli(case, code, err, started)
                if why is not None:
                    how = "" if run is run_cli_in_process else " (as a process)"
                    violations.append(
                        Violation(case.describe(), f"exit {code}: {_cut(err, 400)}", why + how, seed, index)
                    )
        return violations
    finally:
        held.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":  # python -m tests.support.fuzz [SEED [ROUNDS]]: the CLI half, for a quick look
    found = fuzz_cli(int(sys.argv[2]) if len(sys.argv) > 2 else 200, int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    print("\n".join(map(str, found)) or "no violations")
    raise SystemExit(1 if found else 0)
