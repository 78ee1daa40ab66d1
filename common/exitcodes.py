"""Named process exit codes of every Caduceus command and service.

They follow BSD ``sysexits(3)`` where one fits, so that the supervisor, compose and systemd can
tell a configuration the process refused (restarting will not help until someone fixes it) from a
crash (restart with backoff).
"""

import signal
from typing import Final

EX_OK: Final = 0
"""Success; for a service, a clean stop on request."""

EX_FAILURE: Final = 1
"""Unspecified failure (also what Python exits with on an uncaught exception)."""

EX_USAGE: Final = 64
"""The command line was wrong (sysexits EX_USAGE)."""

EX_UNAVAILABLE: Final = 69
"""The requested service is not available, e.g. not implemented yet (sysexits EX_UNAVAILABLE)."""

EX_SOFTWARE: Final = 70
"""Internal error; for ``caduceus up``, a service that had to be killed (sysexits EX_SOFTWARE)."""

EX_CANTCREAT: Final = 73
"""A file or folder could not be created: spool folders, default config (sysexits EX_CANTCREAT)."""

EX_CONFIG: Final = 78
"""The configuration is invalid; the message names the field (sysexits EX_CONFIG).

The supervisor does not restart a service that exits with it in a loop: it waits long, or until
the configuration file changes.
"""

EX_INTERRUPTED: Final = 128 + signal.SIGINT
"""Stopped at once by a second Ctrl-C / SIGTERM, without waiting for a clean stop (shell 130)."""

_NAMES: Final = {
    EX_OK: "EX_OK",
    EX_FAILURE: "EX_FAILURE",
    EX_USAGE: "EX_USAGE",
    EX_UNAVAILABLE: "EX_UNAVAILABLE",
    EX_SOFTWARE: "EX_SOFTWARE",
    EX_CANTCREAT: "EX_CANTCREAT",
    EX_CONFIG: "EX_CONFIG",
    EX_INTERRUPTED: "EX_INTERRUPTED",
}


def describe(returncode: int) -> str:
    """Words for a ``subprocess`` return code: ``exit 78 (EX_CONFIG)``, ``killed by SIGKILL``."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    name = _NAMES.get(returncode)
    return f"exit {returncode} ({name})" if name else f"exit {returncode}"
