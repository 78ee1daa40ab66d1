"""Named checkpoints between the router's steps, so tests can crash or pause it at each one.

The router calls its checkpoint (a ``Checkpoint`` callable) at every step of routing a series.
In production the checkpoint does nothing. Tests either pass their own callable to
:class:`~router.service.Router` (in-process) or set :data:`HOOK_ENV` for a router process::

    CADUCEUS_ROUTER_TEST_HOOK="task_delivered#2:kill"            # SIGKILL at the 2nd delivery
    CADUCEUS_ROUTER_TEST_HOOK="snapshot_taken:pause:/tmp/hook"   # wait for /tmp/hook/<step>.go

A ``pause`` creates ``<dir>/<step>.reached`` (holding the series UID) and waits until
``<dir>/<step>.go`` exists (at most :data:`PAUSE_LIMIT` seconds). Several specifications are
separated by commas. ``#n`` selects the n-th time the step is reached (default: the first).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Final

logger = logging.getLogger(__name__)

HOOK_ENV: Final = "CADUCEUS_ROUTER_TEST_HOOK"
PAUSE_LIMIT: Final = 120.0


class Step(StrEnum):
    """The steps of routing one series, in order (``docs/router.md``, "Crash safety")."""

    LOCKED = "locked"
    """The series lock is held; nothing read yet."""
    SNAPSHOT_TAKEN = "snapshot_taken"
    """The complete pairs are listed; files arriving from now on are not part of this pass."""
    JOURNAL_WRITTEN = "journal_written"
    """The plan is durable in the series' journal; no task folder exists yet."""
    FILES_PLACED = "files_placed"
    """One task's files are linked or copied into its hidden temporary folder."""
    TASK_WRITTEN = "task_written"
    """That task's ``task.json`` is written and flushed; the folder is still hidden."""
    TASK_DELIVERED = "task_delivered"
    """That task folder is renamed to its final name: consumers see it."""
    EVENTS_RECORDED = "events_recorded"
    """Every task is delivered and the events are in the outbox."""
    SOURCES_REMOVED = "sources_removed"
    """The routed files are unlinked from ``incoming/<series>/``; the journal still exists."""
    JOURNAL_REMOVED = "journal_removed"
    """The journal is gone; the lock is released next."""


Checkpoint = Callable[[Step, str], None]
"""Called with the step and the series UID."""


def no_checkpoint(_step: Step, _series_uid: str) -> None:
    """The production checkpoint: nothing."""


@dataclass(frozen=True)
class _Rule:
    step: Step
    occurrence: int
    action: str
    folder: Path | None


class EnvCheckpoint:
    """A checkpoint that kills or pauses the process as :data:`HOOK_ENV` says."""

    def __init__(self, spec: str) -> None:
        self.rules = [_parse(part) for part in spec.split(",") if part.strip()]
        self.counts: dict[Step, int] = {}

    def __call__(self, step: Step, series_uid: str) -> None:
        count = self.counts[step] = self.counts.get(step, 0) + 1
        for rule in self.rules:
            if rule.step == step and rule.occurrence == count:
                self._act(rule, series_uid)

    def _act(self, rule: _Rule, series_uid: str) -> None:
        if rule.action == "kill":
            logger.warning("test hook: SIGKILL at %s of %s", rule.step, series_uid)
            os.kill(os.getpid(), signal.SIGKILL)
        elif rule.folder is not None:
            rule.folder.mkdir(parents=True, exist_ok=True)
            (rule.folder / f"{rule.step}.reached").write_text(series_uid)
            go = rule.folder / f"{rule.step}.go"
            deadline = time.monotonic() + PAUSE_LIMIT
            while not go.exists() and time.monotonic() < deadline:
                time.sleep(0.02)


def _parse(part: str) -> _Rule:
    fields = part.strip().split(":", 2)
    where, action = fields[0], fields[1] if len(fields) > 1 else ""
    name, _, number = where.partition("#")
    try:
        step = Step(name)
        occurrence = int(number) if number else 1
    except ValueError:
        raise ValueError(f"{HOOK_ENV}: unknown step or occurrence in {part!r}") from None
    if action == "kill":
        return _Rule(step, occurrence, action, None)
    if action == "pause" and len(fields) == 3 and fields[2]:
        return _Rule(step, occurrence, action, Path(fields[2]))
    raise ValueError(f"{HOOK_ENV}: {part!r} is not 'step[#n]:kill' or 'step[#n]:pause:DIR'")


def checkpoint_from_env(environ: Mapping[str, str]) -> Checkpoint:
    """The checkpoint :data:`HOOK_ENV` asks for, or :func:`no_checkpoint`."""
    spec = environ.get(HOOK_ENV, "")
    if not spec.strip():
        return no_checkpoint
    logger.warning("%s is set (%s): this router pauses or kills itself for a test", HOOK_ENV, spec)
    return EnvCheckpoint(spec)
