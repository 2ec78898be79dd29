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

Reaching an armed point sends SIGKILL to the agent itself (its qemu-storage-daemon follows
through PR_SET_PDEATHSIG), which is what a node losing power or the OOM killer does. The
point's name is written to stderr first, so a test can tell a crash point from a bug.
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


def _armed() -> dict[str, int]:
    armed: dict[str, int] = {}
    for item in os.environ.get(ENV, "").split(","):
        item = item.strip()
        if not item:
            continue
        name, _, nth = item.partition(":")
        armed[name] = int(nth) if nth.isdigit() and int(nth) > 0 else 1
    return armed


def hit(cp: CrashPoint) -> None:
    """Die here if the environment armed this point (and this is the armed occurrence)."""
    nth = _armed().get(cp.name)
    if nth is None:
        return
    _hits[cp.name] = _hits.get(cp.name, 0) + 1
    if _hits[cp.name] == nth:
        sys.stderr.write(f"pairvol: crash point {cp.name} reached (occurrence {nth}): SIGKILL\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def describe() -> str:
    return "\n".join(f"{p.name}\t{p.doc}" for p in sorted(POINTS.values(), key=lambda p: p.name))
