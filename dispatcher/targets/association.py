"""The association plumbing of DICOM targets: peer, negotiation, bounded waits, messages.

Shared by the C-STORE handler (:mod:`dispatcher.targets.dicom`) and the C-ECHO test
(:mod:`dispatcher.echo`). Every wait is bounded: TCP connect (``connection_timeout``),
negotiation (``acse_timeout``), each DIMSE response (``dimse_timeout``), each socket send and
receive (``network_timeout``, set on the socket at ``EVT_CONN_OPEN`` because pynetdicom leaves
a requestor's socket blocking without a timeout), and a :class:`Watchdog` over each step.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import PresentationContext

from common.config import DicomTarget
from common.task import MISSING, Task
from dispatcher.settings import DispatcherSettings

logger = logging.getLogger(__name__)

RECEIVE_PDU: Final = 16384
"""Largest PDU the dispatcher accepts: it only receives C-STORE responses (about 200 bytes)."""
WATCHDOG_GRACE: Final = 5.0
DUL_LOOP_DELAY: Final = 0.0002
"""Seconds pynetdicom's DUL thread sleeps when it finds nothing to do (pynetdicom: 0.001).

The DUL sends one queued P-DATA PDU per loop and sleeps whenever the queue is momentarily
empty, which happens between most PDUs of a C-STORE read from a file; with 1 ms that sleep
is a large part of the time per instance (py-spy: ``dul.py`` ``time.sleep`` was the top frame
of a 300-instance dispatch). 0.2 ms gave about 15 % more MB/s against storescp for a few
percent of a core while the association waits (``docs/dispatcher.md``)."""

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, and the reason, whose meaning depends on source.
_RJ_RESULT: Final = {1: "permanent", 2: "transient"}
_RJ_SOURCE: Final = {1: "service user", 2: "service provider (ACSE)", 3: "service provider"}
_RJ_REASON: Final = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognized",
    (1, 7): "called AE title not recognized",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


class AssociationFailed(Exception):
    """No association could even be requested (the host name does not resolve)."""


class PeerProblem(Exception):
    """The peer cannot be determined (``ip: sender`` without an address): a retry cannot help."""


@dataclass(frozen=True)
class Peer:
    """Where an association goes and under which AE titles."""

    host: str
    port: int
    calling: str
    called: str

    def __str__(self) -> str:
        return f"{self.called}@{self.host}:{self.port}"


def resolve_peer(target: DicomTarget, task: Task | None, settings: DispatcherSettings) -> Peer:
    """The peer of ``target`` for ``task``: ``ip: sender`` and the pass-through AE titles."""
    host = target.ip
    if host == "sender":
        address = task.info.sender_address if task is not None else MISSING
        if not address or address == MISSING:
            raise PeerProblem("the target sends to the sender, but the task has no sender_address")
        host = address
    calling = target.aet_source or settings.ae_title
    called = target.aet_target
    if task is not None and target.pass_sender_aet and task.info.sender_aet not in ("", MISSING):
        calling = task.info.sender_aet
    if (
        task is not None
        and target.pass_receiver_aet
        and task.info.receiver_aet not in ("", MISSING)
    ):
        called = task.info.receiver_aet
    return Peer(host=host, port=target.port, calling=calling, called=called)


@dataclass
class Negotiation:
    """What happened while the association was requested, for a precise message."""

    rejection: tuple[int, int, int] | None = None
    connected: bool = False
    """The TCP connection was made (``EVT_CONN_OPEN``)."""
    nodelay: bool = False


def open_association(
    peer: Peer,
    contexts: list[PresentationContext],
    settings: DispatcherSettings,
    negotiation: Negotiation | None = None,
) -> Association:
    """Request an association (check ``is_established``); every wait is bounded."""
    ae = AE(ae_title=peer.calling)
    ae.connection_timeout = settings.connection_timeout
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.maximum_pdu_size = RECEIVE_PDU
    seen = negotiation if negotiation is not None else Negotiation()

    def on_open(event: evt.Event) -> None:
        seen.connected = True
        transport = event.assoc.dul.socket
        sock = transport.socket if transport is not None else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(settings.network_timeout)
            seen.nodelay = bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    def on_acse(event: evt.Event) -> None:
        primitive = getattr(event, "primitive", None)
        if isinstance(primitive, A_ASSOCIATE) and primitive.result in (1, 2):
            seen.rejection = (
                int(primitive.result or 0),
                int(primitive.result_source or 0),
                int(primitive.diagnostic or 0),
            )

    handlers: list[Any] = [(evt.EVT_CONN_OPEN, on_open), (evt.EVT_ACSE_RECV, on_acse)]
    try:
        assoc = ae.associate(
            peer.host,
            peer.port,
            contexts=contexts,
            ae_title=peer.called,
            max_pdu=RECEIVE_PDU,
            evt_handlers=handlers,
        )
    except socket.gaierror as exc:
        raise AssociationFailed(
            f"cannot connect to {peer.host}:{peer.port}: unknown host ({exc.strerror})"
        ) from None
    if assoc.is_established:
        assoc.dul._run_loop_delay = DUL_LOOP_DELAY
        limit_sent_pdu(assoc, settings.max_pdu)
        keep_responses_for_the_requestor(assoc)
    return assoc


def keep_responses_for_the_requestor(assoc: Association) -> None:
    """Work around a race in pynetdicom 3.0 that loses a C-STORE response now and then.

    ``send_c_store`` pauses the association's reactor thread before sending and waits for it
    to report ``_is_paused``, then sets the checkpoint again once the response came. The flag
    is stale right after that: the reactor is awake again but has not yet cleared it. When the
    next ``send_c_store`` starts in that window (likely under load: a woken thread may wait a
    whole 5 ms GIL switch interval), it sees the stale flag and sends; the reactor then takes
    the response off the DIMSE queue, logs "Received unexpected C-STORE service message" and
    drops it, and ``send_c_store`` waits for a response that never comes (seen here in about
    1 of 20 associations of 100 instances on a loaded machine). Every response the reactor
    takes is put back for the requestor instead; requests from the peer are served as usual.
    """
    serve = assoc._serve_request

    def serve_requests_only(msg: Any, context_id: int) -> None:
        if getattr(msg, "is_valid_response", False):
            assoc.dimse.msg_queue.put((context_id, msg))
            return
        serve(msg, context_id)

    assoc._serve_request = serve_requests_only  # type: ignore[method-assign]


def limit_sent_pdu(assoc: Association, cap: int) -> None:
    """Send PDUs of at most ``cap`` bytes even when the peer accepts larger (or unlimited) ones.

    pynetdicom fragments with the peer's Maximum Length (PS3.8 D.1); lowering that value on the
    received A-ASSOCIATE-AC is allowed: a requestor may always send smaller PDUs."""
    if cap <= 0:
        return
    for item in assoc.acceptor.user_information:
        if isinstance(item, MaximumLengthNotification):
            peer = item.maximum_length_received or 0
            if peer == 0 or peer > cap:
                item.maximum_length_received = cap


def why_not_established(
    assoc: Association, peer: Peer, negotiation: Negotiation, timeout: float
) -> str:
    """A precise reason for an association that was not established."""
    if negotiation.rejection is not None:
        result, source, reason = negotiation.rejection
        return (
            f"association rejected by {peer} ({_RJ_RESULT.get(result, str(result))}, "
            f"{_RJ_SOURCE.get(source, str(source))}: "
            f"{_RJ_REASON.get((source, reason), f'reason {reason}')})"
        )
    if not negotiation.connected:
        problem = connect_problem(peer.host, peer.port, timeout) or "connection failed"
        return f"cannot connect to {peer.host}:{peer.port}: {problem}"
    if assoc.is_aborted:
        return f"{peer} aborted the association or closed the connection during negotiation"
    return f"{peer} did not answer the association request within {timeout:g} s"


def connect_problem(host: str, port: int, timeout: float) -> str | None:
    """Why a TCP connection to ``host:port`` fails (``Connection refused``), or None."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except socket.gaierror as exc:
        return f"unknown host ({exc.strerror})"
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def close_connection(assoc: Association) -> None:
    """Shut the association's socket down; pynetdicom then ends the association (Evt17)."""
    transport = assoc.dul.socket
    sock = transport.socket if transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class Watchdog:
    """Closes the connection when one step (a C-STORE, the release) outlasts ``limit`` s."""

    def __init__(self, assoc: Association, limit: float) -> None:
        self.assoc = assoc
        self.limit = limit
        self.fired: str | None = None
        self._step: tuple[str, float] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="dicom-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        self._step = (what, time.monotonic())
        try:
            yield
        finally:
            self._step = None

    def _watch(self) -> None:
        while not self._stop.wait(0.25):
            step = self._step
            if step is not None and time.monotonic() - step[1] > self.limit:
                self.fired = step[0]
                self._step = None
                logger.warning(
                    "no progress for %.0f s on %s: closing the connection", self.limit, step[0]
                )
                close_connection(self.assoc)


def close_leftover(assoc: Association) -> None:
    """Close the socket pynetdicom leaves open when the connection broke mid-association."""
    transport = assoc.dul.socket
    sock = transport.socket if transport is not None else None
    if sock is not None and not assoc.is_established:
        with contextlib.suppress(OSError):
            sock.close()
