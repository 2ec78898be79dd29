"""The kernel's NBD client, for attachments on nodes that have it.

Why it is used where it exists: an attachment served through the kernel's ``nbd`` driver
is one block device in the kernel talking to the attacher over a unix socket, instead of a
FUSE file in a user-space daemon under a loop device; it keeps the queue depth the
workload issues (FUSE + loop serialises it) and costs no FUSE round trips.

Why this module speaks to the kernel itself instead of running ``nbd-client``: a device
must be provably *ours* before it is adopted, disconnected or reported broken. Another
program on the node may use nbd devices too (another driver, ``qemu-nbd -c``, an admin),
and "``/sys/block/nbdN/pid`` exists" says only that somebody is connected. So the connect
is made here, through the kernel's generic netlink family ``nbd`` (``NBD_CMD_CONNECT``),
with a *backend identifier* naming the attachment; the kernel shows it as
``/sys/block/nbdN/backend`` for as long as the device is configured, also after the
attacher died under it. The NBD handshake is done on the unix socket first, by the
project's own client (:func:`pairvol.nbd.client_handshake`); the kernel then takes the
socket and holds the connection, no process does, so it survives restarts of the node
plugin's and the attacher host's containers.

The numbers below are the wire formats' (linux/netlink.h, linux/genetlink.h,
linux/nbd-netlink.h).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from pathlib import Path

from pairvol.aio import bounded
from pairvol.nbd import NBDError, client_handshake

SYS_BLOCK = Path("/sys/block")
SYS_MODULE = Path("/sys/module/nbd")

NETLINK_GENERIC = 16
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLA_F_NESTED = 0x8000
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY, CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 3, 1, 2
NBD_GENL_VERSION = 1
NBD_CMD_CONNECT, NBD_CMD_DISCONNECT = 1, 2
NBD_ATTR_INDEX, NBD_ATTR_SIZE_BYTES, NBD_ATTR_BLOCK_SIZE_BYTES = 1, 2, 3
NBD_ATTR_SERVER_FLAGS, NBD_ATTR_SOCKETS, NBD_ATTR_BACKEND_IDENTIFIER = 5, 7, 10
NBD_SOCK_ITEM, NBD_SOCK_FD = 1, 1

#: the logical block size of every attachment's device (the loop device's too)
BLOCK_SIZE = 512
HANDSHAKE_TIMEOUT_S = 30.0


class NbdError(Exception):
    """The kernel or the export refused, or could not be asked; the text says which and why."""


class KernelRefused(NbdError):
    """The kernel refused to configure the device (held open or configured by another
    program): another device may do."""


def unavailable() -> str | None:
    """Why this node cannot attach through the kernel's NBD client, or None if it can."""
    if not SYS_MODULE.is_dir():
        return "the nbd kernel module is not loaded on this node (modprobe nbd)"
    if not any(SYS_BLOCK.glob("nbd[0-9]*")):
        return "the nbd module is loaded but offers no devices (modprobe nbd nbds_max=N)"
    return None


def index(device: str) -> int:
    """``/dev/nbd7`` -> 7 (ValueError for anything else)."""
    name = Path(device).name
    if not name.startswith("nbd") or not name[3:].isdigit():
        raise ValueError(f"{device} is not an nbd device")
    return int(name[3:])


def connected(device: str) -> bool:
    """Whether the kernel has a connection configured for ``device`` (its ``pid``
    attribute exists exactly while it is configured, also once the connection died)."""
    return (SYS_BLOCK / Path(device).name / "pid").exists()


def backend(device: str) -> str | None:
    """The backend identifier of a configured device ("" when its connector set none)."""
    try:
        return (SYS_BLOCK / Path(device).name / "backend").read_text().rstrip("\n")
    except OSError:
        return None


def size(device: str) -> int:
    """The device's size in bytes, as the kernel has it."""
    return int((SYS_BLOCK / Path(device).name / "size").read_text()) * 512


def free_devices() -> list[str]:
    """The nbd devices no connection is configured on, in index order."""
    found = [p.name for p in SYS_BLOCK.glob("nbd[0-9]*") if p.name[3:].isdigit()]
    return [f"/dev/{name}" for name in sorted(found, key=lambda n: int(n[3:])) if not connected(name)]


def device_numbers(device: str) -> list[str]:
    """``MAJOR:MINOR`` of ``device`` and of each of its partitions (the kernel scans an nbd
    device's partition table: a mounted ``nbdNpM`` uses the device too)."""
    base = SYS_BLOCK / Path(device).name
    out = []
    for dev in [base / "dev", *sorted(base.glob(f"{base.name}p*/dev"))]:
        try:
            out.append(dev.read_text().strip())
        except OSError:
            continue
    return out


def holders(device: str) -> list[str]:
    """What the kernel stacks on ``device`` or its partitions (device-mapper, md: LVM
    activated by the node's udev, for one)."""
    base = SYS_BLOCK / Path(device).name
    return sorted(p.name for d in [base, *base.glob(f"{base.name}p*")] for p in (d / "holders").glob("*"))


