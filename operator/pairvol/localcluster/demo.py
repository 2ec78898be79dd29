"""``pairvol demo`` (``make demo``): the whole pairvol story on 3 simulated nodes.

Why this exists: it is the proof a reader can run. It starts the emulated API server
(:class:`~pairvol.localcluster.cluster.LocalCluster`) and the node simulator (real processes
in per-node network namespaces), installs pairvol as a user would — ``kubectl create
namespace apps`` and ``helm install`` of charts/pairvol, so the operator is the chart's
Deployment of two peering replicas running on the nodes under the chart's RBAC — applies
``examples/basic.yaml``, waits for ``Replicating``, runs a writer with a verifiable write
log against the primary's NBD export, kills the primary's node (and the operator replica
that may run there), and shows the automatic failover and re-protection. Then it verifies
the data and prints RTO, lost acknowledged writes and checkpoints cut. The second part
(:mod:`pairvol.localcluster.demo_pvc`, left out with ``--no-pvc``) is the same through a
PersistentVolumeClaim: the CSI driver, a pod writing to a file system on the claim while
its volume's primary node is killed, the file system and the log verified after the pod
moved. Any failed expectation exits non-zero.

The building blocks (:class:`Stack`, :class:`Writer`, :func:`verify_log`) are also what the
e2e tests use, so the demo and the tests exercise the same path; the e2e tests mostly run
the operator as a process (``Stack.up``) so that they can kill and restart it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Generic, Protocol, TypeVar

import yaml

from pairvol.agent.procs import free_port
from pairvol.aio import bounded, cancel_and_wait, signal_child
from pairvol.errors import PairvolError
from pairvol.kube.client import KubeClient
from pairvol.kube.config import load_config
from pairvol.kube.paths import pods_path, volume_path
from pairvol.localcluster import demo_pvc
from pairvol.localcluster.chart import ChartOperator, counter_total

BLOCK = 4096
REPO = Path(__file__).resolve().parents[3]


class WaitingFor(str):
    """A reason to keep waiting: falsy, so ``wait_for`` goes on, but shown if it times out."""

    def __bool__(self) -> bool:
        return False


class DemoError(PairvolError):
    """An expectation of the demo (or an e2e scenario) was not met."""




def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------- operator


class OperatorProcess:
    """The real operator (``python -m pairvol operator``) as a child process, by PID.

    With ``pod`` (the pod template of the chart's operator Deployment) it runs as that pod
    would: the ``operator`` container's user, capabilities, no_new_privs and read-only root
    with its emptyDir volumes, applied by the node simulator's rules; the kubeconfig is
    handed over as a world-readable copy, as a projected token would be. A kubeconfig whose
    token is in a ``token`` file beside it (:meth:`Stack.up` with ``token_lifetime_s``) is
    handed over in place, directory and all, so the operator sees the file replaced.
    """

    def __init__(
        self, kubeconfig: Path, log_path: Path, env: Mapping[str, str], pod: Mapping[str, Any] | None = None
    ) -> None:
        self.kubeconfig, self.log_path, self.env = kubeconfig, log_path, dict(env)
        self.pod = pod
        self.proc: asyncio.subprocess.Process | None = None
        self.metrics_port = free_port()

    def _as_in_pod(self, argv: list[str]) -> tuple[list[str], dict[str, str]]:
        """The argv and environment that run ``argv`` as the operator container (blocking)."""
        from pairvol.localcluster.kubelet import code_paths
        from pairvol.localcluster.kubelet_pods import (
            Mount,
            PodRuntimeInfo,
            VolumeDir,
            field_ref,
            keep_code_visible,
            launch_script,
            plan_mounts,
            plan_volumes,
            security_plan,
        )

        assert self.pod is not None
        containers = [c for c in (self.pod.get("spec") or {}).get("containers") or [] if c.get("name") == "operator"]
        if len(containers) != 1:
            raise DemoError("the operator pod template has no container named 'operator'")
        security = security_plan(self.pod, containers[0])
        pod_dir = self.log_path.parent / f"{self.log_path.stem}-pod"
        others = [v.get("name") for v in self.pod["spec"].get("volumes") or [] if "emptyDir" not in v]
        if others:
            raise DemoError(f"the operator pod may only have emptyDir volumes here, not {others}")
        volumes = plan_volumes(self.pod, pod_dir, pod_dir, {})
        for volume in volumes.values():
            assert isinstance(volume, VolumeDir)
            volume.path.mkdir(parents=True, exist_ok=True)
            volume.path.chmod(0o777)  # an emptyDir is writable by any user
        # like a projected service account token: a read-only volume readable by the user
        if (self.kubeconfig.parent / "token").exists():  # rotated in place: readable where it is
            kube_dir, kubeconfig = self.kubeconfig.parent, self.kubeconfig
            for path in (kubeconfig, kube_dir / "token"):
                path.chmod(0o444)
        else:
            kube_dir = pod_dir / "kube"
            kube_dir.mkdir(exist_ok=True)
            kubeconfig = kube_dir / "kubeconfig"
            kubeconfig.write_bytes(self.kubeconfig.read_bytes())
            kubeconfig.chmod(0o444)
        for directory in (kube_dir, pod_dir, pod_dir.parent):  # traversable by the container's user
            directory.chmod(directory.stat().st_mode | 0o111)
        # the downward API entries of the container's env (who the pod is); the operator's
        # settings stay the Stack's
        named = {**self.pod, "metadata": {"name": f"pairvol-{self.log_path.stem}", "namespace": "default"}}
        info = PodRuntimeInfo(pod_ip="127.0.0.1", host_ip="127.0.0.1", node_name="localhost")
        downward = {
            str(e["name"]): field_ref(named, str(e["valueFrom"]["fieldRef"]["fieldPath"]), info)
            for e in containers[0].get("env") or []
            if "fieldRef" in (e.get("valueFrom") or {})
        }
        # first and outside the pod's own mounts: its emptyDir on /tmp hides our temp dir
        kube_target = PurePosixPath("/run/pairvol-localcluster/kube")
        pod_mounts = keep_code_visible(plan_mounts(containers[0], volumes), code_paths())
        mounts = [Mount(kube_dir, kube_target, read_only=True), *pod_mounts]
        outer, _ = launch_script(
            cgroup_procs=None, mounts=mounts, netns=None, workdir=None, argv=argv, security=security
        )
        # a user without a passwd entry gets HOME=/ from the runtime
        home = "/" if security.uid else "/root"
        return outer, {**downward, "KUBECONFIG": str(kube_target / "kubeconfig"), "HOME": home}

    async def start(self) -> None:
        argv = [sys.executable, "-m", "pairvol", "--verbose", "operator"]
        overrides = {"KUBECONFIG": str(self.kubeconfig)}
        if self.pod is not None:
            argv, overrides = await asyncio.to_thread(self._as_in_pod, argv)
        env = {
            **os.environ,
            **overrides,
            "PAIRVOL_OPERATOR_HEALTH_PORT": str(free_port()),
            "PAIRVOL_OPERATOR_METRICS_PORT": str(self.metrics_port),
            **self.env,
        }
        log = await asyncio.to_thread(open, self.log_path, "ab")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()

    async def stop(self, kill: bool = False) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            await bounded(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # our own session: only our processes
            await proc.wait()

    async def restart(self, kill: bool = True) -> None:
        await self.stop(kill=kill)
        await self.start()

    # the OperatorHandle the Stack needs
    @property
    def log_hint(self) -> str:
        return f"operator log: {self.log_path}"

    async def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def describe(self) -> str:
        return f"pid {self.proc.pid if self.proc else '-'} (log {self.log_path})"

    async def metrics(self) -> list[str]:
        import aiohttp

        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{self.metrics_port}/metrics") as r:
            return [await r.text()]


class OperatorHandle(Protocol):
    """What a :class:`Stack` needs of its operator, however it was started."""

    @property
    def log_hint(self) -> str: ...

    async def running(self) -> bool: ...

    async def describe(self) -> str: ...

    async def metrics(self) -> list[str]:
        """``/metrics`` of every live replica."""
        ...


Op = TypeVar("Op", bound=OperatorHandle)


# ------------------------------------------------------------------------ stack


@dataclass
class Stack(Generic[Op]):
    """API server + node simulator + operator: ``async with Stack.up(...) as s`` starts the
    operator as a process (the e2e tests' handle on it: kill, restart, its log), ``async
    with Stack.installed(...) as s`` installs it with ``helm install`` (the demo)."""

    cluster: Any
    sim: Any
    operator: Op
    kube: KubeClient
    root: Path
    namespace: str = "default"

    @staticmethod
    @contextlib.asynccontextmanager
    async def up(
        nodes: int = 3,
        *,
        root: Path | None = None,
        lease_duration: float = 2.0,
        operator_env: Mapping[str, str] | None = None,
        node_monitor_grace: float = 2.0,
        peering: str | None = None,
        node_names: Sequence[str] | None = None,
        operator_pod: Mapping[str, Any] | None = None,
        rbac: Sequence[Mapping[str, Any]] | None = None,
        token_lifetime_s: int | None = None,
    ) -> AsyncIterator[Stack[OperatorProcess]]:
        """``operator_pod``: run the operator with the privileges of this pod template (the
        chart's Deployment), else as the caller's user.

        ``rbac``: the chart's documents rendered for namespace ``default`` (``helm
        template``). Given, its ServiceAccounts and RBAC are applied, the operator runs with
        a token of its Deployment's ServiceAccount and agent pods with tokens of theirs, so
        both hold exactly the chart's permissions (the API server enforces RBAC); else
        both run with the admin kubeconfig.

        ``token_lifetime_s`` (with ``rbac``): ServiceAccount tokens expire after this many
        seconds (the API server's cap) and are replaced in their files at half that, the
        agents' by the node simulator, the operator's here — a process that read its token
        once is refused within the run."""
        from pairvol.localcluster.cluster import LocalCluster

        names = _node_names(nodes, node_names)
        async with _stack_dir(root) as base, contextlib.AsyncExitStack() as stack:
            stack.enter_context(_cluster_log(base / "cluster.log"))
            cluster = await stack.enter_async_context(LocalCluster(nodes=0))
            if token_lifetime_s is not None:
                cluster.api.max_token_expiration_s = token_lifetime_s
            if peering:
                cluster.apply(
                    {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": peering}}
                )
            sim = await stack.enter_async_context(
                _simulator(cluster.url, names, base, node_monitor_grace, service_account_tokens=rbac is not None)
            )
            env = {
                "PAIRVOL_LEASE_DURATION": f"{lease_duration:g}",
                "PAIRVOL_LEASE_MARGIN": "0.5",
                "PAIRVOL_RECONCILE_INTERVAL": "0.2",
                **({"PAIRVOL_PEERING": peering, "PAIRVOL_PEERING_LIFETIME": "4"} if peering else {}),
                **(operator_env or {}),
            }
            operator_kubeconfig = cluster.kubeconfig_path
            if rbac is not None:
                operator_kubeconfig, chart_env, renew = await _with_chart_rbac(cluster, rbac, base, token_lifetime_s)
                env = {**chart_env, **env}
                if token_lifetime_s is not None:
                    rotating = asyncio.create_task(_rotate_every(token_lifetime_s / 2, renew))
                    stack.push_async_callback(cancel_and_wait, rotating)
            op = OperatorProcess(operator_kubeconfig, base / "operator.log", env, operator_pod)
            stack.push_async_callback(op.stop)
            await op.start()
            kube = await stack.enter_async_context(KubeClient(await load_config(str(cluster.kubeconfig_path))))
            try:
                yield Stack(cluster, sim, op, kube, base)
            finally:
                # delete volumes first so agents stop cleanly while the operator still runs
                with contextlib.suppress(Exception):
                    await _delete_all_volumes(kube, op)

    @staticmethod
    @contextlib.asynccontextmanager
    async def installed(
        nodes: int = 3,
        *,
        values: Mapping[str, Any],
        node_names: Sequence[str] | None = None,
        root: Path | None = None,
    ) -> AsyncIterator[Stack[ChartOperator]]:
        """The local cluster with pairvol installed as a user installs it: the namespaces
        the chart serves (``values["watchNamespaces"]``) created, then ``helm install`` of
        charts/pairvol with ``values``; the operator is the chart's Deployment, its pods and
        the agents' run under the chart's ServiceAccounts and RBAC."""
        from pairvol.localcluster import chart
        from pairvol.localcluster.cluster import LocalCluster

        async with _stack_dir(root) as base, contextlib.AsyncExitStack() as stack:
            stack.enter_context(_cluster_log(base / "cluster.log"))
            cluster = await stack.enter_async_context(LocalCluster(nodes=0))
            sim = await stack.enter_async_context(
                _simulator(cluster.url, _node_names(nodes, node_names), base, 2.0, service_account_tokens=True)
            )
            namespaces = list(values.get("watchNamespaces") or ["default"])
            for ns in namespaces:
                if ns != "default":
                    cluster.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
            kube = await stack.enter_async_context(KubeClient(await load_config(str(cluster.kubeconfig_path))))
            try:
                await chart.install(cluster.kubeconfig_path, values)
            except chart.ChartInstallError as exc:
                raise DemoError(f"{exc} (node logs under {base / 'nodes'})") from exc
            op = chart.ChartOperator(kube, sim)
            try:
                yield Stack(cluster, sim, op, kube, base, namespace=namespaces[0])
            finally:
                with contextlib.suppress(Exception):
                    await _delete_all_volumes(kube, op)

    # ---------------------------------------------------------------- helpers

    async def apply(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        ns = (manifest.get("metadata") or {}).get("namespace") or self.namespace
        return await self.kube.create(volume_path(ns), manifest)

    async def volume(self, name: str) -> dict[str, Any]:
        return await self.kube.get(volume_path(self.namespace, name))

    async def status(self, name: str) -> dict[str, Any]:
        return dict((await self.volume(name)).get("status") or {})

    async def annotate(self, name: str, key: str, value: str | None) -> None:
        await self.kube.merge_patch(volume_path(self.namespace, name), {"metadata": {"annotations": {key: value}}})

    async def events(self, name: str) -> list[dict[str, Any]]:
        items = await self.kube.list(f"/api/v1/namespaces/{self.namespace}/events")
        return [e for e in items if (e.get("involvedObject") or {}).get("name") == name]

    async def pods(self, volume: str) -> list[dict[str, Any]]:
        return await self.kube.list(pods_path(self.namespace), f"pairvol.io/volume={volume}")

    async def wait_for(
        self,
        what: str,
        check: Callable[[], Awaitable[Any]],
        within: float,
        every: float = 0.1,
    ) -> Any:
        deadline = time.monotonic() + within
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = await check()
            except PairvolError as exc:
                last = exc
            else:
                if last:
                    return last
            await asyncio.sleep(every)
        raise DemoError(
            f"timed out after {within:.0f}s waiting for {what}; last: {last!r} ({self.operator.log_hint})"
        )

    async def wait_phase(self, name: str, phase: str, within: float = 120) -> dict[str, Any]:
        async def check() -> dict[str, Any] | str:
            st = await self.status(name)
            # a falsy string keeps polling; the last one ends up in the timeout message
            return st if st.get("phase") == phase else WaitingFor(f"{st.get('phase')}: {st.get('message')}")

        result: dict[str, Any] = await self.wait_for(f"{name} phase {phase}", check, within)
        return result

    def socket_path(self, status: Mapping[str, Any]) -> Path:
        """The primary's export socket as seen from this machine (hostPath of its node)."""
        ep = status.get("endpoint") or {}
        return Path(self.sim.host_path(str(ep["node"]), str(ep["socket"])))

    async def metrics(self) -> str:
        """The operator's ``/metrics`` (of every live replica, one after the other)."""
        return "\n".join(await self.operator.metrics())


@contextlib.asynccontextmanager
async def _stack_dir(root: Path | None) -> AsyncIterator[Path]:
    """Where a stack keeps logs, images and node directories: a new temporary directory
    unless ``root`` is given, removed after a run that went well, kept (and named on
    stderr) after one that failed, or always with PAIRVOL_KEEP_TMP=1, for a post-mortem."""
    own = root is None and not os.environ.get("PAIRVOL_KEEP_TMP")
    base = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix=f"pairvol-demo-{os.getpid()}-"))
    try:
        yield base
    except BaseException:
        print(f"pairvol: keeping logs of the failed run in {base}", file=sys.stderr)
        raise
    if own:
        await asyncio.to_thread(_rmtree, base)


def _simulator(api_url: str, names: Sequence[str], base: Path, node_monitor_grace: float, **kw: Any) -> Any:
    """The node simulator of a stack: quick status and retries, nodes under ``base``."""
    from pairvol.localcluster.kubelet import NodeSimulator

    return NodeSimulator(
        api_url,
        nodes=list(names),
        root=base / "nodes",
        # a heartbeat a fifth of the grace (a kubelet's is a fourth: 10 s of 40 s)
        status_interval=max(0.3, node_monitor_grace / 5),
        node_monitor_grace=node_monitor_grace,
        backoff_base=0.2,
        config_retry=0.3,
        **kw,
    )


def _node_names(nodes: int, wanted: Sequence[str] | None) -> list[str]:
    """``wanted`` first, then node-1, node-2, ... up to ``nodes`` names in all."""
    names = list(wanted or ())
    names += [n for n in (f"node-{i}" for i in range(1, nodes + 1 + len(names))) if n not in names]
    return names[: max(nodes, len(wanted or ()))]


RBAC_KINDS = ("ServiceAccount", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")


async def _with_chart_rbac(
    cluster: Any, chart: Sequence[Mapping[str, Any]], base: Path, token_lifetime_s: int | None = None
) -> tuple[Path, dict[str, str], Callable[[], Awaitable[None]]]:
    """Apply the chart's ServiceAccounts and RBAC (rendered for namespace ``default``).

    Returns the operator's kubeconfig (reading a token of the Deployment's ServiceAccount
    from the file ``token`` beside it), the chart's settings that depend on the RBAC (which
    ServiceAccount agent pods use and which namespaces the operator watches: its Roles are in
    those namespaces only), and what replaces the token file with a new token.
    """
    from pairvol.localcluster import kubeconfig as kubeconfig_mod

    deployments = [d for d in chart if d.get("kind") == "Deployment"]
    if len(deployments) != 1:
        raise DemoError("the rendered chart must hold exactly one Deployment (the operator)")
    spec = deployments[0]["spec"]["template"]["spec"]
    account = spec.get("serviceAccountName")
    if not account:
        raise DemoError("the chart's operator Deployment names no serviceAccountName")
    for obj in chart:
        if obj.get("kind") in RBAC_KINDS:
            cluster.apply(dict(obj))
    containers = [c for c in spec.get("containers") or [] if c.get("name") == "operator"]
    chart_env = {str(e["name"]): str(e["value"]) for c in containers for e in c.get("env") or [] if "value" in e}
    wanted = ("PAIRVOL_AGENT_SERVICE_ACCOUNT", "PAIRVOL_WATCH_NAMESPACES")
    lifetime = token_lifetime_s or 24 * 3600
    kube_dir = base / "operator-kube"
    token_path = kube_dir / "token"

    async def renew() -> None:
        token = cluster.api.issue_token("default", str(account), expiration_seconds=lifetime)
        await kubeconfig_mod.write_token(token_path, token, mode=0o444)

    await renew()
    path = await kubeconfig_mod.write(kube_dir / "kubeconfig", cluster.url, token_file="token")
    return path, {k: v for k, v in chart_env.items() if k in wanted}, renew


async def _rotate_every(period_s: float, renew: Callable[[], Awaitable[None]]) -> None:
    """Play the kubelet for the operator, which runs outside the node simulator."""
    while True:
        await asyncio.sleep(period_s)
        await renew()


class _ToParent(logging.Handler):
    """Passes on to the parent loggers' handlers what they would have shown anyway."""

    def __init__(self, parent: logging.Logger, level: int) -> None:
        super().__init__(level)
        self.parent = parent

    def emit(self, record: logging.LogRecord) -> None:
        self.parent.handle(record)


@contextlib.contextmanager
def _cluster_log(path: Path) -> Iterator[None]:
    """What the kubelets and controllers did (probes failed, containers stopped, pods
    restarted) at INFO, next to operator.log: a post-mortem needs both sides. The console
    keeps showing what it showed before."""
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    cluster_logger = logging.getLogger("pairvol.localcluster")
    before = (cluster_logger.level, cluster_logger.propagate)
    to_parent = _ToParent(logging.getLogger("pairvol"), cluster_logger.getEffectiveLevel())
    cluster_logger.setLevel(min(logging.INFO, cluster_logger.getEffectiveLevel()))
    cluster_logger.propagate = False
    cluster_logger.addHandler(to_file)
    cluster_logger.addHandler(to_parent)
    try:
        yield
    finally:
        cluster_logger.removeHandler(to_file)
        cluster_logger.removeHandler(to_parent)
        cluster_logger.setLevel(before[0])
        cluster_logger.propagate = before[1]
        to_file.close()


async def _delete_all_volumes(kube: KubeClient, op: OperatorHandle) -> None:
    """Volumes first, while the operator still runs, so agents stop cleanly."""
    if not await op.running():
        return
    items = await kube.list("/apis/pairvol.io/v1alpha1/replicatedvolumes")
    for rv in items:
        meta = rv["metadata"]
        await kube.delete(volume_path(meta["namespace"], meta["name"]))
    for _ in range(100):
        if not await kube.list("/apis/pairvol.io/v1alpha1/replicatedvolumes"):
            break
        await asyncio.sleep(0.2)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------- writer


def pattern(seq: int) -> int:
    """The byte written by write number ``seq`` (never 0, so unwritten blocks differ)."""
    return seq % 255 + 1


@dataclass
class WriteLog:
    acked: list[tuple[int, float]] = field(default_factory=list)  # (seq, time acknowledged)
    attempted: int = 0
    errors: int = 0
    first_ack_after: dict[float, float] = field(default_factory=dict)


class QemuIO:
    """An interactive ``qemu-io`` on an NBD export: one real NBD client connection.

    Output is framed by qemu-io's prompt, printed before it reads each command, so every
    command's answer is exactly the text between two prompts (no line-count guessing).
    """

    PROMPT = b"qemu-io> "

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.proc: asyncio.subprocess.Process | None = None

    async def open(self, limit_s: float = 10.0) -> bool:
        self.proc = await asyncio.create_subprocess_exec(
            "qemu-io",
            "-f",
            "raw",
            self.uri,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        return await self._answer(limit_s) is not None

    async def _answer(self, limit_s: float) -> str | None:
        proc = self.proc
        if proc is None or proc.stdout is None:
            return None
        try:
            data = await bounded(proc.stdout.readuntil(self.PROMPT), limit_s)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return None
        return data[: -len(self.PROMPT)].decode(errors="replace")

    async def command(self, cmd: str, ok: str, limit_s: float = 10.0) -> bool:
        """Send one command; True if its answer matches ``ok`` and reports no error."""
        proc = self.proc
        if proc is None or proc.stdin is None or proc.returncode is not None:
            return False
        try:
            proc.stdin.write((cmd + "\n").encode())
            await proc.stdin.drain()
        except (ConnectionError, BrokenPipeError):
            return False
        answer = await self._answer(limit_s)
        if answer is None:
            await self.close()  # a hung or dead client is not reused
            return False
        if re.search(r"error|failed|Could not|No such|refused|Broken", answer, re.I):
            return False
        return re.search(ok, answer, re.M) is not None

    async def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        signal_child(proc, signal.SIGKILL)  # not proc.kill(): it may reap an exited child (pairvol.aio)
        await proc.wait()


def nbd_uri(sock: Path) -> str:
    return f"nbd+unix:///volume?socket={sock}"


class Writer:
    """Sequential 4 KiB writes, write ``i`` to block ``i`` with byte ``pattern(i)``.

    A write counts as acknowledged only when qemu-io reports it complete. On error the
    writer reconnects to wherever ``locate()`` says the export is now; the first ack after
    an outage is recorded (that is the RTO end point).
    """

    def __init__(self, locate: Callable[[], Awaitable[Path | None]], blocks: int) -> None:
        self.locate, self.blocks = locate, blocks
        self.log = WriteLog()
        self.outage_start: float | None = None
        self.recovered_at: float | None = None
        self.resume_seq: int | None = None
        self._outage_seen = False
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> WriteLog:
        self._stop.set()
        if self._task is not None:
            await self._task
        return self.log

    async def _run(self) -> None:
        seq = 0
        io: QemuIO | None = None
        try:
            while not self._stop.is_set() and seq < self.blocks:
                if io is None:
                    sock = await self.locate()
                    if sock is None or not await asyncio.to_thread(sock.exists):
                        await asyncio.sleep(0.1)
                        continue
                    io = QemuIO(nbd_uri(sock))
                    if not await io.open():
                        await io.close()
                        io = None
                        self.log.errors += 1
                        self._outage_seen = self.outage_start is not None
                        await asyncio.sleep(0.1)
                        continue
                self.log.attempted = max(self.log.attempted, seq + 1)
                ok = await io.command(f"write -P {pattern(seq)} {seq * BLOCK} {BLOCK}", r"^wrote \d+/\d+ bytes")
                now = time.time()
                if ok:
                    self.log.acked.append((seq, now))
                    if self._outage_seen and self.recovered_at is None:
                        self.recovered_at, self.resume_seq = now, seq
                    seq += 1
                    await asyncio.sleep(0.01)
                else:
                    self.log.errors += 1
                    if self.outage_start is not None:
                        self._outage_seen = True
                    await io.close()
                    io = None
                    await asyncio.sleep(0.1)
        finally:
            if io is not None:
                await io.close()


@dataclass
class Verification:
    prefix: int  # blocks 0..prefix-1 hold their write (before the outage)
    acked_before: int  # writes acknowledged before the outage
    lost_acked: int  # of those, how many the volume does not hold
    after_ok: bool  # every write acknowledged after the outage is there
    consistent: bool  # no holes, no stray data: exactly one point in time + later writes
    detail: str


async def verify_log(sock: Path, log: WriteLog, resume_seq: int | None) -> Verification:
    """Read the volume back and check it against the write log.

    Before the outage (``seq < resume_seq``) crash consistency means the volume holds exactly
    a prefix of the log, and nothing after it; writes acknowledged after the outage (on the
    new primary) must all be there.
    """
    from pairvol.nbd import NBDClient, NBDError

    split = log.attempted if resume_seq is None else resume_seq
    top = max([log.attempted, split, *(seq + 1 for seq, _ in log.acked)])
    try:
        client = await NBDClient.connect_unix(str(sock))
    except (OSError, NBDError) as exc:
        raise DemoError(f"cannot open the volume at {sock} for verification: {exc}") from exc
    try:
        data = bytearray()
        for off in range(0, (top + 1) * BLOCK, 4 << 20):
            data += await client.pread(min(4 << 20, (top + 1) * BLOCK - off), off)
    finally:
        await client.close()

    def holds(seq: int, byte: int) -> bool:
        return data[seq * BLOCK : (seq + 1) * BLOCK] == bytes([byte]) * BLOCK

    prefix = 0
    while prefix < split and holds(prefix, pattern(prefix)):
        prefix += 1
    holes = [seq for seq in range(prefix, split) if not holds(seq, 0)]
    acked_after = [seq for seq, _ in log.acked if seq >= split]
    missing_after = [seq for seq in acked_after if not holds(seq, pattern(seq))]
    acked_before = sum(1 for seq, _ in log.acked if seq < split)
    lost = max(0, acked_before - prefix)
    detail = (
        f"holds writes 0..{prefix - 1} of {acked_before} acknowledged before the outage"
        f" and {len(acked_after) - len(missing_after)}/{len(acked_after)} acknowledged "
        "after it"
    )
    if holes:
        detail += f"; blocks past the rollback point not zero: {holes[:10]}"
    if missing_after:
        detail += f"; missing post-failover writes: {missing_after[:10]}"
    return Verification(prefix, acked_before, lost, not missing_after, not holes and not missing_after, detail)


# ------------------------------------------------------------------------- demo


async def _demo(args: argparse.Namespace) -> int:
    manifest_path = Path(args.example)
    manifest = await asyncio.to_thread(lambda: yaml.safe_load(manifest_path.read_text()))
    name = manifest["metadata"]["name"]
    mode = manifest["spec"].get("failover", {}).get("mode", "Checkpoint")
    interval = manifest["spec"].get("checkpoint", {}).get("intervalSeconds", 10)
    failures: list[str] = []
    say(f"starting the local cluster: API server, {args.nodes} simulated nodes, controllers")
    # the demo's nodes carry the names the manifest asks for (spec.nodes), then node-N
    wanted = list(manifest["spec"].get("nodes") or [])
    values = {
        "watchNamespaces": [args.namespace],
        # the active operator replica may die with the primary's node: the other one takes
        # over once its peering record is this old
        "operator": {"peering": {"lifetimeSeconds": args.peering_lifetime}},
    }
    say(
        f"installing pairvol: kubectl create namespace {args.namespace}; helm install pairvol charts/pairvol "
        f"-n pairvol --set watchNamespaces={{{args.namespace}}},operator.peering.lifetimeSeconds="
        f"{args.peering_lifetime} --wait"
    )
    async with Stack.installed(args.nodes, values=values, node_names=wanted) as s:
        say(f"nodes: {', '.join(s.sim.node_names)}")
        say(f"operator: {await s.operator.describe()}")
        await s.apply(manifest)
        say(f"applied {manifest_path.name}: ReplicatedVolume {name} size {manifest['spec']['size']}")
        st = await s.wait_phase(name, "Syncing", within=120)
        say(f"phase Syncing: primary {st['primary']['node']}, secondary {st['secondary']['node']}")
        st = await s.wait_phase(name, "Replicating", within=180)
        primary, secondary = st["primary"], st["secondary"]
        say(
            f"phase Replicating: primary {primary['pod']} on {primary['node']}, secondary "
            f"{secondary['pod']} on {secondary['node']}"
        )
        say(
            f"workload endpoint: socket {st['endpoint']['socket']} on {st['endpoint']['node']},"
            f" Service {st['endpoint']['service']}:{st['endpoint']['port']}"
        )

        async def locate() -> Path | None:
            cur = await s.status(name)
            if cur.get("phase") == "FailingOver" or not cur.get("endpoint"):
                return None
            return s.socket_path(cur)

        writer = Writer(locate, blocks=20000)
        writer.start()
        say(f"writer started against {s.socket_path(st)}")
        await asyncio.sleep(args.write_seconds)
        cp_before = (await s.status(name)).get("checkpoint") or {}
        say(
            f"{len(writer.log.acked)} writes acknowledged; last checkpoint "
            f"#{cp_before.get('id')} at {cp_before.get('time')}"
        )

        victim = primary["node"]
        say(f"killing node {victim} (the primary's node): all its processes SIGKILLed")
        dying = [p.name for p in await s.operator.pods() if p.node == victim]
        if dying:
            say(
                f"operator replica {', '.join(dying)} runs on {victim} too: if it was the active one, the "
                f"other replica takes over within {args.peering_lifetime} s"
            )
        t_kill = time.time()
        writer.outage_start = t_kill
        await s.sim.kill_node(victim)

        async def failed_over() -> dict[str, Any] | None:
            cur = await s.status(name)
            lf = cur.get("lastFailover") or {}
            if lf.get("durationMs") is not None and (cur.get("primary") or {}).get("node") != victim:
                return cur
            return None

        st = await s.wait_for("automatic failover", failed_over, within=60, every=0.05)
        lf = st["lastFailover"]
        say(f"failover: {lf['from']} -> {lf['to']} mode {lf['mode']} in {lf['durationMs']} ms (reason: {lf['reason']})")
        await s.wait_for("the writer to resume on the new primary", lambda: _truthy(writer.recovered_at), within=30)
        assert writer.recovered_at is not None
        rto = writer.recovered_at - t_kill
        say(f"writer resumed on the new primary {rto:.2f} s after the node was killed")
        await asyncio.sleep(2)
        log = await writer.stop()

        # with only two candidate nodes the new secondary can only go to the old node, so it
        # must come back first; otherwise re-protection uses a third node right away
        only_two = len(wanted) == 2
        if only_two:
            say(f"spec.nodes allows only {wanted}: powering {victim} on again for re-protection")
            await s.sim.restart_node(victim)
        st = await s.wait_phase(name, "Replicating", within=180)
        say(
            f"re-protected: primary {st['primary']['node']}, new secondary "
            f"{st['secondary']['pod']} on {st['secondary']['node']} — phase Replicating"
        )
        if st["secondary"]["node"] == victim and not only_two:
            failures.append("new secondary placed on the dead node")
        if not only_two:
            say(f"powering {victim} on again: the old primary must not serve")
            await s.sim.restart_node(victim)
        old_sock = Path(s.sim.host_path(victim, st["endpoint"]["socket"]))

        async def old_pod_gone() -> bool:
            return not any(p["metadata"]["name"] == primary["pod"] for p in await s.pods(name))

        await s.wait_for(f"the old primary pod {primary['pod']} to be gone", old_pod_gone, within=30)
        await asyncio.sleep(2)
        probe = QemuIO(nbd_uri(old_sock))
        served = await probe.open(limit_s=3) and await probe.command(
            f"write -P 1 {(BLOCK * 30000)} {BLOCK}", r"^wrote \d+/\d+ bytes", limit_s=3
        )
        await probe.close()
        if served:
            failures.append(f"the old primary on {victim} accepted a write after it came back")
        now = await s.status(name)
        say(
            f"{victim} is back: old primary pod {primary['pod']} deleted, nothing serves on "
            f"{victim} ({'FAIL: it served' if served else 'write refused'}); primary is still "
            f"{now['primary']['node']}"
        )

        v = await verify_log(s.socket_path(st), log, writer.resume_seq)
        say(f"verify: {v.detail}")
        if not v.consistent:
            failures.append(f"volume data wrong: {v.detail}")
        lost = v.lost_acked

        async def new_checkpoint() -> Any:
            cur = (await s.status(name)).get("checkpoint") or {}
            return cur if cur.get("time", "") > str(cp_before.get("time", "")) else None

        if interval:
            say(f"waiting for a checkpoint on the new secondary (every {interval}s)")
            cp = await s.wait_for("a checkpoint after re-protection", new_checkpoint, within=interval * 3 + 10)
            say(f"checkpoint #{cp.get('id')} cut on {st['secondary']['node']} in {cp.get('durationMs')} ms")
        else:
            cp = st.get("checkpoint") or {}
        cut = counter_total(await s.operator.metrics(), 'pairvol_operator_checkpoints_total{result="ok"}')
        events = await s.events(name)
        reasons = [e.get("reason") for e in events]
        say(f"events: {', '.join(str(r) for r in reasons)}")
        for needed in ("FailingOver", "FailedOver"):
            if needed not in reasons:
                failures.append(f"no {needed} event")
        if mode == "Latest" and lost:
            failures.append(f"{lost} acknowledged writes lost in Latest mode")
        rate = v.acked_before / max(1e-3, args.write_seconds)
        if mode == "Checkpoint" and lost > rate * (interval + 3):
            failures.append(f"{lost} writes lost: more than one checkpoint interval's worth")
        if rto > args.rto_limit:
            failures.append(f"RTO {rto:.2f}s above the limit {args.rto_limit}s")
        operator_now = await s.operator.describe()
        pvc = None
        if args.pvc:
            # the driver starts only now, after the node killed above is back: started
            # before, its node plugin (not a pod: it outlives node kill) once left agent pods
            # on the restarted node unreachable (docs/csi.md, "On the local cluster")
            pvc = await demo_pvc.run_story(s, values, failures, say)
        print()
        print("=" * 72)
        print(f"  volume              {name} ({mode} mode, checkpoint every {interval}s)")
        print(f"  failover            {lf['from']} -> {lf['to']}, operator-side {lf['durationMs']} ms")
        print(f"  RTO                 {rto:.2f} s from node kill to first write acknowledged")
        print(f"  writes acknowledged {v.acked_before} before the kill, {len(log.acked)} total")
        print(
            f"  lost acknowledged   {lost} (the volume holds writes up to #{v.prefix - 1}; "
            f"{'Latest restarts at the last ack' if mode == 'Latest' else 'restarts at the last checkpoint'})"
        )
        print(
            f"  checkpoints cut     {cut:.0f} counted by the live operator replicas "
            f"(#{cp_before.get('id')} on the first secondary, #{cp.get('id')} on the new one)"
        )
        print(f"  operator            {operator_now}")
        print(f"  data verified       {'yes' if v.consistent else 'NO'}: {v.detail}")
        for key, value in pvc.lines if pvc is not None else ():
            print(f"  {key:<19} {value}")
        print(f"  result              {'PASS' if not failures else 'FAIL: ' + '; '.join(failures)}")
        print("=" * 72)
    return 0 if not failures else 1


async def _truthy(value: Any) -> Any:
    return value


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "demo", help="the whole story on 3 simulated nodes (make demo)", description=__doc__
    )
    p.add_argument(
        "--example",
        default=str(REPO / "examples" / "basic.yaml"),
        help="ReplicatedVolume manifest to apply (default examples/basic.yaml)",
    )
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--write-seconds", type=float, default=8.0)
    p.add_argument("--namespace", default="apps", help="the namespace the volume lives in (default apps)")
    p.add_argument(
        "--peering-lifetime",
        type=int,
        default=5,
        help="operator.peering.lifetimeSeconds for the chart (default 5, the chart's own)",
    )
    p.add_argument(
        "--no-pvc",
        dest="pvc",
        action="store_false",
        help="leave out the second part: a pod writing to a PersistentVolumeClaim through the CSI driver",
    )
    p.add_argument(
        "--rto-limit", type=float, default=15.0, help="fail if the writer waits longer than this after the kill"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("pairvol demo needs root (network namespaces, mounts, cgroups)", file=sys.stderr)
        return 2
    if not getattr(args, "verbose", False):
        # the in-process API server and kubelets are chatty; the story is in the progress lines
        for noisy in ("aiohttp.access", "pairvol.localcluster", "kmock"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return asyncio.run(_demo(args))
    except DemoError as exc:
        print(f"demo FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
