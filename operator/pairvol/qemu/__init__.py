"""QEMU I/O: qemu-img and qemu-storage-daemon processes, and the one QMP connection.

Only this package starts QEMU processes or speaks QMP; callers see dataclasses, plain
dicts and :class:`QemuError`.
"""

from pairvol.errors import PairvolError


class QemuError(PairvolError):
    """A QEMU process or command failed; the message carries QEMU's own text."""


class QsdDied(QemuError):
    """The qemu-storage-daemon process exited."""


__all__ = ["QemuError", "QsdDied"]
