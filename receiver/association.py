"""One association, from A-ASSOCIATE-RQ to release or abort, on a blocking socket.

The loop is single-threaded: it reads a PDU, streams data set fragments into the instance's
temporary file, and answers each C-STORE once the instance is durable in the spool. There is no
polling and no hand-over between threads, which is where pynetdicom's acceptor spends its time.
"""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)

from common.config import DicomReceiver
from common.implementation import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from common.spool import free_bytes
from common.ul import A_ABORT_TYPE, A_ASSOCIATE_RQ_TYPE, A_RELEASE_RQ_TYPE, P_DATA_TF_TYPE
from receiver import dimse, status
from receiver.negotiation import Negotiated, negotiate
from receiver.pdu import Connection, ProtocolError
from receiver.storage import InstanceWriter, PeerInfo, StoreRefused
from receiver.tags import TagSelection
from receiver.tempfiles import TempFiles

logger = logging.getLogger(__name__)

MAX_COMMAND_LENGTH: Final = 1 << 16
STREAM_CHUNK: Final = 1 << 18


@dataclass(frozen=True)
class ReceiverSettings:
    """What one association needs to know, taken from the configuration."""

    incoming: Path
    accept_compressed: bool = True
    additional_tags: tuple[str, ...] = ()
    durable: bool = True
    access: DicomReceiver = field(default_factory=DicomReceiver)
    """The allow-lists (calling AE titles, peer addresses)."""
    min_free_bytes: int = 0
    max_pdu: int = 0
    network_timeout: float = 60.0


@dataclass
class SeriesSummary:
    study_uid: str
    tags: dict[str, str]
    """The side-car of the series' first instance in this association."""
    sop_instance_uids: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    bytes: int = 0


@dataclass
class AssociationSummary:
    """What happened on one association, for the ``association`` and ``series_received`` events."""

    peer_address: str
    peer_port: int = 0
    calling_ae: str = ""
    called_ae: str = ""
    outcome: str = "open"
    """``released``, ``aborted``, ``rejected: <why>``, ``stopped`` or ``failed: <why>``."""
    instances: int = 0
    bytes: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    series: dict[str, SeriesSummary] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    ended: float = 0.0


class StopRequested(Exception):
    """Raised by the stop handler while the association is idle between messages."""


@dataclass
class _Message:
    """The message currently being received."""

    context_id: int
    command_bytes: bytearray = field(default_factory=bytearray)
    command: dimse.Command | None = None
    writer: InstanceWriter | None = None


