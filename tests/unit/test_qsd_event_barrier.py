"""Qsd.event_barrier against the event pump alone (no daemon): H13's count drops only
after the handlers have seen every event queued before the barrier."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import EventListener
from qemu.qmp.message import Message

from pairvol.aio import bounded
from pairvol.qemu.qsd import Qsd


def pumped(tmp_path: Path) -> tuple[Qsd, list[str], asyncio.Task[None]]:
    qsd = Qsd(tmp_path, tmp_path / "qsd.log")
    qsd._listener = EventListener()
    seen: list[str] = []

    async def record(event: dict[str, Any]) -> None:
        seen.append(event["event"])

    qsd.on_event(record)
    return qsd, seen, asyncio.create_task(qsd._pump_events(qsd._listener))


def event(name: str) -> Message:
    return Message({"event": name, "data": {"node-name": "disk"}})


async def test_a_barrier_passes_only_after_the_events_queued_before_it(tmp_path: Path) -> None:
    qsd, seen, pump = pumped(tmp_path)
    assert qsd._listener is not None
    await qsd._listener.put(event("QUORUM_REPORT_BAD"))
    await bounded(qsd.event_barrier(), 1)
    assert seen == ["QUORUM_REPORT_BAD"]
    pump.cancel()


async def test_a_barrier_given_up_does_not_answer_the_next_one_early(tmp_path: Path) -> None:
    qsd, seen, pump = pumped(tmp_path)
    assert qsd._listener is not None
    go_on = asyncio.Event()

    async def slow(_: dict[str, Any]) -> None:
        await go_on.wait()

    qsd._handlers.insert(0, slow)
    await qsd._listener.put(event("FIRST"))
    with pytest.raises(TimeoutError):
        await bounded(qsd.event_barrier(), 0.05)
    await qsd._listener.put(event("SECOND"))
    second = asyncio.create_task(qsd.event_barrier())
    third = asyncio.create_task(qsd.event_barrier())
    await asyncio.sleep(0.05)
    assert not second.done() and not third.done()  # FIRST's handler still runs
    go_on.set()
    await bounded(asyncio.gather(second, third), 1)
    assert seen == ["FIRST", "SECOND"]
    pump.cancel()
