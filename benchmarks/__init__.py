"""Benchmarks a user or maintainer reruns; each runs as ``python3 -m benchmarks.<name>`` from the
repository root and writes one JSON result to benchmarks/results/ (docs/performance.md)."""
