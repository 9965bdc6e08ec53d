"""Benchmarks of mira_kernels (run as modules, e.g. ``python -m benchmarks.op_cpu``); not tests.

``_pairs`` is the shared measurement core: interleaved A/B rounds, median per-pair ratios with
distribution-free median intervals, stopping rules, and machine/version records. Results go to ``results/``.
"""
