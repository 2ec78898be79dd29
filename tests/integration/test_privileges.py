"""Agents in the tests run with the privileges of the operator's agent pod, no more.

The agent pod's securityContext (operator/manifests.py) is the only statement of what the
agent may do; the fixtures apply it with the node simulator's code. These tests check the
running processes — the agent and its qemu-storage-daemon — through /proc, so a fixture
that silently started agents as an all-powerful root would fail here.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pairvol.localcluster.netns import ClusterNetwork
from tests.support.agents import Agent, agent_pod_security, agents, pair, privileges, running_as, write_psk


def test_the_agent_pod_grants_no_capability_and_no_escalation() -> None:
    """The contract the rest of this file checks against (docs/security.md says why)."""
    plan = agent_pod_security()
    assert plan.capabilities == frozenset()
    assert plan.no_new_privs and plan.read_only_root
    assert plan.uid == 0  # the owner of the kubelet-created hostPath directory


async def assert_runs_as_the_pod(agent: Agent) -> None:
    assert agent.proc is not None
    qsd = (await agent.status())["qsd"]["pid"]
    expected = running_as(agent_pod_security())
    assert privileges(agent.proc.pid) == expected
    assert privileges(qsd) == expected


async def test_agent_and_its_daemon_have_exactly_the_pod_privileges(tmp_path: Path) -> None:
    async with pair(tmp_path, size="16Mi") as (p, s):
        await assert_runs_as_the_pod(p)
        await assert_runs_as_the_pod(s)


async def test_agent_writes_only_to_its_data_directory(tmp_path: Path) -> None:
    """readOnlyRootFilesystem: the data directory (the pod's hostPath volume) is the only
    writable place the agent sees; the rest of the file system refuses writes."""
    async with agents(tmp_path, 1, size="16Mi") as (a,):
        assert a.proc is not None
        enter = ["nsenter", "--target", str(a.proc.pid), "--mount", "--", "sh", "-c"]
        for path, refused in ((a.data_dir / "probe", False), (tmp_path / "probe", True)):
            proc = await asyncio.create_subprocess_exec(*enter, f"echo x > {path}", stderr=asyncio.subprocess.PIPE)
            _, err = await proc.communicate()
            assert (proc.returncode != 0) == refused, (path, err)
            if refused:
                assert b"Read-only file system" in err
        assert not (tmp_path / "probe").exists()


@pytest.fixture
async def node_network() -> AsyncIterator[ClusterNetwork]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and ip netns")
    async with ClusterNetwork(["pv-c"]) as net:
        yield net


@pytest.mark.netns
async def test_agent_in_a_node_network_namespace_drops_privileges_after_entering_it(
    tmp_path: Path, node_network: ClusterNetwork
) -> None:
    """Entering the namespace needs CAP_SYS_ADMIN; the agent must not keep it."""
    net = node_network
    a = Agent(
        "vol",
        tmp_path / "a",
        "16Mi",
        host=net.node_ip("pv-c"),
        netns=net.netns_name("pv-c"),
        token=secrets.token_hex(16),
        psk_file=write_psk(tmp_path / "psk"),
    )
    try:
        await a.start()
        assert a.proc is not None
        node_ns = os.stat(f"/run/netns/{net.netns_name('pv-c')}")
        assert os.stat(f"/proc/{a.proc.pid}/ns/net").st_ino == node_ns.st_ino
        await assert_runs_as_the_pod(a)
    finally:
        await a.stop()

