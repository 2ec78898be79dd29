"""The CSI driver on the local cluster: its node plugins, its controller plugin, and what the
sidecars next to them do (node-driver-registrar, external-provisioner), as one unit.

Why processes and not the chart's pods: the node plugin's DaemonSet pod mounts the kubelet
directory with ``mountPropagation: Bidirectional``, and its sidecars are Go images that do
not exist here; the node simulator runs every container in a mount namespace of its own (the
machine's mounts as slaves), whose own mounts never reach the machine. So
the local cluster starts each plugin itself, with the privileges the chart's manifests
state (:mod:`pairvol.csi.manifests`, through the node simulator's
:func:`~pairvol.localcluster.kubelet_pods.security_plan`), and gives the node plugin the
mount propagation its manifest asks for:

* **node plugin**, one per simulated node: privileged, root (every capability this machine
  can pass on), in the node's network namespace (it reaches the volumes' export Services
  like a pod of that node with ``hostNetwork``), in its own mount namespace whose copies
  of the node's kubelet directory and state directory are *shared* with the machine's
  (each is bind-mounted onto itself and made shared first): its mounts (global mounts,
  pods' publications, FUSE exports) propagate to the machine, where the kubelet binds them
  into pods — what ``Bidirectional`` does. Its ``/etc/hosts`` is the cluster's service
  names (:class:`ServiceHosts`, the part of cluster DNS the driver needs: a volume's
  export is ``<volume>.<namespace>.svc:7802``), bound in its namespace only. Given a token
  (of the chart's ``csi-node`` ServiceAccount), it reads the volumes' replication state
  through the API server as a pod of the node reaches it (the node simulator's proxy), for
  NodeGetVolumeStats' volume condition; without one it has no cluster connection.
* **attacher host**, one per simulated node, the node pod's second container
  (:mod:`pairvol.csi.attacher_host`): privileged (its container's securityContext), in the
  node's network namespace (its attachers connect to the exports) and a mount namespace of
  its own sharing the state directory (its attachers' FUSE exports propagate to the machine
  and from there to the node plugin), in a cgroup of its own. It starts before the node
  plugin, which is given ``--attacher-host`` and asks it for every attacher.
* **registrar**: ``NodeGetInfo`` on the plugin's socket, then the node's ``CSINode`` lists
  the driver with that node ID and its topology keys, the Node carries the
  ``csi.volume.kubernetes.io/nodeid`` annotation and the topology as labels
  (``topology.pairvol.io/node``), and the node's kubelet learns the socket
  (:meth:`~pairvol.localcluster.kubelet_csi.NodeVolumes.register_driver`).
* **controller plugin**: the controller container's user (65532), no capabilities,
  ``no_new_privs``, with the kubeconfig it is given (a token of the chart's controller
  ServiceAccount holds it to the chart's RBAC). Its read-only root file system is not
  applied (it needs a mount namespace of its own; nothing in the driver writes outside
  its socket directory and ``/tmp``).
* **provisioner**: :class:`~pairvol.localcluster.csi_provisioner.Provisioner` on the
  controller's socket.

The state directories are short paths under ``/tmp/pvcsi-*`` rather than under the
node's directory: an attachment's QMP socket lives in it, and unix socket paths are
limited to 107 bytes.

**A node plugin lives and dies with its node** (a :class:`~pairvol.localcluster.kubelet.
NodeAddon` of the node simulator), as the DaemonSet's pod does on a real node:

* it and the attacher host run in cgroups under the node's (when the simulator has
  cgroups), and so does every attacher the host starts (a daemon keeps its cgroup): ``node
  kill`` SIGKILLs them all with the node's pods, the attachers' NBD connections to the
  exports drop, and the kubelet's memory of staged volumes goes too;
* then what a power-off takes with it is undone, *after* those processes are gone: the
  mounts under the node's kubelet directory (file systems, publications), the loop devices
  over its attachments' exports and their dead FUSE mounts. The order is what keeps a dead
  node off the volume: its attachers die first, so nothing its kernel still held (dirty
  pages of an unmounted file system) can reach an export afterwards. Without cgroups the
  plugin's process group and the attachers named by their pidfiles are SIGKILLed instead
  (a daemon still starting at that moment may escape: what cgroups are for);
* the state directory stays, as a node's disk does: the records of its attachments;
* ``node restart`` starts the plugin again and registers it: at its start it finds those
  records with no attacher and no loop device and removes them
  (:meth:`pairvol.csi.node.NodeService.recover`); a pod still bound to the node stages
  the volume anew. A pod of the dead node that is replaced elsewhere stages there without
  waiting for anything of the dead node.

**The node plugin's container restarts alone** (:meth:`LocalCsi.crash_node_plugin`): every
process of its cgroup is SIGKILLed, as the container runtime does to a container that
exits; the attacher host's cgroup, with the attachers, is not touched, and the plugin
started again finds its attachments running (the host says so).

Teardown undoes it all in an order that protects data: the provisioner stops; every
volume still published by a kubelet is unpublished and unstaged through its plugin; the
plugins stop (SIGTERM), then the attacher hosts; then whatever a failure left (mounts
under the kubelet and state directories, loop devices over the attachments' exports,
attachers) is unmounted, detached and stopped, before the shared mounts go.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from pairvol.aio import bounded, cancel_and_wait
from pairvol.csi import DRIVER_NAME
from pairvol.csi.attach import AttachError
from pairvol.csi.attacher_host import HostAttachers
from pairvol.csi.manifests import (
    ATTACHER_HOST_CONTAINER,
    ATTACHER_HOST_SOCKET,
    NODE_PLUGIN_CONTAINER,
    controller_security_context,
    node_pod,
)
from pairvol.localcluster import kubeconfig as kubeconfig_mod
from pairvol.localcluster.csi_client import CsiClient
from pairvol.localcluster.csi_provisioner import Provisioner
from pairvol.localcluster.csi_resizer import Resizer
from pairvol.localcluster.kubelet import ContainerProcess
from pairvol.localcluster.kubelet_api import MERGE_PATCH, ApiError, KubeApi
from pairvol.localcluster.kubelet_pods import JsonDict, KubeletError, SecurityPlan, security_plan
from pairvol.localcluster.netns import NETNS_DIR, run_command

logger = logging.getLogger(__name__)

NODE_ID_ANNOTATION = "csi.volume.kubernetes.io/nodeid"
START_TIMEOUT_S = 30.0
STOP_GRACE_S = 10.0


def hosts_file(base: str, services: Sequence[JsonDict]) -> str:
    """``/etc/hosts`` text: the machine's own entries, then every Service with a cluster IP
    under its cluster DNS names (pure)."""
    lines = [base.rstrip("\n"), "# Services of the local cluster"]
    for svc in sorted(services, key=lambda s: (s["metadata"].get("namespace", ""), s["metadata"]["name"])):
        ip = (svc.get("spec") or {}).get("clusterIP")
        if not ip or ip == "None":
            continue
        name, namespace = svc["metadata"]["name"], svc["metadata"].get("namespace", "default")
        lines.append(f"{ip} {name}.{namespace}.svc {name}.{namespace}.svc.cluster.local")
    return "\n".join(lines) + "\n"


def csinode_object(node: str, node_id: str, topology_keys: Sequence[str]) -> JsonDict:
    """The node's CSINode with the driver registered (pure)."""
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "CSINode",
        "metadata": {"name": node},
        "spec": {"drivers": [{"name": DRIVER_NAME, "nodeID": node_id, "topologyKeys": list(topology_keys)}]},
    }