# -- generic netlink


def _attr(kind: int, payload: bytes) -> bytes:
    body = struct.pack("=HH", 4 + len(payload), kind) + payload
    return body + b"\0" * (-len(body) % 4)


def _attrs(data: bytes) -> dict[int, bytes]:
    out = {}
    while len(data) >= 4:
        length, kind = struct.unpack_from("=HH", data)
        if length < 4:
            break
        out[kind & 0x3FFF] = data[4:length]
        data = data[(length + 3) & ~3 :]
    return out


def _request(sock: socket.socket, family: int, cmd: int, version: int, attrs: bytes, seq: int) -> bytes:
    """One request, acknowledged; its first answer's payload after the genl header ("" for
    a bare acknowledgement), or NbdError with the kernel's errno."""
    payload = struct.pack("=BBH", cmd, version, 0) + attrs
    sock.send(struct.pack("=IHHII", 16 + len(payload), family, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + payload)
    while True:
        data = sock.recv(65536)
        while len(data) >= 16:
            length, kind, _, answer_seq, _ = struct.unpack_from("=IHHII", data)
            message, data = data[16:length], data[(length + 3) & ~3 :]
            if answer_seq != seq:
                continue
            if kind == NLMSG_ERROR:
                (error,) = struct.unpack_from("=i", message)
                if error:
                    raise NbdError(os.strerror(-error))
                return b""
            return message[4:]


def _nbd_request(cmd: int, attrs: bytes) -> None:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC) as sock:
        sock.settimeout(30)
        sock.bind((0, 0))
        try:
            answer = _request(sock, GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, _attr(CTRL_ATTR_FAMILY_NAME, b"nbd\0"), 1)
        except NbdError as exc:
            raise NbdError(f"the kernel has no nbd netlink family ({exc}): is the nbd module loaded?") from exc
        family_id = _attrs(answer).get(CTRL_ATTR_FAMILY_ID)
        if family_id is None:
            raise NbdError("the kernel answered without the nbd family's id")
        _request(sock, struct.unpack("=H", family_id[:2])[0], cmd, NBD_GENL_VERSION, attrs, 2)


async def connect(device: str, socket_path: Path, export: str, identifier: str) -> int:
    """Connect ``device`` to ``export`` on the unix socket, under ``identifier``; returns
    the size. NbdError: the export refused (KernelRefused: the kernel did; either way the
    device stays as it was)."""
    dev_index = index(device)
    try:
        reader, writer = await bounded(asyncio.open_unix_connection(str(socket_path)), HANDSHAKE_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        raise NbdError(f"cannot reach the export on {socket_path}: {exc or 'timeout'}") from exc
    try:
        try:
            info = await bounded(client_handshake(reader, writer, export), HANDSHAKE_TIMEOUT_S)
        except (NBDError, TimeoutError) as exc:
            raise NbdError(f"cannot negotiate {export!r} on {socket_path}: {exc or 'timeout'}") from exc
        # from here on the socket is the kernel's: this process must not read a byte of it
        transport = writer.transport
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        sock = writer.get_extra_info("socket")
        await asyncio.to_thread(_configure, dev_index, sock.fileno(), info.size, info.flags, identifier)
    finally:
        writer.close()  # closes this process's descriptor; the kernel holds its own reference
    return info.size


def _configure(dev_index: int, fd: int, size_bytes: int, flags: int, identifier: str) -> None:
    item = _attr(NBD_SOCK_ITEM | NLA_F_NESTED, _attr(NBD_SOCK_FD, struct.pack("=I", fd)))
    attrs = (
        _attr(NBD_ATTR_INDEX, struct.pack("=I", dev_index))
        + _attr(NBD_ATTR_SIZE_BYTES, struct.pack("=Q", size_bytes))
        + _attr(NBD_ATTR_BLOCK_SIZE_BYTES, struct.pack("=Q", BLOCK_SIZE))
        + _attr(NBD_ATTR_SERVER_FLAGS, struct.pack("=Q", flags))
        + _attr(NBD_ATTR_SOCKETS | NLA_F_NESTED, item)
        + _attr(NBD_ATTR_BACKEND_IDENTIFIER, identifier.encode() + b"\0")
    )
    try:
        _nbd_request(NBD_CMD_CONNECT, attrs)
    except NbdError as exc:
        raise KernelRefused(f"the kernel refused to connect /dev/nbd{dev_index}: {exc}") from exc


def disconnect(device: str) -> None:
    """Disconnect ``device`` (the kernel fails what is still queued on it)."""
    try:
        _nbd_request(NBD_CMD_DISCONNECT, _attr(NBD_ATTR_INDEX, struct.pack("=I", index(device))))
    except NbdError as exc:
        raise NbdError(f"the kernel refused to disconnect {device}: {exc}") from exc
