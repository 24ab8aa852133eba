"""Benchmarks of vllm-custom-patches against the alternatives (run: ``python benchmarks/run.py``).

A package so that sections can share helpers and the perf-guard test can reuse
the per-call measurement; nothing here is installed or imported by the project.
"""