class ServiceHosts:
    """Keeps a hosts file with the cluster's Service names up to date (list + watch). The
    file is rewritten in place (one write of the whole text): it is bind-mounted, and a
    rename would leave the mounts on the old file."""

    def __init__(self, api: KubeApi, path: Path) -> None:
        self.api = api
        self.path = path
        self._base = ""
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._base = await asyncio.to_thread(Path("/etc/hosts").read_text)
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="csi-service-hosts")

    async def refresh(self) -> str:
        services, version = await self.api.list_all("/api/v1/services")
        await asyncio.to_thread(self._write, hosts_file(self._base, services))
        return version

    def _write(self, text: str) -> None:
        with open(self.path, "a+") as fh:
            fh.seek(0)
            if fh.read() == text:
                return
            fh.truncate(0)
            fh.write(text)

    async def _loop(self) -> None:
        while True:
            try:
                version = await self.refresh()
                async for _ in self.api.watch("/api/v1/services", version):
                    await self.refresh()
            except asyncio.CancelledError:
                raise
            except ApiError as exc:
                logger.info("service names: watch ended (%s); again", exc)
            await asyncio.sleep(0.5)

    async def close(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)


@dataclass
class PluginProcess:
    """A running ``pairvol csi`` process (started by us, stopped by PID)."""

    name: str
    proc: asyncio.subprocess.Process
    socket: Path
    log_path: Path
    #: an attacher host (answers ping on its socket), not a CSI plugin (answers Probe)
    attacher_host: bool = False

    async def wait_ready(self) -> None:
        """Until its socket answers Probe (or it died: KubeletError with its log's end)."""
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
        while True:
            if self.proc.returncode is not None or asyncio.get_running_loop().time() > deadline:
                tail = await asyncio.to_thread(_tail, self.log_path)
                raise KubeletError(f"CSI plugin {self.name} did not start: {tail}")
            if self.socket.exists() and self.attacher_host:
                with contextlib.suppress(AttachError):
                    await HostAttachers(self.socket).call("ping", timeout=5)
                    return
            elif self.socket.exists():
                with contextlib.suppress(Exception):
                    async with CsiClient(self.socket, timeout=5) as client:
                        await client.call("Identity", "Probe", {})
                        return
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                await bounded(self.proc.wait(), STOP_GRACE_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()


def _tail(path: Path, size: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return "(no log)"


async def _spawn(
    name: str, argv: Sequence[str], env: dict[str, str], socket: Path, log_path: Path, attacher_host: bool = False
) -> PluginProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True
        )
    logger.info("CSI plugin %s started as pid %s", name, proc.pid)
    return PluginProcess(name, proc, socket, log_path, attacher_host)


def _python_env(home: str) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    env = {
        "PATH": f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": home,
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
    }
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def node_plugin_security(node: str, capabilities: frozenset[str]) -> SecurityPlan:
    """How the node's container runtime starts the node plugin container (privileged)."""
    return _node_container_security(node, NODE_PLUGIN_CONTAINER, capabilities)


def attacher_host_security(node: str, capabilities: frozenset[str]) -> SecurityPlan:
    """How the node's container runtime starts the attacher host container (privileged)."""
    return _node_container_security(node, ATTACHER_HOST_CONTAINER, capabilities)


def _node_container_security(node: str, name: str, capabilities: frozenset[str]) -> SecurityPlan:
    pod = node_pod(node)
    (container,) = [c for c in pod["spec"]["containers"] if c["name"] == name]
    return security_plan(pod, container, capabilities)


def controller_security() -> SecurityPlan:
    pod = {"spec": {"containers": [{"name": "csi-controller", "securityContext": controller_security_context()}]}}
    return security_plan(pod, pod["spec"]["containers"][0])


def node_plugin_argv(
    *,
    netns: str,
    hosts: Path,
    security: SecurityPlan,
    socket: Path,
    node_id: str,
    state_dir: Path,
    cgroup: Path | None = None,
    kubeconfig: Path | None = None,
    attacher_host: Path | None = None,
) -> list[str]:
    """The node plugin in the node's network namespace and a mount namespace of its own
    (:func:`node_container_argv`). With ``attacher_host`` (its socket) it asks that host
    for its attachers, else it starts them itself (they are then in its cgroup too)."""
    program = [
        *security.setpriv_argv(),
        sys.executable, "-m", "pairvol", "-v", "csi", "--mode", "node",
        "--endpoint", f"unix://{socket}", "--node-id", node_id, "--state-dir", str(state_dir),
        *(["--kubeconfig", str(kubeconfig)] if kubeconfig is not None else []),
        *(["--attacher-host", f"unix://{attacher_host}"] if attacher_host is not None else []),
    ]  # fmt: skip
    return node_container_argv(netns=netns, hosts=hosts, program=program, cgroup=cgroup)


def attacher_host_argv(
    *, netns: str, hosts: Path, security: SecurityPlan, socket: Path, state_dir: Path, cgroup: Path | None = None
) -> list[str]:
    """The attacher host, as its container of the node pod runs: like the node plugin (its
    attachers reach the exports from the node's network, its FUSE mounts propagate through
    the shared state directory), in a cgroup of its own."""
    program = [
        *security.setpriv_argv(),
        sys.executable, "-m", "pairvol", "-v", "csi", "attacher-host",
        "--socket", str(socket), "--state-dir", str(state_dir),
    ]  # fmt: skip
    return node_container_argv(netns=netns, hosts=hosts, program=program, cgroup=cgroup)


def node_container_argv(*, netns: str, hosts: Path, program: Sequence[str], cgroup: Path | None) -> list[str]:
    """``program`` in the node's network namespace and a mount namespace of its own whose
    shared mounts (kubelet and state directories) stay peers of the machine's; only
    /etc/hosts is its own (its mount made private first, so the bind does not propagate).
    With ``cgroup`` it joins that cgroup first (so does every process it starts)."""
    q = shlex.quote
    script = "\n".join(
        [
            "set -e",
            "m=$(findmnt -n -o TARGET --target /etc/hosts)",
            'mount --make-private "$m"',
            f"mount --bind {q(str(hosts))} /etc/hosts",
            "exec " + " ".join(q(a) for a in program),
        ]
    )
    argv = [
        "nsenter", f"--net={NETNS_DIR / netns}", "--",
        "unshare", "--mount", "--propagation", "unchanged", "--", "/bin/sh", "-c", script,
    ]  # fmt: skip
    if cgroup is None:
        return argv
    join = f"echo $$ > {q(str(cgroup / 'cgroup.procs'))}"
    return ["/bin/sh", "-c", f"{join}\nexec " + " ".join(q(a) for a in argv)]


async def _is_mountpoint(path: Path) -> bool:
    result = await run_command(["mountpoint", "-q", str(path)], check=False)
    return result.returncode == 0


async def make_shared(path: Path) -> None:
    """Bind ``path`` onto itself (unless it is a mount point already) and make it shared."""
    await asyncio.to_thread(path.mkdir, parents=True, exist_ok=True)
    if not await _is_mountpoint(path):
        await run_command(["mount", "--bind", str(path), str(path)])
    await run_command(["mount", "--make-shared", str(path)])


def _attachers_in(state_dir: Path) -> list[int]:
    """The attachers named by pidfiles under a node's state directory that still run
    (checked against /proc: the command line names the attachment's directory)."""
    found = []
    for pidfile in state_dir.glob("*/attacher.pid"):
        try:
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if str(pidfile.parent).encode() in cmdline:
            found.append(pid)
    return found


async def power_off(kubelet_dir: Path, state_dir: Path) -> list[str]:
    """What a node's power-off takes with it besides its processes (call only once they
    are gone: see the module docstring): the mounts below its kubelet directory, the loop
    devices over its attachments' FUSE exports, those dead FUSE mounts. The directories and
    their files stay (the node's disk). Returns what was undone."""
    undone = []
    mountinfo = await asyncio.to_thread(Path("/proc/self/mountinfo").read_text)
    for point in mounts_under(mountinfo, [kubelet_dir]):
        if Path(point) != kubelet_dir:
            await run_command(["umount", "-l", point], check=False)
            undone.append(point)
    loops = await run_command(["losetup", "--noheadings", "--output", "NAME,BACK-FILE", "--list"], check=False)
    for line in loops.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].startswith(str(state_dir) + "/"):
            await run_command(["losetup", "-d", parts[0]], check=False)
            undone.append(parts[0])
    mountinfo = await asyncio.to_thread(Path("/proc/self/mountinfo").read_text)
    for point in mounts_under(mountinfo, [state_dir]):
        if Path(point) != state_dir:
            await run_command(["umount", "-l", point], check=False)
            undone.append(point)
    return undone


