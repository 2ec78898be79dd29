"""Kubeconfig files for the local cluster.

Why: ``kubectl``, the ``kubernetes`` client and kopf all find a cluster through a
kubeconfig; writing a real one (plain HTTP to the emulated API server, a static token the
server does not check) lets every tool run unchanged against ``pairvol localcluster``.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

CONTEXT = "pairvol-local"


def render(server_url: str, namespace: str = "default", name: str = CONTEXT) -> dict[str, Any]:
    """The kubeconfig document for ``server_url`` (pure)."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": server_url}}],
        "users": [{"name": name, "user": {"token": "pairvol-localcluster"}}],
        "contexts": [
            {
                "name": name,
                "context": {"cluster": name, "user": name, "namespace": namespace},
            }
        ],
        "current-context": name,
        "preferences": {},
    }


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


async def write(path: Path, server_url: str, namespace: str = "default") -> Path:
    """Write the kubeconfig to ``path`` (atomically, mode 0600) without blocking the loop."""
    text = yaml.safe_dump(render(server_url, namespace), sort_keys=False)
    await asyncio.to_thread(_write_atomically, path, text)
    return path
