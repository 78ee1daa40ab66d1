"""Who a DICOM target's association goes to, and the words for why it could not be made.

Shared by the C-STORE handler (:mod:`dispatcher.targets.dicom`) and the C-ECHO test
(:mod:`dispatcher.echo`); the association itself is :mod:`dispatcher.targets.scu`.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Final

from common.config import DicomTarget
from common.task import MISSING, Task
from dispatcher.settings import DispatcherSettings

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


def rejection_text(peer: Peer, result: int, source: int, reason: int) -> str:
    """``association rejected by PACS@host:104 (permanent, service user: called AE title not
    recognized)`` for an A-ASSOCIATE-RJ."""
    return (
        f"association rejected by {peer} ({_RJ_RESULT.get(result, str(result))}, "
        f"{_RJ_SOURCE.get(source, str(source))}: "
        f"{_RJ_REASON.get((source, reason), f'reason {reason}')})"
    )


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
