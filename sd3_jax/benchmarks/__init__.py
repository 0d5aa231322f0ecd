"""Throughput and accuracy benchmarks, run as `python -m sd3_jax.benchmarks.<name>`."""
