"""pairvol's CSI driver (`pairvol.io`): PersistentVolumeClaims backed by ReplicatedVolumes.

The controller service turns CreateVolume/DeleteVolume into ReplicatedVolume objects; the
node service attaches a volume on the node that consumes it (an NBD client over TLS-PSK
to the volume's export, exposed as a loop device) and mounts or publishes it. See
docs/csi.md.
"""

DRIVER_NAME = "pairvol.io"
