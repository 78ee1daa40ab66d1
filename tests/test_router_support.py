"""Helpers shared by the router tests (this module holds no tests).

A real spool in ``tmp_path``: instances are written the way the receiver writes them (the
``.dcm`` first, then its ``.tags``), configurations as ``caduceus.json`` files, and the router
runs either in process (``Router.once``) or as its own OS process (``python -m router``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from common.config import Config, load_config
from common.outbox import Event, Outbox
from common.spool import SpoolPaths
from router.hooks import HOOK_ENV
from router.service import Router

API_KEY = "test-token-0123456789"
DICOM_BYTES = b"\0" * 128 + b"DICM" + b"\x02\x00\x00\x00" * 16
TARGETS: dict[str, Any] = {
    "pacs": {"target_type": "dummy"},
    "pacs2": {"target_type": "dummy"},
    "archive": {"target_type": "dummy"},
}
MODULES: dict[str, Any] = {
    "seg": {"docker_tag": "example/seg:1", "settings": {"threshold": 0.5, "mode": "fast"}},
    "anon": {"docker_tag": "example/anon:2", "settings": {"keep": ["PatientSex"]}},
}
TASK_FOLDERS = ("outgoing", "processing", "success", "discard", "error")


def base_tags(series_uid: str, sop_uid: str, **extra: str) -> dict[str, str]:
    tags = {
        "Modality": "CT",
        "SeriesInstanceUID": series_uid,
        "StudyInstanceUID": f"{series_uid}.0",
        "SOPInstanceUID": sop_uid,
        "PatientName": "Doe^Jane",
        "PatientID": "PID-1",
        "AccessionNumber": "ACC-1",
        "SeriesDescription": "Axial 1mm",
        "SenderAET": "TESTSCU",
        "ReceiverAET": "CADUCEUS",
        "SenderAddress": "127.0.0.1",
    }
    tags.update(extra)
    return tags


def write_config(folder: Path, data_root: Path, **settings: Any) -> Path:
    """``caduceus.json`` in ``folder`` with the test targets and modules; ``settings`` (rules,
    series_complete_trigger, ...) go to the top level."""
    config: dict[str, Any] = {
        "data_root": str(data_root),
        "bookkeeper_api_key": API_KEY,
        "series_complete_trigger": 0,
        "router_scan_interval": 0.05,
        "targets": TARGETS,
        "modules": MODULES,
        "rules": {},
    }
    config.update(settings)
    path = folder / "caduceus.json"
    path.write_text(json.dumps(config, indent=2))
    return path


@dataclass
class Spool:
    """A spool and configuration in a test's folder."""

    root: Path
    config_path: Path

    @property
    def paths(self) -> SpoolPaths:
        return SpoolPaths.under(self.root)

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    def config(self) -> Config:
        return load_config(self.config_path, report=False)

    def reconfigure(self, **settings: Any) -> None:
        write_config(self.config_path.parent, self.root, **settings)

    def router(self, **kwargs: Any) -> Router:
        return Router(self.config(), self.config_path, **kwargs)

    def route_once(self, **kwargs: Any) -> Router:
        """One in-process tick of a fresh router; returns it (closed)."""
        router = self.router(**kwargs)
        try:
            router.once()
        finally:
            router.close()
        return router

    def add(
        self,
        series_uid: str,
        sop_uid: str,
        *,
        tags: Mapping[str, str] | None = None,
        side_car: bool = True,
        dicom: bytes = DICOM_BYTES,
    ) -> Path:
        """Write one instance as the receiver does: the .dcm, then (optionally) its .tags."""
        folder = self.incoming / series_uid
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{series_uid}#{sop_uid}"
        (folder / f"{stem}.dcm").write_bytes(dicom + sop_uid.encode())
        if side_car:
            self.add_side_car(series_uid, sop_uid, tags)
        return folder / f"{stem}.dcm"

    def add_side_car(
        self, series_uid: str, sop_uid: str, tags: Mapping[str, str] | None = None
    ) -> None:
        content = dict(tags) if tags is not None else base_tags(series_uid, sop_uid)
        path = self.incoming / series_uid / f"{series_uid}#{sop_uid}.tags"
        path.write_text(json.dumps(content))

    def add_series(self, series_uid: str, count: int, **tags: str) -> list[str]:
        sops = [f"{series_uid}.{n}" for n in range(1, count + 1)]
        for sop in sops:
            self.add(series_uid, sop, tags=base_tags(series_uid, sop, **tags))
        return sops

    def age(self, series_uid: str, seconds: float) -> None:
        """Make the series look as if nothing arrived for ``seconds``."""
        folder = self.incoming / series_uid
        when = time.time() - seconds
        for path in folder.iterdir():
            os.utime(path, (when, when))
        os.utime(folder, (when, when))

    def tasks(self, folder: str) -> list[dict[str, Any]]:
        """The task.json of every task folder in ``folder``."""
        base = self.root / folder
        if not base.exists():
            return []
        return [
            json.loads((path / "task.json").read_text())
            for path in sorted(base.iterdir())
            if path.is_dir() and not path.name.startswith(".")
        ]

    def task_files(self, folder: str, task_id: str) -> list[str]:
        return sorted(p.name for p in (self.root / folder / task_id).iterdir())

    def locations(self) -> dict[str, Counter[str]]:
        """For every .dcm file name: how many times it is in each place (folder or incoming)."""
        found: dict[str, Counter[str]] = {}
        for folder in (*TASK_FOLDERS, "incoming"):
            base = self.root / folder
            if not base.exists():
                continue
            for path in base.glob("*/*.dcm"):
                if path.parent.name.startswith("."):
                    continue
                found.setdefault(path.name, Counter())[folder] += 1
        return found

    def leftovers(self) -> list[Path]:
        """Hidden temporary task folders, journals and locks anywhere in the spool."""
        found: list[Path] = []
        for folder in TASK_FOLDERS:
            base = self.root / folder
            if base.exists():
                found += [p for p in base.iterdir() if p.name.startswith(".")]
        if self.incoming.exists():
            for series in self.incoming.iterdir():
                if series.name != ".tmp":
                    found += [p for p in series.iterdir() if p.name.startswith(".")]
        return found

    def events(self, kind: str | None = None) -> list[Event]:
        path = self.root / "state" / "outbox" / "router.sqlite3"
        if not path.exists():
            return []
        with Outbox(path, "tests") as box:
            events = box.pending(limit=100_000)
        return [event for event in events if kind is None or event.kind == kind]


