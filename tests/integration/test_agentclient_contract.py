"""The operator's agent client against the real agent (DESIGN.md §3): what the operator
sends is what the agent accepts, and what the agent answers is what the operator reads
(``AgentView.from_status``). The unit test of the client checks the requests it sends;
only a real agent can check the answers."""

from __future__ import annotations

import secrets
from dataclasses import replace
from pathlib import Path

import pytest

from pairvol.operator.agentclient import AgentClient, AgentError, LinkChanged
from pairvol.operator.decisions import AgentView, linked_to
from pairvol.qemu.recipes import replication_export_name
from tests.support.agents import Agent, agents


def address(agent: Agent) -> str:
    return f"{agent.host}:{agent.api_port}"


async def test_the_operator_drives_real_agents_through_a_failover_and_reads_their_status(tmp_path: Path) -> None:
    token = secrets.token_hex(16)
    c = AgentClient(timeout_s=10)
    try:
        async with agents(tmp_path, 2, size="16Mi", token=token) as (p, s):
            assert await c.healthz(address(p))
            fresh = AgentView.from_status(await c.status(address(s), token))
            assert (fresh.role, fresh.stage, fresh.epoch) == ("none", "none", 0)

            started = await c.secondary(address(s), token, 1)
            assert (started["role"], started["stage"], started["epoch"]) == ("secondary", "running", 1)
            # as decisions.StartPrimary sends it: with the secondary's API (peerApi)
            started = await c.primary(address(p), token, 2, s.replication_address, "full", peer_api=address(s))
            assert (started["role"], started["epoch"]) == ("primary", 2)
            await p.wait_replicating()
            prim = AgentView.from_status(await c.status(address(p), token))
            assert (prim.role, prim.epoch, prim.replication_state, prim.peer) == (
                "primary", 2, "replicating", s.replication_address)

            assert (prim.size, AgentView.from_status(await c.status(address(s), token)).size) == (16 << 20,) * 2
            # the link names the incarnation it goes to (docs/correctness.md H14)
            sec = AgentView.from_status(await c.status(address(s), token))
            assert prim.link_export == replication_export_name(1) and linked_to(prim, sec)
            assert not linked_to(prim, replace(sec, epoch=3))  # a later incarnation at the same address

            # the cut names the link the primary reports in sync, the secondary's own serial
            # (docs/correctness.md S5); a serial of another link is refused, recognisably
            assert prim.link_serial is not None
            assert (await c.status(address(s), token))["replication"]["linkSerial"] == prim.link_serial
            with pytest.raises(LinkChanged) as refused:
                await c.checkpoint(address(s), token, prim.link_serial + "0")
            assert refused.value.status == 409 and "no checkpoint was cut" in refused.value.message
            cut = await c.checkpoint(address(s), token, prim.link_serial)
            assert cut["id"] == 1 and cut["durationMs"] > 0
            sec = AgentView.from_status(await c.status(address(s), token))
            assert (sec.role, sec.stage, sec.epoch) == ("secondary", "running", 1)
            assert sec.checkpoint is not None and sec.checkpoint["id"] == 1

            p.kill()
            await p.wait_exit()
            done = await c.failover(address(s), token, 3, "checkpoint")
            assert (done["mode"], done["checkpointId"]) == ("checkpoint", 1) and done["durationMs"] > 0
            promoted = AgentView.from_status(await c.status(address(s), token))
            assert (promoted.role, promoted.stage, promoted.epoch) == ("primary", "done", 3)

            with pytest.raises(AgentError) as err:
                await c.failover(address(s), token, 3, "latest")
            assert err.value.status == 409 and "only a secondary can fail over" in err.value.message
            with pytest.raises(AgentError) as err:
                await c.secondary(address(s), token, 2)
            assert err.value.status == 409 and "stale epoch 2" in err.value.message
            with pytest.raises(AgentError) as err:
                await c.status(address(s), "not-the-token-0000")
            assert err.value.status == 401
    finally:
        await c.close()


async def test_the_operator_grows_real_agents_in_its_order(tmp_path: Path) -> None:
    """decisions.Grow's calls: the primary lets go, the secondary grows, the primary grows;
    both then report the size the operator reads (AgentView.size)."""
    token = secrets.token_hex(16)
    c = AgentClient(timeout_s=10)
    try:
        async with agents(tmp_path, 2, size="16Mi", token=token) as (p, s):
            await c.secondary(address(s), token, 1)
            await c.primary(address(p), token, 2, s.replication_address, "full")
            await p.wait_replicating()
            await c.stop(address(p), token)
            await c.resize(address(s), token, 1, 32 << 20)
            await c.resize(address(p), token, 2, 32 << 20)
            views = [AgentView.from_status(await c.status(address(a), token)) for a in (p, s)]
            assert [(v.role, v.size) for v in views] == [("primary", 32 << 20), ("secondary", 32 << 20)]
            with pytest.raises(AgentError) as err:
                await c.resize(address(p), token, 2, 16 << 20)
            assert err.value.status == 409 and "shrinking" in err.value.message
    finally:
        await c.close()
