"""Generated mutants (``make mutate-generated``) that survive because they cannot change
what the code does, each with the reason. Anything else that survives needs a test.

An entry names the mutated function as spelled in the source and the line before and after
the mutation (stripped of indentation, as ``make mutate-generated`` prints them), so it keeps
matching when mutmut renumbers the mutants of an edited function, and goes stale, loudly,
when the line itself changes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Equivalent:
    function: str  # pairvol.agent.stages.check_stop, pairvol.agent.state.Checkpoint.to_api
    before: str  # the original line(s), stripped
    after: str  # the mutated line(s), stripped
    reason: str  # one line: why no caller can tell the difference

    def matches(self, function: str, removed: str, added: str) -> bool:
        return self.function == function and self.before == removed and self.after == added


EQUIVALENT: tuple[Equivalent, ...] = (
    Equivalent(
        'pairvol.agent.state._read_slot',
        'if len(raw) < _SLOT_HEADER.size:',
        'if len(raw) <= _SLOT_HEADER.size:',
        'a slot of exactly a header has an empty body, which save never writes and from_json refuses either way',
    ),
    Equivalent(
        'pairvol.agent.state.load',
        'return max(found, key=lambda slot: slot[0])[1]',
        'return max(found, key=None)[1]',
        'the two slots never share a sequence number, so the tuples order by it alone',
    ),
    Equivalent(
        'pairvol.agent.state.load',
        'return max(found, key=lambda slot: slot[0])[1]',
        'return max(found, )[1]',
        'the two slots never share a sequence number, so the tuples order by it alone',
    ),
    Equivalent(
        'pairvol.agent.state.save',
        'os.pwrite(fd, record.ljust(SLOT_SIZE, b"\\0"), 0)',
        'os.pwrite(fd, record.ljust(SLOT_SIZE, ), 0)',
        "the padding after the record is never read: the header's length bounds the body",
    ),
    Equivalent(
        'pairvol.agent.state.save',
        'dir_fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)',
        'dir_fd = os.open(data_dir, os.O_RDONLY & os.O_DIRECTORY)',
        'O_RDONLY is 0 and data_dir is a directory (the slot was just created in it): O_DIRECTORY only adds a check',
    ),
    Equivalent(
        'pairvol.agent.state.PersistedState.from_json',
        'peer=data.pop("peer", None),',
        'peer=data.pop("peer", ),',
        'only a state without the field differs: to_json writes every field, and format 1 had it from the start',
    ),
    Equivalent(
        'pairvol.agent.state.PersistedState.from_json',
        'out_of_sync=bool(data.pop("out_of_sync", False)),',
        'out_of_sync=bool(data.pop("out_of_sync", None)),',
        'bool(None) is False',
    ),
    Equivalent(
        'pairvol.agent.state.PersistedState.from_json',
        'out_of_sync=bool(data.pop("out_of_sync", False)),',
        'out_of_sync=bool(data.pop("out_of_sync", True)),',
        'only a state without the field differs: to_json writes every field, and format 1 had it from the start',
    ),
    Equivalent(
        'pairvol.agent.state.PersistedState.from_json',
        'out_of_sync=bool(data.pop("out_of_sync", False)),',
        'out_of_sync=bool(data.pop("out_of_sync", )),',
        'only a state without the field differs: to_json writes every field, and format 1 had it from the start',
    ),
    Equivalent(
        'pairvol.agent.state.PersistedState.from_json',
        'clean_shutdown=bool(data.pop("clean_shutdown", False)),',
        'clean_shutdown=bool(data.pop("clean_shutdown", None)),',
        'bool(None) is False',
    ),
    Equivalent(
        'pairvol.agent.state.PersistedState.to_json',
        'return json.dumps(data, indent=2, sort_keys=True)',
        'return json.dumps(data, indent=None, sort_keys=True)',
        'the layout of the JSON text: the only reader (from_json) parses it',
    ),
    Equivalent(
        'pairvol.agent.state.PersistedState.to_json',
        'return json.dumps(data, indent=2, sort_keys=True)',
        'return json.dumps(data, sort_keys=True)',
        'the layout of the JSON text: the only reader (from_json) parses it',
    ),
    Equivalent(
        'pairvol.agent.state.PersistedState.to_json',
        'return json.dumps(data, indent=2, sort_keys=True)',
        'return json.dumps(data, indent=2, )',
        'the layout of the JSON text: the only reader (from_json) parses it',
    ),
    Equivalent(
        'pairvol.agent.state.PersistedState.to_json',
        'return json.dumps(data, indent=2, sort_keys=True)',
        'return json.dumps(data, indent=3, sort_keys=True)',
        'the layout of the JSON text: the only reader (from_json) parses it',
    ),
    Equivalent(
        'pairvol.agent.state.PersistedState.to_json',
        'return json.dumps(data, indent=2, sort_keys=True)',
        'return json.dumps(data, indent=2, sort_keys=False)',
        'the layout of the JSON text: the only reader (from_json) parses it',
    ),
    Equivalent(
        'pairvol.api.spec.parse_spec',
        'automatic = True',
        'automatic = None',
        'assigned only after a problem was recorded: parse_spec then raises, so the value is never used',
    ),
    Equivalent(
        'pairvol.api.spec.parse_spec',
        'automatic = True',
        'automatic = False',
        'assigned only after a problem was recorded: parse_spec then raises, so the value is never used',
    ),
    Equivalent(
        'pairvol.api.spec.parse_spec',
        'mode = "Checkpoint"',
        'mode = None',
        'assigned only after a problem was recorded: parse_spec then raises, so the value is never used',
    ),
    Equivalent(
        'pairvol.api.spec.parse_spec',
        'mode = "Checkpoint"',
        'mode = "XXCheckpointXX"',
        'assigned only after a problem was recorded: parse_spec then raises, so the value is never used',
    ),
    Equivalent(
        'pairvol.api.spec.parse_spec',
        'mode = "Checkpoint"',
        'mode = "checkpoint"',
        'assigned only after a problem was recorded: parse_spec then raises, so the value is never used',
    ),
    Equivalent(
        'pairvol.api.spec.parse_spec',
        'mode = "Checkpoint"',
        'mode = "CHECKPOINT"',
        'assigned only after a problem was recorded: parse_spec then raises, so the value is never used',
    ),
    Equivalent(
        'pairvol.api.spec.parse_spec',
        'host_path = "/var/lib/pairvol"',
        'host_path = "XX/var/lib/pairvolXX"',
        'assigned only after a problem was recorded: parse_spec then raises, so the value is never used',
    ),
    Equivalent(
        'pairvol.api.spec.parse_spec',
        'host_path = "/var/lib/pairvol"',
        'host_path = "/VAR/LIB/PAIRVOL"',
        'assigned only after a problem was recorded: parse_spec then raises, so the value is never used',
    ),
    Equivalent(
        'pairvol.api.spec.parse_spec',
        'reclaim = "Retain"',
        'reclaim = None',
        'assigned only after a problem was recorded: parse_spec then raises, so the value is never used',
    ),
    Equivalent(
        'pairvol.api.spec.parse_spec',
        'reclaim = "Retain"',
        'reclaim = "XXRetainXX"',
        'assigned only after a problem was recorded: parse_spec then raises, so the value is never used',
    ),
    Equivalent(
        'pairvol.api.spec.parse_spec',
        'reclaim = "Retain"',
        'reclaim = "retain"',
        'assigned only after a problem was recorded: parse_spec then raises, so the value is never used',
    ),
    Equivalent(
        'pairvol.api.spec.parse_spec',
        'reclaim = "Retain"',
        'reclaim = "RETAIN"',
        'assigned only after a problem was recorded: parse_spec then raises, so the value is never used',
    ),
    Equivalent(
        'pairvol.api.spec.parse_spec',
        'size = 0',
        'size = 1',
        'overwritten by the parsed size, or a problem was recorded and parse_spec raises',
    ),
    Equivalent(
        'pairvol.agent.state.PersistedState.to_json',
        'data["role"] = self.role.value',
        'data["XXroleXX"] = self.role.value',
        'asdict keeps the StrEnum, which json writes as its value; from_json ignores the extra key',
    ),
    Equivalent(
        'pairvol.agent.state.PersistedState.to_json',
        'data["role"] = self.role.value',
        'data["ROLE"] = self.role.value',
        'asdict keeps the StrEnum, which json writes as its value; from_json ignores the extra key',
    ),
    Equivalent(
        'pairvol.agent.state.PersistedState.to_json',
        'data["stage"] = self.stage.value',
        'data["XXstageXX"] = self.stage.value',
        'asdict keeps the StrEnum, which json writes as its value; from_json ignores the extra key',
    ),
    Equivalent(
        'pairvol.agent.state.PersistedState.to_json',
        'data["stage"] = self.stage.value',
        'data["STAGE"] = self.stage.value',
        'asdict keeps the StrEnum, which json writes as its value; from_json ignores the extra key',
    ),
    Equivalent(
        'pairvol.operator.decisions._steady',
        'if any(p.node == sec.node for p in world.pods.values() if p.name != prim.pod):',
        'if any(p.node != sec.node for p in world.pods.values() if p.name != prim.pod):',
        'unreachable: a secondary without a pod was judged dead by replica_health just above and dropped',
    ),
    Equivalent(
        'pairvol.operator.decisions._steady',
        'if any(p.node == sec.node for p in world.pods.values() if p.name != prim.pod):',
        'if any(p.node == sec.node for p in world.pods.values() if p.name == prim.pod):',
        'unreachable: a secondary without a pod was judged dead by replica_health just above and dropped',
    ),
    Equivalent(
        'pairvol.operator.decisions._steady',
        'msg = f"waiting for the old pod on {sec.node} to go away"',
        'msg = None',
        'unreachable: a secondary without a pod was judged dead by replica_health just above and dropped',
    ),
    Equivalent(
        'pairvol.operator.decisions._steady',
        'actions.append(CreatePod(sec.pod, sec.node, "secondary"))',
        'actions.append(CreatePod(sec.pod, sec.node, "XXsecondaryXX"))',
        'unreachable: a secondary without a pod was judged dead by replica_health just above and dropped',
    ),
    Equivalent(
        'pairvol.operator.decisions._steady',
        'actions.append(CreatePod(sec.pod, sec.node, "secondary"))',
        'actions.append(CreatePod(sec.pod, sec.node, "SECONDARY"))',
        'unreachable: a secondary without a pod was judged dead by replica_health just above and dropped',
    ),
    Equivalent(
        'pairvol.operator.decisions._steady',
        'msg = f"starting secondary {sec.pod} on {sec.node}"',
        'msg = None',
        'unreachable: a secondary without a pod was judged dead by replica_health just above and dropped',
    ),
    Equivalent(
        'pairvol.operator.decisions._steady',
        'st = st.with_(phase=Phase.DEGRADED, message=msg)',
        'st = st.with_(phase=None, message=msg)',
        'unreachable: a secondary without a pod was judged dead by replica_health just above and dropped',
    ),
    Equivalent(
        'pairvol.operator.decisions._steady',
        'st = st.with_(phase=Phase.DEGRADED, message=msg)',
        'st = st.with_(phase=Phase.DEGRADED, message=None)',
        'unreachable: a secondary without a pod was judged dead by replica_health just above and dropped',
    ),
    Equivalent(
        'pairvol.operator.decisions._steady',
        'st = st.with_(phase=Phase.DEGRADED, message=msg)',
        'st = st.with_(message=msg)',
        'unreachable: a secondary without a pod was judged dead by replica_health just above and dropped',
    ),
    Equivalent(
        'pairvol.operator.decisions._steady',
        'st = st.with_(phase=Phase.DEGRADED, message=msg)',
        'st = st.with_(phase=Phase.DEGRADED, )',
        'unreachable: a secondary without a pod was judged dead by replica_health just above and dropped',
    ),
    Equivalent(
        'pairvol.operator.decisions._steady',
        'return _finish(world, st, actions, False)',
        'return _finish(world, st, actions, True)',
        'unreachable, as above (every other such return in _steady is caught by the cosmetic rule)',
    ),
    Equivalent(
        'pairvol.operator.decisions._steady',
        'phealth, pwhy = "dead", f"primary {prim.pod} lost its lease"',
        'phealth, pwhy = "XXdeadXX", f"primary {prim.pod} lost its lease"',
        "_primary_down treats every verdict but 'suspect' as dead",
    ),
    Equivalent(
        'pairvol.operator.decisions._steady',
        'phealth, pwhy = "dead", f"agent of {prim.pod} is {pa.role}, not primary"',
        'phealth, pwhy = "XXdeadXX", f"agent of {prim.pod} is {pa.role}, not primary"',
        "_primary_down treats every verdict but 'suspect' as dead",
    ),
    Equivalent(
        'pairvol.operator.decisions._steady',
        'phealth, pwhy = "dead", f"primary {prim.pod} lost its lease"',
        'phealth, pwhy = "DEAD", f"primary {prim.pod} lost its lease"',
        "_primary_down treats every verdict but 'suspect' as dead",
    ),
    Equivalent(
        'pairvol.operator.decisions._steady',
        'phealth, pwhy = "dead", f"agent of {prim.pod} is {pa.role}, not primary"',
        'phealth, pwhy = "DEAD", f"agent of {prim.pod} is {pa.role}, not primary"',
        "_primary_down treats every verdict but 'suspect' as dead",
    ),
    Equivalent(
        'pairvol.operator.decisions.replica_health',
        'return "suspect", f"pod {rep.pod} is not ready yet"',
        'return "XXsuspectXX", f"pod {rep.pod} is not ready yet"',
        "reached only for a secondary not yet started, whose verdict is compared with 'ok' and 'dead' alone",
    ),
    Equivalent(
        'pairvol.operator.decisions.replica_health',
        'return "suspect", f"pod {rep.pod} is not ready yet"',
        'return "SUSPECT", f"pod {rep.pod} is not ready yet"',
        "reached only for a secondary not yet started, whose verdict is compared with 'ok' and 'dead' alone",
    ),
    Equivalent(
        'pairvol.operator.decisions.replica_health',
        'return "ok", ""',
        'return "ok", "XXXX"',
        "the reason of an 'ok' verdict is never shown",
    ),
    Equivalent(
        'pairvol.operator.decisions.AgentView.from_status',
        'epoch=int(d.get("epoch", 0) or 0),',
        'epoch=int(d.get("epoch", None) or 0),',
        'a missing epoch becomes 0 through `or 0` either way',
    ),
    Equivalent(
        'pairvol.operator.decisions.AgentView.from_status',
        'epoch=int(d.get("epoch", 0) or 0),',
        'epoch=int(d.get("epoch", ) or 0),',
        'a missing epoch becomes 0 through `or 0` either way',
    ),
    Equivalent(
        'pairvol.operator.decisions.AgentView.from_status',
        'serving=bool((d.get("export") or {}).get("serving", False)),',
        'serving=bool((d.get("export") or {}).get("serving", None)),',
        'bool(None) is False',
    ),
    Equivalent(
        'pairvol.operator.decisions.AgentView.from_status',
        'serving=bool((d.get("export") or {}).get("serving", False)),',
        'serving=bool((d.get("export") or {}).get("serving", )),',
        'bool(None) is False',
    ),
    Equivalent(
        'pairvol.operator.decisions.choose_pair',
        'f"need two eligible nodes, found {len(ranked)} ({\', \'.join(ranked) or \'none\'}) "',
        'f"need two eligible nodes, found {len(ranked)} ({\'XX, XX\'.join(ranked) or \'none\'}) "',
        'fewer than two nodes are listed here, so the separator never shows',
    ),
    Equivalent(
        'pairvol.operator.decisions._bring_up',
        'continue',
        'break',
        'only the secondary can be None here and it is the last entry (the primary is asserted)',
    ),
    Equivalent(
        'pairvol.operator.decisions._steady',
        'sec = Replica(sec.node, sec.pod, sec.state, sec.address, False, synced=True)',
        'sec = Replica(sec.node, sec.pod, sec.state, sec.address, synced=True)',
        "False is the default of out_of_sync",
    ),
    Equivalent(
        'pairvol.operator.decisions._steady',
        'sec = Replica(sec.node, sec.pod, sec.state, sec.address, True, synced=False)',
        'sec = Replica(sec.node, sec.pod, sec.state, sec.address, True, )',
        "False is the default of synced",
    ),
    Equivalent(
        'pairvol.operator.decisions._steady',
        'st = st.with_(phase=Phase.REPLICATING, sync=None, message=f"{prim.node} -> {sec.node} in sync")',
        'st = st.with_(phase=Phase.REPLICATING, message=f"{prim.node} -> {sec.node} in sync")',
        "reached only in replication state replicating (none and degraded re-pair, syncing returns above), "
        "whose branch has just set sync=None",
    ),
    Equivalent(
        'pairvol.operator.decisions.sync_status',
        'done = min(pa.sync_done or 0, total) if total else 0',
        'done = min(pa.sync_done or 0, total) if (total) or True else 0',
        'with total 0, min(done, 0) is 0 too: an agent never reports negative bytes done',
    ),
    Equivalent(
        'pairvol.operator.decisions.resync_started_message',
        'f"{_mib(pa.sync_total or 0)} to copy ({pa.sync_reason or \'no reason given\'})"',
        'f"{_mib(pa.sync_total or 1)} to copy ({pa.sync_reason or \'no reason given\'})"',
        'one byte and none both read "0.0 MiB"',
    ),
    Equivalent(
        'pairvol.operator.decisions._steady',
        'cp = _checkpoint_status(sa.checkpoint) or (dict(st.checkpoint) if st.checkpoint else None)',
        'cp = _checkpoint_status(sa.checkpoint) or (dict(st.checkpoint) if (st.checkpoint) and False else None)',
        'only when the agent has no checkpoint: the recorded one stays, and a checkpoint is due anyway (no restore point)',  # noqa: E501 (the mutated line as it is)
    ),
    Equivalent(
        'pairvol.operator.decisions._finish',
        'status.message or ("primary serving" if ready else status.phase.value),',
        'status.message or ("primary serving" if (ready) and False else status.phase.value),',
        'the message is never empty: placement sets one, and every later step keeps or replaces it',
    ),
    Equivalent(
        'pairvol.operator.decisions._finish',
        'status.message or ("primary serving" if ready else status.phase.value),',
        'status.message or ("primary serving" if (ready) or True else status.phase.value),',
        'the message is never empty: placement sets one, and every later step keeps or replaces it',
    ),
    Equivalent(
        'pairvol.operator.decisions._finish',
        'status.message or ("primary serving" if ready else status.phase.value),',
        'status.message or ("XXprimary servingXX" if ready else status.phase.value),',
        'the message is never empty: placement sets one, and every later step keeps or replaces it',
    ),
    Equivalent(
        'pairvol.operator.decisions._finish',
        'status.message or ("primary serving" if ready else status.phase.value),',
        'status.message or ("PRIMARY SERVING" if ready else status.phase.value),',
        'the message is never empty: placement sets one, and every later step keeps or replaces it',
    ),
)
