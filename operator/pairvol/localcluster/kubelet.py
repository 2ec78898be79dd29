"""The node simulator: plays kubelet for N nodes of the local cluster.

Why: the real operator and real agents must run against something that behaves like a
cluster when it matters to pairvol — pods become processes on a node with that node's
network, see their Secrets and hostPath data, get restarted when they crash, are
terminated gracefully when deleted, and a node can die (processes gone, Ready=Unknown)
or be cut off from the network. No kubelet or container runtime exists on these
machines, so this module is both, for processes on this machine.

How a container runs (all real, nothing simulated inside the process):

* its own cgroup (cgroup v2, when available) so SIGKILL reaches every process it forked,
  including ones that started their own session; fallback: the process group plus a
  walk of ``/proc`` for descendants;
* its own UTS namespace with the pod name as host name;
* PersistentVolumeClaims staged and published by the claim's CSI node plugin through its
  gRPC socket before the containers start (:mod:`pairvol.localcluster.kubelet_csi`), the
  published directory bound like a hostPath (a Block-mode claim's device at its
  ``volumeDevices`` ``devicePath``, outside ``/dev``); unpublished and unstaged after the pod's
  containers are gone, before the pod is finalized;
* a mount namespace of its own (``unshare --mount --propagation slave``) in which Secret/ConfigMap/emptyDir
  volumes (files under ``<root>/<node>/pods/<uid>/volumes/<name>/``) and hostPath volumes
  (``<root>/<node>/hostpath/<path>``) are bind-mounted at the container's ``mountPath``.
  Mount *targets* are created as empty directories on the host file system if missing
  (the bind mounts themselves are private to the pod). The machine's mounts are slaves
  there, so an unmount on the machine (a CSI node plugin unstaging another pod's volume)
  reaches the container's copy: a private copy would keep that file system alive, unflushed,
  after its device is gone, as a container runtime's pivot_root into the image never does;
* the pod's own network namespace with its own IP from the node's pod CIDR
  (:meth:`~pairvol.localcluster.netns.ClusterNetwork.add_pod`, created before the first
  container starts, removed when the pod ends), or the node's with ``hostNetwork``;
* the container's securityContext, applied as a container runtime does (see
  :func:`~pairvol.localcluster.kubelet_pods.security_plan`): user and groups, the
  runtime's default capabilities plus ``add`` minus ``drop`` (or all, when privileged) as
  the bounding set — and the permitted/effective sets for uid 0 —, empty inheritable and
  ambient sets, ``no_new_privs`` when ``allowPrivilegeEscalation: false``, a read-only
  root mount for ``readOnlyRootFilesystem``; taken with ``setpriv`` after entering the
  namespaces (exec probes run the same way). Not applied: seccomp profiles;
* ``command`` + ``args`` exec'd with a minimal environment plus the resolved ``env``
  (downward API, Secret/ConfigMap keys); ``PATH`` starts with the directory of this Python
  interpreter, so ``pairvol`` is the current venv's. Images: the pairvol image (the
  Dockerfile's) runs its ENTRYPOINT and CMD from this installation where the container
  gives no command (:mod:`pairvol.localcluster.images`); any other image needs a
  ``command`` (run on the node), else the container shows ``ErrImagePull`` /
  ``ImagePullBackOff`` with a message saying what the local cluster has;
* with ``service_account_tokens``, the pod's ServiceAccount token, namespace and a
  kubeconfig reading the token file mounted read-only at
  ``/var/run/secrets/kubernetes.io/serviceaccount`` (``KUBECONFIG`` points there),
  owned by the pod's user; the token file is replaced with a new token once half of the
  old one's lifetime has passed (a kubelet refreshes projected tokens at 80%; half leaves
  more room on a loaded machine), so a pod that read its token once is refused once it
  expires — the API server's ``max_token_expiration_s`` makes that happen within a test;
* stdout+stderr appended to ``<root>/<node>/logs/<namespace>_<pod>.log``.

Pods in the node reach the API server through :class:`~pairvol.localcluster.netns.ApiProxy`
at ``KUBERNETES_SERVICE_HOST:KUBERNETES_SERVICE_PORT``; ``KUBECONFIG`` points at a
kubeconfig for that address.

Pod lifecycle: Pending → Running (podIP, hostIP = node IP, containerStatuses with
ready/started/restartCount/state/lastState) → Succeeded/Failed; init containers run in
order first; readiness and liveness probes (httpGet and tcpSocket from inside the node's
network namespace to the pod IP, exec inside the container's namespaces); restartPolicy
with crash-loop back-off (``CrashLoopBackOff``; ``lastState.terminated`` with exit code,
reason and the termination message: the file at ``terminationMessagePath``, or with
``FallbackToLogsOnError`` the last lines of the container's log); kubelet Events
(Started, Killing, BackOff, Failed) through
:class:`~pairvol.localcluster.kubelet_api.EventRecorder`; Services routed by
:class:`~pairvol.localcluster.services.ServiceRouter`; deletion: SIGTERM to the
container's process group, wait ``deletionGracePeriodSeconds`` (else
``terminationGracePeriodSeconds``), SIGKILL the cgroup, then finalize with ``DELETE …
gracePeriodSeconds=0`` when the API server only marked the pod (``deletionTimestamp``);
a pod that simply vanished from the API is terminated the same way. Not supported (a
clear ``CreateContainerConfigError``, or ignored where harmless): image pulls,
resources/limits, seccomp profiles, ephemeral containers, downwardAPI/projected
volumes, startup probes, ``kubectl logs/exec`` through the API server (logs are files;
:meth:`NodeSimulator.exec_in_pod` is local).

Node lifecycle: each node's kubelet registers its Node, posts Ready with a heartbeat
and renews its Lease in ``kube-node-lease``. A small node-lifecycle controller (the
part of kube-controller-manager that matters here) marks a node ``Ready=Unknown`` with
``unreachable`` taints, and its pods not Ready, once no heartbeat arrived for
``node_monitor_grace`` seconds — after :meth:`NodeSimulator.kill_node` or while it is
partitioned. Pods of a dead node are not evicted (like the real default of 5 minutes,
but forever here); the operator decides. What runs on a node besides its pods (the CSI
node plugin of :mod:`~pairvol.localcluster.csi_plugins`) registers a :class:`NodeAddon`
and is told when the node is killed and when it is powered on again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import os
import re
import shutil
import signal
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import urlsplit

from pairvol.aio import bounded, cancel_and_wait
from pairvol.localcluster import kubeconfig as kubeconfig_mod
from pairvol.localcluster.dns import ClusterDNS, resolv_conf
from pairvol.localcluster.images import ImagePullError, container_command, find_image
from pairvol.localcluster.kubelet_api import ApiError, EventRecorder, KubeApi
from pairvol.localcluster.kubelet_csi import NodeVolumes, VolumeNotReady
from pairvol.localcluster.kubelet_pods import (
    DEFAULT_TERMINATION_MESSAGE_PATH,
    MAX_FALLBACK_LOG_BYTES,
    MAX_TERMINATION_MESSAGE,
    ContainerState,
    JsonDict,
    KubeletError,
    Mount,
    PodConfigError,
    PodRuntimeInfo,
    ProbeSpec,
    ProbeTracker,
    SecurityPlan,
    VolumeClaim,
    VolumeDir,
    VolumeFiles,
    backoff_delay,
    capability_names,
    container_argv,
    keep_code_visible,
    launch_script,
    meta,
    node_conditions,
    parse_probe,
    plan_devices,
    plan_mounts,
    plan_volumes,
    pod_key,
    pod_uid,
    referenced_objects,
    render_pod_status,
    resolve_env,
    security_plan,
    should_restart,
    spec,
    termination_message,
)
from pairvol.localcluster.netns import (
    ApiProxy,
    ClusterNetwork,
    CommandResult,
    PodSandbox,
    owner_pid_of,
    run_command,
)
from pairvol.localcluster.services import ServiceRouter

logger = logging.getLogger(__name__)
#: a node's status is posted with every this-many Lease renewals (and whenever it changes)
STATUS_REPORT_EVERY = 10

HOST_RESOLV_CONF = "/etc/resolv.conf"

__all__ = ["KubeletError", "NodeSimulator", "PodConfigError"]

UNREACHABLE_TAINT = "node.kubernetes.io/unreachable"
#: hostPaths that stay the machine's own (one kernel for all simulated nodes).
HOST_SHARED_PREFIXES = ("/dev", "/sys", "/proc", "/lib/modules", "/run/udev")


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------
# process control
# ---------------------------------------------------------------------------------------


def own_bounding_set() -> frozenset[str]:
    """The capabilities this process can pass on: no container gets more."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            return capability_names(int(line.split()[1], 16))
    raise KubeletError("no CapBnd line in /proc/self/status")


