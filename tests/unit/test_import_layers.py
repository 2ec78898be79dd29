"""The layers of the package, read from the source: who may import whom.

The agent and the operator are deployed, upgraded and reasoned about separately; what they
share (the Kubernetes client, the Lease protocol, names on objects) lives in
``pairvol.kube`` below both. Every import statement counts, also one inside a function or
behind ``TYPE_CHECKING``: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "operator" / "pairvol"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def imports_of(path: Path, module: str | None = None) -> set[str]:
    """Absolute names of every module that ``path`` (module ``module``) imports, relative
    imports resolved."""
    module = module or module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def modules(subpackage: str) -> list[Path]:
    return sorted((PACKAGE / subpackage).rglob("*.py"))


def offending(subpackage: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    bad: dict[str, list[str]] = {}
    for path in modules(subpackage):
        hits = sorted(n for n in imports_of(path) if any(n == f or n.startswith(f + ".") for f in forbidden))
        if hits:
            bad[str(path.relative_to(PACKAGE.parent))] = hits
    return bad


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("agent", ("pairvol.operator",)),
        ("operator", ("pairvol.agent",)),
        ("kube", ("pairvol.agent", "pairvol.operator", "pairvol.localcluster", "pairvol.csi", "kopf")),
    ],
)
def test_a_layer_does_not_import_the_ones_it_must_not_lean_on(layer: str, forbidden: tuple[str, ...]) -> None:
    assert modules(layer), f"no modules found under {PACKAGE / layer}"
    assert offending(layer, forbidden) == {}


def test_the_agent_and_the_operator_reach_kubernetes_through_the_kube_layer() -> None:
    """Both use pairvol.kube; no module outside it builds requests with its own HTTP client
    against the API server (the local cluster's node simulator is the emulated control plane
    and is not part of either)."""
    users = {
        layer: [p for p in modules(layer) if any(n.startswith("pairvol.kube") for n in imports_of(p))]
        for layer in ("agent", "operator")
    }
    assert users["agent"] and users["operator"]
    for layer in ("agent", "operator", "kube", "csi"):
        for path in modules(layer):
            assert "kubernetes.config" not in path.read_text() or layer == "kube", path


def test_the_import_reader_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """The checker itself: imports inside a function, behind TYPE_CHECKING and relative ones
    are all found, so the layer test above cannot pass by not looking."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    import pairvol.csi.node\n"
        "def later():\n"
        "    from ..operator import handlers\n"
        "    from .lease import attach_lease\n"
    )
    found = imports_of(probe, "pairvol.agent.probe")
    assert {"pairvol.csi.node", "pairvol.operator.handlers", "pairvol.agent.lease.attach_lease"} <= found
    assert "pairvol.agent.lease" in imports_of(PACKAGE / "agent" / "cli.py")  # a lazy import in the real code
