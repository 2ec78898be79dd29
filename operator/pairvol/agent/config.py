"""The agent's configuration, from its flags (DESIGN.md §3)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from pairvol.agent.validate import InvalidInput, is_loopback

_PSK_LINE = re.compile(r"^([A-Za-z0-9_.-]{1,64}):([0-9a-fA-F]{32,256})$")
MAX_UNIX_PATH = 107
# the longest unix socket the agent creates in its data dir: the relay daemon's QMP socket
# (pairvol.qemu.qsd names it NAME-qmp.sock in the replica's .run dir)
CONTROL_SOCKET = ".run/relay-qmp.sock"
MIN_PEER_TIMEOUT = 1.0
MAX_PEER_TIMEOUT = 600.0


@dataclass(frozen=True)
class Psk:
    username: str
    key_hex: str

    @classmethod
    def parse(cls, text: str, source: str) -> Psk:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if len(lines) != 1 or not (m := _PSK_LINE.match(lines[0])):
            raise InvalidInput(
                f"{source}: expected one line 'USERNAME:HEXKEY' (qemu tls-creds-psk keys.psk format, "
                "key at least 16 bytes = 32 hex digits)"
            )
        return cls(m.group(1), m.group(2).lower())

    def keys_file(self) -> str:
        return f"{self.username}:{self.key_hex}\n"


@dataclass(frozen=True)
class AgentConfig:
    name: str
    data_dir: Path
    size: int
    listen: tuple[str, int]
    replication_listen: tuple[str, int]
    export_socket: Path
    export_listen: tuple[str, int] | None = None
    token: str | None = None
    psk: Psk | None = None
    peer_timeout: float = 5.0
    # the workload export's own key: a workload that holds it must not be able to write to
    # a secondary's replication port, which trusts ``psk``
    export_psk: Psk | None = None
    # re-pair a dropped peer that is still reachable on its own (docs/correctness.md R5);
    # off: only POST /v1/primary re-pairs (for callers that orchestrate every resync)
    auto_reprotect: bool = True

    @property
    def workload_psk(self) -> Psk | None:
        """The key of the workload export over TCP: its own, else the replication key."""
        return self.export_psk if self.export_psk is not None else self.psk

    def check(self) -> None:
        """Refuse anything but loopback unless the API and the link are authenticated."""
        if not is_loopback(self.listen[0]) and self.token is None:
            raise InvalidInput(f"--listen {self.listen[0]}: listening beyond loopback needs --token-file")
        if not is_loopback(self.replication_listen[0]) and self.psk is None:
            raise InvalidInput(
                f"--replication-listen {self.replication_listen[0]}: listening beyond loopback needs "
                "--psk-file (TLS-PSK)"
            )
        if self.export_listen is not None and not is_loopback(self.export_listen[0]) and self.workload_psk is None:
            raise InvalidInput(
                f"--export-listen {self.export_listen[0]}: listening beyond loopback needs --export-psk-file "
                "or --psk-file (TLS-PSK)"
            )
        if self.export_psk is not None and self.psk is not None and self.export_psk.key_hex == self.psk.key_hex:
            raise InvalidInput(
                "--export-psk-file holds the same key as --psk-file: a workload given the export key could then "
                "write to a secondary's replication port; use a different key (or leave --export-psk-file out)"
            )
        longest = self.data_dir / CONTROL_SOCKET
        if len(os.fsencode(longest)) > MAX_UNIX_PATH:
            room = MAX_UNIX_PATH - len(os.fsencode(CONTROL_SOCKET)) - 1
            raise InvalidInput(
                f"--data-dir {self.data_dir} is too long: the agent's control sockets live in it and a unix "
                f"socket path holds at most {MAX_UNIX_PATH} bytes; use a data dir of at most {room} bytes"
            )
        if len(os.fsencode(self.export_socket)) > MAX_UNIX_PATH:
            raise InvalidInput(
                f"--export-socket {self.export_socket} is longer than {MAX_UNIX_PATH} bytes, the limit "
                "of a unix socket path: choose a shorter path"
            )
        if not MIN_PEER_TIMEOUT <= self.peer_timeout <= MAX_PEER_TIMEOUT:  # also False for nan
            raise InvalidInput(
                f"--peer-timeout {self.peer_timeout}: use {MIN_PEER_TIMEOUT:g}..{MAX_PEER_TIMEOUT:g} seconds"
            )

    @property
    def stall_timeout(self) -> float:
        """How long a request to the peer may stay unanswered before the link gate calls
        the link stalled. The rest of the peer timeout is the budget for writing the
        OutOfSync mark (a state fsync and a Lease update) before held writes go on."""
        return max(0.5, self.peer_timeout - max(0.5, self.peer_timeout / 4))
