"""Caduceus dispatcher service (not implemented yet; see the issue tracker)."""
