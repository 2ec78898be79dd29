"""The mutations ``make mutate`` runs: one deliberate bug per guard line, and the smallest
test selection that must catch it.

Each entry: an id (``<module>.<guard>``), the file, an exact snippet that must occur once
(context lines included when the guarded line alone is not unique), its replacement, the
tests, and what the guard protects. See docs/testing.md for how to add one.

Entries on code that is being restructured (the primary's peer handling and the secondary's
checkpoint/restore paths in agent/replica.py) are expected to go STALE when that work lands:
update the snippet to the new code, keep the intent.
"""

from __future__ import annotations

from tests.mutation.harness import Mutation

STAGES = "operator/pairvol/agent/stages.py"
STATE = "operator/pairvol/agent/state.py"
REPLICA = "operator/pairvol/agent/replica.py"
LEASE = "operator/pairvol/agent/lease.py"
KUBE_LEASE = "operator/pairvol/kube/lease.py"
DECISIONS = "operator/pairvol/operator/decisions.py"
SPEC = "operator/pairvol/api/spec.py"
GATE = "operator/pairvol/agent/gate.py"
RESYNC = "operator/pairvol/agent/resync.py"
CHECKSUM = "operator/pairvol/agent/checksum.py"
PEERLINK = "operator/pairvol/agent/peerlink.py"
RECIPES = "operator/pairvol/qemu/recipes.py"
SECONDARY = "operator/pairvol/agent/secondary.py"
T_LINK = "tests/integration/test_link_faults.py"
T_LOCAL_DISK = ("tests/integration/test_local_disk_failure.py",)
T_GATE = "tests/integration/test_gate.py"

T_STAGES = ("tests/unit/test_agent_logic.py::TestStages",)
T_STATE = ("tests/unit/test_agent_logic.py::TestPersistence",)
T_DECISIONS = ("tests/unit/test_operator_decisions.py",)
T_RESTART_IN_PLACE = ("tests/unit/test_operator_restart_in_place.py",)


def lease_tests(*names: str) -> tuple[str, ...]:
    """Each Lease test takes seconds (real API server, real expiry): select them by name."""
    return tuple(f"tests/unit/test_operator_lease.py::{n}" for n in names)

T_SPEC = ("tests/unit/test_api_spec.py",)
T_RESTART = "tests/integration/test_restart_guards.py"
T_CHAIN = "tests/integration/test_secondary_chain.py"
T_RESYNC = "tests/integration/test_bitmap_resync.py"
T_CHECKSUM = "tests/integration/test_checksum_resync.py"
T_AUTO = "tests/integration/test_auto_resync.py"
T_UNION = "tests/integration/test_union_resync.py"
T_UNION_SEQUENCES = "tests/integration/test_union_resync_sequences.py"
T_RESYNC_UNIT = ("tests/unit/test_agent_resync.py",)

