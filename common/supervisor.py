"""A small process supervisor: each service its own OS process, restarted with backoff.

``caduceus up`` builds one :class:`ChildSpec` per service and runs a :class:`Supervisor`. The class
knows nothing about Caduceus services, so tests drive it with any command.

Process groups. Every child runs in a session (and so a process group) of its own:

- Ctrl-C in a terminal sends SIGINT to the terminal's foreground process group, which then holds
  the supervisor alone; the supervisor forwards exactly one SIGTERM to each service. Had the
  children stayed in the supervisor's group, each would get SIGINT from the terminal *and* SIGTERM
  from the supervisor — a second signal, which a two-stage shutdown reads as "exit now".
- The supervisor can kill a child together with whatever the child started (``killpg``): the
  leftovers of a crashed service are killed before it is restarted, and a stuck one is killed
  whole after the grace period. Nothing is left orphaned.
- On Linux each child also asks the kernel for SIGTERM should the supervisor die
  (``PR_SET_PDEATHSIG``), so even a SIGKILLed supervisor leaves no service running unsupervised.

Restart policy (:class:`RestartPolicy`). A service is meant to run until it is stopped, so every
exit that was not asked for is restarted: after ``initial_delay``, doubling with each exit in a row
up to ``max_delay``; a child that ran ``stable_after`` seconds before it exited starts again from
``initial_delay``. A child that exits with ``EX_CONFIG`` refused its configuration; restarting it
at once would only fail again, so it waits ``config_delay`` — or less, when its watched file (the
configuration) changes.

Stopping. The first :meth:`Supervisor.stop` (or SIGINT / SIGTERM / SIGHUP once the handlers are
installed) sends SIGTERM to every child and waits up to ``stop_grace`` seconds, then kills what is
left; a second one kills at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from common.exitcodes import EX_CONFIG, EX_INTERRUPTED, EX_OK, EX_SOFTWARE, describe

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_REAP_TIMEOUT = 5.0  # after SIGKILL; longer only for a process stuck in the kernel


@dataclass(frozen=True)
class ChildSpec:
    """One supervised program."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    """Added to the supervisor's own environment."""
    watch: Path | None = None
    """A file (the configuration) whose change ends the wait after an ``EX_CONFIG`` exit."""


@dataclass(frozen=True)
class RestartPolicy:
    """When to restart a child and how long to wait for it to stop; all times in seconds."""

    initial_delay: float = 1.0
    max_delay: float = 60.0
    stable_after: float = 60.0
    """A child that ran this long before it exited is healthy again: the delay starts over."""
    config_delay: float = 300.0
    """The wait after an ``EX_CONFIG`` exit, unless the watched file changes first."""
    stop_grace: float = 60.0
    """How long a child has after SIGTERM before it is killed: long enough for the receiver to
    finish the instances in flight and the dispatcher its current sends."""

    def delay(self, failures: int) -> float:
        """The wait before restarting after ``failures`` exits in a row (1, 2, 3, ...)."""
        exponent = min(max(failures - 1, 0), 60)
        return float(min(self.initial_delay * 2**exponent, self.max_delay))


@dataclass(frozen=True)
class ChildStatus:
    """A snapshot of one child, for logs, tests and (later) a status page."""

    name: str
    pid: int | None
    """None while the child waits to be restarted."""
    starts: int
    failures: int
    """Exits in a row, each after a shorter run than ``stable_after``."""
    last_exit: int | None
    """The last return code (negative: killed by that signal)."""
    next_delay: float | None
    """The wait chosen after the last exit."""
    waiting: str | None
    """Why the child is not running, in words."""


@dataclass
class _Child:
    spec: ChildSpec
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    starts: int = 0
    failures: int = 0
    last_exit: int | None = None
    next_delay: float | None = None
    restart_at: float | None = None
    waiting: str | None = None
    watch_stamp: tuple[int, int, int] | None = None


