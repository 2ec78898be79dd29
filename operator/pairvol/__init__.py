"""pairvol: a block volume replicated between two nodes with QEMU COLO block replication."""

__version__ = "0.1.0"
