"""A command whose optional dependency is missing says which pip extra installs it.

`pip install pairvol` leaves out kmock (the emulated API server's HTTP scaffold); the
local cluster and the demo need it. They must say `pip install 'pairvol[localcluster]'`
instead of dying with a ModuleNotFoundError traceback.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# Run pairvol's entry point with kmock made unimportable, as in a plain `pip install pairvol`.
_WITHOUT_KMOCK = "import sys; sys.modules['kmock'] = None; from pairvol.cli import main; sys.exit(main(sys.argv[1:]))"


def test_localcluster_up_without_kmock_names_the_extra_to_install() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_KMOCK, "localcluster", "up", "--nodes", "1", "--no-simulate-nodes"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "pip install 'pairvol[localcluster]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_agent_re_protects_on_its_own_unless_told_not_to(tmp_path: Path) -> None:
    import argparse

    from pairvol.agent import cli as agent_cli

    parser = argparse.ArgumentParser()
    agent_cli.register(parser.add_subparsers())
    base = ["agent", "--name", "vol", "--data-dir", str(tmp_path), "--size", "16Mi"]
    assert agent_cli.config_from_args(parser.parse_args(base)).auto_reprotect is True
    off = parser.parse_args([*base, "--auto-reprotect", "off"])
    assert agent_cli.config_from_args(off).auto_reprotect is False
