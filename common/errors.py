"""The Caduceus exception tree.

CaduceusError
├── ConfigError          invalid or unreadable configuration (names the field)
├── SpoolError           the spool contract was broken (bad name, unsafe path, ...)
│   └── LockedError      a lock is held by a live owner
└── OutboxError          the local event outbox cannot record an event
"""


class CaduceusError(Exception):
    """Base class of every error Caduceus raises on purpose."""


class ConfigError(CaduceusError):
    """The configuration is invalid; the message names the offending field."""


class SpoolError(CaduceusError):
    """A spool operation was refused or failed."""


class LockedError(SpoolError):
    """The lock is held by another, live owner."""


class OutboxError(CaduceusError):
    """An event could not be recorded in the outbox."""
