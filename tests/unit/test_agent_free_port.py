"""Ports for test agents: below the kernel's ephemeral range, never the same one twice in a
process, and, for processes picking side by side (the streams of `make test`), each from a
slice of its own (PAIRVOL_PORT_SLICE=K/N)."""

from __future__ import annotations

import socket

import pytest

from pairvol.agent import procs


@pytest.mark.parametrize("k", [0, 1, 2])
def test_a_stream_picks_only_from_its_own_slice(monkeypatch: pytest.MonkeyPatch, k: int) -> None:
    monkeypatch.setenv("PAIRVOL_PORT_SLICE", f"{k}/3")
    low, _ = procs._ephemeral_range()
    first, end = procs._port_slice(10000, low)
    assert (first, end) == (10000 + k * ((low - 10000) // 3), 10000 + (k + 1) * ((low - 10000) // 3))
    picked = {procs.free_port() for _ in range(50)}
    assert len(picked) == 50, "never twice"
    assert all(first <= port < end for port in picked), sorted(picked)
    for port in picked:  # free when handed out
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


@pytest.mark.parametrize("value", ["", "3/3", "x/2", "1", "-1/2"])
def test_no_valid_slice_means_the_whole_range(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("PAIRVOL_PORT_SLICE", value)
    assert procs._port_slice(10000, 32768) == (10000, 32768)
