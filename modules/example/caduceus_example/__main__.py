"""Entry point: ``python -m caduceus_example`` copies its input to its output (mercure's contract).

Reads ``$MERCURE_IN_DIR/task.json`` (default ``/tmp/data``) -> ``process.settings``, copies every
``*.dcm`` to ``$MERCURE_OUT_DIR`` (default ``/tmp/output``) under the same name and writes
``result.json``. Optional settings, for tests of a processor (see README.md): ``sleep``,
``exit_code``, ``result``, ``write_marker``, ``notification``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_CONFIG = 2  # task.json or the settings are malformed
MAX_SLEEP_SECONDS = 24 * 3600


class SettingsError(Exception):
    """task.json or its settings are malformed."""


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run once; ``environ`` defaults to ``os.environ``. Returns the exit code."""
    env = os.environ if environ is None else environ
    in_dir = Path(env.get("MERCURE_IN_DIR", "/tmp/data"))  # noqa: S108 - mercure's contract
    out_dir = Path(env.get("MERCURE_OUT_DIR", "/tmp/output"))  # noqa: S108
    try:
        settings = read_settings(in_dir)
        sleep, exit_code, marker = _options(settings)
    except SettingsError as exc:
        print(f"caduceus-example: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"caduceus-example: settings {sorted(settings)}", file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)
    if marker:
        (out_dir / marker).touch()
    if sleep:
        time.sleep(sleep)
    copied = copy_dicom(in_dir, out_dir)
    result: dict[str, Any] = settings.get("result") or {"copied": copied}
    if "notification" in settings:
        result["__mercure_notification"] = {
            "text": str(settings["notification"]),
            "requested": True,
        }
    (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"caduceus-example: copied {copied} file(s), exit code {exit_code}", file=sys.stderr)
    return exit_code


def read_settings(in_dir: Path) -> dict[str, Any]:
    """``process.settings`` of ``in_dir/task.json`` (a chain: the first step's); ``{}`` if none."""
    try:
        task = json.loads((in_dir / "task.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise SettingsError(f"task.json cannot be read: {exc}") from None
    process = task.get("process") if isinstance(task, dict) else None
    if isinstance(process, list):
        process = process[0] if process else None
    settings = process.get("settings") if isinstance(process, dict) else None
    if settings is not None and not isinstance(settings, dict):
        raise SettingsError("process.settings is not a JSON object")
    return dict(settings or {})


def _options(settings: Mapping[str, Any]) -> tuple[float, int, str]:
    sleep = settings.get("sleep", 0)
    if isinstance(sleep, bool) or not isinstance(sleep, int | float):
        raise SettingsError("sleep must be a number of seconds")
    exit_code = settings.get("exit_code", 0)
    if isinstance(exit_code, bool) or not isinstance(exit_code, int) or not 0 <= exit_code <= 255:
        raise SettingsError("exit_code must be an integer from 0 to 255")
    result = settings.get("result")
    if result is not None and not isinstance(result, dict):
        raise SettingsError("result must be a JSON object")
    marker = settings.get("write_marker", "")
    if not isinstance(marker, str) or "/" in marker or marker in (".", ".."):
        raise SettingsError("write_marker must be a file name")
    return min(max(float(sleep), 0.0), MAX_SLEEP_SECONDS), exit_code, marker


def copy_dicom(in_dir: Path, out_dir: Path) -> int:
    """Copy every ``*.dcm`` of ``in_dir`` to ``out_dir`` under its name; return how many."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = sorted(p for p in in_dir.glob("*.dcm") if p.is_file())
    for source in sources:
        shutil.copyfile(source, out_dir / source.name)
    return len(sources)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
