"""Pure decisions of the node simulator: what a Pod spec means for the processes we run.

Why separate: the kubelet's rules (env resolution with the downward API and Secret keys,
``$(VAR)`` expansion, which files a Secret volume becomes, where mounts point, restart
policy and back-off, probe thresholds, the Pod status we report) are easy to get subtly
wrong and easy to test without any process, namespace or API server. Everything here is
a function of its arguments; the I/O lives in :mod:`pairvol.localcluster.kubelet`.
"""

from __future__ import annotations

import base64
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pairvol.errors import PairvolError
from pairvol.localcluster.images import container_command

JsonDict = dict[str, Any]


class KubeletError(PairvolError):
    """The node simulator cannot do what was asked."""


class PodConfigError(KubeletError):
    """A Pod cannot start as specified (missing Secret/key, unsupported field, bad path).

    Reported like the real kubelet does: container waiting with reason
    ``CreateContainerConfigError`` and this message; retried until it resolves.
    """


def meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    value = obj.get("metadata") or {}
    return value if isinstance(value, Mapping) else {}


def pod_key(pod: Mapping[str, Any]) -> tuple[str, str]:
    m = meta(pod)
    return (str(m.get("namespace") or "default"), str(m.get("name") or ""))


def pod_uid(pod: Mapping[str, Any]) -> str:
    """The Pod's UID, or a stable stand-in from namespace and name if the server set none."""
    m = meta(pod)
    uid = m.get("uid")
    if uid:
        return str(uid)
    namespace, name = pod_key(pod)
    return f"{namespace}_{name}"


