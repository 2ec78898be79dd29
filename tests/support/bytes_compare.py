"""Comparing whole disk images in tests.

``assert a == b`` on two images of many MiB makes pytest compute a textual diff of them when
they differ, which takes minutes (a mismatch once looked like a hang in CI); this says where
they differ instead."""

from __future__ import annotations

BLOCK = 4096


def assert_same_image(actual: bytes, expected: bytes, what: str = "image") -> None:
    if actual == expected:
        return
    if len(actual) != len(expected):
        raise AssertionError(f"{what}: {len(actual)} bytes, expected {len(expected)}")
    differing = [
        off for off in range(0, len(actual), BLOCK) if actual[off : off + BLOCK] != expected[off : off + BLOCK]
    ]
    first = differing[0]
    raise AssertionError(
        f"{what}: {len(differing)} of {len(actual) // BLOCK} 4 KiB blocks differ, the first at offset {first} "
        f"(got {actual[first:first + 8].hex()}..., expected {expected[first:first + 8].hex()}...)"
    )
