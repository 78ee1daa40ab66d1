"""The supervisor with real child processes (small ``python -c`` programs)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from common.exitcodes import EX_CONFIG, EX_INTERRUPTED, EX_OK, EX_SOFTWARE
from common.supervisor import ChildSpec, ChildStatus, RestartPolicy, Supervisor
from tests.helpers import wait_until

FAST = RestartPolicy(
    initial_delay=0.05, max_delay=0.4, stable_after=30, config_delay=60, stop_grace=5
)

# A child that stops cleanly on SIGTERM, like a service should; "ready" once it can.
SERVE = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
open(sys.argv[-1], "w").write("ready")
while True:
    time.sleep(0.05)
"""

# A child that ignores SIGTERM; "ready" once it does.
STUBBORN = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[-1], "w").write("ready")
time.sleep(60)
"""


def holds_for(condition: Callable[[], object], duration: float) -> bool:
    """True when ``condition`` stays true for the whole ``duration`` (a bounded observation)."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        if not condition():
            return False
        time.sleep(0.02)
    return bool(condition())


def py(code: str, *args: str) -> tuple[str, ...]:
    return (sys.executable, "-c", textwrap.dedent(code), *args)


def pid_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class Running:
    """A supervisor running in a thread, with its result."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.result: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.result = self.supervisor.run()

    def child(self, name: str = "child") -> ChildStatus:
        return next(s for s in self.supervisor.status() if s.name == name)

    def stop(self, timeout: float = 10.0) -> int | None:
        self.supervisor.stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "supervisor did not stop"
        return self.result


@pytest.fixture
def supervise() -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(*specs: ChildSpec, policy: RestartPolicy = FAST) -> Running:
        running = Running(Supervisor(specs, policy, poll_interval=0.02))
        started.append(running)
        return running

    yield start
    for running in started:
        running.supervisor.stop(force=True)
        running.thread.join(10)


def is_ready(path: Path) -> bool:
    return path.exists() and path.read_text() == "ready"


def lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


# ---------------------------------------------------------------------- restarts


def test_child_that_exits_with_an_error_is_restarted(
    supervise: Callable[..., Running], tmp_path: Path
) -> None:
    log = tmp_path / "starts"
    code = "import os, sys; open(sys.argv[1], 'a').write(f'{os.getpid()}\\n'); sys.exit(3)"
    running = supervise(ChildSpec("child", py(code, str(log))))

    wait_until(lambda: len(lines(log)) >= 3 and running.child().pid is None, what="three starts")

    assert len(set(lines(log))) >= 3  # each start is a new process
    status = running.child()
    assert status.last_exit == 3
    assert status.waiting is not None and "exit 3" in status.waiting
    assert running.stop() == EX_OK


def test_restart_delay_doubles_while_the_child_keeps_failing(
    supervise: Callable[..., Running], tmp_path: Path
) -> None:
    log = tmp_path / "starts"
    code = "import sys, time; open(sys.argv[1], 'a').write(f'{time.time()}\\n'); sys.exit(1)"
    policy = RestartPolicy(initial_delay=0.2, max_delay=10, stable_after=30, stop_grace=5)
    running = supervise(ChildSpec("child", py(code, str(log))), policy=policy)

    wait_until(lambda: len(lines(log)) >= 4, what="four starts")
    running.stop()

    starts = [float(line) for line in lines(log)]
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    planned = [0.2, 0.4, 0.8]
    for gap, delay in zip(gaps, planned, strict=False):
        assert gap >= delay
    assert gaps[0] < gaps[1] < gaps[2]


def test_restart_delay_is_capped_and_never_overflows() -> None:
    policy = RestartPolicy(initial_delay=1, max_delay=60)

    assert [policy.delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert policy.delay(100_000) == 60


def test_delay_starts_over_after_a_stable_run(
    supervise: Callable[..., Running], tmp_path: Path
) -> None:
    log = tmp_path / "starts"
    code = "import sys, time; open(sys.argv[1], 'a').write('x\\n'); time.sleep(0.3); sys.exit(1)"
    policy = RestartPolicy(initial_delay=0.05, max_delay=10, stable_after=0.2, stop_grace=5)
    running = supervise(ChildSpec("child", py(code, str(log))), policy=policy)

    wait_until(lambda: len(lines(log)) >= 3 and running.child().failures >= 1, what="restarts")

    status = running.child()
    assert status.failures == 1
    assert status.next_delay == pytest.approx(0.05)


def test_child_refusing_its_configuration_is_not_restarted_in_a_loop(
    supervise: Callable[..., Running], tmp_path: Path
) -> None:
    log = tmp_path / "starts"
    code = f"import sys; open(sys.argv[1], 'a').write('x\\n'); sys.exit({EX_CONFIG})"
    running = supervise(ChildSpec("child", py(code, str(log))))

    wait_until(lambda: running.child().last_exit == EX_CONFIG, what="the EX_CONFIG exit")

    assert holds_for(lambda: len(lines(log)) == 1, duration=1.0)  # FAST would restart 10 times
    status = running.child()
    assert status.next_delay == FAST.config_delay
    assert status.waiting is not None and "configuration" in status.waiting


def test_changed_configuration_ends_the_wait_after_a_refusal(
    supervise: Callable[..., Running], tmp_path: Path
) -> None:
    config = tmp_path / "caduceus.json"
    config.write_text("bad")
    code = (
        "import pathlib, sys\n"
        f"if pathlib.Path(sys.argv[1]).read_text() == 'bad': sys.exit({EX_CONFIG})\n" + SERVE
    )
    ready = tmp_path / "ready"
    running = supervise(ChildSpec("child", py(code, str(config), str(ready)), watch=config))
    wait_until(lambda: running.child().last_exit == EX_CONFIG, what="the refusal")

    fixed = tmp_path / "caduceus.json.new"
    fixed.write_text("good")
    fixed.replace(config)

    wait_until(lambda: is_ready(ready), timeout=5, what="the restart")
    assert running.child().starts == 2
    pid = running.child().pid
    assert pid is not None
    assert holds_for(lambda: running.child().pid == pid, duration=0.3)  # it stays up
    assert running.stop() == EX_OK


def test_command_that_cannot_start_is_retried_with_backoff(
    supervise: Callable[..., Running], tmp_path: Path
) -> None:
    running = supervise(ChildSpec("child", (str(tmp_path / "no-such-program"),)))

    wait_until(lambda: running.child().failures >= 3, what="three failed starts")

    status = running.child()
    assert status.starts == 0
    assert status.waiting is not None and "could not start" in status.waiting
    assert running.stop() == EX_OK


# ---------------------------------------------------------------------- stopping


def test_stop_ends_every_child_cleanly_and_returns_ok(
    supervise: Callable[..., Running], tmp_path: Path
) -> None:
    ready = [tmp_path / "one", tmp_path / "two"]
    running = supervise(*(ChildSpec(path.name, py(SERVE, str(path))) for path in ready))
    wait_until(lambda: all(is_ready(path) for path in ready), what="both started")
    pids = [s.pid for s in running.supervisor.status()]

    assert running.stop() == EX_OK

    assert all(pid is not None and pid_gone(pid) for pid in pids)
    assert [s.last_exit for s in running.supervisor.status()] == [0, 0]


def test_child_ignoring_sigterm_is_killed_after_the_grace_period(
    supervise: Callable[..., Running], tmp_path: Path
) -> None:
    ready = tmp_path / "ready"
    policy = RestartPolicy(stop_grace=0.5)
    running = supervise(ChildSpec("child", py(STUBBORN, str(ready))), policy=policy)
    wait_until(lambda: is_ready(ready), what="the start")
    pid = running.child().pid
    assert pid is not None

    started = time.monotonic()
    assert running.stop() == EX_SOFTWARE

    assert time.monotonic() - started < 5
    assert pid_gone(pid)
    assert running.child().last_exit == -signal.SIGKILL


def test_second_stop_kills_at_once(supervise: Callable[..., Running], tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    policy = RestartPolicy(stop_grace=60)
    running = supervise(ChildSpec("child", py(STUBBORN, str(ready))), policy=policy)
    wait_until(lambda: is_ready(ready), what="the start")

    running.supervisor.stop()
    assert holds_for(running.thread.is_alive, duration=0.3)  # waiting out the grace period
    running.supervisor.stop()
    running.thread.join(5)

    assert running.result == EX_INTERRUPTED


GRANDPARENT = """
import subprocess, sys
helper = subprocess.Popen(["sleep", "60"])
open(sys.argv[1], "w").write(str(helper.pid))
sys.exit(int(sys.argv[2]))
"""


def test_leftover_processes_of_a_crashed_child_are_killed(
    supervise: Callable[..., Running], tmp_path: Path
) -> None:
    helper_file = tmp_path / "helper"
    running = supervise(ChildSpec("child", py(GRANDPARENT, str(helper_file), "1")))

    wait_until(lambda: helper_file.exists() and helper_file.read_text(), what="the helper")
    helper = int(helper_file.read_text())

    wait_until(lambda: pid_gone(helper), timeout=5, what="the helper to be killed")
    running.stop()


def test_stop_leaves_no_helper_of_a_child_behind(
    supervise: Callable[..., Running], tmp_path: Path
) -> None:
    helper_file = tmp_path / "helper"
    ready = tmp_path / "ready"
    code = GRANDPARENT.replace("sys.exit(int(sys.argv[2]))", SERVE)
    running = supervise(ChildSpec("child", py(code, str(helper_file), "0", str(ready))))
    wait_until(lambda: is_ready(ready), what="the child and its helper")
    helper = int(helper_file.read_text())

    assert running.stop() == EX_OK

    wait_until(lambda: pid_gone(helper), timeout=5, what="the helper to be killed")


# ---------------------------------------------------------------------- signals, real process

SUPERVISOR_SCRIPT = """
import json, sys
from common.supervisor import ChildSpec, RestartPolicy, Supervisor
specs = [ChildSpec(name, tuple(argv)) for name, argv in json.loads(sys.argv[1])]
supervisor = Supervisor(specs, RestartPolicy(stop_grace=5), poll_interval=0.05)
supervisor.install_signal_handlers()
sys.exit(supervisor.run())
"""

# Records every signal it gets; stops 0.5 s after the first, so that a second one would be seen.
RECORDER = """
import signal, sys, time
log = sys.argv[1]
got = []
def record(signum, frame):
    got.append(signum)
    open(log, "a").write(signal.Signals(signum).name + "\\n")
