"""What kube-apiserver admits of a change to a PersistentVolumeClaim's size (pure).

Kubernetes lets a bound claim's ``spec.resources.requests.storage`` grow only when its
StorageClass says ``allowVolumeExpansion: true`` (the PersistentVolumeClaimResize
admission plugin: a 403 otherwise), and never shrink below what it asked before (a 422
from the claim's validation). The local API server applies the same two rules, worded as
upstream words them, so ``kubectl patch pvc`` behaves as on a real cluster.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pairvol.api.quantity import QuantityError, parse_quantity

FORBIDDEN_RESIZE = (
    "only dynamically provisioned pvc can be resized and the storageclass that provisions the pvc must support resize"
)


def requested_storage(claim: Mapping[str, Any]) -> Any:
    raw = (((claim.get("spec") or {}).get("resources") or {}).get("requests") or {}).get("storage")
    if raw is None:
        return None
    try:
        return parse_quantity(str(raw))
    except QuantityError:
        return None  # the schema check reports it


def resize_problem(
    old: Mapping[str, Any], new: Mapping[str, Any], storage_class: Mapping[str, Any] | None
) -> tuple[int, str] | None:
    """(HTTP status, message) when the change of the claim's size is not admitted."""
    before, after = requested_storage(old), requested_storage(new)
    if before is None or after is None or before == after:
        return None
    if after < before:
        return 422, "spec.resources.requests.storage: Forbidden: field can not be less than previous value"
    bound = (old.get("status") or {}).get("phase") == "Bound"
    if not bound or storage_class is None or storage_class.get("allowVolumeExpansion") is not True:
        return 403, FORBIDDEN_RESIZE
    return None
