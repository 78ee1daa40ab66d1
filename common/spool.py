"""The spool contract (DESIGN §4): folder names, marker names, atomic writes and locks.

Every service reads and writes the spool only through this module, so that the names and the
protocol live in one place.

Atomic delivery: a file appears under its final name only when it is complete — it is written
under a temporary name on the same filesystem, flushed (``fsync``) and renamed; the directory is
flushed after the rename so that the name itself survives a power loss.

Locks are files created with ``O_CREAT | O_EXCL``. The file holds its owner (service, host, pid,
the process start time, a random token) as JSON, and its mtime is the heartbeat, refreshed by a
background thread while the lock is held. A lock whose owner process is gone (same host) or whose
heartbeat is older than ``stale_after`` seconds is stale and is recovered: removed under an
``flock`` on the lock's own inode, so that of several recoverers exactly one removes it and none
ever removes a fresh lock that replaced it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from common.errors import LockedError, SpoolError

logger = logging.getLogger(__name__)

SEPARATOR = "#"
"""Separates the series UID from the instance part of a file name (mercure's convention)."""

TEMP_DIR = ".tmp"
"""Hidden folder inside ``incoming/`` where files are written before they are renamed in."""

DEFAULT_STALE_AFTER = 120.0
DEFAULT_HEARTBEAT = 10.0


class Folder(StrEnum):
    """The spool folders under the data root."""

    INCOMING = "incoming"
    STUDIES = "studies"
    PROCESSING = "processing"
    OUTGOING = "outgoing"
    SUCCESS = "success"
    ERROR = "error"
    DISCARD = "discard"
    JOBS = "jobs"


class Marker(StrEnum):
    """Marker and lock file names (mercure's names, so mercure tools read our spool)."""

    LOCK = ".lock"
    PROCESSING = ".processing"
    HALT = "HALT"
    ERROR = ".error"
    FORCE_COMPLETE = ".force-complete"
    TASK = "task.json"


@dataclass(frozen=True)
class SpoolPaths:
    """Resolved absolute paths of every spool folder, plus the service-local state folder."""

    incoming: Path
    studies: Path
    processing: Path
    outgoing: Path
    success: Path
    error: Path
    discard: Path
    jobs: Path
    state: Path
    """Per-host service state (event outboxes); not part of mercure's layout."""

    @classmethod
    def under(cls, root: Path) -> SpoolPaths:
        """All folders directly under one data root."""
        root = root.absolute()
        folders = {folder.name.lower(): root / folder.value for folder in Folder}
        return cls(**folders, state=root / "state")

    def all(self) -> list[Path]:
        return [
            self.incoming,
            self.studies,
            self.processing,
            self.outgoing,
            self.success,
            self.error,
            self.discard,
            self.jobs,
            self.state,
        ]

    def create(self) -> None:
        """Create every folder (idempotent)."""
        for path in self.all():
            path.mkdir(parents=True, exist_ok=True)
        (self.incoming / TEMP_DIR).mkdir(exist_ok=True)


# ---------------------------------------------------------------------------- atomic writes


def fsync_dir(path: Path) -> None:
    """Flush a directory so that renames and creations inside it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(final: Path) -> Path:
    """A unique temporary name beside ``final`` (hidden, carries the writer's pid)."""
    return final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically; with ``durable`` also survive a power loss."""
    tmp = temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any, *, durable: bool = True) -> None:
    """Write ``obj`` as indented UTF-8 JSON to ``path`` atomically."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False)
    atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def is_halted(folder: Path) -> bool:
    """True when the ``HALT`` marker suspends picking new tasks in ``folder``."""
    return (folder / Marker.HALT).exists()


# ---------------------------------------------------------------------------- locks


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock."""

    service: str
    host: str
    pid: int
    started: float
    """Start time of the owner process, to tell a reused pid from the owner."""
    token: str
    created: float

    @classmethod
    def me(cls, service: str) -> LockOwner:
        return cls(
            service=service,
            host=socket.gethostname(),
            pid=os.getpid(),
            started=_process_start_time(os.getpid()) or 0.0,
            token=secrets.token_hex(8),
            created=time.time(),
        )

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> LockOwner | None:
        try:
            data = json.loads(raw)
            return cls(**data)
        except (ValueError, TypeError):
            return None

    def is_alive(self) -> bool:
        """False only when certain the owner is gone (same host, process dead or pid reused)."""
        if self.host != socket.gethostname():
            return True
        started = _process_start_time(self.pid)
        if started is None:
            return False
        return abs(started - self.started) < 1.0 or self.started == 0.0


def _process_start_time(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return 0.0


@dataclass(frozen=True)
class StaleLock:
    """Describes a lock that was recovered, for the caller's event."""

    path: Path
    owner: LockOwner | None
    reason: str


class SpoolLock:
    """A lock file with owner and heartbeat, used as a context manager.

    >>> with SpoolLock(folder / Marker.PROCESSING, service="dispatcher") as lock:
    ...     lock.recovered  # a StaleLock when a dead owner's lock was taken over, else None

    Raises :class:`LockedError` when a live owner holds the lock.
    """

    def __init__(
        self,
        path: Path,
        service: str,
        *,
        stale_after: float = DEFAULT_STALE_AFTER,
        heartbeat: float = DEFAULT_HEARTBEAT,
    ) -> None:
        self.path = path
        self.service = service
        self.stale_after = stale_after
        self.heartbeat = heartbeat
        self.recovered: StaleLock | None = None
        self._owner: LockOwner | None = None
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            raise SpoolError(f"lock {self.path} is already held by this object")
        owner = LockOwner.me(self.service)
        try:
            self._fd = _create_exclusive(self.path, owner)
        except FileExistsError:
            stale = recover_if_stale(self.path, self.stale_after)
            if stale is None:
                raise LockedError(f"{self.path} is held by a live owner") from None
            self.recovered = stale
            try:
                self._fd = _create_exclusive(self.path, owner)
            except FileExistsError:
                raise LockedError(f"{self.path} was taken by another process") from None
        self._owner = owner
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._beat, name=f"heartbeat:{self.path.name}", daemon=True
        )
        self._thread.start()

    def release(self) -> None:
        """Remove the lock if it is still ours (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    self.path.unlink()
        finally:
            os.close(fd)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            fd = self._fd
            if fd is None:
                return
            try:
                os.utime(fd)
            except OSError:
                logger.exception("heartbeat of %s failed", self.path)

    def __enter__(self) -> SpoolLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _create_exclusive(path: Path, owner: LockOwner) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, owner.to_json())
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise
    return fd


def read_owner(path: Path) -> LockOwner | None:
    """The owner written in a lock file, or None when absent or unreadable."""
    try:
        return LockOwner.from_json(path.read_bytes())
    except FileNotFoundError:
        return None


def stale_reason(path: Path, stale_after: float) -> str | None:
    """Why the lock at ``path`` is stale, or None when it is live or absent."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    owner = read_owner(path)
    if owner is not None and not owner.is_alive():
        return f"owner {owner.service} pid {owner.pid} on {owner.host} is gone"
    if age > stale_after:
        return f"heartbeat is {age:.0f} s old (limit {stale_after:.0f} s)"
    return None


def recover_if_stale(path: Path, stale_after: float) -> StaleLock | None:
    """Remove the lock at ``path`` if it is stale; return what was removed, else None."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return StaleLock(path=path, owner=None, reason="vanished")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino != os.fstat(fd).st_ino:
                return None  # another recoverer replaced it; the new lock is fresh
        except FileNotFoundError:
            return StaleLock(path=path, owner=None, reason="vanished")
        reason = stale_reason(path, stale_after)
        if reason is None:
            return None
        owner = read_owner(path)
        path.unlink()
        logger.warning("recovered stale lock %s: %s", path, reason)
        return StaleLock(path=path, owner=owner, reason=reason)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- helpers


def iter_dirs(folder: Path) -> Iterator[os.DirEntry[str]]:
    """Sub-folders of ``folder`` that are not hidden (task or series folders)."""
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
                    yield entry
    except FileNotFoundError:
        return


def free_bytes(path: Path) -> int:
    """Free space available to unprivileged writers on the filesystem holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def unique_destination(root: Path, name: str) -> Path:
    """``root/name``, or, when that is taken, ``root/name_<UTC timestamp>`` (as mercure does)."""
    root.mkdir(parents=True, exist_ok=True)
    destination = root / name
    if destination.exists():
        stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S%f")
        destination = root / f"{name}_{stamp}"
    return destination


def move_claimed(folder: Path, root: Path, lock: SpoolLock) -> Path:
    """Rename the claimed task ``folder`` into ``root`` (see :func:`unique_destination`),
    durably; the claim moves with the folder and ``lock`` is pointed at its new place, so that
    releasing it removes it there and no other service can pick the task in between."""
    destination = unique_destination(root, folder.name)
    os.rename(folder, destination)
    fsync_dir(root)
    with contextlib.suppress(OSError):
        fsync_dir(folder.parent)
    # The lock file moved with the folder; release() removes it there (same inode).
    lock.path = destination / Marker.PROCESSING
    return destination
