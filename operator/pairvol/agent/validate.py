"""Input validation for the agent's flags and API bodies (pure; no I/O).

Every value that crosses the API is checked here, with a message that says what was
wrong and what is accepted. File names never derive from input other than the volume
name, which is a DNS label, so nothing can escape the data dir.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from pairvol.agent.stages import FailoverMode
from pairvol.errors import PairvolError

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?)*$"
)
_SIZE = re.compile(r"^\s*(\d+)\s*(Ki|Mi|Gi|Ti|K|M|G|T)?\s*$")
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
MAX_SIZE = 1 << 50
SIZE_ALIGN = 512
MAX_EPOCH = (1 << 63) - 1


class InvalidInput(PairvolError):
    """A flag or request body is malformed (HTTP 400)."""


def parse_name(value: object) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise InvalidInput(
            f"invalid volume name {value!r}: use a DNS label (lower-case letters, digits and '-', "
            "at most 63 characters, starting and ending with a letter or digit)"
        )
    return value


def parse_size(value: object) -> int:
    if isinstance(value, bool):
        raise InvalidInput(f"invalid size {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        size = int(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise InvalidInput(f"invalid size {value!r}: give bytes or a number with Ki, Mi, Gi or Ti (e.g. 256Mi)")
    if size < MIN_SIZE or size > MAX_SIZE:
        raise InvalidInput(f"size {size} bytes is out of range: use 1Mi to 1Pi")
    if size % SIZE_ALIGN:
        raise InvalidInput(f"size {size} bytes is not a multiple of {SIZE_ALIGN} bytes (sectors)")
    return size


def parse_hostport(value: object, what: str = "address") -> tuple[str, int]:
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"invalid {what} {value!r}: expected HOST:PORT")
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise InvalidInput(f"invalid {what} {value!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.match(host):
            raise InvalidInput(f"invalid host {host!r} in {what} {value!r}") from None
    port = int(port_text)
    if not 0 < port < 65536:
        raise InvalidInput(f"invalid port {port} in {what} {value!r}: use 1..65535")
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_epoch(body: dict[str, Any]) -> int:
    if "epoch" not in body:
        raise InvalidInput("missing 'epoch': every role change carries the operator's epoch (an integer >= 0)")
    epoch = body["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= MAX_EPOCH:
        raise InvalidInput(f"invalid epoch {epoch!r}: expected an integer >= 0")
    return int(epoch)


def parse_peer_epoch(body: dict[str, Any], epoch: int) -> int:
    """The epoch the peer was started at as secondary (its export is named after it);
    by default the one before the primary's, which is how the operator hands them out."""
    if "peerEpoch" not in body:
        return max(0, epoch - 1)
    peer_epoch = body["peerEpoch"]
    if isinstance(peer_epoch, bool) or not isinstance(peer_epoch, int) or not 0 <= peer_epoch <= epoch:
        raise InvalidInput(
            f"invalid peerEpoch {peer_epoch!r}: expected the integer epoch the secondary was started with "
            f"(0..{epoch}, not above the primary's epoch)"
        )
    return int(peer_epoch)


def parse_mode(body: dict[str, Any]) -> FailoverMode:
    mode = body.get("mode", "checkpoint")
    if not isinstance(mode, str) or mode.lower() not in {m.value for m in FailoverMode}:
        raise InvalidInput(f"invalid failover mode {mode!r}: use 'checkpoint' or 'latest'")
    return FailoverMode(mode.lower())


def parse_sync(body: dict[str, Any]) -> str:
    sync = body.get("sync", "none")
    if sync not in ("none", "full"):
        raise InvalidInput(f"invalid sync {sync!r}: use 'none' or 'full'")
    return str(sync)


def parse_peer(body: dict[str, Any]) -> tuple[str, int] | None:
    peer = body.get("peer")
    if peer is None:
        return None
    return parse_hostport(peer, "peer")


def check_keys(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidInput(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
