"""Benchmark and correctness harness (`vitkernels-bench`): check.py is the correctness sweep."""
