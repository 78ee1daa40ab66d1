"""The GUI's "test target" function: C-ECHO with a precise message."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import DicomTarget, DummyTarget, FolderTarget
from dispatcher.echo import test_target as echo_target
from tests.dispatcher_helpers import SCP_AET, storescp
from tests.helpers import LOCALHOST, free_port

pytestmark = [pytest.mark.dcmtk, pytest.mark.usefixtures("dcmtk")]


def test_echo_to_storescp_succeeds(tmp_path: Path) -> None:
    with storescp(tmp_path / "scp") as peer:
        result = echo_target(DicomTarget(ip=LOCALHOST, port=peer.port, aet_target=SCP_AET))
    assert result.success, result.message
    assert result.status == 0
    assert result.message.startswith(f"C-ECHO to {SCP_AET}@{LOCALHOST}:{peer.port} succeeded in")


# pynetdicom 3.0.4 drops the socket of a refused connection unclosed (see test_dispatcher_retries).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_echo_to_a_closed_port_says_connection_refused() -> None:
    port = free_port()
    result = echo_target(DicomTarget(ip=LOCALHOST, port=port, aet_target="PACS"), timeout=3)
    assert not result.success
    assert result.message == f"cannot connect to {LOCALHOST}:{port}: Connection refused"
    assert result.elapsed_s < 3


def test_echo_to_an_unknown_host_names_the_host_problem() -> None:
    target = DicomTarget(ip="no-such-host.invalid", port=104, aet_target="PACS")
    result = echo_target(target, timeout=3)
    assert not result.success
    assert result.message.startswith("cannot connect to no-such-host.invalid:104: unknown host")


def test_echo_of_a_sender_target_needs_an_address() -> None:
    target = DicomTarget(ip="sender", port=104, aet_target="PACS")
    assert "give an address" in echo_target(target).message


def test_folder_target_is_checked_for_write_access(tmp_path: Path) -> None:
    assert echo_target(FolderTarget(folder=str(tmp_path))).success
    missing = echo_target(FolderTarget(folder=str(tmp_path / "nope")))
    assert not missing.success and "does not exist" in missing.message


def test_other_target_types_are_not_testable_yet() -> None:
    result = echo_target(DummyTarget())
    assert not result.success and result.message == "testing 'dummy' targets is not supported yet"
