"""Caduceus router: turns complete series in ``incoming/`` into tasks, by the rules.

``python -m router --config PATH [--once]``; the design, the rule semantics and the crash-safety
argument are in ``docs/router.md``.
"""
