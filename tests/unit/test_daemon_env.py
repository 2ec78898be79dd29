"""The environment the agent starts its qemu-storage-daemons with: pairvol's allocator
settings for glibc (request buffers from a heap the daemon keeps), before any tunables the
operator set, which therefore still win; none at all for a stock daemon."""

from __future__ import annotations

from pairvol.qemu.qsd import MALLOC_TUNING, daemon_env


def test_the_allocator_settings_are_added_and_nothing_else_changes() -> None:
    env = daemon_env({"PATH": "/usr/bin", "LANG": "C"})
    assert env == {"PATH": "/usr/bin", "LANG": "C", "GLIBC_TUNABLES": MALLOC_TUNING}


def test_tunables_already_set_come_after_pairvols_so_they_win() -> None:
    env = daemon_env({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"})
    assert env["GLIBC_TUNABLES"] == f"{MALLOC_TUNING}:glibc.malloc.trim_threshold=0"


def test_a_stock_daemon_gets_the_environment_as_it_is() -> None:
    base = {"GLIBC_TUNABLES": "glibc.malloc.check=3", "PATH": "/bin"}
    assert daemon_env(base, tuned_malloc=False) == base


def test_the_settings_name_only_glibc_malloc_tunables_in_bytes() -> None:
    pairs = [item.split("=") for item in MALLOC_TUNING.split(":")]
    assert {name for name, _ in pairs} == {"glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold"}
    values = dict(pairs)
    # a 1 MiB request comes from the heap, and a queue of them is not trimmed away
    assert int(values["glibc.malloc.mmap_threshold"]) >= 1 << 20
    assert int(values["glibc.malloc.trim_threshold"]) >= 4 * int(values["glibc.malloc.mmap_threshold"])
