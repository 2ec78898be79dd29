"""The checker can fail: each invariant is fed a history and an image that break it, and
one that keeps it (pure; no agents)."""

from __future__ import annotations

from tests.chaos import blocks
from tests.chaos.blocks import BLOCK
from tests.chaos.checker import check_checkpoint, check_identical, check_latest, check_one_primary, check_stalls
from tests.chaos.history import Cut, History, Write

RUN = 7


def history() -> History:
    """Two lanes over eight slots; lane 0 writes slots 0,2,4,6 and lane 1 slots 1,3,5,7.
    Lane 0: seq 1..6 at t = 1..6 (each acked 0.1 s later); lane 1: seq 1..3 at t = 1.5, 2.5, 3.5."""
    h = History(run=RUN, lanes=2, slots=8)
    for seq, slot in enumerate([0, 2, 4, 0, 6, 2], start=1):
        h.writes.append(Write(0, seq, slot, 0, "r0", 0, issued=float(seq), acked=seq + 0.1))
    for seq, slot in enumerate([1, 3, 1], start=1):
        h.writes.append(Write(1, seq, slot, 0, "r0", 0, issued=seq + 0.5, acked=seq + 0.6))
    return h


def image(h: History, upto: dict[int, int]) -> bytearray:
    """The image of a prefix cut: lane -> last seq included."""
    img = bytearray(h.slots * BLOCK)
    for w in sorted(h.writes, key=lambda w: w.seq):
        if w.seq <= upto.get(w.lane, 0):
            img[w.slot * BLOCK : (w.slot + 1) * BLOCK] = blocks.make(RUN, w.lane, w.seq, w.slot)
    return img


def test_the_latest_state_passes() -> None:
    h = history()
    assert check_latest(bytes(image(h, {0: 6, 1: 3})), h, at=10, what="img") == []


def test_a_lost_acknowledged_write_is_reported() -> None:
    h = history()
    img = image(h, {0: 6, 1: 3})
    img[2 * BLOCK : 3 * BLOCK] = blocks.make(RUN, 0, 2, 2)  # slot 2 back at seq 2: seq 6 lost
    vs = check_latest(bytes(img), h, at=10, what="img")
    assert len(vs) == 1 and vs[0].invariant == "latest"
    assert "slot 2 holds write seq 2" in vs[0].detail and "seq 6" in vs[0].detail


def test_an_all_zero_image_is_not_the_latest_state() -> None:
    h = history()
    vs = check_latest(bytes(h.slots * BLOCK), h, at=10, what="img")
    assert vs and all(v.invariant == "latest" for v in vs)


def test_a_corrupted_block_is_reported() -> None:
    h = history()
    img = image(h, {0: 6, 1: 3})
    img[3 * BLOCK + 100] ^= 0xFF
    vs = check_latest(bytes(img), h, at=10, what="img")
    assert any("slot 3" in v.detail and "torn" in v.detail for v in vs)


def test_an_unacknowledged_write_may_or_may_not_be_there() -> None:
    h = history()
    h.writes.append(Write(1, 4, 3, 0, "r0", 0, issued=4.5, acked=None, error="connection lost"))
    assert check_latest(bytes(image(h, {0: 6, 1: 3})), h, at=10, what="without") == []
    assert check_latest(bytes(image(h, {0: 6, 1: 4})), h, at=10, what="with") == []


def test_a_checkpoint_image_equal_to_the_cut_passes() -> None:
    h = history()
    cut = Cut("r1", 1, start=3.2, end=3.3, how="checkpoint")  # lane 0 at seq 3, lane 1 at seq 2
    vs, note = check_checkpoint(bytes(image(h, {0: 3, 1: 2})), h, cut, "img")
    assert vs == [] and note is None


def test_a_mix_of_two_checkpoints_is_reported() -> None:
    h = history()
    cut = Cut("r1", 1, start=3.2, end=3.3, how="checkpoint")
    img = image(h, {0: 3, 1: 2})
    later = image(h, {0: 6, 1: 3})
    img[0:BLOCK] = later[0:BLOCK]  # slot 0 from a later cut (seq 4), slots 2/4 from the earlier one
    vs, _ = check_checkpoint(bytes(img), h, cut, "img")
    assert vs and vs[0].invariant == "checkpoint"
    assert "issued after the cut" in vs[0].detail


