"""A stop whose qemu-storage-daemon does not exit cleanly after ``quit`` is no clean stop
(docs/correctness.md S5).

The secondary's overlays (the undo log of the current checkpoint) run with
``cache.no-flush``: their qcow2 metadata reaches the files when the daemon closes them.
A daemon that does not exit in time is killed, one that exits with a failure status may
not have written it either: such a stop must be recorded as unclean, so that the next
start keeps no restore point and a checkpoint-mode failover keeps the latest state
instead of committing an undo log that may be damaged. Real agents and daemons; the
daemon is frozen with SIGSTOP when the agent is told to stop, and the promoted disk is
compared byte for byte with what the primary wrote."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from pathlib import Path
from typing import Any

import pytest

from pairvol.agent import state as persist
from pairvol.aio import bounded
from pairvol.qemu.qsd import Qsd
from tests.support.agents import Agent, filled_and_checkpointed
from tests.support.bytes_compare import assert_same_image

MiB = 1 << 20
SIZE = 16 * MiB
UNCLEAN = "recording this stop as unclean"


# ------------------------------------------------------------------ the daemon's own report


async def test_a_daemon_that_quits_reports_a_clean_exit(tmp_path: Path) -> None:
    qsd = Qsd(tmp_path / "run", tmp_path / "qsd.log")
    await qsd.start()
    assert await qsd.stop() is True
    assert qsd.proc is not None and qsd.proc.returncode == 0


async def test_a_daemon_frozen_at_quit_is_killed_and_reports_no_clean_exit(tmp_path: Path) -> None:
    qsd = Qsd(tmp_path / "run", tmp_path / "qsd.log")
    await qsd.start()
    assert qsd.pid is not None
    os.kill(qsd.pid, signal.SIGSTOP)
    assert await qsd.stop(timeout=1.0) is False
    assert qsd.proc is not None and qsd.proc.returncode == -signal.SIGKILL


async def test_a_daemon_that_dies_while_it_quits_reports_no_clean_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It exits on its own within the time given, but not with status 0 (here the kernel
    ends it, as the OOM killer would, right when ``quit`` is sent)."""
    qsd = Qsd(tmp_path / "run", tmp_path / "qsd.log")
    await qsd.start()
    execute = qsd.qmp.execute

    async def dying_quit(cmd: str, args: dict[str, Any] | None = None) -> Any:
        if cmd == "quit" and qsd.pid is not None:
            os.kill(qsd.pid, signal.SIGKILL)
        return await execute(cmd, args)

    monkeypatch.setattr(qsd.qmp, "execute", dying_quit)
    assert await qsd.stop(timeout=10.0) is False
    assert qsd.proc is not None and qsd.proc.returncode == -signal.SIGKILL


# ------------------------------------------------------------------ the secondary's stop


async def read_back(agent: Agent) -> bytes:
    async with await agent.nbd() as nbd:
        return await nbd.read_all()


async def write_after_the_cut(primary: Agent, image: bytearray) -> None:
    """Overwrites all over the volume: each one copies the checkpoint's data into the
    undo log first."""
    rng = random.Random("unclean-stop")
    async with await primary.nbd() as nbd:
        for _ in range(40):
            length = rng.choice([4096, 65536, 300 * 512, MiB])
            offset = rng.randrange(0, SIZE - length, 512)
            data = rng.randbytes(length)
            await nbd.pwrite(data, offset)
            image[offset : offset + length] = data


async def settled(secondary: Agent) -> dict[str, Any]:
    """The secondary's status once the cut's retire is over (no QMP command of the agent's
    in flight when the daemon is frozen)."""
    for _ in range(200):
        st: dict[str, Any] = await secondary.status()
        if st["overlays"]["retiring"] is None:
            return st
        await asyncio.sleep(0.05)
    raise AssertionError(f"the retire after the cut did not end: {st['overlays']}")


async def stop_agent(agent: Agent) -> None:
    """SIGTERM, as the kubelet stops a pod; the agent's own stop runs to its end."""
    agent.kill(signal.SIGTERM)
    assert await bounded(agent.wait_exit(), 60) == 0, agent.log_tail(30)


