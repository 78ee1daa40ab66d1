"""Caduceus bookkeeper service (not implemented yet; see the issue tracker)."""
