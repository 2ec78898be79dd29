"""The attacher host: starts, stops and watches a node's attachers for the node plugin.

Why it exists: a staged volume is served by its attacher (pairvol.csi.attach). When a
container exits, the container runtime kills every process of that container, daemons
included; attachers started by the node plugin would die with every restart of the node
plugin's container (a crash, an OOM kill, a failed liveness probe), and every mounted
volume of the node would fail with EIO. So the attachers are started by this process,
which runs in a container of its own in the node DaemonSet's pod, shares the node
plugin's state directory (a hostPath, with ``mountPropagation: Bidirectional`` so the
attachers' FUSE exports reach the node and the node plugin's container), and does nothing
else: its restarts are as rare as those of a process that does almost nothing. When it
does restart (or the pod is replaced), its attachers die with it — as the node plugin's
used to with every restart of the plugin.

The protocol is deliberately narrow, one request per connection, a line of JSON each way:

* request ``{"op": "start" | "stop" | "status" | "ping", "volume": "NAMESPACE/NAME"}``;
* answer ``{"ok": true, "running": BOOL}`` or ``{"ok": false, "error": TEXT}``.

A request carries no command line and no path: the volume ID names the attachment, whose
directory the host finds under its own state directory (anything that is not a volume ID
of the driver, or that would lead out of the state directory, is refused), and whose
record and key file it reads itself; the argv is built by
:func:`pairvol.csi.attach.attacher_argv`, as for a node plugin that starts attachers
itself. The socket is mode 0600 in a directory of mode 0700, and a peer of another user
is refused (SO_PEERCRED).

Imports are kept to the standard library and pairvol.csi.attach (no gRPC, no Kubernetes
client): the host starts fast and stays small.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
import socket
import stat
import struct
from pathlib import Path
from typing import Any

from pairvol.aio import bounded
from pairvol.csi.attach import AttachError, Attachment, DirectAttachers
from pairvol.csi.params import parse_volume_id

log = logging.getLogger(__name__)

OPS = ("start", "stop", "status", "ping")
#: the longest request line accepted (a volume ID is at most 63 + 1 + 40 characters)
MAX_REQUEST = 1024
#: how long the node plugin waits for an answer: a start waits for the export
CALL_TIMEOUT_S = 90.0
#: how long the node plugin waits for the host at its start (the pod's containers start together)
READY_TIMEOUT_S = 60.0


class Refused(AttachError):
    """The host refused a request (bad volume ID, no attachment, bad request)."""


def socket_path(endpoint: str) -> Path:
    """The path of ``unix:///PATH`` (ValueError for anything else)."""
    if not endpoint.startswith("unix:///"):
        raise ValueError(f"the attacher host's address must be unix:///ABSOLUTE/PATH, got {endpoint!r}")
    return Path(endpoint[len("unix://") :])


def attachment_of(state_dir: Path, volume: object) -> Attachment:
    """The attachment a request names, confined to ``state_dir`` (Refused otherwise)."""
    if not isinstance(volume, str) or parse_volume_id(volume) is None:
        raise Refused(
            f"{volume!r} is not a volume ID of this driver (NAMESPACE/NAME, each a DNS label): "
            "a request names an attachment by its volume ID, nothing else"
        )
    att = Attachment(state_dir, volume)
    root = state_dir.resolve()
    if att.dir.parent != state_dir or att.dir.name.startswith(".") or att.dir.is_symlink():
        raise Refused(f"volume ID {volume!r} leads out of the state directory {state_dir}; refused")
    if att.dir.exists() and att.dir.resolve().parent != root:
        raise Refused(f"the attachment directory of {volume!r} leads out of the state directory {state_dir}; refused")
    return att


