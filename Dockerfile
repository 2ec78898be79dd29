# The one pairvol image: `pairvol operator` (the Deployment of the Helm chart),
# `pairvol agent` (the pods the operator creates) and `pairvol csi` (the CSI driver).
# qemu-img and qemu-storage-daemon come from Debian, the Python package is the wheel
# built from this repository.
#
# Build (from the repository root; not possible on the CI machines, which have no Docker):
#   docker build -t pairvol/pairvol:0.1.0 .
# and set image.repository/image.tag in the Helm values if you push it elsewhere.

FROM debian:bookworm-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN python3 -m venv /tmp/build-venv \
 && /tmp/build-venv/bin/pip install --no-cache-dir --upgrade pip wheel \
 && /tmp/build-venv/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM debian:bookworm-slim
# qemu-utils: qemu-img, qemu-io, qemu-nbd; qemu-system-common: qemu-storage-daemon;
# iproute2 for diagnostics inside agent pods; mount, util-linux, e2fsprogs, xfsprogs: the
# CSI node plugin's losetup, blkid, mount and mkfs.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      qemu-utils qemu-system-common iproute2 python3 python3-venv ca-certificates \
      mount util-linux e2fsprogs xfsprogs \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN python3 -m venv /opt/pairvol \
 && /opt/pairvol/bin/pip install --no-cache-dir /wheels/*.whl \
 && rm -rf /wheels
ENV PATH=/opt/pairvol/bin:$PATH \
    PYTHONUNBUFFERED=1
# No USER here on purpose: agents write replica images into hostPath directories that the
# kubelet creates root-owned. The operator Deployment runs as UID 65532 (securityContext).
ENTRYPOINT ["pairvol"]
CMD ["--help"]
