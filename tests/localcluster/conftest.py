"""Fixtures for the local cluster tests (shared by the apiserver and kubelet owners).

Keep fixtures small and clearly named: ``api_cluster`` is a running LocalCluster (API
server + CRDs from crds/ + Ready nodes, no node simulator); ``kubectl`` runs the real
kubectl binary against a kubeconfig.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tests.support.ci import tool
from tests.support.localcluster_cli import stop_detached

from pairvol.aio import bounded
from pairvol.localcluster.cluster import LocalCluster
from pairvol.localcluster.kubelet_api import KubeApi

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def cluster() -> AsyncIterator[LocalCluster]:
    """An empty emulated cluster (no nodes, no CRDs) for the node simulator's tests."""
    async with LocalCluster(nodes=0, load_crds=False) as c:
        yield c


@pytest.fixture
async def api(cluster: LocalCluster) -> AsyncIterator[KubeApi]:
    async with KubeApi(cluster.url) as client:
        yield client


@pytest.fixture
async def api_cluster() -> AsyncIterator[LocalCluster]:
    """A running emulated cluster with 3 Ready nodes and the repository's CRDs."""
    async with LocalCluster(nodes=3) as cluster:
        yield cluster


@pytest.fixture
async def api_http(api_cluster: LocalCluster) -> AsyncIterator[aiohttp.ClientSession]:
    """An aiohttp session whose relative URLs go to api_cluster's API server."""
    async with aiohttp.ClientSession(base_url=api_cluster.url) as session:
        yield session


KubectlRunner = Callable[..., Coroutine[Any, Any, tuple[int, str, str]]]


@pytest.fixture
def kubectl(api_cluster: LocalCluster, tmp_path: Path) -> KubectlRunner:
    """``await kubectl("get", "rv")`` -> (returncode, stdout, stderr) against api_cluster.

    kubectl's discovery/OpenAPI cache goes to a per-test directory, not ~/.kube/cache.
    """
    binary = tool("kubectl")  # .venv/tools first, then PATH; skips locally, fails on CI

    async def run(*args: str, stdin: str | None = None, within: float = 30) -> tuple[int, str, str]:
        env = {
            **os.environ,
            "KUBECONFIG": str(api_cluster.kubeconfig_path),
            "KUBECACHEDIR": str(tmp_path / "kube-cache"),
        }
        proc = await asyncio.create_subprocess_exec(
            binary,
            *args,
            env=env,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await bounded(proc.communicate(stdin.encode() if stdin is not None else None), within)
        finally:
            if proc.returncode is None:  # timed out or cancelled: kill what we started
                proc.kill()
                await proc.wait()
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    return run


@pytest.fixture
async def state_dir(tmp_path: Path) -> AsyncIterator[Path]:
    """A state directory for `pairvol localcluster up --detach`; whatever runs there is
    stopped afterwards, even when the test failed."""
    state = tmp_path / "state"
    yield state
    await stop_detached(state)
