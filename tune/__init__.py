"""Ray Tune sweeps over our trainers: search spaces per method (spaces.py), the Tune-over-Train launcher
(launcher.py) and the results tables, plots and best config (report.py). See docs/tune.md.

This package is named `tune`; Ray's is always imported as `from ray import tune as ray_tune` here, and our own
modules with absolute imports (`from tune.spaces import ...`), so no line is ambiguous.
"""
