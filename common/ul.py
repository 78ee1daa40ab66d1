"""The DICOM upper layer's PDU types (PS3.8 9.3.1), shared by the receiver's and the
dispatcher's own data paths."""

from __future__ import annotations

from typing import Final

A_ASSOCIATE_RQ_TYPE: Final = 0x01
A_ASSOCIATE_AC_TYPE: Final = 0x02
A_ASSOCIATE_RJ_TYPE: Final = 0x03
P_DATA_TF_TYPE: Final = 0x04
A_RELEASE_RQ_TYPE: Final = 0x05
A_RELEASE_RP_TYPE: Final = 0x06
A_ABORT_TYPE: Final = 0x07