class Supervisor:
    """Runs ``children`` until :meth:`stop`; one :meth:`run` per instance."""

    def __init__(
        self,
        children: Sequence[ChildSpec],
        policy: RestartPolicy | None = None,
        *,
        poll_interval: float = 0.2,
        die_with_parent: bool = True,
    ) -> None:
        names = [spec.name for spec in children]
        if len(set(names)) != len(names):
            raise ValueError(f"child names must be unique: {names}")
        self.policy = policy or RestartPolicy()
        self.poll_interval = poll_interval
        self._children = [_Child(spec) for spec in children]
        self._preexec = _die_with_parent_hook() if die_with_parent else None
        self._lock = threading.Lock()  # guards _Child fields against status() readers
        self._stop_requested = False  # plain flags: set from signal handlers too
        self._force = False
        self._used = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._pipe_lock = threading.Lock()
        self._saved_handlers: dict[int, Any] = {}
        self._saved_wakeup_fd: int | None = None

    # ------------------------------------------------------------------ public API

    def run(self) -> int:
        """Start every child and supervise them until :meth:`stop`.

        Returns ``EX_OK`` when every child stopped within the grace period, ``EX_SOFTWARE`` when
        one had to be killed, ``EX_INTERRUPTED`` after a forced stop.
        """
        if self._used:
            raise RuntimeError("a Supervisor runs once")
        self._used = True
        try:
            for child in self._children:
                if not self._stop_requested:
                    self._spawn(child, time.monotonic())
            while not self._stop_requested:
                self._step(time.monotonic())
                self._wait(self._timeout(time.monotonic()))
            return self._shutdown()
        finally:
            self._kill_remaining()
            self._restore_signal_handlers()
            self._close_pipe()

    def stop(self, *, force: bool = False) -> None:
        """Ask :meth:`run` to stop every child; with ``force`` (or a second call), kill at once.

        Safe to call from any thread.
        """
        self._request_stop(force=force)
        with self._pipe_lock:
            if self._wake_w >= 0:
                with contextlib.suppress(BlockingIOError):
                    os.write(self._wake_w, b"s")

    def install_signal_handlers(self) -> None:
        """SIGINT, SIGTERM and SIGHUP stop (a second one kills); from the main thread, in ``main``.

        The previous handlers come back when :meth:`run` returns.
        """

        def on_stop(signum: int, frame: FrameType | None) -> None:
            self._request_stop(force=False)

        for signum in STOP_SIGNALS:
            self._saved_handlers[signum] = signal.signal(signum, on_stop)
        # A (no-op) Python handler makes the wake-up fd below receive a byte on each child exit,
        # so the loop notices a crash at once instead of at the next poll.
        self._saved_handlers[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, _ignore_signal)
        self._saved_wakeup_fd = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    def status(self) -> list[ChildStatus]:
        """A snapshot of every child; safe to call from any thread."""
        with self._lock:
            return [
                ChildStatus(
                    name=child.spec.name,
                    pid=child.process.pid if child.process else None,
                    starts=child.starts,
                    failures=child.failures,
                    last_exit=child.last_exit,
                    next_delay=child.next_delay,
                    waiting=child.waiting,
                )
                for child in self._children
            ]

    # ------------------------------------------------------------------ the loop

    def _request_stop(self, *, force: bool) -> None:
        # Runs inside signal handlers: flags only, no locks, no logging.
        if force or self._stop_requested:
            self._force = True
        self._stop_requested = True

    def _step(self, now: float) -> None:
        for child in self._children:
            if child.process is not None:
                if _has_exited(child.process):
                    code = _reap(child.process)
                    self._schedule_restart(child, now, code, ran=now - child.started_at)
            elif child.restart_at is not None and (
                now >= child.restart_at or self._watch_changed(child)
            ):
                self._spawn(child, now)

    def _spawn(self, child: _Child, now: float) -> None:
        spec = child.spec
        try:
            process = subprocess.Popen(
                spec.argv,
                env={**os.environ, **spec.env},
                start_new_session=True,
                preexec_fn=self._preexec,  # noqa: PLW1509 -- only calls prctl(2), takes no lock
            )
        except OSError as exc:
            logger.error("%s: cannot start %s: %s", spec.name, spec.argv[0], exc)
            self._schedule_restart(child, now, None, ran=0.0)
            return
        with self._lock:
            child.process = process
            child.started_at = now
            child.starts += 1
            child.restart_at = None
            child.waiting = None
            child.watch_stamp = _stamp(spec.watch)
        logger.info("%s: started, pid %d (start %d)", spec.name, process.pid, child.starts)

    def _schedule_restart(self, child: _Child, now: float, code: int | None, ran: float) -> None:
        policy = self.policy
        what = describe(code) if code is not None else "could not start"
        with self._lock:
            child.process = None
            child.last_exit = code
            if ran >= policy.stable_after:
                child.failures = 0
            child.failures += 1
            if code == EX_CONFIG:
                delay = policy.config_delay
                also = f" or as soon as {child.spec.watch} changes" if child.spec.watch else ""
                child.waiting = (
                    f"refused its configuration ({what}); not restarting in a loop: "
                    f"next try in {delay:.0f} s{also}"
                )
            else:
                delay = policy.delay(child.failures)
                child.waiting = f"{what} after {ran:.1f} s; restart in {delay:.1f} s"
            child.next_delay = delay
            child.restart_at = now + delay
        logger.error("%s: %s", child.spec.name, child.waiting)

    def _watch_changed(self, child: _Child) -> bool:
        watch = child.spec.watch
        if child.last_exit != EX_CONFIG or watch is None:
            return False
        if _stamp(watch) == child.watch_stamp:
            return False
        logger.info("%s: %s changed, restarting now", child.spec.name, watch)
        return True

    def _timeout(self, now: float) -> float:
        due = [c.restart_at - now for c in self._children if c.restart_at is not None]
        return max(0.0, min([self.poll_interval, *due]))

    def _wait(self, timeout: float) -> None:
        """Sleep until ``timeout``, a stop request, or (with the handlers) a child's exit."""
        readable, _, _ = select.select([self._wake_r], [], [], timeout)
        if readable:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake_r, 512):
                    pass

    # ------------------------------------------------------------------ stopping

    def _shutdown(self) -> int:
        alive = [c for c in self._children if c.process is not None]
        logger.info("stopping %s", ", ".join(c.spec.name for c in alive) or "nothing")
        if not self._force:
            for child in alive:
                assert child.process is not None
                # os.kill, not send_signal: that reaps an exited child, and the pid must stay
                # unreaped until its process group is cleaned up (see _has_exited).
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.process.pid, signal.SIGTERM)
            deadline = time.monotonic() + self.policy.stop_grace
            while alive and not self._force and time.monotonic() < deadline:
                for child in list(alive):
                    if self._stopped(child):
                        alive.remove(child)
                if alive:
                    self._wait(min(self.poll_interval, max(0.0, deadline - time.monotonic())))
        forced = self._force
        if alive:
            names = ", ".join(c.spec.name for c in alive)
            if forced:
                logger.warning("killing %s at once, as asked", names)
            else:
                logger.error(
                    "killing %s: no stop within %.0f s of SIGTERM", names, self.policy.stop_grace
                )
        self._kill_remaining()
        if forced:
            return EX_INTERRUPTED
        return EX_SOFTWARE if alive else EX_OK

    def _stopped(self, child: _Child) -> bool:
        process = child.process
        if process is None or not _has_exited(process):
            return process is None
        code = _reap(process)
        with self._lock:
            child.process = None
            child.last_exit = code
            child.waiting = "stopped"
        logger.info("%s: stopped (%s)", child.spec.name, describe(code))
        return True

    def _kill_remaining(self) -> None:
        for child in self._children:
            process = child.process
            if process is None:
                continue
            _kill_group(process.pid)
            code = _reap(process)
            with self._lock:
                child.process = None
                child.last_exit = code
                child.waiting = "killed"

    def _restore_signal_handlers(self) -> None:
        if self._saved_wakeup_fd is not None:
            signal.set_wakeup_fd(self._saved_wakeup_fd)
            self._saved_wakeup_fd = None
        for signum, handler in self._saved_handlers.items():
            signal.signal(signum, handler)
        self._saved_handlers.clear()

    def _close_pipe(self) -> None:
        with self._pipe_lock:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1


