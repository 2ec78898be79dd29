"""Which images the local cluster runs, and what a container with each one runs (pure).

The chart gives its operator container only ``args`` and the image ``pairvol/pairvol:<tag>``:
that must run the Dockerfile's ENTRYPOINT (``pairvol``) with those args, whatever registry
or tag the values name. Any other image has nothing to run without a command, and says so.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pairvol.localcluster.images import IMAGES, ImagePullError, container_command, find_image, repository_of
from pairvol.localcluster.kubelet_pods import container_argv

REPO = Path(__file__).resolve().parents[2]


class TestReferences:
    @pytest.mark.parametrize(
        ("image", "repository"),
        [
            ("pairvol/pairvol", "pairvol/pairvol"),
            ("pairvol/pairvol:0.1.0", "pairvol/pairvol"),
            ("ghcr.io/pairvol/pairvol:0.1.0", "pairvol/pairvol"),
            ("registry.example.com:5000/pairvol/pairvol:1.2", "pairvol/pairvol"),
            ("localhost/pairvol/pairvol@sha256:" + "ab" * 32, "pairvol/pairvol"),
            ("localhost:5000/team/pairvol/pairvol:dev", "team/pairvol/pairvol"),
            ("busybox", "busybox"),
            ("docker.io/library/busybox:1.36", "library/busybox"),
        ],
    )
    def test_registry_tag_and_digest_are_not_part_of_the_repository(self, image: str, repository: str) -> None:
        assert repository_of(image) == repository

    @pytest.mark.parametrize(
        "image",
        [
            "pairvol/pairvol:0.1.0",
            "ghcr.io/pairvol/pairvol:9.9.9",
            "registry.local:5000/ops/pairvol/pairvol",
            "pairvol/pairvol",
        ],
    )
    def test_the_pairvol_image_under_any_registry_and_tag_is_the_local_one(self, image: str) -> None:
        local = find_image(image)
        assert local is not None and local.entrypoint == ("pairvol",)

    @pytest.mark.parametrize(
        "image", ["busybox", "pairvol/other:0.1.0", "mypairvol/pairvol", "pairvol", "x/pairvol/pairvolx"]
    )
    def test_other_images_are_not_there(self, image: str) -> None:
        assert find_image(image) is None

    def test_the_table_agrees_with_the_dockerfile(self) -> None:
        dockerfile = (REPO / "Dockerfile").read_text()
        (local,) = IMAGES
        entrypoint = re.search(r"^ENTRYPOINT \[(.*)\]$", dockerfile, re.M)
        cmd = re.search(r"^CMD \[(.*)\]$", dockerfile, re.M)
        assert entrypoint and cmd
        assert tuple(p.strip().strip('"') for p in entrypoint.group(1).split(",")) == local.entrypoint
        assert tuple(p.strip().strip('"') for p in cmd.group(1).split(",")) == local.cmd
        assert f"docker build -t {local.repository}:" in dockerfile


class TestWhatRuns:
    def test_args_without_command_run_the_images_entrypoint(self) -> None:
        container = {"name": "operator", "image": "pairvol/pairvol:0.1.0", "args": ["--verbose", "operator"]}
        assert container_command(container) == ["pairvol", "--verbose", "operator"]

    def test_neither_command_nor_args_run_entrypoint_and_cmd(self) -> None:
        assert container_command({"name": "c", "image": "pairvol/pairvol"}) == ["pairvol", "--help"]
        assert container_command({"name": "c", "image": "pairvol/pairvol", "args": []}) == ["pairvol", "--help"]

    def test_a_command_replaces_entrypoint_and_cmd_whatever_the_image(self) -> None:
        assert container_command({"name": "c", "image": "pairvol/pairvol", "command": ["qemu-io"]}) == ["qemu-io"]
        container = {"name": "c", "image": "busybox", "command": ["sleep"], "args": ["5"]}
        assert container_command(container) == ["sleep", "5"]

    def test_an_unknown_image_without_command_names_the_image_and_what_there_is(self) -> None:
        with pytest.raises(ImagePullError) as caught:
            container_command({"name": "web", "image": "nginx:1.27", "args": ["-g", "daemon off;"]})
        assert caught.value.image == "nginx:1.27" and caught.value.container == "web"
        message = str(caught.value)
        assert "'nginx:1.27'" in message and "only pairvol/pairvol" in message and "command" in message

    def test_no_image_and_no_command_is_refused_too(self) -> None:
        with pytest.raises(ImagePullError, match="no image is not available"):
            container_command({"name": "c"})

    def test_only_the_containers_own_parts_are_expanded(self) -> None:
        env = {"NS": "apps", "HELP": "x"}
        container = {"name": "c", "image": "pairvol/pairvol", "args": ["operator", "--namespace", "$(NS)"]}
        assert container_argv(container, env) == ["pairvol", "operator", "--namespace", "apps"]
        container = {"name": "c", "image": "busybox", "command": ["echo", "$(NS)"], "args": ["$(HELP)"]}
        assert container_argv(container, env) == ["echo", "apps", "x"]
