"""Shared pytest configuration: `tests` is a package so suites can import tests.support."""
