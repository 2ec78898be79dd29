"""What the driver's containers may do: the one statement of their privileges.

The chart's templates carry the same securityContexts (a chart test compares them with
these functions) and the tests start the node plugin with exactly what
:func:`node_security_context` grants, through the node simulator's code.

The **node plugin** is privileged, and must be: it mounts file systems and bind mounts
(CAP_SYS_ADMIN), creates loop devices and a FUSE export (the host's ``/dev/loop*``,
``/dev/loop-control`` and ``/dev/fuse``, which only a privileged container sees and may
open: loop devices appear on demand, so no fixed device list fits), and its mounts must
propagate to the kubelet (``mountPropagation: Bidirectional``, which Kubernetes allows only
in privileged containers). It runs as root because it runs mount, losetup and mkfs.

The **attacher host** (pairvol.csi.attacher_host) runs the attachers in a container of its
own, so that they outlive restarts of the node plugin's container. What it does needs
CAP_SYS_ADMIN and ``/dev/fuse`` (an attacher mounts its FUSE export) and root (the
attachments' files are root's, mode 0600); and its FUSE mounts must reach the node and
the node plugin's container: ``mountPropagation: Bidirectional`` on the state directory,
which Kubernetes allows only in a privileged container. So it is privileged too, but it
mounts nothing else of the node (no kubelet directory, no ``/dev``), has no Kubernetes
API access of its own to use, and runs nothing but qemu-storage-daemon and umount.

The **controller** only talks to the Kubernetes API: non-root, no capabilities, read-only
root file system, like the operator.
"""

from __future__ import annotations

from typing import Any

NODE_PLUGIN_USER = 0
ATTACHER_HOST_USER = 0
CONTROLLER_USER = 65532
NODE_PLUGIN_CONTAINER = "csi-node"
ATTACHER_HOST_CONTAINER = "attacher-host"
#: where the attacher host listens, relative to the node plugin's state directory (which
#: both containers mount; the directory is made 0700 by the host)
ATTACHER_HOST_SOCKET = ".attacher-host/host.sock"


def node_security_context() -> dict[str, Any]:
    """The node plugin container's securityContext."""
    return {"privileged": True, "runAsUser": NODE_PLUGIN_USER}


def attacher_host_security_context() -> dict[str, Any]:
    """The attacher host container's securityContext (see the module docstring)."""
    return {"privileged": True, "runAsUser": ATTACHER_HOST_USER}


def controller_security_context() -> dict[str, Any]:
    """The controller container's securityContext (and its sidecars')."""
    return {
        "runAsNonRoot": True,
        "runAsUser": CONTROLLER_USER,
        "runAsGroup": CONTROLLER_USER,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def node_pod(node: str) -> dict[str, Any]:
    """The node plugin's pod as the DaemonSet creates it on ``node`` (the parts the
    security rules read): the node plugin's container and the attacher host's."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"pairvol-csi-node-{node}"},
        "spec": {
            "nodeName": node,
            "containers": [
                {
                    "name": NODE_PLUGIN_CONTAINER,
                    "args": ["csi", "--mode", "node", "--node-id", node],
                    "securityContext": node_security_context(),
                },
                {
                    "name": ATTACHER_HOST_CONTAINER,
                    "args": ["csi", "attacher-host"],
                    "securityContext": attacher_host_security_context(),
                },
            ],
        },
    }
