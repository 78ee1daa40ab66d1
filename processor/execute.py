"""One processing attempt of one task folder, from the claim to the move.

1. Claim the folder with ``.processing``; a folder another live processor holds is skipped, a
   dead one's claim is recovered (``lock_recovered``). A folder with ``.finished`` was done by a
   processor that died while moving the result: the move is completed, nothing runs again.
2. Move the received files into ``input/`` (first attempt), clear the scratch of an earlier
   attempt, remove containers a killed processor left for this task.
3. Run the steps (:mod:`processor.runtime`): step 1 reads hard links to ``input/``, step n
   reads step n-1's output; each step's ``result.json`` becomes ``process[n].output``.
4. Success: the last output becomes ``result/`` with the final ``task.json`` (and the input
   when ``retain_input_images``); dynamic routing is applied; ``.finished`` is written; then
   ``result/`` is renamed to ``outgoing/<id>`` when there is something to dispatch,
   ``discard/<id>`` when the module discarded the series, ``success/<id>`` otherwise, and the
   task folder is removed.
5. Failure: a module failure is retried while the module's ``retries`` allow, an engine failure
   with backoff up to ``processing_retry_max`` attempts, a configuration failure not at all;
   then ``info.fail_stage = "PROCESSING"`` and ``info.fail_reason`` are set and the folder —
   with its untouched ``input/`` and the modules' logs — is renamed to ``error/<id>``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Final

import docker

from common.config import Config, Module
from common.spool import (
    Marker,
    SpoolLock,
    SpoolPaths,
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
    move_claimed,
    unique_destination,
)
from common.task import Task, TaskError, TaskProcessing, now_utc, read_task, write_task
from common.task_queue import claimed, move_broken
from processor import workspace
from processor.events import ProcessEvents
from processor.routing import decide_routing
from processor.runtime import (
    ConfigFailure,
    ContainerRunner,
    EngineFailure,
    Interrupted,
    ModuleFailure,
    RunFailure,
    StepRun,
    StepSpec,
    connect,
    remove_task_containers,
)
from processor.settings import ProcessorSettings
from processor.workspace import Workspace

logger = logging.getLogger(__name__)

SERVICE: Final = "processor"
LOG_TAIL_CHARS: Final = 600
"""Characters of a failed module's last output quoted in the task's reason."""


class Outcome(StrEnum):
    """How an attempt ended."""

    SUCCESS = "success"
    RETRY = "retry"
    ERROR = "error"
    BUSY = "busy"
    NOT_DUE = "not_due"
    STOPPED = "stopped"


class ProcessRunner:
    """Runs attempts; thread-safe (one runner serves every worker thread of a service)."""

    def __init__(
        self, paths: SpoolPaths, events: ProcessEvents, cancel: threading.Event | None = None
    ) -> None:
        self.paths = paths
        self.events = events
        self.cancel = cancel if cancel is not None else threading.Event()

    def run(self, folder: Path, config: Config, settings: ProcessorSettings) -> Outcome:
        with claimed(folder, SERVICE, self.events) as lock:
            if lock is None:
                return Outcome.BUSY
            try:
                return self._attempt(Workspace(folder), lock, config, settings)
            except Exception as exc:  # a bug or an OS error (disk full): never a hot loop
                logger.exception("task %s: the attempt failed unexpectedly", folder.name)
                return self._unexpected(Workspace(folder), lock, config, settings, exc)

    def _unexpected(
        self,
        ws: Workspace,
        lock: SpoolLock,
        config: Config,
        settings: ProcessorSettings,
        exc: Exception,
    ) -> Outcome:
        """Count an unexpected failure as an engine-type one (backoff, then ``error/``);
        when even that cannot be written, the task is left for the next scan."""
        reason = f"internal error: {type(exc).__name__}: {exc}"
        if ws.finished.exists():
            # The result is complete in result/: never reset it; the move is tried again.
            return Outcome.RETRY
        try:
            task = read_task(ws.task_file, report=False)
            return self._failed(ws, lock, task, reason, config, settings, module_retries=None)
        except Exception:
            logger.exception("task %s: cannot record the failure", ws.folder.name)
            return Outcome.RETRY

    def fail_broken(self, folder: Path, reason: str) -> None:
        """Move a folder whose ``task.json`` cannot be read to ``error/``."""
        move_broken(folder, self.paths.error, service=SERVICE, stage="PROCESSING", reason=reason)

    # ------------------------------------------------------------------ the attempt

    def _attempt(
        self, ws: Workspace, lock: SpoolLock, config: Config, settings: ProcessorSettings
    ) -> Outcome:
        if ws.finished.exists():
            return self._finish(ws, lock)
        task = self._load(ws, lock)
        if isinstance(task, Outcome):
            return task
        retry_at = task.info.process_next_retry_at
        if retry_at is not None and retry_at > now_utc():
            return Outcome.NOT_DUE
        ws.gather_input()  # error/ always holds the input in input/
        if not task.processing_steps:
            return self._give_up(ws, lock, task, "the task names no processing module", config)
        try:
            modules = [_module_of(step, config) for step in task.processing_steps]
        except ConfigFailure as exc:
            return self._give_up(ws, lock, task, str(exc), config)
        return self._execute(ws, lock, task, modules, config, settings)

    def _load(self, ws: Workspace, lock: SpoolLock) -> Task | Outcome:
        """The task, or the outcome when it cannot be read (moved to ``error/``) or is gone."""
        try:
            return read_task(ws.task_file, report=False)
        except TaskError as exc:
            if not ws.folder.exists():
                return Outcome.BUSY
            destination = move_claimed(ws.folder, self.paths.error, lock)
            atomic_write_bytes(destination / Marker.ERROR, f"PROCESSING: {exc}\n".encode())
            return Outcome.ERROR

    def _execute(
        self,
        ws: Workspace,
        lock: SpoolLock,
        task: Task,
        modules: list[Module],
        config: Config,
        settings: ProcessorSettings,
    ) -> Outcome:
        steps = task.processing_steps
        ws.reset_scratch()
        attempt = task.info.process_failures + task.info.process_engine_failures + 1
        self.events.started(task, attempt)
        logger.info(
            "task %s: processing with %s (attempt %d)",
            task.id,
            " -> ".join(step.module_name for step in steps),
            attempt,
            extra={"task_id": task.id},
        )
        client: docker.DockerClient | None = None
        try:
            client = connect(settings)
            remove_task_containers(client, task.id)
            runner = ContainerRunner(client, settings, self.cancel)
            last_out = self._run_steps(ws, task, modules, config, settings, runner)
        except Interrupted:
            logger.warning("task %s: interrupted, it will run again", task.id)
            return Outcome.STOPPED
        except ModuleFailure as exc:
            retries = modules[exc.step].retries
            return self._failed(ws, lock, task, str(exc), config, settings, module_retries=retries)
        except EngineFailure as exc:
            self.events.engine_unreachable(str(exc))
            return self._failed(ws, lock, task, str(exc), config, settings, module_retries=None)
        except ConfigFailure as exc:
            return self._give_up(ws, lock, task, str(exc), config)
        finally:
            if client is not None:
                client.close()
        return self._complete(ws, lock, task, last_out, config)

    def _run_steps(
        self,
        ws: Workspace,
        task: Task,
        modules: list[Module],
        config: Config,
        settings: ProcessorSettings,
        runner: ContainerRunner,
    ) -> Path:
        """Run every step; the last step's output folder."""
        steps = task.processing_steps
        previous_out: Path | None = None
        for index, (step, module) in enumerate(zip(steps, modules, strict=True)):
            step_dir = ws.step_dir(index)
            in_dir, out_dir = step_dir / "in", step_dir / "out"
            if previous_out is None:
                ws.prepare_first_input(in_dir)
            else:
                step_dir.mkdir(parents=True)
                os.rename(previous_out, in_dir)
                with contextlib.suppress(FileNotFoundError):
                    (in_dir / workspace.RESULT_JSON).unlink()
            workspace.write_module_task(in_dir, task, index)
            out_dir.mkdir()
            user = None if module.requires_root else settings.container_user()
            workspace.give_to_container_user([out_dir], user)
            spec = StepSpec(
                task_id=task.id,
                index=index,
                module_name=step.module_name,
                module=module,
                in_dir=in_dir,
                out_dir=out_dir,
                persistence_dir=self._persistence(step, module, config, user),
                timeout=module.timeout or settings.timeout,
            )
            try:
                self._run_step(task, step, spec, runner, settings, step_dir)
            except ModuleFailure as exc:
                exc.step = index
                raise
            previous_out = out_dir
        assert previous_out is not None
        return previous_out

    def _run_step(
        self,
        task: Task,
        step: TaskProcessing,
        spec: StepSpec,
        runner: ContainerRunner,
        settings: ProcessorSettings,
        step_dir: Path,
    ) -> None:
        """Run one container; sets ``step.output``; raises :class:`RunFailure`."""
        run: StepRun | None = None
        error: str | None = None
        logs = ""
        try:
            run = runner.run(spec)
            logs = run.logs
            if run.exit_code != 0:
                error = (
                    f"module {spec.module_name!r} ({spec.module.docker_tag}) exited with code "
                    f"{run.exit_code}{_tail(logs)}"
                )
                raise ModuleFailure(error)
            try:
                _present, step.output = workspace.read_result(spec.out_dir)
            except ValueError as exc:
                error = f"module {spec.module_name!r}: {exc}"
                raise ModuleFailure(error) from None
        except RunFailure as exc:
            error = str(exc)
            logs = logs or exc.logs
            raise
        finally:
            if logs:
                (step_dir / workspace.STEP_LOG).write_text(logs, encoding="utf-8")
            if run is not None or error is not None:
                self.events.step_done(
                    task,
                    spec.index,
                    spec.module_name,
                    exit_code=run.exit_code if run is not None else None,
                    duration_s=run.duration_s if run is not None else 0.0,
                    error=error,
                    logs=None if settings.discard_logs else logs,
                    output=step.output,
                    settings=step.settings,
                )

    @staticmethod
    def _persistence(
        step: TaskProcessing, module: Module, config: Config, user: str | None
    ) -> Path | None:
        if not module.requires_persistence:
            return None
        name = module.persistence_folder_name or step.module_name
        if name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise ConfigFailure(
                f"module {step.module_name!r}: persistence_folder_name {name!r} must be a "
                "plain folder name"
            )
        folder = config.persistence_path() / name
        if not folder.exists():
            folder.mkdir(parents=True)
            workspace.give_to_container_user([folder], user)
        return folder

    # ------------------------------------------------------------------ endings

    def _complete(
        self, ws: Workspace, lock: SpoolLock, task: Task, last_out: Path, config: Config
    ) -> Outcome:
        steps = task.processing_steps
        os.rename(last_out, ws.result)
        if len(steps) > 1:
            combined = [[step.module_name, step.output] for step in steps]
            atomic_write_json(ws.result / workspace.RESULT_JSON, combined, durable=False)
        if any(step.retain_input_images for step in steps):
            ws.retain_input(ws.result)
        decision = decide_routing(task, config)
        for reason in decision.ignored:
            logger.warning("task %s: %s", task.id, reason, extra={"task_id": task.id})
            self.events.routing_ignored(task, reason)
        if decision.notification is not None:
            self.events.notification_requested(task, decision.notification)
        task.info.process_next_retry_at = None
        task.info.fail_reason = None
        write_task(ws.result / Marker.TASK, task)
        fsync_dir(ws.result)
        atomic_write_json(ws.finished, {"folder": decision.folder})
        return self._finish(ws, lock, task)

    def _finish(self, ws: Workspace, lock: SpoolLock, task: Task | None = None) -> Outcome:
        """Move ``result/`` to the folder ``.finished`` names and remove the task folder;
        also completes the move of a processor that died half-way."""
        try:
            folder_name = json.loads(ws.finished.read_text(encoding="utf-8"))["folder"]
            root = _spool_folder(self.paths, folder_name)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RuntimeError(f"task {ws.folder.name}: unreadable {ws.finished}: {exc}") from exc
        if ws.result.exists():
            if task is None:
                task = read_task(ws.result / Marker.TASK, report=False)
            destination = unique_destination(root, ws.folder.name)
            # Recorded before the rename: a crash after it is completed by the next processor,
            # which then finds no result/ (and must not record the move twice).
            status = {"outgoing": "processed", "discard": "discarded"}.get(folder_name, "complete")
            self.events.moved(task, ws.folder, destination, status)
            os.rename(ws.result, destination)
            fsync_dir(root)
            logger.info(
                "task %s: processed, moved to %s/",
                task.id,
                folder_name,
                extra={"task_id": task.id},
            )
        workspace.remove_tree(ws.folder)
        with contextlib.suppress(OSError):
            fsync_dir(ws.folder.parent)
        return Outcome.SUCCESS

    def _failed(
        self,
        ws: Workspace,
        lock: SpoolLock,
        task: Task,
        reason: str,
        config: Config,
        settings: ProcessorSettings,
        *,
        module_retries: int | None,
    ) -> Outcome:
        """Count the failure; schedule a retry while allowed, else give up."""
        info = task.info
        if module_retries is not None:
            info.process_failures += 1
            retry = info.process_failures <= module_retries
            wait = settings.retry_wait(info.process_failures) if retry else 0.0
        else:
            info.process_engine_failures += 1
            retry = info.process_engine_failures < settings.retry_max
            wait = settings.retry_wait(info.process_engine_failures) if retry else 0.0
        if not retry:
            return self._give_up(ws, lock, task, reason, config)
        info.process_next_retry_at = now_utc() + timedelta(seconds=wait)
        info.fail_reason = reason
        write_task(ws.task_file, task)
        ws.reset_scratch()
        self.events.retry_scheduled(task, reason)
        logger.warning(
            "task %s: processing failed, again in %.0f s: %s",
            task.id,
            wait,
            reason,
            extra={"task_id": task.id},
        )
        return Outcome.RETRY

    @staticmethod
    def _notifies_errors(task: Task, config: Config) -> bool:
        rule = config.rules.get(task.info.applied_rule or "")
        return bool(
            rule is not None
            and rule.notification_trigger_error
            and (rule.notification_webhook or rule.notification_email)
        )

    def _give_up(
        self, ws: Workspace, lock: SpoolLock, task: Task, reason: str, config: Config
    ) -> Outcome:
        task.info.fail_stage = "PROCESSING"
        task.info.fail_reason = reason
        task.info.process_next_retry_at = None
        write_task(ws.task_file, task)
        _keep_only_logs(ws)
        logger.error("task %s failed: %s", task.id, reason, extra={"task_id": task.id})
        self.events.failed(task, reason)
        if self._notifies_errors(task, config):
            self.events.notification_requested(task, reason, trigger="error")
        destination = move_claimed(ws.folder, self.paths.error, lock)
        self.events.moved(task, ws.folder, destination, "error")
        return Outcome.ERROR


