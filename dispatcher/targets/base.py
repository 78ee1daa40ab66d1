"""What every target handler receives and returns."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from common.config import Target
from common.task import Task
from dispatcher.settings import DispatcherSettings


@dataclass(frozen=True)
class TargetJob:
    """One attempt to deliver a task to one target."""

    task: Task
    folder: Path
    """The task folder (claimed by this dispatcher)."""
    target_name: str
    target: Target
    settings: DispatcherSettings
    delivered: frozenset[str] = frozenset()
    """Files (names in the task folder) this target already stored: not sent again."""
    cancel: threading.Event = field(default_factory=threading.Event)
    """Set when the dispatcher must stop at once (second signal): stop between instances."""


@dataclass
class TargetResult:
    """The outcome of one attempt.

    ``ok`` only when every instance of the task is now delivered to the target. ``instances``
    holds the DIMSE status of every instance that got a response in this attempt (by file name);
    instances sent without a response are absent, so the next attempt sends them again.
    """

    ok: bool
    message: str = ""
    """Why the attempt failed (empty on success); names DIMSE statuses as ``0xA700 ...``."""
    permanent: bool = False
    """A retry cannot help (unsupported target type, broken file): go to ``error/`` now."""
    instances: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    """Instances (or files) sent in this attempt."""
    bytes_sent: int = 0


class TargetHandler(Protocol):
    """Delivers the files of a task folder to one kind of target."""

    def send(self, job: TargetJob) -> TargetResult:
        """Deliver what ``job.delivered`` lacks; never raises for a failure of the peer."""
        ...


def task_files(folder: Path, suffix: str = ".dcm") -> list[Path]:
    """The task's files ending in ``suffix``, sorted by name; hidden files are never sent."""
    return sorted(
        path
        for path in folder.iterdir()
        if path.name.endswith(suffix) and not path.name.startswith(".") and path.is_file()
    )
