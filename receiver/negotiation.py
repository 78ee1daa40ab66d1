"""Presentation context negotiation of the receiver (PS3.8 §9.3.3.2, PS3.5 §10).

Promiscuous like storescp ``--promiscuous``: every storage SOP class is accepted, known or private;
only SOP classes of other services (query/retrieve, worklist, print, ...) are refused, because the
receiver cannot serve them.

Transfer syntax choice for one context, in this order:
1. a compressed syntax the requestor lists before every uncompressed one (it prefers sending the
   image as it has it: storing it as received avoids a decompression on the sender);
2. Explicit VR Little Endian (pynetdicom's acceptor would pick Implicit VR and make explicit
   senders convert, and Implicit loses the VRs of private elements);
3. any other supported uncompressed syntax, then any supported compressed one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from pydicom.uid import UID
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

VERIFICATION: Final = "1.2.840.10008.1.1"

IMPLICIT_LE: Final = "1.2.840.10008.1.2"
EXPLICIT_LE: Final = "1.2.840.10008.1.2.1"
DEFLATED_LE: Final = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE: Final = "1.2.840.10008.1.2.2"

UNCOMPRESSED: Final = (EXPLICIT_LE, IMPLICIT_LE, DEFLATED_LE, EXPLICIT_BE)

COMPRESSED: Final = frozenset(
    {
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
        "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless, First-Order Prediction (Process 14 SV1)
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.4.92",  # JPEG 2000 Part 2 Multi-component Lossless
        "1.2.840.10008.1.2.4.93",  # JPEG 2000 Part 2 Multi-component
        "1.2.840.10008.1.2.4.201",  # High-Throughput JPEG 2000 Lossless
        "1.2.840.10008.1.2.4.202",  # High-Throughput JPEG 2000 RPCL Lossless
        "1.2.840.10008.1.2.4.203",  # High-Throughput JPEG 2000
        "1.2.840.10008.1.2.5",  # RLE Lossless
        "1.2.840.10008.1.2.1.98",  # Encapsulated Uncompressed Explicit VR Little Endian
        "1.2.840.10008.1.2.4.100",  # MPEG2 Main Profile / Main Level
        "1.2.840.10008.1.2.4.101",  # MPEG2 Main Profile / High Level
        "1.2.840.10008.1.2.4.102",  # MPEG-4 AVC/H.264 High Profile / Level 4.1
        "1.2.840.10008.1.2.4.103",  # MPEG-4 AVC/H.264 BD-compatible High Profile / Level 4.1
        "1.2.840.10008.1.2.4.104",  # MPEG-4 AVC/H.264 High Profile / Level 4.2 For 2D Video
        "1.2.840.10008.1.2.4.105",  # MPEG-4 AVC/H.264 High Profile / Level 4.2 For 3D Video
        "1.2.840.10008.1.2.4.106",  # MPEG-4 AVC/H.264 Stereo High Profile / Level 4.2
        "1.2.840.10008.1.2.4.107",  # HEVC/H.265 Main Profile / Level 5.1
        "1.2.840.10008.1.2.4.108",  # HEVC/H.265 Main 10 Profile / Level 5.1
    }
)

# Presentation context results (PS3.8 9.3.3.2)
ACCEPTANCE: Final = 0
USER_REJECTION: Final = 1
ABSTRACT_SYNTAX_NOT_SUPPORTED: Final = 3
TRANSFER_SYNTAXES_NOT_SUPPORTED: Final = 4


@dataclass(frozen=True)
class Negotiated:
    """Result of negotiating the requested presentation contexts."""

    results: list[PresentationContext]
    """One result per requested context, for the A-ASSOCIATE-AC."""
    accepted: dict[int, tuple[str, str]]
    """Accepted context id -> (abstract syntax, transfer syntax)."""


def is_acceptable_abstract_syntax(uid: str) -> bool:
    """Verification, every known storage SOP class, and every unknown (private) SOP class."""
    if uid == VERIFICATION:
        return True
    service: type[ServiceClass] = uid_to_service_class(uid)
    return service is StorageServiceClass or service is ServiceClass


def choose_transfer_syntax(
    proposed: Sequence[str], *, accept_compressed: bool, verification: bool = False
) -> str | None:
    """The transfer syntax to accept among ``proposed`` (requestor's order), or None."""
    supported_compressed = [ts for ts in proposed if ts in COMPRESSED] if accept_compressed else []
    if verification:
        supported_compressed = []
    if supported_compressed:
        first_uncompressed = min(
            (i for i, ts in enumerate(proposed) if ts in UNCOMPRESSED), default=len(proposed)
        )
        if proposed.index(supported_compressed[0]) < first_uncompressed:
            return supported_compressed[0]
    for ts in UNCOMPRESSED:
        if ts in proposed:
            return ts
    return supported_compressed[0] if supported_compressed else None


def negotiate(requested: Sequence[PresentationContext], *, accept_compressed: bool) -> Negotiated:
    results: list[PresentationContext] = []
    accepted: dict[int, tuple[str, str]] = {}
    for rq in requested:
        context_id = int(rq.context_id or 0)
        abstract = str(rq.abstract_syntax)
        proposed = [str(ts) for ts in rq.transfer_syntax]
        result = PresentationContext()
        result.context_id = context_id
        result.abstract_syntax = abstract
        if not is_acceptable_abstract_syntax(abstract):
            result.result = ABSTRACT_SYNTAX_NOT_SUPPORTED
            result.transfer_syntax = list(proposed[:1])
        else:
            chosen = choose_transfer_syntax(
                proposed,
                accept_compressed=accept_compressed,
                verification=abstract == VERIFICATION,
            )
            if chosen is None:
                result.result = TRANSFER_SYNTAXES_NOT_SUPPORTED
                result.transfer_syntax = list(proposed[:1])
            else:
                result.result = ACCEPTANCE
                result.transfer_syntax = [UID(chosen)]
                accepted[context_id] = (abstract, chosen)
        results.append(result)
    return Negotiated(results=results, accepted=accepted)
