"""Read sample values out of a Prometheus text exposition, so tests check what a metric
*says* after an event, not only that its name appears (a series exists at 0 from start-up)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = float(s.value)
    return out


def value(text: str, name: str, **labels: str) -> float:
    """The value of the one sample ``name{labels}``; AssertionError if there is none."""
    want = frozenset(labels.items())
    found = samples(text)
    if (name, want) in found:
        return found[(name, want)]
    near = sorted(f"{n}{dict(lab)}" for n, lab in found if n == name)
    raise AssertionError(f"no sample {name}{labels}; the exposition has {near or 'no sample of that name'}")


def names(text: str) -> set[str]:
    """Every sample name in the exposition (counters with _total, histograms with _bucket...)."""
    return {name for name, _ in samples(text)}