def spec(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    value = pod.get("spec") or {}
    return value if isinstance(value, Mapping) else {}


# ---------------------------------------------------------------------------------------
# env
# ---------------------------------------------------------------------------------------

_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand_vars(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined names are replaced, ``$$`` escapes ``$``,
    undefined references stay as written."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _VAR_REF.sub(replace, text)


@dataclass(frozen=True)
class PodRuntimeInfo:
    """Facts the downward API can expose that are not in the Pod object yet."""

    pod_ip: str
    host_ip: str
    node_name: str


def field_ref(pod: Mapping[str, Any], path: str, info: PodRuntimeInfo) -> str:
    """Value of a downward-API ``fieldRef.fieldPath``."""
    m = meta(pod)
    simple: dict[str, Any] = {
        "metadata.name": m.get("name"),
        "metadata.namespace": m.get("namespace") or "default",
        "metadata.uid": pod_uid(pod),
        "spec.nodeName": spec(pod).get("nodeName") or info.node_name,
        "spec.serviceAccountName": spec(pod).get("serviceAccountName") or "default",
        "status.podIP": info.pod_ip,
        "status.podIPs": info.pod_ip,
        "status.hostIP": info.host_ip,
        "status.hostIPs": info.host_ip,
    }
    if path in simple:
        return "" if simple[path] is None else str(simple[path])
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        values = m.get(match.group(1)) or {}
        return str(values.get(match.group(2), ""))
    raise PodConfigError(
        f"unsupported fieldRef.fieldPath {path!r}; supported: {sorted(simple)} and "
        "metadata.labels['k'] / metadata.annotations['k']"
    )


def secret_value(secret: Mapping[str, Any], key: str) -> bytes | None:
    """A key of a Secret as bytes: ``data`` is base64, ``stringData`` (if a lenient server
    kept it) is plain text."""
    data = secret.get("data") or {}
    if key in data:
        return base64.b64decode(str(data[key]))
    string_data = secret.get("stringData") or {}
    if key in string_data:
        return str(string_data[key]).encode()
    return None


def configmap_value(configmap: Mapping[str, Any], key: str) -> bytes | None:
    data = configmap.get("data") or {}
    if key in data:
        return str(data[key]).encode()
    binary = configmap.get("binaryData") or {}
    if key in binary:
        return base64.b64decode(str(binary[key]))
    return None


ObjectRef = tuple[str, str]  # ("secrets"|"configmaps", name)


def referenced_objects(pod: Mapping[str, Any]) -> set[ObjectRef]:
    """Every Secret/ConfigMap the Pod needs (env, envFrom and volumes), to fetch first."""
    refs: set[ObjectRef] = set()
    for container in spec(pod).get("containers") or []:
        for env in container.get("env") or []:
            source = env.get("valueFrom") or {}
            if "secretKeyRef" in source:
                refs.add(("secrets", str(source["secretKeyRef"].get("name"))))
            if "configMapKeyRef" in source:
                refs.add(("configmaps", str(source["configMapKeyRef"].get("name"))))
        for env_from in container.get("envFrom") or []:
            if "secretRef" in env_from:
                refs.add(("secrets", str(env_from["secretRef"].get("name"))))
            if "configMapRef" in env_from:
                refs.add(("configmaps", str(env_from["configMapRef"].get("name"))))
    for volume in spec(pod).get("volumes") or []:
        if "secret" in volume:
            refs.add(("secrets", str(volume["secret"].get("secretName"))))
        if "configMap" in volume:
            refs.add(("configmaps", str(volume["configMap"].get("name"))))
    return refs


Objects = Mapping[ObjectRef, Mapping[str, Any] | None]  # None = does not exist


def _key_value(kind: str, ref: Mapping[str, Any], objects: Objects, what: str) -> str | None:
    name = str(ref.get("name"))
    key = str(ref.get("key"))
    optional = bool(ref.get("optional", False))
    obj = objects.get((kind, name))
    if obj is None:
        if optional:
            return None
        raise PodConfigError(f"{what}: {kind[:-1]} {name!r} not found")
    raw = secret_value(obj, key) if kind == "secrets" else configmap_value(obj, key)
    if raw is None:
        if optional:
            return None
        raise PodConfigError(f"{what}: key {key!r} not found in {kind[:-1]} {name!r}")
    return raw.decode(errors="replace")


def resolve_env(
    container: Mapping[str, Any],
    pod: Mapping[str, Any],
    info: PodRuntimeInfo,
    objects: Objects,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of one container: ``base``, then envFrom, then env (in order, with
    ``$(VAR)`` expansion against what is defined so far, like the kubelet)."""
    env: dict[str, str] = dict(base or {})
    for env_from in container.get("envFrom") or []:
        prefix = str(env_from.get("prefix") or "")
        for kind, ref_key in (("secrets", "secretRef"), ("configmaps", "configMapRef")):
            if ref_key not in env_from:
                continue
            ref = env_from[ref_key]
            obj = objects.get((kind, str(ref.get("name"))))
            if obj is None:
                if ref.get("optional"):
                    continue
                raise PodConfigError(f"envFrom: {kind[:-1]} {ref.get('name')!r} not found")
            keys = set((obj.get("data") or {}).keys()) | set(
                (obj.get("stringData") or obj.get("binaryData") or {}).keys()
            )
            for key in sorted(keys):
                raw = secret_value(obj, key) if kind == "secrets" else configmap_value(obj, key)
                if raw is not None:
                    env[prefix + key] = raw.decode(errors="replace")
    for item in container.get("env") or []:
        name = str(item.get("name"))
        if "value" in item:
            env[name] = expand_vars(str(item["value"]), env)
            continue
        source = item.get("valueFrom") or {}
        value: str | None
        if "fieldRef" in source:
            value = field_ref(pod, str(source["fieldRef"].get("fieldPath")), info)
        elif "secretKeyRef" in source:
            value = _key_value("secrets", source["secretKeyRef"], objects, f"env {name}")
        elif "configMapKeyRef" in source:
            value = _key_value("configmaps", source["configMapKeyRef"], objects, f"env {name}")
        elif "resourceFieldRef" in source:
            raise PodConfigError(f"env {name}: resourceFieldRef is not supported here")
        elif not source:
            value = ""
        else:
            raise PodConfigError(f"env {name}: unsupported valueFrom {sorted(source)}")
        if value is not None:
            env[name] = value
    return env


def container_argv(container: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """command + args, or the image's ENTRYPOINT and CMD where they are missing
    (:func:`pairvol.localcluster.images.container_command`), with ``$(VAR)`` expansion of
    the container's own command and args. Raises ``ImagePullError`` for a command that
    must come from an image the local cluster does not have."""
    argv = container_command(container)
    # the container's own parts come last: the image's ENTRYPOINT and CMD are not expanded
    image_part = len(argv) - len(container.get("command") or []) - len(container.get("args") or [])
    return argv[:image_part] + [expand_vars(part, env) for part in argv[image_part:]]


# ---------------------------------------------------------------------------------------
# volumes and mounts
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VolumeFiles:
    """A Secret/ConfigMap volume: files to write under ``directory``."""

    directory: Path
    files: Mapping[str, tuple[bytes, int]]  # relative path -> (content, mode)


@dataclass(frozen=True)
class VolumeDir:
    """A hostPath or emptyDir volume: a directory (or file) on the node's disk."""

    path: Path
    host_path_type: str = ""
    mode: int | None = None  # set on creation: an emptyDir is writable by every user (0777)


@dataclass(frozen=True)
class VolumeClaim:
    """A persistentVolumeClaim volume: mounted through its CSI driver before the pod starts
    (:mod:`pairvol.localcluster.kubelet_csi`), then bound into containers as a directory."""

    claim_name: str
    read_only: bool = False


@dataclass(frozen=True)
class VolumeDevice:
    """A Block-mode claim published on the node: the file its device is bound on, bound in
    turn at the container's ``devicePath`` (``volumeDevices``)."""

    path: Path


Volume = VolumeFiles | VolumeDir | VolumeClaim | VolumeDevice


def _safe_relative(path: str, what: str) -> PurePosixPath:
    rel = PurePosixPath(path)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise PodConfigError(f"{what}: path {path!r} must be relative and stay inside")
    return rel


def host_path_on_node(node_root: Path, host_path: str) -> Path:
    """Where a hostPath lives for this simulated node: ``<node_root>/hostpath/<path>``."""
    pure = PurePosixPath(host_path)
    if not pure.is_absolute() or ".." in pure.parts:
        raise PodConfigError(f"hostPath {host_path!r} must be an absolute path without '..'")
    return node_root.joinpath("hostpath", *pure.parts[1:])


def plan_volumes(pod: Mapping[str, Any], node_root: Path, pod_dir: Path, objects: Objects) -> dict[str, Volume]:
    """What every volume of the Pod is on this node."""
    result: dict[str, Volume] = {}
    for volume in spec(pod).get("volumes") or []:
        name = str(volume.get("name"))
        directory = pod_dir / "volumes" / name
        if "hostPath" in volume:
            source = volume["hostPath"]
            result[name] = VolumeDir(
                host_path_on_node(node_root, str(source.get("path"))),
                str(source.get("type") or ""),
            )
        elif "emptyDir" in volume:
            result[name] = VolumeDir(directory, mode=0o777)
        elif "persistentVolumeClaim" in volume:
            source = volume["persistentVolumeClaim"] or {}
            claim = str(source.get("claimName") or "")
            if not claim:
                raise PodConfigError(f"volume {name!r}: persistentVolumeClaim.claimName is required")
            result[name] = VolumeClaim(claim, bool(source.get("readOnly", False)))
        elif "secret" in volume or "configMap" in volume:
            kind = "secrets" if "secret" in volume else "configmaps"
            source = volume["secret" if kind == "secrets" else "configMap"]
            obj_name = str(source.get("secretName" if kind == "secrets" else "name"))
            default_mode = int(source.get("defaultMode", 0o644))
            obj = objects.get((kind, obj_name))
            files: dict[str, tuple[bytes, int]] = {}
            if obj is None:
                if not source.get("optional"):
                    raise PodConfigError(f"volume {name!r}: {kind[:-1]} {obj_name!r} not found")
            else:
                value = secret_value if kind == "secrets" else configmap_value
                items = source.get("items")
                if items:
                    for item in items:
                        raw = value(obj, str(item.get("key")))
                        if raw is None:
                            if source.get("optional"):
                                continue
                            raise PodConfigError(
                                f"volume {name!r}: key {item.get('key')!r} not in {kind[:-1]} {obj_name!r}"
                            )
                        rel = _safe_relative(str(item.get("path")), f"volume {name!r}")
                        files[str(rel)] = (raw, int(item.get("mode", default_mode)))
                else:
                    keys = set((obj.get("data") or {}).keys())
                    keys |= set((obj.get("stringData") or {}).keys())
                    keys |= set((obj.get("binaryData") or {}).keys())
                    for key in sorted(keys):
                        raw = value(obj, key)
                        if raw is not None:
                            rel = _safe_relative(key, f"volume {name!r}")
                            files[str(rel)] = (raw, default_mode)
            result[name] = VolumeFiles(directory, files)
        else:
            kinds = sorted(k for k in volume if k != "name")
            raise PodConfigError(
                f"volume {name!r}: type {kinds} is not supported by the local cluster "
                "(supported: hostPath, emptyDir, secret, configMap, persistentVolumeClaim)"
            )
    return result


@dataclass(frozen=True)
class Mount:
    """Bind ``source`` (on the node's disk) at ``target`` (the container's mountPath)."""

    source: Path
    target: PurePosixPath
    read_only: bool


#: Where code a pod's volume would cover is staged before it is bound back (see below).
CODE_STAGING = PurePosixPath("/run/pairvol-localcluster")


def keep_code_visible(mounts: Sequence[Mount], code: Sequence[Path]) -> list[Mount]:
    """``mounts`` with this installation's code (virtualenv, package, PYTHONPATH) kept
    visible where a volume covers it: a checkout under ``/tmp`` disappears below a pod's
    emptyDir on ``/tmp``. In a real image the code is outside every volume; here it is
    where the developer put it, so it is staged outside first (before the volumes are
    bound) and bound back, read-only, on top of the volume that covers it."""
    covered = [path for path in code if any(PurePosixPath(path).is_relative_to(m.target) for m in mounts)]
    staged = [Mount(path, CODE_STAGING / f"code-{i}", read_only=True) for i, path in enumerate(covered)]
    restored = [Mount(Path(m.target), PurePosixPath(m.source), read_only=True) for m in staged]
    return [*staged, *mounts, *restored]


def plan_mounts(container: Mapping[str, Any], volumes: Mapping[str, Volume]) -> list[Mount]:
    mounts: list[Mount] = []
    for vm in container.get("volumeMounts") or []:
        name = str(vm.get("name"))
        if name not in volumes:
            raise PodConfigError(f"volumeMount {name!r}: no volume with that name in the pod")
        volume = volumes[name]
        if isinstance(volume, VolumeClaim):
            raise PodConfigError(f"volumeMount {name!r}: claim {volume.claim_name!r} is not mounted on the node yet")
        if isinstance(volume, VolumeDevice):
            raise PodConfigError(
                f"volumeMount {name!r}: the claim has volumeMode Block; give it to the container in volumeDevices"
            )
        source = volume.directory if isinstance(volume, VolumeFiles) else volume.path
        sub_path = vm.get("subPath")
        if sub_path:
            source = source.joinpath(*_safe_relative(str(sub_path), f"subPath of {name!r}").parts)
        target = PurePosixPath(str(vm.get("mountPath")))
        if not target.is_absolute() or ".." in target.parts or target == PurePosixPath("/"):
            raise PodConfigError(f"volumeMount {name!r}: mountPath {target} must be absolute")
        read_only = bool(vm.get("readOnly", False)) or isinstance(volume, VolumeFiles)
        mounts.append(Mount(source, target, read_only))
    return mounts


def plan_devices(container: Mapping[str, Any], volumes: Mapping[str, Volume]) -> list[Mount]:
    """The container's ``volumeDevices``: each Block-mode claim's device bound at its
    ``devicePath``. The machine's ``/dev`` is the pods' ``/dev`` here (a bind target would be
    created in it), so a devicePath must be outside ``/dev``."""
    mounts: list[Mount] = []
    for vd in container.get("volumeDevices") or []:
        name = str(vd.get("name"))
        volume = volumes.get(name)
        if volume is None:
            raise PodConfigError(f"volumeDevice {name!r}: no volume with that name in the pod")
        if not isinstance(volume, VolumeDevice):
            raise PodConfigError(f"volumeDevice {name!r}: only a claim with volumeMode Block can be a device")
        target = PurePosixPath(str(vd.get("devicePath")))
        if not target.is_absolute() or ".." in target.parts or len(target.parts) < 2:
            raise PodConfigError(f"volumeDevice {name!r}: devicePath {target} must be an absolute file path")
        if target.parts[1] == "dev":
            raise PodConfigError(
                f"volumeDevice {name!r}: devicePath {target}: pods of the local cluster share the machine's /dev; "
                "choose a path outside /dev (e.g. /var/run/disk)"
            )
        mounts.append(Mount(volume.path, target, read_only=False))
    return mounts


def launch_script(
    *,
    cgroup_procs: str | None,
    mounts: Sequence[Mount],
    netns: str | None,
    workdir: str | None,
    argv: Sequence[str],
    file_targets: frozenset[PurePosixPath] = frozenset(),
    hostname: str | None = None,
    security: SecurityPlan | None = None,
) -> tuple[list[str], str]:
    """The argv that starts a container: join its cgroup, enter a mount namespace of its own
    in which the machine's mounts are slaves (and, with ``hostname``, a UTS namespace), bind
    the mounts, make the root file system read-only if
    asked, enter the node's network namespace (``netns``; None: stay in ours), then take
    the container's user and capabilities (``security``) and exec the command.

    Privileges go last: joining the namespaces needs CAP_SYS_ADMIN, which the container
    usually does not get. Returns (outer argv, inner script) — the inner script is what
    runs after ``unshare``. The whole chain ``exec``s, so the PID we spawn *is* the
    container's main process.
    """
    q = shlex.quote
    inner = ["set -e"]
    if hostname:
        inner.append(f"hostname {q(hostname[:63])}")
    for mount in mounts:
        target = q(str(mount.target))
        if mount.target in file_targets:
            inner.append(f"mkdir -p {q(str(mount.target.parent))}; [ -e {target} ] || : > {target}")
        else:
            inner.append(f"mkdir -p {target}")
        inner.append(f"mount --bind {q(str(mount.source))} {target}")
        if mount.read_only:
            inner.append(f"mount -o remount,bind,ro {target}")
    if security is not None and security.read_only_root:
        # only the root mount: the volumes above and /dev, /proc, /sys stay as they are
        inner.append("mount -o remount,bind,ro /")
    if workdir:
        inner.append(f"cd {q(workdir)}")
    command = [*(security.setpriv_argv() if security is not None else []), *argv]
    if netns is not None:
        command = ["ip", "netns", "exec", netns, *command]
    inner.append("exec " + " ".join(q(a) for a in command))
    inner_script = "\n".join(inner)
    outer = []
    if cgroup_procs:
        outer.append(f"echo $$ > {q(cgroup_procs)}")
    uts = "--uts " if hostname else ""
    # slave, not private: the machine's mounts as they were are copied into the container's
    # namespace, and an unmount on the machine reaches the copy. A private copy would keep
    # every file system mounted at that moment (a CSI volume of another pod) alive for the
    # container's whole life, after its node plugin unmounted it; a container runtime's
    # pivot_root into the image leaves no such copy. Mounts made inside stay inside.
    outer.append(f"exec unshare --mount {uts}--propagation slave -- /bin/sh -c " + q(inner_script))
    return ["/bin/sh", "-c", "\n".join(outer)], inner_script


# ---------------------------------------------------------------------------------------
# securityContext
# ---------------------------------------------------------------------------------------

#: Linux capability numbers (include/uapi/linux/capability.h), by Kubernetes name.
CAPABILITY_NUMBERS: Mapping[str, int] = {
    name: number
    for number, name in enumerate(
        [
            "CHOWN",
            "DAC_OVERRIDE",
            "DAC_READ_SEARCH",
            "FOWNER",
            "FSETID",
            "KILL",
            "SETGID",
            "SETUID",
            "SETPCAP",
            "LINUX_IMMUTABLE",
            "NET_BIND_SERVICE",
            "NET_BROADCAST",
            "NET_ADMIN",
            "NET_RAW",
            "IPC_LOCK",
            "IPC_OWNER",
            "SYS_MODULE",
            "SYS_RAWIO",
            "SYS_CHROOT",
            "SYS_PTRACE",
            "SYS_PACCT",
            "SYS_ADMIN",
            "SYS_BOOT",
            "SYS_NICE",
            "SYS_RESOURCE",
            "SYS_TIME",
            "SYS_TTY_CONFIG",
            "MKNOD",
            "LEASE",
            "AUDIT_WRITE",
            "AUDIT_CONTROL",
            "SETFCAP",
            "MAC_OVERRIDE",
            "MAC_ADMIN",
            "SYSLOG",
            "WAKE_ALARM",
            "BLOCK_SUSPEND",
            "AUDIT_READ",
            "PERFMON",
            "BPF",
            "CHECKPOINT_RESTORE",
        ]
    )
}

#: What containerd and Docker give a container that asks for nothing (their default spec).
RUNTIME_DEFAULT_CAPABILITIES = frozenset(
    [
        "CHOWN",
        "DAC_OVERRIDE",
        "FSETID",
        "FOWNER",
        "MKNOD",
        "NET_RAW",
        "SETGID",
        "SETUID",
        "SETFCAP",
        "SETPCAP",
        "NET_BIND_SERVICE",
        "SYS_CHROOT",
        "KILL",
        "AUDIT_WRITE",
    ]
)


def capability_mask(names: frozenset[str]) -> int:
    mask = 0
    for name in names:
        mask |= 1 << CAPABILITY_NUMBERS[name]
    return mask


def capability_names(mask: int) -> frozenset[str]:
    return frozenset(name for name, bit in CAPABILITY_NUMBERS.items() if mask >> bit & 1)


@dataclass(frozen=True)
class SecurityPlan:
    """How a container's processes run, from the pod's and the container's securityContext.

    ``capabilities`` is the bounding set; a process running as uid 0 also has it permitted
    and effective after ``exec`` (the kernel's rules for root), any other uid has none of
    them. Inheritable and ambient sets are empty (containerd >= 1.6.2, runc >= 1.1.1).
    ``seccomp`` is recorded, not applied: the simulator has no seccomp profile to load.
    """

    uid: int = 0
    gid: int = 0
    groups: tuple[int, ...] = ()
    capabilities: frozenset[str] = RUNTIME_DEFAULT_CAPABILITIES
    no_new_privs: bool = False
    read_only_root: bool = False
    seccomp: str = "Unconfined"

    def expected_status(self) -> dict[str, int]:
        """The capability lines of ``/proc/<pid>/status`` of a process running this way."""
        bounding = capability_mask(self.capabilities)
        held = bounding if self.uid == 0 else 0
        return {"CapInh": 0, "CapPrm": held, "CapEff": held, "CapBnd": bounding, "CapAmb": 0}

    def setpriv_argv(self) -> list[str]:
        """``setpriv`` (util-linux) options that make the exec'd program run this way."""
        bounding = ",".join(["-all", *(f"+{c.lower()}" for c in sorted(self.capabilities))])
        argv = [
            "setpriv",
            f"--bounding-set={bounding}",
            "--inh-caps=-all",
            "--ambient-caps=-all",
            f"--regid={self.gid}",
            f"--reuid={self.uid}",
        ]
        argv.append(f"--groups={','.join(map(str, self.groups))}" if self.groups else "--clear-groups")
        if self.no_new_privs:
            argv.append("--no-new-privs")
        return [*argv, "--"]


def _capability_list(values: Any, where: str) -> list[str]:
    if values is None:
        return []
    if not isinstance(values, list):
        raise PodConfigError(f"{where} must be a list of capability names, got {values!r}")
    names = []
    for value in values:
        name = str(value).upper().removeprefix("CAP_")
        if name != "ALL" and name not in CAPABILITY_NUMBERS:
            raise PodConfigError(f"{where}: unknown capability {value!r}")
        names.append(name)
    return names


def _int_field(context: Mapping[str, Any], name: str, where: str) -> int | None:
    value = context.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PodConfigError(f"{where}.{name} must be a non-negative integer, got {value!r}")
    return int(value)


def security_plan(
    pod: Mapping[str, Any], container: Mapping[str, Any], available: frozenset[str] | None = None
) -> SecurityPlan:
    """Apply the securityContext rules of the kubelet and containerd.

    The container's fields override the pod's. Capabilities start from the runtime's
    default set; ``add: [ALL]`` makes it every capability and ``drop: [ALL]`` empties it,
    then the named ones are added and dropped; ``privileged`` gives every capability.
    ``available``: what this node can grant at all (our own bounding set); asking for more
    is an error rather than a silently smaller set. The image's user is root here.
    """
    pod_context = spec(pod).get("securityContext") or {}
    context = container.get("securityContext") or {}
    name = container.get("name")
    where = f"container {name!r} securityContext"
    if not isinstance(pod_context, Mapping) or not isinstance(context, Mapping):
        raise PodConfigError(f"{where}: securityContext must be an object")

    def pick(key: str) -> Any:
        return context[key] if context.get(key) is not None else pod_context.get(key)

    uid = _int_field(context, "runAsUser", where)
    uid = _int_field(pod_context, "runAsUser", "pod securityContext") if uid is None else uid
    gid = _int_field(context, "runAsGroup", where)
    gid = _int_field(pod_context, "runAsGroup", "pod securityContext") if gid is None else gid
    uid = 0 if uid is None else uid
    if pick("runAsNonRoot") and uid == 0:
        raise PodConfigError(f"container {name!r} has runAsNonRoot and image will run as root")
    groups = [int(g) for g in pod_context.get("supplementalGroups") or []]
    fs_group = _int_field(pod_context, "fsGroup", "pod securityContext")
    if fs_group is not None:
        groups.append(fs_group)
    privileged = bool(context.get("privileged", False))
    escalation = context.get("allowPrivilegeEscalation")
    caps_field = context.get("capabilities") or {}
    if not isinstance(caps_field, Mapping):
        raise PodConfigError(f"{where}.capabilities must be an object with add/drop lists")
    add = _capability_list(caps_field.get("add"), f"{where}.capabilities.add")
    drop = _capability_list(caps_field.get("drop"), f"{where}.capabilities.drop")
    everything = frozenset(CAPABILITY_NUMBERS)
    caps: set[str]
    if privileged:
        if escalation is False:
            raise PodConfigError(f"{where}: cannot set allowPrivilegeEscalation to false and privileged to true")
        caps = set(everything if available is None else available)
    else:
        caps = set(RUNTIME_DEFAULT_CAPABILITIES)
        if "ALL" in add:
            caps = set(everything)
        if "ALL" in drop:
            caps = set()
        caps |= {c for c in add if c != "ALL"}
        caps -= set(drop)
        if escalation is False and "SYS_ADMIN" in caps:
            raise PodConfigError(
                f"{where}: cannot set allowPrivilegeEscalation to false and capabilities.add CAP_SYS_ADMIN"
            )
        missing = sorted(caps - available) if available is not None else []
        if missing:
            raise PodConfigError(f"{where}: capabilities {missing} asked for, but this node cannot grant them")
    seccomp = pick("seccompProfile") or {}
    return SecurityPlan(
        uid=uid,
        gid=0 if gid is None else gid,
        groups=tuple(dict.fromkeys(groups)),
        capabilities=frozenset(caps),
        # Kubernetes sets no_new_privs unless escalation is allowed (the default) or privileged
        no_new_privs=escalation is False,
        read_only_root=bool(context.get("readOnlyRootFilesystem", False)),
        seccomp=str(seccomp.get("type", "Unconfined")) if isinstance(seccomp, Mapping) else "Unconfined",
    )


# ---------------------------------------------------------------------------------------
# restarts and probes
# ---------------------------------------------------------------------------------------


def should_restart(policy: str, exit_code: int) -> bool:
    """restartPolicy semantics for a container that exited with ``exit_code``."""
    if policy == "Never":
        return False
    if policy == "OnFailure":
        return exit_code != 0
    return True  # Always (the default)


def backoff_delay(restart_count: int, base: float, cap: float) -> float:
    """Kubelet crash-loop back-off: base, 2*base, 4*base, ... at most ``cap``."""
    if restart_count <= 0:
        return 0.0
    return float(min(cap, base * (2 ** (restart_count - 1))))


#: What the kubelet keeps of a termination message, and of the log it falls back to.
MAX_TERMINATION_MESSAGE = 4096
MAX_FALLBACK_LOG_LINES = 80
MAX_FALLBACK_LOG_BYTES = 2048
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"


def termination_message(policy: str, file_text: str, log_tail: bytes, failed: bool) -> str:
    """A terminated container's ``message``, by its ``terminationMessagePolicy``: what it
    wrote to its terminationMessagePath; with ``FallbackToLogsOnError``, if it wrote nothing
    and failed, the last lines of its log (at most 80 lines and 2 KiB, as the kubelet)."""
    if file_text:
        return file_text[:MAX_TERMINATION_MESSAGE]
    if policy != "FallbackToLogsOnError" or not failed:
        return ""
    lines = log_tail.decode(errors="replace").splitlines()[-MAX_FALLBACK_LOG_LINES:]
    text = "\n".join(lines)
    return text[-MAX_FALLBACK_LOG_BYTES:]


@dataclass(frozen=True)
class ProbeSpec:
    kind: str  # "http" | "tcp" | "exec"
    port: int = 0
    path: str = "/"
    host: str | None = None
    scheme: str = "HTTP"
    headers: tuple[tuple[str, str], ...] = ()
    command: tuple[str, ...] = ()
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3


def _resolve_port(port: Any, container: Mapping[str, Any]) -> int:
    if isinstance(port, int):
        return port
    if isinstance(port, str) and port.isdigit():
        return int(port)
    for declared in container.get("ports") or []:
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise PodConfigError(f"probe port {port!r} is neither a number nor a named container port")


def parse_probe(probe: Mapping[str, Any] | None, container: Mapping[str, Any]) -> ProbeSpec | None:
    if not probe:
        return None
    timing = {
        "initial_delay": float(probe.get("initialDelaySeconds", 0)),
        "period": float(probe.get("periodSeconds", 10)),
        "timeout": float(probe.get("timeoutSeconds", 1)),
        "success_threshold": int(probe.get("successThreshold", 1)),
        "failure_threshold": int(probe.get("failureThreshold", 3)),
    }
    if "httpGet" in probe:
        http = probe["httpGet"]
        headers = tuple((str(h.get("name")), str(h.get("value"))) for h in http.get("httpHeaders") or [])
        scheme = str(http.get("scheme", "HTTP")).upper()
        if scheme not in ("HTTP", "HTTPS"):
            raise PodConfigError(f"httpGet scheme {scheme!r} must be HTTP or HTTPS")
        return ProbeSpec(
            kind="http",
            port=_resolve_port(http.get("port"), container),
            path=str(http.get("path") or "/"),
            host=http.get("host"),
            scheme=scheme,
            headers=headers,
            **timing,  # type: ignore[arg-type]
        )
    if "tcpSocket" in probe:
        tcp = probe["tcpSocket"]
        return ProbeSpec(
            kind="tcp",
            port=_resolve_port(tcp.get("port"), container),
            host=tcp.get("host"),
            **timing,  # type: ignore[arg-type]
        )
    if "exec" in probe:
        command = tuple(str(c) for c in probe["exec"].get("command") or [])
        if not command:
            raise PodConfigError("exec probe needs a command")
        return ProbeSpec(kind="exec", command=command, **timing)  # type: ignore[arg-type]
    raise PodConfigError(f"unsupported probe {sorted(probe)}; use httpGet, tcpSocket or exec")


@dataclass
class ProbeTracker:
    """Consecutive-success/failure bookkeeping of one probe (kubelet semantics)."""

    spec: ProbeSpec
    healthy: bool
    successes: int = 0
    failures: int = 0

    def record(self, ok: bool) -> bool:
        """Feed one probe result; return the (possibly changed) health."""
        if ok:
            self.successes += 1
            self.failures = 0
            if not self.healthy and self.successes >= self.spec.success_threshold:
                self.healthy = True
        else:
            self.failures += 1
            self.successes = 0
            if self.healthy and self.failures >= self.spec.failure_threshold:
                self.healthy = False
        return self.healthy


# ---------------------------------------------------------------------------------------
# status
# ---------------------------------------------------------------------------------------


@dataclass
class ContainerState:
    """What we know about one container, rendered into ``status.containerStatuses``."""

    name: str
    image: str = ""
    restart_count: int = 0
    state: JsonDict = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: JsonDict = field(default_factory=dict)
    ready: bool = False
    started: bool = False
    pid: int | None = None

    def render(self) -> JsonDict:
        status: JsonDict = {
            "name": self.name,
            "image": self.image,
            "imageID": "",
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.pid is not None:
            status["containerID"] = f"pairvol-local://{self.pid}"
        return status


def pod_phase(containers: Sequence[ContainerState], policy: str) -> str:
    """Pod phase from the containers' states and the restart policy."""
    if not containers:
        return "Pending"
    if any("running" in c.state for c in containers):
        return "Running"
    terminated = [c for c in containers if "terminated" in c.state]
    if len(terminated) == len(containers):
        codes = [int(c.state["terminated"].get("exitCode", 0)) for c in terminated]
        if all(code == 0 for code in codes):
            return "Succeeded"
        return "Failed"
    if any(c.restart_count > 0 or c.last_state for c in containers):
        return "Running"  # crash-looping containers keep the pod Running
    return "Pending"


def render_pod_status(
    *,
    containers: Sequence[ContainerState],
    policy: str,
    info: PodRuntimeInfo,
    start_time: str,
    now: str,
    previous_conditions: Sequence[Mapping[str, Any]] = (),
    node_ready: bool = True,
    message: str = "",
    reason: str = "",
    init_containers: Sequence[ContainerState] = (),
) -> JsonDict:
    """The full ``status`` of a Pod as the kubelet reports it."""
    initialized = all(
        int(c.state.get("terminated", {}).get("exitCode", 1)) == 0 and "terminated" in c.state for c in init_containers
    )
    init_failed = policy == "Never" and any(
        int(c.state.get("terminated", {}).get("exitCode", 0)) != 0 for c in init_containers
    )
    phase = "Failed" if init_failed else pod_phase(containers, policy) if initialized else "Pending"
    all_ready = bool(containers) and all(c.ready for c in containers) and node_ready
    running = phase == "Running"
    wanted = {
        "PodScheduled": True,
        "Initialized": initialized,
        "ContainersReady": all_ready and running,
        "Ready": all_ready and running,
    }
    previous = {str(c.get("type")): c for c in previous_conditions}
    conditions = []
    for ctype, ok in wanted.items():
        value = "True" if ok else "False"
        old = previous.get(ctype)
        since = old.get("lastTransitionTime") if old and old.get("status") == value else now
        cond: JsonDict = {"type": ctype, "status": value, "lastTransitionTime": since or now}
        if not ok and ctype in ("Ready", "ContainersReady"):
            cond["reason"] = "ContainersNotReady" if node_ready else "NodeNotReady"
        conditions.append(cond)
    status: JsonDict = {
        "phase": phase,
        "conditions": conditions,
        "hostIP": info.host_ip,
        "hostIPs": [{"ip": info.host_ip}],
        "startTime": start_time,
        "containerStatuses": [c.render() for c in containers],
        "qosClass": "BestEffort",
    }
    if info.pod_ip:  # none before the pod's network exists
        status["podIP"] = info.pod_ip
        status["podIPs"] = [{"ip": info.pod_ip}]
    if init_containers:
        status["initContainerStatuses"] = [c.render() for c in init_containers]
    if message:
        status["message"] = message
    if reason:
        status["reason"] = reason
    return status


_PRESSURE_OK = {
    "MemoryPressure": "KubeletHasSufficientMemory",
    "DiskPressure": "KubeletHasNoDiskPressure",
    "PIDPressure": "KubeletHasSufficientPID",
}


def node_conditions(ready: str, since: str, heartbeat: str, reason: str, message: str) -> list[JsonDict]:
    """Node conditions: Ready as given; pressure conditions False while Ready, else Unknown."""
    conditions: list[JsonDict] = []
    for ctype, ok_reason in _PRESSURE_OK.items():
        healthy = ready == "True"
        conditions.append(
            {
                "type": ctype,
                "status": "False" if healthy else "Unknown",
                "lastHeartbeatTime": heartbeat,
                "lastTransitionTime": since,
                "reason": ok_reason if healthy else "NodeStatusUnknown",
                "message": "" if healthy else message,
            }
        )
    conditions.append(
        {
            "type": "Ready",
            "status": ready,
            "lastHeartbeatTime": heartbeat,
            "lastTransitionTime": since,
            "reason": reason,
            "message": message,
        }
    )
    return conditions
