"""Prometheus metrics of one agent (one replica of one volume).

Names follow Prometheus conventions: ``pairvol_`` prefix, base units (seconds, bytes),
``_total`` for counters. Every metric carries the ``volume`` label so that one scrape
config covers all agents. The chart's PrometheusRule refers to these names; a test checks
that every name the rules use is defined here.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pairvol.agent.stages import FAILOVER_TRIGGERS

ROLES = ("none", "primary", "secondary")
STAGES = ("none", "running", "failover", "failover_failed", "done")
REPLICATION_STATES = ("none", "replicating", "syncing", "degraded")
# pairvol_failovers_total{result}: "failed" (the overlays were neither committed nor
# discarded: stage failover_failed, the replica never served) pages; "not_serving" (promoted
# but the export not served yet, e.g. no Lease: the operator asks again) does not.
FAILOVER_RESULTS = ("succeeded", "failed", "not_serving")
# pairvol_failovers_total{trigger}: stages.FAILOVER_TRIGGERS

CHECKPOINT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
FAILOVER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class AgentMetrics:
    """All metrics of one agent, in a registry of its own (tests run several agents)."""

    def __init__(self, volume: str) -> None:
        self.volume = volume
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        labels = ["volume"]
        self.up = Gauge("pairvol_agent_qsd_up", "1 while the agent's qemu-storage-daemon is alive", labels, registry=r)
        self.role = Gauge("pairvol_agent_role", "1 for the replica's current role", [*labels, "role"], registry=r)
        self.stage = Gauge(
            "pairvol_agent_stage",
            "1 for the current replication stage (replication.c stages)",
            [*labels, "stage"],
            registry=r,
        )
        self.epoch = Gauge("pairvol_agent_epoch", "Current fencing epoch", labels, registry=r)
        self.replication_state = Gauge(
            "pairvol_replication_state", "1 for the current replication state", [*labels, "state"], registry=r
        )
        self.out_of_sync = Gauge(
            "pairvol_replication_out_of_sync",
            "1 when the peer missed acknowledged writes and needs a resync",
            labels,
            registry=r,
        )
        self.peer_sent_bytes = Counter(
            "pairvol_replication_sent_bytes", "Bytes sent to the peer over the replication link", labels, registry=r
        )
        self.peer_failures = Counter(
            "pairvol_replication_peer_failures",
            "Times the peer was dropped (dead, partitioned, stalled)",
            labels,
            registry=r,
        )
        self.checkpoint_duration = Histogram(
            "pairvol_checkpoint_duration_seconds",
            "Time to cut one checkpoint",
            labels,
            buckets=CHECKPOINT_BUCKETS,
            registry=r,
        )
        self.checkpoint_cut = Histogram(
            "pairvol_checkpoint_cut_seconds",
            "Time of the QMP transaction that is the cut (the only part that drains I/O)",
            labels,
            buckets=CHECKPOINT_BUCKETS,
            registry=r,
        )
        self.checkpoint_last_timestamp = Gauge(
            "pairvol_checkpoint_last_timestamp_seconds", "Unix time of the last checkpoint", labels, registry=r
        )
        self.checkpoint_id = Gauge("pairvol_checkpoint_id", "Id of the last checkpoint", labels, registry=r)
        self.cow_bytes = Counter(
            "pairvol_cow_copied_bytes", "Bytes copied into the hidden disk by copy-before-write", labels, registry=r
        )
        self.failovers = Counter(
            "pairvol_failovers",
            "Failovers performed by this replica, by result: succeeded, failed (overlays neither committed nor"
            " discarded), not_serving (promoted, the workload export not served yet); and by trigger: automatic,"
            " manual, unspecified (as the caller said)",
            [*labels, "mode", "result", "trigger"],
            registry=r,
        )
        # the alerts' clock: a counter's new series (a Prometheus that lost its history, a
        # target unscraped for minutes) cannot tell an old failover from a new one
        self.failover_last = Gauge(
            "pairvol_failover_last_timestamp_seconds",
            "Unix time this replica's last failover with this result and trigger ended (0: none since the agent"
            " started)",
            [*labels, "result", "trigger"],
            registry=r,
        )
        self.failover_duration = Histogram(
            "pairvol_failover_duration_seconds",
            "Time from the failover call to the export accepting writes",
            [*labels, "mode"],
            buckets=FAILOVER_BUCKETS,
            registry=r,
        )
        self.sync_total_bytes = Gauge(
            "pairvol_sync_total_bytes", "Bytes the running sync (full or bitmap resync) has to copy", labels, registry=r
        )
        self.sync_done_bytes = Gauge(
            "pairvol_sync_done_bytes", "Bytes the running sync (full or bitmap resync) has copied", labels, registry=r
        )
        self.sync_compared_bytes = Gauge(
            "pairvol_sync_compared_bytes",
            "Bytes of the volume the running checksum resync has compared on both sides (it copies only after)",
            labels,
            registry=r,
        )
        self.sync_progress = Gauge(
            "pairvol_sync_progress_ratio", "Progress of the running sync or resync, 0..1", labels, registry=r
        )
        # resyncs of any kind (full, bitmap, checksum, ...): the kind label is whatever the
        # agent chose, so a new kind needs no change here
        self.resync_remaining = Gauge(
            "pairvol_resync_remaining_bytes",
            "Bytes the running resync (any kind) has still to copy; 0 when none runs",
            labels,
            registry=r,
        )
        self.resyncs = Counter(
            "pairvol_resyncs", "Resyncs of the peer that ended, by kind and result", [*labels, "kind", "result"],
            registry=r,
        )
        self.resync_last_duration = Gauge(
            "pairvol_resync_last_duration_seconds", "Duration of the last resync that ended in sync", labels,
            registry=r,
        )
        self.resync_last_bytes = Gauge(
            "pairvol_resync_last_copied_bytes", "Bytes the last resync that ended in sync copied", labels, registry=r
        )
        self.resync_attempts = Counter(
            "pairvol_resync_automatic_attempts",
            "Automatic re-protections of a dropped peer: started (a resync runs) or failed (none could start)",
            [*labels, "result"],
            registry=r,
        )
        self.resync_gave_up = Gauge(
            "pairvol_resync_automatic_gave_up",
            "1 when the primary stopped re-protecting a peer that kept failing (until a new pairing)",
            labels,
            registry=r,
        )
        self.size = Gauge("pairvol_volume_size_bytes", "Size of the volume", labels, registry=r)

        # every series exists from the start, so increase() sees the first failover
        for mode in ("checkpoint", "latest"):
            self.failover_duration.labels(volume, mode)
            for result in FAILOVER_RESULTS:
                for trigger in FAILOVER_TRIGGERS:
                    self.failovers.labels(volume, mode, result, trigger)
        for result in FAILOVER_RESULTS:
            for trigger in FAILOVER_TRIGGERS:
                self.failover_last.labels(volume, result, trigger)
        self.peer_failures.labels(volume)
        for kind in ("full", "bitmap", "checksum"):
            for result in ("succeeded", "failed"):
                self.resyncs.labels(volume, kind, result)
        for result in ("started", "failed"):
            self.resync_attempts.labels(volume, result)
        self.resync_gave_up.labels(volume)
        self.resync_last_duration.labels(volume)
        self.sync_compared_bytes.labels(volume)
        self.resync_last_bytes.labels(volume)
        self.cow_bytes.labels(volume)
        self.peer_sent_bytes.labels(volume)

    def set_one_of(self, gauge: Gauge, choices: tuple[str, ...], current: str) -> None:
        for choice in choices:
            gauge.labels(self.volume, choice).set(1 if choice == current else 0)

    def failover_ended(self, mode: str, result: str, trigger: str) -> None:
        """Count a failover and stamp when it ended (one of FAILOVER_RESULTS, FAILOVER_TRIGGERS)."""
        self.failovers.labels(self.volume, mode, result, trigger).inc()
        self.failover_last.labels(self.volume, result, trigger).set_to_current_time()

    def observe_state(self, role: str, stage: str, epoch: int, replication: str, out_of_sync: bool) -> None:
        self.set_one_of(self.role, ROLES, role)
        self.set_one_of(self.stage, STAGES, stage)
        self.set_one_of(self.replication_state, REPLICATION_STATES, replication)
        self.epoch.labels(self.volume).set(epoch)
        self.out_of_sync.labels(self.volume).set(1 if out_of_sync else 0)


# The names a PrometheusRule may refer to (histograms expose _bucket/_sum/_count,
# counters _total). Kept in one place for the chart's consistency test.
METRIC_NAMES: frozenset[str] = frozenset(
    {
        "pairvol_agent_qsd_up",
        "pairvol_agent_role",
        "pairvol_agent_stage",
        "pairvol_agent_epoch",
        "pairvol_replication_state",
        "pairvol_replication_out_of_sync",
        "pairvol_replication_sent_bytes_total",
        "pairvol_replication_peer_failures_total",
        "pairvol_checkpoint_duration_seconds_bucket",
        "pairvol_checkpoint_duration_seconds_sum",
        "pairvol_checkpoint_duration_seconds_count",
        "pairvol_checkpoint_cut_seconds_bucket",
        "pairvol_checkpoint_cut_seconds_sum",
        "pairvol_checkpoint_cut_seconds_count",
        "pairvol_checkpoint_last_timestamp_seconds",
        "pairvol_checkpoint_id",
        "pairvol_cow_copied_bytes_total",
        "pairvol_failovers_total",
        "pairvol_failover_last_timestamp_seconds",
        "pairvol_failover_duration_seconds_bucket",
        "pairvol_failover_duration_seconds_sum",
        "pairvol_failover_duration_seconds_count",
        "pairvol_sync_total_bytes",
        "pairvol_sync_done_bytes",
        "pairvol_sync_compared_bytes",
        "pairvol_sync_progress_ratio",
        "pairvol_volume_size_bytes",
        "pairvol_resync_remaining_bytes",
        "pairvol_resyncs_total",
        "pairvol_resync_last_duration_seconds",
        "pairvol_resync_last_copied_bytes",
        "pairvol_resync_automatic_attempts_total",
        "pairvol_resync_automatic_gave_up",
    }
)
