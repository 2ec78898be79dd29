"""Growing an attachment after its volume grew (NodeExpandVolume), layer by layer.

The volume's replicas grow first (ControllerExpandVolume, docs/correctness.md E0-E5); the
primary then serves its export again at the new size, and the attachment's layers learn it
from the bottom up:

1. the attacher's NBD client: QEMU fixes an NBD node's length when it connects and refuses
   to grow it ("Cannot grow NBD nodes"), but the primary's grow closed the export, so the
   client reconnects on its next request and then knows the export's new size; a
   ``block_resize`` to exactly that size is then accepted and sets the node's length (a
   read through the FUSE file, past the page cache, makes that next request happen);
2. the FUSE export reports the node's length as the file's size (the kernel asks again
   once its attribute cache expires);
3. ``losetup --set-capacity`` makes the loop device take the file's new size;
4. a mounted file system grows online: ``resize2fs`` (ext4) on the device, ``xfs_growfs``
   on the mount point. A Block volume stops at 3.

Every step is idempotent: a call repeated after a crash, or for a volume already grown,
finds each layer at the size and does nothing more.

An attachment through the kernel's nbd client (transport ``nbd``) cannot take part: the
attacher's local NBD export holds its node at the size it had (QEMU refuses a resize under
an NBD export), so step 1 is impossible while the kernel is connected. Such a volume grows
when it is attached anew (staged again once no pod on the node uses it; the kubelet's
NodeExpandVolume then grows the file system); until then the call fails with that advice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from pairvol.csi.attach import AttachError, Attachment, Broken, Record, run

log = logging.getLogger(__name__)

NBD_NODE = "volume"  # the attacher's NBD client (attach.attacher_argv)
GROW_TIMEOUT_S = 30.0
POLL_S = 0.1


class OfflineOnly(AttachError):
    """The attachment cannot take a new size while it is attached."""


class NotYet(AttachError):
    """The export does not offer the size yet (the replicas have not finished growing)."""


async def grow(att: Attachment, record: Record, size: int) -> int:
    """Grow every layer of ``att`` to ``size`` bytes; returns the device's size."""
    if not await att.attacher_running():
        raise Broken(f"the attacher of {att.volume_id} is gone; restart the pod so the volume is staged again")
    device = await att.device()
    if device is None:
        raise Broken(f"volume {att.volume_id} has no device on this node; unstage and stage it again")
    have = await asyncio.to_thread(_device_size, device)
    if have < size and record.transport == "nbd":
        raise OfflineOnly(
            f"{att.volume_id} is attached through the kernel's nbd client, whose device keeps the size it had "
            f"when it was attached ({have} bytes; QEMU's NBD export cannot grow while it is served): it takes "
            "the new size when it is staged anew on this node, once no pod here uses it (scale the workload to "
            "zero and back, or move the pod to another node); its file system is grown then"
        )
    if have < size:
        await _grow_nbd_node(att, size)
        await _wait_file_size(att.disk, size)
        if await asyncio.to_thread(_device_size, device) < size:
            await run("losetup", "--set-capacity", device)
        have = await asyncio.to_thread(_device_size, device)
        if have < size:
            raise AttachError(f"loop device {device} is {have} bytes after losetup --set-capacity, not {size}")
    if not record.block:
        if record.fs_type == "xfs":
            await run("xfs_growfs", record.staging_path, timeout=300)
        else:
            await run("resize2fs", device, timeout=300)
        log.info("grew the %s file system of %s to %d bytes", record.fs_type, att.volume_id, have)
    return have


async def _grow_nbd_node(att: Attachment, size: int) -> None:
    qmp = QMPClient(f"attacher-{att.volume_id}")
    try:
        await qmp.connect(str(att.qmp))
    except (QMPError, OSError) as exc:
        raise AttachError(f"cannot reach the attacher of {att.volume_id} on {att.qmp}: {exc}") from exc
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + GROW_TIMEOUT_S
        while True:
            try:
                await qmp.execute("block_resize", {"node-name": NBD_NODE, "size": size})
                return
            except QMPError as exc:
                text = str(exc)
                if "Cannot grow" not in text and "Cannot resize" not in text:
                    raise AttachError(f"the attacher of {att.volume_id} cannot grow to {size} bytes: {text}") from exc
                if loop.time() >= deadline:
                    raise NotYet(
                        f"the export of {att.volume_id} does not offer {size} bytes yet ({text}); "
                        "the volume is still growing: retry"
                    ) from exc
            # the client reconnects (and learns the export's size) at its next request
            await asyncio.to_thread(_read_uncached, att.disk)
            await asyncio.sleep(POLL_S)
    finally:
        with contextlib.suppress(Exception):
            await qmp.disconnect()


def _read_uncached(path: Path) -> None:
    """Read the first block of the FUSE file from the attacher, not from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.pread(fd, 4096, 0)
    except OSError as exc:
        log.debug("probe read of %s: %s", path, exc)
    finally:
        os.close(fd)


async def _wait_file_size(path: Path, size: int) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + GROW_TIMEOUT_S
    while (have := (await asyncio.to_thread(os.stat, path)).st_size) < size:
        if loop.time() >= deadline:
            raise AttachError(f"the FUSE export {path} still reports {have} bytes, not {size}")
        await asyncio.sleep(POLL_S)


def _device_size(device: str) -> int:
    with open(device, "rb", buffering=0) as f:
        return f.seek(0, os.SEEK_END)