def find_cgroup2_mount() -> Path | None:
    """Mount point of the cgroup v2 hierarchy, if any (pure v2 or the hybrid 'unified')."""
    try:
        text = Path("/proc/self/mounts").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "cgroup2":
            return Path(parts[1])
    return None


def _own_cgroup2_path() -> str:
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:].strip() or "/"
    except OSError:
        pass
    return "/"


def _reap_stale_cgroups(base: Path) -> None:
    """Remove empty cgroups left by simulators whose process died without tearing down.

    Populated ones are left alone (and reported): their processes are not ours to kill.
    """
    with contextlib.suppress(OSError):
        for entry in base.iterdir():
            if not entry.name.startswith("pairvol-") or not entry.is_dir():
                continue
            pid = owner_pid_of("pvb" + entry.name.removeprefix("pairvol-"))
            if pid is None or _pid_exists(pid):
                continue
            left = _cgroup_pids(entry)
            if left:
                logger.warning("stale cgroup %s of dead simulator %s still has processes %s", entry, pid, left)
            else:
                _rmdir_cgroup_tree(entry)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _prepare_cgroup_root(token: str) -> Path | None:
    """Create our cgroup directory (``…/pairvol-<token>``) or None if cgroups are unusable."""
    mount = find_cgroup2_mount()
    if mount is None:
        return None
    base = mount / _own_cgroup2_path().lstrip("/")
    _reap_stale_cgroups(base)
    root = base / f"pairvol-{token}"
    try:
        root.mkdir(exist_ok=True)
    except OSError as exc:
        logger.warning("no cgroup for pods (%s); falling back to process-group kills", exc)
        return None
    if not (root / "cgroup.kill").exists():
        logger.warning("cgroup.kill unsupported (kernel < 5.14); falling back to process groups")
        with contextlib.suppress(OSError):
            root.rmdir()
        return None
    return root


def _cgroup_pids(cgroup: Path) -> list[int]:
    pids: list[int] = []
    with contextlib.suppress(OSError):
        for line in (cgroup / "cgroup.procs").read_text().split():
            pids.append(int(line))
    for child in _child_cgroups(cgroup):
        pids.extend(_cgroup_pids(child))
    return pids


def _child_cgroups(cgroup: Path) -> list[Path]:
    with contextlib.suppress(OSError):
        return [p for p in cgroup.iterdir() if p.is_dir()]
    return []


def _rmdir_cgroup_tree(cgroup: Path) -> None:
    for child in _child_cgroups(cgroup):
        _rmdir_cgroup_tree(child)
    with contextlib.suppress(OSError):
        cgroup.rmdir()


def _sweep_cgroup_tree(cgroup: Path, wait_s: float = 5.0) -> None:
    """Kill whatever is still in ``cgroup`` and below (only processes we put there, e.g. one
    spawned while its start was being cancelled), wait for it to empty, remove it. Thread."""
    if not cgroup.exists():
        return
    deadline = time.monotonic() + wait_s
    while _cgroup_pids(cgroup):
        with contextlib.suppress(OSError):
            (cgroup / "cgroup.kill").write_text("1")
        if time.monotonic() > deadline:
            logger.warning("processes survive in %s: %s", cgroup, _cgroup_pids(cgroup))
            break
        time.sleep(0.02)
    _rmdir_cgroup_tree(cgroup)


