"""Benchmarks of the opd_kernels ops against their baselines and the measured memory-bandwidth limit.

``python -m benchmarks --help`` runs the sweep; ``pytest benchmarks/bench_<op>.py`` runs the pytest-benchmark
suites. See benchmarks/README.md.
"""
