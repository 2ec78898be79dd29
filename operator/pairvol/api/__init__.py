"""Pure models of the ReplicatedVolume API: spec parsing and validation, status, conditions.

Nothing in this package does I/O, so the operator's decisions can be tested without any
process, and the same code validates specs in the operator and in tests.
"""
