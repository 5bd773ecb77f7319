"""Benchmarks: each script measures one hot path against its baseline and prints its figures as JSON."""
