"""Transfer syntax choice and DIMSE command encoding of the receiver."""

from __future__ import annotations

import io

import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.presentation import build_context

from receiver import dimse, negotiation

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.mark.parametrize(
    ("proposed", "expected"),
    [
        ([ImplicitVRLittleEndian, ExplicitVRLittleEndian], ExplicitVRLittleEndian),
        ([ImplicitVRLittleEndian], ImplicitVRLittleEndian),
        ([JPEGBaseline8Bit, ExplicitVRLittleEndian], JPEGBaseline8Bit),
        ([ExplicitVRLittleEndian, JPEGBaseline8Bit], ExplicitVRLittleEndian),
        ([RLELossless], RLELossless),
        ([JPEG2000Lossless, ImplicitVRLittleEndian], JPEG2000Lossless),
        ([DeflatedExplicitVRLittleEndian], DeflatedExplicitVRLittleEndian),
        (["1.2.3.4.5"], None),
    ],
)
def test_transfer_syntax_choice_prefers_explicit_and_keeps_compressed(
    proposed: list[str], expected: str | None
) -> None:
    assert negotiation.choose_transfer_syntax(proposed, accept_compressed=True) == expected


def test_compressed_syntaxes_are_refused_when_the_config_says_so() -> None:
    choice = negotiation.choose_transfer_syntax([JPEGBaseline8Bit], accept_compressed=False)
    assert choice is None
    both = [JPEGBaseline8Bit, ExplicitVRLittleEndian]
    assert (
        negotiation.choose_transfer_syntax(both, accept_compressed=False) == ExplicitVRLittleEndian
    )


def test_private_sop_classes_are_accepted_and_query_models_refused() -> None:
    contexts = [
        build_context("1.2.826.0.1.3680043.9.9999.1", [ExplicitVRLittleEndian]),
        build_context(CT, [ExplicitVRLittleEndian]),
        build_context("1.2.840.10008.5.1.4.1.2.1.1", [ExplicitVRLittleEndian]),  # C-FIND
        build_context(negotiation.VERIFICATION, [ImplicitVRLittleEndian]),
    ]
    for index, context in enumerate(contexts):
        context.context_id = 2 * index + 1
    result = negotiation.negotiate(contexts, accept_compressed=True)
    assert result.accepted == {
        1: ("1.2.826.0.1.3680043.9.9999.1", ExplicitVRLittleEndian),
        3: (CT, ExplicitVRLittleEndian),
        7: (negotiation.VERIFICATION, ImplicitVRLittleEndian),
    }
    assert [r.result for r in result.results] == [0, 0, 3, 0]


def test_store_request_encoded_by_pynetdicom_decodes() -> None:
    primitive = C_STORE()
    primitive.MessageID = 7
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = "1.2.3.4"
    primitive.Priority = 0
    primitive.MoveOriginatorApplicationEntityTitle = "MOVER"
    primitive.MoveOriginatorMessageID = 3
    primitive.DataSet = io.BytesIO(b"\x08\x00\x60\x00\x02\x00CT")
    request = C_STORE_RQ()
    request.primitive_to_message(primitive)
    raw = encode(request.command_set, True, True)
    assert raw is not None
    command = dimse.decode_command(raw)
    assert command == dimse.Command(
        command_field=dimse.C_STORE_RQ,
        message_id=7,
        has_dataset=True,
        sop_class_uid=CT,
        sop_instance_uid="1.2.3.4",
        move_originator_ae="MOVER",
    )


def test_store_response_decodes_with_pynetdicom() -> None:
    raw = dimse.encode_response(
        dimse.C_STORE_RSP, 7, 0xA700, CT, "1.2.3.4", error_comment="disk full: No space left"
    )
    ds = decode(io.BytesIO(raw), True, True)
    assert ds.CommandField == dimse.C_STORE_RSP
    assert ds.MessageIDBeingRespondedTo == 7
    assert ds.Status == 0xA700
    assert ds.AffectedSOPInstanceUID == "1.2.3.4"
    assert ds.ErrorComment == "disk full: No space left"
    assert ds.CommandGroupLength == len(raw) - 12


def test_echo_response_has_no_instance_uid() -> None:
    raw = dimse.encode_response(dimse.C_ECHO_RSP, 1, 0x0000, negotiation.VERIFICATION)
    ds = decode(io.BytesIO(raw), True, True)
    assert ds.CommandField == 0x8030
    assert ds.Status == 0x0000
    assert "AffectedSOPInstanceUID" not in ds


@pytest.mark.parametrize(
    "raw",
    [b"\x00\x00\x00\x01\x04\x00", b"\x08\x00\x00\x01\x02\x00\x00\x00\x01\x00", b""],
    ids=["truncated", "wrong-group", "empty"],
)
def test_malformed_command_sets_are_refused(raw: bytes) -> None:
    with pytest.raises(dimse.CommandError):
        dimse.decode_command(raw)
