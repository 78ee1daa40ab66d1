"""Test helpers: real peers (DCMTK, pynetdicom), the receiver process, spool assertions.

Nothing here patches the code under test: the receiver runs as its own OS process on an ephemeral
port and is talked to over TCP, the way a scanner would.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import Verification

from common.outbox import Event, Outbox
from tests.dicom_factory import MERCURE_TAGS, Instance, dataset_offset

T = TypeVar("T")

IN_CI = bool(os.environ.get("CI"))
"""With CI set, a missing peer or privilege is a failure, not a skip."""

API_KEY = "test-token-0123456789"
RECEIVER_AET = "CADUCEUS"
SENDER_AET = "TESTSCU"
PROBE_AET = "READY-PROBE"
"""Calling AE title of the readiness probe, told apart from the tests' own associations."""
LOCALHOST = "127.0.0.1"


class Status(int):
    """A DIMSE status that shows itself in hex in assertion messages (0xC210, not 49680)."""

    def __repr__(self) -> str:
        return f"0x{self:04X}"


# DIMSE statuses the receiver answers with (PS3.4 Annex B.2.3, PS3.7 Annex C).
SUCCESS = Status(0x0000)
OUT_OF_RESOURCES = Status(0xA700)
"""Refused: out of resources (write failure, full disk)."""
CANNOT_UNDERSTAND = Status(0xC210)
"""Error: cannot understand (the dataset cannot be decoded)."""
INVALID_UID = Status(0xC211)
"""Caduceus' code in the "cannot understand" range: invalid or unsafe UID."""

# A-ASSOCIATE-RJ fields (PS3.8 9.3.4): result; source (1 service-user, 3 service-provider
# presentation); reason, whose meaning depends on the source (user: 1 no reason given, 3 calling
# AE title not recognised; provider presentation: 2 local limit exceeded).
RJ_PERMANENT, RJ_TRANSIENT = 1, 2
RJ_SOURCE_USER, RJ_SOURCE_PROVIDER_PRESENTATION = 1, 3
RJ_REASON_NONE_GIVEN, RJ_REASON_LOCAL_LIMIT, RJ_REASON_CALLING_AE = 1, 2, 3


# ---------------------------------------------------------------------------- environment


DCMTK_TOOLS = frozenset(
    {"storescu", "storescp", "echoscu", "dcmcjpeg", "dcmcjpls", "dcmcrle", "dcmconv", "dcmdump"}
)
"""pynetdicom installs its own ``storescu``/``echoscu`` into the virtualenv: for these names,
only DCMTK's binary will do."""


def require_tool(name: str) -> str:
    """The path of command-line tool ``name``; skip without it (fail when CI is set)."""
    path = _find_dcmtk(name) if name in DCMTK_TOOLS else shutil.which(name)
    if path is None:
        package = "dcmtk" if name in DCMTK_TOOLS else "the package that provides it"
        message = f"{name} not found on PATH (install {package}; .ci/run does)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


@functools.cache
def _find_dcmtk(name: str) -> str | None:
    """The first ``name`` on PATH that is DCMTK's (its --version names dcmtk)."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = shutil.which(name, path=folder)
        if candidate is None:
            continue
        done = subprocess.run(
            [candidate, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
        if "dcmtk" in (done.stdout + done.stderr).lower():
            return candidate
    return None


def require_root(why: str) -> None:
    """Skip unless running as root (fail when CI is set: CI runs as root)."""
    if os.geteuid() != 0:
        message = f"needs root: {why}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def free_port() -> int:
    """A TCP port that was free on the loopback interface a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], T], *, timeout: float = 20.0, what: str, interval: float = 0.05
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------------- the receiver


