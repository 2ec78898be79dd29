"""Input validation for the agent's flags and API bodies (pure; no I/O).

Every value that crosses the API or the command line is checked here, once, by the same
functions for both, with a message that says what was wrong and what is accepted.

Why the parsers are written out instead of leaning on ``int()``, ``float()`` and
``json.loads``: those accept far more than our contract does, and fail in ways that are
not input errors. ``int()`` takes any Unicode decimal digit ('١٦' is 16) and raises
ValueError past 4300 digits; ``float()`` takes 'nan' and 'inf', which compare False with
every bound, so a range check lets them through; ``json.loads`` recurses once per nesting
level (RecursionError on a 10 KB body), takes NaN/Infinity and keeps the last of two
duplicate keys. So numbers are ASCII digits of bounded length, seconds are finite plain
decimals, JSON bodies are UTF-8 objects of bounded depth without duplicate keys, and regular
expressions are matched in full (``$`` alone lets a trailing newline through).

File names never derive from input other than the volume name, which is a DNS label, so
nothing can escape the data dir.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from typing import Any

from pairvol.agent.stages import FAILOVER_TRIGGERS, FailoverMode
from pairvol.api.spec import MAX_SIZE as MAX_SIZE  # re-exported: the agent's limit
from pairvol.errors import PairvolError

_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_LABEL = r"[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(\.{_LABEL})*")
_DNS_SUBDOMAIN = re.compile(r"(?=.{1,253}\Z)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DIGITS = re.compile(r"[0-9]+")
_SIZE = re.compile(r"[ \t]*([0-9]+)[ \t]*(Ki|Mi|Gi|Ti|K|M|G|T)?[ \t]*")
_DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?")
_TOKEN = re.compile(r"[\x21-\x7e]+")  # visible ASCII: what an Authorization header can carry
_UNITS = {
    None: 1,
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
}
MIN_SIZE = 1 << 20
# MAX_SIZE (1 PiB) is defined once, in pairvol.api.spec: the operator refuses a spec.size
# beyond what an agent takes
SIZE_ALIGN = 512
MAX_EPOCH = (1 << 63) - 1
MAX_NUMBER_DIGITS = 20  # 2**64 has 20 digits; nothing we accept is longer
MAX_DECIMAL_CHARS = 32  # str() of a float has at most 17 significant digits
MAX_JSON_DEPTH = 32  # our bodies are flat objects (depth 1); this leaves room and bounds recursion
MAX_PATH_BYTES = 4095  # PATH_MAX (4096) without the terminating NUL
MAX_NAME_BYTES = 255  # NAME_MAX: one path component
MIN_TOKEN = 16
MAX_TOKEN = 4096
MAX_SHOWN = 60  # characters of a bad value echoed back in a message


class InvalidInput(PairvolError):
    """A flag or request body is malformed (HTTP 400, exit status 2)."""


def show(value: object) -> str:
    """``repr`` of a bad value, cut short: a message must stay one readable line even when
    the value was 64 KB of garbage."""
    text = repr(value)
    if len(text) <= MAX_SHOWN:
        return text
    return f"{text[: MAX_SHOWN - 10]}…({len(text)} characters)"


# ---------------------------------------------------------------------------- numbers


def parse_seconds(value: object, what: str, lo: float, hi: float) -> float:
    """A duration in seconds: a plain decimal (``5``, ``2.5``) in ``lo..hi``. No sign, no
    exponent, no nan/inf: those pass a range check by comparing False."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InvalidInput(f"invalid {what} {show(value)}: expected seconds, a number {lo:g}..{hi:g}")
    if isinstance(value, str):
        if not _DECIMAL.fullmatch(value) or len(value) > MAX_DECIMAL_CHARS:
            raise InvalidInput(
                f"invalid {what} {show(value)}: expected seconds, a plain decimal number {lo:g}..{hi:g} (e.g. 5 or 2.5)"
            )
        seconds = float(value)
    else:
        seconds = float(value)
    if not (math.isfinite(seconds) and lo <= seconds <= hi):
        raise InvalidInput(f"{what} {show(value)} is out of range: use {lo:g}..{hi:g} seconds")
    return seconds


