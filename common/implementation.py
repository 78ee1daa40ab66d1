"""How Caduceus names itself on the wire and in the files it writes (PS3.7 D.3.3.2, PS3.10
7.1): the Implementation Class UID and Version Name of every association it negotiates, as
receiver and as sender, and of the file meta of every file it stores."""

from __future__ import annotations

from typing import Final

IMPLEMENTATION_CLASS_UID: Final = "1.2.826.0.1.3680043.10.1462.1.1"
IMPLEMENTATION_VERSION_NAME: Final = "CADUCEUS_010"
