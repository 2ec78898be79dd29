"""The fault injector's reads of a primary's export are bounded (tests/chaos/cluster.py).

The controller reads the whole export after every failover and restart and at the end of a
run, holding its lock. A daemon whose main loop hangs still accepts the connection (the
kernel queues it) and then answers nothing; an unbounded read there hangs the whole run
until the test runner's own timeout kills it, with nothing said about why. The read must
instead fail within its bound, saying so, so that the run reports a violation.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.chaos.blocks import BLOCK
from tests.chaos.cluster import read_slots
from tests.chaos.history import History
from tests.support.agents import agents

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="agents run as their pod does: needs root")


async def test_a_read_of_a_frozen_daemons_export_fails_within_its_bound(tmp_path: Path) -> None:
    hist = History(run=1, lanes=4, slots=64)
    async with agents(tmp_path, 1, size="8Mi") as (a,):
        await a.primary(1, None)
        image = await read_slots(a.export_socket, hist, bound=30.0)
        assert len(image) == hist.slots * BLOCK  # a serving daemon answers the whole read

        qsd_pid = int((await a.status())["qsd"]["pid"])
        os.kill(qsd_pid, signal.SIGSTOP)  # alive, accepting (the kernel does), answering nothing
        try:
            with pytest.raises(TimeoutError, match=f"did not answer a read of its {hist.slots} slots within 1 s"):
                await read_slots(a.export_socket, hist, bound=1.0)
        finally:
            os.kill(qsd_pid, signal.SIGCONT)
