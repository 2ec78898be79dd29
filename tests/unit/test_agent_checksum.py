"""Checksum resync: when a comparison replaces a full copy (pairvol.agent.resync, pure), and
the digests, spans and runs it is made of (pairvol.agent.checksum)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from pairvol.agent import checksum as cs
from pairvol.agent import resync as rs
from pairvol.agent import validate as v

X = "a" * 32
Y = "b" * 32
SIZE = 64 << 20
NO_RECORD = rs.Record(None, False, False, None)
TRACKED = rs.Record(X, True, True, None)


def plan_for(peer_disk: str | None, record: rs.Record, peer: rs.PeerView, requested: str = "auto") -> rs.SyncPlan:
    """What the primary does: the record first, the peer asked only when the record gives no answer."""
    plan = rs.choose(requested, peer_disk, record)
    if rs.needs_peer_view(requested, plan):
        plan = rs.refine(plan, peer, SIZE)
    return plan


def test_a_disk_of_unknown_history_at_the_volumes_size_is_compared_not_copied() -> None:
    plan = plan_for(X, NO_RECORD, rs.PeerView(X, SIZE))
    assert (plan.kind, plan.peer_disk) == (rs.CHECKSUM, X)
    assert "unknown" in plan.reason and "new pairing" in plan.reason  # why there was no record


def test_a_disk_with_data_or_an_unknown_amount_of_it_is_compared() -> None:
    assert plan_for(X, NO_RECORD, rs.PeerView(X, SIZE, written=rs.BLANK_LIMIT + 4096)).kind == rs.CHECKSUM
    assert plan_for(X, NO_RECORD, rs.PeerView(X, SIZE, written=None)).kind == rs.CHECKSUM  # tmpfs: no extent map


def test_a_new_disk_reports_only_the_block_qemu_writes_when_it_creates_it(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", "-o", "preallocation=falloc", str(path), "8M"], check=True)
    fresh = cs.written_bytes(path)
    with path.open("r+b") as f:
        f.seek(4 << 20)
        f.write(b"x" * (1 << 20))
    written = cs.written_bytes(path)  # the dirty pages are written back first
    if fresh is None:  # a file system without an extent map (tmpfs) never claims to know
        assert written is None
        return
    assert fresh <= rs.BLANK_LIMIT
    assert written is not None and written >= fresh + (1 << 20)


def test_another_disk_than_the_recorded_one_is_compared() -> None:
    plan = plan_for(Y, TRACKED, rs.PeerView(Y, SIZE))
    assert (plan.kind, plan.peer_disk) == (rs.CHECKSUM, Y)
    assert X in plan.reason and Y in plan.reason


def test_a_matching_record_needs_no_comparison() -> None:
    assert not rs.needs_peer_view("auto", rs.choose("auto", X, TRACKED))
    assert plan_for(X, TRACKED, rs.PeerView(None, None, "never asked")).kind == rs.BITMAP


@pytest.mark.parametrize(
    ("peer", "why"),
    [
        (rs.PeerView(None, None, "connection refused"), "could not be asked for checksums (connection refused)"),
        (rs.PeerView(Y, SIZE), f"the peer's disk is {Y}, not {X}"),
        (rs.PeerView(X, SIZE // 2), "a size change"),
        (rs.PeerView(X, SIZE, written=4096), "blank (4096 bytes ever written)"),
    ],
)
def test_a_peer_that_cannot_vouch_for_a_comparable_disk_gets_a_full_copy_and_the_reason(
    peer: rs.PeerView, why: str
) -> None:
    plan = plan_for(X, NO_RECORD, peer)
    assert plan.kind == rs.FULL and why in plan.reason, plan
    assert "new pairing" in plan.reason  # the first reason is kept


def test_explicit_requests_and_an_unnamed_disk_are_never_compared() -> None:
    assert not rs.needs_peer_view("full", rs.choose("full", X, NO_RECORD))
    assert not rs.needs_peer_view("none", rs.choose("none", X, NO_RECORD))
    assert not rs.needs_peer_view("auto", rs.choose("auto", None, NO_RECORD))  # no identity: nothing binds the copy


def test_the_digests_are_blake2b_of_each_region_and_the_last_region_may_be_short(tmp_path: Path) -> None:
    size = 3 * cs.REGION + 4096
    data = bytes(range(256)) * (size // 256)
    path = tmp_path / "disk.raw"
    path.write_bytes(data)
    got = cs.digest_span(path, size, cs.REGION, size - cs.REGION)
    want = b"".join(
        hashlib.blake2b(data[off:off + cs.REGION], digest_size=16).digest() for off in range(cs.REGION, size, cs.REGION)
    )
    assert got == want and len(got) == 3 * 16


def _read_digests(path: Path, offset: int, length: int) -> bytes:
    """What the digests are by definition: BLAKE2b-128 of each region's bytes as read."""
    data = path.read_bytes()[offset:offset + length]
    return b"".join(
        hashlib.blake2b(data[off:off + cs.REGION], digest_size=16).digest() for off in range(0, len(data), cs.REGION)
    )


