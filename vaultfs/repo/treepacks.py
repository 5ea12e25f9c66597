"""Tree blobs of a remote vault, fetched a whole pack at a time and kept in the local cache.

Over a backend where every read is a round trip (REST), reading each tree blob on its own costs a request
per folder: a walk of a snapshot of 20,000 files in 1,056 folders made 1,064 requests for `vault ls`.
Trees are packed together (the 1,056 trees of that snapshot fill one pack of 1.5 MB), so the first tree
wanted from a pack brings the whole pack, and the next ones come from memory; the pack also goes to the
local cache (vaultfs/repo/cache.py), so later runs read it from disk. restic keeps its tree packs in
its cache the same way. Cached packs that the vault no longer has (pruned) are deleted on first use.

Nothing here is trusted more than the vault: each blob taken from a pack is still checked by
``Repository.decode_blob`` (MAC and SHA-256 against its ID), a downloaded pack is kept only if it hashes to
its name, and a cached one is checked the same way when loaded. Whenever a pack cannot be had whole
(``read`` returns None), the caller reads the blob itself, as it would without this class, and so gets
the same errors and tries the same other copies.

Thread-safe: one lock for the packs held, one per pack being fetched (two threads that want trees of
the same pack fetch it once).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from vaultfs.errors import VaultError

if TYPE_CHECKING:
    from vaultfs.backend import Backend
    from vaultfs.repo.cache import VaultCache
    from vaultfs.repo.masterindex import BlobLocation

#: Packs held in memory, by their size in bytes; the newest is kept whatever its size.
KEEP_BYTES = 64 * 1024 * 1024


class TreePacks:
    """``known_packs()`` gives the packs of the loaded index: before the cache is first used, the
    cached copies of every other pack (pruned since) are deleted."""

    def __init__(
        self,
        backend: Backend,
        cache: VaultCache | None,
        known_packs: Callable[[], Iterable[bytes]],
        keep_bytes: int = KEEP_BYTES,
    ) -> None:
        self.backend = backend
        self.cache = cache
        self.known_packs = known_packs
        self._swept = cache is None
        self.keep_bytes = keep_bytes
        self._packs: OrderedDict[bytes, bytes] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()
        self._fetching: dict[bytes, threading.Lock] = {}
        self._unusable: set[bytes] = set()  # packs that could not be had whole: read blob by blob

    def read(self, loc: BlobLocation) -> memoryview | None:
        """The sealed bytes of the blob at ``loc``, or None: then read it from the vault directly."""
        pack_id = loc.pack_id
        with self._lock:
            whole = self._take(pack_id)
            if whole is None:
                if pack_id in self._unusable:
                    return None
                fetching = self._fetching.setdefault(pack_id, threading.Lock())
        if whole is None:
            with fetching:  # a second thread waits here for the first one's fetch
                with self._lock:
                    whole = self._take(pack_id)
                    if whole is None and pack_id in self._unusable:
                        return None  # the thread before us could not fetch it either
                if whole is None:
                    whole = self._fetch(pack_id)
                with self._lock:
                    self._fetching.pop(pack_id, None)
                    if whole is None:
                        self._unusable.add(pack_id)
                        return None
                    self._hold(pack_id, whole)
        end = loc.offset + loc.length
        if end > len(whole):
            return None
        return memoryview(whole)[loc.offset : end]

    def drop(self, pack_id: bytes) -> None:
        """A blob taken from this pack did not decode: forget the pack (and its cached copy)."""
        with self._lock:
            whole = self._packs.pop(pack_id, None)
            if whole is not None:
                self._held -= len(whole)
            self._unusable.add(pack_id)
        if self.cache is not None:
            self.cache.drop_pack(pack_id.hex())

    def _take(self, pack_id: bytes) -> bytes | None:
        whole = self._packs.get(pack_id)
        if whole is not None:
            self._packs.move_to_end(pack_id)
        return whole

    def _hold(self, pack_id: bytes, whole: bytes) -> None:
        self._packs[pack_id] = whole
        self._held += len(whole)
        while self._held > self.keep_bytes and len(self._packs) > 1:
            _, old = self._packs.popitem(last=False)
            self._held -= len(old)

    def _fetch(self, pack_id: bytes) -> bytes | None:
        name = pack_id.hex()
        with self._lock:
            sweep, self._swept = not self._swept, True
        if sweep and self.cache is not None:
            self.cache.forget_except(p.hex() for p in self.known_packs())
        if self.cache is not None:
            whole = self.cache.load_pack(name)
            if whole is not None:
                return whole
        try:
            whole = self.backend.read("data", name)
        except VaultError:
            return None  # the blob's own read meets the problem again and reports it
        if hashlib.sha256(whole).digest() != pack_id:
            return None  # damaged: its intact blobs still read one by one
        if self.cache is not None:
            self.cache.save_pack(name, whole, checked=True)
        return whole