def parse_size(value: object) -> int:
    if isinstance(value, bool):
        raise InvalidInput(f"invalid size {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.fullmatch(value)) and len(m.group(1)) <= MAX_NUMBER_DIGITS:
        size = int(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise InvalidInput(
            f"invalid size {show(value)}: give whole bytes or a whole number with Ki, Mi, Gi or Ti (e.g. 256Mi)"
        )
    if size < MIN_SIZE or size > MAX_SIZE:
        raise InvalidInput(f"size {size} bytes is out of range: use 1Mi to 1Pi")
    if size % SIZE_ALIGN:
        raise InvalidInput(f"size {size} bytes is not a multiple of {SIZE_ALIGN} bytes (sectors)")
    return size


# ---------------------------------------------------------------------------- names and addresses


def parse_name(value: object) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidInput(
            f"invalid volume name {show(value)}: use a DNS label (lower-case letters, digits and '-', "
            "at most 63 characters, starting and ending with a letter or digit)"
        )
    return value


def parse_k8s_name(value: object, what: str, label: bool = False) -> str:
    """A Kubernetes object name: a DNS label (namespaces) or subdomain (most objects)."""
    ok = isinstance(value, str) and (_NAME.fullmatch(value) if label else _DNS_SUBDOMAIN.fullmatch(value))
    if not ok:
        kind = "a DNS label (at most 63" if label else "a DNS subdomain (at most 253"
        raise InvalidInput(
            f"invalid {what} {show(value)}: use {kind} lower-case letters, digits, '-'"
            f"{'' if label else ' and .'}, starting and ending with a letter or digit)"
        )
    assert isinstance(value, str)
    return value


def _parse_host(host: str, what: str, value: str) -> str:
    if host.startswith("["):
        inner = host[1:-1] if host.endswith("]") else ""
        try:
            if "%" in inner:
                raise ValueError
            return str(ipaddress.IPv6Address(inner))
        except ValueError:
            raise InvalidInput(
                f"invalid IPv6 address {show(host)} in {what} {show(value)}: write [ADDRESS]:PORT "
                "with a plain IPv6 address (no zone index)"
            ) from None
    if ":" in host:
        raise InvalidInput(f"invalid {what} {show(value)}: put an IPv6 address in brackets, [ADDRESS]:PORT")
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(host) or re.fullmatch(r"[0-9.]+", host):
        raise InvalidInput(
            f"invalid host {show(host)} in {what} {show(value)}: use an IPv4 address, [IPv6 address] "
            "or a DNS name (letters, digits, '-' and '.')"
        )
    return host


def parse_hostport(value: object, what: str = "address") -> tuple[str, int]:
    """``HOST:PORT`` with HOST an IPv4 address, a bracketed IPv6 address or a DNS name;
    returns the host without brackets (see :func:`format_hostport` for the way back)."""
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"invalid {what} {show(value)}: expected HOST:PORT")
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise InvalidInput(f"invalid {what} {show(value)}: expected HOST:PORT")
    host = _parse_host(host, what, value)
    digits = bool(_DIGITS.fullmatch(port_text)) and len(port_text) <= 5
    if not digits or not 0 < int(port_text) < 65536:
        shown = port_text if digits else show(port_text)
        raise InvalidInput(f"invalid port {shown} in {what} {show(value)}: use 1..65535 in ASCII digits")
    return host, int(port_text)


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------- files and secrets


def parse_path(value: object, what: str) -> str:
    """A path the kernel can take: no NUL, at most PATH_MAX bytes, components at most NAME_MAX."""
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"invalid {what} {show(value)}: expected a path")
    if "\0" in value:
        raise InvalidInput(f"invalid {what} {show(value)}: a path cannot contain a NUL character")
    raw = value.encode("utf-8", "surrogateescape")
    if len(raw) > MAX_PATH_BYTES:
        raise InvalidInput(f"{what} is {len(raw)} bytes long, more than {MAX_PATH_BYTES}: choose a shorter path")
    if any(len(part) > MAX_NAME_BYTES for part in raw.split(b"/")):
        raise InvalidInput(
            f"{what} {show(value)} has a component longer than {MAX_NAME_BYTES} bytes: choose a shorter name"
        )
    return value


