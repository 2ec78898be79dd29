"""Mutation testing of the data guards: ``make mutate`` (see docs/testing.md)."""