class AttacherHost:
    """The server side; ``await host.serve()`` until SIGTERM."""

    def __init__(self, socket: Path, state_dir: Path) -> None:
        self.socket = socket
        self.state_dir = state_dir
        self.direct = DirectAttachers()
        self._locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)

    def _prepare(self) -> None:
        """The state directory, and the socket's directory: ours alone (0700). A directory
        that exists is used only if it already is (it is never chmod-ed: --socket may name a
        shared directory by mistake)."""
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        parent = self.socket.parent
        parent.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            parent.mkdir(mode=0o700)
            os.chmod(parent, 0o700)
        st = parent.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise AttachError(
                f"the socket's directory {parent} must be a directory of its own (user {os.getuid()}, mode 0700; "
                f"it is {stat.filemode(st.st_mode)}, user {st.st_uid}): give --socket a path in a new directory, "
                "e.g. STATE_DIR/.attacher-host/host.sock"
            )
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()  # a previous host's

    async def serve(self) -> None:
        await asyncio.to_thread(self._prepare)
        old = os.umask(0o177)  # the socket is created 0600
        try:
            server = await asyncio.start_unix_server(self._client, path=str(self.socket), limit=MAX_REQUEST)
        finally:
            os.umask(old)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("attacher host serving %s for %s", self.socket, self.state_dir)
        async with server:
            await stop.wait()
        log.info("attacher host stopping; the attachers it started stop with its container")

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            answer = await self._answer(reader, writer)
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError) as exc:
            log.debug("attacher host: client went away: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> dict[str, Any]:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if uid != os.getuid():
                return {"ok": False, "error": f"user {uid} may not use the attacher host"}
        try:
            line = await reader.readuntil(b"\n")
        except (asyncio.LimitOverrunError, ValueError):
            return {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"}
        try:
            return await self.handle(json.loads(line))
        except json.JSONDecodeError:
            return {"ok": False, "error": "a request is one line of JSON"}
        except AttachError as exc:
            level = logging.INFO if isinstance(exc, Refused) else logging.WARNING
            log.log(level, "attacher host: %s", exc)
            return {"ok": False, "error": str(exc)}

    async def handle(self, request: object) -> dict[str, Any]:
        """One request (see the module docstring); AttachError says what was wrong."""
        if not isinstance(request, dict):
            raise Refused('a request is a JSON object {"op": ..., "volume": ...}')
        extra = sorted(set(request) - {"op", "volume"})
        if extra:
            raise Refused(f"unknown field(s) {', '.join(extra)}: a request names an operation and a volume ID only")
        op = request.get("op")
        if op not in OPS:
            raise Refused(f"unknown op {op!r}; one of {', '.join(OPS)}")
        if op == "ping":
            return {"ok": True}
        att = attachment_of(self.state_dir, request.get("volume"))
        async with self._locks[att.volume_id]:
            if op == "start":
                await self._start(att)
            elif op == "stop":
                await self.direct.stop(att)
            return {"ok": True, "running": await self.direct.running(att)}

    async def _start(self, att: Attachment) -> None:
        record = await asyncio.to_thread(att.read_record)
        if record is None:
            raise Refused(
                f"volume {att.volume_id} has no attachment in {self.state_dir} (no attachment.json): "
                "the node plugin writes it at NodeStageVolume before asking for its attacher"
            )
        if record.volume_id != att.volume_id:
            raise Refused(f"the attachment record of {att.volume_id} names volume {record.volume_id}; refused")
        if not await asyncio.to_thread((att.dir / "keys.psk").is_file):
            raise Refused(f"volume {att.volume_id} has no key file in {att.dir}; stage it again")
        await self.direct.start(att)


class HostAttachers:
    """The node plugin's side: asks the attacher host at ``socket``."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket

    async def call(self, op: str, volume: str | None = None, timeout: float = CALL_TIMEOUT_S) -> dict[str, Any]:
        request: dict[str, str] = {"op": op} if volume is None else {"op": op, "volume": volume}
        try:
            reader, writer = await bounded(asyncio.open_unix_connection(str(self.socket)), 5.0)
        except (OSError, TimeoutError) as exc:
            raise AttachError(
                f"the attacher host does not answer on {self.socket} ({exc or 'timeout'}); "
                "is the attacher-host container of this node's pod running?"
            ) from exc
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            line = await bounded(reader.readline(), timeout)
        except (OSError, TimeoutError) as exc:
            raise AttachError(f"the attacher host did not answer {op} {volume or ''} ({exc or 'timeout'})") from exc
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        try:
            answer: dict[str, Any] = json.loads(line)
        except json.JSONDecodeError:
            raise AttachError(f"the attacher host answered {op} with {line[:200]!r}") from None
        if not answer.get("ok"):
            raise AttachError(f"the attacher host refused {op} of {volume}: {answer.get('error')}")
        return answer

    async def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Until the host answers (it starts with the node plugin, in another container)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                await self.call("ping", timeout=5.0)
                return
            except AttachError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
            await asyncio.sleep(0.2)

    async def running(self, att: Attachment) -> bool:
        return bool((await self.call("status", att.volume_id))["running"])

    async def start(self, att: Attachment) -> None:
        await self.call("start", att.volume_id)

    async def stop(self, att: Attachment) -> None:
        await self.call("stop", att.volume_id)


def main(socket: Path, state_dir: Path) -> int:
    try:
        asyncio.run(AttacherHost(socket, state_dir).serve())
    except AttachError as exc:
        log.error("attacher host cannot start: %s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
