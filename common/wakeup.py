"""Wake a waiting service when entries appear in a spool folder (Linux inotify, via ctypes).

A service that polls a folder every ``scan_interval`` seconds waits on average half that
interval before it sees new work. :class:`FolderWatch` gives it a file descriptor that becomes
readable when an entry is created in, moved into, removed from or moved out of the folder, so
its ``select()`` returns at once; the scan then finds the work as it always did. Nothing about
the spool contract changes: the producer just renames its folder in, as before, and any number
of consumers watching the folder are all woken (their claims decide who takes the work).

inotify sees only changes made through this host's kernel: on a spool shared between hosts
(NFS), changes another host makes wake nobody here, and the scan interval remains the bound.
Where inotify is unavailable (another OS, ``fs.inotify.max_user_instances`` exhausted), the
watch is inactive (``fileno()`` is None) and the service polls as before.

The standard library has no inotify; the three libc calls needed are wrapped here with ctypes
rather than adding a dependency for them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, cast

logger = logging.getLogger(__name__)

# <sys/inotify.h>
IN_MOVED_FROM: Final = 0x00000040
IN_MOVED_TO: Final = 0x00000080
IN_CREATE: Final = 0x00000100
IN_DELETE: Final = 0x00000200
IN_Q_OVERFLOW: Final = 0x00004000
IN_IGNORED: Final = 0x00008000
IN_ONLYDIR: Final = 0x01000000
_IN_NONBLOCK: Final = os.O_NONBLOCK
_IN_CLOEXEC: Final = os.O_CLOEXEC

ENTRIES_CHANGED: Final = IN_CREATE | IN_MOVED_TO | IN_DELETE | IN_MOVED_FROM
_EVENT: Final = struct.Struct("iIII")
"""struct inotify_event: wd, mask, cookie, len, then ``len`` bytes of NUL-padded name."""


@dataclass(frozen=True)
class Change:
    """One change of the watched folder's entries."""

    name: str
    """The entry's name ("" for a queue overflow or a removed watch)."""
    mask: int

    @property
    def appeared(self) -> bool:
        return bool(self.mask & (IN_CREATE | IN_MOVED_TO))

    @property
    def overflow(self) -> bool:
        """Events were lost (or the watch ended): assume anything changed."""
        return bool(self.mask & (IN_Q_OVERFLOW | IN_IGNORED))


class FolderWatch:
    """A readable file descriptor while ``folder``'s entries changed since the last
    :meth:`changes`; inactive (``fileno()`` None) where inotify cannot be used."""

    def __init__(self, folder: Path, mask: int = ENTRIES_CHANGED) -> None:
        self.folder = folder
        self._fd: int | None = None
        calls = _inotify()
        if calls is None:
            logger.info("inotify is not available: %s is polled only", folder)
            return
        init, add_watch = calls
        fd = init(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            logger.warning(
                "cannot watch %s (inotify_init1: %s): polling only",
                folder,
                os.strerror(ctypes.get_errno()),
            )
            return
        if add_watch(fd, os.fsencode(folder), mask | IN_ONLYDIR) < 0:
            problem = os.strerror(ctypes.get_errno())
            os.close(fd)
            logger.warning("cannot watch %s (inotify_add_watch: %s): polling only", folder, problem)
            return
        self._fd = fd

    def fileno(self) -> int | None:
        return self._fd

    def changes(self) -> list[Change]:
        """Read and return the pending changes (never blocks)."""
        if self._fd is None:
            return []
        found: list[Change] = []
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return found
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            found.extend(_parse(data))

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def _parse(data: bytes) -> list[Change]:
    changes: list[Change] = []
    offset = 0
    while offset + _EVENT.size <= len(data):
        _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
        start = offset + _EVENT.size
        name = data[start : start + length].split(b"\0", 1)[0]
        changes.append(Change(os.fsdecode(name), mask))
        offset = start + length
    return changes


@functools.cache
def _inotify() -> tuple[Callable[[int], int], Callable[[int, bytes, int], int]] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        init, add_watch = libc.inotify_init1, libc.inotify_add_watch
    except (OSError, AttributeError, TypeError):
        return None
    init.argtypes = [ctypes.c_int]
    init.restype = ctypes.c_int
    add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    add_watch.restype = ctypes.c_int
    return (
        cast(Callable[[int], int], init),
        cast(Callable[[int, bytes, int], int], add_watch),
    )
