"""The Dockerfile cannot be built here (no Docker), so its promises are checked statically.

It must start from Debian bookworm (the Debian these tests run on), install the packages
that really contain qemu-img and qemu-storage-daemon (asked of dpkg on this machine), build
the repository's wheel, and run the `pairvol` console script that pyproject.toml declares.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib

from chart_support import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def apt_packages() -> set[str]:
    pkgs: set[str] = set()
    for word, rest in instructions():
        if word == "RUN" and "apt-get install" in rest:
            after = rest.split("apt-get install", 1)[1].split("&&")[0]
            pkgs |= {t for t in after.split() if not t.startswith("-")}
    return pkgs


def test_final_stage_is_debian_bookworm_slim() -> None:
    froms = [rest for word, rest in instructions() if word == "FROM"]
    assert froms[-1] == "debian:bookworm-slim"


def test_packages_that_hold_the_qemu_tools_are_installed() -> None:
    dpkg = shutil.which("dpkg")
    assert dpkg, "dpkg not found: these tests run on Debian"
    for binary in ("/usr/bin/qemu-img", "/usr/bin/qemu-storage-daemon"):
        out = subprocess.run([dpkg, "-S", binary], capture_output=True, text=True, check=True)
        package = out.stdout.split(":")[0]
        assert package in apt_packages(), f"{binary} comes from {package}, not installed"
    assert {"iproute2", "python3-venv"} <= apt_packages()


def test_entrypoint_is_the_declared_console_script() -> None:
    entry = [rest for word, rest in instructions() if word == "ENTRYPOINT"]
    assert [json.loads(e) for e in entry] == [["pairvol"]]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["pairvol"] == "pairvol.cli:main"


def test_image_installs_the_wheel_built_from_this_repository() -> None:
    runs = " ".join(rest for word, rest in instructions() if word == "RUN")
    assert "pip wheel" in runs and "--no-deps" in runs
    assert "pip install --no-cache-dir /wheels/*.whl" in runs
    copies = [rest for word, rest in instructions() if word == "COPY"]
    assert "pyproject.toml README.md ./" in copies and "operator ./operator" in copies


def test_chart_default_image_matches_the_documented_build_command() -> None:
    import yaml

    values = yaml.safe_load((ROOT / "charts" / "pairvol" / "values.yaml").read_text())
    chart = yaml.safe_load((ROOT / "charts" / "pairvol" / "Chart.yaml").read_text())
    tag = f"{values['image']['repository']}:{chart['appVersion']}"
    assert f"docker build -t {tag} ." in DOCKERFILE
