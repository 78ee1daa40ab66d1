"""Event shipper: sends every outbox of this host to the bookkeeper (``docs/events.md``)."""
