"""The Controller service: a CSI volume is a ReplicatedVolume in one namespace.

CreateVolume creates the ReplicatedVolume named after the request (the external
provisioner's ``pvc-<uid>``), labelled as the driver's, and answers once the operator
reports it ``Replicating``; until then it answers ABORTED with the volume's phase, and the
provisioner retries the same call (idempotent by name: an existing volume that answers the
same request is that volume; one that does not is ALREADY_EXISTS). DeleteVolume deletes
the ReplicatedVolume (its ``reclaimPolicy`` decides whether the images go too) and
refuses volumes the driver did not create. The driver does not attach volumes to nodes
(no ControllerPublish): any node may stage a volume, its export is reachable from all.

Topology: the nodes report ``topology.pairvol.io/node`` (so the plugin advertises
VOLUME_ACCESSIBILITY_CONSTRAINTS), but a volume is accessible from every node, so a created
volume names no accessible topology (the CO may schedule its pods anywhere). The first
preferred topology, as the spec asks, is where the volume goes first: its node becomes the
ReplicatedVolume's ``preferredPrimaryNode`` (for a WaitForFirstConsumer claim the node its
pod was scheduled to, so the pod's I/O reaches a primary on its own node). The accessibility
requirements place the replicas only when the StorageClass asks for it
(``replicasFollowTopology``, params.volume_request). A repeated CreateVolume whose
preference differs is still the same volume (a preference is not a property of it).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Mapping
from itertools import repeat
from typing import Any

import grpc

from pairvol.api.quantity import QuantityError, parse_bytes
from pairvol.csi.params import (
    ANNOTATION_CSI_NAME,
    MANAGED_BY,
    MANAGED_BY_CSI,
    CapacityError,
    ParameterError,
    capability_problem,
    fits,
    parse_volume_id,
    same_request,
    size_problem,
    topology_nodes,
    volume_context,
    volume_id,
    volume_request,
    volume_size,
)
from pairvol.csi.proto import messages
from pairvol.csi.server import CsiError, Handler, invalid, require
from pairvol.csi.wire import capability, string_map
from pairvol.kube.client import Conflict, KubeClient, KubeError
from pairvol.kube.paths import volume_path

log = logging.getLogger(__name__)

CREATE_DELETE_VOLUME = 1
EXPAND_VOLUME = 9
READY_PHASE = "Replicating"
POLL_S = 0.25


class ControllerService:
    def __init__(self, kube: KubeClient, namespace: str, ready_wait_s: float = 8.0) -> None:
        self.kube = kube
        self.namespace = namespace
        self.ready_wait_s = ready_wait_s
        self._locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self.m = messages()

    def handlers(self) -> dict[str, Handler]:
        return {
            "CreateVolume": self.create,
            "DeleteVolume": self.delete,
            "ValidateVolumeCapabilities": self.validate,
            "ControllerGetCapabilities": self.get_capabilities,
            "ControllerExpandVolume": self.expand,
        }

    async def get_capabilities(self, _: Any) -> Any:
        resp = self.m.get("ControllerGetCapabilitiesResponse")()
        resp.capabilities.add().rpc.type = CREATE_DELETE_VOLUME
        resp.capabilities.add().rpc.type = EXPAND_VOLUME
        return resp

    async def create(self, req: Any) -> Any:
        name = require(req.name, "name")
        if not req.volume_capabilities:
            raise invalid("volume_capabilities is required (at least one)")
        for i, msg in enumerate(req.volume_capabilities):
            problem = capability_problem(capability(msg, f"volume_capabilities[{i}]"))
            if problem is not None:
                raise invalid(problem)
        if req.HasField("volume_content_source"):
            raise invalid("volumes cannot be created from a snapshot or another volume (volume_content_source)")
        if req.mutable_parameters:
            raise invalid("mutable_parameters are not supported (the driver has no ModifyVolume)")
        required = int(req.capacity_range.required_bytes)
        limit = int(req.capacity_range.limit_bytes)
        try:
            size = volume_size(required, limit)
        except CapacityError as exc:
            raise CsiError(grpc.StatusCode.OUT_OF_RANGE, str(exc)) from exc
        try:
            topology: list[str] = []
            preferred: list[str] = []
            if req.HasField("accessibility_requirements"):
                reqs = req.accessibility_requirements
                preferred = topology_nodes([], [string_map(t.segments) for t in reqs.preferred])
                topology = topology_nodes([string_map(t.segments) for t in reqs.requisite], []) or preferred
            primary = preferred[0] if preferred else ""
            wanted = volume_request(name, size, string_map(req.parameters), topology, primary)
        except ParameterError as exc:
            raise invalid(str(exc)) from exc
        for cap in map(capability, req.volume_capabilities, repeat("volume_capabilities")):
            problem = None if cap.block else size_problem(cap.fs_type or wanted.fs_type, size)
            if problem is not None:
                raise CsiError(grpc.StatusCode.OUT_OF_RANGE, problem)

        async with self._locks[name]:
            path = volume_path(self.namespace, name)
            existing = await self.kube.get_or_none(path)
            if existing is None:
                body = {
                    "apiVersion": "pairvol.io/v1alpha1",
                    "kind": "ReplicatedVolume",
                    "metadata": {
                        "name": name,
                        "namespace": self.namespace,
                        "labels": dict(wanted.labels),
                        "annotations": {ANNOTATION_CSI_NAME: name},
                    },
                    "spec": dict(wanted.spec),
                }
                try:
                    existing = await self.kube.create(volume_path(self.namespace), body)
                    log.info("created ReplicatedVolume %s/%s (%d bytes)", self.namespace, name, size)
                except Conflict:
                    existing = await self.kube.get(path)
                except KubeError as exc:
                    if exc.status in (400, 422):
                        raise invalid(f"the API server refused the volume: {exc}") from exc
                    raise CsiError(grpc.StatusCode.UNAVAILABLE, f"cannot create the volume: {exc}") from exc
            actual = self._compatible(existing, name, wanted.spec, required, limit)
            phase = await self._wait_ready(path, existing)
        if phase != READY_PHASE:
            raise CsiError(
                grpc.StatusCode.ABORTED,
                f"volume {self.namespace}/{name} is being created (phase {phase or 'Pending'}); it is ready "
                f"when its phase is {READY_PHASE} — retry",
            )
        resp = self.m.get("CreateVolumeResponse")()
        resp.volume.capacity_bytes = actual
        resp.volume.volume_id = volume_id(self.namespace, name)
        mode = str(wanted.spec["failover"]["mode"])
        resp.volume.volume_context.update(volume_context(self.namespace, name, wanted.fs_type, mode))
        return resp

    def _compatible(
        self, existing: Mapping[str, Any], name: str, spec: Mapping[str, Any], required: int, limit: int
    ) -> int:
        """The existing volume's size if it answers the request; ALREADY_EXISTS if not."""
        where = f"ReplicatedVolume {self.namespace}/{name}"
        labels = existing.get("metadata", {}).get("labels") or {}
        if labels.get(MANAGED_BY) != MANAGED_BY_CSI:
            raise CsiError(grpc.StatusCode.ALREADY_EXISTS, f"{where} exists and was not created by this driver")
        have = existing.get("spec") or {}
        try:
            size = parse_bytes(have.get("size"))
        except QuantityError as exc:
            raise CsiError(grpc.StatusCode.ALREADY_EXISTS, f"{where} has an unreadable size: {exc}") from exc
        problems = same_request(have, spec)
        if not fits(size, required, limit):
            problems.append(f"its size {size} bytes is outside the capacity range [{required}, {limit or 'none'}]")
        if problems:
            raise CsiError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"{where} exists but does not match this request: {'; '.join(problems)}",
            )
        return size

    async def _wait_ready(self, path: str, volume: dict[str, Any]) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_wait_s
        while True:
            phase = str((volume.get("status") or {}).get("phase") or "")
            if phase == READY_PHASE or loop.time() >= deadline:
                return phase
            await asyncio.sleep(POLL_S)
            try:
                volume = await self.kube.get(path)
            except KubeError as exc:
                raise CsiError(grpc.StatusCode.UNAVAILABLE, f"cannot read the volume: {exc}") from exc

    async def delete(self, req: Any) -> Any:
        vid = require(req.volume_id, "volume_id")
        parsed = parse_volume_id(vid)
        if parsed is not None:
            namespace, name = parsed
            async with self._locks[name]:
                path = volume_path(namespace, name)
                try:
                    existing = await self.kube.get_or_none(path)
                    if existing is not None:
                        labels = existing.get("metadata", {}).get("labels") or {}
                        if labels.get(MANAGED_BY) != MANAGED_BY_CSI:
                            raise CsiError(
                                grpc.StatusCode.FAILED_PRECONDITION,
                                f"ReplicatedVolume {vid} was not created by this driver; it is not deleted",
                            )
                        await self.kube.delete(path)
                        log.info("deleted ReplicatedVolume %s", vid)
                except KubeError as exc:
                    raise CsiError(grpc.StatusCode.UNAVAILABLE, f"cannot delete the volume: {exc}") from exc
        return self.m.get("DeleteVolumeResponse")()

    async def validate(self, req: Any) -> Any:
        vid = require(req.volume_id, "volume_id")
        if not req.volume_capabilities:
            raise invalid("volume_capabilities is required (at least one)")
        caps = [capability(msg, f"volume_capabilities[{i}]") for i, msg in enumerate(req.volume_capabilities)]
        parsed = parse_volume_id(vid)
        existing = None
        if parsed is not None:
            try:
                existing = await self.kube.get_or_none(volume_path(*parsed))
            except KubeError as exc:
                raise CsiError(grpc.StatusCode.UNAVAILABLE, f"cannot read the volume: {exc}") from exc
        if existing is None:
            raise CsiError(grpc.StatusCode.NOT_FOUND, f"volume {vid} does not exist")
        resp = self.m.get("ValidateVolumeCapabilitiesResponse")()
        problems = [p for p in map(capability_problem, caps) if p is not None]
        if problems:
            resp.message = "; ".join(problems)
            return resp
        resp.confirmed.volume_context.update(string_map(req.volume_context))
        resp.confirmed.volume_capabilities.extend(req.volume_capabilities)
        resp.confirmed.parameters.update(string_map(req.parameters))
        return resp

    # ---------------------------------------------------------------- expansion

    async def expand(self, req: Any) -> Any:
        """ControllerExpandVolume: grow the ReplicatedVolume's spec.size (rounded as at
        CreateVolume) and answer once both replicas report the new size (status.size) and
        the pair replicates again; until then ABORTED, and the resizer retries the same call.
        A volume already at least that large is a success without a change (never shrinks).
        Node expansion is always required: the node's attachment learns the size only then."""
        vid = require(req.volume_id, "volume_id")
        if not req.HasField("capacity_range"):
            raise invalid("capacity_range is required")
        required, limit = int(req.capacity_range.required_bytes), int(req.capacity_range.limit_bytes)
        try:
            wanted = volume_size(required, limit)
        except CapacityError as exc:
            raise CsiError(grpc.StatusCode.OUT_OF_RANGE, str(exc)) from exc
        if req.HasField("volume_capability"):
            capability(req.volume_capability, "volume_capability")  # well-formed, if given
        parsed = parse_volume_id(vid)
        if parsed is None:
            raise CsiError(grpc.StatusCode.NOT_FOUND, f"volume {vid} does not exist (not a pairvol volume ID)")
        namespace, name = parsed
        path = volume_path(namespace, name)
        async with self._locks[name]:
            volume = await self._get_volume(path, vid)
            labels = volume.get("metadata", {}).get("labels") or {}
            if labels.get(MANAGED_BY) != MANAGED_BY_CSI:
                raise CsiError(
                    grpc.StatusCode.FAILED_PRECONDITION, f"ReplicatedVolume {vid} was not created by this driver"
                )
            try:
                current = parse_bytes((volume.get("spec") or {}).get("size"))
            except QuantityError as exc:
                raise CsiError(grpc.StatusCode.FAILED_PRECONDITION, f"{vid} has an unreadable size: {exc}") from exc
            if limit and current > limit:
                raise CsiError(
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"volume {vid} is {current} bytes already, more than limit_bytes {limit}: volumes never shrink",
                )
            target = max(current, wanted)
            if target > current:
                try:
                    volume = await self.kube.merge_patch(path, {"spec": {"size": str(target)}})
                except KubeError as exc:
                    if exc.status in (400, 422):
                        raise invalid(f"the API server refused the new size: {exc}") from exc
                    raise CsiError(grpc.StatusCode.UNAVAILABLE, f"cannot grow the volume: {exc}") from exc
                log.info("growing ReplicatedVolume %s from %d to %d bytes", vid, current, target)
            have = await self._wait_grown(path, volume, target)
        if have < target:
            raise CsiError(
                grpc.StatusCode.ABORTED,
                f"volume {vid} is growing to {target} bytes (its replicas are not both at that size and "
                "replicating yet); retry",
            )
        resp = self.m.get("ControllerExpandVolumeResponse")()
        resp.capacity_bytes = have
        # the node's attachment (NBD client, FUSE export, loop device) must take the new size
        # for a Block volume too, and a file system grows on top of it
        resp.node_expansion_required = True
        return resp

    async def _get_volume(self, path: str, vid: str) -> dict[str, Any]:
        try:
            volume = await self.kube.get_or_none(path)
        except KubeError as exc:
            raise CsiError(grpc.StatusCode.UNAVAILABLE, f"cannot read the volume: {exc}") from exc
        if volume is None:
            raise CsiError(grpc.StatusCode.NOT_FOUND, f"volume {vid} does not exist")
        return volume

    async def _wait_grown(self, path: str, volume: dict[str, Any], target: int) -> int:
        """The size both replicas have once they replicate again, waiting up to the ready
        wait; less than ``target`` if the grow is not finished by then."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_wait_s
        while True:
            status = volume.get("status") or {}
            raw = status.get("size")
            have = raw if isinstance(raw, int) and status.get("phase") == READY_PHASE else 0
            if have >= target or loop.time() >= deadline:
                return have
            await asyncio.sleep(POLL_S)
            try:
                volume = await self.kube.get(path)
            except KubeError as exc:
                raise CsiError(grpc.StatusCode.UNAVAILABLE, f"cannot read the volume: {exc}") from exc
