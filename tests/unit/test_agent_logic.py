"""The agent's pure parts, without any process: stage transitions (replication.c's
checks and messages), input validation, the persisted
state, and the QMP recipes."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pairvol.agent import state as persist
from pairvol.agent import validate as v
from pairvol.agent.config import AgentConfig, Psk
from pairvol.agent.stages import (
    IllegalTransition,
    Position,
    Role,
    Stage,
    check_checkpoint,
    check_failover,
    check_start_primary,
    check_start_secondary,
    check_stop,
    io_status,
)
from pairvol.qemu import recipes as r

NONE0 = Position(Role.NONE, Stage.NONE, 0)
SEC_RUNNING = Position(Role.SECONDARY, Stage.RUNNING, 4)
PRI_RUNNING = Position(Role.PRIMARY, Stage.RUNNING, 5)


class TestStages:
    def test_a_fresh_replica_may_become_either_role(self) -> None:
        check_start_secondary(NONE0, 0)
        check_start_primary(NONE0, 1)

    def test_starting_twice_is_replication_c_running_or_done(self) -> None:
        with pytest.raises(IllegalTransition, match=r"^Block replication is running or done$"):
            check_start_secondary(SEC_RUNNING, 9)

    def test_stale_epochs_are_fenced_before_anything_else(self) -> None:
        with pytest.raises(IllegalTransition, match="stale epoch 3"):
            check_start_secondary(SEC_RUNNING, 3)
        with pytest.raises(IllegalTransition, match="stale epoch 4"):
            check_failover(PRI_RUNNING.__class__(Role.SECONDARY, Stage.RUNNING, 5), 4)

    def test_role_changes_need_a_higher_epoch(self) -> None:
        with pytest.raises(IllegalTransition, match="does not advance"):
            check_failover(SEC_RUNNING, 4)
        check_failover(SEC_RUNNING, 5)
        with pytest.raises(IllegalTransition, match="does not advance"):
            check_start_primary(PRI_RUNNING, 5)
        check_start_primary(PRI_RUNNING, 6)

    def test_a_primary_is_demoted_to_secondary_only_with_a_newer_epoch(self) -> None:
        with pytest.raises(IllegalTransition, match="does not advance"):
            check_start_secondary(PRI_RUNNING, 5)
        check_start_secondary(PRI_RUNNING, 6)

    def test_checkpoint_and_stop_need_a_running_secondary(self) -> None:
        check_checkpoint(SEC_RUNNING)
        for stage in (Stage.NONE, Stage.FAILOVER_FAILED):
            with pytest.raises(IllegalTransition, match=r"^Block replication is not running$"):
                check_checkpoint(Position(Role.SECONDARY, stage, 1))
        with pytest.raises(IllegalTransition, match="on the secondary"):
            check_checkpoint(PRI_RUNNING)
        assert check_stop(SEC_RUNNING) is True
        assert check_stop(Position(Role.SECONDARY, Stage.DONE, 1)) is False  # ignored, like the seeds
        with pytest.raises(IllegalTransition, match=r"^Block replication is not running$"):
            check_stop(NONE0)

    def test_failover_only_from_a_running_secondary(self) -> None:
        for pos in (NONE0, PRI_RUNNING, Position(Role.SECONDARY, Stage.DONE, 1)):
            with pytest.raises(IllegalTransition):
                check_failover(pos, 99)

    def test_a_running_secondary_cannot_just_be_told_it_is_primary(self) -> None:
        with pytest.raises(IllegalTransition, match="POST /v1/failover"):
            check_start_primary(SEC_RUNNING, 9)

    @pytest.mark.parametrize("stage", [Stage.FAILOVER, Stage.FAILOVER_FAILED])
    def test_a_secondary_in_failover_cannot_be_told_it_is_primary(self, stage: Stage) -> None:
        """Its disk is mid-commit (or the commit failed): serving it would serve half a
        rollback, whatever the epoch."""
        with pytest.raises(IllegalTransition, match=f"failover of this replica is {stage.value.replace('_', ' ')}"):
            check_start_primary(Position(Role.SECONDARY, stage, 4), 9)

    def test_a_stopped_secondary_restarts_only_with_a_new_epoch(self) -> None:
        done = Position(Role.SECONDARY, Stage.DONE, 4)
        with pytest.raises(IllegalTransition, match=r"^Block replication is running or done$"):
            check_start_secondary(done, 4)
        check_start_secondary(done, 5)

    def test_stop_during_a_failover_is_ignored_not_an_error(self) -> None:
        assert check_stop(Position(Role.SECONDARY, Stage.FAILOVER, 4)) is False
        with pytest.raises(IllegalTransition, match=r"^Block replication is not running$"):
            check_stop(Position(Role.SECONDARY, Stage.FAILOVER_FAILED, 4))

    def test_a_caller_at_the_replicas_own_epoch_is_told_about_the_epoch_first(self) -> None:
        """A running secondary asked to become primary without a new epoch: the fencing rule
        answers, not the advice to fail over."""
        with pytest.raises(IllegalTransition, match="epoch 4 does not advance the current epoch 4"):
            check_start_primary(SEC_RUNNING, 4)

    def test_starting_a_running_secondary_again_at_its_epoch_is_running_or_done(self) -> None:
        """The same operator repeating its start gets replication.c's answer, not a fencing one."""
        with pytest.raises(IllegalTransition, match=r"^Block replication is running or done$"):
            check_start_secondary(SEC_RUNNING, 4)

    def test_a_running_secondary_told_it_is_primary_is_told_what_to_do_instead(self) -> None:
        with pytest.raises(IllegalTransition, match=r"^this replica is a running secondary: promote it with "
                                                    r"POST /v1/failover, or stop it with POST /v1/stop first$"):
            check_start_primary(SEC_RUNNING, 9)

    def test_a_stopped_secondary_may_be_restarted_as_primary_by_a_newer_epoch(self) -> None:
        """Only a failover in progress (or failed) refuses whatever the epoch; a finished
        replica may be restarted in a new role when a newer epoch asks."""
        done = Position(Role.SECONDARY, Stage.DONE, 4)
        check_start_primary(done, 5)
        with pytest.raises(IllegalTransition, match="does not advance"):
            check_start_primary(done, 4)

    def test_a_secondary_not_yet_running_is_started_at_its_own_epoch(self) -> None:
        """The agent saves (secondary, none, epoch) before it starts: starting it at that
        epoch is not a role change."""
        check_start_secondary(Position(Role.SECONDARY, Stage.NONE, 4), 4)

    def test_a_primary_becomes_secondary_only_with_a_newer_epoch_whatever_its_stage(self) -> None:
        for stage in (Stage.NONE, Stage.DONE):
            with pytest.raises(IllegalTransition, match="does not advance"):
                check_start_secondary(Position(Role.PRIMARY, stage, 5), 5)
            check_start_secondary(Position(Role.PRIMARY, stage, 5), 6)

    def test_refusals_of_checkpoint_and_failover_say_why(self) -> None:
        for stage in (Stage.FAILOVER, Stage.DONE):
            with pytest.raises(IllegalTransition, match=rf"^Block replication is not running \(stage {stage.value}: "
                                                        r"this replica was promoted or stopped\)$"):
                check_checkpoint(Position(Role.SECONDARY, stage, 1))
        with pytest.raises(IllegalTransition, match=r"^only a secondary can fail over; this replica is primary$"):
            check_failover(PRI_RUNNING, 9)
        with pytest.raises(IllegalTransition, match=r"^Block replication is not running \(stage done\)$"):
            check_failover(Position(Role.SECONDARY, Stage.DONE, 1), 9)

    def test_io_status_follows_replication_get_io_status(self) -> None:
        assert io_status(Role.SECONDARY, Stage.NONE) == "error"
        assert io_status(Role.SECONDARY, Stage.RUNNING) == "ok"
        assert io_status(Role.PRIMARY, Stage.FAILOVER) == "error"
        assert io_status(Role.SECONDARY, Stage.FAILOVER) == "ok"
        assert io_status(Role.SECONDARY, Stage.FAILOVER_FAILED) == "allocated-only"
        assert io_status(Role.PRIMARY, Stage.DONE) == "error"


