"""Where pairvol's Kubernetes credentials come from, loaded by the official ``kubernetes`` client.

Why the library and not our own reader: a kubeconfig is more than a server and a token —
``exec`` credential plugins (EKS, GKE, AKS, OIDC helpers), auth providers, several files
merged as kubectl merges ``$KUBECONFIG``, paths relative to the file that names them,
proxies from the environment. ``kubernetes.config`` implements all of that; this module
only picks the source and adds what the library lacks for a long-running process:

* **Token files are re-read when they change.** The kubelet rotates a projected
  ServiceAccount token (it expires: one hour where the API server does not extend it) by
  swapping the file; the library reads a kubeconfig's ``tokenFile`` once and the in-cluster
  token once a minute. Here every request looks at the file (one ``stat``) and re-reads it
  when it was replaced, so a renewal right after a rotation already carries the new token
  — the agent's Lease renewal fences the primary and must not fail for a stale token.
* **After a 401** (:meth:`KubeConfig.refresh`) the credentials are read afresh — the token
  file, or the whole source (an ``exec`` plugin runs again) — and the caller learns whether
  anything changed, so it retries at most once instead of hammering the API server.
* **No key material on disk.** The library writes ``certificate-authority-data``,
  ``client-certificate-data`` and ``client-key-data`` to temporary files and removes them
  only at a clean interpreter exit (never after SIGKILL). Here it writes them into a private
  directory that is emptied at once: the bytes move into anonymous in-memory files
  (``memfd_create``), opened by the TLS code as ``/proc/self/fd/N``, which vanish with the
  process however it ends.

Not covered: an ``exec`` plugin that returns a client *certificate* (not a token) is used
with the certificate of the first run for the life of the client (TLS connections are made
from it); tokens, the common case, follow every refresh.

Order of sources, first match wins: the explicit path, ``$KUBECONFIG`` (a list, merged),
the in-cluster ServiceAccount (``KUBERNETES_SERVICE_HOST`` and its token file),
``~/.kube/config``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client as kclient
from kubernetes import config as kconfig
from kubernetes.config import incluster_config, kube_config

from pairvol.errors import PairvolError

log = logging.getLogger(__name__)

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
_KEY_ATTRS = ("ssl_ca_cert", "cert_file", "key_file")


class KubeConfigError(PairvolError):
    """No usable Kubernetes client configuration."""


class TokenFile:
    """A bearer token in a file that another process replaces (the kubelet's projected
    ServiceAccount token, a kubeconfig's ``tokenFile``): re-read whenever the file is not
    the one last read (device, inode, mtime, size). ``os.stat`` follows symlinks, so the
    kubelet's atomic swap of its ``..data`` link counts as a change."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._seen: tuple[int, int, int, int] | None = None
        self._token = ""
        self._lock = threading.Lock()  # called from the client's worker threads

    def read(self, force: bool = False) -> str:
        with self._lock:
            try:
                st = os.stat(self.path)
                seen = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
                if force or seen != self._seen:
                    with open(self.path) as f:
                        token = f.read().strip()
                    if not token:
                        raise KubeConfigError(f"token file {self.path} is empty")
                    if token != self._token and self._seen is not None:
                        log.debug("token file %s replaced: using the new token", self.path)
                    self._seen, self._token = seen, token
            except OSError as exc:
                if not self._token:
                    raise KubeConfigError(f"cannot read token file {self.path}: {exc}") from exc
                log.warning("token file %s unreadable (%s): keeping the token read before", self.path, exc)
            return self._token


class _KeyMaterial:
    """Certificates and keys the loader wrote to files, moved into anonymous memory."""

    def __init__(self) -> None:
        # not created here: the library creates it only when it has something to write, so a
        # process with a read-only root and no /tmp (the agent) loads a token kubeconfig fine
        # (tempfile.gettempdir() is no help: it probes by writing, and fails without a /tmp)
        base = tempfile.tempdir or os.environ.get("TMPDIR") or "/tmp"
        self.dir = os.path.join(base, f"pairvol-kube-{os.getpid()}-{secrets.token_hex(8)}")
        self._fds: list[int] = []
        self.paths: dict[str, str] = {}  # Configuration attribute -> /proc/self/fd/N

    def seal(self, cfg: Any) -> None:
        """Move every file of ours that ``cfg`` names into a memfd, then empty the directory."""
        for attr in _KEY_ATTRS:
            path = getattr(cfg, attr, None)
            if isinstance(path, str) and os.path.dirname(os.path.abspath(path)) == self.dir:
                with open(path, "rb") as f:
                    data = f.read()
                fd = os.memfd_create("pairvol-kube", os.MFD_CLOEXEC)
                self._fds.append(fd)
                os.write(fd, data)
                self.paths[attr] = f"/proc/self/fd/{fd}"
        self.restore(cfg)
        self.sweep()

    def restore(self, cfg: Any) -> None:
        """The library's refresh hook copies its own (removed) paths back: put ours again."""
        for attr, path in self.paths.items():
            setattr(cfg, attr, path)

    def sweep(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def close(self) -> None:
        self.sweep()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


@dataclass(frozen=True)
class Credentials:
    """What another HTTP client (kopf's) needs to act as the same user."""

    server: str
    token: str | None
    ca_path: str | None
    cert_path: str | None
    key_path: str | None
    insecure: bool
    namespace: str


@dataclass
class KubeConfig:
    """One loaded configuration: the ``kubernetes`` client's :class:`Configuration` (server,
    TLS, proxy, credentials and their refresh hook), the default namespace, and a
    description of the source for error messages. :meth:`close` releases the key material."""

    configuration: Any  # kubernetes.client.Configuration (the package has no type hints)
    namespace: str
    source: str
    token_file: TokenFile | None = None
    reload: Callable[[], KubeConfig] | None = None
    _keys: _KeyMaterial | None = field(default=None, repr=False)
    # the configuration read again after a 401, whose refresh hook is now ours (kept open:
    # the hook puts its key material's paths back on every request)
    _fresh: KubeConfig | None = field(default=None, repr=False)

    @property
    def server(self) -> str:
        return str(self.configuration.host)

    def authorization(self) -> str | None:
        """The Authorization header the next request would carry (runs the refresh hook)."""
        value = self.configuration.get_api_key_with_prefix("authorization")
        return str(value) if value else None

    def credentials(self) -> Credentials:
        auth = self.authorization()
        scheme, _, token = (auth or "").partition(" ")
        c = self.configuration
        return Credentials(
            server=self.server,
            token=token if scheme.lower() == "bearer" and token else None,
            ca_path=c.ssl_ca_cert,
            cert_path=c.cert_file,
            key_path=c.key_file,
            insecure=not c.verify_ssl,
            namespace=self.namespace,
        )

    def refresh(self) -> bool:
        """After a 401: read the credentials again (the token file; else the whole source, so
        an ``exec`` plugin runs again). True if the next request carries other credentials.
        Blocking: call it from a worker thread."""
        before = self.authorization()
        if self.token_file is not None:
            self.token_file.read(force=True)
        elif self.reload is not None:
            try:
                fresh = self.reload()
            except KubeConfigError as exc:
                log.warning("reloading the Kubernetes credentials failed: %s", exc)
                return False
            # the old loader's hook would put the old token back at every request: take the
            # new loader's hook too (TLS connections keep the key material they were made with)
            self.configuration.api_key = dict(fresh.configuration.api_key)
            self.configuration.api_key_prefix = dict(fresh.configuration.api_key_prefix)
            self.configuration.refresh_api_key_hook = fresh.configuration.refresh_api_key_hook
            previous, self._fresh = self._fresh, fresh
            if previous is not None:
                previous.close()
        return self.authorization() != before

    def close(self) -> None:
        if self._fresh is not None:
            self._fresh.close()
        if self._keys is not None:
            self._keys.close()


def _install_hook(cfg: Any, token_file: TokenFile | None, keys: _KeyMaterial | None) -> None:
    """Chain our token file (and key material) after the library's own refresh hook, which
    runs before every request (exec plugins re-run there when their credential expires)."""
    library_hook = cfg.refresh_api_key_hook
    if token_file is None and (library_hook is None or keys is None):
        return

    def hook(c: Any) -> None:
        if library_hook is not None:
            library_hook(c)
            c.refresh_api_key_hook = hook  # the library's hook re-installs itself: stay in front
            if keys is not None:
                keys.restore(c)
                keys.sweep()
        if token_file is not None:
            c.api_key["authorization"] = f"Bearer {token_file.read()}"
            c.api_key_prefix.pop("authorization", None)

    cfg.refresh_api_key_hook = hook


def _new_configuration() -> Any:
    cfg = kclient.Configuration()
    # one attempt per call: the callers decide about retries (the Lease keeper's deadline
    # counts from sending; urllib3's default three silent retries would stretch a call)
    cfg.retries = False
    return cfg


def _from_kubeconfig(paths: str) -> KubeConfig:
    listed = [os.path.expanduser(p) for p in paths.split(os.pathsep) if p]
    if not any(os.path.exists(p) for p in listed):
        raise KubeConfigError(f"kubeconfig {paths} does not exist (set KUBECONFIG or pass --kubeconfig)")
    keys = _KeyMaterial()
    cfg = _new_configuration()
    try:
        # what load_kube_config() does, keeping the merged view and the loader at hand
        merged = kube_config.KubeConfigMerger(paths).config
        if merged is None:
            raise KubeConfigError(f"kubeconfig {paths}: no configuration found")
        loader = kube_config.KubeConfigLoader(config_dict=merged, config_base_path=None, temp_file_path=keys.dir)
        loader.load_and_set(cfg)
        active = loader.current_context
        keys.seal(cfg)
        context = (active or {}).get("context") or {}
        user_name = context.get("user")
        # the library reads a tokenFile once; find it in the library's merged view (with the
        # path of the file that declared the user, for a relative name) to re-read it
        token_file = None
        user_node = merged["users"].get_with_name(user_name, safe=True) if user_name else None
        user = user_node.safe_get("user") if user_node is not None else None
        if user_node is not None and isinstance(user, dict) and user.get("tokenFile") and not user.get("token"):
            base = os.path.dirname(os.path.abspath(user_node.path)) if user_node.path else ""
            token_file = TokenFile(os.path.join(base, str(user["tokenFile"])))
            token_file.read()
    except KubeConfigError:
        keys.close()
        raise
    except (kconfig.ConfigException, OSError, KeyError, TypeError, ValueError) as exc:
        keys.close()
        raise KubeConfigError(f"kubeconfig {paths}: {exc}") from exc
    except BaseException:
        keys.close()
        raise
    _install_hook(cfg, token_file, keys)
    source = f"kubeconfig {paths} (context {(active or {}).get('name')!r}, user {user_name!r})"
    return KubeConfig(cfg, str(context.get("namespace") or "default"), source, token_file,
                      lambda: _from_kubeconfig(paths), keys)


def _in_cluster(sa_dir: str) -> KubeConfig:
    cfg = _new_configuration()
    try:
        incluster_config.InClusterConfigLoader(
            token_filename=f"{sa_dir}/token", cert_filename=f"{sa_dir}/ca.crt", try_refresh_token=False
        ).load_and_set(cfg)
    except kconfig.ConfigException as exc:
        raise KubeConfigError(f"in-cluster configuration: {exc}") from exc
    token_file = TokenFile(f"{sa_dir}/token")
    token_file.read()
    _install_hook(cfg, token_file, None)
    namespace = "default"
    with contextlib.suppress(OSError), open(f"{sa_dir}/namespace") as f:
        namespace = f.read().strip() or "default"
    return KubeConfig(cfg, namespace, f"in-cluster ServiceAccount ({sa_dir})", token_file,
                      lambda: _in_cluster(sa_dir), None)


def load_config_sync(path: str | None = None) -> KubeConfig:
    """The configuration from ``path``, ``$KUBECONFIG``, the in-cluster ServiceAccount or
    ``~/.kube/config`` (blocking: it may run an ``exec`` plugin)."""
    path = path or os.environ.get("KUBECONFIG")
    if path:
        return _from_kubeconfig(path)
    if os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(f"{SA_DIR}/token"):
        return _in_cluster(SA_DIR)
    default = os.path.expanduser("~/.kube/config")
    if os.path.exists(default):
        return _from_kubeconfig(default)
    raise KubeConfigError(
        "no Kubernetes configuration: set KUBECONFIG (or pass --kubeconfig), or run in a pod with a service account"
    )


async def load_config(path: str | None = None) -> KubeConfig:
    """:func:`load_config_sync` without blocking the event loop."""
    return await asyncio.to_thread(load_config_sync, path)
