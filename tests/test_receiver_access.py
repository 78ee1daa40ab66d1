"""Associations are refused by the allow-lists (permanently) and on low disk (transiently)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.sop_class import Verification

from common.spool import atomic_write_json
from tests.dicom_factory import Instance
from tests.helpers import (
    RJ_PERMANENT,
    RJ_REASON_CALLING_AE,
    RJ_REASON_LOCAL_LIMIT,
    RJ_REASON_NONE_GIVEN,
    RJ_SOURCE_PROVIDER_PRESENTATION,
    RJ_SOURCE_USER,
    RJ_TRANSIENT,
    SUCCESS,
    ReceiverFactory,
    all_files,
    assert_stored_as_sent,
    associate,
    echoscu,
    storescu,
    wait_until,
)

ECHO = [(Verification, [ExplicitVRLittleEndian])]


def rejection(port: int, calling: str = "TESTSCU") -> tuple[int, int, int] | None:
    """The (result, source, reason) of the receiver's A-ASSOCIATE-RJ, or None if it accepted."""
    result = associate(port, ECHO, calling=calling)
    with result as assoc:
        if assoc.is_established:
            return None
    assert result.rejection is not None, "neither accepted nor rejected (aborted or no answer)"
    return result.rejection


def test_calling_ae_not_in_allow_list_is_rejected_permanently(receiver: ReceiverFactory) -> None:
    rx = receiver(allowed_calling_aets=["CT_SCANNER", "PACS"])

    assert rejection(rx.port, calling="INTRUDER") == (
        RJ_PERMANENT,
        RJ_SOURCE_USER,
        RJ_REASON_CALLING_AE,
    )
    assert rejection(rx.port, calling="PACS") is None


@pytest.mark.dcmtk
def test_storescu_with_unlisted_calling_ae_stores_nothing(
    receiver: ReceiverFactory, dcmtk: None, ct_series: list[Instance]
) -> None:
    rx = receiver(allowed_calling_aets=["CT_SCANNER"])

    refused = storescu(rx.port, [ct_series[0].path], calling="INTRUDER")
    allowed = storescu(rx.port, [ct_series[0].path], calling="CT_SCANNER")

    assert refused.returncode != 0
    assert "Association Rejected" in refused.output
    assert allowed.returncode == 0, allowed.output
    assert_stored_as_sent(rx.incoming, ct_series[0], sender_aet="CT_SCANNER")
    assert len(all_files(rx.incoming)) == 2


def test_peer_address_outside_allow_list_is_rejected_permanently(
    receiver: ReceiverFactory,
) -> None:
    rx = receiver(allowed_addresses=["10.0.0.0/8"])

    assert rejection(rx.port) == (RJ_PERMANENT, RJ_SOURCE_USER, RJ_REASON_NONE_GIVEN)


def test_peer_address_inside_allow_list_is_accepted(receiver: ReceiverFactory) -> None:
    rx = receiver(allowed_addresses=["10.0.0.0/8", "127.0.0.0/8"])

    assert rejection(rx.port) is None


@pytest.mark.dcmtk
def test_echoscu_is_rejected_transiently_below_the_free_space_watermark(
    receiver: ReceiverFactory, dcmtk: None
) -> None:
    rx = receiver(min_free_space_mb=1 << 40)  # more than any disk has

    assert rejection(rx.port) == (
        RJ_TRANSIENT,
        RJ_SOURCE_PROVIDER_PRESENTATION,
        RJ_REASON_LOCAL_LIMIT,
    )
    done = echoscu(rx.port)
    assert done.returncode != 0
    assert "Association Rejected" in done.stdout + done.stderr


@pytest.mark.root
def test_associations_are_accepted_again_once_space_is_freed(
    small_fs: Callable[[int], Path], receiver: ReceiverFactory, ct_series: list[Instance]
) -> None:
    data_root = small_fs(16)
    ballast = data_root / "ballast"
    ballast.write_bytes(b"\0" * (12 << 20))  # leaves ~4 MiB free, below the 8 MiB watermark
    rx = receiver(data_root=data_root, min_free_space_mb=8)

    assert rejection(rx.port) == (
        RJ_TRANSIENT,
        RJ_SOURCE_PROVIDER_PRESENTATION,
        RJ_REASON_LOCAL_LIMIT,
    )
    ballast.unlink()

    wait_until(lambda: rejection(rx.port) is None, timeout=15, what="association accepted")
    with associate(rx.port, ECHO) as assoc:
        assert assoc.send_c_echo().Status == SUCCESS


def _rewrite_config(rx_config: Path, **receiver_settings: object) -> None:
    config = json.loads(rx_config.read_text())
    config["dicom_receiver"].update(receiver_settings)
    atomic_write_json(rx_config, config)


def test_an_allow_list_added_to_the_config_applies_without_a_restart(
    receiver: ReceiverFactory,
) -> None:
    rx = receiver()
    assert rejection(rx.port, calling="INTRUDER") is None

    _rewrite_config(rx.config_path, allowed_calling_aets=["PACS"])

    wait_until(
        lambda: rejection(rx.port, calling="INTRUDER") is not None,
        timeout=15,
        what="the new allow-list to apply",
    )
    assert rejection(rx.port, calling="PACS") is None
    assert rx.process.poll() is None


def test_an_invalid_config_change_keeps_the_last_valid_one(receiver: ReceiverFactory) -> None:
    rx = receiver(allowed_calling_aets=["PACS"])

    _rewrite_config(rx.config_path, allowed_addresses=["not-a-network"])

    wait_until(
        lambda: "configuration change refused" in rx.log(),
        timeout=15,
        what="the receiver to refuse the broken configuration",
    )
    assert "allowed_addresses" in rx.log()
    assert rejection(rx.port, calling="INTRUDER") == (
        RJ_PERMANENT,
        RJ_SOURCE_USER,
        RJ_REASON_CALLING_AE,
    )
    assert rejection(rx.port, calling="PACS") is None