# ---------------------------------------------------------------------- process helpers


def _has_exited(process: subprocess.Popen[bytes]) -> bool:
    """True once the child has exited, without reaping it.

    While the exited child is not reaped its pid cannot be reused, so :func:`_reap` can still kill
    what is left of its process group safely.
    """
    if process.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _reap(process: subprocess.Popen[bytes]) -> int:
    """Kill the leftovers of the child's process group, then collect its return code."""
    _kill_group(process.pid)
    try:
        return process.wait(timeout=_REAP_TIMEOUT)
    except subprocess.TimeoutExpired:
        logger.error("pid %d does not die even after SIGKILL; leaving it", process.pid)
        return -signal.SIGKILL


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _stamp(path: Path | None) -> tuple[int, int, int] | None:
    """What tells a changed file: inode (atomic replace), mtime and size; None when absent."""
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _ignore_signal(signum: int, frame: FrameType | None) -> None:
    """A handler that does nothing; installing it is what makes the wake-up fd fire."""


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGTERM the child when the supervisor dies (Linux).

    It runs in the forked child before ``exec`` and only calls ``prctl(2)``, which takes no lock,
    so it is safe even when the supervisor has threads. Note that the kernel ties the signal to
    the *thread* that forked: run the supervisor in the thread that lives as long as it.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def die_with_parent() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os._exit(EX_SOFTWARE)

    return die_with_parent