def parse_token(data: bytes, source: str) -> str:
    """A bearer token from a file: visible ASCII (it travels in an HTTP header), 16..4096
    characters, surrounding white space (a trailing newline) ignored."""
    text = data.strip(b" \t\r\n")
    if len(text) < MIN_TOKEN:
        raise InvalidInput(f"{source}: token shorter than {MIN_TOKEN} characters; write a longer random token")
    if len(text) > MAX_TOKEN:
        raise InvalidInput(f"{source}: token longer than {MAX_TOKEN} characters")
    if not _TOKEN.fullmatch(text.decode("latin-1")):
        raise InvalidInput(
            f"{source}: the token may only hold visible ASCII characters (no spaces, control characters "
            "or non-ASCII), as it travels in an Authorization header"
        )
    return text.decode("ascii")


# ---------------------------------------------------------------------------- JSON bodies

_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def _json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects, found without recursion (brackets inside
    strings do not count)."""
    depth = deepest = 0
    for m in _JSON_TOKENS.finditer(text):
        token = m.group()
        if token in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_JSON_DEPTH:
                break
        elif token in "]}":
            depth -= 1
    return deepest


def _json_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_NUMBER_DIGITS:
        raise InvalidInput(f"request body holds a number with {len(text)} digits: no field takes one that large")
    return int(text)


def _json_float(text: str) -> float:
    number = float(text) if len(text) <= MAX_DECIMAL_CHARS else math.inf
    if not math.isfinite(number):
        raise InvalidInput(f"request body holds a number out of range: {show(text)}")
    return number


def _json_constant(text: str) -> Any:
    raise InvalidInput(f"request body holds {text}, which is not JSON: send numbers as digits")


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise InvalidInput(f"request body has the field {show(key)} twice: send each field once")
        obj[key] = value
    return obj


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """A request body: empty (no fields) or one JSON object in UTF-8, at most
    :data:`MAX_JSON_DEPTH` levels deep, without duplicate keys, NaN or Infinity."""
    if not raw.strip(b" \t\r\n"):
        return {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"request body is not UTF-8 (bad byte at offset {exc.start}): send JSON in UTF-8") from None
    if _json_depth(text) > MAX_JSON_DEPTH:
        raise InvalidInput(
            f"request body is nested deeper than {MAX_JSON_DEPTH} levels: send a flat JSON object of the call's fields"
        )
    try:
        body = json.loads(
            text,
            object_pairs_hook=_json_object,
            parse_int=_json_int,
            parse_float=_json_float,
            parse_constant=_json_constant,
        )
    except ValueError as exc:  # JSONDecodeError
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidInput(f'request body must be a JSON object, not {type(body).__name__}: send {{"field": value}}')
    return body


# ---------------------------------------------------------------------------- fields


def parse_epoch(body: dict[str, Any]) -> int:
    if "epoch" not in body:
        raise InvalidInput("missing 'epoch': every role change carries the operator's epoch (an integer >= 0)")
    epoch = body["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= MAX_EPOCH:
        raise InvalidInput(f"invalid epoch {show(epoch)}: expected an integer 0..{MAX_EPOCH}")
    return int(epoch)


def parse_peer_epoch(body: dict[str, Any], epoch: int) -> int:
    """The epoch the peer was started at as secondary (its export is named after it);
    by default the one before the primary's, which is how the operator hands them out."""
    if "peerEpoch" not in body:
        return max(0, epoch - 1)
    peer_epoch = body["peerEpoch"]
    if isinstance(peer_epoch, bool) or not isinstance(peer_epoch, int) or not 0 <= peer_epoch <= epoch:
        raise InvalidInput(
            f"invalid peerEpoch {show(peer_epoch)}: expected the integer epoch the secondary was started with "
            f"(0..{epoch}, not above the primary's epoch)"
        )
    return int(peer_epoch)


