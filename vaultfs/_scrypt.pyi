"""Type stub for the C scrypt ROMix (see ``_scrypt.c`` and ``vaultfs.crypto.scrypt_lanes``)."""

from typing_extensions import Buffer

def romix(buffer: Buffer, n: int, r: int, /) -> None: ...
