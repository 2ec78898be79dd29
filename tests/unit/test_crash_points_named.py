"""Every declared crash point is armed by name in some test.

The chaos ``crash-point`` class reaches the agent's points by chance (docs/chaos.md); a step
boundary worth a point is worth a test that reaches it for certain and checks the recovery
(tests/integration/test_crash_points.py, or the file whose subject the step is). The
declared points come from the registry (``crashpoints.point`` registers each at import);
"named" is read from the sources of tests/: a string literal as ``PAIRVOL_CRASH_AT`` takes it
(``name``, ``name:N``, comma-separated), or the point's constant imported from its declaring
module and read as ``CONSTANT.name``. A mention in prose (a comment, a docstring) does not
count.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

from pairvol.agent import crashpoints

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "operator" / "pairvol"

Constant = tuple[str, str]  # (declaring module, variable)


def declared() -> dict[str, Constant | None]:
    """Every point, with the module-level variable that holds it (None if none does)."""
    for path in sorted(PACKAGE.rglob("*.py")):
        if "crashpoints.point(" in path.read_text():
            importlib.import_module(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
    found: dict[str, Constant | None] = {}
    for name, cp in crashpoints.POINTS.items():
        module = importlib.import_module(cp.module)
        held = [var for var, value in vars(module).items() if value is cp]
        found[name] = (cp.module, held[0]) if held else None
    return found


def names_in(source: str, constants: dict[Constant, str]) -> set[str]:
    """The points ``source`` names: literals, and ``X.name`` of a constant it imports."""
    tree = ast.parse(source)
    named: set[str] = set()
    imported: dict[str, str] = {}  # local name -> point
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module is not None:
            for alias in node.names:
                point = constants.get((node.module, alias.name))
                if point is not None:
                    imported[alias.asname or alias.name] = point
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            named.update(item.strip().partition(":")[0] for item in node.value.split(","))
        elif (
            isinstance(node, ast.Attribute)
            and node.attr == "name"
            and isinstance(node.value, ast.Name)
            and node.value.id in imported
        ):
            named.add(imported[node.value.id])
    return named


def test_every_declared_crash_point_is_armed_by_name_in_some_test() -> None:
    points = declared()
    assert {"restore.after-cow", "csi.stage.nbd-recorded"} <= set(points), "the registry was not filled"
    constants = {held: name for name, held in points.items() if held is not None}
    named: set[str] = set()
    for path in sorted((ROOT / "tests").rglob("*.py")):
        if path != Path(__file__).resolve():
            named |= names_in(path.read_text(), constants)
    missing = sorted(set(points) - named)
    assert not missing, (
        "crash points no test arms by name (only the chaos runs may reach them): "
        + "; ".join(f"{n} ({crashpoints.POINTS[n].module}: {crashpoints.POINTS[n].doc})" for n in missing)
        + ". Add a test that arms each (PAIRVOL_CRASH_AT), restarts and checks the recovery byte for byte "
        "(tests/integration/test_crash_points.py)."
    )


def test_a_point_counts_as_named_by_its_literal_or_its_imported_constant_not_by_prose() -> None:
    constants = {("pairvol.agent.peerlink", "SYNC_DONE"): "sync.done"}
    assert names_in('ENV = "sync.ready:2, link.failed"', constants) >= {"sync.ready", "link.failed"}
    assert "sync.done" in names_in("from pairvol.agent.peerlink import SYNC_DONE as DONE\narm(DONE.name)\n", constants)
    prose = '"""At ``sync.done`` the mirror is finished."""\n# sync.done\nSYNC_DONE.name\n'
    assert "sync.done" not in names_in(prose, constants)
