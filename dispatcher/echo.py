"""The "test target" function the GUI calls: a C-ECHO to a DICOM target, with a precise message.

``test_target(target)`` never raises for a failure of the peer; every wait is bounded by
``timeout``. The message says what happened in words an administrator can act on:
``C-ECHO to PACS@10.0.0.5:104 succeeded in 12 ms``, ``cannot connect to 10.0.0.5:104: Connection
refused``, ``association rejected by PACS@10.0.0.5:104 (permanent, service user: called AE title
not recognized)``, ``C-ECHO answered 0x0110 Processing Failure``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context

from common.config import DicomTarget, FolderTarget, Target
from dispatcher import status
from dispatcher.settings import DEFAULT_AE_TITLE, DispatcherSettings
from dispatcher.targets.association import Peer, PeerProblem, resolve_peer
from dispatcher.targets.scu import AssociationLost, AssociationRefused, ScuAssociation

DEFAULT_TIMEOUT = 10.0
VERIFICATION = UID("1.2.840.10008.1.1")
"""Verification SOP Class (PS3.4 A.4)."""


@dataclass(frozen=True)
class EchoResult:
    """What the GUI shows: ``success`` and a message naming the peer and the cause."""

    success: bool
    message: str
    status: int | None = None
    """The C-ECHO response status, when one came (PS3.7 9.3.5)."""
    elapsed_s: float = 0.0


def test_target(
    target: Target,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    sender_address: str | None = None,
    ae_title: str | None = None,
) -> EchoResult:
    """C-ECHO ``target`` (DICOM targets); a folder target is checked for existence and write
    access; other types are not testable yet. ``sender_address`` stands in for ``ip: sender``.
    """
    started = time.monotonic()
    if isinstance(target, FolderTarget):
        return _check_folder(target)
    if not isinstance(target, DicomTarget):
        return EchoResult(False, f"testing {target.target_type!r} targets is not supported yet")
    settings = DispatcherSettings(
        connection_timeout=timeout,
        acse_timeout=timeout,
        dimse_timeout=timeout,
        network_timeout=timeout,
        ae_title=ae_title or DEFAULT_AE_TITLE,
    )
    if target.ip == "sender":
        if not sender_address:
            return EchoResult(
                False, "the target sends back to each series' sender; give an address to test"
            )
        target = target.model_copy(update={"ip": sender_address})
    try:
        peer = resolve_peer(target, None, settings)
    except PeerProblem as exc:
        return EchoResult(False, str(exc))
    return _echo(peer, settings, started)


test_target.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def _echo(peer: Peer, settings: DispatcherSettings, started: float) -> EchoResult:
    context = build_context(VERIFICATION, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    try:
        assoc = ScuAssociation.request(peer, [context], settings)
    except AssociationRefused as exc:
        return EchoResult(False, str(exc), elapsed_s=time.monotonic() - started)
    try:
        accepted = assoc.context_for(VERIFICATION, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        if accepted is None:
            return EchoResult(
                False,
                f"{peer} does not accept the Verification service",
                elapsed_s=time.monotonic() - started,
            )
        code = assoc.echo(accepted).status
        assoc.release()
    except AssociationLost as exc:
        message = (
            f"{peer} accepted the association but sent no C-ECHO response within "
            f"{settings.dimse_timeout:g} s"
            if exc.no_response
            else f"C-ECHO to {peer} failed: {exc}"
        )
        return EchoResult(False, message, elapsed_s=time.monotonic() - started)
    finally:
        assoc.close()
    elapsed = time.monotonic() - started
    if code != status.SUCCESS:
        return EchoResult(
            False, f"C-ECHO to {peer} answered {status.describe(code)}", code, elapsed
        )
    return EchoResult(True, f"C-ECHO to {peer} succeeded in {elapsed * 1000:.0f} ms", code, elapsed)


def _check_folder(target: FolderTarget) -> EchoResult:
    folder = target.folder
    if not os.path.isdir(folder):
        return EchoResult(False, f"folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        return EchoResult(False, f"folder {folder} is not writable by this process")
    return EchoResult(True, f"folder {folder} exists and is writable")
