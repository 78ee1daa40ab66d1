"""The whole pipeline as real processes on one spool, for the end-to-end tests (no tests here).

receiver -> router -> dispatcher -> DCMTK ``storescp`` and Orthanc, with the cleaner running
alongside. Every service is its own OS process started with ``python -m <service> --config
PATH`` on one shared configuration file; nothing of them is patched. The pieces come from the
existing helpers: the receiver from the ``receiver`` fixture's factory, the router process from
``tests.test_router_support``, the dispatcher process and ``storescp`` from
``tests.dispatcher_helpers``, Orthanc from ``tests.orthanc`` and the cleaner process from
``tests.test_cleaner``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from common.outbox import Event
from tests import dicom_factory
from tests.dicom_factory import Instance
from tests.dispatcher_helpers import (
    DispatcherProcess,
    StoreScp,
    dicom_target,
    dispatcher_config,
    dispatcher_events,
    start_dispatcher,
)
from tests.helpers import (
    Receiver,
    ReceiverFactory,
    outbox_events,
    storescu_command,
    wait_until,
)
from tests.orthanc import ORTHANC_AET, Orthanc
from tests.test_cleaner import start_cleaner
from tests.test_router_support import (
    TASK_FOLDERS,
    RouterProcess,
    Spool,
    route_rule,
    start_router,
)

T = TypeVar("T")

STORESCP = "storescp"
ORTHANC = "orthanc"
TRIGGER = 1.0
"""``series_complete_trigger`` of the tests, seconds."""

PIPELINE_SETTINGS: dict[str, Any] = {
    "series_complete_trigger": TRIGGER,
    "router_scan_interval": 0.2,
    "dispatcher_scan_interval": 0.2,
    "cleaner_scan_interval": 0.2,
    "retry_delay": 0.5,
    "retry_max_delay": 1.0,
    "retry_max": 10,
    "emergency_clean_percentage": 100,
}
"""Short triggers and scan intervals; emergency cleaning off (the disk's fill level is not the
test's business) unless a test turns it on."""

STALE_MARKERS = (".lock", ".processing", ".routing.json", ".owner")
"""Lock, claim, journal and owner files: none may outlive a finished flow."""


# ---------------------------------------------------------------------------- test data


def study(
    folder: Path, seed: str, *, series: int = 2, per_series: int = 5, size: int = 64
) -> list[Instance]:
    """One study of ``series`` CT series, ``per_series`` 16-bit ``size``x``size`` slices each."""
    rng = random.Random(seed)
    instances: list[Instance] = []
    for number in range(1, series + 1):
        series_uid = dicom_factory.uid(seed, "series", number)
        for slice_number in range(1, per_series + 1):
            ds = dicom_factory.base_dataset(
                seed, instance_number=1000 * number + slice_number, series_uid=series_uid
            )
            ds.SeriesNumber = str(number)
            ds.SeriesDescription = f"{seed} series {number}"
            dicom_factory.set_pixels(ds, rng, rows=size, columns=size, bits=16, signed=True)
            path = dicom_factory.write(ds, folder / f"s{number}-{slice_number:04d}.dcm")
            instances.append(dicom_factory.describe(path))
    return instances


# ---------------------------------------------------------------------------- the pipeline


@dataclass
class Pipeline:
    """The running services of one test, on the spool under ``data_root``."""

    tmp_path: Path
    receivers: ReceiverFactory
    receiver: Receiver
    scp: StoreScp
    pacs: Orthanc
    router: RouterProcess | None = None
    dispatcher: DispatcherProcess | None = None
    cleaner: subprocess.Popen[bytes] | None = None
    finished: list[RouterProcess | DispatcherProcess] = field(default_factory=list)
    """Processes that ended (killed, or replaced); their logs are still shown."""

    @property
    def config_path(self) -> Path:
        return self.receiver.config_path

    @property
    def data_root(self) -> Path:
        return self.receiver.data_root

    @property
    def spool(self) -> Spool:
        return Spool(self.data_root, self.config_path)

    # ------------------------------------------------------------------ services

    def start_router(self, *, hook: str | None = None) -> RouterProcess:
        """``python -m router``; ``hook`` is a ``CADUCEUS_ROUTER_TEST_HOOK`` specification."""
        number = len([p for p in self.finished if isinstance(p, RouterProcess)]) + 1
        self.router = start_router(self.spool, hook=hook, name=f"router-{number}")
        return self.router

    def start_dispatcher(self) -> DispatcherProcess:
        number = len([p for p in self.finished if isinstance(p, DispatcherProcess)]) + 1
        log_path = self.config_path.parent / f"dispatcher-{number}.log"
        self.dispatcher = start_dispatcher(self.config_path, log_path)
        return self.dispatcher

    def start_cleaner(self) -> subprocess.Popen[bytes]:
        self.cleaner = start_cleaner(self.config_path)
        return self.cleaner

    def router_ended(self, timeout: float = 60.0) -> int:
        """Wait for the router to exit (a test hook killed it); its exit code."""
        assert self.router is not None
        code = self.router.wait(timeout)
        self.finished.append(self.router)
        self.router = None
        return code

    def kill_dispatcher(self) -> None:
        """kill -9 the dispatcher."""
        assert self.dispatcher is not None
        self.dispatcher.kill()
        self.finished.append(self.dispatcher)
        self.dispatcher = None

    def kill_receiver(self) -> None:
        """kill -9 the receiver and its association processes at once."""
        self.receiver.kill()

    def restart_receiver(self) -> Receiver:
        self.receiver = self.receivers.restart(self.receiver)
        return self.receiver

    def stop(self) -> list[str]:
        """SIGTERM every running service; the problems (a non-zero exit, a hang)."""
        problems: list[str] = []
        stoppers: list[tuple[str, Callable[[], int]]] = []
        if self.router is not None:
            router = self.router
            router.signal(signal.SIGTERM)
            stoppers.append(("router", router.wait))
        if self.dispatcher is not None:
            stoppers.append(("dispatcher", self.dispatcher.terminate))
        if self.cleaner is not None:
            cleaner = self.cleaner
            cleaner.send_signal(signal.SIGTERM)
            stoppers.append(("cleaner", lambda: cleaner.wait(timeout=30)))
        for name, wait in stoppers:
            try:
                code = wait()
            except subprocess.TimeoutExpired:
                problems.append(f"{name} ignored SIGTERM")
                continue
            if code != 0:
                problems.append(f"{name} exited with {code}")
        if self.dispatcher is not None and self.dispatcher.process.poll() is None:
            self.dispatcher.kill()
        if self.cleaner is not None and self.cleaner.poll() is None:
            self.cleaner.kill()
            self.cleaner.wait(timeout=10)
        return problems

    # ------------------------------------------------------------------ sending

    def send_in_background(self, files: Sequence[Path]) -> subprocess.Popen[str]:
        """DCMTK ``storescu -v`` to the receiver, running; read its output with
        :func:`tests.helpers.parse_storescu` once it ended."""
        command = storescu_command(self.receiver.port, files)
        return subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "TCP_NODELAY": "1"},
        )

    # ------------------------------------------------------------------ what happened

    def tasks(self, folder: str) -> list[dict[str, Any]]:
        return self.spool.tasks(folder)

    def settled(self, tasks: int) -> bool:
        """``tasks`` tasks in success/, nothing visible anywhere else, incoming/ empty."""
        spool = self.spool
        if any(spool.tasks(folder) for folder in ("outgoing", "error", "processing")):
            return False
        return len(spool.tasks("success")) == tasks and self.incoming_is_empty()

    def scp_uids(self) -> set[str]:
        """SOP Instance UIDs of the files storescp wrote (or is writing): ``CT.<uid>.dcm``."""
        return {p.name.split(".", 1)[1][: -len(".dcm")] for p in self.scp.out_dir.glob("*.dcm")}

    def incoming_is_empty(self) -> bool:
        incoming = self.spool.incoming
        return not incoming.exists() or [p.name for p in incoming.iterdir()] in ([], [".tmp"])

    def stale(self) -> list[Path]:
        """Locks, claims, journals, temporary task folders and temporary instance files."""
        found = list(self.spool.leftovers())
        for folder in (*TASK_FOLDERS, "incoming"):
            base = self.data_root / folder
            if base.exists():
                found += [p for p in base.rglob("*") if p.name in STALE_MARKERS]
        tmp = self.data_root / "incoming" / ".tmp"
        if tmp.exists():
            found += list(tmp.iterdir())
        return sorted(set(found))

    def router_events(self, kind: str) -> list[Event]:
        return self.spool.events(kind)

    def dispatcher_events(self, kind: str) -> list[Event]:
        return [e for e in dispatcher_events(self.data_root) if e.kind == kind]

    def cleaner_events(self, kind: str) -> list[Event]:
        path = self.data_root / "state" / "outbox" / "cleaner.sqlite3"
        events = outbox_events(path) if path.exists() else []
        return [e for e in events if e.kind == kind]

    def logs(self) -> str:
        """The tail of every service log of this test (the receiver's: see conftest)."""
        parts: list[str] = []
        for path in sorted(self.config_path.parent.glob("*.log")):
            text = path.read_text(errors="replace")
            parts.append(f"----- {path.name}\n{text[-6000:]}")
        if self.scp.log_path is not None and self.scp.log_path.exists():
            parts.append(f"----- storescp\n{self.scp.log_path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def wait(self, predicate: Callable[[], T], *, timeout: float, what: str) -> T:
        """:func:`tests.helpers.wait_until`, with the service logs in the failure message."""
        try:
            return wait_until(predicate, timeout=timeout, what=what, interval=0.05)
        except pytest.fail.Exception as exc:
            pytest.fail(f"{exc}\nspool: {self.describe_spool()}\n{self.logs()}")

    def describe_spool(self) -> dict[str, list[str]]:
        return {
            folder: sorted(str(p.relative_to(self.data_root)) for p in base.rglob("*"))[:40]
            for folder in ("incoming", "outgoing", "error")
            if (base := self.data_root / folder).exists()
        }


def write_json_atomically(path: Path, content: dict[str, Any]) -> None:
    """Replace ``path`` in one rename: the running receiver never reads half a file."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(content, indent=2))
    os.replace(temp, path)


def pipeline_config(
    receiver_config: dict[str, Any], scp: StoreScp, pacs: Orthanc, **overrides: Any
) -> dict[str, Any]:
    """The receiver's configuration plus targets, one rule routing everything to both, the
    test timings and the dispatcher's test timeouts; ``overrides`` go to the top level."""
    targets = {
        STORESCP: dicom_target(scp.port),
        ORTHANC: dicom_target(pacs.dicom_port, aet_target=ORTHANC_AET),
    }
    rules = {"everything": route_rule("True", target=[STORESCP, ORTHANC])}
    data_root = Path(receiver_config["data_root"])
    config = {**receiver_config, **dispatcher_config(data_root, targets, rules=rules)}
    config.update(PIPELINE_SETTINGS)
    config.update(overrides)
    return config


@contextlib.contextmanager
def running_pipeline(
    tmp_path: Path,
    receivers: ReceiverFactory,
    scp: StoreScp,
    pacs: Orthanc,
    *,
    router: bool = True,
    dispatcher: bool = True,
    cleaner: bool = True,
    **overrides: Any,
) -> Iterator[Pipeline]:
    """Start the receiver, then write the shared configuration and start the other services.

    ``scp`` may be started or not (a target that is down). At the end every service still
    running gets SIGTERM and must exit 0; on a failure the service logs are printed (pytest
    shows them with the report).
    """
    rx = receivers(data_root=tmp_path / "data")
    config = pipeline_config(json.loads(rx.config_path.read_text()), scp, pacs, **overrides)
    write_json_atomically(rx.config_path, config)
    pipeline = Pipeline(tmp_path, receivers, rx, scp, pacs)
    try:
        if dispatcher:
            pipeline.start_dispatcher()
        if router:
            pipeline.start_router()
        if cleaner:
            pipeline.start_cleaner()
        yield pipeline
    except BaseException:
        sys.stdout.write(pipeline.logs() + "\n")
        pipeline.stop()
        raise
    problems = pipeline.stop()
    if problems:
        pytest.fail("; ".join(problems) + "\n" + pipeline.logs())
