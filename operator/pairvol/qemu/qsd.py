"""One qemu-storage-daemon process and the one QMP connection to it.

The agent never talks QMP anywhere else. The daemon is started with nothing but a QMP
monitor; every node, job and export is created at run time over QMP so that the agent's
state machine, not a command line, decides the block graph. The one exception is a TCP
listening socket the agent created itself: qsd cannot take a descriptor over QMP, so it
is inherited and named on the command line (:mod:`pairvol.qemu.listen`). The daemon gets
PR_SET_PDEATHSIG: if the agent is killed, its daemon dies with it and stops serving
(a primary whose agent is gone must not keep a writable export alive).

The daemon's C library is told to serve request buffers from a heap it keeps (``MALLOC_TUNING``,
glibc tunables in its environment): QEMU allocates a buffer per NBD request and frees it
at the reply, and with glibc's defaults a 1 MiB buffer is a fresh ``mmap`` each time (or
heap the allocator trims right back), so every megabyte written was paid again in page
faults and zeroed pages, in every daemon it passed (issue 11: a quarter of the CPU of a
sequential write on the replication link, measured with ``perf``). Environment, not
a command-line option: it works for any QEMU version and is ignored by a C library
that does not know it.

The monitor's socket is created with ``wait=on``: the daemon accepts the agent's first
connection while it reads its command line, before the monitor exists. With ``wait=off``
a connection made early (the agent connects as soon as the socket file appears) is
accepted by the daemon's main loop while the monitor's I/O thread is still installing its
handlers; both threads then announce the connection, and QEMU 7.2 sent the greeting twice
(reproduced: about 1 start in 600 under CPU load). qemu.qmp reads the second greeting as the
reply to ``qmp_capabilities`` and fails the negotiation; a later connection to such a daemon
was seen to be closed at once (the agent died at start-up in CI). The connect loop below
still retries with a fresh client, whatever a failed attempt raised.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient
from qemu.qmp.error import QMPError
from qemu.qmp.message import Message
from qemu.qmp.qmp_client import ExecuteError

from pairvol.aio import bounded, cancel_and_wait, signal_child
from pairvol.qemu import QemuError, QsdDied
from pairvol.qemu.img import require_binary

log = logging.getLogger(__name__)

_BARRIER = "PAIRVOL_EVENT_BARRIER"  # never sent by QEMU

EventHandler = Callable[[dict[str, Any]], Awaitable[None]]
_PR_SET_PDEATHSIG = 1

# Requests up to 4 MiB come from the heap, and up to 16 MiB of freed heap stay with the
# daemon for the next ones (what a queue of large writes keeps in flight), instead of
# glibc's dynamic threshold and a trim at twice it. The price: a daemon that carried large
# writes keeps 13-49 MiB resident afterwards instead of 9 (measured, 1 MiB writes; 8 and
# 32 MiB of trim threshold made no difference to it, nor to the CPU saved).
MALLOC_TUNING = "glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=16777216"


def daemon_env(base: dict[str, str], tuned_malloc: bool = True) -> dict[str, str]:
    """The daemon's environment: ``base`` with MALLOC_TUNING in front of any tunables
    already set (glibc applies them in order, so an operator's own setting wins)."""
    env = dict(base)
    if tuned_malloc:
        given = env.get("GLIBC_TUNABLES")
        env["GLIBC_TUNABLES"] = f"{MALLOC_TUNING}:{given}" if given else MALLOC_TUNING
    return env


def monitor_args(qmp_path: Path) -> list[str]:
    """The daemon's QMP monitor on the unix socket ``qmp_path``; ``wait=on``: see the
    module docstring."""
    # QEMU's option syntax: a comma in a value is written twice
    path = str(qmp_path).replace(",", ",,")
    return ["--chardev", f"socket,id=qmp0,path={path},server=on,wait=on", "--monitor", "chardev=qmp0"]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Qsd:
    """A supervised qemu-storage-daemon with its QMP client and event fan-out."""

    def __init__(self, run_dir: Path, log_path: Path, name: str = "qsd", tuned_malloc: bool = True) -> None:
        self.run_dir = run_dir
        self.log_path = log_path
        self.name = name
        self.tuned_malloc = tuned_malloc  # False: glibc's defaults (the benchmark's stock QEMU)
        self.qmp_path = run_dir / f"{name}-qmp.sock"
        self.pidfile = run_dir / f"{name}.pid"
        self.proc: asyncio.subprocess.Process | None = None
        self.qmp = QMPClient(name)
        self.dead = asyncio.Event()
        self.exit_error: str | None = None
        self._job_queues: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self._handlers: list[EventHandler] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._listener: EventListener | None = None
        self._barriers: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and not self.dead.is_set()

    def on_event(self, handler: EventHandler) -> None:
        self._handlers.append(handler)

    async def start(self, timeout: float = 10.0, args: Sequence[str] = (), pass_fds: Sequence[int] = ()) -> None:
        """Start the daemon and connect QMP. ``args`` go on its command line after the
        monitor; ``pass_fds`` are inherited under the same numbers (a listening socket the
        command line names, see :mod:`pairvol.qemu.listen`). The caller keeps its copies."""
        exe = require_binary("qemu-storage-daemon")
        await asyncio.to_thread(self._prepare_run_dir)
        logfile = await asyncio.to_thread(open, self.log_path, "ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                exe,
                *monitor_args(self.qmp_path),
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logfile,
                stderr=logfile,
                preexec_fn=_die_with_parent,
                start_new_session=True,
                pass_fds=tuple(pass_fds),
                env=daemon_env(dict(os.environ), self.tuned_malloc),
            )
        finally:
            logfile.close()
        await asyncio.to_thread(self.pidfile.write_text, f"{self.proc.pid}\n")
        self._tasks.append(asyncio.create_task(self._watch_exit(), name=f"{self.name}-exit"))
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if self.dead.is_set():
                raise QsdDied(f"qemu-storage-daemon exited during start-up: {self.exit_error}")
            if not await asyncio.to_thread(self.qmp_path.exists):  # not listening yet
                if asyncio.get_running_loop().time() > deadline:
                    await self.kill()
                    raise QemuError(f"qemu-storage-daemon did not create its QMP socket {self.qmp_path}")
                await asyncio.sleep(0.01)
                continue
            try:
                # bounded: a connection whose greeting never comes must not hold the agent
                # for ever (seen in CI: agent and daemon both asleep, nothing logged)
                left = deadline - asyncio.get_running_loop().time()
                await bounded(self.qmp.connect(str(self.qmp_path)), max(0.5, min(left, 3.0)))
                # a session the daemon ends right after the negotiation is no connection
                # yet: whether connect() saw that end is a race, a command's answer is not
                await bounded(self.qmp.execute("query-version"), max(0.5, min(left, 3.0)))
                break
            except Exception as exc:  # the library's own assertions too (a reply it did not expect)
                await self._drop_client()
                if asyncio.get_running_loop().time() > deadline:
                    await self.kill()
                    raise QemuError(f"cannot connect to QMP at {self.qmp_path}: {exc!r}") from exc
                log.debug("QMP connect to %s: %r; retrying", self.qmp_path, exc)
                # the pause ends early if the daemon exited: its status is the better error
                with contextlib.suppress(TimeoutError):
                    await bounded(self.dead.wait(), 0.05)
        listener = EventListener()
        self.qmp.register_listener(listener)
        for waiter in self._barriers:  # an earlier pump's, which will never answer them
            waiter.cancel()
        self._barriers.clear()
        self._listener = listener
        self._tasks.append(asyncio.create_task(self._pump_events(listener), name=f"{self.name}-events"))
        log.debug("qemu-storage-daemon %s started, pid %d", self.name, self.proc.pid)

    async def _drop_client(self) -> None:
        """Close the QMP client after a failed connect and start over with a new one: the
        failed one's state need not be consistent (qemu.qmp asserts on it)."""
        with contextlib.suppress(Exception):
            await bounded(self.qmp.disconnect(), 1.0)
        self.qmp = QMPClient(self.name)

    def _prepare_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _kill_stale(self.pidfile, str(self.qmp_path))
        with contextlib.suppress(FileNotFoundError):
            self.qmp_path.unlink()

    async def _watch_exit(self) -> None:
        assert self.proc is not None
        rc = await self.proc.wait()
        if not self._stopping:
            tail = await asyncio.to_thread(_tail, self.log_path)
            self.exit_error = f"qemu-storage-daemon exited with status {rc}" + (f": {tail}" if tail else "")
            log.error("%s", self.exit_error)
        else:
            self.exit_error = "qemu-storage-daemon stopped"
        self.dead.set()
        for queue in self._job_queues.values():
            queue.put_nowait({"event": "QSD_DIED", "data": {}})

    async def event_barrier(self) -> None:
        """Return once every event QEMU sent before the reply to the last command this
        process received has been through the handlers (qemu.qmp queues an event before it
        reads the messages that follow it, and the pump handles the queue in order). Also
        after the daemon died: what it sent before is still handled. The caller bounds the
        wait (a handler that hangs holds it)."""
        if self._listener is None:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._barriers.append(done)
        await self._listener.put(Message({"event": _BARRIER, "data": {}}))
        await done

    async def _pump_events(self, listener: EventListener) -> None:
        async for event in listener:
            msg: dict[str, Any] = dict(event)
            if msg.get("event") == _BARRIER:
                waiter = self._barriers.popleft()
                if not waiter.done():  # its caller may have given up waiting
                    waiter.set_result(None)
                continue
            data = msg.get("data", {})
            job = data.get("id") or data.get("device")
            if job is not None and msg["event"].startswith(("JOB_", "BLOCK_JOB_")):
                queue = self._job_queues.get(str(job))
                if queue is not None:
                    queue.put_nowait(msg)
            for handler in self._handlers:
                try:
                    await handler(msg)
                except Exception:  # a handler bug must not stop the pump
                    log.exception("event handler failed for %s", msg.get("event"))

    def watch_job(self, job_id: str) -> asyncio.Queue[dict[str, Any]]:
        """Start collecting a job's events; call before the command that creates the job."""
        queue = self._job_queues.get(job_id)
        if queue is None:
            queue = self._job_queues[job_id] = asyncio.Queue()
        return queue

    def unwatch_job(self, job_id: str) -> None:
        self._job_queues.pop(job_id, None)

    async def wait_job_event(self, job_id: str, events: set[str], timeout: float | None = None) -> dict[str, Any]:
        """Wait for one of ``events`` for ``job_id`` (after :meth:`watch_job`)."""
        queue = self._job_queues[job_id]
        async with asyncio.timeout(timeout):
            while True:
                msg = await queue.get()
                if msg["event"] == "QSD_DIED":
                    raise QsdDied(self.exit_error or "qemu-storage-daemon died")
                if msg["event"] in events:
                    return msg

    async def execute(self, command: str, args: dict[str, Any] | None = None) -> Any:
        if self.dead.is_set():
            raise QsdDied(self.exit_error or "qemu-storage-daemon is not running")
        try:
            return await self.qmp.execute(command, args)
        except ExecuteError as exc:
            raise QemuError(f"{command}: {exc.error.error.desc}") from exc
        except (QMPError, OSError, EOFError) as exc:
            raise QsdDied(f"{command}: lost QMP connection: {exc!r}") from exc

    async def stop(self, timeout: float = 5.0) -> bool:
        """Quit cleanly; kill the daemon if it does not exit in time. Returns whether it
        exited on its own with status 0 after ``quit``: only such an exit closed every
        node, which is when QEMU writes what it still held in memory (qcow2 L2 and
        refcount tables of images opened with ``cache.no-flush``, persistent bitmaps).
        Killed, died earlier or failed: the images may lack it (the caller decides what
        that costs)."""
        self._stopping = True
        if self.proc is None:
            return False
        exited = False
        if not self.dead.is_set():
            with contextlib.suppress(Exception):
                await bounded(self.qmp.execute("quit"), 2.0)
            try:
                await bounded(self.dead.wait(), timeout)
            except TimeoutError:
                log.warning("qemu-storage-daemon %s did not exit after quit: killing it", self.name)
                await self.kill()
            else:
                exited = self.proc.returncode == 0
        await self._teardown()
        return exited

    async def kill(self) -> None:
        self._stopping = True
        if self.proc is not None and self.proc.returncode is None:
            signal_child(self.proc, signal.SIGKILL)
            await self.proc.wait()
        await self._teardown()

    async def _teardown(self) -> None:
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        await cancel_and_wait(*self._tasks)
        self._tasks.clear()
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(self.pidfile.unlink)


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    # not an error: the daemon's note that it waits for the agent (wait=on)
    text = [line for line in text if "QEMU waiting for connection on:" not in line]
    return " | ".join(text[-lines:])


def _kill_stale(pidfile: Path, marker: str) -> None:
    """Kill a daemon left behind by a previous agent on the same data dir (by its PID
    file, and only if its command line names our own QMP socket)."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return
    if "qemu-storage-daemon" in cmdline and marker in cmdline:
        log.warning("killing stale qemu-storage-daemon pid %d of this data dir", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
