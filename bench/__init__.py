"""Benchmarks: ratios taken side by side in one run, medians of several repeats. `python -m bench`."""
