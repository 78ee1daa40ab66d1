"""The example module (modules/example): mercure's contract, and switches for processor tests."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests import dicom_factory

ROOT = Path(__file__).resolve().parent.parent
MODULE_DIR = ROOT / "modules" / "example"
sys.path.insert(0, str(MODULE_DIR))

from caduceus_example.__main__ import main  # noqa: E402


def prepare(tmp_path: Path, settings: dict[str, Any] | None, *, slices: int = 2) -> Path:
    in_dir = tmp_path / "in"
    dicom_factory.ct_series(in_dir, slices, rows=8, columns=8)
    if settings is not None:
        task = {"id": "t1", "process": {"module_name": "example", "settings": settings}}
        (in_dir / "task.json").write_text(json.dumps(task))
    return in_dir


def run_in_process(in_dir: Path, out_dir: Path) -> tuple[int, str]:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main([], {"MERCURE_IN_DIR": str(in_dir), "MERCURE_OUT_DIR": str(out_dir)})
    return code, stderr.getvalue()


def run_subprocess(in_dir: Path, out_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(MODULE_DIR),
        "MERCURE_IN_DIR": str(in_dir),
        "MERCURE_OUT_DIR": str(out_dir),
    }
    return subprocess.run(
        [sys.executable, "-m", "caduceus_example"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_copies_every_dicom_file_unchanged_and_counts_them(tmp_path: Path) -> None:
    in_dir, out_dir = prepare(tmp_path, {}, slices=3), tmp_path / "out"
    proc = run_subprocess(in_dir, out_dir)
    assert proc.returncode == 0, proc.stderr
    copied = sorted(path.name for path in out_dir.glob("*.dcm"))
    assert copied == sorted(path.name for path in in_dir.glob("*.dcm"))
    for name in copied:
        assert (out_dir / name).read_bytes() == (in_dir / name).read_bytes()
    assert json.loads((out_dir / "result.json").read_text()) == {"copied": 3}
    assert not (out_dir / "task.json").exists()


def test_runs_without_task_json(tmp_path: Path) -> None:
    in_dir, out_dir = prepare(tmp_path, None), tmp_path / "out"
    assert run_in_process(in_dir, out_dir)[0] == 0
    assert json.loads((out_dir / "result.json").read_text()) == {"copied": 2}


def test_exit_code_setting_simulates_a_failing_module(tmp_path: Path) -> None:
    in_dir, out_dir = prepare(tmp_path, {"exit_code": 7}), tmp_path / "out"
    proc = run_subprocess(in_dir, out_dir)
    assert proc.returncode == 7
    assert "exit code 7" in proc.stderr


def test_result_setting_is_written_as_result_json(tmp_path: Path) -> None:
    result = {"__mercure_routing": {"target": ["pacs-b"]}, "score": 0.9}
    in_dir, out_dir = prepare(tmp_path, {"result": result}), tmp_path / "out"
    assert run_in_process(in_dir, out_dir)[0] == 0
    assert json.loads((out_dir / "result.json").read_text()) == result


def test_notification_setting_requests_a_completion_notification(tmp_path: Path) -> None:
    in_dir, out_dir = prepare(tmp_path, {"notification": "2 lesions"}), tmp_path / "out"
    assert run_in_process(in_dir, out_dir)[0] == 0
    result = json.loads((out_dir / "result.json").read_text())
    assert result["__mercure_notification"] == {"text": "2 lesions", "requested": True}
    assert result["copied"] == 2


def test_write_marker_touches_a_file_before_the_work(tmp_path: Path) -> None:
    in_dir, out_dir = prepare(tmp_path, {"write_marker": "started"}), tmp_path / "out"
    assert run_in_process(in_dir, out_dir)[0] == 0
    assert (out_dir / "started").is_file()


def test_sleep_setting_delays_the_module(tmp_path: Path) -> None:
    in_dir, out_dir = prepare(tmp_path, {"sleep": 0.5}), tmp_path / "out"
    started = time.monotonic()
    assert run_in_process(in_dir, out_dir)[0] == 0
    assert time.monotonic() - started >= 0.5


def test_chain_uses_the_first_steps_settings(tmp_path: Path) -> None:
    in_dir, out_dir = prepare(tmp_path, None), tmp_path / "out"
    process = [{"module_name": "a", "settings": {"exit_code": 3}}, {"module_name": "b"}]
    (in_dir / "task.json").write_text(json.dumps({"process": process}))
    assert run_in_process(in_dir, out_dir)[0] == 3


@pytest.mark.parametrize(
    "settings",
    [{"sleep": "long"}, {"exit_code": 256}, {"result": [1]}, {"write_marker": "../escape"}],
    ids=["sleep", "exit-code", "result", "marker"],
)
def test_malformed_settings_exit_2_with_the_reason(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    in_dir, out_dir = prepare(tmp_path, settings), tmp_path / "out"
    code, stderr = run_in_process(in_dir, out_dir)
    assert code == 2
    assert "configuration error" in stderr
