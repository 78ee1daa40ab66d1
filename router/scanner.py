"""Which series in ``incoming/`` are complete, cheaply, tick after tick.

A series is complete when nothing has arrived for ``series_complete_trigger`` seconds: the
folder's mtime (every file the receiver renames in changes it) and the newest mtime of its files
are both older than that. One tick costs one ``scandir`` of ``incoming/`` and one ``stat`` per
series folder; a folder's own entries are read only when its mtime changed since it was last
read *and* it is old enough to be complete. Folders are returned oldest first.

The cache is per process and only an optimisation: a router that starts with an empty cache
reads each quiet folder once. A folder holding a routing journal (a crashed router's unfinished
work) is ready at once, whatever its age.

Each scan also notes :attr:`IncomingScanner.next_due`: the earliest moment a series seen in
this scan, but not ready yet, becomes complete if nothing else arrives (its newest mtime plus
``series_complete_trigger``), or may be retried. The router sleeps until then instead of
waking at its next interval, so a series is routed when it becomes complete, not up to one
scan interval later.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Final

from router.journal import JOURNAL_NAME

NS: Final = 1_000_000_000
SETTLED_NS: Final = 50_000_000
"""A folder read less than this long after its mtime is read again next time: the kernel stamps
mtimes with a coarse clock, so a change in the same clock tick may leave the mtime unchanged."""
NEVER: Final = 1 << 63
MAX_BACKOFF: Final = 600.0
"""Longest wait before a series whose routing failed unexpectedly is tried again (seconds)."""


class Outcome(Enum):
    """What an attempt to route a series found."""

    ROUTED = "routed"
    NOTHING = "nothing"
    """Locked, but no complete pair was there (emptied folder, or taken by another router)."""
    BUSY = "busy"
    """Another live router holds the series lock."""
    GONE = "gone"
    FAILED = "failed"
    """An unexpected error; tried again after a growing delay."""


@dataclass
class SeriesState:
    mtime_ns: int
    """The folder's mtime when this state was made."""
    journal: bool
    scanned: bool = False
    quiet_since_ns: int = 0
    routable: bool = False
    unpaired: bool = False
    """Files without their partner: routable (as orphans) once quiet for ``orphan_after``."""
    retry_at: float = 0.0
    failures: int = 0


class IncomingScanner:
    """Finds the complete series in ``incoming/`` and remembers what it read (see module doc)."""

    def __init__(self, incoming: Path) -> None:
        self.incoming = incoming
        self.states: dict[str, SeriesState] = {}
        self.folders_read = 0
        """Series folders whose entries were read (for tests and the benchmark)."""
        self.next_due: float | None = None
        """Epoch seconds at which the last scan expects the next series to become ready
        (None: nothing is waiting to become complete)."""

    def ready(self, now: float, trigger: float, orphan_after: float = float("inf")) -> list[str]:
        """Series UIDs that are complete at ``now`` (epoch seconds), oldest first. A folder whose
        only files lack their partner is ready once quiet for ``orphan_after`` seconds."""
        now_ns = int(now * NS)
        trigger_ns = int(trigger * NS)
        orphan_ns = int(min(orphan_after, 1e9) * NS)
        found: list[tuple[int, str]] = []
        seen: set[str] = set()
        later: list[int] = []
        self.next_due = None
        try:
            entries = os.scandir(self.incoming)
        except FileNotFoundError:
            self.states.clear()
            return []
        with entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                state = self._state(entry)
                if state is None:
                    continue
                seen.add(entry.name)
                due = self._due_ns(entry, state, now, now_ns, trigger_ns, orphan_ns)
                if due <= now_ns:
                    found.append((0 if state.journal else state.quiet_since_ns, entry.name))
                elif due != NEVER:
                    later.append(due)
        for gone in self.states.keys() - seen:
            del self.states[gone]
        if later:
            self.next_due = min(later) / NS
        return [name for _, name in sorted(found)]

    def _due_ns(
        self,
        entry: os.DirEntry[str],
        state: SeriesState,
        now: float,
        now_ns: int,
        trigger_ns: int,
        orphan_ns: int,
    ) -> int:
        """When the series becomes ready (epoch ns; ready when not after ``now_ns``), if
        nothing else arrives; :data:`NEVER` when only a new file can make it ready."""
        if now < state.retry_at:
            return max(int(state.retry_at * NS), now_ns + 1)
        if state.journal:
            return 0
        if now_ns - state.mtime_ns < trigger_ns:
            return state.mtime_ns + trigger_ns
        if not state.scanned:
            self._read(Path(entry.path), state, now_ns)
        if state.routable:
            return state.quiet_since_ns + trigger_ns
        if state.unpaired:
            return state.quiet_since_ns + max(trigger_ns, orphan_ns)
        return NEVER

    def note(self, series_uid: str, outcome: Outcome, now: float) -> None:
        """Remember the outcome of an attempt (a failure delays the next one)."""
        state = self.states.get(series_uid)
        if state is None:
            return
        if outcome is Outcome.FAILED:
            state.failures += 1
            state.retry_at = now + min(MAX_BACKOFF, 2.0**state.failures)
        else:
            state.failures = 0
            state.retry_at = 0.0
            if outcome is Outcome.NOTHING:
                state.journal = False

    def _state(self, entry: os.DirEntry[str]) -> SeriesState | None:
        try:
            if not entry.is_dir(follow_symlinks=False):
                return None
            mtime = entry.stat(follow_symlinks=False).st_mtime_ns
        except FileNotFoundError:
            return None
        state = self.states.get(entry.name)
        if state is None or state.mtime_ns != mtime:
            journal = os.path.exists(os.path.join(entry.path, JOURNAL_NAME))
            previous = state
            state = SeriesState(mtime_ns=mtime, journal=journal, quiet_since_ns=mtime)
            if previous is not None:
                state.retry_at, state.failures = previous.retry_at, previous.failures
            self.states[entry.name] = state
        return state

    def _read(self, folder: Path, state: SeriesState, now_ns: int) -> None:
        """Read the folder once: newest file mtime, complete pairs, journal."""
        self.folders_read += 1
        newest = state.mtime_ns
        dcm: set[str] = set()
        tags: set[str] = set()
        visible = 0
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    name = entry.name
                    if name == JOURNAL_NAME:
                        state.journal = True
                    if name.startswith("."):
                        continue
                    visible += 1
                    try:
                        newest = max(newest, entry.stat(follow_symlinks=False).st_mtime_ns)
                    except FileNotFoundError:
                        continue
                    if name.endswith(".dcm"):
                        dcm.add(name[:-4])
                    elif name.endswith(".tags"):
                        tags.add(name[:-5])
        except (FileNotFoundError, NotADirectoryError):
            return
        state.scanned = now_ns - state.mtime_ns > SETTLED_NS
        state.quiet_since_ns = newest
        # Nothing visible at all: an emptied folder (perhaps with a dead router's lock) that a
        # pass under the lock removes; a .dcm still waiting for its .tags is not routable.
        state.routable = bool(dcm & tags) or visible == 0 or state.journal
        state.unpaired = dcm != tags
