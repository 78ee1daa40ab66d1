"""Caduceus router service (not implemented yet; see the issue tracker)."""