def restart_task(paths: SpoolPaths, task_id: str, events: ProcessEvents | None = None) -> Path:
    """Process a task of ``error/`` again (the GUI's "restart"): clear its failure and attempt
    counts and move it back to ``processing/``, where its untouched ``input/`` is run again.
    Raises :class:`TaskError` for a task that did not fail in processing."""
    folder = paths.error / task_id
    lock = SpoolLock(folder / Marker.PROCESSING, SERVICE)
    lock.acquire()
    try:
        task = read_task(folder / Marker.TASK)
        info = task.info
        if info.fail_stage != "PROCESSING" or not task.processing_steps:
            raise TaskError(
                f"task {task_id} failed in {info.fail_stage or 'no known stage'}, "
                "not in processing: the processor cannot restart it"
            )
        info.fail_stage = None
        info.fail_reason = None
        info.process_failures = 0
        info.process_engine_failures = 0
        info.process_next_retry_at = None
        write_task(folder / Marker.TASK, task)
        workspace.remove_tree(folder / workspace.RUN)
        workspace.remove_tree(folder / workspace.RESULT)
        destination = move_claimed(folder, paths.processing, lock)
        if events is not None:
            events.restarted(task)
        return destination
    finally:
        lock.release()


# ---------------------------------------------------------------------------- helpers


def _module_of(step: TaskProcessing, config: Config) -> Module:
    """The module as configured now (an admin's fix applies), else the task's copy."""
    module = config.modules.get(step.module_name) or step.module_config
    if module is None:
        raise ConfigFailure(f"module {step.module_name!r} is not configured")
    return module


def _tail(logs: str) -> str:
    text = logs.strip()
    if not text:
        return ""
    if len(text) > LOG_TAIL_CHARS:
        text = "..." + text[-LOG_TAIL_CHARS:]
    return f"; last output: {text}"


def _keep_only_logs(ws: Workspace) -> None:
    """Before a move to ``error/``: drop the steps' data, keep their logs."""
    if ws.run.exists():
        for step in ws.run.iterdir():
            for name in ("in", "out"):
                workspace.remove_tree(step / name)
    workspace.remove_tree(ws.result)


def _spool_folder(paths: SpoolPaths, name: str) -> Path:
    folders: dict[str, Path] = {
        "outgoing": paths.outgoing,
        "success": paths.success,
        "discard": paths.discard,
    }
    return folders[name]