def _descendants(root_pid: int) -> list[int]:
    """All live descendants of ``root_pid`` (by walking /proc), for the no-cgroup fallback."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [root_pid]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            found.append(child)
            todo.append(child)
    return found


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _freeze_and_kill_tree(root_pid: int) -> list[int]:
    """No-cgroup fallback: SIGSTOP the process tree (so nothing forks or exits and gets
    re-parented away while we look), then SIGKILL all of it. Processes that were already
    orphaned (double-forked daemons) are out of reach: that is what cgroups are for."""
    frozen: list[int] = []
    for _ in range(50):
        new = [pid for pid in [root_pid, *_descendants(root_pid)] if pid not in frozen]
        if not new:
            break
        for pid in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        frozen.extend(new)
    for pid in frozen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return frozen


class ContainerProcess:
    """One started container: its main process, its cgroup, and how to stop it."""

    def __init__(self, proc: asyncio.subprocess.Process, cgroup: Path | None) -> None:
        self.proc = proc
        self.cgroup = cgroup
        self.pid = proc.pid
        self._killed: set[int] = set()  # descendants SIGKILLed by the no-cgroup fallback

    @classmethod
    async def spawn(
        cls,
        argv: Sequence[str],
        env: dict[str, str],
        log_path: Path,
        cgroup: Path | None,
    ) -> ContainerProcess:
        def open_log() -> int:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            if cgroup is not None:
                cgroup.mkdir(parents=True, exist_ok=True)
            return os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

        log_fd = await asyncio.to_thread(open_log)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                env=env,
                start_new_session=True,  # pgid = pid: SIGTERM goes to the whole group
            )
        finally:
            os.close(log_fd)
        return cls(proc, cgroup)

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    async def kill_all(self) -> None:
        """SIGKILL every process of the container and wait until they are all gone."""
        deadline = time.monotonic() + 10.0
        while True:
            if self.cgroup is not None:
                await asyncio.to_thread(self._cgroup_kill)
                remaining = await asyncio.to_thread(_cgroup_pids, self.cgroup)
            else:
                if self.proc.returncode is None:
                    killed = await asyncio.to_thread(_freeze_and_kill_tree, self.pid)
                    self._killed.update(p for p in killed if p != self.pid)
                self.signal_group(signal.SIGKILL)
                remaining = [p for p in self._killed if _running(p)]
            if not remaining and self.proc.returncode is not None:
                break
            if self.proc.returncode is None:
                with contextlib.suppress(TimeoutError):
                    await bounded(self.proc.wait(), 0.1)
            else:
                await asyncio.sleep(0.05)
            if time.monotonic() > deadline:
                raise KubeletError(f"container process {self.pid} survived SIGKILL for 10s: {remaining}")
        await self.release()

    def _cgroup_kill(self) -> None:
        assert self.cgroup is not None
        with contextlib.suppress(OSError):
            (self.cgroup / "cgroup.kill").write_text("1")

    async def release(self) -> None:
        if self.cgroup is not None:
            await asyncio.to_thread(_rmdir_cgroup_tree, self.cgroup)


def exit_code_of(returncode: int) -> tuple[int, int | None]:
    """(exitCode as Kubernetes reports it, signal or None)."""
    if returncode < 0:
        return 128 - returncode, -returncode
    return returncode, None


# ---------------------------------------------------------------------------------------
# containers and pods
# ---------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    argv: list[str]
    env: dict[str, str]
    mounts: list[Mount]
    file_targets: frozenset[PurePosixPath]
    readiness: ProbeSpec | None
    liveness: ProbeSpec | None
    workdir: str | None
    security: SecurityPlan
    termination_file: Path | None  # node-side file bound at terminationMessagePath


class ContainerRunner:
    """Runs one container of a pod: start, probe, restart per policy, stop."""

    def __init__(self, worker: PodWorker, container: JsonDict, state: ContainerState, policy: str) -> None:
        self.worker = worker
        self.container = container
        self.state = state
        self.policy = policy
        self.name = str(container.get("name"))
        self.process: ContainerProcess | None = None
        self.prepared: _Prepared | None = None
        self.stopping = False
        self._start_count = 0
        self._wake = asyncio.Event()
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._liveness_failed = False  # killed for a failed liveness probe: a failure
        self._log_offset = 0  # where this run's output starts in the pod's log

    def _termination_message(self, failed: bool) -> str:
        """This run's termination message (thread: reads its file and log)."""
        prepared = self.prepared
        file_text = ""
        if prepared is not None and prepared.termination_file is not None:
            with contextlib.suppress(OSError), prepared.termination_file.open("rb") as fh:
                file_text = fh.read(MAX_TERMINATION_MESSAGE).decode(errors="replace")
        tail = b""
        with contextlib.suppress(OSError), self.worker.log_path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            start = max(self._log_offset, size - 4 * MAX_FALLBACK_LOG_BYTES)
            fh.seek(start)
            tail = fh.read()
        policy = str(self.container.get("terminationMessagePolicy") or "File")
        return termination_message(policy, file_text, tail, failed)

    async def run(self) -> None:
        while not self.stopping:
            assert self.prepared is not None
            missing = await asyncio.to_thread(
                missing_executable, self.prepared.argv, self.prepared.env, self.prepared.mounts
            )
            if missing:  # what a container runtime refuses before any process exists
                now = now_rfc3339()
                terminated: JsonDict = {
                    "exitCode": 128,
                    "reason": "StartError",
                    "message": missing,
                    "startedAt": "1970-01-01T00:00:00Z",
                    "finishedAt": now,
                }
                self.worker.event("Warning", "Failed", f"Error: {missing}")
                logger.info("%s/%s container %s cannot start: %s", *self.worker.key, self.name, missing)
                if not await self._after_exit(terminated, failed=True):
                    return
                continue
            await self._start(self.prepared)
            assert self.process is not None
            if self.stopping:  # stop() raced with the start: finish the stop ourselves
                await self._terminate_process(self.worker.grace_period())
            probes = [
                asyncio.create_task(self._probe_loop(p, kind))
                for kind, p in (("readiness", self.prepared.readiness), ("liveness", self.prepared.liveness))
                if p is not None
            ]
            try:
                returncode = await self.process.proc.wait()
            finally:
                await cancel_and_wait(*probes)
            # The main process is gone: like a PID namespace, nothing of it may outlive it.
            await self.process.kill_all()
            code, sig = exit_code_of(returncode)
            failed = code != 0 or self._liveness_failed
            message = await asyncio.to_thread(self._termination_message, failed)
            started = self.state.state.get("running", {}).get("startedAt", now_rfc3339())
            terminated = {
                "exitCode": code,
                "reason": "Completed" if code == 0 else "Error",
                "startedAt": started,
                "finishedAt": now_rfc3339(),
                "containerID": f"pairvol-local://{self.process.pid}",
            }
            if sig is not None:
                terminated["signal"] = sig
            if message:
                terminated["message"] = message
            logger.info("%s/%s container %s exited with %s", *self.worker.key, self.name, code)
            self._liveness_failed = False
            if not await self._after_exit(terminated, failed):
                return

    async def _after_exit(self, terminated: JsonDict, failed: bool) -> bool:
        """Record the container's end; restart it after the back-off if its policy says so.
        False: it stays terminated."""
        sim = self.worker.kubelet.sim
        self.state.ready = False
        self.state.pid = None
        if self.stopping or not should_restart(self.policy, 1 if failed else 0):
            self.state.state = {"terminated": terminated}
            self.worker.changed()
            return False
        self.state.last_state = {"terminated": terminated}
        self.state.restart_count += 1
        delay = backoff_delay(self.state.restart_count, sim.backoff_base, sim.backoff_cap)
        pod_ref = f"pod={self.worker.key[1]}_{self.worker.key[0]}({self.worker.uid})"
        self.state.state = {
            "waiting": {
                "reason": "CrashLoopBackOff",
                "message": f"back-off {delay:g}s restarting failed container={self.name} {pod_ref}",
            }
        }
        self.worker.event(
            "Warning",
            "BackOff",
            f"Back-off restarting failed container {self.name} in pod {self.worker.key[1]}_"
            f"{self.worker.key[0]}({self.worker.uid})",
        )
        self.worker.changed()
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await bounded(self._wake.wait(), delay)
        return True

    async def _start(self, prepared: _Prepared) -> None:
        kubelet = self.worker.kubelet
        cgroup = None
        if kubelet.cgroup_root is not None:
            self._start_count += 1
            cgroup = kubelet.cgroup_root / f"{self.worker.uid}-{self.name}-{self._start_count}"
        argv, _ = launch_script(
            cgroup_procs=str(cgroup / "cgroup.procs") if cgroup is not None else None,
            mounts=prepared.mounts,
            netns=self.worker.netns,
            workdir=prepared.workdir,
            argv=prepared.argv,
            file_targets=prepared.file_targets,
            hostname=self.worker.key[1],
            security=prepared.security,
        )
        self._log_offset = await asyncio.to_thread(_size_of, self.worker.log_path)
        if prepared.termination_file is not None:
            await asyncio.to_thread(_fresh_file, prepared.termination_file)
        self.process = await ContainerProcess.spawn(argv, prepared.env, self.worker.log_path, cgroup)
        self.worker.event("Normal", "Started", f"Started container {self.name}")
        self.state.pid = self.process.pid
        self.state.started = True
        self.state.state = {"running": {"startedAt": now_rfc3339()}}
        self.state.ready = prepared.readiness is None
        logger.info(
            "%s/%s container %s started on %s as pid %s: %s",
            *self.worker.key,
            self.name,
            kubelet.name,
            self.process.pid,
            prepared.argv,
        )
        self.worker.changed()

    async def _probe_loop(self, probe: ProbeSpec, kind: str) -> None:
        tracker = ProbeTracker(probe, healthy=(kind == "liveness"))
        await asyncio.sleep(probe.initial_delay)
        while True:
            ok = await self.worker.kubelet.run_probe(probe, self)
            before = tracker.healthy
            healthy = tracker.record(ok)
            if kind == "readiness" and healthy != self.state.ready:
                self.state.ready = healthy
                self.worker.changed()
            if kind == "liveness" and before and not healthy:
                logger.info("%s/%s container %s failed liveness; restarting", *self.worker.key, self.name)
                # Stopping the process ends this task via cancellation from run().
                self._liveness_failed = True
                task = asyncio.create_task(self._terminate_process(self.worker.grace_period()))
                self._side_tasks.add(task)
                task.add_done_callback(self._side_tasks.discard)
                return
            await asyncio.sleep(probe.period)

    async def _terminate_process(self, grace: float) -> None:
        process = self.process
        if process is None or process.proc.returncode is not None:
            return
        self.worker.event("Normal", "Killing", f"Stopping container {self.name}")
        process.signal_group(signal.SIGTERM)
        try:
            await bounded(asyncio.shield(process.proc.wait()), grace)
        except TimeoutError:
            logger.info("container %s ignored SIGTERM for %gs; SIGKILL", self.name, grace)
        await process.kill_all()

    async def stop(self, grace: float) -> None:
        """Graceful stop for deletion: SIGTERM, wait ``grace``, SIGKILL; no restart."""
        self.stopping = True
        self._wake.set()
        await self._terminate_process(grace)

    async def kill(self) -> None:
        """SIGKILL now (a crash); run() restarts it per restartPolicy unless stopping."""
        if self.process is not None and self.process.proc.returncode is None:
            await self.process.kill_all()