MUTATIONS: tuple[Mutation, ...] = (
    # ------------------------------------------------------------------ the replication link (I1, I2)
    Mutation(
        "peerlink.peer-failure-counter", PEERLINK,
        "        self.metrics.peer_failures.labels(self.cfg.name).inc()\n",
        "        pass\n",
        ("tests/integration/test_peer_failures.py::test_dead_secondary_stalls_writes_at_most_the_peer_timeout",),
        "every peer loss is counted",
    ),
    Mutation(
        "peerlink.release-only-after-the-mark", PEERLINK,
        "        crashpoints.hit(LINK_FAILED)\n",
        "        crashpoints.hit(LINK_FAILED)\n        self.gate.release()\n",
        (f"{T_LINK}::test_a_mark_that_cannot_be_recorded_holds_writes_until_it_is",
         f"{T_LINK}::test_a_write_the_secondary_refuses_is_acknowledged_only_after_the_mark_is_durable"),
        "no write is acknowledged without the peer before the mark is durable",
    ),
    Mutation(
        "gate.error-reply-is-not-forwarded", GATE,
        "            if error:\n                if req.cmd == nbd.CMD_FLUSH:",
        "            if False:\n                if req.cmd == nbd.CMD_FLUSH:",
        (f"{T_GATE}::test_an_error_reply_fails_the_gate_and_is_not_forwarded",
         f"{T_LINK}::test_a_write_the_secondary_refuses_is_acknowledged_only_after_the_mark_is_durable"),
        "an error reply from the peer closes the gate instead of reaching the quorum",
    ),
    Mutation(
        "gate.stall-detected", GATE,
        "            if age > self.stall_after:\n",
        "            if False:\n",
        (f"{T_GATE}::test_an_unanswered_request_fails_the_gate_after_the_stall_timeout",),
        "a request the peer does not answer fails the link within the stall timeout",
    ),
    Mutation(
        "gate.reads-refused-while-syncing", GATE,
        "            local = gate.released or (cmd == nbd.CMD_READ and not gate.serve_reads)\n",
        "            local = gate.released\n",
        (f"{T_GATE}::test_reads_are_refused_while_the_peer_is_incomplete",),
        "a peer that is being synced never serves a read",
    ),
    Mutation(
        "recipes.export-named-after-the-epoch", RECIPES,
        '    return f"{REPLICATION_EXPORT}-e{epoch}"\n',
        "    return REPLICATION_EXPORT\n",
        (f"{T_LINK}::test_a_frozen_old_primary_resumed_after_its_peer_address_was_reused_writes_nothing_there",
         "tests/unit/test_agent_logic.py::TestRecipes"),
        "an old primary's link cannot reach a newer incarnation at the same address",
    ),
    Mutation(
        "recipes.link-never-reconnects", RECIPES,
        '        "server": {"type": "inet", "host": host, "port": str(port)},\n        "export": export,\n'
        '        "reconnect-delay": 0,\n',
        '        "server": {"type": "inet", "host": host, "port": str(port)},\n        "export": export,\n'
        '        "reconnect-delay": 5,\n',
        ("tests/unit/test_agent_logic.py::TestRecipes",
         f"{T_LINK}::test_a_frozen_old_primary_resumed_after_its_peer_address_was_reused_writes_nothing_there"),
        "nothing is re-sent over a reconnected link",
    ),
    # ------------------------------------------------------------------ bitmap resync (R1-R3)
    Mutation(
        "peerlink.bitmap-before-release", PEERLINK,
        "        await self._track(reason, self.gate.flush_failed)\n",
        "        asyncio.get_running_loop().call_later(\n"
        "            0.2, lambda: asyncio.ensure_future(self._track(reason, self.gate.flush_failed))\n"
        "        )\n",
        (f"{T_RESYNC}::test_writes_in_flight_when_the_peer_dies_are_tracked",),
        "the dirty bitmap exists before a held write is completed without the peer",
    ),
    Mutation(
        "replica.bitmap-before-planned-detach", REPLICA,
        "        await self._track_divergence(reason)\n        if mark:\n",
        "        if mark:\n",
        (f"{T_RESYNC}::test_a_peer_replaced_by_itself_under_writes_gets_a_bitmap_resync",),
        "a planned detach starts the dirty bitmap before the peer leaves the quorum",
    ),
    Mutation(
        "recipes.copy-serialised-above-the-quorum", RECIPES,
        # the bitmap and the copy job one level down, on the local disk: the job's filter then
        # orders the copy against the local write only, not against the quorum's write to the peer
        '    return {"node": QUORUM_NODE, "name": TRACK_BITMAP, "granularity": BITMAP_GRANULARITY}\n'
        '\n'
        '\n'
        'def backup_bitmap() -> QMPArgs:\n'
        '    """Bitmap resync: copy the tracked regions from the quorum to the peer. The job\'s\n'
        '    copy-before-write filter sits above the quorum, so a workload write to a region not\n'
        '    yet copied first waits for that region\'s copy (block-copy serialises them), and only\n'
        '    then reaches both children: the peer gets the old data before the new, never after.\n'
        '    ``never``: the job does not clear bits; they go only when the peer is declared in sync."""\n'
        '    return {\n'
        '        "job-id": SYNC_JOB,\n'
        '        "device": QUORUM_NODE,\n',
        '    return {"node": DISK_NODE, "name": TRACK_BITMAP, "granularity": BITMAP_GRANULARITY}\n'
        '\n'
        '\n'
        'def backup_bitmap() -> QMPArgs:\n'
        '    """Bitmap resync: copy the tracked regions from the quorum to the peer. The job\'s\n'
        '    copy-before-write filter sits above the quorum, so a workload write to a region not\n'
        '    yet copied first waits for that region\'s copy (block-copy serialises them), and only\n'
        '    then reaches both children: the peer gets the old data before the new, never after.\n'
        '    ``never``: the job does not clear bits; they go only when the peer is declared in sync."""\n'
        '    return {\n'
        '        "job-id": SYNC_JOB,\n'
        '        "device": DISK_NODE,\n',
        (f"{T_RESYNC}::test_a_bitmap_resync_under_concurrent_writers_leaves_no_old_data_on_the_peer",),
        "a region's copy is serialised against writes to it, so old data never lands on the peer after new",
    ),
    Mutation(
        "replica.bitmap-resync-only-onto-the-tracked-disk", REPLICA,
        "            if plan.peer_disk is not None\n            else r.replication_export_name(peer_epoch)",
        "            if False\n            else r.replication_export_name(peer_epoch)",
        (f"{T_RESYNC}::test_auto_copies_everything_onto_a_disk_that_is_not_the_tracked_one",),
        "the secondary refuses a bitmap resync onto a disk that is not the one the bitmap was taken against",
    ),
    Mutation(
        "replica.tracking-ends-only-in-sync", REPLICA,
        "            if st.peer_disk is None or st.tracking:\n",
        "            if st.peer_disk is None:\n",
        (f"{T_RESYNC}::test_a_secondary_killed_mid_resync_is_resynced_again_and_ends_identical",),
        "a resync that did not finish keeps the bitmap it was copying (a new one would lose its bits)",
    ),
    Mutation(
        "gate.only-the-copy-connection-answered-success", GATE,
        "        return 0 if self.copy and self.gate.released and cmd != nbd.CMD_READ else errno.EIO\n",
        "        return 0 if self.gate.released and cmd != nbd.CMD_READ else errno.EIO\n",
        (f"{T_GATE}::test_the_copy_connection_forwards_while_healthy_and_is_answered_success_after_release",),
        "the quorum's own connection never gets a success for a write the peer did not take",
    ),
    Mutation(
        "gate.copy-failure-does-not-fail-workload-writes", GATE,
        "        return 0 if self.copy and self.gate.released and cmd != nbd.CMD_READ else errno.EIO\n",
        "        return errno.EIO\n",
        (f"{T_RESYNC}::test_a_secondary_killed_mid_resync_is_resynced_again_and_ends_identical",),
        "a secondary dying mid-resync fails no workload write (QEMU 7.2's backup breaks the guest write otherwise)",
    ),
    # ------------------------------------------------------------------ checksum resync (R4)
    Mutation(
        "replica.checksum-records-only-a-complete-comparison", REPLICA,
        "        async with cs.PeerDigests(api, self.cfg.token, disk) as peer:\n",
        "        await self._save(peer_disk=disk, tracking=True, full_reason=None)\n"
        "        async with cs.PeerDigests(api, self.cfg.token, disk) as peer:\n",
        (f"{T_CHECKSUM}::test_a_secondary_killed_mid_comparison_is_compared_again_and_ends_identical",),
        "a comparison that did not finish leaves no record: the next resync compares again",
    ),
    Mutation(
        "replica.checksum-differing-regions-are-marked", REPLICA,
        "            ranges = cs.runs(found, self.cfg.size)\n",
        "            ranges = cs.runs([], self.cfg.size)\n",
        (f"{T_CHECKSUM}::test_the_old_primary_rejoining_gets_only_the_regions_that_differ",),
        "the regions whose digests differ are copied",
    ),
    Mutation(
        "resync.blank-disk-copied-in-full", RESYNC,
        "    if peer.written is not None and peer.written <= BLANK_LIMIT:\n",
        "    if False:\n",
        ("tests/unit/test_agent_checksum.py",),
        "a blank peer disk is copied in full, not compared",
    ),
    # ------------------------------------------------------------------ union resync (R6)
    Mutation(
        "union.attestation-leaves-the-state-at-start", REPLICA,
        "        self.state = self.state.evolve(stopped_in_sync=None, stop_note=None)\n",
        "        pass\n",
        (f"{T_UNION}::test_a_cleanly_stopped_primary_rejoining_gets_only_what_the_new_primary_wrote",),
        "a clean stop's attestation is cleared durably at the next start, before anything can write the disk",
    ),
    Mutation(
        "union.attestation-dropped-when-serving-as-primary", REPLICA,
        '            self._drop_attestation(f"it started as primary at epoch {epoch} since its clean stop")\n',
        "",
        (f"{T_UNION}::test_an_old_primary_that_served_again_after_its_clean_stop_is_compared",),
        "a disk that served as primary since its clean stop is not vouched for",
    ),
    Mutation(
        "union.attestation-handed-out-once", REPLICA,
        '            self._drop_attestation("it was already handed to a primary deciding a resync")\n',
        "",
        (f"{T_UNION}::test_the_attestation_is_handed_out_once",),
        "the attestation is consumed by the question that precedes a resync decision",
    ),
    Mutation(
        "union.attestation-dropped-at-relink", REPLICA,
        '            self._drop_attestation("a primary linked to it without asking for its clean stop first")\n',
        "",
        (f"{T_UNION}::test_a_primary_that_links_without_asking_ends_the_attestation",),
        "a primary that links without asking (a full copy) may write: the attestation ends there",
    ),
    Mutation(
        "union.attestation-dropped-at-failover", REPLICA,
        '            self._drop_attestation(f"it was promoted by a failover at epoch {epoch} since its clean stop")\n',
        "",
        (f"{T_UNION_SEQUENCES}::test_an_old_primary_promoted_by_a_failover_after_its_restart_vouches_for_nothing",),
        "a promoted disk is written as primary: the attestation ends at the failover",
    ),
    Mutation(
        "union.checkpoint-rollback-seeded", REPLICA,
        "                    if rolled_back:\n",
        "                    if False:\n",
        (f"{T_UNION}::test_a_checkpoint_mode_promotion_also_copies_the_regions_the_rollback_changed",),
        "the regions a Checkpoint-mode promotion rolled back are in the since-promotion bitmap",
    ),
    Mutation(
        "union.record-dropped-after-an-unclean-restart", REPLICA,
        "                changes.update(\n                    promoted_from=None,\n",
        "                changes.update(\n",
        (f"{T_UNION}::test_a_new_primary_restarted_uncleanly_has_no_record_and_compares",),
        "the since-promotion record does not outlive the daemon that held its bitmap",
    ),
    Mutation(
        "resync.attest-needs-a-link", RESYNC,
        "    if not view.linked:\n",
        "    if False:\n",
        T_RESYNC_UNIT,
        "a primary that stopped without its peer in the quorum attests nothing",
    ),
    Mutation(
        "resync.attest-needs-a-healthy-link", RESYNC,
        "    if view.gate_failed is not None:\n",
        "    if False:\n",
        T_RESYNC_UNIT,
        "a link whose gate failed (released by a fence, without a mark) attests nothing",
    ),
    Mutation(
        "resync.attest-needs-the-peer-in-sync", RESYNC,
        "    if view.syncing or view.marked or view.tracking or not view.replicating:\n",
        "    if False:\n",
        T_RESYNC_UNIT,
        "a peer being copied, marked or tracked is not attested as holding this disk",
    ),
    Mutation(
        "resync.attest-needs-a-healthy-local-disk", RESYNC,
        "    if view.local_failed is not None:\n",
        "    if False:\n",
        T_RESYNC_UNIT,
        "a local disk that failed a write the peer took does not equal the peer's",
    ),
    Mutation(
        "resync.attest-needs-the-recorded-identity", RESYNC,
        "    if view.link_disk is None or view.link_disk != view.recorded_disk or view.link_epoch is None:\n",
        "    if view.link_disk is None or view.link_epoch is None:\n",
        T_RESYNC_UNIT,
        "the attested disk is the one the primary recorded after a sync through its identity export",
    ),
    Mutation(
        "resync.union-needs-the-same-sync-point", RESYNC,
        "    if att != src:\n",
        "    if False:\n",
        T_RESYNC_UNIT,
        "the peer's clean stop and this primary's promotion name the same disk at the same epoch",
    ),
    Mutation(
        "resync.union-needs-the-bitmap", RESYNC,
        "    if not since.bitmap_present:\n",
        "    if False:\n",
        T_RESYNC_UNIT,
        "a since-promotion record whose bitmap is gone is not a union",
    ),
    Mutation(
        "checksum.data-after-a-hole-is-read", CHECKSUM,
        "        if data >= end:\n",
        "        if data > pos:\n",
        ("tests/unit/test_agent_checksum.py",),
        "data that follows a hole in a read chunk is hashed, not taken for zeros",
    ),
    Mutation(
        "checksum.holes-only-where-trusted", CHECKSUM,
        "            data = data_ranges(fd, pos, pos + want) if trusted else [(pos, pos + want)]\n",
        "            data = data_ranges(fd, pos, pos + want)\n",
        ("tests/unit/test_agent_checksum.py",),
        "on a file system whose holes are not trusted (FUSE, ZFS, ...) every region is read",
    ),
    Mutation(
        "checksum.no-seek-data-is-all-data", CHECKSUM,
        "                return [(start, end)]\n",
        "                return []\n",
        ("tests/unit/test_agent_checksum.py",),
        "a file system without SEEK_DATA is read whole, not taken for a hole",
    ),
    Mutation(
        "checksum.fragmented-rest-is-read", CHECKSUM,
        "            found.append((pos, end))\n            break\n",
        "            break\n",
        ("tests/unit/test_agent_checksum.py",),
        "past the ranges looked up, the rest of a read chunk is read, not taken for a hole",
    ),
    Mutation(
        "checksum.a-region-partly-data-is-hashed", CHECKSUM,
        "        if i < len(ranges) and ranges[i][0] < stop:\n",
        "        if i < len(ranges) and ranges[i][0] <= first and stop <= ranges[i][1]:\n",
        ("tests/unit/test_agent_checksum.py",),
        "a region with any data in it is hashed, not only one wholly data",
    ),
    # ------------------------------------------------------------------ agent/stages.py
    Mutation(
        "replica.larger-size-flag-is-a-grow-to-come", REPLICA,
        "        else:\n            log.warning(\n",
        "        else:\n            raise ReplicaError(f\"--size {wanted} is larger than the volume's {held} bytes\")\n"
        "            log.warning(\n",
        ("tests/integration/test_grow_pending.py",),
        "a replica whose new pod says the expanded size starts at its own size (E1, E5): it is not down for good",
    ),
    Mutation(
        "stages.stale-epoch-off-by-one", STAGES,
        "    if epoch < pos.epoch:\n",
        "    if epoch < pos.epoch - 1:\n",
        T_STAGES, "a caller one epoch behind is fenced",
    ),
    Mutation(
        "stages.role-change-needs-higher-epoch", STAGES,
        "if role_change and epoch == pos.epoch and pos.role is not Role.NONE:",
        "if role_change and epoch < pos.epoch and pos.role is not Role.NONE:",
        T_STAGES, "every role change needs a new, higher epoch",
    ),
    Mutation(
        "stages.failover-secondary-cannot-be-made-primary", STAGES,
        "if pos.role is Role.SECONDARY and pos.stage in (Stage.FAILOVER, Stage.FAILOVER_FAILED):",
        "if pos.role is Role.SECONDARY and pos.stage in ():",
        T_STAGES, "a secondary in FAILOVER / FAILOVER_FAILED cannot be told it is primary",
    ),
    Mutation(
        "stages.running-secondary-cannot-be-made-primary", STAGES,
        "    if pos.role is Role.SECONDARY and pos.stage is Stage.RUNNING:\n",
        "    if False:\n",
        T_STAGES, "a running secondary is promoted only by failover",
    ),
    Mutation(
        "stages.stopped-secondary-same-epoch", STAGES,
        "if pos.role is Role.SECONDARY and pos.stage is Stage.DONE and epoch == pos.epoch:",
        "if False:",
        T_STAGES, "a stopped secondary is not restarted at the same epoch",
    ),
    Mutation(
        "stages.failover-only-from-secondary", STAGES,
        "    if pos.role is not Role.SECONDARY:\n        raise IllegalTransition(f\"only a secondary can fail over",
        "    if False:\n        raise IllegalTransition(f\"only a secondary can fail over",
        T_STAGES, "only a secondary fails over",
    ),
    Mutation(
        "stages.failover-only-when-running", STAGES,
        "    if pos.stage is not Stage.RUNNING:\n"
        "        raise IllegalTransition(f\"{NOT_RUNNING} (stage {pos.stage.value})\")",
        "    if False:\n        raise IllegalTransition(f\"{NOT_RUNNING} (stage {pos.stage.value})\")",
        T_STAGES, "failover only from a running secondary",
    ),
    Mutation(
        "stages.failover-needs-higher-epoch", STAGES,
        "        raise IllegalTransition(f\"{NOT_RUNNING} (stage {pos.stage.value})\")\n"
        "    _check_epoch(pos, epoch, role_change=True)",
        "        raise IllegalTransition(f\"{NOT_RUNNING} (stage {pos.stage.value})\")\n"
        "    _check_epoch(pos, epoch, role_change=False)",
        T_STAGES, "a failover carries a new epoch",
    ),
    Mutation(
        "stages.checkpoint-only-on-secondary", STAGES,
        "    if pos.role is not Role.SECONDARY:\n        raise IllegalTransition(f\"checkpoints are cut",
        "    if False:\n        raise IllegalTransition(f\"checkpoints are cut",
        T_STAGES, "checkpoints are cut on the secondary only",
    ),
    Mutation(
        "stages.stop-after-failover-is-a-no-op", STAGES,
        "if pos.stage in (Stage.DONE, Stage.FAILOVER):\n        return False",
        "if pos.stage in (Stage.DONE,):\n        return False",
        T_STAGES, "stop during a failover does not undo it",
    ),
    Mutation(
        "stages.io-status-failover-failed", STAGES,
        'return "allocated-only" if stage is Stage.FAILOVER_FAILED else "ok"',
        'return "ok"',
        T_STAGES, "a failed failover serves only allocated data",
    ),
    # ------------------------------------------------------------------- agent/state.py
    Mutation(
        "replica.killed-daemon-is-no-clean-stop", REPLICA,
        "        if clean and not exited:\n            # S5:",
        "        if False:\n            # S5:",
        ("tests/integration/test_unclean_stop.py::test_a_secondary_whose_daemon_was_killed_at_its_stop_has_no_restore_point",),
        "a stop whose daemon did not exit cleanly keeps no restore point (S5)",
    ),
    Mutation(
        "qsd.clean-exit-needs-status-0", "operator/pairvol/qemu/qsd.py",
        "exited = self.proc.returncode == 0",
        "exited = True",
        ("tests/integration/test_unclean_stop.py::test_a_daemon_that_dies_while_it_quits_reports_no_clean_exit",),
        "a daemon that failed while it quit is no clean exit (S5)",
    ),
    Mutation(
        "qsd.killed-is-no-clean-exit", "operator/pairvol/qemu/qsd.py",
        "        exited = False\n        if not self.dead.is_set():",
        "        exited = True\n        if not self.dead.is_set():",
        ("tests/integration/test_unclean_stop.py::test_a_daemon_frozen_at_quit_is_killed_and_reports_no_clean_exit",),
        "a daemon killed after quit is no clean exit (S5)",
    ),
    Mutation(
        "metrics.a-failover-end-is-stamped", "operator/pairvol/agent/metrics.py",
        "        self.failover_last.labels(self.volume, result, trigger).set_to_current_time()\n",
        "        pass\n",
        ("tests/integration/test_metrics.py::"
         "test_a_failover_is_counted_once_by_its_trigger_with_its_duration_and_the_new_role",),
        "the failover alerts' timestamp is set when a failover ends (a new counter series cannot date it)",
    ),
    Mutation(
        "peerlink.a-checksum-comparison-is-progress", PEERLINK,
        "        self.metrics.sync_compared_bytes.labels(self.cfg.name).set(done)",
        "        pass",
        ("tests/integration/test_checksum_resync.py::test_the_old_primary_rejoining_gets_only_the_regions_that_differ",),
        "a checksum resync's comparison shows as progress (PairvolResyncStalled, the SYNC column)",
    ),
    Mutation(
        "decisions.a-comparing-checksum-resync-shows-its-comparison", DECISIONS,
        "        if not total and pa.size:  # still comparing",
        "        if False:  # still comparing",
        ("tests/unit/test_operator_decisions.py::test_a_checksum_resync_shows_how_far_it_compared_before_it_knows_what_to_copy",),
        "the SYNC column shows a checksum resync's comparison, not 0% of nothing",
    ),
    Mutation(
        "handlers.the-checkpoint-interval-is-exported", "operator/pairvol/operator/handlers.py",
        "        metrics.set_checkpoint_interval(self.namespace, self.name, interval_s)\n",
        "",
        ("tests/unit/test_operator_metrics_restart.py",),
        "PairvolCheckpointStale knows each volume's interval (manual-checkpoint volumes are never stale)",
    ),
    Mutation(
        "dirlock.a-file-system-without-locks-is-named", "operator/pairvol/agent/dirlock.py",
        "    except OSError as exc:  # ENOLCK, EOPNOTSUPP",
        "    except ZeroDivisionError as exc:  # ENOLCK, EOPNOTSUPP",
        ("tests/unit/test_agent_dirlock.py",),
        "an agent on a file system without flock says what is wrong instead of a bare errno",
    ),
    Mutation(
        "qsd.a-session-ended-after-negotiation-is-retried", "operator/pairvol/qemu/qsd.py",
        '                await bounded(self.qmp.execute("query-version"), max(0.5, min(left, 3.0)))\n',
        "",
        ("tests/integration/test_qsd_connect.py::test_failed_connects_are_retried_with_a_fresh_client",),
        "a QMP session the daemon closes right after negotiating is retried, not taken as up",
    ),
    Mutation(
        "state.slot-crc", STATE,
        "if magic != _SLOT_MAGIC or len(body) != length or zlib.crc32(body) != crc:",
        "if magic != _SLOT_MAGIC or len(body) != length:",
        T_STATE, "a torn slot is not read",
    ),
    Mutation(
        "state.slot-magic", STATE,
        "if magic != _SLOT_MAGIC or len(body) != length or zlib.crc32(body) != crc:",
        "if len(body) != length or zlib.crc32(body) != crc:",
        T_STATE, "a slot of another format is not read",
    ),
    Mutation(
        "state.newest-slot-wins", STATE,
        "return max(found, key=lambda slot: slot[0])[1]",
        "return min(found, key=lambda slot: slot[0])[1]",
        T_STATE, "the newest valid slot is the state",
    ),
    Mutation(
        "state.alternate-slots", STATE,
        "path = _slots(data_dir)[seq % 2]",
        "path = _slots(data_dir)[0]",
        T_STATE, "a write never overwrites the only valid slot",
    ),
    Mutation(
        "state.corrupt-is-not-fresh", STATE,
        "        if any(path.exists() for path in _slots(data_dir)):\n",
        "        if False:\n",
        T_STATE, "unreadable state is an error, not a new replica",
    ),
    Mutation(
        "state.format-version", STATE,
        'if data.pop("version", None) not in (FORMAT_VERSION, FORMAT_LOCAL_FAILURE):',
        'if data.pop("version", None) is None:',
        T_STATE, "a state of another format version is refused",
    ),
    Mutation(
        "state.missing-clean-flag-is-unclean", STATE,
        'clean_shutdown=bool(data.pop("clean_shutdown", False)),',
        'clean_shutdown=bool(data.pop("clean_shutdown", True)),',
        T_STATE, "a state that does not say it was closed cleanly is treated as unclean",
    ),
    # -------------------------------------------------- kube/lease.py, agent/lease.py
    Mutation(
        "lease.clear-on-its-own-version", KUBE_LEASE,
        'patch = {"metadata": {"resourceVersion": version, "annotations": dict.fromkeys(_MARKS)}}',
        'patch = {"metadata": {"annotations": dict.fromkeys(_MARKS)}}',
        lease_tests("test_a_clear_applied_after_a_new_mark_does_not_remove_it",
                    "test_a_clear_never_touches_a_lease_taken_over_by_another_holder"),
        "a clear of the marks that reaches the API server after a new mark does not remove it",
    ),
    Mutation(
        "lease.every-mark-a-new-version", KUBE_LEASE,
        'return {"metadata": {"annotations": {**annotations, MARK_ID_ANNOTATION: uuid.uuid4().hex}}}',
        'return {"metadata": {"annotations": dict(annotations)}}',
        lease_tests("test_a_clear_applied_after_a_new_mark_does_not_remove_it"),
        "a mark that stores the same epoch again still makes a late clear fail",
    ),
    Mutation(
        "lease.clear-only-own-lease", KUBE_LEASE,
        "                    if holder != self.holder:\n                        raise LeaseError(f\"cannot {what}",
        "                    if False:\n                        raise LeaseError(f\"cannot {what}",
        lease_tests("test_a_clear_never_touches_a_lease_taken_over_by_another_holder"),
        "a clear never removes the marks from a Lease another holder took over",
    ),
    Mutation(
        "lease.a-read-confirms-a-known-record-as-of-its-sending", KUBE_LEASE,
        "        return max(0.0, (seen_at if current_at is None else current_at) - self._since)\n",
        "        return max(0.0, seen_at - self._since)\n",
        ("tests/unit/test_operator_lease_clock.py",),
        "a Lease read confirms its record only as of when it was sent: time after that (the answer's way, the "
        "agents' status calls) is never counted towards the holder's expiry (H5)",
    ),
    Mutation(
        "lease.a-new-record-counts-from-its-arrival", KUBE_LEASE,
        "            self._record, self._since = record, seen_at\n",
        "            self._record, self._since = record, (seen_at if current_at is None else current_at)\n",
        ("tests/unit/test_operator_lease_clock.py",),
        "a record first seen in a read counts from the read's answer, not its sending: it may have been stored "
        "while the read travelled (H5)",
    ),
    Mutation(
        "handlers.the-loop-counts-a-lease-read-as-of-its-sending", "operator/pairvol/operator/handlers.py",
        "        age = seen.age(record, read.received, current_at=read.sent)\n",
        "        age = seen.age(record, time.monotonic())\n",
        ("tests/unit/test_operator_lease_clock.py",),
        "the volume loop counts a Lease read only up to its sending, not up to when the World is built after "
        "the agents' status calls (H5)",
    ),
    Mutation(
        "lease.renew-safety-margin", KUBE_LEASE,
        "        self._mine = new\n        self._valid_until = sent + self.duration_s - self.safety_s\n\n"
        "    async def _put_renewal",
        "        self._mine = new\n        self._valid_until = sent + self.duration_s + self.safety_s\n\n"
        "    async def _put_renewal",
        lease_tests("test_unreachable_api_server_means_lost_before_the_lease_expires"),
        "a renewed lease is given up before it expires for others",
    ),
    Mutation(
        "lease.acquire-safety-margin", KUBE_LEASE,
        "        self._valid_until = sent + self.duration_s - self.safety_s\n        self._held = True\n",
        "        self._valid_until = sent + self.duration_s + self.safety_s\n        self._held = True\n",
        lease_tests("test_a_lease_not_renewed_in_time_is_not_held_and_takes_no_out_of_sync_mark",
                    "test_unreachable_api_server_means_lost_before_the_lease_expires"),
        "an acquired lease is given up before it expires for others",
    ),
    Mutation(
        "lease.foreign-live-lease-not-taken", KUBE_LEASE,
        "if holder and holder != self.holder and seen_for < self.duration_s and not lease_expired(old, now):",
        "if holder and holder != self.holder and seen_for < self.duration_s and lease_expired(old, now):",
        lease_tests("test_a_second_holder_waits_until_expiry_then_takes_over"),
        "a live lease of another holder is not taken over",
    ),
    Mutation(
        "lease.expiry-needs-duration", KUBE_LEASE,
        "    return now > renew + float(duration)\n",
        "    return now > renew\n",
        lease_tests("test_a_second_holder_waits_until_expiry_then_takes_over"),
        "a lease is live for its whole duration",
    ),
    Mutation(
        "lease.lost-before-expiry", KUBE_LEASE,
        "            if time.monotonic() >= self._valid_until:\n",
        "            if False:\n",
        lease_tests("test_unreachable_api_server_means_lost_before_the_lease_expires"),
        "a keeper that cannot renew gives up before expiry",
    ),
    Mutation(
        "lease.held-means-before-expiry", KUBE_LEASE,
        "return self._held and time.monotonic() < self._valid_until",
        "return self._held",
        lease_tests("test_a_lease_not_renewed_in_time_is_not_held_and_takes_no_out_of_sync_mark"),
        "held is false once the validity ran out",
    ),
    Mutation(
        "lease.no-mark-without-lease", KUBE_LEASE,
        "            if not self.held:\n                raise LeaseError(f\"cannot mark out-of-sync",
        "            if False:\n                raise LeaseError(f\"cannot mark out-of-sync",
        lease_tests("test_out_of_sync_mark_is_stored_on_the_lease",
                    "test_a_lease_not_renewed_in_time_is_not_held_and_takes_no_out_of_sync_mark"),
        "an out-of-sync mark is refused (not retried forever) when the lease is not held",
    ),
    Mutation(
        "lease.renew-only-own-lease", KUBE_LEASE,
        "        if holder != self.holder:\n            raise LeaseError(f\"lease {self.name} now held by",
        "        if False:\n            raise LeaseError(f\"lease {self.name} now held by",
        lease_tests("test_a_keeper_that_finds_its_lease_taken_over_stops_and_does_not_overwrite_it"),
        "a keeper never renews (overwrites) a lease another holder took over",
    ),
    Mutation(
        "lease.renewal-on-own-version", KUBE_LEASE,
        'return await kube.request("PUT", self.path, self._body(self._mine, time.time()), timeout_s=left())',
        'return await kube.request("PUT", self.path, self._body({**self._mine, "metadata": {"name": self.name, '
        '"namespace": self.namespace}}, time.time()), timeout_s=left())',
        lease_tests("test_a_renewal_is_one_write_on_the_holders_own_version_and_keeps_what_others_wrote",
                    "test_a_keeper_that_finds_its_lease_taken_over_stops_and_does_not_overwrite_it"),
        "a renewal without a read is conditional on the holder's own last write",
    ),
    Mutation(
        "lease.late-answer-is-lost", KUBE_LEASE,
        "        if answered >= until:\n",
        "        if False:\n",
        lease_tests("test_a_renewal_answered_after_the_validity_ran_out_counts_as_lost"),
        "a renewal answered after the validity ran out does not extend it",
    ),
    Mutation(
        "lease.renewal-waits-at-most-the-validity", KUBE_LEASE,
        "            return max(0.05, min(kube.timeout_s, until - time.monotonic()))\n",
        "            return kube.timeout_s\n",
        lease_tests("test_against_an_api_server_that_never_answers_the_lease_is_lost_when_its_validity_ends"),
        "no renewal request waits past the validity",
    ),
    Mutation(
        "lease.fence-before-release-on-shutdown", LEASE,
        "            if keeper.held or _is_primary(replica):\n",
        "            if False:\n",
        lease_tests("test_a_primary_shutting_down_stops_serving_before_it_releases_the_lease"),
        "a shutting-down primary stops serving before it gives the lease up",
    ),
    Mutation(
        "lease.a-stop-while-renewals-wind-down-is-kept", LEASE,
        "                await cancel_and_wait(renew)\n",
        "                renew.cancel()\n                with contextlib.suppress(asyncio.CancelledError):\n"
        "                    await renew\n",
        lease_tests("test_a_keeper_stopped_while_it_winds_its_renewals_down_after_a_demotion_still_stops"),
        "an agent stopped while its renewals wind down after a demotion still fences, releases and stops",
    ),
    # -------------------------------------------------------------- operator/decisions.py
    Mutation(
        "decisions.a-cut-names-the-primarys-link", DECISIONS,
        "        actions.append(Checkpoint(sec.pod, spod.ip, pa.link_serial))\n",
        "        actions.append(Checkpoint(sec.pod, spod.ip))\n",
        ("tests/unit/test_operator_checkpoint_serial.py",),
        "the cut names the link the primary reported in sync, so a relinked secondary refuses it (S5)",
    ),
    Mutation(
        "decisions.a-link-names-the-incarnation", DECISIONS,
        "    linked = pa.peer == peer and linked_to(pa, sa)\n",
        "    linked = pa.peer == peer\n",
        ("tests/unit/test_operator_incarnations.py",),
        "a secondary on the address of the one before is not in sync until the link names it (H14)",
    ),
    Mutation(
        "decisions.no-link-is-not-linked", DECISIONS,
        "    if pa.link_export is None or sa.role != \"secondary\":\n        return False\n",
        "    if pa.link_export is None:\n        return True\n    if sa.role != \"secondary\":\n        return False\n",
        ("tests/unit/test_operator_incarnations.py",),
        "a primary that reports no link is not linked (H14)",
    ),
    Mutation(
        "decisions.an-identity-export-names-the-incarnation", DECISIONS,
        "    return pa.link_export == name or pa.link_export.startswith(f\"{name}-d\")\n",
        "    return pa.link_export == name\n",
        ("tests/unit/test_operator_incarnations.py",),
        "a link to the export carrying the disk's identity goes to that incarnation too (H14)",
    ),
    Mutation(
        "decisions.another-epoch-is-another-incarnation", DECISIONS,
        "    return pa.link_export == name or pa.link_export.startswith(f\"{name}-d\")\n",
        "    return pa.link_export.startswith(name)\n",
        ("tests/unit/test_operator_incarnations.py",),
        "an export of epoch 12 is not the incarnation of epoch 1 (H14)",
    ),
    Mutation(
        "decisions.a-started-secondary-is-out-of-sync", DECISIONS,
        "        sec = replace(sec, out_of_sync=True, synced=False)\n",
        "",
        ("tests/unit/test_operator_incarnations.py",),
        "a secondary started anew is OutOfSync and unsynced until the primary links to it (H14)",
    ),
    Mutation(
        "decisions.marks-count-from-the-primarys-epoch", DECISIONS,
        "        return min(pa.epoch, st.epoch)\n",
        "        return st.epoch\n",
        ("tests/unit/test_operator_incarnations.py",),
        "a mark the primary wrote at its own epoch counts when the volume's epoch is newer (H14)",
    ),
    Mutation(
        "decisions.a-resync-mark-is-recorded-at-once", DECISIONS,
        "    if sec is not None and resyncing and (sec.synced or not sec.out_of_sync):\n",
        "    if False:\n",
        ("tests/unit/test_operator_incarnations.py",),
        "a resync mark makes the secondary unsynced in status before a restart raises the epoch (H16)",
    ),
    Mutation(
        "decisions.a-lost-target-keeps-the-volume-failed", DECISIONS,
        "    if failover_unresolved(st):\n        return _target_lost(world, spec, st, actions)\n",
        "    if False:\n        return _target_lost(world, spec, st, actions)\n",
        ("tests/unit/test_operator_incarnations.py",),
        "the old primary never serves again after a target that may have served was lost (H15)",
    ),
    Mutation(
        "decisions.a-lost-target-never-served-only-by-the-lease", DECISIONS,
        "    return sa is None and ended and lease is not None and lease.holder == prim.pod\n",
        "    return sa is None and ended\n",
        ("tests/unit/test_operator_incarnations.py",),
        "only a Lease still held by the old primary proves that a lost target never served (H15)",
    ),
    Mutation(
        "decisions.a-deleting-target-may-still-take-the-lease", DECISIONS,
        "    ended = pod is None or (not pod.deleting and pod.phase in (\"Failed\", \"Succeeded\"))\n",
        "    ended = True\n",
        ("tests/unit/test_operator_incarnations.py",),
        "a target whose pod is still being deleted may still take the Lease (H15)",
    ),
    Mutation(
        "decisions.a-lost-target-reads-the-lease-fresh", DECISIONS,
        "        return st.primary is not None and world.lease is not None and world.lease.holder == st.primary.pod\n",
        "        return False\n",
        ("tests/unit/test_operator_incarnations.py",),
        "the Lease that gives a volume back to its old primary is read from the API server (H15)",
    ),
    Mutation(
        "decisions.a-lost-target-that-comes-back-finishes-the-failover", DECISIONS,
        "    if sa is not None and sa.role == \"primary\":\n        # it is back",
        "    if False:\n        # it is back",
        ("tests/unit/test_operator_incarnations.py",),
        "a lost failover target that answers again with its role finishes the failover (H15)",
    ),
    Mutation(
        "decisions.a-blocked-manual-failover-is-consumed", DECISIONS,
        "    if world.annotations.get(ANN_FAILOVER) == \"now\":\n        # a manual failover that could not",
        "    if False:\n        # a manual failover that could not",
        ("tests/unit/test_operator_incarnations.py",),
        "a manual failover not carried out is consumed before the primary serves again alone (H16)",
    ),
    Mutation(
        "decisions.resync-marks-out-of-sync", DECISIONS,
        "        sec = Replica(sec.node, sec.pod, sec.state, sec.address, True, synced=False)\n"
        "        st = st.with_(epoch=epoch, secondary=sec, phase=Phase.SYNCING",
        "        sec = Replica(sec.node, sec.pod, sec.state, sec.address, sec.out_of_sync, synced=False)\n"
        "        st = st.with_(epoch=epoch, secondary=sec, phase=Phase.SYNCING",
        T_DECISIONS, "a resync marks the secondary OutOfSync before it starts",
    ),
    Mutation(
        "decisions.resync-clears-synced", DECISIONS,
        "        sec = Replica(sec.node, sec.pod, sec.state, sec.address, True, synced=False)\n"
        "        st = st.with_(epoch=epoch,",
        "        sec = Replica(sec.node, sec.pod, sec.state, sec.address, True, synced=sec.synced)\n"
        "        st = st.with_(epoch=epoch,",
        T_DECISIONS, "a full sync makes the secondary a partial copy until the pair is in sync again",
    ),
    Mutation(
        "decisions.half-synced-never-promoted", DECISIONS,
        "    if not sec.synced:\n",
        "    if not sec.synced and not manual:\n",
        T_DECISIONS, "a secondary whose full sync never finished is not promoted, even by hand",
    ),
    Mutation(
        "status.data-nodes-keep-replaced-replicas", "operator/pairvol/api/status.py",
        "        nodes = set(self.data_nodes)\n",
        "        nodes: set[str] = set()\n",
        ("tests/unit/test_api_spec.py",), "reclaimPolicy Delete finds every node that ever held a replica",
    ),
    Mutation(
        "decisions.out-of-sync-refused-in-both-modes", DECISIONS,
        "    if sec.out_of_sync and not manual:\n",
        '    if sec.out_of_sync and not manual and spec.failover_mode == "Checkpoint":\n',
        T_DECISIONS, "an OutOfSync secondary is never promoted automatically, in either mode",
    ),
    Mutation(
        "decisions.automatic-false-blocks", DECISIONS,
        "    if not manual and not spec.failover_automatic:\n",
        "    if False:\n",
        T_DECISIONS, "failover.automatic=false means no automatic failover",
    ),
    Mutation(
        "decisions.secondary-must-be-running", DECISIONS,
        'if agent.role != "secondary" or agent.stage != "running":',
        'if agent.role != "secondary":',
        T_DECISIONS, "only a running secondary is promoted",
    ),
    Mutation(
        "decisions.wait-for-lease-expiry", DECISIONS,
        "    if lease is not None and not lease.expired(world.settings.lease_margin_s):\n",
        "    if False:\n",
        T_DECISIONS, "no promotion while the primary's lease is live",
    ),
    Mutation(
        "decisions.restarted-primary-marks-secondary-out-of-sync", DECISIONS,
        "        sec = replace(sec, out_of_sync=True)\n",
        "        sec = replace(sec)\n",
        T_DECISIONS, "a primary restarted in place serves alone: its secondary is OutOfSync from then on",
    ),
    Mutation(
        "decisions.restart-in-place-only-after-a-lease-fence", DECISIONS,
        '    if pa.fenced_by not in ("lease", None) or (pa.fenced_by is None and not refused):\n',
        "    if False:\n",
        T_RESTART_IN_PLACE, "a primary stopped by its data path, its disk or a shutdown is failed over, not restarted",
    ),
    Mutation(
        "decisions.restart-in-place-not-after-a-local-disk-failure", DECISIONS,
        "    if pa.local_failure:\n",
        "    if False:\n",
        T_RESTART_IN_PLACE, "a primary whose local disk failed a request (no longer whole) never serves again in place",
    ),
    Mutation(
        "decisions.a-primary-whose-disk-failed-a-write-is-not-restarted", DECISIONS,
        "    if pa.local_failure is not None:\n",
        "    if False:\n",
        T_DECISIONS, "H13: H9 never serves a primary's disk that lacks a write only the secondary took",
    ),
    Mutation(
        "replica.a-failed-local-disk-never-serves-as-primary", REPLICA,
        "            self._refuse_a_failed_disk()  # H13: before anything changes\n",
        "",
        T_LOCAL_DISK, "H13: a start as primary on a disk that failed an acknowledged write is refused",
    ),
    Mutation(
        "replica.a-primary-alone-records-no-local-disk-failure", REPLICA,
        "                if self._peer_children > 0 or _reported_at(event) <= self._peer_left_at:\n",
        "                if True:\n",
        T_LOCAL_DISK, "H13: a write failed by a primary without a peer was not acknowledged: it may serve again",
    ),
    Mutation(
        "replica.a-local-failure-counts-while-the-peer-is-a-child", REPLICA,
        "                if self._peer_children > 0 or _reported_at(event) <= self._peer_left_at:\n",
        "                if self.link is not None:\n",
        T_LOCAL_DISK, "H13: a stop marks the peer with the link already gone; the peer is still a child",
    ),
    Mutation(
        "peerlink.the-peer-leaves-the-count-after-its-events", PEERLINK,
        "                    await self.qsd.event_barrier()\n",
        "",
        T_LOCAL_DISK, "H13: a report QEMU sent while the peer was a child is handled before the count drops",
    ),
    Mutation(
        "replica.nothing-serves-a-disk-with-a-local-failure", REPLICA,
        "        if self.state.local_failure is not None:\n            raise IllegalTransition(\n"
        "                \"not serving:",
        "        if False:\n            raise IllegalTransition(\n                \"not serving:",
        T_LOCAL_DISK, "H13: a failure during a re-pair keeps the export down",
    ),
    Mutation(
        "replica.no-peer-in-sync-from-a-disk-with-a-local-failure", REPLICA,
        "            if self.state.local_failure is not None:\n                # H13: copied from a disk",
        "            if False:\n                # H13: copied from a disk",
        T_LOCAL_DISK, "H13: the peer copied from a disk that lacks an acknowledged write stays marked",
    ),
    Mutation(
        "replica.a-report-qemu-held-back-is-judged-by-its-time", REPLICA,
        "                if self._peer_children > 0 or _reported_at(event) <= self._peer_left_at:\n",
        "                if self._peer_children > 0:\n",
        T_LOCAL_DISK, "H13: a report QEMU's rate limit delayed past the peer's removal still counts",
    ),
    Mutation(
        "replica.a-record-made-while-the-export-was-added-takes-it-down", REPLICA,
        "        if self.state.local_failure is not None:\n            # recorded while the exports were added",
        "        if False:\n            # recorded while the exports were added",
        T_LOCAL_DISK, "H13: a record made while the start sets the export up keeps it down",
    ),
    Mutation(
        "state.a-local-disk-failure-is-durable", STATE,
        '                local_failure=None if (failed := data.pop("local_failure", None)) is None else str(failed),\n',
        "                local_failure=None,\n",
        T_LOCAL_DISK, "H13: a restart of the agent keeps the record that its disk failed a write",
    ),
    Mutation(
        "replica.a-secondary-start-clears-the-local-disk-failure", REPLICA,
        "                local_failure=None,  # H13: the new primary copies this disk anew (a new identity)\n",
        "",
        T_LOCAL_DISK, "H13: a replica rebuilt as a secondary may be promoted and serve again later",
    ),
    Mutation(
        "decisions.restart-in-place-once-per-window", DECISIONS,
        "        if t is not None and world.now - t < window:\n",
        "        if False:\n",
        T_RESTART_IN_PLACE, "a primary that loses its Lease again soon after a restart in place is failed over",
    ),
    Mutation(
        "decisions.restart-in-place-not-while-serving", DECISIONS,
        "    if pa.serving:\n        return f\"the agent of {prim.pod} still says it serves\"\n",
        "    if False:\n        return f\"the agent of {prim.pod} still says it serves\"\n",
        T_RESTART_IN_PLACE, "a primary that says it serves is not handed a new epoch in place",
    ),
    Mutation(
        "decisions.refused-restart-needs-the-refusal", DECISIONS,
        "        or pa.refused_epoch != st.epoch\n",
        "        or False\n",
        T_RESTART_IN_PLACE, "a secondary marked for a restart in place is promotable again only if the primary "
        "says it served nothing at that epoch",
    ),
    Mutation(
        "decisions.a-primary-that-does-not-serve-is-down", DECISIONS,
        "    if pa is None or pa.role != \"primary\" or pa.epoch != st.epoch or pa.serving:\n        return None\n",
        "    if True:\n        return None\n",
        T_RESTART_IN_PLACE, "a primary that does not serve at the volume's epoch is not reported Replicating for ever",
    ),
    Mutation(
        "decisions.a-busy-primary-may-still-serve", DECISIONS,
        "    if pa.busy:\n",
        "    if False:\n",
        T_RESTART_IN_PLACE, "a primary whose agent is still carrying out a start is not failed over under it",
    ),
    Mutation(
        "decisions.refused-restart-keeps-the-primarys-own-mark", DECISIONS,
        "        or pa.peer_out_of_sync\n",
        "        or False\n",
        T_RESTART_IN_PLACE, "a refusal never un-marks a secondary the primary durably said it left behind",
    ),
    Mutation(
        "decisions.refused-restart-keeps-the-lease-marks", DECISIONS,
        "        or lease.out_of_sync_epoch is not None\n",
        "        or False\n",
        T_RESTART_IN_PLACE, "a refusal never un-marks a secondary while the Lease carries an out-of-sync mark",
    ),
    Mutation(
        "lease.a-rebuild-under-the-lock-is-no-failure", LEASE,
        "        if verdict.ok and not replica.serving and replica.lock.locked() and not replica.fenced.is_set():\n",
        "        if False:\n",
        lease_tests("test_a_grow_that_rebuilds_the_export_under_the_lock_keeps_the_lease"),
        "a grow that takes the export down under the lock keeps renewing the Lease (H3)",
    ),
    Mutation(
        "lease.loss-without-verdict-is-the-data-paths", LEASE,
        '        cause: FenceCause = "lease" if keeper.last_check_ok else "data-path"\n',
        '        cause: FenceCause = "lease"\n',
        lease_tests("test_a_lease_lost_while_the_daemon_gave_no_verdict_fences_for_the_data_path"),
        "a Lease lost while the daemon gave no verdict fences for the data path: failed over, not restarted",
    ),
    Mutation(
        "replica.refused-start-recorded", REPLICA,
        "                    await self._save(refused_epoch=epoch)\n",
        "                    pass\n",
        ("tests/integration/test_replica_hooks.py",), "a start that refused to serve says so durably",
    ),
    Mutation(
        "decisions.restarted-primary-needs-its-role-on-disk", DECISIONS,
        '    if pa.role != "primary":\n        return wait(\n',
        '    if False:\n        return wait(\n',
        T_DECISIONS, "only a replica with the primary role on record is asked to serve again",
    ),
    Mutation(
        "decisions.restarted-primary-waits-for-its-pod", DECISIONS,
        "    if pa is None or not pod.ready or not pod.ip:\n",
        "    if pa is None:\n",
        T_DECISIONS, "a primary restarted in place is asked to serve only once its pod is ready",
    ),
    Mutation(
        "decisions.manual-failover-refused-when-blocked", DECISIONS,
        "        manual = False\n",
        "        pass\n",
        T_DECISIONS, "a manual failover that could promote nothing does not stop the primary",
    ),
    Mutation(
        "decisions.lease-margin", DECISIONS,
        "return self.observed_age_s > self.duration_s + margin_s",
        "return self.observed_age_s > self.duration_s",
        T_DECISIONS, "the operator waits a margin past the lease's expiry",
    ),
    Mutation(
        "decisions.grace-period", DECISIONS,
        "        if world.now - since < spec.grace_period_s:\n",
        "        if False:\n",
        T_DECISIONS, "a dead primary is failed over only after the grace period",
    ),
    Mutation(
        "decisions.failover-new-epoch", DECISIONS,
        '    epoch = st.epoch + 1\n    reason = "manual" if manual else why',
        '    epoch = st.epoch\n    reason = "manual" if manual else why',
        T_DECISIONS, "a failover hands out a new epoch",
    ),
    Mutation(
        "decisions.lease-mark-current-epoch", DECISIONS,
        "        and (lease.out_of_sync_epoch >= floor)\n",
        "        and (lease.out_of_sync_epoch > floor)\n",
        T_DECISIONS, "an out-of-sync mark at the current epoch is applied",
    ),
    Mutation(
        "decisions.lease-mark-not-stale", DECISIONS,
        "        and (lease.out_of_sync_epoch >= floor)\n",
        "        and (lease.out_of_sync_epoch >= floor - 1)\n",
        T_DECISIONS, "an out-of-sync mark from an older epoch is ignored",
    ),
    Mutation(
        "decisions.mark-not-cleared-while-in-lease", DECISIONS,
        "        and not (lease is not None and lease.out_of_sync_epoch is not None"
        " and lease.out_of_sync_epoch >= floor)\n",
        "        and True\n",
        T_DECISIONS, "OutOfSync is not cleared while the Lease records a mark for this epoch",
    ),
    Mutation(
        "decisions.expired-lease-means-dead-primary", DECISIONS,
        "    return lease.expired(world.settings.lease_margin_s)\n",
        "    return False\n",
        T_DECISIONS, "a primary whose lease expired is treated as dead",
    ),
    Mutation(
        "decisions.failed-failover-is-reported", DECISIONS,
        'if sa is not None and sa.stage == "failover_failed":',
        "if False:",
        T_DECISIONS, "a failed failover on the agent turns the volume Failed",
    ),
    Mutation(
        "decisions.manual-failover-stops-primary-first", DECISIONS,
        '    if manual and phealth == "ok":\n',
        "    if False:\n",
        T_DECISIONS, "a manual failover of a live primary stops it before promoting",
    ),
    Mutation(
        "decisions.resume-with-recorded-epoch", DECISIONS,
        "actions.append(DoFailover(sec.pod, spod.ip, st.epoch, spec.agent_failover_mode, trigger))",
        "actions.append(DoFailover(sec.pod, spod.ip, st.epoch + 1, spec.agent_failover_mode, trigger))",
        T_DECISIONS, "a resumed failover reuses the recorded epoch (never hands one out twice)",
    ),
    Mutation(
        "decisions.a-failover-trigger-only-to-an-agent-that-takes-it", DECISIONS,
        "return view is not None and view.takes_trigger",
        "return True",
        T_DECISIONS, "an agent that does not list failoverTriggers is not sent one (it would refuse the failover)",
    ),
    Mutation(
        "decisions.failover-target-died", DECISIONS,
        'if spod is None or spod.deleting or spod.phase in ("Failed", "Succeeded"):',
        "if False:",
        T_DECISIONS, "a failover whose target died is reported Failed, not awaited forever",
    ),
    Mutation(
        "decisions.dropped-secondary-is-replaced", DECISIONS,
        '        and (pa.replication_state == "degraded")\n',
        "        and False\n",
        T_DECISIONS, "a secondary the primary dropped is replaced",
    ),
    Mutation(
        "decisions.new-secondary-not-on-primary-node", DECISIONS,
        "if n.name != prim.node and n.name not in busy]",
        "if n.name not in busy]",
        T_DECISIONS, "the new secondary never shares the primary's node",
    ),
    Mutation(
        "decisions.two-nodes-needed", DECISIONS,
        "    if len(ranked) < 2:\n",
        "    if len(ranked) < 1:\n",
        T_DECISIONS, "both replicas need a node each",
    ),
    Mutation(
        "decisions.a-nested-data-dir-is-not-placed", DECISIONS,
        "    clash = data_dir_conflict(world, spec)\n",
        "    clash = None\n",
        ("tests/unit/test_operator_data_dirs.py",),
        "a volume whose data directory nests in another's places no replica",
    ),
    Mutation(
        "decisions.data-dirs-compared-by-component", DECISIONS,
        "    if ca[: len(cb)] == cb:\n        return \"inside\"\n",
        "    if \"/\".join(ca).startswith(\"/\".join(cb)):\n        return \"inside\"\n",
        ("tests/unit/test_operator_data_dirs.py",),
        "/a/bc is not inside /a/b: a sibling with a common prefix is placed",
    ),
    Mutation(
        "decisions.a-data-dir-containing-another-is-not-placed", DECISIONS,
        "    if cb[: len(ca)] == ca:\n        return \"contains\"\n",
        "    if False:\n        return \"contains\"\n",
        ("tests/unit/test_operator_data_dirs.py",),
        "a volume whose data directory contains another's places no replica",
    ),
    Mutation(
        "decisions.the-volume-created-first-places", DECISIONS,
        "not (other.placed or (other.created, other.key) < me)",
        "not other.placed",
        ("tests/unit/test_operator_data_dirs.py",),
        "of two nested volumes without replicas, the one created first places, the other waits",
    ),
    Mutation(
        "decisions.a-volume-with-replicas-keeps-them", DECISIONS,
        "not (other.placed or (other.created, other.key) < me)",
        "not ((other.created, other.key) < me)",
        ("tests/unit/test_operator_data_dirs.py",),
        "a volume nested in one that has replicas waits, even if created first",
    ),
    Mutation(
        "decisions.a-wipe-spares-another-volumes-data", DECISIONS,
        "        if node in other.data_nodes and dir_relation(other.path, own) in (\"same\", \"inside\"):\n",
        "        if False:\n",
        ("tests/unit/test_operator_data_dirs.py",),
        "a wipe never removes a directory holding another volume's data on that node",
    ),
    Mutation(
        "decisions.the-primary-is-labelled-on-every-tick", DECISIONS,
        "    actions += role_labels(world)\n",
        "    pass\n",
        ("tests/unit/test_operator_labels.py",),
        "a new primary whose label patch failed is labelled by the next tick: the Service selects it (H18)",
    ),
    Mutation(
        "decisions.a-secondary-is-never-labelled-primary", DECISIONS,
        'if pod.role != role and (role == "primary" or pod.role == "primary"):',
        'if pod.role != role and role == "primary":',
        ("tests/unit/test_operator_labels.py",),
        "only the status's primary is selected by the workload Service (H18)",
    ),
    Mutation(
        "decisions.role-labels-patched-only-when-they-differ", DECISIONS,
        'if pod.role != role and (role == "primary" or pod.role == "primary"):',
        'if role == "primary" or pod.role == "primary":',
        ("tests/unit/test_operator_labels.py",),
        "a volume whose labels are right costs no API call per tick (H18)",
    ),
    # ------------------------------------------------- operator/handlers.py, kube/client.py (status writes)
    Mutation(
        "handlers.status-write-conditional-on-the-version-planned-from", "operator/pairvol/operator/handlers.py",
        '            patch["metadata"] = {"resourceVersion": meta["resourceVersion"]}\n',
        "            pass\n",
        ("tests/unit/test_operator_status_writes.py",),
        "a plan made from a status someone changed since is neither stored nor acted on (H19)",
    ),
    Mutation(
        "handlers.a-plan-acting-on-pods-is-version-checked", "operator/pairvol/operator/handlers.py",
        "        if new == self.last_written and not d.acts_on_pods(plan.actions):\n",
        "        if new == self.last_written:\n",
        ("tests/unit/test_operator_status_writes.py",),
        "a plan that creates, deletes or relabels pods is checked against the stored version (H19)",
    ),
    Mutation(
        "handlers.a-plan-found-stored-exports-its-phase", "operator/pairvol/operator/handlers.py",
        "            self.export(plan.status, interval_s)\n",
        "            pass\n",
        ("tests/unit/test_operator_metrics_restart.py",),
        "a restarted operator exports the phase of a volume stuck Failed or Degraded (the alerts read it)",
    ),
    Mutation(
        "handlers.a-stopped-loop-clears-its-checkpoint-gauge", "operator/pairvol/operator/handlers.py",
        "            c.metrics.set_checkpoint(self.namespace, self.name, None)\n",
        "            pass\n",
        ("tests/unit/test_operator_metrics_restart.py",),
        "a replica that no longer runs a volume's loop exports no checkpoint time for it",
    ),
    Mutation(
        "handlers.data-not-removed-told-once-per-cause", "operator/pairvol/operator/handlers.py",
        "    if message not in told:\n",
        "    if True:\n",
        ("tests/unit/test_operator_finalizer_events.py",),
        "each reason a deletion left data behind is one Event, not one per finalizer pass",
    ),
    Mutation(
        "handlers.a-refused-label-patch-does-not-stop-the-plan", "operator/pairvol/operator/handlers.py",
        "                                    self.key, pod, role, exc)\n                        return False\n",
        "                                    self.key, pod, role, exc)\n                        raise\n",
        ("tests/unit/test_operator_status_writes.py",),
        "a label patch the API server refuses leaves the failover or cut after it in the plan to run (H18)",
    ),
    Mutation(
        "handlers.a-refused-label-patch-is-no-reason-to-tick-at-once", "operator/pairvol/operator/handlers.py",
        "                                    self.key, pod, role, exc)\n                        return False\n",
        "                                    self.key, pod, role, exc)\n                        return True\n",
        ("tests/unit/test_operator_status_writes.py::test_a_label_patch_refused_every_tick_does_not_make_the_loop_spin",),
        "a label patch refused at once every tick leaves the loop at its reconcile interval (H18)",
    ),
    Mutation(
        "handlers.the-volume-goes-once-its-wipes-are-gone", "operator/pairvol/operator/handlers.py",
        '            return "waiting for the data cleanup pods to stop"\n',
        "            pass\n",
        ("tests/unit/test_operator_names.py::test_each_node_of_a_long_named_volume_gets_its_wipe_pod_and_an_unfinished_wipe_is_reported",),
        "a volume is gone only once its wipe pods are: none runs on beside a new volume of the same name",
    ),
    Mutation(
        "handlers.no-wipe-started-after-the-finalizer-gave-up", "operator/pairvol/operator/handlers.py",
        "            if elapsed < 60:\n",
        "            if True:\n",
        ("tests/unit/test_operator_names.py::test_no_wipe_pod_is_started_after_the_finalizer_gave_up_and_none_outlives_the_volume",),
        "a node that becomes ready after the finalizer gave up gets no wipe that could outlive the volume",
    ),
    Mutation(
        "kube.merge-patch-removes-what-the-new-status-lacks", "operator/pairvol/kube/client.py",
        "            patch[key] = None\n",
        "            pass\n",
        ("tests/unit/test_operator_status_writes.py",),
        "the stored status is exactly the planned one: a field the plan dropped is removed (H19)",
    ),
    Mutation(
        "handlers.a-pod-create-counts-before-its-answer", "operator/pairvol/operator/handlers.py",
        "                    self.created.add(pod)\n"
        "                    await c.kube.create_if_missing(pods_path(ns), manifest)\n",
        "                    await c.kube.create_if_missing(pods_path(ns), manifest)\n"
        "                    self.created.add(pod)\n",
        ("tests/unit/test_operator_lost_answers.py",),
        "a pod created whose answer was lost is not replaced by a second one on its node (H18)",
    ),
    # ------------------------------------------------------------------------- api/spec.py
    Mutation(
        "decisions.grow-never-beyond-agent-limit", DECISIONS,
        "            if spec.size > MAX_SIZE:\n",
        "            if False:\n",
        ("tests/unit/test_operator_grow.py::test_a_spec_size_no_agent_takes_is_never_grown_to_and_the_pair_stays_in_sync",),
        "no grow begins (and detaches the secondary) towards a size no agent takes",
    ),
    Mutation(
        "decisions.half-way-grow-never-beyond-agent-limit", DECISIONS,
        "spec.size if spec.size <= MAX_SIZE else 0",
        "spec.size",
        ("tests/unit/test_operator_grow.py",),
        "a grow that stopped half-way is finished to a size the agents take",
    ),
    Mutation(
        "api.size-at-most-what-an-agent-takes", SPEC,
        "            elif size > MAX_SIZE:\n",
        "            elif False:\n",
        T_SPEC, "spec.size is at most 1Pi, the largest volume an agent serves",
    ),
    Mutation(
        "api.size-whole-sectors", SPEC,
        "            elif size % SECTOR:\n",
        "            elif False:\n",
        T_SPEC, "a volume is a whole number of sectors",
    ),
    Mutation(
        "api.host-path-confined", SPEC,
        "elif \"..\" in host_path.split(\"/\") or posixpath.normpath(host_path) == \"/\":",
        "elif False:",
        T_SPEC, "hostPath (removed with reclaimPolicy Delete) is never / and never climbs out with ..",
    ),
    Mutation(
        "api.two-distinct-nodes", SPEC,
        "            if 0 < len(set(nodes)) < 2:\n",
        "            if False:\n",
        T_SPEC, "spec.nodes names at least two nodes",
    ),
    Mutation(
        "api.peer-timeout-at-least-1", SPEC,
        'rep.get("peerTimeoutSeconds"), 5, 1)',
        'rep.get("peerTimeoutSeconds"), 5, 0)',
        T_SPEC, "a peer timeout of 0 is refused",
    ),
    Mutation(
        "api.name-length", SPEC,
        "if len(name) > MAX_VOLUME_NAME or not _DNS_LABEL.match(name):",
        "if not _DNS_LABEL.match(name):",
        T_SPEC, "volume names short enough for the pod and Service names derived from them",
    ),
    # ------------------------------------------------------------------ agent/replica.py
    Mutation(
        "replica.a-cut-after-a-relink-is-refused", REPLICA,
        "            if link_serial is not None and link_serial != self.link_serial:\n",
        "            if False:\n",
        ("tests/integration/test_checkpoint_link_serial.py::"
         "test_a_cut_asked_for_before_the_primary_linked_again_is_refused_and_the_restore_point_stays",),
        "a cut asked for before the primary linked again never becomes the restore point (S5)",
    ),
    Mutation(
        "replica.a-relink-changes-the-link-serial", REPLICA,
        "            self._serial_count += 1\n",
        "            pass\n",
        ("tests/integration/test_checkpoint_link_serial.py::"
         "test_a_cut_asked_for_before_the_primary_linked_again_is_refused_and_the_restore_point_stays",),
        "every relink gives the link a new serial, so a cut for the link before is refused (S5)",
    ),
    Mutation(
        "replica.no-serving-at-a-fenced-epoch", REPLICA,
        "        self._refuse_while_fenced()\n",
        "        pass\n",
        ("tests/integration/test_resize.py::test_a_primary_fenced_while_it_grows_does_not_serve_again_at_that_epoch",),
        "a grow whose Lease was lost meanwhile does not serve again at the fenced epoch (H17)",
    ),
    Mutation(
        "replica.a-fence-during-the-export-add-takes-it-down", REPLICA,
        "        if self.fenced.is_set():\n            # fenced while the exports were added",
        "        if False:\n            # fenced while the exports were added",
        ("tests/integration/test_resize.py::test_a_fence_that_lands_while_the_grow_adds_the_export_takes_it_down_again",),
        "a fence that lands while the export is added again takes it down and fails the serve (H17)",
    ),
    Mutation(
        "replica.failover-epoch-durable-first", REPLICA,
        "            await self._save(epoch=epoch, stage=Stage.FAILOVER, failover_mode=mode, overlays_durable=False)\n",
        "            self.state = self.state.evolve(epoch=epoch, stage=Stage.FAILOVER, failover_mode=mode)\n",
        (f"{T_RESTART}::test_a_failover_is_durable_before_it_touches_the_daemon",),
        "the new epoch is saved before the failover changes anything",
    ),
    Mutation(
        "replica.undurable-checkpoint-failover-keeps-latest", REPLICA,
        "        if mode is FailoverMode.CHECKPOINT and not (st.overlays_durable and",
        "        if False and not (st.overlays_durable and",
        (f"{T_RESTART}::test_a_failover_is_durable_before_it_touches_the_daemon",),
        "a failover interrupted before its overlays were durable does not commit them",
    ),
    Mutation(
        "replica.interrupted-commit-is-redone", REPLICA,
        "                await self.chain.commit()\n                what = f\"; the interrupted",
        "                pass\n                what = f\"; the interrupted",
        (f"{T_CHAIN}::test_a_crash_during_the_checkpoint_failover_is_finished_on_restart",),
        "a restart after the overlays were durable redoes the commit: the checkpoint state",
    ),
    Mutation(
        "secondary.a-restart-never-resumes-the-undo-log", REPLICA,
        "            self.state = st.evolve(generation=gen, restore_point=False)\n",
        "            self.state = st.evolve(generation=gen, restore_point=was_clean and st.restore_point)\n",
        ("tests/integration/test_unclean_stop.py::"
         "test_a_checkpoint_failover_after_a_clean_restart_and_a_re_pair_never_returns_a_mix",),
        "a restarted secondary's disk is never a restore point: a clean stop's undo log cannot be resumed (S5)",
    ),
    Mutation(
        "replica.unclean-restart-is-no-restore-point", REPLICA,
        "            self.state = st.evolve(generation=gen, restore_point=False)\n",
        "            self.state = st.evolve(generation=gen)\n",
        (f"{T_RESTART}::test_after_an_unclean_stop_the_secondary_has_no_restore_point_until_the_next_cut",),
        "the disk found after an unclean stop is never a restore point",
    ),
    Mutation(
        "replica.restored-primary-does-not-serve", REPLICA,
        "            await self._build_quorum()\n            what += \"; not serving",
        "            await self._build_quorum(); await self._serve_workload()\n            what += \"; not serving",
        (f"{T_RESTART}::test_a_restored_primary_serves_only_after_a_new_epoch",),
        "a primary restored from disk does not serve until the operator confirms it",
    ),
    Mutation(
        "secondary.chain-lengths", SECONDARY,
        "        if any(size != self.size for _, size in headers):\n",
        "        if False:\n",
        (f"{T_RESTART}::test_an_overlay_of_another_size_fails_the_chain_check",),
        "active, hidden and secondary disk have one length",
    ),
    Mutation(
        "replica.no-restore-point-keeps-latest", REPLICA,
        "            why_latest = self._no_restore_point() if mode is FailoverMode.CHECKPOINT else None\n",
        "            why_latest = None\n",
        ("tests/integration/test_replication.py::test_checkpoint_failover_before_any_checkpoint_keeps_the_synced_data",),
        "a checkpoint-mode failover never rolls back to a state that is no restore point",
    ),
    Mutation(
        "replica.latest-keeps-every-write", REPLICA,
        "                if mode is FailoverMode.CHECKPOINT:\n                    await self.chain.make_durable()\n",
        "                if True:\n                    await self.chain.make_durable()\n",
        ("tests/integration/test_replication.py::test_sigkill_of_the_primary_at_a_random_moment_under_load[1-latest]",),
        "a latest-mode failover keeps every acknowledged write",
    ),
    Mutation(
        "replica.checkpoint-mode-rolls-back", REPLICA,
        "                if mode is FailoverMode.CHECKPOINT:\n                    await self.chain.make_durable()\n",
        "                if False:\n                    await self.chain.make_durable()\n",
        ("tests/integration/test_replication.py::test_sigkill_of_the_primary_at_a_random_moment_under_load[1-checkpoint]",),
        "a checkpoint-mode failover is exactly the last checkpoint",
    ),
    Mutation(
        "replica.failover-fences-first", REPLICA,
        "            crashpoints.hit(FAILOVER_EPOCH_SAVED)\n            await self._stop_nbd_server()\n",
        "            crashpoints.hit(FAILOVER_EPOCH_SAVED)\n",
        ("tests/integration/test_replication.py::test_old_primary_cannot_write_to_the_promoted_secondary",),
        "a failover drops the replication export before anything else (the old primary is cut off)",
    ),
    Mutation(
        "secondary.cut-retires-first", SECONDARY,
        "        await self.retire_pending()\n        old, new = self.generation, self.generation + 1\n",
        "        old, new = self.generation, self.generation + 1\n",
        (f"{T_CHAIN}::test_a_burst_of_checkpoint_requests_shares_cuts_and_keeps_the_peer",),
        "a cut never leaves more than two generations attached",
    ),
    Mutation(
        "secondary.failover-retires-first", SECONDARY,
        "        await self.retire_pending()\n        final = await self._cancel_job(r.cow_job(self.generation))\n",
        "        final = await self._cancel_job(r.cow_job(self.generation))\n",
        (f"{T_CHAIN}::test_a_failover_queued_behind_checkpoints_with_no_write_in_flight_succeeds",),
        "no old copy-before-write filter is left when the commit or the writable export needs WRITE",
    ),
    Mutation(
        "secondary.discard-cancels-its-job", SECONDARY,
        "        await self._cancel_job(r.cow_job(gen))\n        await self._detach_nodes(gen)\n",
        "        await self._detach_nodes(gen)\n",
        (f"{T_CHAIN}::test_a_secondary_start_that_fails_after_copy_before_write_began_says_why_and_can_be_retried",),
        "a generation is dropped whole (job, nodes, files): a failed start can be retried",
    ),
    Mutation(
        "replica.size-mismatch-refused", REPLICA,
        "        self._set_size(held)\n",
        "        self._set_size(max(wanted, held))\n",
        (f"{T_RESTART}::test_a_disk_resized_behind_the_replicas_back_is_refused",
         "tests/integration/test_grow_pending.py"),
        "a data dir is never grown by a flag: the persisted size wins over --size",
    ),
    Mutation(
        "replica.one-agent-per-data-dir", REPLICA,
        "        self._dir_lock = await dirlock.hold_data_dir(self.data_dir, give_up)\n",
        "        self._dir_lock = -1\n",
        ("tests/integration/test_restart_guards.py::test_a_second_agent_on_a_data_dir_touches_nothing_until_the_first_has_exited",),
        "a second agent on a data dir reads and writes nothing there until the first has exited",
    ),
    Mutation(
        "dirlock.a-stopped-agent-gives-up-waiting", "operator/pairvol/agent/dirlock.py",
        "        if give_up is not None and give_up.is_set():\n",
        "        if False:\n",
        ("tests/integration/test_restart_guards.py::test_a_second_agent_on_a_data_dir_touches_nothing_until_the_first_has_exited",),
        "an agent stopped while it waits for its data dir exits without opening the replica (I5)",
    ),
    Mutation(
        "replica.a-stop-for-another-epoch-is-refused", REPLICA,
        "            if epoch is not None and epoch != self.state.epoch:\n",
        "            if False:\n",
        ("tests/integration/test_api.py::test_a_stop_for_another_epoch_changes_nothing_and_one_for_this_epoch_detaches_the_peer",),
        "a stop planned for an earlier incarnation never detaches the current primary's peer (E0)",
    ),
    Mutation(
        "replica.interrupted-grow-completed", REPLICA,
        "        if grow_from is not None and grow_from <= actual < size:\n",
        "        if False:\n",
        ("tests/integration/test_resize.py::test_a_crash_at_any_step_of_a_grow_leaves_the_old_or_the_new_size_and_loses_nothing",),
        "a grow a crash interrupted after persisting the new size is completed at restart (E1)",
    ),
    Mutation(
        "replica.an-allocation-cut-short-is-completed", REPLICA,
        "        if grow_from is not None and grow_from <= actual < size:\n",
        "        if grow_from is not None and grow_from == actual < size:\n",
        ("tests/integration/test_resize.py::test_a_crash_at_any_step_of_a_grow_leaves_the_old_or_the_new_size_and_loses_nothing",),
        "a grow whose allocation a crash cut short (the file between the two lengths) is completed at restart (E1)",
    ),
    Mutation(
        "replica.a-grow-given-up-returns-to-the-recorded-length", REPLICA,
        "                await asyncio.to_thread(_grow_file, self.disk_path, size, grow_from)\n",
        "                await asyncio.to_thread(_grow_file, self.disk_path, size)\n",
        ("tests/integration/test_resize.py::test_a_grow_cut_short_and_without_the_space_to_finish_goes_back_to_the_old_size",),
        "a restart that cannot finish a grow returns the file to the length recorded before it (E1)",
    ),
    Mutation(
        "stages.resize-never-shrinks", STAGES,
        "    if new < current:\n",
        "    if False:\n",
        ("tests/unit/test_agent_resize.py",),
        "a volume never shrinks",
    ),
    Mutation(
        "decisions.grow-when-spec-is-larger", DECISIONS,
        "        if spec.size > pa.size:\n",
        "        if False:\n",
        ("tests/unit/test_operator_grow.py",),
        "a larger spec.size grows both replicas",
    ),
    Mutation(
        "replica.missing-disk-refused", REPLICA,
        "            if not disk_exists:\n                raise ReplicaError(",
        "            if False:\n                raise ReplicaError(",
        ("tests/integration/test_api.py::test_restart_finds_images_and_state_and_never_reformats",),
        "a lost disk next to a state is not recreated empty",
    ),
    # ------------------------------------------------------------------ automatic re-protection (R5)
    Mutation(
        "replica.dropped-peer-is-re-protected", REPLICA,
        "            self._after_drop(link, reason)\n",
        "            pass\n",
        (f"{T_AUTO}::test_a_reachable_peer_dropped_under_writes_is_resynced_on_its_own",),
        "a reachable peer dropped by a link failure is resynced without a call",
    ),
    Mutation(
        "replica.older-connections-cut-before-a-link", REPLICA,
        "                self._peer_link_serial = await peerapi.relink(self.peer_api, self.cfg.token, peer_epoch)\n",
        "                pass\n",
        (f"{T_AUTO}::test_a_write_sent_on_a_connection_from_before_the_drop_never_lands_after_the_resync",),
        "a write of an earlier connection to the secondary never lands after the next link's copy",
    ),
    Mutation(
        "replica.refused-attempt-is-not-a-full-copy", REPLICA,
        "            if plan.peer_disk is None or automatic:\n",
        "            if plan.peer_disk is None:\n",
        (f"{T_AUTO}::test_an_attempt_refused_by_another_disk_is_a_failed_attempt_and_keeps_the_record",),
        "an automatic attempt refused its tracked disk's export does not copy everything onto another disk",
    ),
    Mutation(
        "resync.automatic-attempt-only-bitmap", "operator/pairvol/agent/resync.py",
        "    return plan.kind == BITMAP\n",
        "    return True\n",
        ("tests/unit/test_agent_resync.py",),
        "an automatic attempt never turns a caller's bitmap resync into a full one",
    ),
    Mutation(
        "resync.reprotect-bounded", "operator/pairvol/agent/resync.py",
        "    if view.failures < 1 or view.failures > len(REPROTECT_DELAYS_S):\n",
        "    if view.failures < 1:\n        return REPROTECT_DELAYS_S[0]\n    if False:\n",
        ("tests/unit/test_agent_resync.py",),
        "a peer that keeps failing costs a bounded number of attempts, not a resync storm",
    ),
    Mutation(
        "decisions.automatic-resync-never-promoted", DECISIONS,
        "    if lease is not None and lease.resync_epoch is not None and lease.resync_epoch >= marks_floor(world):\n",
        "    if lease is not None and lease.resync_epoch is not None and lease.resync_epoch >= marks_floor(world)"
        " and not manual:\n",
        T_DECISIONS, "a secondary the primary is rewriting on its own is not promoted, even by hand",
    ),
    Mutation(
        "decisions.operator-waits-for-the-primarys-own-re-protection", DECISIONS,
        "        and not pa.reprotecting\n",
        "",
        T_DECISIONS, "a reachable dropped peer is not replaced while the primary re-protects it",
    ),
    # ------------------------------------------------- failovers before re-protection (H20)
    Mutation(
        "decisions.re-protection-waits-for-failovers-elsewhere", DECISIONS,
        "    if reprotect_hold(world):\n        return _held(world, st, actions, \"a new secondary\")\n",
        "",
        T_DECISIONS, "no new secondary is placed while other volumes of the operator fail over",
    ),
    Mutation(
        "decisions.the-re-protection-wait-is-capped", DECISIONS,
        "    return since is None or world.now - since < cap\n",
        "    return True\n",
        T_DECISIONS, "a failover elsewhere that does not end keeps re-protection waiting at most the cap",
    ),
    Mutation(
        "decisions.a-held-step-never-keeps-an-in-sync-secondary", DECISIONS,
        "        if sec.out_of_sync and reprotect_hold(world):\n",
        "        if reprotect_hold(world):\n",
        T_DECISIONS, "a re-pair that marks an in-sync secondary OutOfSync is never held back (H20)",
    ),
    Mutation(
        "decisions.a-failover-coming-counts-as-failing-over", DECISIONS,
        "    return manual or not only_its_lease or fit_to_restart_in_place(world, st) is not None\n",
        "    return False\n",
        T_DECISIONS, "re-protection also waits for volumes whose promotion only waits for the grace or the Lease",
    ),
    Mutation(
        "handlers.the-last-failover-wakes-the-waiting-loops", "operator/pairvol/operator/handlers.py",
        "                if loop.reprotect_held:\n                    loop.wake.set()\n",
        "                if loop.reprotect_held:\n                    pass\n",
        ("tests/unit/test_operator_failover_storm.py",),
        "a held re-protection goes on at once when the last failover elsewhere ends",
    ),
    Mutation(
        "handlers.a-stopped-loop-is-no-failover", "operator/pairvol/operator/handlers.py",
        "                c.placed.pop(self.key, None)\n                c.failover_over(self.key)\n",
        "                c.placed.pop(self.key, None)\n",
        ("tests/unit/test_operator_failover_storm.py",),
        "a volume whose loop stopped while failing over keeps no other volume waiting",
    ),
    Mutation(
        "handlers.a-stored-failover-counts-before-the-first-plan", "operator/pairvol/operator/handlers.py",
        "            ctx().failing_over.add(self.key)\n",
        "            pass\n",
        ("tests/unit/test_operator_failover_storm.py",),
        "after an operator restart, a volume stored as FailingOver holds the others' re-protection at once",
    ),
    Mutation(
        "decisions.a-lost-bring-up-start-is-resumed", DECISIONS,
        "    lost = bring_up_start_lost(world)\n",
        "    lost = None\n",
        T_DECISIONS, "an activated volume whose primary never got its start is not left down for good (H12)",
    ),
    Mutation(
        "decisions.a-bring-up-is-resumed-only-if-nothing-served", DECISIONS,
        "    if pa is None or pa.role != \"none\" or pa.epoch != 0 or pa.busy:\n",
        "    if pa is None or pa.role != \"none\":\n",
        T_DECISIONS, "a primary that got its start (an epoch, a command under way) is never started over (H12)",
    ),
    Mutation(
        "decisions.a-bring-up-with-a-lease-is-not-resumed", DECISIONS,
        "    if st.last_failover is not None or st.last_restart is not None or world.lease is not None:\n",
        "    if st.last_failover is not None or st.last_restart is not None:\n",
        T_DECISIONS, "a volume whose primary took the Lease served: it is never started over (H12)",
    ),
    # ------------------------------------------------------------------ the CSI node plugin's nbd devices
    Mutation(
        "attach.run-kills-a-command-cut-short", "operator/pairvol/csi/attach.py",
        "        if not exited:\n            await _kill_and_wait(proc)\n"
        '    text = out.decode(errors="replace").strip()\n',
        '        pass\n    text = out.decode(errors="replace").strip()\n',
        ("tests/unit/test_csi_run.py",
         "tests/integration/test_csi_node_cancel.py::"
         "test_a_mount_whose_call_the_kubelet_dropped_is_killed_before_the_retry_mounts"),
        "a command of a cancelled node call (the kubelet's deadline, a dropped connection) is killed and waited "
        "for before the volume's lock is free: it never overlaps with the kubelet's retry",
    ),
    Mutation(
        "attach.run-kills-the-command-group", "operator/pairvol/csi/attach.py",
        "        os.killpg(proc.pid, signal.SIGKILL)\n",
        "        os.kill(proc.pid, signal.SIGKILL)\n",
        ("tests/unit/test_csi_run.py",),
        "what a cut-short command started (a helper, a shim's real program) goes with it",
    ),
    Mutation(
        "attach.cancelled-mkfs-finishes", "operator/pairvol/csi/attach.py",
        '            await run(f"mkfs.{fs_type}", "-q", "-E", "nodiscard", device, timeout=300, '
        "finish_on_cancel=True)\n",
        '            await run(f"mkfs.{fs_type}", "-q", "-E", "nodiscard", device, timeout=300)\n',
        ("tests/integration/test_csi_node_cancel.py::"
         "test_a_file_system_being_made_when_the_deadline_passes_is_made_once",),
        "an mkfs under a cancelled stage is finished, not cut short, and the retry finds its file system: one "
        "mkfs per volume",
    ),
    Mutation(
        "attach.start-attacher-kills-a-start-cut-short", "operator/pairvol/csi/attach.py",
        "        if not exited:\n            await _kill_and_wait(proc)\n    if rc != 0:\n",
        "        pass\n    if rc != 0:\n",
        ("tests/integration/test_csi_node_cancel.py::"
         "test_an_attacher_whose_start_the_kubelet_dropped_is_killed_before_the_retry_starts_one",),
        "an attacher start under a cancelled stage is killed before the retry starts its own: one attacher",
    ),
    Mutation(
        "attach.staged-mount-is-the-attachments-device", "operator/pairvol/csi/attach.py",
        "            if number == ours:\n",
        "            if True:\n",
        ("tests/integration/test_csi_node_cancel.py::"
         "test_a_mount_of_something_else_at_the_staging_path_is_replaced_by_the_volume",),
        "a mount at the staging path counts as staged only if it is the attachment's device: a stale file "
        "system left there is never taken for the volume",
    ),
    Mutation(
        "attach.unstage-unmounts-every-stacked-mount", "operator/pairvol/csi/attach.py",
        "            while (record is None or not record.block) and await mounted(path):\n",
        "            if (record is None or not record.block) and await mounted(path):\n",
        ("tests/integration/test_csi_node_cancel.py::"
         "test_unstage_unmounts_every_mount_stacked_at_the_staging_path",),
        "unstage leaves nothing mounted at the staging path: the file system is flushed before its device goes",
    ),
    Mutation(
        "attach.nbd-device-claimed-by-another-attachment", "operator/pairvol/csi/attach.py",
        "        return [d for d in candidates if d not in claimed and not await _device_in_use(d)]\n",
        "        return [d for d in candidates if not await _device_in_use(d)]\n",
        ("tests/unit/test_csi_nbd.py",),
        "two attachments never share a kernel nbd device, even before one of them is connected",
    ),
    Mutation(
        "attach.nbd-unconnected-unused-device-is-nothing", "operator/pairvol/csi/attach.py",
        "        return [device] if await _device_in_use(device) else []\n",
        "        return [device]\n",
        ("tests/unit/test_csi_nbd.py",),
        "a device recorded but never connected (a crash before the connect, a node restart) is not a "
        "broken attachment",
    ),
    Mutation(
        "attach.nbd-device-of-another-backend-is-not-ours", "operator/pairvol/csi/attach.py",
        "            return [device] if await asyncio.to_thread(self._owns, device) else []\n",
        "            return [device]\n",
        ("tests/unit/test_csi_nbd.py",),
        "a device another program connected is never adopted, reported broken or disconnected as ours",
    ),
    Mutation(
        "attach.unstage-flushes-through-an-exclusive-open", "operator/pairvol/csi/attach.py",
        "                return await asyncio.to_thread(os.open, device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)\n",
        "                return await asyncio.to_thread(os.open, device, os.O_RDONLY | os.O_CLOEXEC)\n",
        ("tests/integration/test_csi_node.py::"
         "test_an_unstage_never_detaches_a_file_system_still_mounted_in_another_namespace",),
        "an unstage never detaches a file system that is still alive in another mount namespace: its last "
        "writes (journal checkpoint, superblock) would go to a dead device (L2)",
    ),
    Mutation(
        "attach.unstage-fails-at-the-flush-timeout", "operator/pairvol/csi/attach.py",
        "        return await bounded(asyncio.shield(done), wait_s)\n    except TimeoutError:\n"
        "        raise AttachError(",
        "        return await bounded(asyncio.shield(done), wait_s)\n    except TimeoutError:\n        return None\n"
        "        raise AttachError(",
        ("tests/integration/test_csi_node.py::"
         "test_an_unstage_whose_flush_the_primary_does_not_answer_detaches_nothing_until_the_flush_returns",),
        "a flush the primary does not answer in time fails the unstage: the device is not detached with the "
        "writes it still holds (L2)",
    ),
    Mutation(
        "attach.unstage-fails-on-a-failed-flush", "operator/pairvol/csi/attach.py",
        "        if await self.attacher_running() and not (record is not None and await self.superseded(record"
        ")):\n",
        "        if False:\n",
        ("tests/integration/test_csi_node.py::"
         "test_an_unstage_whose_flush_fails_detaches_nothing_while_the_attacher_could_still_carry_the_writes",),
        "a failed flush fails the unstage while the attacher could still carry the writes to the primary (L2)",
    ),
    Mutation(
        "attach.unstage-retry-waits-for-the-pending-flush", "operator/pairvol/csi/attach.py",
        "        if pending is not None and pending.is_alive():\n",
        "        if False:\n",
        ("tests/integration/test_csi_node.py::"
         "test_an_unstage_whose_flush_the_primary_does_not_answer_detaches_nothing_until_the_flush_returns",),
        "a retried unstage says the earlier flush is still pending instead of starting another one (L2)",
    ),
    Mutation(
        "nbd.partitions-use-the-device", "operator/pairvol/csi/nbd.py",
        '    for dev in [base / "dev", *sorted(base.glob(f"{base.name}p*/dev"))]:\n',
        '    for dev in [base / "dev"]:\n',
        ("tests/unit/test_csi_nbd.py",),
        "a mounted partition of an attachment's nbd device keeps it from being disconnected",
    ),
    Mutation(
        "nbd.connected-means-pid-attribute", "operator/pairvol/csi/nbd.py",
        '    return (SYS_BLOCK / Path(device).name / "pid").exists()\n',
        '    return (SYS_BLOCK / Path(device).name).exists()\n',
        ("tests/unit/test_csi_nbd.py",),
        "a device counts as connected only while the kernel holds a connection for it",
    ),
)
