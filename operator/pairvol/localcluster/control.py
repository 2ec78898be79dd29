"""Control of a running ``pairvol localcluster up`` from other shells.

Why: a user starts the local cluster once and then, from anywhere, asks what runs
(``status``), fails nodes (``node kill|partition|heal|restart``) and stops it (``down``).
The running ``up`` process owns the nodes' processes and namespaces, so it must do these
things itself; other commands ask it over a unix socket in the *state directory*.

Protocol: one JSON object per line each way. A request is ``{"op": "status"}``,
``{"op": "node", "action": "kill", "node": "node-1"}`` or ``{"op": "down"}``; the answer
is ``{"ok": true, ...}`` or ``{"ok": false, "error": "what was wrong and what to do"}``.
The socket is created with mode 0600 (only its owner may drive the cluster).

State directory (``--state-dir``, else ``$PAIRVOL_LOCALCLUSTER_DIR``, else
``$TMPDIR/pairvol-localcluster-<uid>``): ``control.sock``, ``cluster.json`` (pid, API URL,
kubeconfig; for humans and scripts) and, unless ``--kubeconfig`` says otherwise, the
``kubeconfig``. ``up`` removes what it created there when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pairvol.aio import bounded
from pairvol.errors import PairvolError

logger = logging.getLogger(__name__)

SOCKET = "control.sock"
STATE = "cluster.json"
NODE_ACTIONS = ("kill", "partition", "heal", "restart")
_MAX_LINE = 1 << 20


class ControlError(PairvolError):
    """The running local cluster could not be reached or refused the request."""


def default_state_dir() -> Path:
    env = os.environ.get("PAIRVOL_LOCALCLUSTER_DIR")
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / f"pairvol-localcluster-{os.getuid()}"


Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlServer:
    """Serves ``handler`` on ``<state_dir>/control.sock`` while entered."""

    def __init__(self, state_dir: Path, handler: Handler) -> None:
        self.state_dir = state_dir
        self.path = state_dir / SOCKET
        self._handler = handler
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> ControlServer:
        await asyncio.to_thread(self.state_dir.mkdir, parents=True, exist_ok=True, mode=0o700)
        if await _answers(self.path):
            raise ControlError(
                f"a local cluster is already running with state directory {self.state_dir}; stop it with "
                "`pairvol localcluster down` or start another with --state-dir DIR"
            )
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(self.path.unlink)  # left by a process that was killed
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=_MAX_LINE)
        finally:
            os.umask(old_umask)
        return self

    async def __aexit__(self, *exc: object) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await bounded(server.wait_closed(), 5)
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(self.path.unlink)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("not an object")
            except ValueError:
                answer: dict[str, Any] = {"ok": False, "error": "the request must be one JSON object on one line"}
            else:
                try:
                    answer = await self._handler(request)
                except PairvolError as exc:
                    answer = {"ok": False, "error": str(exc)}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _answers(path: Path) -> bool:
    try:
        _, writer = await bounded(asyncio.open_unix_connection(str(path)), 2)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return True


async def request(state_dir: Path, payload: dict[str, Any], *, timeout: float = 120) -> dict[str, Any]:
    """Send one request to the running ``up`` and return its answer (``ok`` true)."""
    path = state_dir / SOCKET
    try:
        reader, writer = await bounded(asyncio.open_unix_connection(str(path), limit=_MAX_LINE), 5)
    except (OSError, TimeoutError):
        raise ControlError(
            f"no local cluster is running with state directory {state_dir} (no answer on {path}); "
            "start one with `pairvol localcluster up`, or pass the --state-dir it was started with"
        ) from None
    try:
        writer.write(json.dumps(payload).encode() + b"\n")
        await writer.drain()
        line = await bounded(reader.readline(), timeout)
    except (OSError, TimeoutError) as exc:
        raise ControlError(f"the local cluster did not answer {payload.get('op')!r}: {exc or 'timed out'}") from exc
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    try:
        answer = json.loads(line)
    except ValueError:
        raise ControlError(f"the local cluster sent an unreadable answer: {line[:200]!r}") from None
    if not isinstance(answer, dict) or not answer.get("ok"):
        raise ControlError(str((answer or {}).get("error") or "the request failed"))
    return answer


async def write_state(state_dir: Path, state: dict[str, Any]) -> Path:
    path = state_dir / STATE

    def write() -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(path)

    await asyncio.to_thread(write)
    return path
