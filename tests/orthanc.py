"""Orthanc (Debian ``orthanc``) as a real PACS peer for tests.

:func:`orthanc` starts ``Orthanc`` with a generated configuration: DICOM and HTTP on free
loopback ports, storage and index in a temporary folder, no plugins, no authentication (HTTP
from this host only). It waits, with a deadline, until the REST API answers, and stops the
process at the end. Without the binary the test is skipped, and fails when ``CI`` is set.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import IN_CI, LOCALHOST, free_port

ORTHANC_AET = "ORTHANC"
READY_DEADLINE = 60.0


def require_orthanc() -> str:
    """The Orthanc binary; skip without it (fail when CI is set)."""
    path = shutil.which("Orthanc") or shutil.which("/usr/sbin/Orthanc")
    if path is None:
        message = "Orthanc not found (apt-get install orthanc; .ci/run should)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


@dataclass
class Orthanc:
    """A running Orthanc: its ports, REST client and log."""

    process: subprocess.Popen[bytes]
    dicom_port: int
    http_port: int
    log_path: Path
    client: httpx.Client

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def instances(self) -> list[str]:
        """Orthanc ids of every stored instance."""
        response = self.client.get("/instances")
        response.raise_for_status()
        ids: list[str] = response.json()
        return ids

    def sop_instances(self) -> dict[str, str]:
        """SOP Instance UID -> Orthanc id of every stored instance."""
        found: dict[str, str] = {}
        for orthanc_id in self.instances():
            tags = self.client.get(f"/instances/{orthanc_id}/simplified-tags").json()
            found[tags["SOPInstanceUID"]] = orthanc_id
        return found

    def file(self, orthanc_id: str) -> bytes:
        """The stored DICOM file as Orthanc serves it."""
        response = self.client.get(f"/instances/{orthanc_id}/file")
        response.raise_for_status()
        return response.content

    def metadata(self, orthanc_id: str, name: str) -> str:
        response = self.client.get(f"/instances/{orthanc_id}/metadata/{name}")
        response.raise_for_status()
        return response.text


def orthanc_config(folder: Path, dicom_port: int, http_port: int) -> dict[str, Any]:
    return {
        "Name": "caduceus-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "StorageCompression": False,
        "Plugins": [],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": ORTHANC_AET,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "UnknownSopClassAccepted": True,
        "AcceptedTransferSyntaxes": ["1.2.840.10008.1.*"],
        "DicomScpTimeout": 30,
        "MaximumPduLength": 131072,
        "SaveJobs": False,
        "DeidentifyLogs": False,
        "OverwriteInstances": True,
    }


@contextlib.contextmanager
def orthanc(folder: Path) -> Iterator[Orthanc]:
    """Start Orthanc in ``folder``; yields it once its REST API answers; stops it at the end."""
    binary = require_orthanc()
    folder.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    config_path = folder / "orthanc.json"
    config_path.write_text(json.dumps(orthanc_config(folder, dicom_port, http_port), indent=2))
    log_path = folder / "orthanc.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [binary, str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=folder,
        )
    client = httpx.Client(base_url=f"http://{LOCALHOST}:{http_port}", timeout=10.0)
    peer = Orthanc(process, dicom_port, http_port, log_path, client)
    try:
        _wait_ready(peer)
        yield peer
    finally:
        client.close()
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def _wait_ready(peer: Orthanc) -> None:
    deadline = time.monotonic() + READY_DEADLINE
    while True:
        if peer.process.poll() is not None:
            pytest.fail(f"Orthanc exited with {peer.process.returncode}:\n{peer.log()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if peer.client.get("/system").status_code == 200:
                return
        if time.monotonic() > deadline:
            pytest.fail(
                f"Orthanc did not answer within {READY_DEADLINE:.0f} s:\n{peer.log()[-3000:]}"
            )
        time.sleep(0.1)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
