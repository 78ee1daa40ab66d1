"""Caduceus webgui service (not implemented yet; see the issue tracker)."""
