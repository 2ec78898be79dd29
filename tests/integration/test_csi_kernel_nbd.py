"""The node plugin's kernel nbd transport: in a guest whose kernel has the module, and on
this machine, whose kernel has not.

The guest (tests/support/vm.py) is Debian's own kernel under emulation, running this
machine's file system read-only: the same Python, QEMU, agents and node plugin. In it the
node plugin runs with ``--attach-transport nbd`` through the transport-independent tests
of test_csi_node.py (files across unstage, restage and a plugin crash; Block volumes byte
for byte; a Latest-mode failover under a mounted file
system; a dead attacher; a Checkpoint-mode attachment refusing the rollback), the
attacher host's container-kill test, and guest_kernel_nbd.py (expansion, a crash between
choosing the device and connecting it, another program's device, a mounted partition).
On this machine, whose kernel has no nbd module: the transport is refused when it is
demanded, with nothing built, and ``auto`` gives FUSE + loop.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import grpc
import pytest

from pairvol.csi import nbd
from tests.integration.test_csi_node import (  # noqa: F401 - fixtures
    Kubelet,
    Volume,
    _root,
    devices_of,
    mounts,
    node_plugin,
    stubs,
    volume,
    volume_size,
)
from tests.support.ci import unavailable
from tests.support.csi import Stubs
from tests.support.vm import BACKGROUND_GUEST, BackgroundGuest, GuestUnavailable, run_in_guest

REPO = Path(__file__).resolve().parents[2]

#: what the guest runs: pytest node ids (a -k expression for test_csi_node.py)
NODE_TESTS = " or ".join(
    (
        "files_survive",
        "block_volume_is",
        "rides_through",
        "attacher_died",
        "checkpoint_mode_attachment",
    )
)
HOST_TEST = (
    "tests/integration/test_csi_attacher_host.py::"
    "test_a_mounted_volume_serves_reads_and_writes_while_the_node_plugins_container_is_killed"
)
EXPECTED_PASSED = 5 + 1 + 4


#: the guest's own limit when it runs alone: about 7 minutes on a quiet 2-CPU host; a guest
#: whose I/O hangs is ended well before CI's limit
GUEST_TIMEOUT_S = 1080
#: ... and when it starts with the session at nice 19 (tests/conftest.py): it then runs on
#: the CPU time the rest of the suite leaves, for as long as the suite takes
BACKGROUND_TIMEOUT_S = 3000
#: how much slower than this machine the guest's tests may run (their time limits and
#: start-up waits scale by it): emulation alone, and emulation on the CPU others leave
SLOWDOWN = 4
BACKGROUND_SLOWDOWN = 8


def guest_script(slowdown: int = SLOWDOWN) -> str:
    return f"""
cd {REPO}
export PATH={REPO}/.venv/tools:{REPO}/.venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PAIRVOL_TEST_ATTACH_TRANSPORT=nbd \\
  PAIRVOL_TEST_SLOWDOWN={slowdown}
python -m pytest -q -p no:cacheprovider --durations=0 \\
  tests/integration/guest_kernel_nbd.py {HOST_TEST} \\
  tests/integration/test_csi_node.py -k "guest_kernel_nbd or attacher_host or {NODE_TESTS}" 2>&1
"""


@pytest.mark.guest_vm
@pytest.mark.timeout(BACKGROUND_TIMEOUT_S + 120)
def test_in_a_guest_with_the_nbd_module_the_node_plugin_attaches_through_the_kernel(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    early: BackgroundGuest | None = request.config.stash.get(BACKGROUND_GUEST, None)
    try:
        if early is not None:
            waited = time.monotonic()
            done = early.result()
            print(f"guest: started with the session, collected after waiting {time.monotonic() - waited:.0f} s")
        else:
            done = run_in_guest(guest_script(), tmp_path / "guest", timeout=GUEST_TIMEOUT_S)
    except GuestUnavailable as exc:
        unavailable(f"the guest cannot be booted here: {exc}")
    failures = done.output.find("= FAILURES =")
    failures = done.output.find("= ERRORS =") if failures < 0 else failures
    # what failed first (a hang report at the end can be longer than any tail shown)
    shown = done.output[failures : failures + 8000] + "\n[...]\n" if failures >= 0 else ""
    print(shown + done.output[-6000:])
    print(f"guest: {done.seconds:.0f} s from boot to power-off")
    assert done.rc is not None, f"the guest never finished; its console said:\n{done.console[-4000:]}"
    passed = re.search(r"(\d+) passed", done.output)
    assert done.rc == 0 and passed is not None, shown + done.output[-4000:]
    assert int(passed.group(1)) == EXPECTED_PASSED and "skipped" not in done.output, done.output[-3000:]


@pytest.fixture
def _a_node_without_the_nbd_module() -> None:
    if nbd.unavailable() is None:
        unavailable("this machine's kernel has the nbd module: only the guest test applies here")


@pytest.mark.usefixtures("_a_node_without_the_nbd_module")
async def test_a_node_without_the_nbd_module_refuses_the_nbd_transport_and_builds_nothing(
    tmp_path: Path,
    volume: Volume,  # noqa: F811 - fixtures
    stubs: Stubs,  # noqa: F811 - fixtures
) -> None:
    async with node_plugin(tmp_path, volume, stubs, "--attach-transport", "nbd") as k:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await k.stage()
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "cannot attach through the kernel's nbd client: the nbd kernel module is not loaded" in (
            refused.value.details()
        )
        assert "--attach-transport fuse or auto" in refused.value.details()
        assert not (k.state_dir / "apps_pvc-1").exists() or not list((k.state_dir / "apps_pvc-1").iterdir())
        assert await devices_of(k.state_dir) == []


@pytest.mark.usefixtures("_a_node_without_the_nbd_module")
async def test_auto_attaches_through_fuse_and_loop_on_a_node_without_the_nbd_module(
    tmp_path: Path,
    volume: Volume,  # noqa: F811 - fixtures
    stubs: Stubs,  # noqa: F811 - fixtures
) -> None:
    async with node_plugin(tmp_path, volume, stubs, "--attach-transport", "auto") as k:
        await k.stage()
        await k.publish()
        assert mounts()[str(k.staging)].startswith("/dev/loop")
        (k.target / "f").write_bytes(b"x")
        await k.unpublish()
        await k.unstage()
        assert await devices_of(k.state_dir) == []
