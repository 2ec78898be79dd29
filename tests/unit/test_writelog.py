"""The write log's verdicts (tests/support/writelog.py), on hand-made histories: the
checker of crash-consistent cuts must itself be able to say no."""

from __future__ import annotations

import pytest
from tests.support.writelog import BLOCK, Write, WriteLog, record


def log_with(acked_at: float, writes: int = 3) -> WriteLog:
    """Two writers, each wrote slot w then w+2 ... once per second from t=acked_at."""
    log = WriteLog(writers=2, slots=4)
    for w in range(2):
        for seq in range(1, writes + 1):
            slot = log.slots_of(w)[(seq - 1) % 2]
            log.history[w].append(Write(w, seq, slot, issued=acked_at + seq - 1.5, acked=acked_at + seq - 1))
    return log


def image_at(log: WriteLog, k: int) -> bytes:
    """The image a prefix cut at seq k (for every writer) must show."""
    img = bytearray(log.slots * BLOCK)
    for w, hist in enumerate(log.history):
        for e in hist:
            if e.seq <= k:
                img[log.offset(e.slot) : log.offset(e.slot) + BLOCK] = record(w, e.seq, e.slot)
    return bytes(img)


def test_a_correct_cut_passes() -> None:
    log = log_with(acked_at=10.0)
    assert log.check_cut(image_at(log, 2), not_before=11.5, not_after=11.6)["visible"] == 4


def test_an_image_of_zeroes_never_passes() -> None:
    log = log_with(acked_at=10.0)
    with pytest.raises(AssertionError, match="acknowledged before the cut but is missing"):
        log.check_cut(bytes(log.slots * BLOCK), not_before=11.5, not_after=99)


def test_a_cut_before_any_acknowledged_write_proves_nothing_and_fails() -> None:
    log = log_with(acked_at=10.0)
    with pytest.raises(AssertionError, match="had no write acknowledged before the cut"):
        log.check_cut(bytes(log.slots * BLOCK), not_before=5.0, not_after=99)


def test_a_lost_acknowledged_write_and_a_write_from_after_the_cut_are_caught() -> None:
    log = log_with(acked_at=10.0)
    with pytest.raises(AssertionError, match="write 3 was acknowledged before the cut but is missing"):
        log.check_cut(image_at(log, 2), not_before=12.5, not_after=99)
    with pytest.raises(AssertionError, match="issued after the cut"):
        log.check_cut(image_at(log, 3), not_before=10.5, not_after=10.6)


def test_a_torn_block_is_caught() -> None:
    log = log_with(acked_at=10.0)
    img = bytearray(image_at(log, 2))
    img[100] ^= 0xFF
    with pytest.raises(AssertionError, match="torn or foreign"):
        log.check_cut(bytes(img), not_before=11.5, not_after=11.6)
