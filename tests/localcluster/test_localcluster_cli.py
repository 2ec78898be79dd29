"""`pairvol localcluster up|status|node|down`, run from a shell as a user would.

`up --detach` returns once the cluster serves; the other commands, separate processes,
drive it through its state directory; `down` stops it and leaves no process behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import aiohttp
import pytest
from tests.support.ci import tool
from tests.support.localcluster_cli import alive, kubectl, pairvol

from pairvol.aio import bounded

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.netns,
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for simulated nodes"),
]


async def test_up_status_node_kill_and_down_from_other_processes(state_dir: Path) -> None:
    sd = ("--state-dir", str(state_dir))
    up = await pairvol("up", "--detach", "--nodes", "2", *sd)
    assert up.code == 0, up.err
    assert "nodes (simulated (pods run as processes)): node-1, node-2" in up.out
    assert f"export KUBECONFIG={state_dir / 'kubeconfig'}" in up.out
    kubeconfig = str(state_dir / "kubeconfig")
    labelled = await kubectl(kubeconfig, "get", "nodes", "-l", "pairvol.io/storage=true", "-o", "name")
    assert labelled.split() == ["node/node-1", "node/node-2"]  # what examples/manual.yaml selects

    second = await pairvol("up", *sd)  # one cluster per state directory
    assert second.code == 1 and "already running" in second.err

    status = json.loads((await pairvol("status", "--json", *sd)).out)
    assert [(n["name"], n["ready"], n["state"]) for n in status["nodes"]] == [
        ("node-1", "True", "running"),
        ("node-2", "True", "running"),
    ]
    pid = status["pid"]

    killed = await pairvol("node", "kill", "node-1", *sd)
    assert killed.code == 0, killed.err
    assert killed.out.startswith("node node-1 killed")
    table = (await pairvol("status", *sd)).out  # Ready turns Unknown only after the grace period
    assert any(line.split()[::2] == ["node-1", "killed"] for line in table.splitlines()), table
    assert "node-1" in await kubectl(kubeconfig, "get", "node", "node-1")  # the API server lives on

    wrong = await pairvol("node", "kill", "node-7", *sd)
    assert wrong.code == 1 and "there is no node 'node-7'; nodes: node-1, node-2" in wrong.err

    down = await pairvol("down", *sd)
    assert (down.code, down.out.strip()) == (0, "pairvol localcluster: stopped"), down.err
    assert not alive(pid)
    assert not (state_dir / "kubeconfig").exists() and not (state_dir / "cluster.json").exists()
    after = await pairvol("status", *sd)
    assert after.code == 1 and "no local cluster is running" in after.err


async def test_up_without_the_localcluster_extra_says_what_to_install(tmp_path: Path) -> None:
    # As after `pip install pairvol` alone: kmock (the extra's package) cannot be imported.
    code = "import sys; sys.modules['kmock'] = None; from pairvol.cli import main; sys.exit(main())"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, "localcluster", "up", "--state-dir", str(tmp_path / "s"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await bounded(proc.communicate(), 30)
    assert proc.returncode == 1
    assert "pip install 'pairvol[localcluster]'" in err.decode() and "'kmock'" in err.decode()


@pytest.mark.timeout(300)
@pytest.mark.timeout(300)
async def test_up_operator_installs_the_chart_with_helm_and_its_operator_replicates_a_volume(state_dir: Path) -> None:
    tool("helm")  # what `up --operator` runs (.venv/tools, `make tools`)
    sd = ("--state-dir", str(state_dir))
    up = await pairvol(
        "up", "--detach", "--nodes", "2", "--operator", "--csi", "--watch-namespace", "apps", *sd, within=240
    )
    assert up.code == 0, up.err
    assert "operator: installed: helm release pairvol in namespace pairvol, watching namespace apps" in up.out, up.out
    assert "CSI driver: pairvol.io running: node plugins on node-1, node-2, StorageClass pairvol" in up.out, up.out
    kubeconfig = str(state_dir / "kubeconfig")

    # the chart's Deployment, unmodified: two replicas of the image's entrypoint with the chart's args
    deployment = json.loads(
        await kubectl(kubeconfig, "get", "deploy", "-n", "pairvol", "pairvol-operator", "-o", "json")
    )
    assert deployment["status"].get("readyReplicas") == 2
    selector = "app.kubernetes.io/component=operator"
    listed = await kubectl(kubeconfig, "get", "pods", "-n", "pairvol", "-l", selector, "-o", "json")
    pods = json.loads(listed)["items"]
    assert len(pods) == 2
    for pod in pods:
        (container,) = pod["spec"]["containers"]
        assert "command" not in container and container["args"][-1] == "operator"
        assert container["image"] == "pairvol/pairvol:0.1.0"
        assert pod["status"]["containerStatuses"][0]["restartCount"] == 0
        assert pod["spec"]["serviceAccountName"] == "pairvol-operator"

    await kubectl(kubeconfig, "apply", "-n", "apps", "-f", str(REPO / "examples" / "basic.yaml"))
    replicating = "--for=jsonpath={.status.phase}=Replicating"
    await kubectl(kubeconfig, "wait", "-n", "apps", "rv/basic", replicating, "--timeout=150s", within=160)
    peering = json.loads(await kubectl(kubeconfig, "get", "kopfpeering", "-n", "apps", "pairvol", "-o", "json"))
    assert len(peering.get("status") or {}) == 2, peering  # both replicas take part, one acts

    # The operator holds its ServiceAccount's token, nothing more: the chart grants no Secrets
    # of kube-system. Its credentials are where the node simulator mounted them from, its
    # user's (kubectl sends no token over plain HTTP: asked with the token directly).
    status = json.loads((await pairvol("status", "--json", *sd)).out)
    pod = pods[0]
    credentials = Path(status["nodes_root"]) / pod["spec"]["nodeName"] / "pods" / pod["metadata"]["uid"]
    token_file = credentials / "serviceaccount" / "token"
    assert (token_file.stat().st_uid, token_file.stat().st_mode & 0o777) == (65532, 0o600)
    headers = {"Authorization": f"Bearer {token_file.read_text()}"}
    async with aiohttp.ClientSession(status["url"], headers=headers) as api:
        async with api.get("/apis/pairvol.io/v1alpha1/namespaces/apps/replicatedvolumes") as response:
            assert response.status == 200
            assert [v["metadata"]["name"] for v in (await response.json())["items"]] == ["basic"]
        async with api.get("/api/v1/namespaces/kube-system/secrets") as response:
            assert response.status == 403
            refusal = (await response.json())["message"]
    assert 'User "system:serviceaccount:pairvol:pairvol-operator" cannot list resource "secrets"' in refusal

    # --csi: a pod mounts a volume through a claim of the chart's StorageClass (examples/pvc.yaml)
    await kubectl(kubeconfig, "apply", "-n", "apps", "-f", str(REPO / "examples" / "pvc.yaml"))
    succeeded = "--for=jsonpath={.status.phase}=Succeeded"
    await kubectl(kubeconfig, "wait", "-n", "apps", "pod/notes-writer", succeeded, "--timeout=150s", within=160)
    assert "written at" in await kubectl(kubeconfig, "logs", "-n", "apps", "notes-writer")
    claim = json.loads(await kubectl(kubeconfig, "get", "pvc", "-n", "apps", "notes", "-o", "json"))
    volume = claim["spec"]["volumeName"]
    rv = json.loads(await kubectl(kubeconfig, "get", "rv", "-n", "apps", volume, "-o", "json"))
    assert rv["status"]["phase"] in ("Replicating", "Syncing"), rv["status"]
    await kubectl(kubeconfig, "delete", "-n", "apps", "pod/notes-writer", "pvc/notes", "--timeout=60s", within=70)
    # reclaimPolicy Delete: the claim's volume goes with it
    await kubectl(kubeconfig, "wait", "-n", "apps", f"rv/{volume}", "--for=delete", "--timeout=90s", within=100)

    await kubectl(kubeconfig, "delete", "-n", "apps", "rv", "basic", "--timeout=60s", within=70)
    down = await pairvol("down", *sd)
    assert down.code == 0, down.err
