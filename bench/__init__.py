"""Benchmarks for Caduceus, run with ``make bench`` (``python -m bench``).

Every figure in ``docs/benchmarks.md`` comes from a script in this package, measured in the same
run as the comparison it is reported against.
"""
