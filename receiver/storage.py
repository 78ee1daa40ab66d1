"""Writing received instances into ``incoming/`` (DESIGN §4).

An instance is streamed into a temporary file in ``incoming/.tmp/`` named after the writing process,
then — once the data set is complete, parsed and accepted — flushed, and renamed into
``incoming/<SeriesUID>/<SeriesUID>#<SOPUID>.dcm``; its ``.tags`` side-car follows the same way.
Success is answered only after both names are durable. A crash leaves at most temporary files of
a dead process, which :func:`clean_stale_temp_files` removes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import json
import logging
import os
import re
import struct
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path
from typing import Final, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from common.implementation import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from common.spool import SEPARATOR, fsync_dir
from receiver import header, status
from receiver.negotiation import COMPRESSED
from receiver.tags import TagSelection, ValueReader, build_tags, dataset_reader, decoded_reader
from receiver.tempfiles import TempPair

logger = logging.getLogger(__name__)

MAX_UID_LENGTH: Final = 64
_UID_PATTERN: Final = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_PREAMBLE: Final = b"\x00" * 128 + b"DICM"
WRITEBACK_STEP: Final = 1 << 18
"""Bytes written between two requests to start writeback (durable mode)."""
SYNC_FILE_RANGE_WRITE: Final = 2
HEADER_PREFIX: Final = 1 << 16
"""Bytes of each data set kept in memory for the fast header reader."""
IMPLICIT_LE: Final = "1.2.840.10008.1.2"
_FAST_SYNTAXES: Final = frozenset(
    {IMPLICIT_LE, "1.2.840.10008.1.2.1"} | (COMPRESSED - {"1.2.840.10008.1.2.1.99"})
)
"""Transfer syntaxes whose data set is Little Endian and not deflated."""


class StoreRefused(Exception):
    """The instance is refused with a DIMSE failure ``status``; nothing of it is kept."""

    def __init__(self, dimse_status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = dimse_status
        self.reason = reason


@dataclass(frozen=True)
class StoredInstance:
    series_uid: str
    study_uid: str
    sop_instance_uid: str
    path: Path
    size: int
    tags: dict[str, str]


@dataclass(frozen=True)
class PeerInfo:
    """What the side-car records about the sender."""

    calling_ae: str
    called_ae: str
    address: str


def encode_file_meta(
    *, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str
) -> bytes:
    """The File Meta Information group (PS3.10 §7.1), Explicit VR Little Endian.

    Encoded directly: it is built once per received instance, and pydicom's general writer costs
    half a millisecond each time.
    """
    elements = [
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _even(sop_class_uid.encode("ascii"), b"\x00")),
        _meta_element(0x0003, b"UI", _even(sop_instance_uid.encode("ascii"), b"\x00")),
        _meta_element(0x0010, b"UI", _even(transfer_syntax.encode("ascii"), b"\x00")),
        _meta_element(0x0012, b"UI", _even(IMPLEMENTATION_CLASS_UID.encode("ascii"), b"\x00")),
        _meta_element(0x0013, b"SH", _even(IMPLEMENTATION_VERSION_NAME.encode("ascii"), b" ")),
    ]
    if source_ae:
        ae = source_ae.encode("ascii", "replace")[:16]
        elements.append(_meta_element(0x0016, b"AE", _even(ae, b" ")))
    body = b"".join(elements)
    return _meta_element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"UN", b"UT", b"SQ"):
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def check_uid(name: str, value: str) -> str:
    """``value`` if it is a valid UID safe to use as a file name, else refuse with 0xC211."""
    if not value:
        raise StoreRefused(status.INVALID_UID, f"{name} is missing")
    if len(value) > MAX_UID_LENGTH or not _UID_PATTERN.match(value):
        shown = value[:80].encode("unicode_escape").decode("ascii")
        raise StoreRefused(status.INVALID_UID, f"{name} is not a valid UID: {shown!r}")
    return value


class InstanceWriter:
    """One instance being received: a temporary file that becomes a spool file or disappears."""

    def __init__(
        self,
        incoming: Path,
        temp: Callable[[], TempPair],
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax: str,
        peer: PeerInfo,
        durable: bool = True,
    ) -> None:
        self.incoming = incoming
        self.durable = durable
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid
        self.transfer_syntax = transfer_syntax
        self.peer = peer
        self.error: StoreRefused | None = None
        self.size = 0
        self._flushed = 0
        self.dataset_size = 0
        self._prefix = bytearray()
        self._temp: TempPair | None = None
        self._fd: int | None = None
        try:
            check_uid("AffectedSOPClassUID", sop_class_uid)
            check_uid("AffectedSOPInstanceUID", sop_instance_uid)
        except StoreRefused as refused:
            self.error = refused
            return
        try:
            self._temp = temp()
            self._fd = self._temp.dcm_fd
            self._write(_PREAMBLE + self._file_meta_bytes())
        except OSError as exc:
            self._fail_write(exc)

    def _file_meta_bytes(self) -> bytes:
        return encode_file_meta(
            sop_class_uid=self.sop_class_uid,
            sop_instance_uid=self.sop_instance_uid,
            transfer_syntax=self.transfer_syntax,
            source_ae=self.peer.calling_ae,
        )

    def write(self, data: memoryview) -> None:
        """Append a data set fragment; after a failure, fragments are drained and dropped."""
        self.dataset_size += len(data)
        missing = HEADER_PREFIX - len(self._prefix)
        if missing > 0:
            self._prefix += data[:missing]
        if self.error is None:
            try:
                self._write(data)
            except OSError as exc:
                self._fail_write(exc)

    def _write(self, data: bytes | memoryview) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
            self.size += written
        if self.durable and self.size - self._flushed >= WRITEBACK_STEP:
            # Start writing back now, so the fdatasync at the end has little left to wait for.
            start_writeback(self._fd, self._flushed, self.size - self._flushed)
            self._flushed = self.size

    def _fail_write(self, exc: OSError) -> None:
        kind = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "write failed"
        logger.error("cannot write instance %s: %s (%s)", self.sop_instance_uid[:80], kind, exc)
        self.error = StoreRefused(status.OUT_OF_RESOURCES, f"{kind}: {exc.strerror}")
        self.discard()

    def discard(self) -> None:
        """Drop the temporary files (idempotent)."""
        self._fd = None
        if self._temp is not None:
            self._temp.remove()

    def commit(self, selection: TagSelection, flusher: Executor | None = None) -> StoredInstance:
        """Validate the complete instance and move it into its series folder.

        With ``flusher``, the data file is flushed on that executor while the side-car is built
        and flushed here, so the two flushes overlap. Raises :class:`StoreRefused` (and removes
        every trace of the instance) when it cannot be accepted.
        """
        try:
            if self.error is not None:
                raise self.error
            return self._commit(selection, flusher)
        except StoreRefused:
            self.discard()
            raise
        except OSError as exc:
            self._fail_write(exc)
            assert self.error is not None
            raise self.error from exc

    def _commit(self, selection: TagSelection, flusher: Executor | None) -> StoredInstance:
        fd, temp = self._fd, self._temp
        assert fd is not None and temp is not None
        flushing: Future[None] | None = None
        try:
            if self.durable:
                if flusher is None:
                    os.fdatasync(fd)
                else:
                    flushing = flusher.submit(os.fdatasync, fd)
            tags = self._side_car(selection, fd)
            data = json.dumps(tags, ensure_ascii=False).encode("utf-8")
            _write_all(temp.tags_fd, data)
            if self.durable:
                os.fdatasync(temp.tags_fd)
        finally:
            if flushing is not None:
                flushing.result()
        temp.close()
        self._fd = None
        series_uid = tags["SeriesInstanceUID"]
        series_dir = _move_into_series(
            self.incoming,
            series_uid,
            [
                (temp.dcm_path, tags["Filename"]),
                (temp.tags_path, tags["Filename"].removesuffix(".dcm") + ".tags"),
            ],
            self.durable,
        )
        return StoredInstance(
            series_uid=series_uid,
            study_uid=_uid(tags, "StudyInstanceUID"),
            sop_instance_uid=self.sop_instance_uid,
            path=series_dir / tags["Filename"],
            size=self.size,
            tags=tags,
        )

    def _side_car(self, selection: TagSelection, fd: int) -> dict[str, str]:
        """The validated side-car of the instance; refuses instances that cannot be placed."""
        extra = {
            "MediaStorageSOPClassUID": self.sop_class_uid,
            "SenderAET": self.peer.calling_ae,
            "ReceiverAET": self.peer.called_ae,
            "SenderAddress": self.peer.address,
        }
        tags = build_tags(self._value_reader(selection, fd), selection, extra)
        sop_uid = _uid(tags, "SOPInstanceUID") or self.sop_instance_uid
        sop_class = _uid(tags, "SOPClassUID") or self.sop_class_uid
        if sop_uid != self.sop_instance_uid or sop_class != self.sop_class_uid:
            raise StoreRefused(
                status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "SOP Class/Instance UID of the data set differ from the C-STORE request",
            )
        series_uid = check_uid("SeriesInstanceUID", _uid(tags, "SeriesInstanceUID"))
        tags["SeriesInstanceUID"] = series_uid
        tags["Filename"] = f"{series_uid}{SEPARATOR}{self.sop_instance_uid}.dcm"
        return tags

    def _value_reader(self, selection: TagSelection, fd: int) -> ValueReader:
        """Tag values by the fast header reader, or by pydicom when it cannot answer.

        The fast reader also checks the structure of the whole data set: a truncated or corrupt
        one is refused with 0xC210.
        """
        if self.transfer_syntax in _FAST_SYNTAXES:
            source = header.Source(
                bytes(self._prefix), self.dataset_size, fd, self.size - self.dataset_size
            )
            try:
                found = header.scan(
                    source,
                    selection.numbers | {header.SPECIFIC_CHARACTER_SET},
                    implicit=self.transfer_syntax == IMPLICIT_LE,
                )
                values, unclean = header.decode(found)
                return decoded_reader(values, unclean)
            except header.MalformedDataset as exc:
                raise StoreRefused(
                    status.CANNOT_UNDERSTAND, f"data set cannot be decoded: {exc}"
                ) from exc
            except header.HeaderFallback as why:
                logger.debug("pydicom reads %s: %s", self.sop_instance_uid, why)
        return dataset_reader(self._read_header())

    def _read_header(self) -> Dataset:
        try:
            assert self._temp is not None
            ds = dcmread(self._temp.dcm_path, stop_before_pixels=True)
            ds.get("SeriesInstanceUID")  # forces decoding of the elements read so far
            return ds
        except (InvalidDicomError, ValueError, EOFError, OSError, KeyError, TypeError) as exc:
            raise StoreRefused(
                status.CANNOT_UNDERSTAND, f"data set cannot be decoded: {exc}"
            ) from exc


def _uid(tags: dict[str, str], keyword: str) -> str:
    return tags.get(keyword, "").strip("\x00 ")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _move_into_series(
    incoming: Path, series_uid: str, moves: list[tuple[Path, str]], durable: bool
) -> Path:
    """Rename each (temp path, final name) of ``moves`` into ``incoming/<series_uid>/``, in order.

    The router may delete an emptied series folder at any moment; a rename that finds the folder
    gone recreates it and tries again. Returns the series folder.
    """
    series_dir = incoming / series_uid
    created = False
    for tmp, name in moves:
        for attempt in range(5):
            if not series_dir.is_dir():
                series_dir.mkdir(exist_ok=True)
                created = True
            try:
                os.rename(tmp, series_dir / name)
                break
            except FileNotFoundError:
                if attempt == 4 or not tmp.exists():
                    raise
    if durable:
        fsync_dir(series_dir)
        if created:
            fsync_dir(incoming)
    return series_dir


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc ``sync_file_range`` (Linux), or None where it is not available."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError, TypeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a byte range to disk without waiting for it."""
    function = _sync_file_range()
    if function is not None:
        function(fd, offset, length, SYNC_FILE_RANGE_WRITE)