class TestValidation:
    @pytest.mark.parametrize(
        ("text", "size"),
        [("1Mi", 1 << 20), ("64Mi", 64 << 20), ("2Gi", 2 << 30), ("1048576", 1 << 20), ("1Ti", 1 << 40), ("1G", 10**9)],
    )
    def test_sizes(self, text: str, size: int) -> None:
        assert v.parse_size(text) == size

    @pytest.mark.parametrize("bad", ["", "Mi", "-1Mi", "1.5Gi", "1Pi", "1 Gb", "0", "513", True, None, 1.0])
    def test_bad_sizes(self, bad: object) -> None:
        with pytest.raises(v.InvalidInput):
            v.parse_size(bad)

    @given(st.text(max_size=80))
    def test_names_never_escape_the_data_dir(self, name: str) -> None:
        try:
            ok = v.parse_name(name)
        except v.InvalidInput:
            return
        assert "/" not in ok and ".." not in ok and ok == Path(ok).name

    @pytest.mark.parametrize(
        ("text", "want"),
        [("10.0.0.1:7801", ("10.0.0.1", 7801)), ("[::1]:80", ("::1", 80)), ("node-a.svc:1", ("node-a.svc", 1))],
    )
    def test_host_ports(self, text: str, want: tuple[str, int]) -> None:
        assert v.parse_hostport(text) == want

    @pytest.mark.parametrize("bad", ["x", ":80", "h:", "h:0", "h:65536", "h:-1", "a_b:1", 7801])
    def test_bad_host_ports(self, bad: object) -> None:
        with pytest.raises(v.InvalidInput):
            v.parse_hostport(bad)

    def test_psk_file_format(self) -> None:
        psk = Psk.parse("pairvol:" + "ab" * 32 + "\n", "f")
        assert psk.keys_file() == "pairvol:" + "ab" * 32 + "\n"
        for bad in ["", "nokey", "u:xyz", "u:" + "ab" * 8, "a:" + "ab" * 32 + "\nb:" + "cd" * 32]:
            with pytest.raises(v.InvalidInput, match="USERNAME:HEXKEY"):
                Psk.parse(bad, "f")

    def test_peer_timeout_leaves_a_budget_for_the_mark_after_stall_detection(self) -> None:
        def cfg(t: float) -> AgentConfig:
            return AgentConfig(
                "v", Path("/d"), 1 << 20, ("127.0.0.1", 1), ("127.0.0.1", 2), Path("/d/s"), peer_timeout=t
            )

        assert cfg(5).stall_timeout == 3.75
        assert cfg(1).stall_timeout == 0.5
        for t in (1, 2, 3, 5, 8, 30, 600):
            assert 0.5 <= cfg(t).stall_timeout <= t - 0.5


