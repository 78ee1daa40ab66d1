"""The routing journal: the plan for one series, made durable before any task folder appears.

``incoming/<series>/.routing.json`` lists the files of the snapshot, every task to create (its
id, folder, placement and complete ``task.json``) and the events to record. The router writes it
(atomically, flushed) under the series lock, then carries it out; a router that finds a journal
— after a crash of any router — carries the same plan out again. Every step is idempotent, so
each instance ends in exactly the planned tasks, never in none and never twice
(``docs/router.md``, "Crash safety").
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from common.spool import Folder, atomic_write_bytes

JOURNAL_NAME: Final = ".routing.json"

Placement = Literal["link", "copy"]
"""``link``: a hard link (falls back to a copy across filesystems); ``copy``: a real, flushed
copy, for tasks whose consumer may modify its files (processing)."""


class JournalError(Exception):
    """A journal file exists but cannot be read; the message says why."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PlannedTask(_Frozen):
    task_id: str
    folder: Folder
    placement: Placement
    files: list[str]
    """File names in ``incoming/<series>/`` that go into this task."""
    task: dict[str, Any]
    """The ``task.json`` content, exactly as it will be written."""


class PlannedEvent(_Frozen):
    id: str
    """Deterministic, so an event recorded again after a crash is stored once."""
    kind: str
    payload: dict[str, Any]


class Journal(_Frozen):
    version: Literal[1] = 1
    journal_id: str
    series_uid: str
    created_at: str
    files: list[str]
    """Every file name in ``incoming/<series>/`` that this pass routes (removed at the end)."""
    tasks: list[PlannedTask]
    events: list[PlannedEvent]


def journal_path(series_dir: Path) -> Path:
    return series_dir / JOURNAL_NAME


def write_journal(series_dir: Path, journal: Journal) -> None:
    """Write the journal atomically and durably (temp file, fsync, rename, fsync folder).

    Compact JSON: it is read by the router only, and the C encoder is many times faster than the
    indenting one."""
    text = json.dumps(journal.model_dump(mode="json"), ensure_ascii=False, separators=(",", ":"))
    atomic_write_bytes(journal_path(series_dir), text.encode("utf-8"))


def read_journal(series_dir: Path) -> Journal | None:
    """The series' journal, None when there is none; :class:`JournalError` when unreadable."""
    path = journal_path(series_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise JournalError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return Journal.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        raise JournalError(f"{path} is not a valid routing journal: {exc}") from None


def remove_journal(series_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        journal_path(series_dir).unlink()


def remove_stray_temp_files(series_dir: Path) -> None:
    """Remove journal temp files a crashed writer left (only the lock holder writes them, so
    under the series lock every one of them is a leftover)."""
    prefix = f".{JOURNAL_NAME}."
    with contextlib.suppress(FileNotFoundError):
        for path in series_dir.iterdir():
            if path.name.startswith(prefix) and path.name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
