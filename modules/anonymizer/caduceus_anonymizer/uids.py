"""Consistent UID replacement keyed by a project secret (PS3.15 E.1.1, action U).

The new UID is ``2.25.<decimal>`` (PS3.5 B.2): the decimal form of a 128-bit UUID whose bits are the
first 16 bytes of HMAC-SHA256(secret, old UID), with the version set to 8 (custom, RFC 9562) and the
RFC 4122 variant. Same secret and same old UID give the same new UID in every run and on every
machine; without the secret the mapping can neither be reversed nor recomputed. The result has at
most 44 characters, within the 64 of the UI VR.
"""

from __future__ import annotations

import hashlib
import hmac

UUID_DERIVED_ROOT = "2.25."


class UidMapper:
    """Replace UIDs deterministically under ``secret``; remembers what it replaced (for counts)."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self._mapped: dict[str, str] = {}

    def __call__(self, uid: str) -> str:
        """The replacement of ``uid`` (trailing NUL padding and spaces are not part of the UID)."""
        uid = uid.rstrip("\x00 ")
        if not uid:
            return uid
        new = self._mapped.get(uid)
        if new is None:
            new = self._mapped[uid] = hashed_uid(self._secret, uid)
        return new

    @property
    def replaced(self) -> int:
        """How many distinct UIDs were replaced so far."""
        return len(self._mapped)


def hashed_uid(secret: bytes, uid: str) -> str:
    """``2.25.`` + the UUID made from HMAC-SHA256(secret, uid)."""
    digest = bytearray(hmac.new(secret, uid.encode("ascii", "replace"), hashlib.sha256).digest())
    digest[6] = (digest[6] & 0x0F) | 0x80  # version 8
    digest[8] = (digest[8] & 0x3F) | 0x80  # variant 10
    return UUID_DERIVED_ROOT + str(int.from_bytes(digest[:16], "big"))