class TestPersistence:
    def test_state_round_trips_and_alternates_between_two_slots(self, tmp_path: Path) -> None:
        s = persist.PersistedState(
            name="v",
            size=1 << 20,
            role=Role.SECONDARY,
            stage=Stage.RUNNING,
            epoch=7,
            generation=3,
            checkpoint=persist.Checkpoint(5, 1.5, 2.0),
        )
        persist.save(tmp_path, s)
        persist.save(tmp_path, s.evolve(epoch=8))
        assert persist.load(tmp_path) == s.evolve(epoch=8)
        assert {p.name for p in tmp_path.iterdir()} == {"state.a", "state.b"}
        assert all(p.stat().st_size == persist.SLOT_SIZE for p in tmp_path.iterdir())

    def test_a_local_disk_failure_is_kept_in_a_format_older_agents_refuse(self, tmp_path: Path) -> None:
        """H13: an agent that predates the record must not start on such a state (it would
        drop the record); every other state keeps the format they read."""
        s = persist.PersistedState(name="v", size=1 << 20, role=Role.PRIMARY, epoch=4)
        assert json.loads(s.to_json())["version"] == persist.FORMAT_VERSION == 1
        failed = s.evolve(local_failure="local disk failed a write: Input/output error")
        assert json.loads(failed.to_json())["version"] == persist.FORMAT_LOCAL_FAILURE == 2
        persist.save(tmp_path, failed)
        assert persist.load(tmp_path) == failed
        assert persist.PersistedState.from_json(failed.evolve(local_failure=None).to_json()).local_failure is None

    def test_a_torn_write_falls_back_to_the_previous_state(self, tmp_path: Path) -> None:
        s = persist.PersistedState(name="v", size=1 << 20, epoch=1)
        persist.save(tmp_path, s)  # seq 1 -> state.b
        persist.save(tmp_path, s.evolve(epoch=2))  # seq 2 -> state.a
        with (tmp_path / "state.a").open("r+b") as f:  # tear the newest slot
            f.seek(30)
            f.write(b"garbage")
        assert persist.load(tmp_path) == s
        persist.save(tmp_path, s.evolve(epoch=3))  # goes to the torn slot's turn again, by sequence
        assert persist.load(tmp_path) == s.evolve(epoch=3)

    def test_both_slots_corrupt_is_an_error_not_a_fresh_start(self, tmp_path: Path) -> None:
        for name in ("state.a", "state.b"):
            (tmp_path / name).write_bytes(b"x" * 100)
        with pytest.raises(persist.StateError, match="corrupt"):
            persist.load(tmp_path)

    def test_no_state_is_a_new_replica(self, tmp_path: Path) -> None:
        assert persist.load(tmp_path) is None

    def test_a_slot_of_another_format_is_not_read_even_with_a_valid_crc(self, tmp_path: Path) -> None:
        s = persist.PersistedState(name="v", size=1 << 20, epoch=1)
        persist.save(tmp_path, s)  # seq 1 -> state.b
        body = s.evolve(epoch=9).to_json().encode()
        (tmp_path / "state.a").write_bytes(struct.pack(">8sQII", b"PVSTATE2", 2, len(body), zlib.crc32(body)) + body)
        assert persist.load(tmp_path) == s

    def test_a_state_of_another_version_is_refused(self) -> None:
        text = persist.PersistedState(name="v", size=1 << 20).to_json().replace('"version": 1', '"version": 3')
        with pytest.raises(persist.StateError, match="unsupported state version"):
            persist.PersistedState.from_json(text)

    def test_a_state_that_does_not_say_it_was_closed_cleanly_was_not(self) -> None:
        """Overlays are trusted only after a clean stop; when in doubt, they are not."""
        data = json.loads(persist.PersistedState(name="v", size=1 << 20).to_json())
        del data["clean_shutdown"]
        assert persist.PersistedState.from_json(json.dumps(data)).clean_shutdown is False

    def test_every_field_survives_a_restart(self, tmp_path: Path) -> None:
        """OutOfSync and the peer must outlive the agent: a restarted secondary that forgot it
        missed writes could be promoted automatically."""
        s = persist.PersistedState(name="v", size=1 << 20, role=Role.PRIMARY, stage=Stage.RUNNING, epoch=3,
                                   peer="10.0.0.2:7801", out_of_sync=True, clean_shutdown=False)
        persist.save(tmp_path, s)
        assert persist.load(tmp_path) == s
        assert persist.load(tmp_path) == persist.PersistedState.from_json(s.to_json())

    def test_evolve_changes_the_named_fields_only(self) -> None:
        s = persist.PersistedState(name="v", size=1 << 20, epoch=1)
        assert s.evolve(epoch=2, out_of_sync=True) == persist.PersistedState(name="v", size=1 << 20, epoch=2,
                                                                             out_of_sync=True)

    def test_the_state_files_are_private_to_the_agent(self, tmp_path: Path) -> None:
        persist.save(tmp_path, persist.PersistedState(name="v", size=1 << 20))
        persist.save(tmp_path, persist.PersistedState(name="v", size=1 << 20, epoch=1))
        assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {"state.a": 0o600, "state.b": 0o600}

    def test_each_slot_is_allocated_once_and_its_directory_entry_made_durable(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Allocated once, then overwritten in place: a full file system cannot block a
        state change. The calls the code makes are observed; the real ones run."""
        import os

        allocated: list[int] = []
        synced_dirs: list[bool] = []
        real_fallocate, real_fsync = os.posix_fallocate, os.fsync

        def fallocate(fd: int, offset: int, length: int) -> None:
            allocated.append(length)
            real_fallocate(fd, offset, length)

        def fsync(fd: int) -> None:
            synced_dirs.append(os.path.isdir(f"/proc/self/fd/{fd}"))
            real_fsync(fd)

        monkeypatch.setattr(persist.os, "posix_fallocate", fallocate)
        monkeypatch.setattr(persist.os, "fsync", fsync)
        for epoch in range(4):
            persist.save(tmp_path, persist.PersistedState(name="v", size=1 << 20, epoch=epoch))
        assert allocated == [persist.SLOT_SIZE, persist.SLOT_SIZE]
        assert synced_dirs == [False, True, False, True, False, False]  # the slot, then its new entry

    def test_a_state_that_fills_a_slot_exactly_is_saved_and_a_larger_one_refused(self, tmp_path: Path) -> None:
        header = 24  # magic, sequence, length, CRC
        base = len(persist.PersistedState(name="", size=1).to_json())
        fits = persist.PersistedState(name="n" * (persist.SLOT_SIZE - header - base), size=1)
        persist.save(tmp_path, fits)
        assert persist.load(tmp_path) == fits
        too_big = fits.evolve(name=fits.name + "n")
        with pytest.raises(persist.StateError, match=r"^state is 65513 bytes, more than a 65536-byte slot$"):
            persist.save(tmp_path, too_big)
        assert persist.load(tmp_path) == fits

    def test_errors_say_which_file_and_what_went_wrong(self, tmp_path: Path) -> None:
        (tmp_path / "state.a").mkdir()
        with pytest.raises(persist.StateError, match=rf"^cannot read {tmp_path}/state.a: Is a directory$"):
            persist.load(tmp_path)
        gone = tmp_path / "gone"
        with pytest.raises(persist.StateError, match=rf"^cannot persist the replica's state in {gone}/state.b: "
                                                     r"No such file or directory$"):
            persist.save(gone, persist.PersistedState(name="v", size=1))
        (tmp_path / "state.a").rmdir()
        (tmp_path / "state.a").write_bytes(b"x" * 100)
        (tmp_path / "state.b").write_bytes(b"y" * 100)
        no_valid = rf"^no valid state in {tmp_path} \(state.a, state.b are corrupt\)$"
        with pytest.raises(persist.StateError, match=no_valid):
            persist.load(tmp_path)
        with pytest.raises(persist.StateError, match=r"^state is corrupt: 'name'$"):
            persist.PersistedState.from_json('{"version": 1}')

    def test_a_state_without_a_version_is_refused_as_unsupported(self) -> None:
        data = json.loads(persist.PersistedState(name="v", size=1 << 20).to_json())
        del data["version"]
        with pytest.raises(persist.StateError, match=r"^unsupported state version$"):
            persist.PersistedState.from_json(json.dumps(data))

    def test_a_checkpoint_is_reported_in_the_api_spelling(self) -> None:
        assert persist.Checkpoint(5, 1.5, 2.00049).to_api() == {"id": 5, "time": 1.5, "durationMs": 2.0}
        assert persist.Checkpoint(6, 2.5, 1.2345).to_api() == {"id": 6, "time": 2.5, "durationMs": 1.234}


class TestRecipes:
    def test_secondary_chain_is_active_over_hidden_over_disk(self) -> None:
        hidden, active = r.overlay_pair(Path("/d/h.qcow2"), Path("/d/a.qcow2"), 4)
        assert (hidden["node-name"], hidden["backing"]) == ("hidden-4", "disk")
        assert (active["node-name"], active["backing"]) == ("active-4", "hidden-4")
        backup = r.backup_sync_none(4)
        assert (backup["device"], backup["target"], backup["sync"]) == ("disk", "hidden-4", "none")
        assert r.active_commit(4)["device"] == "active-4"

    def test_primary_quorum_and_initial_sync(self) -> None:
        q = r.quorum(["disk"])
        assert (q["vote-threshold"], q["read-pattern"]) == (1, "fifo")
        m = r.mirror_full()
        assert (m["device"], m["copy-mode"], m["sync"]) == ("quorum", "write-blocking", "full")
        c = r.nbd_client("peer", "10.0.0.2", 7801, r.replication_export_name(7), tls=True)
        assert c["tls-creds"] == r.TLS_OBJECT and c["export"] == "replication-e7"
        assert c["reconnect-delay"] == 0  # nothing is ever re-sent to whatever answers there later
        assert "tls-creds" not in r.nbd_client("peer", "h", 1, "replication-e1", tls=False)
