"""Process plumbing for the benchmarks: ports, readiness, RSS sampling, orderly stops.

Every wait has a deadline; every process is stopped by its own pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

SAMPLE_INTERVAL = 0.05
"""RSS sampling period in seconds (50 ms)."""


def dcmtk_env() -> dict[str, str]:
    """The environment for DCMTK tools: ``TCP_NODELAY=1``.

    DCMTK (Debian's 3.6.7 build, compiled without ``DISABLE_NAGLE_ALGORITHM``) leaves Nagle on
    unless the environment variable ``TCP_NODELAY`` is set to a non-zero number; it reads it in
    ``dul.cc`` (acceptor) and ``dulfsm.cc`` (requestor). See :func:`dcmtk_nodelay_honoured`.
    """
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


QUIET_CPU_PERCENT = 25.0
QUIET_MAX_WAIT_S = 60.0


def wait_quiet(threshold: float = QUIET_CPU_PERCENT, max_wait_s: float = QUIET_MAX_WAIT_S) -> float:
    """Wait until the machine's CPU use over 0.5 s is below ``threshold`` percent.

    Other work on the machine (a test suite, say) skews throughput on 2 cores. Gives up after
    ``max_wait_s`` and returns the last CPU use seen, so the report can say the run was disturbed.
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        busy = float(psutil.cpu_percent(interval=0.5))
        if busy < threshold or time.monotonic() > deadline:
            return busy


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def echo(port: int, timeout: float = 5.0, debug: bool = False) -> subprocess.CompletedProcess[str]:
    """One C-ECHO with DCMTK ``echoscu`` (with ``TCP_NODELAY=1``)."""
    args = ["echoscu", "-to", "2", "-ta", "2", "-td", "2"]
    if debug:
        args.append("-d")
    return subprocess.run(
        [*args, "127.0.0.1", str(port)],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_for_echo(port: int, proc: subprocess.Popen[bytes], deadline_s: float = 60.0) -> None:
    """Return once a C-ECHO on ``port`` succeeds; raise if ``proc`` dies or the deadline passes."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"peer exited with {proc.returncode} before answering C-ECHO")
        with contextlib.suppress(subprocess.TimeoutExpired):
            if echo(port).returncode == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"no C-ECHO answer on port {port} within {deadline_s:.0f} s")


def dcmtk_nodelay_honoured(port: int) -> bool:
    """Whether ``echoscu -d`` reports disabling Nagle with our environment (checks the build)."""
    out = echo(port, debug=True)
    return "disabling Nagle algorithm" in (out.stdout + out.stderr)


def tool_version(tool: str) -> str:
    out = subprocess.run([tool, "--version"], capture_output=True, text=True, check=False)
    first = (out.stdout or out.stderr).strip().splitlines()
    return first[0].strip("$ ") if first else "unknown"


@dataclass
class RssPeak:
    """Peak resident set sizes seen by a :class:`RssSampler`, in bytes."""

    total: int = 0
    pss_total: int | None = None
    per_process: dict[int, int] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)

    @property
    def max_process(self) -> int:
        return max(self.per_process.values(), default=0)


class RssSampler:
    """Samples the RSS of a process and all its descendants every 50 ms in a thread.

    ``total`` is the largest sum over one sample; ``per_process`` the largest RSS of each pid.
    With ``pss``, also the largest sum of proportional set sizes (shared pages divided among the
    processes sharing them), which costs ~0.5 ms per process and sample, so it is opt-in.
    """

    def __init__(self, pid: int, pss: bool = False) -> None:
        self._root = psutil.Process(pid)
        self._pss = pss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self.peak = RssPeak()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(SAMPLE_INTERVAL):
                self.sample()
                return

    def sample(self) -> None:
        try:
            procs = [self._root, *self._root.children(recursive=True)]
        except psutil.Error:
            return
        total = pss_total = 0
        for proc in procs:
            try:
                if self._pss:
                    full = proc.memory_full_info()
                    rss, pss_total = int(full.rss), pss_total + int(full.pss)
                else:
                    rss = int(proc.memory_info().rss)
                name = " ".join(proc.cmdline()[:3])
            except psutil.Error:
                continue
            total += rss
            if rss > self.peak.per_process.get(proc.pid, 0):
                self.peak.per_process[proc.pid] = rss
                self.peak.names[proc.pid] = name
        self.peak.total = max(self.peak.total, total)
        if self._pss:
            self.peak.pss_total = max(self.peak.pss_total or 0, pss_total)


def start(
    args: list[str], log: Path, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``args`` with stdout and stderr to ``log``, in a session of its own."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> tuple[int | None, bool]:
    """SIGTERM ``proc``; wait up to ``timeout``; SIGKILL it and its children if still alive.

    Returns ``(returncode, stopped_cleanly)``.
    """
    if proc.poll() is not None:
        return proc.returncode, True
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    proc.send_signal(signal.SIGTERM)
    try:
        code: int | None = proc.wait(timeout=timeout)
        clean = True
    except subprocess.TimeoutExpired:
        proc.kill()
        code, clean = proc.wait(timeout=10), False
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.wait(timeout=0 if not clean else 5)
        with contextlib.suppress(psutil.Error):
            if child.is_running():
                child.kill()
                clean = False
    return code, clean
