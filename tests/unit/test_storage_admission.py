"""What the local API server admits of a claim's new size (storage_admission, pure)."""

from __future__ import annotations

from typing import Any

from pairvol.localcluster.storage_admission import FORBIDDEN_RESIZE, resize_problem

EXPANDABLE = {"allowVolumeExpansion": True}


def claim(size: str, phase: str = "Bound") -> dict[str, Any]:
    return {"spec": {"resources": {"requests": {"storage": size}}}, "status": {"phase": phase}}


def test_a_bound_claim_of_an_expandable_class_may_grow() -> None:
    assert resize_problem(claim("1Gi"), claim("2Gi"), EXPANDABLE) is None


def test_the_same_size_spelled_otherwise_is_no_change() -> None:
    assert resize_problem(claim("1Gi", "Pending"), claim("1073741824"), None) is None


def test_a_class_without_allow_volume_expansion_forbids_growing() -> None:
    assert resize_problem(claim("1Gi"), claim("2Gi"), {}) == (403, FORBIDDEN_RESIZE)
    assert resize_problem(claim("1Gi"), claim("2Gi"), {"allowVolumeExpansion": False}) == (403, FORBIDDEN_RESIZE)
    assert resize_problem(claim("1Gi"), claim("2Gi"), None) == (403, FORBIDDEN_RESIZE)


def test_an_unbound_claim_cannot_grow() -> None:
    assert resize_problem(claim("1Gi", "Pending"), claim("2Gi"), EXPANDABLE) == (403, FORBIDDEN_RESIZE)


def test_a_claim_never_shrinks() -> None:
    status, message = resize_problem(claim("2Gi"), claim("1Gi"), EXPANDABLE) or (0, "")
    assert status == 422 and "can not be less than previous value" in message
