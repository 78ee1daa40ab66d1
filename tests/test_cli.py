"""The ``caduceus`` command: in-process for the quick commands, as a real process for ``up``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from common.cli import SERVICES, is_implemented, main
from common.config import CONFIG_ENV
from common.exitcodes import EX_CONFIG, EX_OK, EX_UNAVAILABLE, EX_USAGE
from tests.helpers import free_port, wait_until


def accepts_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def pid_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def write_config(path: Path, **settings: object) -> Path:
    path.write_text(json.dumps(settings))
    return path


@pytest.fixture
def no_config_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)


# ---------------------------------------------------------------------- config check / init


def test_config_check_accepts_a_valid_file_and_summarises_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(
        tmp_path / "caduceus.json",
        data_root=str(tmp_path / "spool"),
        targets={"pacs": {"target_type": "dicom", "ip": "pacs", "port": 104, "aet_target": "PACS"}},
        rules={"ct": {"rule": 'tags.Modality == "CT"', "action": "route", "target": "pacs"}},
    )

    assert main(["config", "check", str(config)]) == EX_OK

    out = capsys.readouterr().out
    assert out.startswith(f"OK {config}")
    assert "1 target, 1 rule, 0 modules" in out
    assert str(tmp_path / "spool") in out


def test_config_check_names_the_invalid_field_and_exits_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "caduceus.json", rules={"ct": {"action": "teleport"}})

    assert main(["config", "check", str(config)]) == EX_CONFIG

    captured = capsys.readouterr()
    assert "rules.ct.action" in captured.err
    assert "OK" not in captured.out


@pytest.mark.parametrize(
    ("field", "value"), [("processing_timeout", -5), ("dispatcher_max_parallel", 0)]
)
def test_config_check_refuses_a_bad_service_setting_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str, value: int
) -> None:
    config = write_config(tmp_path / "caduceus.json", **{field: value})

    assert main(["config", "check", str(config)]) == EX_CONFIG

    assert f"{field}:" in capsys.readouterr().err


def test_config_check_of_a_missing_file_exits_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "check", str(tmp_path / "absent.json")]) == EX_CONFIG
    assert "absent.json" in capsys.readouterr().err


def test_config_check_takes_the_file_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "from-env.json", data_root=str(tmp_path))
    monkeypatch.setenv(CONFIG_ENV, str(config))

    assert main(["config", "check"]) == EX_OK
    assert f"OK {config}" in capsys.readouterr().out


def test_config_init_writes_a_default_once_and_never_overwrites(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config" / "caduceus.json"

    assert main(["config", "init", "--config", str(config)]) == EX_OK
    assert main(["config", "check", str(config)]) == EX_OK
    config.write_text(config.read_text().replace('"master"', '"mine"'))
    edited = config.read_text()

    assert main(["config", "init", "--config", str(config)]) == EX_OK

    assert config.read_text() == edited
    assert "left unchanged" in capsys.readouterr().out


# ---------------------------------------------------------------------- services, usage


def test_unimplemented_service_is_refused_with_a_clear_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    missing = [service for service in SERVICES if not is_implemented(service)]
    if not missing:
        pytest.skip("every service is implemented")

    assert main([missing[0]]) == EX_UNAVAILABLE
    assert f"the {missing[0]} service is not implemented yet" in capsys.readouterr().err


def test_service_command_hands_its_arguments_to_the_service(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["receiver", "--help"]) == EX_OK
    assert "--config" in capsys.readouterr().out


def test_no_command_prints_the_help_and_exits_64(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == EX_USAGE
    assert "config" in capsys.readouterr().err


def test_unknown_service_in_only_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["up", "--only", "receiver,teleporter"]) == EX_USAGE
    assert "teleporter" in capsys.readouterr().err


# ---------------------------------------------------------------------- caduceus up


class Up:
    """``caduceus up`` as a real process in a session of its own (as if run in a terminal)."""

    def __init__(self, *args: str, cwd: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != CONFIG_ENV}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "common.cli", "up", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def descendants(self) -> list[int]:
        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def wait(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        """Clean up after the test, whatever state it left."""
        for pid in [*self.descendants(), self.proc.pid]:
            if not pid_gone(pid):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        self._reader.join(5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def run_up() -> Iterator[Callable[..., Up]]:
    started: list[Up] = []

    def start(*args: str, cwd: Path) -> Up:
        up = Up(*args, cwd=cwd)
        started.append(up)
        return up

    yield start
    for up in started:
        up.kill()


def test_up_generates_a_default_config_when_absent_and_prints_the_spool_paths(
    run_up: Callable[..., Up], tmp_path: Path
) -> None:
    up = run_up(cwd=tmp_path)

    wait_until(lambda: "Starting" in up.output, what="the start line")
    up.proc.send_signal(signal.SIGTERM)

    assert up.wait() == EX_OK, up.output
    config = tmp_path / "config" / "caduceus.json"
    assert f"No configuration at {config}: wrote a default one" in up.output
    assert f"Configuration: {config}" in up.output
    assert str(tmp_path / "data" / "incoming") in up.output
    assert (tmp_path / "data" / "incoming").is_dir()
    assert main(["config", "check", str(config)]) == EX_OK


@pytest.mark.parametrize(
    "stop",
    [
        pytest.param(lambda pid: os.kill(pid, signal.SIGTERM), id="sigterm"),
        pytest.param(lambda pid: os.killpg(pid, signal.SIGINT), id="ctrl-c-to-the-group"),
    ],
)
def test_stopping_up_stops_its_services_and_leaves_no_process_behind(
    run_up: Callable[..., Up], tmp_path: Path, stop: Callable[[int], None]
) -> None:
    port = free_port()
    config = write_config(tmp_path / "caduceus.json", data_root=str(tmp_path / "data"), port=port)
    up = run_up("--config", str(config), "--only", "receiver", cwd=tmp_path)
    wait_until(lambda: accepts_connections(port), what="the receiver to listen")
    processes = up.descendants()
    assert processes

    stop(up.proc.pid)

    assert up.wait() == EX_OK, up.output
    assert "receiver: stopped" in up.output
    wait_until(lambda: all(pid_gone(pid) for pid in processes), timeout=5, what="no process left")
    assert not accepts_connections(port)


def test_up_refuses_an_invalid_configuration_and_starts_nothing(
    run_up: Callable[..., Up], tmp_path: Path
) -> None:
    config = write_config(tmp_path / "caduceus.json", port=0)
    up = run_up("--config", str(config), cwd=tmp_path)

    assert up.wait() == EX_CONFIG
    assert "port" in up.output
    assert "Starting" not in up.output