@dataclass
class Receiver:
    """A receiver process started by the ``receiver`` fixture."""

    process: subprocess.Popen[bytes]
    port: int
    data_root: Path
    config_path: Path
    log_path: Path
    expected_exit: int | None = 0
    """Exit code teardown asserts; None once a test killed the process itself."""

    @property
    def incoming(self) -> Path:
        return self.data_root / "incoming"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """kill -9 the receiver and its association workers at once, like a container kill.

        Teardown no longer checks the exit code.
        """
        self.expected_exit = None
        os.killpg(self.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait for the exit code (a hang is a failure)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            pytest.fail(f"receiver pid {self.pid} ignored SIGTERM for {timeout:.0f} s")


def receiver_config(data_root: Path, port: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """A configuration for one test receiver; ``overrides`` go into ``dicom_receiver``."""
    settings: dict[str, Any] = {"bind_address": LOCALHOST, "min_free_space_mb": 0}
    settings.update(overrides)
    return {
        "data_root": str(data_root),
        "port": port,
        "bookkeeper_api_key": API_KEY,
        "dicom_receiver": settings,
    }


def start_receiver(config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "receiver", "--config", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=config_path.parent,
            start_new_session=True,
        )


def wait_ready(receiver: Receiver, timeout: float = 30.0) -> None:
    """Wait until the receiver answers an association: a C-ECHO succeeds, or it rejects us.

    A rejection counts as ready because some configurations (allow-lists, low disk) must refuse
    every association from here; the tests of those assert the rejection themselves.
    """

    def answered() -> bool:
        if receiver.process.poll() is not None:
            receiver.expected_exit = None  # reported here; teardown need not repeat it
            pytest.fail(f"receiver exited with {receiver.process.returncode} while starting")
        try:
            socket.create_connection((LOCALHOST, receiver.port), timeout=1).close()
        except OSError:
            return False
        result = associate(
            receiver.port, [(Verification, [ExplicitVRLittleEndian])], calling=PROBE_AET
        )
        with result as assoc:
            if assoc.is_established:
                status = assoc.send_c_echo()
                return bool(status) and status.Status == SUCCESS
            return result.rejection is not None

    wait_until(answered, timeout=timeout, what=f"receiver on port {receiver.port} to answer")


class ReceiverFactory:
    """Starts receivers for one test; what the ``receiver`` fixture yields.

    ``factory(**dicom_receiver_overrides, data_root=..., port=..., ready=True)`` writes a
    configuration into the test's folder, starts ``python -m receiver`` (in its own session, so
    that kill -9 of the group takes its association workers too), waits with a deadline until it
    answers an association, and returns the :class:`Receiver`.
    """

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Receiver] = []

    def __call__(
        self,
        *,
        data_root: Path | None = None,
        port: int | None = None,
        ready: bool = True,
        **overrides: Any,
    ) -> Receiver:
        data_root = data_root or self.tmp_path / "data"
        port = port or free_port()
        config_dir = self.tmp_path / f"config-{len(self.started) + 1}"
        config_dir.mkdir()
        config_path = config_dir / "caduceus.json"
        config = receiver_config(data_root, port, overrides)
        config_path.write_text(json.dumps(config, indent=2))
        return self._launch(config_path, data_root, port, ready)

    def restart(self, old: Receiver, *, ready: bool = True) -> Receiver:
        """A new receiver process on the configuration (and port) of ``old``, which has ended."""
        assert old.process.poll() is not None, "restart() needs the old receiver stopped"
        return self._launch(old.config_path, old.data_root, old.port, ready)

    def _launch(self, config_path: Path, data_root: Path, port: int, ready: bool) -> Receiver:
        log_path = self.tmp_path / f"receiver-{len(self.started) + 1}.log"
        process = start_receiver(config_path, log_path)
        rx = Receiver(process, port, data_root, config_path, log_path)
        self.started.append(rx)
        if ready:
            wait_ready(rx)
        return rx


# ---------------------------------------------------------------------------- pynetdicom peer


@dataclass
class AssociationResult:
    """An association attempt; ``rejection`` is (result, source, reason) of an A-ASSOCIATE-RJ."""

    assoc: Association
    rejection: tuple[int, int, int] | None = None

    def __enter__(self) -> Association:
        return self.assoc

    def __exit__(self, *exc: object) -> None:
        if self.assoc.is_established:
            self.assoc.release()


def associate(
    port: int,
    contexts: Sequence[tuple[str, Sequence[str]]],
    *,
    calling: str = SENDER_AET,
    called: str = RECEIVER_AET,
    max_pdu: int = 16382,
) -> AssociationResult:
    """Request an association proposing ``contexts`` (abstract syntax, transfer syntaxes)."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.maximum_pdu_size = max_pdu
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, list(syntaxes))
    result_holder: list[tuple[int, int, int]] = []

    def on_acse(event: evt.Event) -> None:
        primitive = event.primitive
        if isinstance(primitive, A_ASSOCIATE) and primitive.result in (1, 2):
            result_holder.append(
                (int(primitive.result), int(primitive.result_source), int(primitive.diagnostic))
            )

    assoc = ae.associate(
        LOCALHOST, port, ae_title=called, evt_handlers=[(evt.EVT_ACSE_RECV, on_acse)]
    )
    return AssociationResult(assoc, result_holder[0] if result_holder else None)


def close_broken(assoc: Association) -> None:
    """Close the socket pynetdicom leaks when its peer dies in the middle of a send."""
    transport = assoc.dul.socket
    sock = transport.socket if transport is not None else None
    if sock is not None:
        sock.close()


@contextlib.contextmanager
def raw_dataset_sending() -> Iterator[None]:
    """Make pynetdicom send a file's dataset bytes as they are, without decoding them."""
    saved = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = saved


def store_status(assoc: Association, item: Dataset | Path) -> Status | None:
    """C-STORE one dataset or file; its DIMSE status, or None when no response came."""
    status = assoc.send_c_store(item)
    return Status(status.Status) if status and "Status" in status else None


def pynetdicom_store(
    port: int,
    items: Sequence[Dataset | Path],
    *,
    contexts: Sequence[tuple[str, Sequence[str]]],
    raw: bool = False,
    calling: str = SENDER_AET,
) -> list[Status | None]:
    """Send ``items`` over one association; the status of each (None: no response)."""
    statuses: list[Status | None] = []
    result = associate(port, contexts, calling=calling)
    with result as assoc:
        assert assoc.is_established, f"association not accepted: rejection={result.rejection}"
        with raw_dataset_sending() if raw else contextlib.nullcontext():
            statuses.extend(store_status(assoc, item) for item in items)
    return statuses


def contexts_for(instances: Sequence[Instance]) -> list[tuple[str, list[str]]]:
    """One presentation context per SOP class, offering the files' own transfer syntaxes."""
    by_class: dict[str, list[str]] = {}
    for instance in instances:
        syntaxes = by_class.setdefault(instance.sop_class_uid, [])
        if instance.transfer_syntax not in syntaxes:
            syntaxes.append(instance.transfer_syntax)
    return list(by_class.items())


# ---------------------------------------------------------------------------- DCMTK peers


@dataclass
class StoreRun:
    """A finished storescu run: exit code, output, and the files it reported as stored."""

    returncode: int
    output: str
    stored: list[Path] = field(default_factory=list)


_SENDING = re.compile(r"^I: Sending file: (.+)$")
_SUCCESS = re.compile(r"^I: Received Store Response \(Success\)")


def parse_storescu(output: str) -> list[Path]:
    """Files storescu -v reports as acknowledged with status Success, in sending order."""
    stored: list[Path] = []
    current: Path | None = None
    for line in output.splitlines():
        if match := _SENDING.match(line):
            current = Path(match.group(1))
        elif _SUCCESS.match(line) and current is not None:
            stored.append(current)
            current = None
    return stored


def storescu_command(
    port: int,
    files: Sequence[Path],
    *,
    calling: str = SENDER_AET,
    called: str = RECEIVER_AET,
    args: Sequence[str] = (),
) -> list[str]:
    return [
        require_tool("storescu"),
        "-v",
        "-aet",
        calling,
        "-aec",
        called,
        "-to",
        "30",
        "-ta",
        "30",
        "-td",
        "30",
        *args,
        LOCALHOST,
        str(port),
        *map(str, files),
    ]


def storescu(
    port: int,
    files: Sequence[Path],
    *,
    calling: str = SENDER_AET,
    called: str = RECEIVER_AET,
    args: Sequence[str] = (),
    timeout: float = 120,
) -> StoreRun:
    """Run DCMTK storescu to completion (any exit code) and parse what it stored."""
    command = storescu_command(port, files, calling=calling, called=called, args=args)
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    output = done.stdout + done.stderr
    return StoreRun(done.returncode, output, parse_storescu(output))


def storescu_profile(folder: Path, contexts: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
    """storescu arguments proposing exactly ``contexts`` (a ``-xf`` configuration file).

    storescu's own options propose uncompressed syntaxes beside the compressed one and then
    silently decompress when the peer refuses the compressed one; a profile proposes only what
    the test wants to see negotiated.
    """
    lines = ["[[TransferSyntaxes]]"]
    for index, (_, syntaxes) in enumerate(contexts):
        lines.append(f"[Syntaxes{index}]")
        lines += [f"TransferSyntax{n} = {ts}" for n, ts in enumerate(syntaxes, 1)]
    lines += ["[[PresentationContexts]]", "[Contexts]"]
    lines += [
        f"PresentationContext{index + 1} = {abstract}\\Syntaxes{index}"
        for index, (abstract, _) in enumerate(contexts)
    ]
    lines += ["[[Profiles]]", "[Test]", "PresentationContexts = Contexts"]
    path = folder / "storescu-profile.cfg"
    path.write_text("\n".join(lines) + "\n")
    return ["-xf", str(path), "Test"]


def echoscu(
    port: int, *, calling: str = SENDER_AET, called: str = RECEIVER_AET
) -> subprocess.CompletedProcess[str]:
    command = [require_tool("echoscu"), "-v", "-aet", calling, "-aec", called, "-to", "10"]
    return subprocess.run(
        [*command, LOCALHOST, str(port)], capture_output=True, text=True, timeout=60, check=False
    )


# ---------------------------------------------------------------------------- the spool


def stored_paths(incoming: Path, instance: Instance) -> tuple[Path, Path]:
    """Where the spool contract puts ``instance``: the ``.dcm`` and its ``.tags`` side-car."""
    stem = f"{instance.series_uid}#{instance.sop_instance_uid}"
    folder = incoming / instance.series_uid
    return folder / f"{stem}.dcm", folder / f"{stem}.tags"


def all_files(folder: Path) -> list[Path]:
    """Every file below ``folder`` (hidden ones too), sorted."""
    return sorted(path for path in folder.rglob("*") if not path.is_dir())


def temp_files(incoming: Path) -> list[Path]:
    return all_files(incoming / ".tmp") if (incoming / ".tmp").exists() else []


def series_folders(incoming: Path) -> list[Path]:
    return sorted(p for p in incoming.iterdir() if p.is_dir() and not p.name.startswith("."))


def assert_only_complete_pairs(incoming: Path) -> list[Path]:
    """Every visible file in a series folder is a ``.dcm``+``.tags`` pair named by contract.

    Returns the ``.dcm`` files. Temporary files (``incoming/.tmp``) are not looked at here.
    """
    dcm_files: list[Path] = []
    for folder in series_folders(incoming):
        names = {p.name for p in folder.iterdir()}
        for name in names:
            assert name.startswith(f"{folder.name}#"), f"stray file {folder / name}"
            stem, dot, suffix = name.rpartition(".")
            assert dot and suffix in ("dcm", "tags"), f"stray file {folder / name}"
            partner = f"{stem}.{'tags' if suffix == 'dcm' else 'dcm'}"
            assert partner in names, f"{folder / name} has no {partner}"
        dcm_files += sorted(folder / n for n in names if n.endswith(".dcm"))
    return dcm_files


def assert_nothing_stored(incoming: Path, *, wait: float = 10.0) -> None:
    """No file at all under ``incoming`` (temp files must be gone within ``wait`` seconds)."""
    wait_until(lambda: not temp_files(incoming), timeout=wait, what="incoming/.tmp to empty")
    leftovers = all_files(incoming)
    assert leftovers == [], f"files left in incoming: {leftovers}"
    assert series_folders(incoming) == [], "a series folder was left behind"


def read_tags(path: Path) -> dict[str, str]:
    """The ``.tags`` side-car: strict UTF-8 JSON, a flat object of strings."""
    tags = json.loads(path.read_bytes().decode("utf-8"))
    assert isinstance(tags, dict), f"{path} is not a JSON object"
    for key, value in tags.items():
        assert isinstance(value, str), f"{path}: {key} is {type(value).__name__}, not a string"
    return tags


def tag_text(ds: Dataset, keyword: str) -> str:
    """The value of ``keyword`` as the side-car must hold it: decoded, multi-values joined by \\."""
    value = ds[keyword].value
    if isinstance(value, pydicom.multival.MultiValue | list):
        return "\\".join(str(v) for v in value)
    return "" if value is None else str(value)


def assert_tags(
    tags: dict[str, str],
    ds: Dataset,
    *,
    sender_aet: str = SENDER_AET,
    receiver_aet: str = RECEIVER_AET,
) -> None:
    """The side-car holds every mercure tag ``ds`` has, decoded, plus the sender facts."""
    for keyword in ("Modality", "PatientName", "PatientID", "SeriesInstanceUID"):
        assert keyword in tags, f".tags lacks {keyword}"
    for keyword in MERCURE_TAGS:
        if keyword in ds:
            assert tags.get(keyword) == tag_text(ds, keyword), f".tags {keyword}"
    assert tags.get("SOPInstanceUID") == ds.SOPInstanceUID
    assert tags.get("SenderAET") == sender_aet
    assert tags.get("ReceiverAET") == receiver_aet
    assert tags.get("SenderAddress") == LOCALHOST


def assert_stored_as_sent(
    incoming: Path,
    sent: Instance,
    *,
    transfer_syntax: str | None = None,
    sender_aet: str = SENDER_AET,
    receiver_aet: str = RECEIVER_AET,
) -> Dataset:
    """``sent`` is in the spool, byte for byte, in DICOM File Format with a correct meta header.

    ``transfer_syntax`` is the one negotiated (default: the file's own). When it is the file's
    own and not deflated, the stored dataset bytes must equal the sent file's dataset bytes.
    Returns the stored dataset.
    """
    dcm_path, tags_path = stored_paths(incoming, sent)
    assert dcm_path.is_file(), f"{dcm_path.name} not stored; series folder has " + str(
        sorted(p.name for p in dcm_path.parent.glob("*")) if dcm_path.parent.exists() else "-"
    )
    assert tags_path.is_file(), f"{tags_path.name} missing"
    expected_ts = transfer_syntax or sent.transfer_syntax

    raw = dcm_path.read_bytes()
    assert raw[128:132] == b"DICM", "no DICOM File Format preamble/prefix"
    meta = pydicom.filereader.read_file_meta_info(dcm_path)
    assert meta.TransferSyntaxUID == expected_ts
    assert meta.MediaStorageSOPInstanceUID == sent.sop_instance_uid
    assert meta.MediaStorageSOPClassUID == sent.sop_class_uid
    assert "ImplementationClassUID" in meta
    assert meta.FileMetaInformationVersion == b"\x00\x01"

    stored = pydicom.dcmread(dcm_path)
    original = pydicom.dcmread(sent.path)
    assert stored.SOPInstanceUID == sent.sop_instance_uid
    assert_same_elements(original, stored)
    if "PixelData" in original:
        assert stored.PixelData == original.PixelData, "pixel data differ"
    if expected_ts == sent.transfer_syntax and expected_ts != DeflatedExplicitVRLittleEndian:
        sent_body = sent.path.read_bytes()[dataset_offset(sent.path) :]
        stored_body = raw[dataset_offset(dcm_path) :]
        assert stored_body == sent_body, "stored dataset bytes differ from the sent ones"

    assert_tags(read_tags(tags_path), original, sender_aet=sender_aet, receiver_aet=receiver_aet)
    return stored


def assert_same_elements(expected: Dataset, got: Dataset) -> None:
    """Same elements (in order) with the same VR and the same decoded value."""
    assert [e.tag for e in got] == [e.tag for e in expected], "element lists differ"
    for elem in expected:
        other = got[elem.tag]
        assert other.VR == elem.VR, f"{elem.tag} VR"
        assert other.value == elem.value, f"{elem.keyword or elem.tag} value"


def outbox_events(outbox: Path) -> list[Event]:
    """Events the receiver recorded in its outbox, oldest first (``common.outbox`` API)."""
    with Outbox(outbox, "tests") as box:
        return box.pending(limit=10_000)


def outbox_file(data_root: Path) -> Path:
    return data_root / "state" / "outbox" / "receiver.sqlite3"