def _read_chars() -> int:
    """Bytes this thread has read so far (``rchar`` of /proc/thread-self/io)."""
    text = Path("/proc/thread-self/io").read_text()
    return int(next(line for line in text.splitlines() if line.startswith("rchar:")).split()[1])


def _one_region_disk(tmp_path: Path) -> tuple[Path, int]:
    """A sparse span-sized disk holding data in one region only; (its path, its size)."""
    path = tmp_path / "disk.raw"
    with path.open("wb") as f:
        f.truncate(cs.SPAN)
        f.seek(7 * cs.REGION)
        f.write(b"\x05" * cs.REGION)
    return path, cs.SPAN


def _sparse_disk(path: Path, size: int, layout: str = "sparse") -> None:
    """A disk with holes (``sparse``: truncated; ``falloc``: preallocated, as the agent
    creates disks — unwritten extents), whole regions of data, a region of written zeros,
    one byte at a region's end, data across a read chunk's boundary and in the short last
    region."""
    with path.open("wb") as f:
        f.truncate(size)
        if layout == "falloc":
            os.posix_fallocate(f.fileno(), 0, size)
        for offset, data in (
            (0, b"\x01" * cs.REGION),
            (5 * cs.REGION, bytes(cs.REGION)),  # data extent that holds zeros
            (9 * cs.REGION - 1, b"\x02"),
            (cs.READ_CHUNK - 4096, b"\x03" * 8192),
            (size - 100, b"\x04" * 100),
        ):
            f.seek(offset)
            f.write(data)


@pytest.mark.parametrize("layout", ["sparse", "falloc"])
@pytest.mark.parametrize("where", ["disk", "tmpfs"])
def test_holes_are_digested_as_the_zeros_they_read_as(tmp_path: Path, where: str, layout: str) -> None:
    base = tmp_path if where == "disk" else Path("/dev/shm")  # tmpfs keeps holes in its page cache
    path = base / f"pairvol-sparse-{os.getpid()}.raw"
    size = 2 * cs.READ_CHUNK + 3 * cs.REGION + 4096
    try:
        _sparse_disk(path, size, layout)
        with path.open("rb") as f:
            assert cs.holes_trusted(f.fileno()), "the suite's ext4 and tmpfs are where holes are looked up"
        for offset in range(0, size, cs.READ_CHUNK):
            length = min(cs.READ_CHUNK, size - offset)
            assert cs.digest_span(path, size, offset, length) == _read_digests(path, offset, length)
    finally:
        path.unlink(missing_ok=True)


def test_holes_are_looked_up_only_on_file_systems_known_to_count_dirty_pages_as_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # FUSE answers SEEK_DATA without writing dirty pages back (a completed write looks like a
    # hole), ZFS has reported holes over fresh data: there every region is read
    with open("/proc/self/status", "rb") as f:
        assert not cs.holes_trusted(f.fileno())
    path, size = _one_region_disk(tmp_path)
    monkeypatch.setattr(cs, "holes_trusted", lambda fd: False)
    before = _read_chars()
    got = cs.digest_span(path, size, 0, size)
    read = _read_chars() - before
    assert got == _read_digests(path, 0, size)
    assert read >= size, f"read {read} bytes of a {size}-byte span"


def test_a_file_system_without_seek_data_is_all_data() -> None:
    with open("/proc/self/status", "rb") as f:  # procfs answers SEEK_DATA with EINVAL
        assert cs.data_ranges(f.fileno(), 0, 100) == [(0, 100)]


