"""Benchmarks: each prints one JSON line with its figures and the ratio it is judged by."""
