"""Experiments whose findings live in docs/experiments; no pipeline step depends on them."""
