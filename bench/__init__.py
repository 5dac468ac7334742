"""Benchmarks for lag_triton (see bench/README section in the report, and bench/gpu_check.sh)."""
