"""pytest plugin for the generated-mutant run (``tests.mutation.generated``): hypothesis
settings that keep a verdict a property of the mutant, not of the run.

mutmut runs pytest many times in one process and forks a worker per mutant, so the same
test function meets several executors (``differing_executors``) and a loaded machine makes
examples slow (``too_slow``, ``deadline``): neither says anything about the mutant. Examples
are derandomized so a run is reproducible.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "generated-mutants",
    suppress_health_check=[HealthCheck.differing_executors, HealthCheck.too_slow],
    deadline=None,
    derandomize=True,
)
settings.load_profile("generated-mutants")
