"""DIMSE status codes the receiver answers with (PS3.4 Annex B.2.3, PS3.7 Annex C)."""

from typing import Final

SUCCESS: Final = 0x0000
"""PS3.7 C.1.1: Success."""

OUT_OF_RESOURCES: Final = 0xA700
"""PS3.4 B.2.3: Refused - Out of Resources (write failure, full disk)."""

DATASET_DOES_NOT_MATCH_SOP_CLASS: Final = 0xA900
"""PS3.4 B.2.3: Error - Data Set does not match SOP Class (command and data set UIDs differ)."""

CANNOT_UNDERSTAND: Final = 0xC210
"""PS3.4 B.2.3: Error - Cannot understand (the data set cannot be decoded)."""

INVALID_UID: Final = 0xC211
"""PS3.4 B.2.3 "Cannot understand" range (Cxxx): a UID is missing, malformed or would escape
the spool. Caduceus-specific code inside the range the standard reserves for this class."""

PROCESSING_FAILURE: Final = 0x0110
"""PS3.7 C.4.2: Processing failure (an unexpected internal error)."""

# A-ASSOCIATE-RJ fields (PS3.8 9.3.4)
RJ_PERMANENT: Final = 1
RJ_TRANSIENT: Final = 2
RJ_SOURCE_USER: Final = 1
RJ_SOURCE_PROVIDER_PRESENTATION: Final = 3
RJ_REASON_NONE: Final = 1
RJ_REASON_CALLING_AE: Final = 3
RJ_REASON_LOCAL_LIMIT: Final = 2
RJ_REASON_TEMPORARY_CONGESTION: Final = 1

# A-ABORT sources (PS3.8 9.3.8)
ABORT_SOURCE_USER: Final = 0
ABORT_SOURCE_PROVIDER: Final = 2
ABORT_REASON_UNEXPECTED_PDU: Final = 2
ABORT_REASON_NOT_SPECIFIED: Final = 0
