"""Prometheus metrics of the operator (``pairvol_operator_`` prefix, base units).

One registry per process, served by the operator's own small aiohttp endpoint (see
handlers.py). Volumes-per-phase is a gauge computed from the last phase each volume's
reconciler reported, so a deleted volume disappears from the counts.

Label values that the agents' metrics also carry are spelt as the agents spell them: a
failover's ``mode`` is ``checkpoint`` or ``latest`` (the agent API's words, lower case),
not the spec's ``Checkpoint``/``Latest``, so one query or alert matches both
(docs/alerts.md).
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pairvol.api.status import Phase

# the values of the ``mode`` label, as pairvol_failovers_total of the agents has them
MODE_LABELS = ("checkpoint", "latest")
FAILOVER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.reconciles = Counter(
            "pairvol_operator_reconciles", "Reconcile ticks, by result (ok, error)", ["result"], registry=r
        )
        self.actions = Counter(
            "pairvol_operator_actions", "Actions executed, by kind and result", ["action", "result"], registry=r
        )
        self.failovers = Counter(
            "pairvol_operator_failovers", "Completed failovers, by mode and trigger", ["mode", "trigger"], registry=r
        )
        self.failover_duration = Histogram(
            "pairvol_operator_failover_duration_seconds",
            "From the failover decision to the new primary serving",
            ["mode"],
            buckets=FAILOVER_BUCKETS,
            registry=r,
        )
        self.restarts_in_place = Counter(
            "pairvol_operator_primary_restarts",
            "Primaries asked to serve again in place (no failover), by trigger: lease-lost (it lost only"
            " its Lease, docs/correctness.md H10) or no-failover (no replica could be promoted, H9)",
            ["trigger"],
            registry=r,
        )
        self.checkpoints = Counter(
            "pairvol_operator_checkpoints", "Checkpoints the operator requested", ["result"], registry=r
        )
        self.status_writes = Counter("pairvol_operator_status_writes", "Status patches written (coalesced)", registry=r)
        self.volumes = Gauge("pairvol_operator_volumes", "ReplicatedVolumes per phase", ["phase"], registry=r)
        self.last_checkpoint = Gauge(
            "pairvol_operator_last_checkpoint_timestamp_seconds",
            "Unix time of the volume's last checkpoint as recorded in its status",
            ["namespace", "volume"],
            registry=r,
        )
        self.checkpoint_interval = Gauge(
            "pairvol_volume_checkpoint_interval_seconds",
            "The volume's spec.checkpoint.intervalSeconds (0: checkpoints only on request): what"
            " PairvolCheckpointStale measures a checkpoint's age against",
            ["namespace", "volume"],
            registry=r,
        )
        self.volume_phase = Gauge(
            "pairvol_volume_phase",
            "1 for the volume's current phase (status.phase), 0 for the others: the operator's view, which"
            " also sees what no agent reports (an idle primary whose secondary's node died)",
            ["namespace", "volume", "phase"],
            registry=r,
        )
        self._phases: dict[str, str] = {}
        for phase in Phase:
            self.volumes.labels(phase.value).set(0)
        # every series exists from the start, so increase() sees the first failover
        for mode in MODE_LABELS:
            self.failover_duration.labels(mode)
            for trigger in ("automatic", "manual"):
                self.failovers.labels(mode, trigger)
        for trigger in ("lease-lost", "no-failover"):
            self.restarts_in_place.labels(trigger)

    def failover_done(self, mode: str, trigger: str, duration_s: float) -> None:
        """One completed failover; ``mode`` as the spec spells it (``Checkpoint``) or the agent."""
        label = mode.lower()
        self.failovers.labels(label, trigger).inc()
        self.failover_duration.labels(label).observe(duration_s)

    def set_checkpoint(self, namespace: str, volume: str, timestamp: float | None) -> None:
        _set_or_remove(self.last_checkpoint, (namespace, volume), timestamp)

    def set_checkpoint_interval(self, namespace: str, volume: str, seconds: int | None) -> None:
        _set_or_remove(self.checkpoint_interval, (namespace, volume), seconds)

    def set_phase(self, key: str, phase: str | None) -> None:
        """``key``: "namespace/name"; None when the volume is gone (or no longer ours).

        Called for every plan of every volume: a phase already exported costs a lookup."""
        if phase is not None and self._phases.get(key) == phase:
            return  # only set_phase(key, None) removes the series, and it forgets the key
        namespace, _, volume = key.partition("/")
        if phase is None:
            self._phases.pop(key, None)
        else:
            self._phases[key] = phase
        for p in Phase:
            self.volumes.labels(p.value).set(sum(1 for v in self._phases.values() if v == p.value))
            if phase is None:
                with contextlib.suppress(KeyError):
                    self.volume_phase.remove(namespace, volume, p.value)
            else:
                self.volume_phase.labels(namespace, volume, p.value).set(1 if p.value == phase else 0)


def _set_or_remove(gauge: Gauge, labels: tuple[str, ...], value: float | None) -> None:
    """A per-volume series: set, or (None) removed, so that nothing exports a stale value."""
    if value is None:
        with contextlib.suppress(KeyError):
            gauge.remove(*labels)
    else:
        gauge.labels(*labels).set(value)


METRIC_NAMES: frozenset[str] = frozenset(
    {
        "pairvol_operator_reconciles_total",
        "pairvol_operator_actions_total",
        "pairvol_operator_failovers_total",
        "pairvol_operator_failover_duration_seconds_bucket",
        "pairvol_operator_failover_duration_seconds_sum",
        "pairvol_operator_failover_duration_seconds_count",
        "pairvol_operator_primary_restarts_total",
        "pairvol_operator_checkpoints_total",
        "pairvol_operator_status_writes_total",
        "pairvol_operator_last_checkpoint_timestamp_seconds",
        "pairvol_operator_volumes",
        "pairvol_volume_phase",
        "pairvol_volume_checkpoint_interval_seconds",
    }
)