def parse_mode(body: dict[str, Any]) -> FailoverMode:
    mode = body.get("mode", "checkpoint")
    # ASCII first: str.lower() maps some non-ASCII letters onto ASCII ones (KELVIN SIGN -> 'k')
    if not isinstance(mode, str) or not mode.isascii() or mode.lower() not in {m.value for m in FailoverMode}:
        raise InvalidInput(f"invalid failover mode {show(mode)}: use 'checkpoint' or 'latest'")
    return FailoverMode(mode.lower())


def parse_trigger(body: dict[str, Any]) -> str:
    """A failover's ``trigger``: only a label of its metrics (docs/alerts.md)."""
    trigger = body.get("trigger", "unspecified")
    if not isinstance(trigger, str) or trigger not in FAILOVER_TRIGGERS:
        raise InvalidInput(
            f"invalid failover trigger {show(trigger)}: use 'automatic' (the primary was found down), "
            "'manual' (a planned failover) or leave it out"
        )
    return trigger


def parse_sync(body: dict[str, Any]) -> str:
    sync = body.get("sync", "none")
    if not isinstance(sync, str) or sync not in ("none", "full", "auto"):
        raise InvalidInput(f"invalid sync {show(sync)}: use 'none', 'full' or 'auto'")
    return sync


_DISK_ID = re.compile(r"[0-9a-f]{32}")


def parse_peer_disk(body: dict[str, Any]) -> str | None:
    """The identity of the peer's disk, as its agent reports it (``disk.id`` in its status)."""
    disk = body.get("peerDisk")
    if disk is None:
        return None
    if not isinstance(disk, str) or not _DISK_ID.fullmatch(disk):
        raise InvalidInput(
            f"invalid peerDisk {show(disk)}: expected the secondary's disk identity, 32 lowercase hex digits "
            "(its status field disk.id)"
        )
    return disk


def parse_peer(body: dict[str, Any]) -> tuple[str, int] | None:
    peer = body.get("peer")
    if peer is None:
        return None
    return parse_hostport(peer, "peer")


def check_keys(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        listed = ", ".join(show(k) if not k.isidentifier() else k for k in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise InvalidInput(
            f"unknown field(s) {listed}{more}; allowed: {', '.join(sorted(allowed)) or 'none (send {} or nothing)'}"
        )


def parse_peer_api(body: dict[str, Any]) -> str | None:
    """``peerApi``: the peer agent's HTTP API, ``HOST:PORT``, where a checksum resync asks
    for the peer's digests (with this agent's own token: a volume's agents share it)."""
    api = body.get("peerApi")
    if api is None:
        return None
    host, port = parse_hostport(api, "peerApi")
    return format_hostport(host, port)


def parse_digest_request(body: dict[str, Any]) -> tuple[str, int, int]:
    """``POST /v1/digests {"disk", "offset", "length"}``: the disk the caller means (32
    lowercase hex digits, the secondary's ``disk.id``) and a byte range, checked against
    the volume by the replica."""
    disk = body.get("disk")
    if not isinstance(disk, str) or not _DISK_ID.fullmatch(disk):
        raise InvalidInput(
            f"invalid disk {show(disk)}: expected the secondary's disk identity, 32 lowercase hex digits "
            "(its status field disk.id)"
        )
    span = []
    for key in ("offset", "length"):
        value = body.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInput(f"invalid {key} {show(value)}: expected a byte count, an integer >= 0")
        span.append(int(value))
    return disk, span[0], span[1]
