"""Caduceus cleaner service (not implemented yet; see the issue tracker)."""
