"""Dates for the Retain Longitudinal Temporal Information Modified Dates Option (PS3.15 E.3.6).

"Modified" is implemented as one constant offset in days per patient: every DA and the date part of
every DT of a patient move by the same number of days, so intervals between a patient's studies are
kept. Times (TM, and the time part of DT) are not changed. The offset is derived from the secret
and the patient's identity, so it is the same in every run and never written out.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac

DA_FORMAT = "%Y%m%d"


def patient_offset(secret: bytes, patient_key: str, max_days: int) -> datetime.timedelta:
    """A shift into the past of 1 to ``max_days`` days, constant for ``patient_key``."""
    message = b"date-offset\x00" + patient_key.encode("utf-8", "replace")
    digest = hmac.new(secret, message, hashlib.sha256).digest()
    return -datetime.timedelta(days=1 + int.from_bytes(digest[:8], "big") % max_days)


def shift_da(value: str, offset: datetime.timedelta) -> str | None:
    """``value`` (``YYYYMMDD``) moved by ``offset``; ``None`` when it is not a full date."""
    value = value.strip()
    try:
        day = datetime.datetime.strptime(value, DA_FORMAT).date()
    except ValueError:
        return None
    if len(value) != 8:
        return None
    try:
        moved = day + offset
    except OverflowError:
        return None
    return f"{moved.year:04d}{moved.month:02d}{moved.day:02d}"


def shift_dt(value: str, offset: datetime.timedelta) -> str | None:
    """``value`` (``YYYYMMDD[HHMMSS[.F]][&ZZXX]``) with its date moved; ``None`` if no full date."""
    value = value.strip()
    date = shift_da(value[:8], offset) if len(value) >= 8 else None
    if date is None or not (value[8:] == "" or value[8].isdigit() or value[8] in "+-"):
        return None
    return date + value[8:]
