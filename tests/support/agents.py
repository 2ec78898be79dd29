"""Real agents for tests: pairs and groups of `pairvol agent` processes, always cleaned
up by PID (see pairvol.agent.procs).

Every agent runs as the operator's pod runs it: the agent container's securityContext
comes from :func:`pairvol.operator.manifests.pod_manifest` and is applied by the node
simulator's own code (:func:`pairvol.localcluster.kubelet_pods.security_plan` and
:func:`~pairvol.localcluster.kubelet_pods.launch_script`): its user, no capability
beyond what the manifest grants, no_new_privs, and a read-only root file system with the
data directory as its only writable mount — entered after the node's network namespace.
A test that passes only because it runs with more privileges than a pod cannot pass here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pairvol.agent import procs
from pairvol.agent.procs import AgentCallError, free_port, write_psk
from pairvol.api.spec import parse_spec
from pairvol.localcluster.kubelet_pods import Mount, SecurityPlan, launch_script, security_plan
from pairvol.operator.manifests import OperatorConfig, pod_manifest

__all__ = [
    "Agent",
    "AgentCallError",
    "agent_pod_security",
    "agents",
    "free_port",
    "pair",
    "pod_launcher",
    "privileges",
    "running_as",
    "write_psk",
]


@functools.cache
def agent_pod_security() -> SecurityPlan:
    """How the operator's agent pod runs its agent (pod and container securityContext)."""
    spec = parse_spec({"size": "16Mi"}, name="vol")
    owner = {"metadata": {"name": "vol", "uid": "0"}}
    pod = pod_manifest(
        pod="vol-0",
        node="n",
        role="secondary",
        volume="vol",
        namespace="ns",
        spec=spec,
        owner=owner,
        config=OperatorConfig(),
    )
    (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "agent"]
    return security_plan(pod, container)


def privileges(pid: int) -> dict[str, int]:
    """Capability sets, no_new_privs and real/effective uid of a running process (/proc)."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    status = {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}
    out = {key: int(status[key], 16) for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
    out["NoNewPrivs"] = int(status["NoNewPrivs"])
    uid = status["Uid"].split()
    out["uid"], out["euid"] = int(uid[0]), int(uid[1])
    return out


def running_as(plan: SecurityPlan) -> dict[str, int]:
    """What :func:`privileges` shows for a process started according to ``plan``."""
    return {**plan.expected_status(), "NoNewPrivs": int(plan.no_new_privs), "uid": plan.uid, "euid": plan.uid}


def pod_launcher(agent: procs.Agent, command: list[str]) -> list[str]:
    """Start ``command`` as the agent pod's container: private mount namespace with the
    data directory bound as a volume, then the node's network namespace, then the pod's
    user and capabilities."""
    volume = Mount(agent.data_dir, PurePosixPath(agent.data_dir), read_only=False)
    argv, _ = launch_script(
        cgroup_procs=None,
        mounts=[volume],
        netns=agent.netns,
        workdir=None,
        argv=command,
        security=agent_pod_security(),
    )
    return argv


#: how many times slower than this machine the tests run: 1, but for the emulated guest of
#: tests/integration/test_csi_kernel_nbd.py, whose agents take that much longer to start
SLOWDOWN = float(os.environ.get("PAIRVOL_TEST_SLOWDOWN", "1"))


@dataclass
class Agent(procs.Agent):
    """A :class:`pairvol.agent.procs.Agent` started with the agent pod's privileges."""

    launcher: procs.Launcher | None = pod_launcher

    def __post_init__(self) -> None:
        # a peer that answers slower only because the CPU is emulated or shared is not a
        # stalled one: the link's timeout stretches with the rest of the test's time
        self.peer_timeout *= SLOWDOWN

    async def wait_ready(self, timeout: float = 20.0) -> None:
        await super().wait_ready(timeout * SLOWDOWN)

    async def wait_replicating(self, timeout: float = 60.0) -> dict[str, Any]:
        return await super().wait_replicating(timeout * SLOWDOWN)


def stopped(pid: int) -> bool:
    """The process is frozen (SIGSTOP): state ``T`` in /proc/PID/stat."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    return False


async def frozen(agent: Agent, point: str, within: float = 30.0) -> None:
    """Until ``agent`` stopped itself (SIGSTOP) at the crash point armed as ``point:N:stop``."""
    assert agent.proc is not None
    deadline = time.monotonic() + within
    while not stopped(agent.proc.pid):
        assert time.monotonic() < deadline, f"the agent never reached {point}: {agent.log_tail()}"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def agents(tmp: Path, count: int = 2, size: str = "64Mi", **kw: Any) -> AsyncIterator[list[Agent]]:
    made = [Agent(name="vol", data_dir=tmp / f"replica-{i}", size=size, **kw) for i in range(count)]
    try:
        await asyncio.gather(*(a.start() for a in made))
        yield made
    finally:
        await asyncio.gather(*(a.stop() for a in made), return_exceptions=True)


@contextlib.asynccontextmanager
async def pair(tmp: Path, size: str = "64Mi", sync: str = "full", **kw: Any) -> AsyncIterator[tuple[Agent, Agent]]:
    """A replicating pair: replica-0 primary (epoch 2), replica-1 secondary (epoch 1)."""
    async with agents(tmp, 2, size, **kw) as (p, s):
        await s.secondary(1)
        await p.primary(2, s.replication_address, sync)
        await p.wait_replicating()
        yield p, s


@contextlib.asynccontextmanager
async def filled_and_checkpointed(
    primary_dir: Path, secondary_dir: Path, peer_timeout: float
) -> AsyncIterator[tuple[Agent, Agent]]:
    """A 16 MiB pair (secondary at epoch 5, primary at 6) whose volume is all 0xee at a
    checkpoint: every later overwrite needs room in the secondary's undo log (put its data
    dir on a small file system to run it out)."""
    primary = Agent("vol", primary_dir, "16Mi", peer_timeout=peer_timeout)
    secondary = Agent("vol", secondary_dir, "16Mi", peer_timeout=peer_timeout)
    try:
        await asyncio.gather(primary.start(), secondary.start())
        await secondary.secondary(5)
        await primary.primary(6, secondary.replication_address, "full")
        await primary.wait_replicating()
        async with await primary.nbd() as nbd:
            for off in range(0, 16 << 20, 1 << 20):
                await nbd.pwrite(b"\xee" * (1 << 20), off)
        await secondary.checkpoint()
        yield primary, secondary
    finally:
        await asyncio.gather(primary.stop(), secondary.stop(), return_exceptions=True)
