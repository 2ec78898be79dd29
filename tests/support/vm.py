"""A Debian kernel under emulation, for the code paths this machine's kernel cannot run.

The kernel these machines boot has no modules (no ``nbd``, so no ``/dev/nbd*``), which
leaves the node plugin's kernel NBD transport untestable on the host. Debian's own kernel
package carries the module, and ``qemu-system-x86_64`` boots it under software emulation
(TCG: no dependence on nested virtualisation). The guest's root file system is the host's,
shared read-only over virtio-9p, so the guest runs exactly the host's Python, QEMU and
tools and this checkout; ``/tmp`` is a fresh ext4 disk (direct I/O works there, unlike on
tmpfs) and the job directory is shared writable at ``/mnt`` for the script and its results.

What a caller gets: :func:`run_in_guest` runs a shell script as root in the guest and
returns its exit status and output. The kernel package is fetched with ``apt-get
download`` (Debian's registry is reachable) into a cache directory and unpacked once; the
initramfs (busybox from ``busybox-static`` and the kernel's own modules, their
dependencies resolved from the modules' ``depends=`` fields) is built here, in Python.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import lzma
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

#: the modules the guest loads at boot, each after what it depends on
GUEST_MODULES = (
    *("virtio_pci", "virtio_blk", "9p", "9pnet_virtio"),
    # crc32c_generic first: libcrc32c (xfs) asks the crypto API for crc32c at its load
    *("crc32c_generic", "nbd", "ext4", "xfs", "loop", "fuse"),
)

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /mods/order); do insmod /mods/$m.ko || echo "insmod $m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /newroot || echo "no root"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 job /newroot/mnt || echo "no job"
for d in proc sys dev; do mount --move /$d /newroot/$d; done
for i in $(seq 50); do [ -b /newroot/dev/vda ] && break; sleep 0.1; done
mount -t ext4 /newroot/dev/vda /newroot/tmp || echo "no scratch disk"
chmod 1777 /newroot/tmp
mount -t tmpfs tmpfs /newroot/run
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup 2>/dev/null
mount -t devpts devpts /newroot/dev/pts 2>/dev/null
chroot /newroot /bin/sh -c "ip link set lo up; cd /mnt && sh ./job.sh > /mnt/out.log 2>&1; echo \\$? > /mnt/rc; sync"
sync
poweroff -f
"""


class GuestUnavailable(Exception):
    """The guest cannot be built or booted here; the text says what is missing."""


@dataclass(frozen=True)
class Kernel:
    release: str
    vmlinuz: Path
    modules: Path  # .../lib/modules/RELEASE


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "pairvol" / "guest-kernel"


def _apt_download(package: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["apt-get", "download", package], cwd=into, capture_output=True, text=True, timeout=600, check=False
    )
    found = sorted(into.glob(f"{package.replace('+', '?')}_*.deb"))
    if done.returncode != 0 or not found:
        raise GuestUnavailable(f"apt-get download {package} failed: {done.stderr.strip()[-300:]}")
    return found[-1]


def kernel(cache: Path | None = None) -> Kernel:
    """Debian's current kernel for this release, unpacked under the cache directory."""
    cache = cache or cache_dir()
    unpacked = sorted(cache.glob("*/boot/vmlinuz-*"))
    if not unpacked:
        deps = subprocess.run(
            ["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True, check=False
        ).stdout
        names = re.findall(r"Depends: (linux-image-[0-9][^\s]*)", deps)
        if not names:
            raise GuestUnavailable("apt-cache knows no linux-image-amd64 (run apt-get update)")
        deb = _apt_download(names[0], cache / "debs")
        target = cache / names[0]
        tmp = target.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True, timeout=600)
        tmp.rename(target)
        unpacked = sorted(cache.glob("*/boot/vmlinuz-*"))
    vmlinuz = unpacked[-1]
    release = vmlinuz.name.removeprefix("vmlinuz-")
    return Kernel(release, vmlinuz, vmlinuz.parent.parent / "lib" / "modules" / release)


def _module_files(k: Kernel) -> dict[str, Path]:
    files = {}
    for path in k.modules.rglob("*.ko*"):
        name = path.name.split(".ko")[0]
        files[name] = path
        files.setdefault(name.replace("-", "_"), path)
    return files


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.zst"):
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    return data


