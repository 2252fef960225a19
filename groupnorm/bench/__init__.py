"""Benchmarks: shape suite, timing helpers and per-device rows for ``python -m groupnorm``."""
