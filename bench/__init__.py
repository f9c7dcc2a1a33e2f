"""Benchmarks of graphmoe_fused (``pytest bench/``) and their report (``python -m bench.report``).

A package so that ``python -m bench.report`` works from the repository root and pytest puts the
root on ``sys.path`` (the benchmarks import ``bench.harness``).
"""
