"""Whether this replica's data path is healthy: one verdict for /healthz, the pod's probes
and the primary's Lease.

A primary must not keep its Lease while it cannot serve: the operator fails over only once
the Lease has expired, so a primary whose qemu-storage-daemon died but whose agent kept
renewing would block failover for ever. So the agent renews only after a fresh verdict of
"healthy" (see :mod:`pairvol.kube.lease`), and the same verdict answers ``/healthz``, which
the pod's liveness and readiness probes read.

What is judged, and why only this:

* the daemon is alive — without it nothing is served or replicated;
* a replica that *intends* to serve the workload export (it started serving at this epoch
  and was not fenced since) really has it: the daemon is asked (``query-block-exports``)
  rather than trusting the intent; with ``--export-listen`` the relay daemon too;
* for such a replica, a daemon that does not answer within the check's time is not
  healthy, but not proven broken (``conclusive=False``): the Lease keeper tolerates a
  short stall, not a long one (renewing for a frozen daemon would block failover exactly
  like renewing for a dead one);
* a daemon that answers while a command holds the replica lock is changing the exports
  (starting the relay, attaching a peer): it is healthy as far as can be seen, with a note.
  That command's outcome is judged by the next check.

A replica that does not intend to serve (a secondary, a restored primary waiting for a new
epoch, a fenced primary, a promoted one whose serving was refused) is healthy as long as its
daemon lives, however slowly it answers: those states are deliberate and the operator acts
on them; killing the pod would only destroy the replica the operator may be about to use.

The verdict is a pure function of what was observed (:func:`judge`), so it is testable
without processes; :meth:`pairvol.agent.replica.Replica.health` does the observing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Health:
    """``ok``: healthy. ``reason``: why not (when ok: empty, or a note such as "a command
    is changing the exports"). ``may_serve``: something might still hand workload writes to
    this replica (the daemon or the relay with the export) — while it is True the Lease must
    not be released, only left to expire. ``conclusive``: False when no verdict could be
    reached because the daemon did not answer in time: not healthy, but not proven broken
    either (see pairvol.kube.lease for what the Lease keeper makes of it)."""

    ok: bool
    reason: str = ""
    may_serve: bool = False
    conclusive: bool = True


@dataclass(frozen=True)
class Observed:
    """One look at the data path. ``exports``/``relay_exports``: the export ids the daemon
    (relay) listed, ``None`` if it was not asked or did not answer."""

    qsd_alive: bool
    qsd_error: str | None
    serving: bool  # intent: the workload export was started at this epoch and not fenced since
    exports: frozenset[str] | None
    relay_wanted: bool  # --export-listen: serving means the relay serves too
    relay_alive: bool
    relay_exports: frozenset[str] | None
    timed_out: str | None = None  # which daemon did not answer in time


def judge(seen: Observed, workload_export: str) -> Health:
    if not seen.qsd_alive:
        return Health(False, f"qemu-storage-daemon is not running: {seen.qsd_error or 'not started'}",
                      may_serve=seen.relay_alive)
    has_export = seen.exports is not None and workload_export in seen.exports
    # an export list the daemon did not give is unknown, so it may hold the workload export
    may_serve = has_export or seen.exports is None or seen.relay_alive
    if not seen.serving:
        # nothing to judge but the daemon's life (a slow answer is no reason to take a
        # secondary out of service); what was seen only feeds may_serve
        return Health(True, may_serve=may_serve)
    if seen.timed_out is not None:
        return Health(False, f"{seen.timed_out} did not answer query-block-exports in time (frozen or stuck)",
                      may_serve=True, conclusive=False)
    relay_serves = seen.relay_alive and (seen.relay_exports is None or workload_export in seen.relay_exports)
    if not has_export:
        return Health(False, f"the workload export {workload_export!r} is gone from qemu-storage-daemon",
                      may_serve=may_serve)
    if seen.relay_wanted and not seen.relay_alive:
        return Health(False, "the relay daemon of --export-listen is not running", may_serve=may_serve)
    if seen.relay_wanted and not relay_serves:
        return Health(False, f"the relay daemon no longer exports {workload_export!r}", may_serve=may_serve)
    return Health(True, may_serve=may_serve)
