"""Benchmarks: `lakehouse bench` and the design it is compared with."""
