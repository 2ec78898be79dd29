"""The agent's metrics, read as values after real events (not as names: every series
exists at 0 from start-up), and docs/agent.md's list of metrics compared with what a real
agent exports."""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.support.agents import agents, pair
from tests.support.promtext import value

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


def documented_metrics() -> dict[str, set[str]]:
    """docs/agent.md, section Metrics: name -> labels besides ``volume``."""
    text = (ROOT / "docs" / "agent.md").read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    assert "all with label `volume`" in section
    return {name: set(filter(None, (labels or "").split(",")))
            for name, labels in re.findall(r"`(pairvol_[a-z_]+)(?:\{([a-z_,]+)\})?`", section)}


def exported_metrics(text: str) -> dict[str, set[str]]:
    """Exposition -> documented spelling (counters with _total, histograms by base name) ->
    labels besides ``volume`` (and a histogram's ``le``)."""
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("pairvol_") or family.name.endswith("_created"):
            continue  # _created: the client library's creation time of a counter/histogram
        name = family.name + "_total" if family.type == "counter" else family.name
        out[name] = {k for s in family.samples for k in s.labels} - {"volume", "le"}
    return out


async def test_docs_list_exactly_the_metrics_a_real_agent_exports(tmp_path: Path) -> None:
    async with agents(tmp_path, 1, size="16Mi") as (a,):
        exported = exported_metrics(await a.metrics())
    documented = documented_metrics()
    assert documented == exported, (
        f"undocumented: {sorted(set(exported) - set(documented))}; "
        f"documented but not exported: {sorted(set(documented) - set(exported))}; "
        f"labels differ: {[(n, documented[n], exported[n]) for n in documented.keys() & exported.keys() if documented[n] != exported[n]]}"  # noqa: E501
    )


async def test_a_full_sync_reports_the_whole_volume_copied(tmp_path: Path) -> None:
    async with pair(tmp_path, size="64Mi") as (primary, _):
        text = await primary.metrics()
    size = 64 * MiB
    assert value(text, "pairvol_sync_progress_ratio", volume="vol") == 1.0
    assert value(text, "pairvol_sync_done_bytes", volume="vol") == size
    assert value(text, "pairvol_sync_total_bytes", volume="vol") == size
    assert value(text, "pairvol_replication_state", volume="vol", state="replicating") == 1
    assert value(text, "pairvol_replication_out_of_sync", volume="vol") == 0


async def test_a_failover_is_counted_once_by_its_trigger_with_its_duration_and_the_new_role(tmp_path: Path) -> None:
    rng = random.Random("metrics")
    async with pair(tmp_path, size="16Mi") as (primary, secondary):
        async with await primary.nbd() as nbd:
            for _ in range(20):
                await nbd.pwrite(rng.randbytes(65536), rng.randrange(0, 15 * MiB, 4096))
        await secondary.checkpoint()
        before = await secondary.metrics()
        primary.kill()
        await primary.wait_exit()
        started = time.time()
        result = await secondary.failover(epoch=3, mode="checkpoint", trigger="automatic")
        ended = time.time()
        after = await secondary.metrics()
    triggers = ("automatic", "manual", "unspecified")
    for mode in ("checkpoint", "latest"):
        for outcome in ("succeeded", "failed"):
            for trigger in triggers:
                assert value(before, "pairvol_failovers_total", volume="vol", mode=mode, result=outcome,
                             trigger=trigger) == 0

    def counted(**labels: str) -> float:
        return value(after, "pairvol_failovers_total", volume="vol", **labels)

    assert counted(mode="checkpoint", result="succeeded", trigger="automatic") == 1
    assert counted(mode="checkpoint", result="succeeded", trigger="manual") == 0  # a planned one does not alert
    assert counted(mode="checkpoint", result="succeeded", trigger="unspecified") == 0
    assert counted(mode="checkpoint", result="failed", trigger="automatic") == 0
    assert counted(mode="latest", result="succeeded", trigger="automatic") == 0
    assert value(after, "pairvol_failover_duration_seconds_count", volume="vol", mode="checkpoint") == 1
    # when it ended: what the alerts compare with time() (a counter's new series cannot say)
    for outcome in ("succeeded", "failed", "not_serving"):
        for trigger in triggers:
            assert value(before, "pairvol_failover_last_timestamp_seconds", volume="vol", result=outcome,
                         trigger=trigger) == 0

    def ended_at(**labels: str) -> float:
        return value(after, "pairvol_failover_last_timestamp_seconds", volume="vol", **labels)

    assert started <= ended_at(result="succeeded", trigger="automatic") <= ended
    assert ended_at(result="succeeded", trigger="manual") == 0
    assert ended_at(result="failed", trigger="automatic") == 0
    observed = value(after, "pairvol_failover_duration_seconds_sum", volume="vol", mode="checkpoint")
    assert abs(observed - result["durationMs"] / 1000) < 0.001, (observed, result["durationMs"])
    assert value(after, "pairvol_agent_role", volume="vol", role="primary") == 1
    assert value(after, "pairvol_agent_role", volume="vol", role="secondary") == 0
    assert value(after, "pairvol_agent_epoch", volume="vol") == 3
    assert value(after, "pairvol_agent_stage", volume="vol", stage="done") == 1
