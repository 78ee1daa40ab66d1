"""Table E.1-1 as a lookup: which action applies to an attribute under the chosen options.

When several chosen options have an entry for an attribute, the one that keeps most wins: K over C
over the others (PS3.15 E.3: an option retains information the Basic Profile would remove). The
combined actions of the Basic Profile are resolved towards IOD conformance, because which type an
attribute has in the object's IOD is not known here: X/Z -> Z, X/D -> D, Z/D -> D, X/Z/D -> D and
X/Z/U* -> U for a UID (VR UI), the sequence with its contained UIDs replaced for a sequence
(Referenced Image Sequence and the like: their items are de-identified like any other dataset), Z
otherwise. Resolving never keeps information: Z and D carry none.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import StrEnum

from caduceus_anonymizer.profile_table import ROWS


class Action(StrEnum):
    """PS3.15 E.1.1 action codes, as resolved for one attribute."""

    KEEP = "K"
    REMOVE = "X"
    EMPTY = "Z"
    DUMMY = "D"
    UID = "U"
    CLEAN = "C"
    REMOVE_OR_EMPTY_OR_UID = "X/Z/U*"  # U for a UI attribute, K (recursing) for a sequence, else Z


class Column(StrEnum):
    """The option columns of Table E.1-1 (short names used in ``profile_table``)."""

    RETAIN_SAFE_PRIVATE = "SPR"
    RETAIN_UIDS = "UID"
    RETAIN_DEVICE_IDENTITY = "DEV"
    RETAIN_INSTITUTION_IDENTITY = "INST"
    RETAIN_PATIENT_CHARACTERISTICS = "PAT"
    RETAIN_LONG_FULL_DATES = "FULL"
    RETAIN_LONG_MODIFIED_DATES = "MOD"
    CLEAN_DESCRIPTORS = "DESC"
    CLEAN_STRUCTURED_CONTENT = "STRUCT"
    CLEAN_GRAPHICS = "GRAPH"


_COMBINED = {
    "X/Z": Action.EMPTY,
    "X/D": Action.DUMMY,
    "Z/D": Action.DUMMY,
    "X/Z/D": Action.DUMMY,
    "X/Z/U*": Action.REMOVE_OR_EMPTY_OR_UID,
}
_PRECEDENCE = {"K": 0, "C": 1}


@dataclass(frozen=True)
class Rule:
    """One row of Table E.1-1."""

    name: str
    basic: str
    options: dict[Column, str]

    def action(self, chosen: frozenset[Column]) -> tuple[Action, Column | None]:
        """The action under the ``chosen`` options, and the option column it came from."""
        entries = [(code, column) for column, code in self.options.items() if column in chosen]
        if entries:
            code, column = min(entries, key=lambda entry: _PRECEDENCE.get(entry[0], 2))
            return _resolve(code), column
        return _resolve(self.basic), None


def _resolve(code: str) -> Action:
    return _COMBINED.get(code) or Action(code)


@dataclass(frozen=True)
class Profile:
    """Rules by tag, plus the rules of repeating groups (curves 50xx, overlays 60xx)."""

    exact: dict[int, Rule]
    repeating: tuple[tuple[int, int, Rule], ...]  # (mask, value, rule)

    def rule(self, tag: int) -> Rule | None:
        """The rule for ``tag`` (a public attribute), or ``None`` when the table has none."""
        found = self.exact.get(tag)
        if found is not None:
            return found
        for mask, value, rule in self.repeating:
            if tag & mask == value:
                return rule
        return None


@functools.cache
def profile() -> Profile:
    """Table E.1-1, parsed once."""
    exact: dict[int, Rule] = {}
    repeating: list[tuple[int, int, Rule]] = []
    for tag, name, basic, *options in ROWS:
        parsed = dict(_option(entry) for entry in (options[0].split() if options else []))
        rule = Rule(name, basic, parsed)
        digits = tag.replace(",", "")
        if "x" in digits:
            mask = int("".join("0" if c == "x" else "F" for c in digits), 16)
            repeating.append((mask, int(digits.replace("x", "0"), 16), rule))
        else:
            exact[int(digits, 16)] = rule
    return Profile(exact, tuple(repeating))


def _option(entry: str) -> tuple[Column, str]:
    column, _, code = entry.partition("=")
    return Column(column), code
