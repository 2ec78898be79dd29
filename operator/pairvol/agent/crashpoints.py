"""Named crash points: where a fault injector may kill the agent in the middle of a step.

A multi-step operation (full sync, checkpoint, retire, failover commit, restore,
re-protection) is only as safe as its worst intermediate state, so every step boundary that
matters is a named point. A module declares its points once at import::

    AFTER_CUT = crashpoints.point("checkpoint.after-cut", "the new generation is in force, not yet saved")
    ...
    crashpoints.hit(AFTER_CUT)

and ``hit`` does nothing unless the environment arms the point:

    PAIRVOL_CRASH_AT="checkpoint.after-cut"       first time the point is reached
    PAIRVOL_CRASH_AT="checkpoint.after-cut:3"     the third time
    PAIRVOL_CRASH_AT="a:2,b"                      several points
    PAIRVOL_CRASH_AT="checkpoint.after-cut:1:stop"  freeze there instead (SIGSTOP)

Reaching an armed point sends SIGKILL to the agent itself (its qemu-storage-daemon follows
through PR_SET_PDEATHSIG), which is what a node losing power or the OOM killer does. The
point's name is written to stderr first, so a test can tell a crash point from a bug.

``stop`` freezes the agent there with SIGSTOP instead (its daemons keep running): a test
then breaks something else at a known step of the operation — kills the peer while nothing
of this agent is in flight — and lets it go on with SIGCONT. Without it, "kill the peer
during the copy" lands wherever the scheduler puts it.
``pairvol agent --list-crash-points`` prints every declared point.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass

ENV = "PAIRVOL_CRASH_AT"


@dataclass(frozen=True)
class CrashPoint:
    name: str
    doc: str
    module: str = ""  # the declaring module (the agent's fault injector takes the agent's only)


POINTS: dict[str, CrashPoint] = {}
_hits: dict[str, int] = {}


def point(name: str, doc: str) -> CrashPoint:
    """Declare a crash point (at import time, once per name)."""
    if name in POINTS and POINTS[name].doc != doc:
        raise ValueError(f"crash point {name!r} is declared twice")
    POINTS[name] = CrashPoint(name, doc, str(sys._getframe(1).f_globals.get("__name__", "")))
    return POINTS[name]


KILL = "kill"
STOP = "stop"
_SIGNALS = {KILL: signal.SIGKILL, STOP: signal.SIGSTOP}


def _armed() -> dict[str, tuple[int, str]]:
    """``{point: (occurrence, action)}`` from the environment."""
    armed: dict[str, tuple[int, str]] = {}
    for item in os.environ.get(ENV, "").split(","):
        item = item.strip()
        if not item:
            continue
        name, _, rest = item.partition(":")
        nth, _, action = rest.partition(":")
        armed[name] = (int(nth) if nth.isdigit() and int(nth) > 0 else 1, action if action in _SIGNALS else KILL)
    return armed


def hit(cp: CrashPoint) -> None:
    """Die (or freeze) here if the environment armed this point (and this is the armed occurrence)."""
    armed = _armed().get(cp.name)
    if armed is None:
        return
    nth, action = armed
    _hits[cp.name] = _hits.get(cp.name, 0) + 1
    if _hits[cp.name] == nth:
        sig = _SIGNALS[action]
        sys.stderr.write(f"pairvol: crash point {cp.name} reached (occurrence {nth}): {sig.name}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), sig)


def describe() -> str:
    return "\n".join(f"{p.name}\t{p.doc}" for p in sorted(POINTS.values(), key=lambda p: p.name))
