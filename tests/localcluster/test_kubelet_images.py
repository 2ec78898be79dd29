"""Images and ServiceAccount credentials in the node simulator, as a cluster user sees them.

A container of the pairvol image that gives only ``args`` (the chart's operator does) runs
the image's ENTRYPOINT from this installation; an image the local cluster does not have
shows ``ErrImagePull`` / ``ImagePullBackOff`` with a message saying so, and starts once
the pod names a usable image. With ServiceAccount tokens, a container running as a
non-root user with a read-only root finds its kubeconfig where a kubelet mounts the
account's credentials, owned by it, and the API server holds it to the account's RBAC.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from tests.localcluster.test_kubelet import GRACE, NODES, NS, create, eventually, get_pod
from tests.localcluster.test_pod_network import events_of

from pairvol.localcluster.cluster import LocalCluster
from pairvol.localcluster.kubelet import NodeSimulator
from pairvol.localcluster.kubelet_api import KubeApi

pytestmark = [
    pytest.mark.netns,
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]


async def simulator(cluster: LocalCluster, root: Path, tokens: bool) -> NodeSimulator:
    return NodeSimulator(
        cluster.url,
        nodes=NODES,
        root=root,
        status_interval=0.3,
        node_monitor_grace=GRACE,
        backoff_base=0.2,
        config_retry=0.3,
        service_account_tokens=tokens,
    )


@pytest.fixture
async def sim(cluster: LocalCluster, tmp_path: Path) -> AsyncIterator[NodeSimulator]:
    async with await simulator(cluster, tmp_path / "nodes", tokens=False) as s:
        yield s


@pytest.fixture
async def sim_with_tokens(cluster: LocalCluster, tmp_path: Path) -> AsyncIterator[NodeSimulator]:
    async with await simulator(cluster, tmp_path / "nodes", tokens=True) as s:
        yield s


def image_pod(name: str, container: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"nodeName": "node-a", "containers": [{"name": "main", **container}], **spec},
    }


async def phase(api: KubeApi, name: str, wanted: str) -> dict[str, Any] | None:
    obj = await get_pod(api, name)
    return obj if (obj.get("status") or {}).get("phase") == wanted else None


async def waiting(api: KubeApi, name: str, reason: str) -> dict[str, Any] | None:
    statuses = ((await get_pod(api, name)).get("status") or {}).get("containerStatuses") or [{}]
    state = statuses[0].get("state", {}).get("waiting") or {}
    return state if state.get("reason") == reason else None


async def test_the_pairvol_image_with_only_args_runs_its_entrypoint_from_this_installation(
    sim: NodeSimulator, api: KubeApi
) -> None:
    container = {"image": "ghcr.io/pairvol/pairvol:0.1.0", "args": ["agent", "--help"]}
    await create(api, image_pod("entrypoint", container, restartPolicy="Never"))

    done = await eventually(lambda: phase(api, "entrypoint", "Succeeded"))

    assert done["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert "usage: pairvol agent" in sim.log_path("node-a", NS, "entrypoint").read_text()
    pulled = [e["message"] for e in await events_of(api, "entrypoint") if e["reason"] == "Pulled"]
    assert pulled == ['Container image "ghcr.io/pairvol/pairvol:0.1.0" already present on machine']


async def test_an_image_the_local_cluster_lacks_fails_as_a_pull_until_the_pod_names_one_it_has(
    sim: NodeSimulator, api: KubeApi
) -> None:
    await create(api, image_pod("nginx", {"image": "nginx:1.27"}, restartPolicy="Never"))

    pulled = await eventually(lambda: waiting(api, "nginx", "ErrImagePull"))
    assert "'nginx:1.27'" in pulled["message"] and "only pairvol/pairvol" in pulled["message"]
    backoff = await eventually(lambda: waiting(api, "nginx", "ImagePullBackOff"))
    assert backoff["message"].startswith('Back-off pulling image "nginx:1.27"')
    assert (await get_pod(api, "nginx"))["status"]["phase"] == "Pending"
    reasons = {(e["reason"], e["message"].split(":")[0]) for e in await events_of(api, "nginx")}
    assert ("Failed", 'Failed to pull image "nginx') in reasons and (
        "BackOff",
        'Back-off pulling image "nginx',
    ) in reasons

    patch = {"spec": {"containers": [{"name": "main", "image": "pairvol/pairvol:0.1.0", "args": ["--help"]}]}}
    await api.request(
        "PATCH",
        f"/api/v1/namespaces/{NS}/pods/nginx",
        body=patch,
        content_type="application/strategic-merge-patch+json",
    )
    await eventually(lambda: phase(api, "nginx", "Succeeded"))


async def test_a_non_root_container_reads_its_service_account_kubeconfig_and_is_held_to_its_rbac(
    sim_with_tokens: NodeSimulator, api: KubeApi
) -> None:
    script = (
        "import json, os, urllib.error, urllib.request, yaml\n"
        "path = os.environ['KUBECONFIG']\n"
        "st = os.stat(path)\n"
        "print('kubeconfig', path, st.st_uid, oct(st.st_mode & 0o777), 'home', os.environ['HOME'], flush=True)\n"
        "config = yaml.safe_load(open(path))\n"
        "server, token_file = config['clusters'][0]['cluster']['server'], config['users'][0]['user']['tokenFile']\n"
        "token = open(os.path.join(os.path.dirname(path), token_file)).read()\n"
        "print('tokenFile', token_file, flush=True)\n"
        "request = urllib.request.Request(server + '/api/v1/namespaces/kube-system/secrets',"
        " headers={'Authorization': 'Bearer ' + token})\n"
        "try:\n"
        "    urllib.request.urlopen(request, timeout=5)\n"
        "except urllib.error.HTTPError as exc:\n"
        "    print('secrets', exc.code, flush=True)\n"
    )
    container = {
        "image": "busybox",
        "command": [sys.executable, "-c", script],
        "securityContext": {"runAsUser": 65532, "runAsGroup": 65532, "readOnlyRootFilesystem": True},
    }
    await create(api, image_pod("reader", container, restartPolicy="Never"))

    await eventually(lambda: phase(api, "reader", "Succeeded"))

    log = sim_with_tokens.log_path("node-a", NS, "reader").read_text()
    assert "kubeconfig /var/run/secrets/kubernetes.io/serviceaccount/kubeconfig 65532 0o600 home /" in log
    assert "tokenFile token" in log  # beside the kubeconfig, where the kubelet replaces it
    assert "secrets 403" in log


async def test_the_token_file_is_replaced_before_the_token_expires(
    cluster: LocalCluster, sim_with_tokens: NodeSimulator, api: KubeApi
) -> None:
    """As a kubelet refreshes a projected token: a pod that reads its token file anew at every
    request keeps being let in after its first token expired; the first one is refused."""
    cluster.api.max_token_expiration_s = 2
    script = (
        "import os, time, urllib.error, urllib.request, yaml\n"
        "path = os.environ['KUBECONFIG']\n"
        "config = yaml.safe_load(open(path))\n"
        "server = config['clusters'][0]['cluster']['server']\n"
        "token_path = os.path.join(os.path.dirname(path), config['users'][0]['user']['tokenFile'])\n"
        "def get(token):\n"
        "    request = urllib.request.Request(server + '/api/v1/namespaces/default/pods/reader',"
        " headers={'Authorization': 'Bearer ' + token})\n"
        "    try:\n"
        "        return urllib.request.urlopen(request, timeout=5).status\n"
        "    except urllib.error.HTTPError as exc:\n"
        "        return exc.code\n"
        "first = open(token_path).read()\n"
        "tokens, answers = {first}, []\n"
        "for _ in range(14):\n"
        "    time.sleep(0.3)\n"
        "    current = open(token_path).read()\n"
        "    tokens.add(current)\n"
        "    answers.append(get(current))\n"
        "print('tokens', len(tokens), 'answers', sorted(set(answers)), 'first', get(first), flush=True)\n"
    )
    container = {"image": "busybox", "command": [sys.executable, "-c", script]}
    await create(api, image_pod("reader", container, restartPolicy="Never"))

    await eventually(lambda: phase(api, "reader", "Succeeded"))

    log = sim_with_tokens.log_path("node-a", NS, "reader").read_text()
    line = next(x for x in log.splitlines() if x.startswith("tokens "))
    count, answers, first = int(line.split()[1]), line.split("answers ")[1].split(" first")[0], line.split()[-1]
    assert count >= 3, line  # replaced every second (half of 2 s)
    assert answers == "[403]", line  # always authenticated (403: the default account may not read pods)
    assert first == "401", line  # the first token is dead by now
