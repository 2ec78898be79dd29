"""Which kernel nbd devices an attachment may take, read from a sysfs laid out as the
kernel lays it out (a ``pid`` attribute exactly while a device is connected).

The real kernel path runs in a guest (tests/integration/test_csi_kernel_nbd.py); these pin
the choices that keep two attachments off one device.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pairvol.csi import nbd
from pairvol.csi.attach import Attachment, device_users


@pytest.fixture
def sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    block = tmp_path / "sys" / "block"
    for index in (0, 1, 2, 10):
        (block / f"nbd{index}").mkdir(parents=True)
        (block / f"nbd{index}" / "size").write_text("0\n")
        (block / f"nbd{index}" / "dev").write_text(f"43:{index * 32}\n")
        (block / f"nbd{index}" / "holders").mkdir()
    (block / "nbd0" / "pid").write_text("123\n")  # connected
    (block / "nbd0" / "size").write_text("131072\n")
    (block / "loop0").mkdir()
    (tmp_path / "sys" / "module" / "nbd").mkdir(parents=True)
    monkeypatch.setattr(nbd, "SYS_BLOCK", block)
    monkeypatch.setattr(nbd, "SYS_MODULE", tmp_path / "sys" / "module" / "nbd")
    return block


def test_connected_devices_are_told_by_their_pid_attribute_and_sizes_are_in_bytes(sysfs: Path) -> None:
    assert nbd.connected("/dev/nbd0") and not nbd.connected("/dev/nbd1")
    assert nbd.size("/dev/nbd0") == 64 << 20
    assert nbd.free_devices() == ["/dev/nbd1", "/dev/nbd2", "/dev/nbd10"]  # index order, not name order
    assert nbd.index("/dev/nbd10") == 10
    with pytest.raises(ValueError):
        nbd.index("/dev/loop0")


def test_the_transport_is_unavailable_without_the_module_or_its_devices(sysfs: Path) -> None:
    assert nbd.unavailable() is None
    for device in sysfs.glob("nbd*"):
        shutil.rmtree(device)
    assert "offers no devices" in (nbd.unavailable() or "")
    nbd.SYS_MODULE.rmdir()
    assert "module is not loaded" in (nbd.unavailable() or "")


async def test_a_device_another_attachment_recorded_is_never_chosen(sysfs: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    other = Attachment(state, "apps/other")
    other.dir.mkdir(parents=True)
    other.nbd_device_file.write_text("/dev/nbd1\n")  # recorded, not connected yet
    att = Attachment(state, "apps/pvc-1")
    att.dir.mkdir(parents=True)
    assert await att._free_nbd_devices(prefer=None) == ["/dev/nbd2", "/dev/nbd10"]
    assert await att._free_nbd_devices(prefer="/dev/nbd10") == ["/dev/nbd10", "/dev/nbd2"]  # its own record first
    assert await att._free_nbd_devices(prefer="/dev/nbd1") == ["/dev/nbd2", "/dev/nbd10"]  # never another's
    (sysfs / "nbd2" / "pid").write_text("9\n")  # configured since
    (sysfs / "nbd10" / "holders" / "dm-0").mkdir()  # LVM activated on it
    assert await att._free_nbd_devices(prefer=None) == []


def test_a_device_is_used_by_what_is_mounted_from_its_partitions_and_what_is_stacked_on_it(sysfs: Path) -> None:
    (sysfs / "nbd1" / "nbd1p1").mkdir()
    (sysfs / "nbd1" / "nbd1p1" / "dev").write_text("43:33\n")
    (sysfs / "nbd1" / "nbd1p1" / "holders").mkdir()
    assert nbd.device_numbers("/dev/nbd1") == ["43:32", "43:33"]
    mountinfo = "36 25 43:33 / /mnt/part rw - ext4 /dev/nbd1p1 rw\n"
    assert device_users(mountinfo, "/dev/nbd1", nbd.device_numbers("/dev/nbd1")) == ["/mnt/part"]
    assert nbd.holders("/dev/nbd1") == []
    (sysfs / "nbd1" / "nbd1p1" / "holders" / "dm-3").mkdir()
    assert nbd.holders("/dev/nbd1") == ["dm-3"]


async def test_a_recorded_device_that_is_neither_connected_nor_used_is_not_the_attachments(
    sysfs: Path, tmp_path: Path
) -> None:
    att = Attachment(tmp_path / "state", "apps/pvc-1")
    att.dir.mkdir(parents=True)
    assert await att.nbd_devices() == []  # nothing recorded
    att.nbd_device_file.write_text("/dev/nbd1\n")
    assert await att.nbd_devices() == []  # a crash before the connect, or a node restart
    (sysfs / "nbd1" / "pid").write_text("7\n")
    (sysfs / "nbd1" / "backend").write_text("qemu-nbd /srv/other.img\n")
    assert await att.nbd_devices() == []  # another program connected it since: not ours
    (sysfs / "nbd1" / "backend").write_text(att.nbd_identifier + "\n")
    assert await att.nbd_devices() == ["/dev/nbd1"]
    assert await att.device() == "/dev/nbd1"
