"""A series folder at one moment: the complete pairs, the orphans, and whether they are sound.

Contracts (``docs/router.md``):

* :func:`take_snapshot` lists the complete pairs of a series folder: a ``.dcm`` whose ``.tags``
  exists (the receiver renames the ``.dcm`` in first), and the files that waited too long for
  their partner. Anything else stays for a later pass.
* :func:`inspect_series` reads every side-car and checks every ``.dcm``; any problem sends the
  whole snapshot to ``error/`` with the precise reason, once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

DICOM_PREFIX_OFFSET: Final = 128
DICOM_PREFIX: Final = b"DICM"
"""PS3.10 §7.1: a 128-byte preamble, then the prefix ``DICM``."""
MAX_REASONS: Final = 5
"""Problems named in a ``fail_reason``; the rest are counted."""


@dataclass(frozen=True)
class Snapshot:
    """One series folder at one moment: its complete pairs by stem (sorted), and the files that
    have waited too long for their partner (orphans)."""

    series_uid: str
    stems: tuple[str, ...]
    orphans: tuple[str, ...] = ()
    """``.dcm`` without ``.tags`` (or the reverse) unchanged for ``orphan_after`` seconds."""
    orphan_after: float = 0.0

    @property
    def files(self) -> list[str]:
        return [name for stem in self.stems for name in (f"{stem}.dcm", f"{stem}.tags")]

    @property
    def all_files(self) -> list[str]:
        return [*self.files, *self.orphans]


def take_snapshot(series_dir: Path, *, now: float, orphan_after: float) -> Snapshot:
    """The stems of every ``.dcm`` with a ``.tags`` beside it, and the orphans (hidden files
    ignored)."""
    dcm: set[str] = set()
    tags: set[str] = set()
    with os.scandir(series_dir) as entries:
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            if name.endswith(".dcm"):
                dcm.add(name[:-4])
            elif name.endswith(".tags"):
                tags.add(name[:-5])
    unpaired = [f"{stem}.dcm" for stem in dcm - tags] + [f"{stem}.tags" for stem in tags - dcm]
    orphans = tuple(
        sorted(name for name in unpaired if _age(series_dir / name, now) >= orphan_after)
    )
    return Snapshot(series_dir.name, tuple(sorted(dcm & tags)), orphans, orphan_after)


def _age(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


@dataclass(frozen=True)
class Inspection:
    tags: dict[str, Any]
    """The side-car of the first instance ({} when it is unreadable)."""
    problems: list[str]
    """Why instances cannot be routed, one line each (empty: all is well)."""


def inspect_series(series_dir: Path, snapshot: Snapshot) -> Inspection:
    """Read every side-car and check every ``.dcm`` of the snapshot."""
    first: dict[str, Any] | None = None
    problems: list[str] = []
    for stem in snapshot.stems:
        tags, problem = read_side_car(series_dir / f"{stem}.tags")
        if problem is not None:
            problems.append(problem)
        elif first is None:
            first = tags
        problem = check_dicom_file(series_dir / f"{stem}.dcm")
        if problem is not None:
            problems.append(problem)
    return Inspection(first or {}, problems)


def read_side_car(path: Path) -> tuple[dict[str, Any], str | None]:
    """The side-car as a dict, or ``({}, reason)`` when it is not a UTF-8 JSON object."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return {}, f"{path.name}: cannot read the side-car: {exc.strerror}"
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return {}, f"{path.name}: the side-car is not UTF-8 (byte {exc.start})"
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        return {}, f"{path.name}: the side-car is not valid JSON ({exc.msg} at {where})"
    if not isinstance(data, dict):
        kind = type(data).__name__
        return {}, f"{path.name}: the side-car is not a JSON object but {kind}"
    return data, None


def check_dicom_file(path: Path) -> str | None:
    """None when ``path`` is readable and starts like a DICOM file (PS3.10), else why not."""
    try:
        with path.open("rb") as file:
            head = file.read(DICOM_PREFIX_OFFSET + len(DICOM_PREFIX))
    except OSError as exc:
        return f"{path.name}: cannot read the DICOM file: {exc.strerror}"
    if head[DICOM_PREFIX_OFFSET:] != DICOM_PREFIX:
        return f"{path.name}: not a DICOM file (no 'DICM' prefix after the 128-byte preamble)"
    return None


def summarise(problems: list[str]) -> str:
    shown = "; ".join(problems[:MAX_REASONS])
    more = len(problems) - MAX_REASONS
    return f"{shown}; and {more} more" if more > 0 else shown
