"""Label values that the agents' and the operator's metrics share are spelt the same way.

An alert or a dashboard panel that selects ``mode="checkpoint"`` must see the failovers
counted by the agents and by the operator alike (docs/alerts.md).
"""

from __future__ import annotations

from prometheus_client import generate_latest
from tests.support.promtext import samples

from pairvol.agent.metrics import AgentMetrics
from pairvol.agent.stages import FailoverMode
from pairvol.api.spec import FAILOVER_MODES
from pairvol.operator.decisions import failover_trigger
from pairvol.operator.metrics import MODE_LABELS, OperatorMetrics


def mode_values(text: str, name: str) -> set[str]:
    return {dict(labels)["mode"] for n, labels in samples(text) if n == name}


def test_the_failover_mode_label_has_the_same_values_in_agent_and_operator_metrics() -> None:
    agent, operator = AgentMetrics("vol"), OperatorMetrics()
    for spec_mode in FAILOVER_MODES:  # the operator is handed the spec's spelling
        operator.failover_done(spec_mode, "automatic", 1.0)
    agent_text = generate_latest(agent.registry).decode()
    operator_text = generate_latest(operator.registry).decode()
    agent_modes = mode_values(agent_text, "pairvol_failovers_total")
    assert agent_modes == {m.value for m in FailoverMode} == set(MODE_LABELS)
    assert mode_values(operator_text, "pairvol_operator_failovers_total") == agent_modes
    assert mode_values(operator_text, "pairvol_operator_failover_duration_seconds_count") == agent_modes
    assert mode_values(agent_text, "pairvol_failover_duration_seconds_count") == agent_modes


def test_every_trigger_the_operator_counts_is_one_the_agents_count_and_their_alert_excludes() -> None:
    agent, operator = AgentMetrics("vol"), OperatorMetrics()
    agent_text = generate_latest(agent.registry).decode()
    operator_text = generate_latest(operator.registry).decode()

    def triggers(text: str, name: str) -> set[str]:
        return {dict(labels)["trigger"] for n, labels in samples(text) if n == name}

    agent_triggers = triggers(agent_text, "pairvol_failovers_total")
    assert triggers(agent_text, "pairvol_failover_last_timestamp_seconds") == agent_triggers
    assert triggers(operator_text, "pairvol_operator_failovers_total") == {"automatic", "manual"} < agent_triggers
    assert {failover_trigger("manual"), failover_trigger("node n1 is NotReady")} == {"manual", "automatic"}