def _load_order(k: Kernel, wanted: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """``wanted`` and their dependencies, each after what it needs (built-ins skipped)."""
    files = _module_files(k)
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        path = files.get(name)
        if path is None:
            return  # built into the kernel
        data = _module_bytes(path)
        found = re.search(rb"depends=([A-Za-z0-9_,-]*)", data)
        for dep in (found.group(1).decode() if found else "").split(","):
            if dep:
                visit(dep)
        order.append((name, data))

    for name in wanted:
        visit(name)
    return order


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (path, mode, data); directories have empty data."""
    out = io.BytesIO()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode() + b"\0"
        header = "070701" + "".join(f"{v:08x}" for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0))
        out.write(header.encode() + encoded)
        out.write(b"\0" * (-(110 + len(encoded)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))
    return out.getvalue()


def initramfs(k: Kernel, into: Path) -> Path:
    busybox = Path("/bin/busybox")
    if (
        not busybox.exists()
        or b"linux-vdso" in subprocess.run(["ldd", str(busybox)], capture_output=True, check=False).stdout
    ):
        raise GuestUnavailable("a static busybox is needed (apt-get install busybox-static)")
    modules = _load_order(k, GUEST_MODULES)
    entries: list[tuple[str, int, bytes]] = [
        (d, 0o40755, b"") for d in ("bin", "mods", "newroot", "proc", "sys", "dev")
    ]
    entries.append(("bin/busybox", 0o100755, busybox.read_bytes()))
    entries.append(("init", 0o100755, INIT.encode()))
    entries.append(("mods/order", 0o100644, "\n".join(n for n, _ in modules).encode() + b"\n"))
    entries += [(f"mods/{name}.ko", 0o100644, data) for name, data in modules]
    path = into / "initrd.gz"
    path.write_bytes(gzip.compress(_cpio_newc(entries), compresslevel=1))
    return path


@dataclass
class GuestRun:
    rc: int | None
    output: str
    console: str
    seconds: float


def run_in_guest(
    script: str,
    job: Path,
    timeout: float = 900,
    scratch_gib: int = 4,
    cpus: int = 2,
    niceness: int = 0,
    stop: threading.Event | None = None,
) -> GuestRun:
    """Boot the guest, run ``script`` (sh, as root, in ``job``, which the guest sees at
    ``/mnt``), power off; the script's exit status (None: it never finished). ``niceness``:
    the VM's CPU priority (19: only what nothing else wants); ``stop`` ends it early."""
    if shutil.which("qemu-system-x86_64") is None:
        raise GuestUnavailable("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    k = kernel()
    job.mkdir(parents=True, exist_ok=True)
    (job / "job.sh").write_text(script)
    for stale in ("rc", "out.log"):
        (job / stale).unlink(missing_ok=True)
    initrd = initramfs(k, job)
    scratch = job / "scratch.img"
    with open(scratch, "wb") as f:
        f.truncate(scratch_gib << 30)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(scratch)], check=True, timeout=120)
    argv = [
        *(["nice", "-n", str(niceness)] if niceness else []),
        "qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max", "-m", "3072", "-smp", str(cpus),
        "-nographic", "-no-reboot", "-net", "none",
        "-kernel", str(k.vmlinuz), "-initrd", str(initrd),
        "-append", "console=ttyS0 panic=-1 quiet",
        "-drive", f"file={scratch},if=virtio,format=raw,cache=unsafe",
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={job},mount_tag=job,security_model=none",
    ]  # fmt: skip
    start = time.monotonic()
    with open(job / "console.log", "wb") as console:
        # a lower priority needs a session (and so an autogroup) of its own: see _lower_autogroup
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT, start_new_session=niceness > 0
        )
        if niceness > 0:
            _lower_autogroup(proc.pid, niceness)
        try:
            deadline = start + timeout
            while proc.poll() is None and time.monotonic() < deadline and not (stop and stop.is_set()):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(min(1.0, max(0.0, deadline - time.monotonic())))
        finally:  # also on an interrupt: the VM never outlives the test (unfinished: rc None)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    scratch.unlink(missing_ok=True)
    rc_file = job / "rc"
    out = job / "out.log"
    return GuestRun(
        rc=int(rc_file.read_text()) if rc_file.exists() else None,
        output=out.read_text(errors="replace") if out.exists() else "",
        console=(job / "console.log").read_text(errors="replace"),
        seconds=time.monotonic() - start,
    )


def _lower_autogroup(pid: int, niceness: int) -> None:
    """Give the autogroup of ``pid`` (the session it leads) the weight of ``niceness``.

    With autogroups (``kernel.sched_autogroup_enabled``, on in Debian's kernels) the CPU is
    shared between sessions first and by nice values only within one: a VM at nice 19 in the
    test session gets as much CPU as a local cluster that a test starts in a session of its
    own (``setsid``); two CPU-bound workers in another session ran 0.75 s instead of 0.46 s
    beside two nice-19 spinners. The VM's own session, with its autogroup lowered, leaves the
    CPU to every other session."""
    with contextlib.suppress(OSError):  # no autogroups here: the process's nice value is all there is
        Path(f"/proc/{pid}/autogroup").write_text(f"{niceness}\n")


class BackgroundGuest:
    """:func:`run_in_guest` in a thread of its own, started early and collected later.

    The guest test is CPU-bound emulation that waits on nothing; the rest of the suite is
    mostly waiting (Leases running out, pods starting, failovers). Started at the session's
    start at ``nice 19``, the VM runs on the CPU time the other tests leave idle, and its test,
    run last, collects the outcome instead of booting it then."""

    def __init__(self, script: str, job: Path, timeout: float, niceness: int = 19) -> None:
        self._args = (script, job, timeout, niceness)
        self._stop = threading.Event()
        self._outcome: GuestRun | BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="guest-vm", daemon=True)
        self.started_at = 0.0

    def _run(self) -> None:
        script, job, timeout, niceness = self._args
        try:
            self._outcome = run_in_guest(script, job, timeout=timeout, niceness=niceness, stop=self._stop)
        except BaseException as exc:  # handed to the test that collects it
            self._outcome = exc

    def start(self) -> None:
        self.started_at = time.monotonic()
        self._thread.start()

    def result(self) -> GuestRun:
        """Wait for the guest to power off (or its own timeout); re-raises what its start raised."""
        self._thread.join()
        outcome = self._outcome
        if isinstance(outcome, BaseException):
            raise outcome
        assert outcome is not None
        return outcome

    def cancel(self) -> None:
        """End the VM now if it still runs (the session ends without collecting it)."""
        self._stop.set()
        self._thread.join()


#: where tests/conftest.py leaves the guest it started with the session
BACKGROUND_GUEST = pytest.StashKey[BackgroundGuest]()
