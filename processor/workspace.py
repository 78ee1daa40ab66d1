"""The layout of a task folder while the processor works on it (``docs/processor.md``).

::

    processing/<id>/
        task.json       the task (the router's, updated by the processor)
        .processing     the claim
        input/          the received files, moved here on the first attempt and never changed:
                        a failed task keeps them for a restart (mercure copies them instead)
        run/<n>/in      step n's input (step 1: hard links to input/; then step n-1's output)
        run/<n>/out     step n's output (the container's /tmp/output)
        run/<n>/module.log
        result/         the last step's output with the final task.json, ready to move
        .finished       written just before result/ is moved on: a processor that crashes
                        after it finishes the move instead of running the task again

Every step is idempotent: ``run/`` and ``result/`` are scratch and rebuilt by each attempt.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from common.spool import Marker, atomic_write_json, fsync_dir
from common.task import Task

INPUT: Final = "input"
RUN: Final = "run"
RESULT: Final = "result"
FINISHED: Final = ".finished"
STEP_LOG: Final = "module.log"
RESULT_JSON: Final = "result.json"

MERCURE_TASK_KEYS: Final = ("id", "info", "dispatch", "process", "study", "nomad_info")


@dataclass(frozen=True)
class Workspace:
    """Paths inside one task folder."""

    folder: Path

    @property
    def task_file(self) -> Path:
        return self.folder / Marker.TASK

    @property
    def input(self) -> Path:
        return self.folder / INPUT

    @property
    def run(self) -> Path:
        return self.folder / RUN

    @property
    def result(self) -> Path:
        return self.folder / RESULT

    @property
    def finished(self) -> Path:
        return self.folder / FINISHED

    def step_dir(self, index: int) -> Path:
        return self.run / str(index + 1)

    def gather_input(self) -> int:
        """Move the router's files (everything but ``task.json`` and markers) into
        ``input/``; idempotent after a crash half-way. The number of files in ``input/``."""
        self.input.mkdir(exist_ok=True)
        moved = False
        for entry in os.scandir(self.folder):
            name = entry.name
            if name.startswith(".") or name == Marker.TASK or not entry.is_file():
                continue
            os.rename(entry.path, self.input / name)
            moved = True
        if moved:
            fsync_dir(self.input)
            fsync_dir(self.folder)
        return sum(1 for entry in os.scandir(self.input) if entry.is_file())

    def reset_scratch(self) -> None:
        """Remove what a previous attempt left in ``run/`` and ``result/``."""
        for path in (self.run, self.result):
            if path.exists():
                shutil.rmtree(path)

    def prepare_first_input(self, in_dir: Path) -> None:
        """Step 1's input: hard links to ``input/`` (no copy; mounted read-only)."""
        in_dir.mkdir(parents=True)
        for entry in os.scandir(self.input):
            if entry.is_file():
                # Readable by the module's user whatever the umask was (hard links share the
                # mode; the mount is read-only, so nobody can write through it).
                mode = entry.stat().st_mode
                if mode & 0o444 != 0o444:
                    os.chmod(entry.path, mode | 0o444)
                os.link(entry.path, in_dir / entry.name)
        os.chmod(in_dir, 0o755)  # noqa: S103 - the module's user reads, nobody writes

    def retain_input(self, out_dir: Path) -> None:
        """``retain_input_images``: the received files beside the module's output (an output
        file of the same name wins)."""
        for entry in os.scandir(self.input):
            target = out_dir / entry.name
            if entry.is_file() and not target.exists():
                os.link(entry.path, target)


def module_task_view(task: Task, step_index: int) -> dict[str, Any]:
    """The ``task.json`` a module reads: mercure's top-level keys only, ``process`` being the
    current step (mercure writes one per step of a chain)."""
    data = task.dump_for_file()
    steps = task.processing_steps
    if steps:
        data["process"] = steps[step_index].model_dump(mode="json")
    return {key: data[key] for key in MERCURE_TASK_KEYS if key in data}


def write_module_task(in_dir: Path, task: Task, step_index: int) -> None:
    atomic_write_json(in_dir / Marker.TASK, module_task_view(task, step_index), durable=False)


def read_result(out_dir: Path) -> tuple[bool, Any]:
    """The module's ``result.json``: (present, content). Raises ValueError if it is not JSON."""
    path = out_dir / RESULT_JSON
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return False, None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"result.json cannot be read: {exc}") from None
    try:
        return True, json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"result.json is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None


def give_to_container_user(paths: list[Path], user: str | None) -> None:
    """Let the module's user (``uid:gid``; None: root) write its output folder: a processor
    running as root gives the folder to that user; one running as another user opens it up."""
    if user is None:
        return
    uid_text, _, gid_text = user.partition(":")
    uid = int(uid_text)
    gid = int(gid_text or uid_text)
    for path in paths:
        if os.getuid() == 0:
            os.chown(path, uid, gid)
        elif uid != os.getuid():
            os.chmod(path, 0o777)  # noqa: S103 - another user must write its output here


def remove_tree(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)
