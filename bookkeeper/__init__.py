"""Caduceus bookkeeper: stores every service's events and answers the GUI's history queries.

``python -m bookkeeper --config PATH``; see ``docs/bookkeeper.md``.
"""
