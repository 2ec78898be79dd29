"""A fault injector with a checker (issue 7): real agents, real faults, and invariants
checked over a log of every acknowledged write. See docs/chaos.md."""
