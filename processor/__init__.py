"""Caduceus processor service (not implemented yet; see the issue tracker)."""