class Association:
    """Serves one accepted TCP connection."""

    def __init__(
        self,
        conn: Connection,
        peer_address: str,
        settings: ReceiverSettings,
    ) -> None:
        self.conn = conn
        self.settings = settings
        self.summary = AssociationSummary(peer_address=peer_address)
        self._negotiated: Negotiated | None = None
        self._message: _Message | None = None
        self._buffer = memoryview(bytearray(STREAM_CHUNK))
        self.stop_requested = False
        self._selection = TagSelection.build(settings.additional_tags)
        self._helper = ThreadPoolExecutor(1, "flush")
        self._flusher = self._helper if settings.durable else None
        self._temp_files = TempFiles(settings.incoming, self._helper)

    @property
    def busy(self) -> bool:
        """True while a message is being received or answered."""
        return self._message is not None

    def request_stop(self) -> None:
        """Finish the message in progress, then abort; raise at once when idle."""
        self.stop_requested = True
        if not self.busy:
            raise StopRequested

    def run(self) -> AssociationSummary:
        self.conn.sock.settimeout(self.settings.network_timeout)
        try:
            self._serve()
        except StopRequested:
            self._abort("stopped")
        except TimeoutError:
            self._abort(f"failed: no data for {self.settings.network_timeout:.0f} s")
        except ProtocolError as exc:
            self._abort(f"failed: {exc}")
        except OSError as exc:
            self.summary.outcome = f"failed: {exc}"
        finally:
            if self._message is not None and self._message.writer is not None:
                self._message.writer.discard()
            self._message = None
            self._temp_files.close()
            self._helper.shutdown()
            self.summary.ended = time.time()
            self.conn.close()
        return self.summary

    def _abort(self, outcome: str) -> None:
        self.summary.outcome = outcome
        with contextlib.suppress(OSError):
            self.conn.send_abort()

    # ------------------------------------------------------------------ association setup

    def _serve(self) -> None:
        pdu_type, length = self.conn.read_pdu_header()
        if pdu_type != A_ASSOCIATE_RQ_TYPE:
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}")
        rq = self.conn.read_associate_rq(length)
        self.summary.calling_ae = str(rq.calling_ae_title or "").strip()
        self.summary.called_ae = str(rq.called_ae_title or "").strip()
        rejection = self._rejection()
        if rejection is not None:
            result, source, reason, why = rejection
            logger.warning(
                "rejected association from %s (%s -> %s): %s",
                self.summary.peer_address,
                self.summary.calling_ae,
                self.summary.called_ae,
                why,
            )
            self.conn.send_associate_rj(result, source, reason)
            self.summary.outcome = f"rejected: {why}"
            return
        self._accept(rq)
        self._receive_loop()

    def _rejection(self) -> tuple[int, int, int, str] | None:
        settings = self.settings
        if not settings.access.calling_aet_allowed(self.summary.calling_ae):
            return (
                status.RJ_PERMANENT,
                status.RJ_SOURCE_USER,
                status.RJ_REASON_CALLING_AE,
                f"calling AE title {self.summary.calling_ae!r} is not allowed",
            )
        if not settings.access.address_allowed(self.summary.peer_address):
            return (
                status.RJ_PERMANENT,
                status.RJ_SOURCE_USER,
                status.RJ_REASON_NONE,
                f"address {self.summary.peer_address} is not allowed",
            )
        if settings.min_free_bytes:
            free = free_bytes(settings.incoming)
            if free < settings.min_free_bytes:
                return (
                    status.RJ_TRANSIENT,
                    status.RJ_SOURCE_PROVIDER_PRESENTATION,
                    status.RJ_REASON_LOCAL_LIMIT,
                    f"only {free // (1 << 20)} MB free on the spool "
                    f"(watermark {settings.min_free_bytes // (1 << 20)} MB)",
                )
        return None

    def _accept(self, rq: A_ASSOCIATE) -> None:
        for item in rq.user_information:
            if isinstance(item, MaximumLengthNotification):
                self.conn.peer_max_pdu = int(item.maximum_length_received or 0)
        self._negotiated = negotiate(
            rq.presentation_context_definition_list,
            accept_compressed=self.settings.accept_compressed,
        )
        ac = A_ASSOCIATE()
        ac.application_context_name = rq.application_context_name
        ac.calling_ae_title = rq.calling_ae_title
        ac.called_ae_title = rq.called_ae_title
        ac.result = 0
        ac.presentation_context_definition_results_list = self._negotiated.results
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = self.settings.max_pdu
        class_uid = ImplementationClassUIDNotification()
        class_uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ac.user_information = [max_length, class_uid, version]
        self.conn.send_associate_ac(ac)
        self.summary.outcome = "established"
        logger.info(
            "association from %s (%s -> %s): %d of %d contexts accepted",
            self.summary.peer_address,
            self.summary.calling_ae,
            self.summary.called_ae,
            len(self._negotiated.accepted),
            len(self._negotiated.results),
        )

    # ------------------------------------------------------------------ data transfer

    def _receive_loop(self) -> None:
        while True:
            if self.stop_requested and not self.busy:
                raise StopRequested
            pdu_type, length = self.conn.read_pdu_header()
            if pdu_type == P_DATA_TF_TYPE:
                self._p_data(length)
            elif pdu_type == A_RELEASE_RQ_TYPE:
                self.conn.skip(length)
                if self.busy:
                    raise ProtocolError("A-RELEASE-RQ in the middle of a message")
                self.conn.send_release_rp()
                self.summary.outcome = "released"
                return
            elif pdu_type == A_ABORT_TYPE:
                self.conn.skip(length)
                self.summary.outcome = "aborted by peer"
                return
            else:
                raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}")

    def _p_data(self, length: int) -> None:
        remaining = length
        while remaining > 0:
            pdv = self.conn.read_pdv_header()
            remaining -= 6 + pdv.length
            if remaining < 0:
                raise ProtocolError("PDV item runs past the end of its PDU")
            assert self._negotiated is not None
            if pdv.context_id not in self._negotiated.accepted:
                raise ProtocolError(f"PDV on presentation context {pdv.context_id} not accepted")
            message = self._message
            if message is None:
                message = self._message = _Message(context_id=pdv.context_id)
            elif message.context_id != pdv.context_id:
                raise ProtocolError("presentation context changed inside a message")
            if pdv.is_command:
                self._command_fragment(message, pdv.length, pdv.is_last)
            else:
                self._data_fragment(message, pdv.length, pdv.is_last)

    def _command_fragment(self, message: _Message, length: int, last: bool) -> None:
        if message.command is not None:
            raise ProtocolError("command fragment after a complete command")
        if len(message.command_bytes) + length > MAX_COMMAND_LENGTH:
            raise ProtocolError("command set too long")
        message.command_bytes += self.conn.read_exact(length)
        if not last:
            return
        try:
            message.command = dimse.decode_command(bytes(message.command_bytes))
        except dimse.CommandError as exc:
            raise ProtocolError(str(exc)) from exc
        command = message.command
        if command.command_field == dimse.C_ECHO_RQ:
            self._respond(message, dimse.C_ECHO_RSP, status.SUCCESS)
        elif command.command_field == dimse.C_STORE_RQ:
            if not command.has_dataset:
                raise ProtocolError("C-STORE-RQ without a data set")
            assert self._negotiated is not None
            _, transfer_syntax = self._negotiated.accepted[message.context_id]
            message.writer = InstanceWriter(
                self.settings.incoming,
                self._temp_files.take,
                sop_class_uid=command.sop_class_uid,
                sop_instance_uid=command.sop_instance_uid,
                transfer_syntax=transfer_syntax,
                peer=PeerInfo(
                    calling_ae=self.summary.calling_ae,
                    called_ae=self.summary.called_ae,
                    address=self.summary.peer_address,
                ),
                durable=self.settings.durable,
            )
        else:
            raise ProtocolError(f"unsupported DIMSE command 0x{command.command_field:04X}")

    def _data_fragment(self, message: _Message, length: int, last: bool) -> None:
        writer = message.writer
        if writer is None:
            raise ProtocolError("data set fragment without a C-STORE command")
        left = length
        while left:
            chunk = self._buffer[: min(left, STREAM_CHUNK)]
            self.conn.read_into(chunk)
            writer.write(chunk)
            left -= len(chunk)
        if last:
            self._store_complete(message, writer)

    def _store_complete(self, message: _Message, writer: InstanceWriter) -> None:
        assert message.command is not None
        try:
            stored = writer.commit(self._selection, self._flusher)
        except StoreRefused as refused:
            logger.error(
                "refused instance %s from %s: %s (status 0x%04X)",
                message.command.sop_instance_uid[:80],
                self.summary.calling_ae,
                refused.reason,
                refused.status,
            )
            key = f"0x{refused.status:04X}"
            self.summary.failures[key] = self.summary.failures.get(key, 0) + 1
            self._respond(message, dimse.C_STORE_RSP, refused.status, refused.reason)
            return
        series = self.summary.series.setdefault(
            stored.series_uid, SeriesSummary(study_uid=stored.study_uid, tags=stored.tags)
        )
        series.sop_instance_uids.append(stored.sop_instance_uid)
        series.files.append(stored.path.name)
        series.bytes += stored.size
        self.summary.instances += 1
        self.summary.bytes += stored.size
        self._respond(message, dimse.C_STORE_RSP, status.SUCCESS)

    def _respond(
        self, message: _Message, command_field: int, dimse_status: int, comment: str = ""
    ) -> None:
        assert message.command is not None
        response = dimse.encode_response(
            command_field,
            message.command.message_id,
            dimse_status,
            message.command.sop_class_uid,
            message.command.sop_instance_uid if command_field == dimse.C_STORE_RSP else "",
            comment,
        )
        self.conn.send_command(message.context_id, response)
        self._message = None