for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(signum, record)
open(log, "a").write("ready\\n")
while not got:
    time.sleep(0.02)
deadline = time.monotonic() + 0.5
while time.monotonic() < deadline:
    time.sleep(0.02)
sys.exit(0)
"""


def start_supervisor_process(children: list[tuple[str, tuple[str, ...]]]) -> subprocess.Popen[str]:
    # A new session stands in for a terminal: its process group is the "foreground group".
    return subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR_SCRIPT, json.dumps(children)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def test_ctrl_c_gives_each_child_exactly_one_stop_signal(tmp_path: Path) -> None:
    logs = [tmp_path / "one", tmp_path / "two"]
    proc = start_supervisor_process([(log.name, py(RECORDER, str(log))) for log in logs])
    try:
        wait_until(lambda: all("ready" in lines(log) for log in logs), what="children ready")

        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does

        assert proc.wait(timeout=10) == EX_OK
    finally:
        proc.kill()
        proc.wait()
    assert [lines(log) for log in logs] == [["ready", "SIGTERM"], ["ready", "SIGTERM"]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_children_stop_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    log = tmp_path / "child"
    proc = start_supervisor_process([("child", py(RECORDER, str(log)))])
    try:
        wait_until(lambda: "ready" in lines(log), what="the child")
        child_pids = [c.pid for c in psutil.Process(proc.pid).children()]

        proc.kill()
        proc.wait(timeout=10)
    finally:
        proc.kill()
        proc.wait()

    try:
        wait_until(lambda: "SIGTERM" in lines(log), timeout=5, what="the child's SIGTERM")
        wait_until(lambda: all(pid_gone(pid) for pid in child_pids), timeout=5, what="its exit")
    finally:
        for pid in child_pids:
            if not pid_gone(pid):
                os.kill(pid, signal.SIGKILL)
