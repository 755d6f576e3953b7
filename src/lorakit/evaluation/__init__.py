"""Layer 6, evaluation: generation and memory measurements, task data, the comparison (config, runs,
claims, report), the benchmark and the bundled demo.
"""
