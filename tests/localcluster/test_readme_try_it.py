"""The README's "Try it" section works verbatim: its commands, run by bash in order.

A user copies the block into a root shell of a clone; so does this test (with its own
state directory through ``$PAIRVOL_LOCALCLUSTER_DIR``, and helm's caches in a temporary
directory). Every command must succeed (``set -e``), the waits in the block are the
assertions of the story: the chart installed with ``helm install`` runs the operator,
every example that fits the local cluster replicates, the volume fails over to its old
secondary after its primary's node is killed, and everything uninstalls.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from tests.support.ci import tool
from tests.support.localcluster_cli import helm_home, run_session

pytestmark = [
    pytest.mark.netns,
    pytest.mark.timeout(300),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for simulated nodes"),
]

REPO = Path(__file__).resolve().parents[2]


def try_it_block() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Try it\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```\n(.*?)```", section, re.S)
    assert match, "the Try it section has no code block"
    return match.group(1)


async def test_the_readme_try_it_section_runs_verbatim(state_dir: Path, tmp_path: Path) -> None:
    tool("kubectl")  # the block uses kubectl and helm of .venv/tools (make tools); fails on CI if missing
    tool("helm")
    script = "set -euo pipefail -x\n" + try_it_block()
    env = {**os.environ, "PAIRVOL_LOCALCLUSTER_DIR": str(state_dir), "KUBECACHEDIR": str(tmp_path / "kube-cache")}
    env |= helm_home(tmp_path)
    env.pop("KUBECONFIG", None)
    # whatever the block leaves in bash's process group is killed afterwards
    code, text = await run_session(["bash", "-c", script], cwd=REPO, env=env, within=290)
    assert code == 0, text[-4000:]
    for volume in ("basic", "orders-db", "scratch"):
        assert re.search(rf"(rv|replicatedvolume\.pairvol\.io)/{volume} condition met", text), text[-4000:]
    # a workload found the volume by its Service's name (cluster DNS) and wrote and read it
    assert re.search(r"job\.batch/basic-smoke condition met", text), text[-4000:]
    assert 'release "pairvol" uninstalled' in text
    assert "pairvol localcluster: stopped" in text