def test_a_fragmented_disk_is_read_where_the_lookup_of_its_holes_stops(tmp_path: Path) -> None:
    # one byte in every other 4 KiB block: more data ranges per read chunk than are looked up
    path = tmp_path / "disk.raw"
    size = cs.READ_CHUNK
    with path.open("wb") as f:
        f.truncate(size)
        for block in range(0, size // 4096, 2):
            f.seek(block * 4096 + block % 4096)
            f.write(b"\x09")
    with path.open("rb") as f:
        assert len(cs.data_ranges(f.fileno(), 0, size)) == cs.MAX_RANGES + 1
    assert cs.digest_span(path, size, 0, size) == _read_digests(path, 0, size)


@pytest.mark.parametrize("layout", ["sparse", "falloc"])
def test_writes_not_yet_written_back_are_in_the_digests_of_a_sparse_disk(tmp_path: Path, layout: str) -> None:
    # the daemon writes through the page cache: a hole that was just written is data
    path = tmp_path / "disk.raw"
    size = cs.READ_CHUNK
    with path.open("wb") as f:
        f.truncate(size)
        if layout == "falloc":
            os.posix_fallocate(f.fileno(), 0, size)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\x07" * 512, 3 * cs.REGION + 512)  # no fsync
        got = cs.digest_span(path, size, 0, size)
    finally:
        os.close(fd)
    assert got[3 * 16:4 * 16] != cs.zero_digest(cs.REGION)
    assert got == _read_digests(path, 0, size)


def test_the_holes_of_a_sparse_disk_are_not_read(tmp_path: Path) -> None:
    path, size = _one_region_disk(tmp_path)
    before = _read_chars()
    got = cs.digest_span(path, size, 0, size)
    read = _read_chars() - before
    assert got == _read_digests(path, 0, size)
    # only the region that holds data is read (and this thread's io file)
    assert read <= cs.REGION + 4096, f"read {read} bytes of a {size}-byte span holding one {cs.REGION}-byte region"


def test_a_file_shorter_than_the_volume_is_an_error_not_a_short_answer(tmp_path: Path) -> None:
    path = tmp_path / "disk.raw"
    path.write_bytes(b"\0" * cs.REGION)
    with pytest.raises(cs.ChecksumError, match="ends at"):
        cs.digest_span(path, 2 * cs.REGION, 0, 2 * cs.REGION)


@pytest.mark.parametrize(
    ("offset", "length", "says"),
    [
        (4096, cs.REGION, "multiple of the region size"),
        (0, cs.SPAN + cs.REGION, "at most"),
        (SIZE - cs.REGION, 2 * cs.REGION, "beyond the volume"),
        (0, 4096, "does not end the volume"),
    ],
)
def test_spans_start_on_a_region_and_stay_inside_the_volume(offset: int, length: int, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        cs.check_span(SIZE, offset, length)


def test_the_spans_cover_the_volume_once() -> None:
    size = 2 * cs.SPAN + 3 * cs.REGION + 512
    spans = cs.spans(size)
    assert spans[0] == (0, cs.SPAN) and sum(n for _, n in spans) == size
    for off, n in spans:
        cs.check_span(size, off, n)


def test_differing_regions_are_found_by_their_index_in_the_volume() -> None:
    mine = b"".join(bytes([i]) * 16 for i in range(4))
    theirs = bytearray(mine)
    theirs[16:32] = b"\xff" * 16
    theirs[63] ^= 1
    assert cs.differing(10 * cs.REGION, mine, bytes(theirs)) == [11, 13]
    with pytest.raises(cs.ChecksumError, match="same regions"):
        cs.differing(0, mine, mine[:16])


def test_neighbouring_regions_become_one_run_and_the_last_ends_with_the_volume() -> None:
    size = 10 * cs.REGION + 512
    r = cs.REGION
    assert cs.runs([7, 1, 2, 3, 10], size) == [(r, 3 * r), (7 * r, r), (10 * r, 512)]
    assert cs.runs([], size) == []


def test_a_digest_request_names_a_disk_identity_and_a_byte_range() -> None:
    assert v.parse_digest_request({"disk": X, "offset": 5, "length": 6}) == (X, 5, 6)
    assert v.parse_digest_request({"disk": X}) == (X, 0, 0)
    for body, says in [
        ({"disk": "../disk.raw"}, "32 lowercase hex"),
        ({"disk": X, "offset": True}, "integer >= 0"),
        ({"disk": X, "length": 1.5}, "integer >= 0"),
    ]:
        with pytest.raises(v.InvalidInput, match=says):
            v.parse_digest_request(body)
    assert v.parse_peer_api({"peerApi": "[::1]:7800"}) == "[::1]:7800"
    with pytest.raises(v.InvalidInput, match="peerApi"):
        v.parse_peer_api({"peerApi": "http://host:7800/"})