def test_a_mix_inside_the_window_is_reported() -> None:
    """Slot 0 shows seq 4 (so the cut is at >= 4) but slot 2 lacks nothing and slot 4
    ... a half copied disk: slot 4 is zeros although seq 3 (acked) precedes the cut."""
    h = history()
    cut = Cut("r1", 2, start=4.2, end=4.3, how="restored")
    img = image(h, {0: 4, 1: 3})
    img[4 * BLOCK : 5 * BLOCK] = bytes(BLOCK)
    vs, _ = check_checkpoint(bytes(img), h, cut, "img")
    assert any("slot 4 holds zeros" in v.detail for v in vs)


def test_a_cut_older_than_the_checkpoint_call_is_reported() -> None:
    h = history()
    cut = Cut("r1", 1, start=5.5, end=5.6, how="checkpoint")  # seq 5 of lane 0 acked at 5.1
    vs, _ = check_checkpoint(bytes(image(h, {0: 3, 1: 2})), h, cut, "img")
    assert vs and "must >= 5" in vs[0].detail


def test_a_cut_not_in_sync_is_noted_not_judged() -> None:
    h = history()
    cut = Cut("r1", 1, start=5.5, end=5.6, how="checkpoint", in_sync=False)
    vs, note = check_checkpoint(bytes(image(h, {0: 3, 1: 2})), h, cut, "img")
    assert vs == [] and note is not None and "not in sync" in note


def test_replicas_that_differ_are_reported() -> None:
    h = history()
    a = image(h, {0: 6, 1: 3})
    b = bytearray(a)
    b[5 * BLOCK : 6 * BLOCK] = blocks.make(RUN, 1, 9, 5)
    vs = check_identical(bytes(a), bytes(b), h, "pair")
    assert len(vs) == 1 and "slot 5" in vs[0].detail and "seq 9" in vs[0].detail
    assert check_identical(bytes(a), bytes(a), h, "pair") == []


def test_an_old_primary_acknowledging_after_the_new_one_is_reported() -> None:
    h = history()
    h.writes.append(Write(0, 7, 4, 0, "r1", 1, issued=7.0, acked=7.1))
    assert check_one_primary(h) == []
    h.writes.append(Write(1, 4, 3, 0, "r0", 0, issued=4.5, acked=8.0, abandoned=True))
    vs = check_one_primary(h)
    assert len(vs) == 1 and vs[0].invariant == "one-primary" and "term 1" in vs[0].detail


def test_a_stall_is_reported_unless_excused() -> None:
    h = history()
    h.writes.append(Write(1, 4, 3, 0, "r0", 0, issued=4.5, acked=12.0))
    vs, worst = check_stalls(h, bound=4.0, start=1.0, end=9.0)
    assert len(vs) == 1 and "lane 1" in vs[0].detail and worst > 5
    h.excuse(5.0, 6.0, "primary frozen")
    assert check_stalls(h, bound=4.0, start=1.0, end=9.0)[0] == []


def test_after_a_failover_the_image_is_the_new_baseline() -> None:
    """A checkpoint failover went back to lane 0 seq 3 / lane 1 seq 2; from then on the
    image is what the volume holds, and the writes it lost are neither expected nor allowed."""
    h = history()
    img = image(h, {0: 3, 1: 2})
    seen: dict[int, tuple[int, int] | None] = {}
    for slot in range(h.slots):
        st = blocks.parse(bytes(img[slot * BLOCK : (slot + 1) * BLOCK]), RUN, slot)
        seen[slot] = None if st is None else (st.lane, st.seq)
    assert h.rebase(seen) == 9 - 5
    assert check_latest(bytes(img), h, at=10, what="rebased") == []
    later = image(history(), {0: 6, 1: 3})
    assert check_latest(bytes(later), h, at=10, what="a lost write back") != []
