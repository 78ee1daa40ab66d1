"""DIMSE status codes of a C-STORE response, by name (PS3.4 Annex B.2.3, PS3.7 Annex C).

A code is described as ``0xA700 Out of Resources``: that text goes into ``task.json``
(``last_error``, ``info.fail_reason``) and events, so an administrator sees what the peer said.
"""

from __future__ import annotations

from typing import Final, Literal

SUCCESS: Final = 0x0000
# Warnings (PS3.4 B.2.3): the instance was stored.
WARNING_COERCION: Final = 0xB000
"""Coercion of data elements."""
WARNING_ELEMENTS_DISCARDED: Final = 0xB006
WARNING_SOP_CLASS_MISMATCH: Final = 0xB007
"""Data set does not match SOP class (stored anyway)."""
WARNING_ATTRIBUTE_LIST: Final = 0x0107
"""PS3.7 C.4.2: attribute list error."""
WARNING_VALUE_OUT_OF_RANGE: Final = 0x0116
"""PS3.7 C.4.2: attribute value out of range."""
# Failures.
OUT_OF_RESOURCES: Final = 0xA700
"""Refused: out of resources (PS3.4 B.2.3; the A7xx range)."""
SOP_CLASS_MISMATCH: Final = 0xA900
"""Error: data set does not match SOP class (the A9xx range)."""
CANNOT_UNDERSTAND: Final = 0xC000
"""Error: cannot understand (the Cxxx range)."""
PROCESSING_FAILURE: Final = 0x0110
NOT_AUTHORIZED: Final = 0x0124
DUPLICATE_INVOCATION: Final = 0x0210
SOP_CLASS_NOT_SUPPORTED: Final = 0x0122
UNRECOGNIZED_OPERATION: Final = 0x0211
MISTYPED_ARGUMENT: Final = 0x0212
RESOURCE_LIMITATION: Final = 0x0213

_NAMES: Final = {
    SUCCESS: "Success",
    WARNING_COERCION: "Warning: Coercion of Data Elements",
    WARNING_ELEMENTS_DISCARDED: "Warning: Elements Discarded",
    WARNING_SOP_CLASS_MISMATCH: "Warning: Data Set does not match SOP Class",
    WARNING_ATTRIBUTE_LIST: "Warning: Attribute List Error",
    WARNING_VALUE_OUT_OF_RANGE: "Warning: Attribute Value Out of Range",
    PROCESSING_FAILURE: "Processing Failure",
    NOT_AUTHORIZED: "Not Authorized",
    SOP_CLASS_NOT_SUPPORTED: "SOP Class not Supported",
    DUPLICATE_INVOCATION: "Duplicate Invocation",
    UNRECOGNIZED_OPERATION: "Unrecognized Operation",
    MISTYPED_ARGUMENT: "Mistyped Argument",
    RESOURCE_LIMITATION: "Resource Limitation",
}

Category = Literal["success", "warning", "failure", "pending", "cancel"]


def category(code: int) -> Category:
    """PS3.7 C.1-C.4: what a status code means for the instance."""
    if code == SUCCESS:
        return "success"
    if code in (0xFF00, 0xFF01):
        return "pending"
    if code == 0xFE00:
        return "cancel"
    if 0xB000 <= code <= 0xBFFF or code in (0x0001, WARNING_ATTRIBUTE_LIST, 0x0116):
        return "warning"
    return "failure"


def is_delivered(code: int) -> bool:
    """True when the peer stored the instance: success or warning (PS3.4 B.2.3)."""
    return category(code) in ("success", "warning")


def describe(code: int) -> str:
    """``0xA700 Out of Resources``: the code in hex and its meaning."""
    name = _NAMES.get(code)
    if name is None:
        high = code & 0xFF00
        if high == 0xA700:
            name = "Out of Resources"
        elif high == 0xA900:
            name = "Data Set does not match SOP Class"
        elif code & 0xF000 == 0xC000:
            name = "Cannot Understand"
        elif category(code) == "warning":
            name = "Warning"
        else:
            name = "Failure"
    return f"0x{code:04X} {name}"
