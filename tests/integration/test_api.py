"""The agent's HTTP contract (DESIGN.md §3) for callers that get it wrong: malformed
bodies, illegal stage transitions with replication.c's messages, stale epochs, missing
tokens. Each refusal has the right status and says what to do, and changes nothing."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
from pathlib import Path

import pytest

from pairvol.aio import bounded
from tests.support.agents import Agent, AgentCallError, agents, pair


async def refused(call: object, status: int, text: str) -> None:
    with pytest.raises(AgentCallError) as info:
        await call  # type: ignore[misc]
    assert info.value.status == status, info.value.body
    assert text in info.value.body["error"], info.value.body


async def test_malformed_bodies_get_400_with_the_reason(tmp_path: Path) -> None:
    async with agents(tmp_path, 1) as (a,):
        await refused(a.call("POST", "/v1/secondary", raw=b"{not json"), 400, "not valid JSON")
        await refused(a.call("POST", "/v1/secondary", raw=b"[1, 2]"), 400, "must be a JSON object")
        await refused(a.call("POST", "/v1/secondary", {}), 400, "missing 'epoch'")
        await refused(a.call("POST", "/v1/secondary", {"epoch": -1}), 400, "invalid epoch -1")
        await refused(a.call("POST", "/v1/secondary", {"epoch": "3"}), 400, "invalid epoch '3'")
        await refused(a.call("POST", "/v1/secondary", {"epoch": True}), 400, "invalid epoch True")
        await refused(a.call("POST", "/v1/secondary", {"epoch": 1, "force": 1}), 400, "unknown field(s) force")
        await refused(a.call("POST", "/v1/primary", {"epoch": 1, "peer": "nohost"}), 400, "expected HOST:PORT")
        await refused(a.call("POST", "/v1/primary", {"epoch": 1, "peer": "h:99999"}), 400, "invalid port 99999")
        await refused(a.call("POST", "/v1/primary", {"epoch": 1, "peer": "a b:80"}), 400, "invalid host")
        await refused(a.call("POST", "/v1/primary", {"epoch": 1, "sync": "half"}), 400, "invalid sync 'half'")
        await refused(a.call("POST", "/v1/primary", {"epoch": 1, "sync": "full"}), 400, "needs a 'peer'")
        await refused(a.call("POST", "/v1/failover", {"epoch": 1, "mode": "soon"}), 400, "invalid failover mode")
        await refused(a.call("POST", "/v1/secondary", raw=b"x" * 100_000), 413, "too large")
        await refused(a.call("GET", "/v1/nothing"), 404, "Not Found")
        # a path of any length is repeated in one short line (the fault injector's fuzzer
        # sent 2,000 characters and got them all back)
        await refused(a.call("GET", "/v1/" + "a" * 3000), 404, "(3004 characters)")
        await refused(a.call("GET", "/v1/failover"), 405, "Method Not Allowed")
        st = await a.status()
        assert (st["role"], st["stage"], st["epoch"]) == ("none", "none", 0), "a refused call changed state"


async def test_illegal_transitions_get_409_with_replication_c_messages(tmp_path: Path) -> None:
    async with pair(tmp_path, size="16Mi") as (primary, secondary):
        await refused(secondary.secondary(5), 409, "Block replication is running or done")
        await refused(primary.checkpoint(), 409, "checkpoints are cut on the secondary")
        await refused(primary.failover(9), 409, "only a secondary can fail over")
        await refused(secondary.primary(9), 409, "running secondary: promote it with POST /v1/failover")
        await refused(secondary.failover(1), 409, "epoch 1 does not advance the current epoch 1")
        await refused(secondary.failover(0), 409, "stale epoch 0")
        await refused(primary.primary(1, None), 409, "stale epoch 1")
        await secondary.call("POST", "/v1/stop", {})
        st = await secondary.status()
        assert st["stage"] == "done"
        await refused(secondary.checkpoint(), 409, "Block replication is not running")
        await refused(secondary.failover(7), 409, "Block replication is not running")
        # stop after stop: replication.c ignores it once done
        assert (await secondary.call("POST", "/v1/stop", {}))["stage"] == "done"
    async with agents(tmp_path / "fresh", 1) as (a,):
        await refused(a.checkpoint(), 409, "checkpoints are cut on the secondary")
        await refused(a.call("POST", "/v1/stop", {}), 409, "Block replication is not running")


async def test_a_stop_for_another_epoch_changes_nothing_and_one_for_this_epoch_detaches_the_peer(
    tmp_path: Path,
) -> None:
    """A caller that planned a stop for an earlier incarnation (a grow decided before a
    failover, say) names the epoch it knew: the replica at another epoch refuses, keeps its
    peer and replicates every write; named right, the stop detaches the peer."""
    async with pair(tmp_path, size="16Mi") as (primary, secondary):
        await refused(primary.call("POST", "/v1/stop", {"epoch": 1}), 409, "runs at epoch 2, not 1")
        await refused(secondary.call("POST", "/v1/stop", {"epoch": 2}), 409, "runs at epoch 1, not 2")
        assert (await primary.status())["replication"]["state"] == "replicating"
        async with await primary.nbd() as nbd:
            await nbd.pwrite(b"\x5e" * 65536, 0)
            await nbd.flush()
        disk = secondary.data_dir / "disk.raw"
        assert disk.read_bytes()[:65536] == b"\x5e" * 65536, "the refused stop detached the peer"
        st = await primary.call("POST", "/v1/stop", {"epoch": 2})
        assert st["replication"]["state"] == "none" and st["replication"]["outOfSync"] is True, st["replication"]


async def test_token_is_required_on_every_call_but_health_and_metrics(tmp_path: Path) -> None:
    token = secrets.token_hex(16)
    async with agents(tmp_path, 1, token=token) as (a,):
        await refused(a.call("GET", "/v1/status", token=""), 401, "bearer token")
        await refused(a.call("POST", "/v1/secondary", {"epoch": 1}, token="wrong-token-000000"), 401, "bearer token")
        assert (await a.status())["role"] == "none"
        assert "pairvol_agent_qsd_up" in await a.metrics()


async def test_restart_finds_images_and_state_and_never_reformats(tmp_path: Path) -> None:
    async with pair(tmp_path, size="16Mi") as (primary, secondary):
        async with await primary.nbd() as nbd:
            await nbd.pwrite(b"k" * 65536, 0)
        for _ in range(3):
            await secondary.checkpoint()
    # clean restart of the secondary: the same checkpoint's id, a new undo log (S5)
    s = Agent("vol", tmp_path / "replica-1", "16Mi")
    try:
        await s.start()
        st = await s.status()
        assert (st["role"], st["stage"], st["epoch"], st["checkpoint"]["id"]) == ("secondary", "running", 1, 3)
        assert st["checkpoint"]["restorePoint"] is False
        assert "copy-before-write cannot resume on the old undo log" in st["restored"]
        assert (await s.checkpoint())["id"] == 4
    finally:
        await s.stop()
    # a larger --size is a grow still to come (docs/correctness.md E1): the volume keeps its size
    larger = Agent("vol", tmp_path / "replica-1", "32Mi")
    try:
        await larger.start()
        assert (await larger.status())["size"] == 16 << 20
    finally:
        await larger.stop()
    assert (tmp_path / "replica-1" / "disk.raw").stat().st_size == 16 << 20
    # another volume's data dir is refused
    other = await refused_start(Agent("other", tmp_path / "replica-1", "16Mi"))
    assert "holds volume 'vol'" in other
    # a missing disk next to a state file is not silently recreated
    (tmp_path / "replica-0" / "disk.raw").unlink()
    gone = await refused_start(Agent("vol", tmp_path / "replica-0", "16Mi"))
    assert "refusing to create an empty disk" in gone


async def refused_start(agent: Agent) -> str:
    """Start an agent that must refuse to start (exit status 2); its log tail. An agent that
    starts anyway is stopped, never left running."""
    try:
        await agent.start(wait=False)
        code = await bounded(agent.wait_exit(), 30)
        assert code == 2, agent.log_tail()
        return agent.log_tail()
    finally:
        await agent.stop()


async def test_bad_flags_are_refused_with_a_clear_message(tmp_path: Path) -> None:
    for args, text in [
        (["--size", "12Q"], "invalid size '12Q'"),
        (["--size", "1000"], "out of range"),
        (["--size", "1048577"], "not a multiple of 512"),
        (["--name", "../etc"], "invalid volume name"),
        (["--listen", "10.1.2.3:80"], "needs --token-file"),
        (["--peer-timeout", "0"], "use 1..600 seconds"),
        (["--psk-file", "/nonexistent/psk"], "cannot read /nonexistent/psk"),
    ]:
        a = Agent("vol", tmp_path / "bad", "16Mi")
        a.api_port, a.rep_port = 1, 2
        argv = a.argv()
        for i in range(0, len(args), 2):
            if args[i] in argv:
                argv[argv.index(args[i]) + 1] = args[i + 1]
            else:
                argv += args[i : i + 2]
        proc = await asyncio.create_subprocess_exec(*argv, stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        assert proc.returncode == 2, (args, err)
        assert text in err.decode(), (args, err.decode())


async def test_dead_qsd_fails_healthz_and_shows_in_status(tmp_path: Path) -> None:
    async with agents(tmp_path, 1) as (a,):
        pid = (await a.status())["qsd"]["pid"]
        os.kill(pid, signal.SIGKILL)
        for _ in range(50):
            st = await a.status()
            if not st["qsd"]["alive"]:
                break
            await asyncio.sleep(0.1)
        assert st["qsd"]["alive"] is False
        assert "exited with status" in st["qsd"]["error"]
        await refused(a.call("GET", "/healthz"), 503, "exited with status")
        await refused(a.secondary(1), 500, "qemu-storage-daemon")
