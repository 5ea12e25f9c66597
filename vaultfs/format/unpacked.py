"""Unpacked files (index, snapshot, lock) in v2: ``0x02 || zstd frame`` inside the seal (FORMAT.md §3).

v1 stores the JSON as is. Readers accept raw JSON (first byte ``{`` or ``[``) in v2 too, for files written
before an upgrade. Compressors are per thread: a zstandard object shared between threads can crash.
"""

from __future__ import annotations

import threading

import zstandard

from vaultfs.errors import FormatError

_local = threading.local()
ZSTD_LEVEL = 3  # restic's "auto" compression is klauspost's SpeedDefault, about zstd level 3


def compressor() -> zstandard.ZstdCompressor:
    comp = getattr(_local, "comp", None)
    if comp is None:
        comp = _local.comp = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=False)
    return comp


def decompressor() -> zstandard.ZstdDecompressor:
    dec = getattr(_local, "dec", None)
    if dec is None:
        dec = _local.dec = zstandard.ZstdDecompressor()
    return dec


def compress(data: bytes | memoryview) -> bytes:
    return compressor().compress(data)


def decompress(data: bytes | memoryview, size: int | None = None, what: str = "data") -> bytes:
    try:
        if size is not None:
            out = decompressor().decompress(data, max_output_size=size)
        else:
            out = decompressor().decompress(data)
    except zstandard.ZstdError as exc:
        raise FormatError(f"{what} does not decompress ({exc})") from None
    if size is not None and len(out) != size:
        raise FormatError(f"{what} decompressed to {len(out)} bytes, expected {size}")
    return out


def encode(json_bytes: bytes, version: int) -> bytes:
    if version == 1:
        return json_bytes
    return b"\x02" + compress(json_bytes)


def decode(plain: bytes, what: str = "file") -> bytes:
    if not plain or plain[0] in (0x7B, 0x5B):
        return plain
    if plain[0] == 2:
        return _decompress_frame(plain[1:], what)
    raise FormatError(f"{what} uses an unsupported encoding (first byte 0x{plain[0]:02x})")


def _decompress_frame(data: bytes, what: str) -> bytes:
    try:
        obj = decompressor().decompressobj()
        out = obj.decompress(data)
        if not obj.eof:
            raise FormatError(f"{what} is truncated (incomplete zstd frame)")
        return out
    except zstandard.ZstdError as exc:
        raise FormatError(f"{what} does not decompress ({exc})") from None