def mounts_under(mountinfo: str, roots: Sequence[Path]) -> list[str]:
    """Mount points at or below any of ``roots``, deepest first (pure)."""
    found = []
    for line in mountinfo.splitlines():
        parts = line.split()
        if len(parts) < 5:
            continue
        point = parts[4].encode().decode("unicode_escape")
        if any(point == str(r) or point.startswith(str(r) + "/") for r in roots):
            found.append(point)
    return sorted(set(found), key=lambda p: (-p.count("/"), p))


class LocalCsi:
    """The CSI driver on the simulated nodes of ``sim``; ``async with LocalCsi(...) as csi``.

    ``controller_kubeconfig``: what the controller plugin calls the API with (its
    ServiceAccount's token, or the admin kubeconfig). ``node_token``: the node plugins'
    (their ServiceAccount's), for the replication state in the volume condition; None: they
    run without a cluster connection.
    """

    def __init__(
        self,
        sim: Any,
        *,
        controller_kubeconfig: Path,
        node_token: str | None = None,
        volume_namespace: str = "default",
        ready_timeout: float = 8.0,
        provision_timeout: float = 20.0,
        log_dir: Path | None = None,
    ) -> None:
        self.sim = sim
        self.controller_kubeconfig = controller_kubeconfig
        self.node_token = node_token
        self.node_kubeconfig: Path | None = None
        self.volume_namespace = volume_namespace
        self.ready_timeout = ready_timeout
        self.provision_timeout = provision_timeout
        self.log_dir = log_dir or Path(sim.root)
        self.api = KubeApi(sim.api_url)
        self.root: Path | None = None
        self.hosts: ServiceHosts | None = None
        self.node_plugins: dict[str, PluginProcess] = {}
        #: each node's attacher host (the node pod's second container)
        self.attacher_hosts: dict[str, PluginProcess] = {}
        self.controller: PluginProcess | None = None
        self.provisioner: Provisioner | None = None
        self.resizer: Resizer | None = None
        self._shared: list[Path] = []

    def state_dir(self, node: str) -> Path:
        assert self.root is not None
        return self.root / node

    def staged_on(self, volume_handle: str) -> list[str]:
        """The nodes whose kubelet has the volume staged."""
        return [
            name for name, kubelet in self.sim.kubelets.items() if volume_handle in kubelet.volumes.staged_handles()
        ]

    def kubelet_dir(self, node: str) -> Path:
        return Path(self.sim.kubelets[node].kubelet_dir)

    async def __aenter__(self) -> LocalCsi:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _start(self) -> None:
        self.root = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="pvcsi-", dir="/tmp"))
        self.hosts = ServiceHosts(self.api, self.root / "hosts")
        await self.hosts.start()
        if self.node_token is not None:  # the API server as the node's pods reach it
            self.node_kubeconfig = await kubeconfig_mod.write(
                self.root / "node-kubeconfig", self.sim.in_cluster_url, token=self.node_token
            )
        for node in self.sim.node_names:
            await self._start_node(node)
        await self._start_controller()
        assert self.controller is not None
        self.provisioner = Provisioner(
            self.api, DRIVER_NAME, self.controller.socket, timeout=self.provision_timeout, in_use=self.staged_on
        )
        await self.provisioner.__aenter__()
        nodes = self.sim.kubelets
        self.resizer = Resizer(
            self.api, DRIVER_NAME, self.controller.socket, lambda: {n: k.volumes for n, k in nodes.items()}
        )
        await self.resizer.__aenter__()
        self.sim.addons.append(self)

    async def node_killed(self, name: str) -> None:
        """The node died (its cgroup, with the plugin, the attacher host and its attachers,
        is SIGKILLed by now): the rest of the plugin goes as at a power-off (module
        docstring)."""
        plugin = self.node_plugins.pop(name, None)
        host = self.attacher_hosts.pop(name, None)
        if self.root is None or (plugin is None and host is None):
            return
        for proc in [p for p in (plugin, host) if p is not None]:
            if proc.proc.returncode is None:  # no cgroups: its process group, then the attachers
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.proc.pid, signal.SIGKILL)
            await proc.proc.wait()
        state_dir = self.state_dir(name)
        for _ in range(100):
            pids = await asyncio.to_thread(_attachers_in, state_dir)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(0.05)
        else:
            raise KubeletError(f"node {name}: attachers {pids} survived SIGKILL")
        undone = await power_off(self.kubelet_dir(name), state_dir)
        logger.info("node %s: CSI node plugin killed with the node; gone with it: %s", name, undone or "nothing")

    async def crash_node_plugin(self, name: str) -> None:
        """The node plugin's container dies (a crash, an OOM kill, a failed liveness
        probe): every process in its cgroup is SIGKILLed, as the container runtime does to
        a container that exits; then it is started again and registers, as the DaemonSet's
        pod restarts its container. The attacher host and its attachers, in the pod's other
        container, go on. (Without cgroups: the plugin's process tree.)"""
        plugin = self.node_plugins.pop(name)
        await ContainerProcess(plugin.proc, self._cgroup(name, "csi-node-plugin")).kill_all()
        logger.info("node %s: CSI node plugin's container killed; starting it again", name)
        await self._start_node(name)

    async def node_restarted(self, name: str) -> None:
        """The node is back: its plugin starts again and registers."""
        if name not in self.node_plugins and self.root is not None:
            await self._start_node(name)

    def _cgroup(self, node: str, container: str) -> Path | None:
        cgroup_root = self.sim.kubelets[node].cgroup_root
        return cgroup_root / container if cgroup_root is not None else None

    def attacher_host_socket(self, node: str) -> Path:
        return self.state_dir(node) / ATTACHER_HOST_SOCKET

    async def _start_node(self, node: str) -> None:
        """The node pod's containers: the attacher host (unless it runs), then the plugin."""
        assert self.root is not None and self.hosts is not None
        kubelet_dir, state_dir = self.kubelet_dir(node), self.state_dir(node)
        for path in (kubelet_dir, state_dir):
            await make_shared(path)
            if path not in self._shared:
                self._shared.append(path)
        logs = Path(self.sim.root) / node / "logs"
        host = self.attacher_hosts.get(node)
        if host is None or host.proc.returncode is not None:
            cgroup = self._cgroup(node, "csi-attacher-host")
            if cgroup is not None:
                await asyncio.to_thread(cgroup.mkdir, parents=True, exist_ok=True)
            argv = attacher_host_argv(
                netns=self.sim.net.netns_name(node),
                hosts=self.hosts.path,
                security=attacher_host_security(node, self.sim.capabilities),
                socket=self.attacher_host_socket(node),
                state_dir=state_dir,
                cgroup=cgroup,
            )
            host = await _spawn(
                f"attacher host {node}",
                argv,
                _python_env("/root"),
                self.attacher_host_socket(node),
                logs / "csi-attacher-host.log",
                attacher_host=True,
            )
            self.attacher_hosts[node] = host
            await host.wait_ready()
        socket = kubelet_dir / "plugins" / DRIVER_NAME / "csi.sock"
        await asyncio.to_thread(socket.parent.mkdir, parents=True, exist_ok=True)
        cgroup = self._cgroup(node, "csi-node-plugin")
        if cgroup is not None:
            await asyncio.to_thread(cgroup.mkdir, parents=True, exist_ok=True)
        argv = node_plugin_argv(
            netns=self.sim.net.netns_name(node),
            hosts=self.hosts.path,
            security=node_plugin_security(node, self.sim.capabilities),
            socket=socket,
            node_id=node,
            state_dir=state_dir,
            cgroup=cgroup,
            kubeconfig=self.node_kubeconfig,
            attacher_host=self.attacher_host_socket(node),
        )
        plugin = await _spawn(f"node {node}", argv, _python_env("/root"), socket, logs / "csi-node.log")
        self.node_plugins[node] = plugin
        await plugin.wait_ready()
        await self._register(node, socket)

    async def _register(self, node: str, socket: Path) -> None:
        """node-driver-registrar: the node ID from NodeGetInfo into CSINode and the Node."""
        async with CsiClient(socket, timeout=10) as client:
            info = await client.call("Node", "NodeGetInfo", {})
        node_id = str(info["nodeId"])
        segments = {str(k): str(v) for k, v in ((info.get("accessibleTopology") or {}).get("segments") or {}).items()}
        body = csinode_object(node, node_id, sorted(segments))
        try:
            await self.api.request("POST", "/apis/storage.k8s.io/v1/csinodes", body=body)
        except ApiError as exc:
            if exc.status != 409:
                raise
            path = f"/apis/storage.k8s.io/v1/csinodes/{node}"
            await self.api.request("PATCH", path, body={"spec": body["spec"]}, content_type=MERGE_PATCH)
        annotation = json.dumps({DRIVER_NAME: node_id})
        await self.api.request(
            "PATCH",
            f"/api/v1/nodes/{node}",
            # the kubelet labels the Node with the plugin's topology (the provisioner reads it)
            body={"metadata": {"annotations": {NODE_ID_ANNOTATION: annotation}, "labels": segments}},
            content_type=MERGE_PATCH,
        )
        self.sim.kubelets[node].volumes.register_driver(DRIVER_NAME, socket)

    async def _start_controller(self) -> None:
        assert self.root is not None
        plan = controller_security()
        sock_dir = self.root / "controller"  # the pod's socket-dir emptyDir, writable by its user
        await asyncio.to_thread(sock_dir.mkdir, mode=0o777, exist_ok=True)
        await asyncio.to_thread(os.chmod, sock_dir, 0o777)
        kubeconfig = sock_dir / "kubeconfig"  # like a projected token: readable by the user
        await asyncio.to_thread(shutil.copyfile, self.controller_kubeconfig, kubeconfig)
        await asyncio.to_thread(os.chmod, kubeconfig, 0o444)
        await asyncio.to_thread(os.chmod, self.root, 0o755)
        socket = sock_dir / "csi.sock"
        argv = [
            *plan.setpriv_argv(),
            sys.executable, "-m", "pairvol", "-v", "csi", "--mode", "controller",
            "--endpoint", f"unix://{socket}", "--kubeconfig", str(kubeconfig),
            "--volume-namespace", self.volume_namespace, "--ready-timeout", f"{self.ready_timeout:g}",
        ]  # fmt: skip
        log_path = self.log_dir / "csi-controller.log"
        self.controller = await _spawn("controller", argv, _python_env("/"), socket, log_path)
        await self.controller.wait_ready()

    async def close(self) -> None:
        """Stop everything and undo every mount (never raises)."""
        if self in self.sim.addons:
            self.sim.addons.remove(self)
        if self.resizer is not None:
            with contextlib.suppress(Exception):
                await self.resizer.__aexit__(None, None, None)
            self.resizer = None
        if self.provisioner is not None:
            with contextlib.suppress(Exception):
                await self.provisioner.__aexit__(None, None, None)
            self.provisioner = None
        for node in list(self.node_plugins):
            kubelet = self.sim.kubelets.get(node)
            if kubelet is not None:
                try:
                    await kubelet.volumes.release_all()
                except Exception as exc:
                    logger.warning("node %s: releasing CSI volumes failed: %s", node, exc)
                kubelet.volumes.unregister_driver(DRIVER_NAME)
        # the plugins first, then the attacher hosts (the attachers left are swept below)
        for plugin in [*self.node_plugins.values(), *([self.controller] if self.controller else [])]:
            with contextlib.suppress(Exception):
                await plugin.stop()
        for host in self.attacher_hosts.values():
            with contextlib.suppress(Exception):
                await host.stop()
        self.node_plugins.clear()
        self.attacher_hosts.clear()
        self.controller = None
        if self.hosts is not None:
            await self.hosts.close()
            self.hosts = None
        if self.root is not None:
            await self._sweep(self.root)
            await asyncio.to_thread(shutil.rmtree, self.root, True)
            self.root = None
        await self.api.close()

    async def _sweep(self, root: Path) -> None:
        """Whatever an interrupted teardown left, top down: file systems and publications
        under the kubelet directories, loop devices over the attachments' exports (found by
        their backing files while those are still mounted), attachers, then the FUSE
        exports and the shared mounts."""
        kubelet_dirs = [p for p in self._shared if not p.is_relative_to(root)]
        mountinfo = await asyncio.to_thread(Path("/proc/self/mountinfo").read_text)
        for point in [m for m in mounts_under(mountinfo, kubelet_dirs) if Path(m) not in self._shared]:
            logger.warning("CSI teardown: %s still mounted; unmounting", point)
            result = await run_command(["umount", point], check=False)
            if result.returncode != 0:
                await run_command(["umount", "-l", point], check=False)
        loops = await run_command(["losetup", "--noheadings", "--output", "NAME,BACK-FILE", "--list"], check=False)
        for line in loops.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].startswith(str(root) + "/"):
                logger.warning("CSI teardown: loop device %s over %s left; detaching", *parts)
                await run_command(["losetup", "-d", parts[0]], check=False)
        for pidfile in await asyncio.to_thread(lambda: list(root.glob("*/*/attacher.pid"))):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pidfile.read_text().strip())
                logger.warning("CSI teardown: attacher %s left; stopping it", pid)
                os.kill(pid, signal.SIGTERM)
        mountinfo = await asyncio.to_thread(Path("/proc/self/mountinfo").read_text)
        for point in mounts_under(mountinfo, [*self._shared, root]):  # FUSE exports, shared binds
            await run_command(["umount", "-l", point], check=False)
        self._shared.clear()
