"""The container images the local cluster can run, and what each one runs.

Why: the local cluster has no container runtime and no registry: a container is a process
of this machine. The one image pairvol ships (the ``Dockerfile``: ``pairvol/pairvol``,
``ENTRYPOINT ["pairvol"]``, ``CMD ["--help"]``) holds nothing but this Python package and
Debian's QEMU tools, both installed here, so a container naming that image runs what the
image would: its ENTRYPOINT from this environment (the ``pairvol`` next to the running
interpreter comes first on every container's ``PATH``) with the container's ``args`` or
the image's CMD. That is what lets the Helm chart, whose operator Deployment gives only
``args``, run unmodified.

The table is matched on the repository path, whatever the registry in front and the tag
or digest behind (``ghcr.io/x/pairvol/pairvol:0.2.0`` is the same image): the local
package stands for every version of it. An image not in the table has nothing to run
unless the container gives its own ``command`` (run on the node, as the simulator always
did; tests use any image name with a command); without one the container fails as a
kubelet shows a failed pull (``ErrImagePull``, then ``ImagePullBackOff``), with a message
naming the image and what the local cluster has instead.

Pure: no I/O; the node simulator (:mod:`pairvol.localcluster.kubelet`) applies it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pairvol.errors import PairvolError


@dataclass(frozen=True)
class LocalImage:
    """An image the local cluster runs from this machine's installation."""

    repository: str  # the path without registry, tag or digest, e.g. "pairvol/pairvol"
    entrypoint: tuple[str, ...]  # the image's ENTRYPOINT
    cmd: tuple[str, ...]  # the image's CMD (default arguments)
    source: str  # where it is defined, for messages


#: Every image the local cluster has. Keep in step with the Dockerfile.
IMAGES: tuple[LocalImage, ...] = (
    LocalImage("pairvol/pairvol", entrypoint=("pairvol",), cmd=("--help",), source="Dockerfile"),
)


class ImagePullError(PairvolError):
    """A container's image is not one the local cluster has (and it gives no command)."""

    def __init__(self, container: str, image: str, message: str) -> None:
        super().__init__(message)
        self.container = container
        self.image = image


def repository_of(image: str) -> str:
    """The repository path of an image reference: no registry host, tag or digest.

    ``registry.example.com:5000/pairvol/pairvol:0.1.0`` -> ``pairvol/pairvol``;
    ``docker.io/library/busybox`` -> ``library/busybox``. The first component is a registry
    host when it has a dot or a port, or is ``localhost`` (Docker's rule).
    """
    ref = image.strip()
    ref = ref.split("@", 1)[0]  # digest
    parts = ref.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        parts = parts[1:]
    last = parts[-1]
    if ":" in last:  # tag (a registry port was removed above)
        parts[-1] = last.split(":", 1)[0]
    return "/".join(parts)


def find_image(image: str, images: Sequence[LocalImage] = IMAGES) -> LocalImage | None:
    """The local image an image reference names: its repository path is the table's, or
    ends with ``/`` + the table's (a registry's own prefix, e.g. ``myorg/pairvol/pairvol``)."""
    path = repository_of(image)
    for local in images:
        if path == local.repository or path.endswith("/" + local.repository):
            return local
    return None


def container_command(container: Mapping[str, Any], images: Sequence[LocalImage] = IMAGES) -> list[str]:
    """command + args as a container runtime combines them with the image (unexpanded).

    Kubernetes' rules: ``command`` replaces the ENTRYPOINT (and the image's CMD is then
    ignored); ``args`` replaces the CMD. Raises :class:`ImagePullError` when the command
    must come from an image the local cluster does not have.
    """
    name = str(container.get("name"))
    command = [str(c) for c in container.get("command") or []]
    args = [str(a) for a in container.get("args") or []]
    if command:
        return command + args
    image = str(container.get("image") or "")
    local = find_image(image) if image else None
    if local is None:
        have = ", ".join(f"{i.repository}:<any tag> (from the {i.source})" for i in images)
        what = f"image {image!r}" if image else "no image"
        raise ImagePullError(
            name,
            image,
            f"container {name!r} has no command and {what} is not available: the local cluster has "
            f"only {have}, run from this machine's installation; use that image, or give the "
            "container a command to run on the node",
        )
    return [*local.entrypoint, *(args or local.cmd)]
