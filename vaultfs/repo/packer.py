"""Pack writer: collects sealed blobs into packs of about 16 MiB, data and trees apart (FORMAT.md §4.2).

The caller does the CPU work (compress, seal) in its own threads and hands sealed blobs to ``add``; a pack is
finished once it reaches the target size, its header is sealed and appended, and the whole file is stored
under the SHA-256 of its bytes. ``on_pack`` is called after each pack is safely in the backend, with the pack
id and its header entries, so the caller can index it: packs are always written before the index that names
them. Thread-safe.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Callable

from vaultfs.backend import Backend
from vaultfs.crypto import MasterKey
from vaultfs.format.pack import COMPRESSED_ENTRY, MAX_HEADER, PackedBlob, encode_header

DEFAULT_PACK_SIZE = 16 * 1024 * 1024

OnPack = Callable[[bytes, list[PackedBlob]], None]


class _OpenPack:
    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.blobs: list[PackedBlob] = []
        self.ids: set[bytes] = set()


class PackWriter:
    def __init__(
        self,
        backend: Backend,
        key: MasterKey,
        on_pack: OnPack,
        target_size: int = DEFAULT_PACK_SIZE,
    ) -> None:
        self.backend = backend
        self.key = key
        self.on_pack = on_pack
        self.target_size = target_size
        self._lock = threading.Lock()
        self._open: dict[int, _OpenPack] = {}
        self.packs_written = 0
        self.bytes_written = 0

    def add(self, blob_type: int, blob_id: bytes, sealed: bytes, uncompressed_length: int) -> bool:
        """Queue a sealed blob. Returns False (and drops it) when the open pack already holds it."""
        full: _OpenPack | None = None
        with self._lock:
            pack = self._open.setdefault(blob_type, _OpenPack())
            if blob_id in pack.ids:
                return False
            pack.blobs.append(
                PackedBlob(blob_type, pack.size, len(sealed), uncompressed_length, blob_id)
            )
            pack.ids.add(blob_id)
            pack.parts.append(sealed)
            pack.size += len(sealed)
            header_full = (len(pack.blobs) + 1) * COMPRESSED_ENTRY + 32 >= MAX_HEADER
            if pack.size >= self.target_size or header_full:
                full = self._open.pop(blob_type)
        if full is not None:
            self._write(full)
        return True

    def pending(self, blob_type: int, blob_id: bytes) -> bool:
        with self._lock:
            pack = self._open.get(blob_type)
            return pack is not None and blob_id in pack.ids

    def flush(self) -> None:
        """Write every open pack, however small."""
        with self._lock:
            packs = list(self._open.values())
            self._open.clear()
        for pack in packs:
            if pack.blobs:
                self._write(pack)

    def _write(self, pack: _OpenPack) -> None:
        header = self.key.seal(encode_header(pack.blobs))
        pack.parts.append(header)
        pack.parts.append(struct.pack("<I", len(header)))
        data = b"".join(pack.parts)
        pack.parts.clear()
        pack_id = hashlib.sha256(data).digest()
        self.backend.write("data", pack_id.hex(), data)
        self.on_pack(pack_id, pack.blobs)
        with self._lock:
            self.packs_written += 1
            self.bytes_written += len(data)
