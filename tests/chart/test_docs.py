"""The documentation is checked like code: links resolve, references are complete.

README's first screen keeps the two commands; every relative link and anchor in README and
docs/ exists; every alert the chart renders and every value it takes is documented; the
README quickstart shows exactly examples/basic.yaml.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_support import CHART, EXAMPLES, ROOT, one, render

DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]


def anchors(markdown: str) -> set[str]:
    out = set()
    for line in markdown.splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            title = m.group(1).strip().lower()
            title = re.sub(r"[^\w\- ]", "", title)
            out.add(title.replace(" ", "-"))
    return out


def test_first_screen_has_the_two_commands() -> None:
    first = "\n".join((ROOT / "README.md").read_text().splitlines()[:20])
    assert "make demo" in first and "make test" in first


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(page: Path) -> None:
    text = page.read_text()
    for target in re.findall(r"\]\(([^)]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name} links to missing {target}"
        if anchor:
            assert anchor in anchors(dest.read_text()), f"{page.name}: no #{anchor} in {dest.name}"


def test_every_alert_is_documented(tmp_path: Path) -> None:
    values = {"monitoring": {"prometheusRule": {"enabled": True}, "serviceMonitor": {"enabled": True}}}
    rule = one(render(values, tmp=tmp_path), "PrometheusRule")
    doc = (ROOT / "docs" / "alerts.md").read_text()
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            assert f"`{r['alert']}`" in doc, f"{r['alert']} missing from docs/alerts.md"


def test_every_value_is_documented() -> None:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    doc = (ROOT / "docs" / "configuration.md").read_text()
    for top, sub in values.items():
        assert f"`{top}" in doc, f"value {top} missing from docs/configuration.md"
        if isinstance(sub, dict) and top not in ("alerts",):
            for key in sub:
                assert f"{top}.{key}" in doc or f"`.{key}`" in doc, f"{top}.{key} undocumented"


def test_readme_quickstart_shows_the_basic_example() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", readme, re.S)
    basic = yaml.safe_load((EXAMPLES / "basic.yaml").read_text())
    assert any(yaml.safe_load(b) == basic for b in blocks), "README must show examples/basic.yaml"