class PodWorker:
    """Everything the kubelet does for one pod: prepare, run containers, report, delete."""

    def __init__(self, kubelet: NodeKubelet, pod: JsonDict) -> None:
        self.kubelet = kubelet
        self.pod = pod
        self.uid = _safe_name(pod_uid(pod))
        self.key = pod_key(pod)
        self.restart_policy = str(spec(pod).get("restartPolicy") or "Always")
        self.pod_dir: Path = kubelet.root / "pods" / self.uid
        self.log_path: Path = kubelet.root / "logs" / f"{self.key[0]}_{self.key[1]}.log"
        self.start_time = now_rfc3339()
        previous = {str(s.get("name")): s for s in (pod.get("status") or {}).get("containerStatuses") or []}
        self.runners: list[ContainerRunner] = []
        # Init containers run to completion, in order, before the others start; they are
        # retried on failure unless the pod's restartPolicy is Never.
        init_policy = "Never" if self.restart_policy == "Never" else "OnFailure"
        self.init_runners = [
            ContainerRunner(
                self,
                container,
                ContainerState(name=str(container.get("name")), image=str(container.get("image") or "")),
                init_policy,
            )
            for container in spec(pod).get("initContainers") or []
        ]
        for container in spec(pod).get("containers") or []:
            state = ContainerState(name=str(container.get("name")), image=str(container.get("image") or ""))
            old = previous.get(state.name)
            if old is not None:  # the node restarted: the container runs again, counted
                state.restart_count = int(old.get("restartCount", 0)) + 1
                state.last_state = {"terminated": {"exitCode": 137, "reason": "Error", "message": "node restarted"}}
            if self.init_runners:
                state.state = {"waiting": {"reason": "PodInitializing"}}
            self.runners.append(ContainerRunner(self, container, state, self.restart_policy))
        self.message = ""
        self.reason = ""
        self.host_network = bool(spec(pod).get("hostNetwork", False))
        self.sandbox: PodSandbox | None = None  # the pod's own network (not hostNetwork)
        self._ip = ""  # its address, kept in the status after the network is gone
        self.deleting = False
        self.finished = asyncio.Event()
        self._dirty = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._publisher: asyncio.Task[None] | None = None
        self._delete_task: asyncio.Task[None] | None = None
        # the ServiceAccount token's directory, its owner and its lifetime (see _rotate_token)
        self._token: tuple[Path, tuple[int, int] | None, float] | None = None

    @property
    def all_runners(self) -> list[ContainerRunner]:
        return [*self.init_runners, *self.runners]

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"pod-{self.key[0]}/{self.key[1]}")
        self._publisher = asyncio.create_task(self._publish_loop())
        self.changed()

    def grace_period(self) -> float:
        deletion = meta(self.pod).get("deletionGracePeriodSeconds")
        if deletion:  # 0/None: not given (a force delete removes the object instead)
            return float(deletion)
        return float(spec(self.pod).get("terminationGracePeriodSeconds", 30))

    async def _run(self) -> None:
        rotating: asyncio.Task[None] | None = None
        try:
            if not self.host_network:
                self.sandbox = await self.kubelet.sim.net.add_pod(self.kubelet.name)
                self._ip = str(self.sandbox.ip)
                logger.info("%s/%s: pod network %s, IP %s", *self.key, self.sandbox.netns, self.sandbox.ip)
            await self._prepare_until_ready()
            if self.deleting:
                return
            if self._token is not None:
                rotating = asyncio.create_task(self._rotate_token(*self._token), name=f"token-{self.key[1]}")
            for init in self.init_runners:
                await init.run()
                if self.deleting or init.state.state.get("terminated", {}).get("exitCode") != 0:
                    return  # restartPolicy Never and it failed: the pod has failed
            await asyncio.gather(*(runner.run() for runner in self.runners))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("pod %s/%s failed in the node simulator", *self.key)
            self.message = f"node simulator error: {exc}"
            for runner in self.runners:
                runner.state.state = {
                    "terminated": {"exitCode": 128, "reason": "StartError", "message": str(exc)[:500]}
                }
            self.changed()
        finally:
            if rotating is not None:
                rotating.cancel()
            if not self.deleting:
                # every container has terminated for good: the pod's network goes, its
                # address stays in the status (as the kubelet tears down a finished sandbox)
                await self.release_network()
                # and its CSI volumes are unpublished (and unstaged), as the kubelet's volume
                # manager does for a terminated pod: a Job's next pod can stage them afresh
                self.changed()
                await self._release_volumes()
            self.changed()

    async def _rotate_token(self, directory: Path, owner: tuple[int, int] | None, lifetime: float) -> None:
        """Replace the pod's token once half its lifetime has passed, for as long as the pod
        runs; while the API server cannot be reached (a partitioned node), every second."""
        while True:
            await asyncio.sleep(lifetime / 2)
            while True:
                try:
                    lifetime = await kubeconfig_mod.rotate_token(self.kubelet.sim.api, self.pod, directory, owner)
                    logger.debug("%s/%s: ServiceAccount token replaced (valid %.0fs)", *self.key, lifetime)
                    break
                except (ApiError, OSError) as exc:
                    logger.warning("%s/%s: cannot replace the ServiceAccount token yet: %s", *self.key, exc)
                    await asyncio.sleep(1.0)

    async def _prepare_until_ready(self) -> None:
        pull_failures = 0
        while True:
            try:
                await self._prepare()
                self.message = self.reason = ""
                return
            except ImagePullError as exc:
                pull_failures += 1
                await self._image_pull_failed(exc, pull_failures)
                if self.deleting:
                    return
            except VolumeNotReady as exc:
                # as a kubelet: the pod stays ContainerCreating, FailedMount says why
                logger.info("pod %s/%s: volumes not ready: %s", *self.key, exc)
                self.event("Warning", "FailedMount", str(exc))
                for runner in self.all_runners:
                    runner.state.state = {"waiting": {"reason": "ContainerCreating"}}
                self.changed()
                await self._wait_for_stop(self.kubelet.sim.config_retry)
                if self.deleting:
                    return
            except (PodConfigError, ApiError) as exc:
                reason = "CreateContainerConfigError" if isinstance(exc, PodConfigError) else ("ContainerCreating")
                logger.warning("pod %s/%s cannot start yet: %s", *self.key, exc)
                if isinstance(exc, PodConfigError):
                    self.event("Warning", "Failed", f"Error: {exc}")
                for runner in self.all_runners:
                    runner.state.state = {"waiting": {"reason": reason, "message": str(exc)}}
                self.changed()
                with contextlib.suppress(TimeoutError):
                    await bounded(self._stop_requested.wait(), self.kubelet.sim.config_retry)
                if self.deleting:
                    return

    async def _image_pull_failed(self, exc: ImagePullError, failures: int) -> None:
        """Show a failed pull as a kubelet does: ``ErrImagePull``, then ``ImagePullBackOff``
        for the back-off; the caller tries again after it (the image may be changed)."""
        sim = self.kubelet.sim
        logger.warning("pod %s/%s cannot start: %s", *self.key, exc)
        for runner in self.all_runners:
            if runner.name == exc.container:
                runner.state.state = {"waiting": {"reason": "ErrImagePull", "message": str(exc)}}
            else:
                runner.state.state = {"waiting": {"reason": "ContainerCreating"}}
        self.event("Warning", "Failed", f'Failed to pull image "{exc.image}": {exc}')
        self.event("Warning", "Failed", "Error: ErrImagePull")
        self.changed()
        await self._wait_for_stop(sim.config_retry)
        if self.deleting:
            return
        for runner in self.all_runners:
            if runner.name == exc.container:
                message = f'Back-off pulling image "{exc.image}": {exc}'
                runner.state.state = {"waiting": {"reason": "ImagePullBackOff", "message": message}}
        self.event("Normal", "BackOff", f'Back-off pulling image "{exc.image}"')
        self.event("Warning", "Failed", "Error: ImagePullBackOff")
        self.changed()
        await self._wait_for_stop(backoff_delay(failures, sim.backoff_base, sim.backoff_cap))

    async def _wait_for_stop(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await bounded(self._stop_requested.wait(), seconds)

    async def _prepare(self) -> None:
        kubelet = self.kubelet
        sim = kubelet.sim
        namespace = self.key[0]
        # the spec as it is now: a pod's images may be changed while it cannot start
        pod_spec = spec(self.pod)
        declared = [*(pod_spec.get("initContainers") or []), *(pod_spec.get("containers") or [])]
        current = {str(c.get("name")): c for c in declared}
        for runner in self.all_runners:  # the images first, as a kubelet pulls them
            runner.container = current.get(runner.name, runner.container)
            runner.state.image = str(runner.container.get("image") or "")
            container_command(runner.container)
        objects: dict[tuple[str, str], JsonDict | None] = {}
        for plural, name in sorted(referenced_objects(self.pod)):
            objects[(plural, name)] = await sim.api.get_object(namespace, plural, name)
        volumes = plan_volumes(self.pod, kubelet.root, self.pod_dir, objects)
        volumes = {
            name: (
                dataclasses.replace(vol, path=_host_shared(vol.path, kubelet.root))
                if isinstance(vol, VolumeDir)
                else vol
            )
            for name, vol in volumes.items()
        }
        claims = {name: vol for name, vol in volumes.items() if isinstance(vol, VolumeClaim)}
        # staged and published through their CSI driver before any container starts
        published = await kubelet.volumes.mount_claims(self.pod, self.uid, claims) if claims else {}
        local = {name: vol for name, vol in volumes.items() if isinstance(vol, VolumeFiles | VolumeDir)}
        await asyncio.to_thread(_materialize, local)
        volumes = {**local, **published}
        info = self.runtime_info()
        base = sim.base_env(kubelet, self.pod)
        security = {
            runner.name: security_plan(self.pod, runner.container, sim.capabilities) for runner in self.all_runners
        }
        credentials: list[Mount] = []
        if sim.service_account_tokens:  # the pod's own ServiceAccount token (API server side)
            users = {(plan.uid, plan.gid) for plan in security.values()}
            owner = next(iter(users)) if len(users) == 1 else None
            issued = await kubeconfig_mod.for_pod(sim.api, self.pod, self.pod_dir, sim.in_cluster_url, owner)
            if issued is None:
                del base["KUBECONFIG"]
            else:  # mounted where a kubelet mounts it, read-only; the kubeconfig in it
                token_dir, lifetime = issued
                self._token = (token_dir, owner, lifetime)
                target = PurePosixPath(kubeconfig_mod.SERVICE_ACCOUNT_DIR)
                credentials.append(Mount(token_dir, target, read_only=True))
                base["KUBECONFIG"] = str(target / "kubeconfig")
        dns_file = await self._resolv_conf()
        if dns_file is not None:  # as the kubelet does: the pod's resolv.conf over the node's
            credentials.append(Mount(dns_file, PurePosixPath(HOST_RESOLV_CONF), read_only=True))
        code = await asyncio.to_thread(code_paths)
        for runner in self.all_runners:
            # a user the image has no passwd entry for gets HOME=/ from the runtime
            home = {"HOME": "/root" if security[runner.name].uid == 0 else "/"}
            env = resolve_env(runner.container, self.pod, info, objects, {**base, **home})
            own = [*plan_mounts(runner.container, volumes), *plan_devices(runner.container, volumes)]
            mounts = keep_code_visible([*credentials, *own], code)
            termination_file = await asyncio.to_thread(self._termination_file, runner)
            if termination_file is not None:
                target = PurePosixPath(
                    str(runner.container.get("terminationMessagePath") or DEFAULT_TERMINATION_MESSAGE_PATH)
                )
                mounts.append(Mount(termination_file, target, read_only=False))
            file_targets = frozenset(await asyncio.to_thread(_file_targets, mounts))
            runner.prepared = _Prepared(
                argv=container_argv(runner.container, env),
                env=env,
                mounts=mounts,
                file_targets=file_targets,
                readiness=parse_probe(runner.container.get("readinessProbe"), runner.container),
                liveness=parse_probe(runner.container.get("livenessProbe"), runner.container),
                workdir=runner.container.get("workingDir"),
                security=security[runner.name],
                termination_file=termination_file,
            )
        for runner in self.all_runners:
            image = str(runner.container.get("image") or "")
            if image and find_image(image) is not None:
                self.event("Normal", "Pulled", f'Container image "{image}" already present on machine')

    async def _resolv_conf(self) -> Path | None:
        """The pod's resolv.conf (cluster DNS first), written to the pod's directory; None
        where the pod keeps the node's (dnsPolicy, hostNetwork) or there is no DNS."""
        dns = self.kubelet.sim.dns
        content = resolv_conf(self.pod, dns.host) if dns is not None else None
        if content is None:
            return None

        def write() -> Path | None:
            if not Path(HOST_RESOLV_CONF).is_file():
                return None  # nothing to mount over (a symlink's target may be absent)
            path = self.pod_dir / "resolv.conf"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
            path.chmod(0o644)
            return path

        return await asyncio.to_thread(write)

    def _termination_file(self, runner: ContainerRunner) -> Path | None:
        """The node-side file a container's terminationMessagePath is bound to (thread).

        The default ``/dev/termination-log`` is bound only if the machine has such a file:
        creating the mount target in this machine's /dev is not ours to do. Such a container
        still reports its log with ``FallbackToLogsOnError``."""
        path = str(runner.container.get("terminationMessagePath") or DEFAULT_TERMINATION_MESSAGE_PATH)
        target = PurePosixPath(path)
        if not target.is_absolute() or ".." in target.parts:
            raise PodConfigError(f"container {runner.name!r}: terminationMessagePath {path!r} must be absolute")
        if target.parts[1:2] == ("dev",) and not Path(path).is_file():
            return None
        source = self.pod_dir / "containers" / _safe_name(runner.name) / "termination-log"
        _fresh_file(source)
        return source

    @property
    def netns(self) -> str:
        """The network namespace the pod's containers run in."""
        if self.sandbox is not None:
            return self.sandbox.netns
        return self.kubelet.sim.net.netns_name(self.kubelet.name)

    @property
    def pod_ip(self) -> str:
        """Empty until the pod's network exists (as in Kubernetes: no podIP yet)."""
        if self.host_network:
            return self.kubelet.ip
        return self._ip

    def runtime_info(self) -> PodRuntimeInfo:
        return PodRuntimeInfo(pod_ip=self.pod_ip, host_ip=self.kubelet.ip, node_name=self.kubelet.name)

    async def release_network(self) -> None:
        """Delete the pod's network namespace once no container runs in it any more."""
        sandbox, self.sandbox = self.sandbox, None
        if sandbox is not None:
            await self.kubelet.sim.net.remove_pod(sandbox)
            logger.info("%s/%s: pod network %s removed", *self.key, sandbox.netns)

    # -- reporting ------------------------------------------------------------------------

    def changed(self) -> None:
        self._dirty.set()

    def event(self, kind: str, reason: str, message: str) -> None:
        """Record a kubelet Event about this pod (sent in the background)."""
        self.kubelet.sim.events.record(self.pod, kind, reason, message, self.kubelet.name)

    def render_status(self) -> JsonDict:
        return render_pod_status(
            containers=[r.state for r in self.runners],
            init_containers=[r.state for r in self.init_runners],
            policy=self.restart_policy,
            info=self.runtime_info(),
            start_time=self.start_time,
            now=now_rfc3339(),
            previous_conditions=(self.pod.get("status") or {}).get("conditions") or [],
            message=self.message,
            reason=self.reason,
        )

    async def _publish_loop(self) -> None:
        while True:
            await self._dirty.wait()
            await self.kubelet.connected.wait()
            self._dirty.clear()
            status = self.render_status()
            try:
                result = await self.kubelet.sim.api.patch_pod_status(*self.key, status)
            except ApiError as exc:
                if exc.status == 404:
                    return  # the pod is gone from the API; nothing left to report
                logger.warning("pod %s/%s status update failed: %s", *self.key, exc)
                self._dirty.set()
                await asyncio.sleep(1.0)
                continue
            if result.get("status"):
                self.pod["status"] = result["status"]

    async def flush_status(self) -> None:
        """Publish the current status now (used before finishing a deletion)."""
        if not self.kubelet.connected.is_set():
            return
        with contextlib.suppress(ApiError):
            await self.kubelet.sim.api.patch_pod_status(*self.key, self.render_status())

    # -- termination ----------------------------------------------------------------------

    def request_delete(self, finalize: bool) -> asyncio.Task[None]:
        """Graceful deletion; ``finalize``: remove the pod object afterwards (it is marked
        with deletionTimestamp), else it is already gone from the API."""
        if self._delete_task is None:
            self.deleting = True
            self._delete_task = asyncio.create_task(self._delete(finalize))
        return self._delete_task

    async def _delete(self, finalize: bool) -> None:
        grace = self.grace_period()
        logger.info("pod %s/%s: terminating (grace %gs)", *self.key, grace)
        self._stop_requested.set()
        await asyncio.gather(*(runner.stop(grace) for runner in self.all_runners))
        if self._task is not None:
            # The runners record their final (terminated) state on their way out.
            try:
                await bounded(asyncio.shield(self._task), 10.0)
            except TimeoutError:
                logger.warning("pod %s/%s: containers did not wind down; cancelling", *self.key)
                await cancel_and_wait(self._task)
        await self._stop_publisher()
        await self.release_network()
        await self._release_volumes()  # the containers are gone: their volumes may go
        if finalize:
            await self.flush_status()
            await self.kubelet.finalize_deletion(self.key, meta(self.pod).get("uid"))
        await asyncio.to_thread(shutil.rmtree, self.pod_dir, True)
        self.finished.set()
        self.kubelet.forget(self)

    async def _release_volumes(self, within: float = 60.0) -> None:
        """Unpublish (and unstage) the pod's CSI volumes, retried: a pod is finalized only
        after its volumes are unmounted, as a kubelet does, or after ``within`` seconds
        (then the volume stays published and the plugin's state says so)."""
        deadline = time.monotonic() + within
        delay = 0.2
        while True:
            try:
                await self.kubelet.volumes.release_pod(self.uid)
                return
            except KubeletError as exc:
                self.event("Warning", "FailedUnmount", str(exc))
                if time.monotonic() > deadline or not self.kubelet.alive:
                    logger.warning("pod %s/%s: volumes not released: %s", *self.key, exc)
                    return
                logger.info("pod %s/%s: %s; retrying", *self.key, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _stop_publisher(self) -> None:
        if self._publisher is not None:
            await cancel_and_wait(self._publisher)
            self._publisher = None

    async def crash(self) -> None:
        """The node died: every process SIGKILLed, no word to the API server."""
        self.deleting = True
        for runner in self.all_runners:
            runner.stopping = True
        if self._task is not None:
            self._task.cancel()
        await self._stop_publisher()
        await asyncio.gather(*(r.kill() for r in self.all_runners), return_exceptions=True)
        await cancel_and_wait(self._task, self._delete_task)
        for runner in self.all_runners:
            if runner.process is not None:
                await runner.process.release()
        await self.release_network()
        self.finished.set()

    async def kill_processes(self) -> None:
        """A crash of all containers (SIGKILL); restarted per restartPolicy."""
        await asyncio.gather(*(r.kill() for r in self.all_runners))


def missing_executable(argv: Sequence[str], env: dict[str, str], mounts: Sequence[Mount] = ()) -> str:
    """The runtime's refusal if ``argv[0]`` is not an executable (on the container's PATH
    for a bare name), else "". Checked on this machine, where pods' programs live; not
    decided (""), when the program may come from one of the pod's volumes."""
    if not argv:
        return "no command to run"
    program = argv[0]
    if "/" in program and not program.startswith("/"):
        return ""  # relative to the container's working directory: its business
    search = [program] if "/" in program else env.get("PATH", os.defpath).split(":")
    targets = [PurePosixPath(m.target) for m in mounts]
    if any(t == PurePosixPath(p) or t in PurePosixPath(p).parents for p in search for t in targets):
        return ""
    if "/" in program:
        found = program if os.path.isfile(program) and os.access(program, os.X_OK) else None
    else:
        found = shutil.which(program, path=env.get("PATH", os.defpath))
    if found is None:
        return f'exec: "{program}": executable file not found in $PATH'
    return ""


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _fresh_file(path: Path) -> None:
    """An empty file anyone in the container may write (the kubelet's mode, 0666)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    path.chmod(0o666)


def _file_targets(mounts: Sequence[Mount]) -> list[PurePosixPath]:
    """Targets bound from a file (a regular file, or a device bound on one): not directories."""
    return [m.target for m in mounts if m.source.exists() and not m.source.is_dir()]


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:100]


def _host_shared(path: Path, node_root: Path) -> Path:
    """Map node-local hostPaths that must be the machine's own (e.g. /dev) back to it."""
    try:
        rel = path.relative_to(node_root / "hostpath")
    except ValueError:
        return path
    absolute = "/" + str(rel)
    if any(absolute == p or absolute.startswith(p + "/") for p in HOST_SHARED_PREFIXES):
        return Path(absolute)
    return path


def _materialize(volumes: dict[str, VolumeFiles | VolumeDir]) -> None:
    """Write Secret/ConfigMap files and create directories (runs in a thread)."""
    for volume in volumes.values():
        if isinstance(volume, VolumeFiles):
            if volume.directory.exists():
                shutil.rmtree(volume.directory)
            volume.directory.mkdir(parents=True, exist_ok=True)
            for rel, (content, mode) in volume.files.items():
                target = volume.directory / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)
                target.chmod(mode)
        elif volume.host_path_type == "FileOrCreate":
            volume.path.parent.mkdir(parents=True, exist_ok=True)
            volume.path.touch(exist_ok=True)
        elif volume.host_path_type == "Directory" and not volume.path.is_dir():
            raise PodConfigError(f"hostPath type check failed: {volume.path} is not a directory")
        elif volume.host_path_type == "File" and not volume.path.is_file():
            raise PodConfigError(f"hostPath type check failed: {volume.path} is not a file")
        elif volume.host_path_type in ("Socket", "CharDevice", "BlockDevice"):
            if not volume.path.exists():
                raise PodConfigError(f"hostPath type check failed: {volume.path} does not exist")
        elif not volume.path.exists():
            # "" (no check) and DirectoryOrCreate: a bind mount needs something to bind.
            volume.path.mkdir(parents=True, exist_ok=True)
            if volume.mode is not None:
                volume.path.chmod(volume.mode)


# ---------------------------------------------------------------------------------------
# one node
# ---------------------------------------------------------------------------------------


class NodeKubelet:
    """The kubelet of one simulated node."""

    def __init__(self, sim: NodeSimulator, name: str) -> None:
        self.sim = sim
        self.name = name
        self.ip = sim.net.node_ip(name)
        self.root = sim.root / name
        # the node's kubelet directory (/var/lib/kubelet): CSI global mounts, pods' volumes
        self.kubelet_dir = self.root / "kubelet"
        self.volumes = NodeVolumes(sim.api, name, self.kubelet_dir)
        self.cgroup_root = sim.cgroup_root / _safe_name(name) if sim.cgroup_root else None
        self.workers: dict[str, PodWorker] = {}
        self.alive = False
        self.partitioned = False
        self.connected = asyncio.Event()  # can talk to the API server
        self.last_heartbeat = time.monotonic()
        self.marked_unknown = False
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._done: set[str] = set()  # uids finished here (not to be restarted)
        self._finalizing: dict[str, asyncio.Task[None]] = {}  # zero-grace DELETEs under way, by uid

    async def start(self) -> None:
        await asyncio.to_thread(self._make_dirs)
        await self.register()
        self.alive = True
        self.partitioned = False
        self.connected.set()
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop(), name=f"heartbeat-{self.name}")
        self._watch_task = asyncio.create_task(self._watch_loop(), name=f"watch-{self.name}")

    def _make_dirs(self) -> None:
        for sub in ("pods", "logs", "hostpath", "kubelet"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        if self.cgroup_root is not None:
            self.cgroup_root.mkdir(parents=True, exist_ok=True)

    def node_object(self) -> JsonDict:
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": {
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    **self.sim.node_labels.get(self.name, {}),
                },
            },
            "spec": {},
        }

    def node_status(self, ready: str, reason: str, message: str) -> JsonDict:
        now = now_rfc3339()
        return {
            "conditions": node_conditions(ready, now, now, reason, message),
            "addresses": [
                {"type": "InternalIP", "address": self.ip},
                {"type": "Hostname", "address": self.name},
            ],
            "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110", "ephemeral-storage": "20Gi"},
            "allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110", "ephemeral-storage": "20Gi"},
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "kubeletVersion": "v1.32.0-pairvol-sim",
                "kubeProxyVersion": "",
                "containerRuntimeVersion": "pairvol-local://1",
                "operatingSystem": "linux",
                "architecture": "amd64",
                "osImage": "pairvol local cluster",
                "kernelVersion": os.uname().release,
                "machineID": self.name,
                "systemUUID": self.name,
                "bootID": f"{self.name}-{time.time_ns()}",
            },
        }

    async def register(self) -> None:
        await self.sim.api.ensure_node(self.node_object())
        await self._post_ready()
        await self._remove_unreachable_taints()
        self.marked_unknown = False

    async def _post_ready(self, status: bool = True) -> None:
        if status or not self.sim.leases_enabled:
            await self.sim.api.patch_node_status(
                self.name, self.node_status("True", "KubeletReady", "kubelet is posting ready status")
            )
        if self.sim.leases_enabled:
            try:
                await self.sim.api.renew_lease(self.name, self.name, _micro_now(), int(self.sim.node_monitor_grace) + 1)
            except ApiError as exc:
                if exc.status == 404:
                    logger.warning("API server has no Lease resource; node leases disabled")
                    self.sim.leases_enabled = False
                else:
                    raise
        self.last_heartbeat = time.monotonic()

    async def _remove_unreachable_taints(self) -> None:
        try:
            node = await self.sim.api.request("GET", f"/api/v1/nodes/{self.name}")
        except ApiError:
            return
        taints = (node.get("spec") or {}).get("taints") or []
        kept = [t for t in taints if t.get("key") != UNREACHABLE_TAINT]
        if len(kept) != len(taints):
            await self.sim.api.patch_node(self.name, {"spec": {"taints": kept}})

    async def _heartbeat_loop(self) -> None:
        beats = 0
        while True:
            await asyncio.sleep(self.sim.status_interval)
            if not self.connected.is_set():
                continue
            beats += 1
            try:
                # the Lease is the heartbeat; the status is posted less often, as a kubelet
                # does (nodeStatusReportFrequency), and at once after a silence
                await self._post_ready(status=self.marked_unknown or beats % STATUS_REPORT_EVERY == 0)
                if self.marked_unknown:
                    await self._remove_unreachable_taints()
                    self.marked_unknown = False
                    for worker in list(self.workers.values()):
                        worker.changed()  # re-assert our pods' readiness
            except ApiError as exc:
                logger.warning("node %s heartbeat failed: %s", self.name, exc)

    async def _watch_loop(self) -> None:
        while True:
            try:
                pods, version = await self.sim.api.list_pods(self.name)
                await self._reconcile(pods)
                async for event in self.sim.api.watch_pods(self.name, version):
                    kind = event.get("type")
                    obj = event.get("object") or {}
                    if kind == "ERROR":
                        break  # e.g. 410 Gone: relist
                    if kind == "DELETED":
                        await self._on_deleted(obj)
                    elif kind in ("ADDED", "MODIFIED"):
                        await self._on_pod(obj)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("node %s: pod watch failed (%s); relisting", self.name, exc)
            await asyncio.sleep(0.5)

    async def _reconcile(self, pods: list[JsonDict]) -> None:
        seen = set()
        for pod in pods:
            seen.add(_safe_name(pod_uid(pod)))
            await self._on_pod(pod)
        for uid, worker in list(self.workers.items()):
            if uid not in seen and not worker.deleting:
                worker.request_delete(finalize=False)

    async def _on_pod(self, pod: JsonDict) -> None:
        uid = _safe_name(pod_uid(pod))
        worker = self.workers.get(uid)
        if meta(pod).get("deletionTimestamp"):
            if worker is not None:
                worker.pod = pod
                worker.request_delete(finalize=True)
            elif uid not in self._done and uid not in self._finalizing:
                # Nothing running here (e.g. the node restarted): just finalize, off the
                # watch loop (the DELETE is retried)
                self._finalizing[uid] = asyncio.create_task(self._finalize_orphan(pod, uid))
            return
        if worker is not None:
            worker.pod.update({k: v for k, v in pod.items() if k != "status"})
            return
        if uid in self._done:
            return
        phase = (pod.get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed"):
            self._done.add(uid)
            return
        worker = PodWorker(self, pod)
        self.workers[uid] = worker
        logger.info("node %s: starting pod %s/%s", self.name, *worker.key)
        worker.start()

    async def _on_deleted(self, pod: JsonDict) -> None:
        uid = _safe_name(pod_uid(pod))
        self._done.discard(uid)  # a new pod may reuse the name (and a stand-in uid)
        worker = self.workers.get(uid)
        if worker is not None and not worker.deleting:
            worker.request_delete(finalize=False)

    async def _finalize_orphan(self, pod: JsonDict, uid: str) -> None:
        try:
            if await self.finalize_deletion(pod_key(pod), meta(pod).get("uid")):
                self._done.add(uid)
        finally:
            self._finalizing.pop(uid, None)

    async def finalize_deletion(self, key: tuple[str, str], uid: str | None, within: float = 60.0) -> bool:
        """The zero-grace DELETE that ends a pod's graceful deletion, retried until the API
        server took it (a pod left Terminating on a healthy node would block whoever
        waits for it: a volume's finalizer, a namespace). False if it never did: a later
        relist sees the pod again and retries."""
        deadline = time.monotonic() + within
        delay = 0.2
        while True:
            if self.connected.is_set():
                try:
                    await self.sim.api.delete_pod_now(*key, uid=uid)
                    return True
                except (ApiError, OSError, TimeoutError) as exc:
                    logger.warning("pod %s/%s: final delete failed (%s); retrying", *key, exc)
            if time.monotonic() > deadline or not self.alive:
                logger.warning("pod %s/%s: final delete not done; the next relist retries", *key)
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def forget(self, worker: PodWorker) -> None:
        if self.workers.get(worker.uid) is worker:
            del self.workers[worker.uid]
        if worker.key and worker.deleting:
            self._done.add(worker.uid)

    async def _cancel_tasks(self) -> None:
        tasks = [t for t in (self._heartbeat_task, self._watch_task) if t is not None]
        tasks += list(self._finalizing.values())
        self._heartbeat_task = self._watch_task = None
        await cancel_and_wait(*tasks)

    async def kill(self) -> None:
        """Power off: every process SIGKILLed (the pods', and whatever else runs in the
        node's cgroup), no more heartbeats or status updates."""
        self.alive = False
        self.connected.clear()
        await self._cancel_tasks()
        workers = list(self.workers.values())
        self.workers.clear()
        await asyncio.gather(*(w.crash() for w in workers), return_exceptions=True)
        self._done.clear()
        if self.cgroup_root is not None:
            await asyncio.to_thread(_sweep_cgroup_tree, self.cgroup_root)
        # the kubelet's memory dies with it: which volumes it staged and published, which
        # CSI drivers registered (their plugins register again when the node is back)
        self.volumes = NodeVolumes(self.sim.api, self.name, self.kubelet_dir)

    async def restart(self) -> None:
        if self.alive:
            raise KubeletError(f"node {self.name} is running; kill_node it first")
        await self.start()

    async def partition(self) -> None:
        self.partitioned = True
        self.connected.clear()
        # The kubelet loses the API server: no watch, no heartbeats; pods keep running.
        watch, self._watch_task = self._watch_task, None
        await cancel_and_wait(watch)

    async def heal(self) -> None:
        self.partitioned = False
        if not self.alive:
            return
        self.connected.set()
        if self._watch_task is None:
            self._watch_task = asyncio.create_task(self._watch_loop(), name=f"watch-{self.name}")

    async def run_probe(self, probe: ProbeSpec, runner: ContainerRunner) -> bool:
        host = probe.host or runner.worker.pod_ip
        try:
            if probe.kind == "exec":
                process = runner.process
                if process is None:
                    return False
                privileges = runner.prepared.security.setpriv_argv() if runner.prepared is not None else []
                argv = ["nsenter", "--target", str(process.pid), "--mount", "--net", "--", *privileges, *probe.command]
                result = await run_command(argv, check=False, time_limit=probe.timeout + 5)
                return result.returncode == 0
            reader, writer = await self.sim.net.open_connection(self.name, host, probe.port, time_limit=probe.timeout)
            try:
                if probe.kind == "tcp":
                    return True
                if probe.scheme == "HTTPS":
                    context = ssl.create_default_context()
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                    await bounded(writer.start_tls(context, server_hostname=host), probe.timeout)
                headers = "".join(f"{k}: {v}\r\n" for k, v in probe.headers)
                writer.write(
                    f"GET {probe.path} HTTP/1.1\r\nHost: {host}:{probe.port}\r\n"
                    f"User-Agent: kube-probe/1.32\r\n{headers}Connection: close\r\n\r\n".encode()
                )
                await writer.drain()
                line = await bounded(reader.readline(), probe.timeout)
                parts = line.split()
                return len(parts) >= 2 and 200 <= int(parts[1]) < 400
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
        except (OSError, TimeoutError, ValueError, ssl.SSLError, KubeletError):
            return False


def code_paths() -> list[Path]:
    """Where the running Python takes its code from, which every container of the
    ``pairvol/pairvol`` image runs (:mod:`pairvol.localcluster.images`): the virtualenv,
    the package's source directory (an editable install) and PYTHONPATH entries."""
    import pairvol

    paths = [Path(sys.prefix), Path(pairvol.__file__).resolve().parent.parent]
    paths += [Path(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    unique: list[Path] = []
    for path in (p.resolve() for p in paths):
        if path.is_dir() and path not in unique:
            unique.append(path)
    return unique


def _micro_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---------------------------------------------------------------------------------------
# the simulator
# ---------------------------------------------------------------------------------------


class NodeAddon(Protocol):
    """Something that runs on every node besides its pods (the local cluster's CSI node
    plugins): it dies with a killed node and starts again when the node is powered on."""

    async def node_killed(self, name: str) -> None:
        """The node's processes are gone (called after the kubelet's kill): what is left
        of the addon there, processes or kernel state, must go as at a power-off."""

    async def node_restarted(self, name: str) -> None:
        """The node's kubelet runs again (called after it re-registered)."""


class NodeSimulator:
    """Kubelets for ``nodes`` against the API server at ``api_url``.

    ``async with NodeSimulator(url, nodes=["node-1", "node-2"], root=tmp) as sim:`` — creates
    the network, registers Ready nodes, runs the pods scheduled onto them; on exit every
    process is killed and every namespace, veth, bridge and cgroup removed.
    """

    def __init__(
        self,
        api_url: str,
        nodes: Sequence[str],
        root: Path,
        *,
        status_interval: float = 1.0,
        node_monitor_grace: float = 4.0,
        backoff_base: float = 1.0,
        backoff_cap: float = 30.0,
        config_retry: float = 1.0,
        node_labels: dict[str, dict[str, str]] | None = None,
        use_cgroups: bool = True,
        service_account_tokens: bool = False,
    ) -> None:
        self.api_url = api_url
        # True: pods get a kubeconfig with a token of their ServiceAccount (held to its
        # RBAC) instead of the node's admin kubeconfig.
        self.service_account_tokens = service_account_tokens
        self.node_names = list(nodes)
        self.root = Path(root)
        self.status_interval = status_interval
        self.node_monitor_grace = node_monitor_grace
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.config_retry = config_retry
        self.node_labels = node_labels or {}
        # extra environment of every container started on a node from now on (the fault
        # injector's clock skew: libfaketime's LD_PRELOAD and FAKETIME)
        self.node_env: dict[str, dict[str, str]] = {}
        self.use_cgroups = use_cgroups
        self.leases_enabled = True
        self.net = ClusterNetwork(self.node_names)
        self.api = KubeApi(api_url)
        self.events = EventRecorder(self.api)
        self.proxy: ApiProxy | None = None
        self.cgroup_root: Path | None = None
        self.capabilities = own_bounding_set()  # what a privileged container gets
        self.kubelets: dict[str, NodeKubelet] = {}
        self.addons: list[NodeAddon] = []  # told of node kills and restarts, in this order
        self._controller: asyncio.Task[None] | None = None
        self.router: ServiceRouter | None = None  # Services: endpoints + per-node DNAT
        self.dns: ClusterDNS | None = None  # Service names, for pods with dnsPolicy ClusterFirst

    async def __aenter__(self) -> NodeSimulator:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        await self.net.start()
        assert self.net.plan is not None
        target = urlsplit(self.api_url)
        if not target.hostname or not target.port:
            raise KubeletError(f"api_url {self.api_url!r} must be http://host:port")
        self.proxy = ApiProxy(self.net.bridge_ip, target.hostname, target.port)
        await self.proxy.start()
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        await kubeconfig_mod.write(self.kubeconfig_path, self.in_cluster_url)
        self.dns = ClusterDNS(self.net.bridge_ip, lambda: self.router.dns_records if self.router else {})
        await self.dns.start()
        if self.use_cgroups:
            self.cgroup_root = await asyncio.to_thread(_prepare_cgroup_root, self.net.plan.token)
        for name in self.node_names:
            kubelet = NodeKubelet(self, name)
            self.kubelets[name] = kubelet
            await kubelet.start()
        self._controller = asyncio.create_task(self._node_lifecycle_loop())
        self.router = ServiceRouter(
            self.api,
            {name: self.net.netns_name(name) for name in self.node_names},
            connected=lambda name: self.kubelets[name].connected.is_set(),
        )
        await self.router.start()

    async def close(self) -> None:
        """Kill every pod process, remove network and cgroups. Idempotent; never raises."""
        if self._controller is not None:
            await cancel_and_wait(self._controller)
            self._controller = None
        if self.router is not None:
            await self.router.close()
            self.router = None
        if self.dns is not None:
            await self.dns.close()
            self.dns = None
        for kubelet in self.kubelets.values():
            try:
                await kubelet.kill()
            except Exception:
                logger.exception("stopping node %s failed", kubelet.name)
        if self.proxy is not None:
            await self.proxy.close()
            self.proxy = None
        await self.events.close()
        await self.api.close()
        await self.net.close()
        if self.cgroup_root is not None:
            await asyncio.to_thread(_sweep_cgroup_tree, self.cgroup_root)
            self.cgroup_root = None

    # -- what pods see --------------------------------------------------------------------

    @property
    def in_cluster_url(self) -> str:
        """The API server as reachable from inside a node."""
        if self.proxy is None:
            raise KubeletError("node simulator not started")
        return f"http://{self.net.bridge_ip}:{self.proxy.port}"

    @property
    def kubeconfig_path(self) -> Path:
        return self.root / "kubeconfig"

    def base_env(self, kubelet: NodeKubelet, pod: JsonDict) -> dict[str, str]:
        bin_dir = str(Path(sys.executable).parent)
        assert self.proxy is not None
        return {
            "PATH": f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "HOSTNAME": str(meta(pod).get("name") or kubelet.name),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "KUBERNETES_SERVICE_HOST": self.net.bridge_ip,
            "KUBERNETES_SERVICE_PORT": str(self.proxy.port),
            "KUBECONFIG": str(self.kubeconfig_path),
            **self.node_env.get(kubelet.name, {}),
        }

    # -- queries --------------------------------------------------------------------------

    def node_ip(self, name: str) -> str:
        return self.net.node_ip(name)

    def _kubelet(self, name: str) -> NodeKubelet:
        try:
            return self.kubelets[name]
        except KeyError:
            raise KubeletError(f"unknown node {name!r}; nodes: {sorted(self.kubelets)}") from None

    def _worker(self, namespace: str, name: str) -> PodWorker:
        for kubelet in self.kubelets.values():
            for worker in kubelet.workers.values():
                if worker.key == (namespace, name) and not worker.deleting:
                    return worker
        raise KubeletError(f"pod {namespace}/{name} is not running on any simulated node")

    def pod_pids(self, namespace: str, name: str) -> list[int]:
        """PIDs of the pod's container main processes (for tests)."""
        worker = self._worker(namespace, name)
        return [r.process.pid for r in worker.runners if r.process is not None and r.process.proc.returncode is None]

    def node_pids(self, name: str) -> list[int]:
        """Every live process of the node's pods (cgroup members, or main processes and
        their descendants). Reads /proc synchronously: meant for tests."""
        kubelet = self._kubelet(name)
        if kubelet.cgroup_root is not None and kubelet.cgroup_root.exists():
            return _cgroup_pids(kubelet.cgroup_root)
        mains = [
            r.process.pid
            for w in kubelet.workers.values()
            for r in w.runners
            if r.process is not None and r.process.proc.returncode is None
        ]
        return mains + [pid for main in mains for pid in _descendants(main)]

    def log_path(self, node: str, namespace: str, pod: str) -> Path:
        return self.root / node / "logs" / f"{namespace}_{pod}.log"

    def host_path(self, node: str, path: str) -> Path:
        """Where ``hostPath: path`` of ``node`` lives on this machine."""
        return self.root / node / "hostpath" / path.lstrip("/")

    async def run_in_node(self, name: str, argv: Sequence[str], *, time_limit: float = 30.0) -> CommandResult:
        """Run ``argv`` in the node's network namespace (not in a pod's mounts)."""
        self._kubelet(name)
        return await self.net.run_in_node(name, argv, time_limit=time_limit)

    async def exec_in_pod(
        self, namespace: str, name: str, argv: Sequence[str], *, time_limit: float = 30.0
    ) -> CommandResult:
        """Like ``kubectl exec``: run ``argv`` in the mounts and network of the pod's first
        container, with its user and capabilities."""
        worker = self._worker(namespace, name)
        runner = worker.runners[0]
        process = runner.process
        if process is None or process.proc.returncode is not None or runner.prepared is None:
            raise KubeletError(f"pod {namespace}/{name} has no running container")
        privileges = runner.prepared.security.setpriv_argv()
        argv = ["nsenter", "--target", str(process.pid), "--mount", "--net", "--", *privileges, *argv]
        return await run_command(argv, check=False, time_limit=time_limit)

    # -- faults ---------------------------------------------------------------------------

    async def kill_pod(self, namespace: str, name: str) -> None:
        """SIGKILL every container of the pod (a crash); restarted per restartPolicy."""
        await self._worker(namespace, name).kill_processes()

    async def kill_node(self, name: str) -> None:
        """Power the node off: all its processes SIGKILLed (returns when they are gone);
        no more heartbeats, so it turns Ready=Unknown after ``node_monitor_grace``."""
        await self._kubelet(name).kill()
        for addon in list(self.addons):
            await addon.node_killed(name)
        logger.info("node %s killed", name)

    async def restart_node(self, name: str) -> None:
        """Power the node on again: re-register Ready and restart the pods bound to it."""
        kubelet = self._kubelet(name)
        if self.net.is_partitioned(name):
            await self.net.heal(name)
        await kubelet.restart()
        if self.router is not None:
            self.router.resync()
        for addon in list(self.addons):
            await addon.node_restarted(name)
        logger.info("node %s restarted", name)

    async def partition_node(self, name: str) -> None:
        """Cut the node off (silent DROP both ways), its kubelet from the API server too."""
        kubelet = self._kubelet(name)
        await self.net.partition(name)
        await kubelet.partition()

    async def heal_node(self, name: str) -> None:
        kubelet = self._kubelet(name)
        await self.net.heal(name)
        await kubelet.heal()
        if self.router is not None:
            self.router.resync()

    # -- node lifecycle controller ------------------------------------------------------

    async def _node_lifecycle_loop(self) -> None:
        while True:
            await asyncio.sleep(min(0.5, self.node_monitor_grace / 4))
            for kubelet in self.kubelets.values():
                silent_for = time.monotonic() - kubelet.last_heartbeat
                if kubelet.marked_unknown or silent_for < self.node_monitor_grace:
                    continue
                try:
                    await self._mark_unknown(kubelet)
                except ApiError as exc:
                    logger.warning("cannot mark node %s unknown: %s", kubelet.name, exc)

    async def _mark_unknown(self, kubelet: NodeKubelet) -> None:
        message = "Kubelet stopped posting node status."
        await self.api.patch_node_status(kubelet.name, kubelet.node_status("Unknown", "NodeStatusUnknown", message))
        node = await self.api.request("GET", f"/api/v1/nodes/{kubelet.name}")
        taints = [t for t in (node.get("spec") or {}).get("taints") or [] if t.get("key") != UNREACHABLE_TAINT]
        now = now_rfc3339()
        taints += [
            {"key": UNREACHABLE_TAINT, "effect": effect, "timeAdded": now} for effect in ("NoSchedule", "NoExecute")
        ]
        await self.api.patch_node(kubelet.name, {"spec": {"taints": taints}})
        pods, _ = await self.api.list_pods(kubelet.name)
        for pod in pods:
            await self._mark_pod_not_ready(pod, now)
        kubelet.marked_unknown = True
        logger.info("node %s: no heartbeat for %gs, marked Ready=Unknown", kubelet.name, self.node_monitor_grace)

    async def _mark_pod_not_ready(self, pod: JsonDict, now: str) -> None:
        status = pod.get("status") or {}
        conditions = []
        for cond in status.get("conditions") or []:
            cond = dict(cond)
            if cond.get("type") in ("Ready", "ContainersReady") and cond.get("status") != "False":
                cond.update(status="False", reason="NodeNotReady", lastTransitionTime=now)
            conditions.append(cond)
        containers = [{**c, "ready": False} for c in status.get("containerStatuses") or []]
        patch: dict[str, Any] = {"conditions": conditions}
        if containers:
            patch["containerStatuses"] = containers
        with contextlib.suppress(ApiError):
            await self.api.patch_pod_status(*pod_key(pod), patch)
