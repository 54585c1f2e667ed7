"""Reproducible experiments on the paper's three task families (see docs/RESULTS.md).

Run one with ``sewa experiment NAME [--preset quick|full] [--seeds N]``.
"""
