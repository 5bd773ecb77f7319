"""Whole runs: the upgrade sequence, the Ray Tune search over it, and the report written from its results."""
