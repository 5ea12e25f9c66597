"""File reads for the mount: data blobs fetched by exact byte range, decrypted and hash-checked in worker
threads, kept in an LRU of plaintext, shared between concurrent readers, and fetched ahead on sequential
reads.

A read of ``size`` bytes at ``offset`` touches one blob (or a few at blob borders). Each blob is read from
its pack as exactly its stored range (``backend.read(data, pack, offset, length)``), never the whole pack,
and goes through ``Repository.decode_blob`` (MAC, zstd, SHA-256 against its ID). Two readers that want the
same blob wait for one fetch. When reads of a file move forward, the next blobs up to ``readahead`` bytes
ahead are fetched in parallel in the background, so decryption of the next megabytes overlaps with the
kernel copying out the current ones.

A blob that cannot be read from any pack that holds it raises BlobUnreadable; the caller turns that into
EIO for this read only. The first failure per (file, pack) is logged with the file path and pack ID.

Thread/task safety: the BlobReader lives in the trio thread; only ``_load_sync`` runs in worker threads,
and it touches nothing but the (thread-safe) repository.
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass, field

import trio

from vaultfs.errors import VaultError
from vaultfs.format.pack import DATA
from vaultfs.repo.masterindex import MasterIndex
from vaultfs.repo.repository import Repository

log = logging.getLogger("vaultfs.fuse")

MIB = 1024 * 1024
#: restic's largest chunk is 8 MiB; the cache must hold a blob being read plus the read-ahead.
MIN_CACHE = 16 * MIB


class BlobUnreadable(Exception):
    """No stored copy of a data blob could be read. ``packs`` are the packs that were tried."""

    def __init__(self, blob_id: bytes, packs: list[bytes], reason: str) -> None:
        super().__init__(reason)
        self.blob_id = blob_id
        self.packs = packs
        self.reason = reason


@dataclass(slots=True)
class FileContent:
    """Where each blob of a file starts: ``ends[i]`` is the file offset just past blob ``i``.

    ``ends`` is shorter than ``blobs`` when the index does not know a blob's size: the file can then be
    read only up to ``ends[-1]``.
    """

    blobs: list[bytes]
    ends: list[int] = field(default_factory=list)

    @property
    def readable(self) -> int:
        """Bytes that can be located (all of them unless a blob is missing from the index)."""
        return self.ends[-1] if self.ends else 0

    def start(self, i: int) -> int:
        return self.ends[i - 1] if i else 0


def file_content_sync(index: MasterIndex, blob_ids: list[bytes]) -> FileContent:
    """Blob offsets of one file from the index (one index lookup per blob; run it in a thread for big
    files)."""
    content = FileContent(blob_ids)
    pos = 0
    for blob_id in blob_ids:
        size = index.size_of(blob_id, DATA)
        if size is None:
            break
        pos += size
        content.ends.append(pos)
    return content


class _Fetch:
    """One blob being fetched; later readers of the same blob wait on ``done``."""

    __slots__ = ("done", "data", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: BlobUnreadable | None = None


class BlobReader:
    """Reads byte ranges of files (given as FileContent) through an LRU of decrypted data blobs.

    ``cache_bytes`` bounds the plaintext kept (at least MIN_CACHE); ``readahead`` is how far past a
    sequential read blobs are fetched in advance (at most half the cache); ``limiter`` bounds the worker
    threads. ``nursery`` must be set before the first read: read-ahead tasks run in it.
    """

    def __init__(
        self,
        repo: Repository,
        limiter: trio.CapacityLimiter,
        cache_bytes: int,
        readahead: int = 8 * MIB,
    ) -> None:
        self.repo = repo
        self.limiter = limiter
        self.cache_bytes = max(cache_bytes, MIN_CACHE)
        self.readahead = min(readahead, self.cache_bytes // 2)
        self.nursery: trio.Nursery | None = None
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._cached = 0
        self._pending: dict[bytes, _Fetch] = {}
        self._logged: set[tuple[str, bytes]] = set()
        self.fetched = 0  # blobs decoded (for tests and benchmarks)

    # -- reads -----------------------------------------------------------------------------------

    async def read(
        self, content: FileContent, offset: int, size: int, path: str, sequential: bool
    ) -> bytes | memoryview:
        """Bytes ``[offset, offset+size)`` of the file (fewer at its end); raises BlobUnreadable."""
        end = min(offset + size, content.readable)
        if offset >= end:
            if offset < content.readable or len(content.ends) == len(content.blobs):
                return b""
            missing = content.blobs[len(content.ends)]
            self._report(path, BlobUnreadable(missing, [], "the blob is not in the index"))
            raise BlobUnreadable(missing, [], "the blob is not in the index")
        ends = content.ends
        first = bisect_right(ends, offset)
        last = bisect_right(ends, end - 1)
        if first == last:
            data = await self.blob(content.blobs[first], path)
            base = content.start(first)
            result: bytes | memoryview = memoryview(data)[offset - base : end - base]
        else:
            parts: list[bytes | None] = [None] * (last - first + 1)

            async def one(i: int) -> None:
                parts[i - first] = await self.blob(content.blobs[i], path)

            async with trio.open_nursery() as nursery:
                for i in range(first, last + 1):
                    nursery.start_soon(one, i)
            pieces = []
            for i, data in zip(range(first, last + 1), parts, strict=True):
                assert data is not None
                base = content.start(i)
                pieces.append(memoryview(data)[max(offset, base) - base : min(end, ends[i]) - base])
            result = b"".join(pieces)
        if sequential:
            self._read_ahead(content, last + 1, end + self.readahead)
        return result

    async def blob(self, blob_id: bytes, path: str) -> bytes:
        """The plaintext of one data blob: from the cache, from a fetch already running, or fetched."""
        data = self._cache.get(blob_id)
        if data is not None:
            self._cache.move_to_end(blob_id)
            return data
        try:
            pending = self._pending.get(blob_id)
            if pending is None:
                return await self._fetch(blob_id)
            await pending.done.wait()
            if pending.data is not None:
                return pending.data
            if pending.error is not None:
                raise pending.error
            return await self._fetch(blob_id)  # the other fetch was cancelled: try ourselves
        except BlobUnreadable as exc:
            self._report(path, exc)
            raise

    def _read_ahead(self, content: FileContent, first: int, until: int) -> None:
        if self.nursery is None:
            return
        ends = content.ends
        i = first
        while i < len(ends) and content.start(i) < until:
            blob_id = content.blobs[i]
            if blob_id not in self._cache and blob_id not in self._pending:
                self.nursery.start_soon(self._prefetch, blob_id)
            i += 1

    async def _prefetch(self, blob_id: bytes) -> None:
        if blob_id in self._cache or blob_id in self._pending:
            return
        try:
            await self._fetch(blob_id)
        except BlobUnreadable:
            pass  # reported by the read that needs the blob, with its file's path

    async def _fetch(self, blob_id: bytes) -> bytes:
        fetch = _Fetch()
        self._pending[blob_id] = fetch
        try:
            data = await trio.to_thread.run_sync(self._load_sync, blob_id, limiter=self.limiter)
            fetch.data = data
            self.fetched += 1
            self._store(blob_id, data)
            return data
        except BlobUnreadable as exc:
            fetch.error = exc
            raise
        finally:
            del self._pending[blob_id]
            fetch.done.set()

    def _load_sync(self, blob_id: bytes) -> bytes:
        """Runs in a worker thread: every known copy of the blob in turn until one decodes."""
        locations = self.repo.index.lookup_all(blob_id, DATA)
        if not locations:
            raise BlobUnreadable(blob_id, [], "the blob is not in the index")
        problems = []
        for loc in locations:
            try:
                sealed = self.repo.backend.read("data", loc.pack_id.hex(), loc.offset, loc.length)
                data = self.repo.decode_blob(loc, sealed)
            except VaultError as exc:
                problems.append((loc.pack_id, str(exc)))
                continue
            return data
        raise BlobUnreadable(
            blob_id, [pack for pack, _ in problems], "; ".join(text for _, text in problems)
        )

    # -- cache -----------------------------------------------------------------------------------

    def _store(self, blob_id: bytes, data: bytes) -> None:
        if blob_id in self._cache:
            return
        self._cache[blob_id] = data
        self._cached += len(data)
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= len(old)

    def _report(self, path: str, exc: BlobUnreadable) -> None:
        packs = exc.packs or [b""]
        fresh = [p for p in packs if (path, p) not in self._logged]
        if not fresh:
            return
        self._logged.update((path, p) for p in fresh)
        where = ", ".join(p.hex() for p in fresh if p) or "no pack (the index does not list it)"
        log.error(
            "%s: cannot read data blob %s from pack %s: %s; reads of this part of the file fail "
            "with EIO",
            path,
            exc.blob_id.hex(),
            where,
            exc.reason,
        )
