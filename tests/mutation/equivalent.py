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
)