async def test_a_secondary_whose_daemon_was_killed_at_its_stop_has_no_restore_point(tmp_path: Path) -> None:
    """The daemon is frozen when the agent stops: ``quit`` goes unanswered, the daemon is
    killed. The stop is recorded unclean, the restart says there is no restore point, and
    a checkpoint-mode failover keeps the latest state: every byte the primary wrote."""
    async with filled_and_checkpointed(tmp_path / "replica-0", tmp_path / "replica-1", 2) as (primary, secondary):
        image = bytearray(b"\xee" * SIZE)
        await write_after_the_cut(primary, image)
        st = await settled(secondary)
        assert st["checkpoint"]["restorePoint"] is True, "precondition: a restore point with an undo log"
        primary.kill()  # the primary's node is lost
        await primary.wait_exit()

        daemon = int(await asyncio.to_thread((secondary.data_dir / ".run" / "qsd.pid").read_text))
        os.kill(daemon, signal.SIGSTOP)  # it will not answer quit
        await stop_agent(secondary)
        with pytest.raises(ProcessLookupError):
            os.kill(daemon, 0)  # the frozen daemon is not left behind
        found = await asyncio.to_thread(persist.load, secondary.data_dir)
        assert found is not None and found.clean_shutdown is False, "a killed daemon's stop was recorded as clean"
        assert UNCLEAN in secondary.log_tail(30)

        await secondary.start()
        st = await secondary.status()
        assert (st["role"], st["stage"]) == ("secondary", "running"), st
        assert st["checkpoint"]["restorePoint"] is False, st["checkpoint"]
        assert "the undo log was not closed cleanly" in st["restored"], st["restored"]

        result = await secondary.failover(7, "checkpoint")
        assert (result["mode"], result["requestedMode"]) == ("latest", "checkpoint"), result
        assert "kept the latest state" in result["note"], result
        assert_same_image(await read_back(secondary), bytes(image), "promoted secondary")


async def test_a_secondary_stopped_cleanly_is_recorded_clean_and_starts_a_new_undo_log(tmp_path: Path) -> None:
    """The counterpart: the daemon quits, the stop is recorded clean. The restart starts a
    new undo log all the same (the old one cannot be resumed: see the next test), so there
    is no restore point until the next cut, and a checkpoint-mode failover after that cut
    returns the volume exactly as it was then."""
    async with filled_and_checkpointed(tmp_path / "replica-0", tmp_path / "replica-1", 2) as (primary, secondary):
        cut = (await secondary.status())["checkpoint"]["id"]
        latest = bytearray(b"\xee" * SIZE)
        await write_after_the_cut(primary, latest)
        await settled(secondary)
        primary.kill()
        await primary.wait_exit()

        await stop_agent(secondary)
        assert UNCLEAN not in secondary.log_tail(30)
        found = await asyncio.to_thread(persist.load, secondary.data_dir)
        assert found is not None and found.clean_shutdown is True

        await secondary.start()
        st = await secondary.status()
        assert st["checkpoint"]["restorePoint"] is False, st["checkpoint"]
        assert "copy-before-write cannot resume on the old undo log" in st["restored"], st["restored"]
        await secondary.checkpoint()
        after = await secondary.status()
        assert after["checkpoint"]["id"] > cut and after["checkpoint"]["restorePoint"] is True, after["checkpoint"]

        result = await secondary.failover(7, "checkpoint")
        assert (result["mode"], result["checkpointId"]) == ("checkpoint", after["checkpoint"]["id"]), result
        assert_same_image(await read_back(secondary), bytes(latest), "promoted secondary")


async def test_a_checkpoint_failover_after_a_clean_restart_and_a_re_pair_never_returns_a_mix(tmp_path: Path) -> None:
    """A clean restart of the secondary (an agent upgrade on its node) while the primary lives
    on: the primary pairs with it again (a full copy, as a re-pair without a record does),
    then dies. A checkpoint-mode failover returns either the cut exactly or, without a
    restore point, the latest state — never the cut with some regions of later states. A
    copy-before-write job started again on the old undo log would copy the current data of
    every region written after the restart over what the undo log already held for it."""
    async with filled_and_checkpointed(tmp_path / "replica-0", tmp_path / "replica-1", 2) as (primary, secondary):
        cut = (await secondary.status())["checkpoint"]["id"]
        latest = bytearray(b"\xee" * SIZE)
        await write_after_the_cut(primary, latest)
        await settled(secondary)

        await stop_agent(secondary)
        assert UNCLEAN not in secondary.log_tail(30)
        await secondary.start()
        st = await secondary.status()
        assert (st["role"], st["stage"]) == ("secondary", "running"), st
        await primary.call(
            "POST", "/v1/primary", {"epoch": 7, "peer": secondary.replication_address, "sync": "full", "peerEpoch": 5}
        )
        await primary.wait_replicating()
        primary.kill()
        await primary.wait_exit()

        result = await secondary.failover(8, "checkpoint")
        got = await read_back(secondary)
        if result["mode"] == "checkpoint":
            assert result["checkpointId"] == cut, result
            assert_same_image(got, b"\xee" * SIZE, "promoted at the cut")
        else:
            assert_same_image(got, bytes(latest), "promoted at the latest state")
        assert st["checkpoint"]["restorePoint"] is False, "a restarted secondary has no undo log it can trust"
        assert (result["mode"], result["requestedMode"]) == ("latest", "checkpoint"), result