def make_spool(tmp_path: Path, **settings: Any) -> Spool:
    root = tmp_path / "data"
    config_dir = tmp_path / "config"
    config_dir.mkdir(exist_ok=True)
    spool = Spool(root, write_config(config_dir, root, **settings))
    spool.paths.create()
    return spool


def route_rule(rule: str = "True", target: Any = "pacs", **fields: Any) -> dict[str, Any]:
    return {"rule": rule, "target": target, "action": "route", **fields}


# ---------------------------------------------------------------------------- router process


@dataclass
class RouterProcess:
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            pytest.fail(f"router did not exit within {timeout:.0f} s; log:\n{self.log()[-5000:]}")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)


def start_router(
    spool: Spool, *, once: bool = False, hook: str | None = None, name: str = "router"
) -> RouterProcess:
    env = {key: value for key, value in os.environ.items() if key != HOOK_ENV}
    if hook:
        env[HOOK_ENV] = hook
    log_path = spool.config_path.parent / f"{name}.log"
    command = [sys.executable, "-m", "router", "--config", str(spool.config_path)]
    if once:
        command.append("--once")
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
        )
    return RouterProcess(process, log_path)


def run_router_once(spool: Spool, *, hook: str | None = None, name: str = "once") -> int:
    return start_router(spool, once=True, hook=hook, name=name).wait()
