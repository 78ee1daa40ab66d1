"""Shared foundation of the Caduceus services: configuration, spool, logging, errors, events."""
