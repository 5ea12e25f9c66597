"""Pack files (FORMAT.md §4): ``blob_1 || ... || blob_n || sealed header || header length (u32 LE)``.

Plain header: one entry per blob, in file order, offsets implied by the order::

    type 0/1 (data/tree, stored raw):   type(1) | length(u32 LE) | id(32)                       37 bytes
    type 2/3 (data/tree, zstd, v2):     type(1) | length(u32 LE) | uncompressed length(u32 LE) | id(32)   41 bytes

``length`` is the stored length (sealed, compressed if so); the header length field counts the sealed header
(nonce + ciphertext + tag) but not its own 4 bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vaultfs.errors import FormatError

DATA = 0
TREE = 1
TYPE_NAMES = {DATA: "data", TREE: "tree"}
TYPE_BY_NAME = {"data": DATA, "tree": TREE}

PLAIN_ENTRY = 37
COMPRESSED_ENTRY = 41
MAX_HEADER = 16 * 1024 * 1024
MIN_PACK = PLAIN_ENTRY + 32 + 4
# restic reads this much of the tail eagerly: 15 compressed entries, the seal overhead and the length.
TAIL_GUESS = 15 * COMPRESSED_ENTRY + 32 + 4


@dataclass(frozen=True, slots=True)
class PackedBlob:
    """One header entry with its offset: where a blob sits in its pack."""

    blob_type: int  # DATA or TREE
    offset: int
    length: int  # stored length
    uncompressed_length: int  # 0 when stored uncompressed
    id: bytes

    @property
    def compressed(self) -> bool:
        return self.uncompressed_length != 0

    @property
    def plaintext_size(self) -> int:
        return self.uncompressed_length or self.length - 32


def encode_header(blobs: list[PackedBlob]) -> bytes:
    parts = []
    for b in blobs:
        if b.compressed:
            parts.append(
                struct.pack("<BII", b.blob_type | 2, b.length, b.uncompressed_length) + b.id
            )
        else:
            parts.append(struct.pack("<BI", b.blob_type, b.length) + b.id)
    return b"".join(parts)


def decode_header(plain: bytes, version: int = 2, what: str = "pack header") -> list[PackedBlob]:
    blobs: list[PackedBlob] = []
    pos = 0
    offset = 0
    n = len(plain)
    while pos < n:
        kind = plain[pos]
        if kind in (0, 1):
            if pos + PLAIN_ENTRY > n:
                raise FormatError(f"{what} is truncated")
            (length,) = struct.unpack_from("<I", plain, pos + 1)
            blob_id = plain[pos + 5 : pos + 37]
            blobs.append(PackedBlob(kind, offset, length, 0, blob_id))
            pos += PLAIN_ENTRY
        elif kind in (2, 3):
            if version < 2:
                raise FormatError(f"{what} has a compressed blob in a version 1 vault")
            if pos + COMPRESSED_ENTRY > n:
                raise FormatError(f"{what} is truncated")
            length, ulen = struct.unpack_from("<II", plain, pos + 1)
            blob_id = plain[pos + 9 : pos + 41]
            blobs.append(PackedBlob(kind & 1, offset, length, ulen, blob_id))
            pos += COMPRESSED_ENTRY
        else:
            raise FormatError(f"{what} has an invalid blob type {kind}")
        if length < 32:
            raise FormatError(f"{what} lists a blob of impossible length {length}")
        offset += length
    return blobs


def header_length_from_tail(tail: bytes, pack_size: int, what: str = "pack") -> int:
    """Validate the trailing length field as restic does and return the sealed header's length."""
    if pack_size < MIN_PACK or len(tail) < 4:
        raise FormatError(f"{what} is too small to be a pack ({pack_size} bytes)")
    (hlen,) = struct.unpack("<I", tail[-4:])
    if hlen < 32 or hlen > pack_size - 4 or hlen > MAX_HEADER:
        raise FormatError(f"{what} has an invalid header length {hlen} (file size {pack_size})")
    return hlen


def check_blobs_fit(blobs: list[PackedBlob], header_len: int, pack_size: int, what: str) -> None:
    end = blobs[-1].offset + blobs[-1].length if blobs else 0
    if end + header_len + 4 != pack_size:
        raise FormatError(
            f"{what}: header describes {end + header_len + 4} bytes but the file has {pack_size}"
        )
