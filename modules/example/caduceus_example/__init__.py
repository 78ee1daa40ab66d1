"""Caduceus example module: the smallest complete mercure processing module (stdlib only)."""

__version__ = "0.1.0"
