"""File reads for the mount: data blobs fetched by exact byte range, decrypted and hash-checked in worker
threads, kept in an LRU of plaintext, shared between concurrent readers, and fetched ahead.

A read of ``size`` bytes at ``offset`` touches one blob (or a few at blob borders). Each blob is read from
its pack as exactly its stored range, never the whole pack, and goes through ``Repository.decode_blob``
(MAC, zstd, SHA-256 against its ID). Two readers that want the same blob wait for one fetch.

Two kinds of read-ahead hide the latency of fetching and the cost of a thread hop per blob:

* sequential reads of a file fetch the next blobs, up to ``readahead`` bytes (and at least two blobs)
  past the read, one worker-thread call per blob so they decode in parallel;
* ``prefetch`` takes the blobs of many small files at once (the mount passes the files that follow an
  opened one in its folder, the order tar, cp and rsync read them) and fetches them in one worker-thread
  call, reading blobs that sit next to each other in a pack with one backend read.

A blob that cannot be read from any pack that holds it raises BlobUnreadable; the caller turns that into
EIO for this read only. The first failure per (file, pack) is logged with the file path and pack ID. The
failure is remembered for UNREADABLE_SECONDS: reads of the blob fail at once meanwhile, and read-ahead and
prefetch skip it, so a folder whose pack is lost fails file by file without fetching every following
file's blobs again for each one. After that the blob is tried again (a pack copied back is read).

Thread/task safety: the BlobReader lives in the trio thread; only the ``*_sync`` methods run in worker
threads, and they touch nothing but the (thread-safe) repository.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import trio
import zstandard
from cryptography.hazmat.primitives.ciphers import CipherContext

from vaultfs.crypto import NATIVE, OVERHEAD
from vaultfs.errors import FormatError, IntegrityError, VaultError
from vaultfs.format import unpacked
from vaultfs.format.pack import DATA, TYPE_NAMES
from vaultfs.repo.masterindex import BlobLocation, MasterIndex
from vaultfs.repo.repository import Repository

log = logging.getLogger("vaultfs.fuse")

MIB = 1024 * 1024
#: restic's largest chunk is 8 MiB. The cache always keeps the blob used last, however big, so it
#: needs room only for the read-ahead: the kernel keeps what was read in its page cache.
MIN_CACHE = 8 * MIB
#: Sequential reads keep at least this many blobs in flight ahead of the reader.
MIN_AHEAD_BLOBS = 2
#: Neighbouring blobs of one pack are read together up to this many bytes.
MAX_SPAN = 8 * MIB

#: Blobs from this stored size on are decoded in pieces of DECODE_PIECE (BlobReader._decode_sync).
STREAM_MIN = 256 * 1024
DECODE_PIECE = 128 * 1024

#: How long a blob that could not be read is answered from memory (EIO) before it is tried again.
UNREADABLE_SECONDS = 5.0

#: Called in the trio thread with the blobs a background fetch got: {blob id: plaintext}.
Fetched = Callable[[dict[bytes, bytes]], None]


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
    sequential read blobs are fetched in advance (at most half the cache); ``limiter`` sets how many
    threads decode (they are the reader's own: call ``close`` when done). ``nursery`` must be set
    before the first read: read-ahead tasks run in it.
    """

    def __init__(
        self,
        repo: Repository,
        limiter: trio.CapacityLimiter,
        cache_bytes: int,
        readahead: int = 4 * MIB,
    ) -> None:
        self.repo = repo
        self.limiter = limiter
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, int(limiter.total_tokens)), thread_name_prefix="vaultfs-read"
        )
        self.cache_bytes = max(cache_bytes, MIN_CACHE)
        self.readahead = min(readahead, self.cache_bytes // 2)
        self.nursery: trio.Nursery | None = None
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._cached = 0
        self._pending: dict[bytes, _Fetch] = {}
        # blob id -> (trio time until which it counts as unreadable, why); oldest first
        self._unreadable: OrderedDict[bytes, tuple[float, BlobUnreadable]] = OrderedDict()
        self._logged: set[tuple[str, bytes]] = set()
        self.fetched = 0  # blobs decoded (for tests and benchmarks)

    # -- reads -----------------------------------------------------------------------------------

    async def read(
        self,
        content: FileContent,
        offset: int,
        size: int,
        path: Callable[[], str],
        sequential: bool,
        ahead: Callable[[int, bytes], None] | None = None,
    ) -> bytes | memoryview:
        """Bytes ``[offset, offset+size)`` of the file (fewer at its end); raises BlobUnreadable.

        ``path()`` names the file in the message logged when a blob cannot be read. ``ahead(i, data)``
        is called when read-ahead got blob ``i`` of the file.
        """
        end = min(offset + size, content.readable)
        if offset >= end:
            if offset < content.readable or len(content.ends) == len(content.blobs):
                return b""
            missing = BlobUnreadable(
                content.blobs[len(content.ends)], [], "the blob is not in the index"
            )
            self._report(path, missing)
            raise missing
        ends = content.ends
        first = bisect_right(ends, offset)
        last = bisect_right(ends, end - 1)
        if sequential:
            # Before waiting for this read's own blob, so the next ones decode meanwhile.
            self._read_ahead(content, first, end, ahead)
            if first:
                # The reader has moved past the blob before: the kernel's page cache holds it, and
                # its memory serves the read-ahead better.
                self._drop(content.blobs[first - 1])
        if first == last:
            data = await self.blob(content.blobs[first], path)
            base = content.start(first)
            return memoryview(data)[offset - base : end - base]
        parts: list[bytes | None] = [None] * (last - first + 1)

        async def one(i: int) -> None:
            parts[i - first] = await self.blob(content.blobs[i], path)

        async with trio.open_nursery() as nursery:
            for i in range(first, last + 1):
                nursery.start_soon(one, i)
        pieces = []
        for i, part in zip(range(first, last + 1), parts, strict=True):
            assert part is not None
            base = content.start(i)
            pieces.append(memoryview(part)[max(offset, base) - base : min(end, ends[i]) - base])
        return b"".join(pieces)

    def peek(self, blob_id: bytes) -> bytes | None:
        """The blob if it is in the cache (without counting as a use)."""
        return self._cache.get(blob_id)

    def cached(self, blob_id: bytes) -> bool:
        """True if the blob is in the cache, being fetched, or failed a moment ago: not worth fetching."""
        return (
            blob_id in self._cache or blob_id in self._pending or self._failed(blob_id) is not None
        )

    async def blob(self, blob_id: bytes, path: Callable[[], str]) -> bytes:
        """The plaintext of one data blob: from the cache, from a fetch already running, or fetched."""
        data = self._cache.get(blob_id)
        if data is not None:
            self._cache.move_to_end(blob_id)
            return data
        try:
            failed = self._failed(blob_id)
            if failed is not None:
                # a new exception each time: one instance raised again and again grows its traceback
                raise BlobUnreadable(failed.blob_id, failed.packs, failed.reason)
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

    def _read_ahead(
        self,
        content: FileContent,
        current: int,
        end: int,
        ahead: Callable[[int, bytes], None] | None,
    ) -> None:
        """Start fetches for the blobs after ``current`` up to ``readahead`` bytes past ``end``."""
        if self.nursery is None:
            return
        ends = content.ends
        until = end + self.readahead
        budget = self.cache_bytes // 2
        i = current + 1
        while i < len(ends) and (content.start(i) < until or i <= current + MIN_AHEAD_BLOBS):
            budget -= ends[i] - content.start(i)
            if budget < 0:
                break
            blob_id = content.blobs[i]
            if not self.cached(blob_id):
                then = None
                if ahead is not None:
                    then = functools.partial(_call_with_blob, ahead, i, blob_id)
                self._start([blob_id], then)
            i += 1

    def prefetch(self, blob_ids: list[bytes], then: Fetched | None = None) -> None:
        """Fetch these blobs in the background, in one worker-thread call (for many small files);
        ``then`` gets the blobs this fetch got."""
        wanted = [b for b in dict.fromkeys(blob_ids) if not self.cached(b)]
        if wanted and self.nursery is not None:
            self._start(wanted, then)

    def _start(self, blob_ids: list[bytes], then: Fetched | None = None) -> None:
        """Register the fetches now (so nobody starts them twice) and run them in the nursery."""
        assert self.nursery is not None
        fetches = {blob_id: _Fetch() for blob_id in blob_ids}
        self._pending.update(fetches)
        self.nursery.start_soon(self._run, fetches, then)

    async def _fetch(self, blob_id: bytes) -> bytes:
        fetch = _Fetch()
        await self._run({blob_id: fetch})
        if fetch.error is not None:
            raise fetch.error
        assert fetch.data is not None
        return fetch.data

    async def _run(self, fetches: dict[bytes, _Fetch], then: Fetched | None = None) -> None:
        self._pending.update(fetches)
        got: dict[bytes, bytes] = {}
        try:
            results = await self._load_many(list(fetches))
            for blob_id, fetch in fetches.items():
                result = results[blob_id]
                if isinstance(result, BlobUnreadable):
                    fetch.error = result
                    self._remember_failure(blob_id, result)
                else:
                    fetch.data = result
                    self._unreadable.pop(blob_id, None)
                    self.fetched += 1
                    self._store(blob_id, result)
                    got[blob_id] = result
        finally:
            for blob_id, fetch in fetches.items():
                if self._pending.get(blob_id) is fetch:
                    del self._pending[blob_id]
                fetch.done.set()
        if then is not None and got:
            then(got)

    async def _load_many(self, blob_ids: list[bytes]) -> dict[bytes, bytes | BlobUnreadable]:
        """``_load_many_sync`` in one of the reader's own threads.

        They take the next fetch as soon as one is done. With trio's threads and a CapacityLimiter,
        the trio thread handed a freed slot to the next fetch only when it next ran, and while it was
        answering requests a decoding thread stood idle after each blob: dd of a large file spent
        about 40% of its time with one blob or none being decoded.
        """
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def wake(_: object) -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass  # the mount is shutting down; nobody waits any more

        future = self._pool.submit(self._load_many_sync, blob_ids)
        future.add_done_callback(wake)
        await done.wait()
        return future.result()

    def close(self) -> None:
        """Wait for the fetches in flight and end the reader's threads (after the trio run)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- worker threads --------------------------------------------------------------------------

    def _load_many_sync(self, blob_ids: list[bytes]) -> dict[bytes, bytes | BlobUnreadable]:
        """Runs in a worker thread: every blob's plaintext, or why it cannot be read.

        Blobs that sit next to each other in one pack are read with one backend read; a blob whose first
        copy fails is tried again from its other copies, one by one.
        """
        out: dict[bytes, bytes | BlobUnreadable] = {}
        first: list[BlobLocation] = []
        for blob_id in blob_ids:
            loc = self.repo.index.lookup(blob_id, DATA)
            if loc is None:
                out[blob_id] = BlobUnreadable(blob_id, [], "the blob is not in the index")
            else:
                first.append(loc)
        for run in _runs(first):
            start = run[0].offset
            try:
                raw = self.repo.backend.read(
                    "data", run[0].pack_id.hex(), start, run[-1].offset + run[-1].length - start
                )
            except VaultError:
                raw = None
            if raw is not None and len(run) == 1 and NATIVE and len(raw) >= STREAM_MIN:
                loc, box = run[0], [raw]
                del raw  # the box holds the only reference: freed once decrypted
                try:
                    out[loc.blob_id] = self._decode_owned_sync(loc, box)
                except VaultError:
                    out[loc.blob_id] = self._load_one_sync(loc.blob_id)
                continue
            view = memoryview(raw) if raw is not None else None
            for loc in run:
                if view is not None:
                    try:
                        rel = loc.offset - start
                        out[loc.blob_id] = self._decode_sync(loc, view[rel : rel + loc.length])
                        continue
                    except VaultError:
                        pass
                out[loc.blob_id] = self._load_one_sync(loc.blob_id)
        return out

    def _load_one_sync(self, blob_id: bytes) -> bytes | BlobUnreadable:
        """Every known copy of the blob in turn until one decodes."""
        problems = []
        for loc in self.repo.index.lookup_all(blob_id, DATA):
            try:
                sealed = self.repo.backend.read("data", loc.pack_id.hex(), loc.offset, loc.length)
                return self._decode_sync(loc, sealed)
            except VaultError as exc:
                problems.append((loc.pack_id, str(exc)))
        if not problems:
            return BlobUnreadable(blob_id, [], "the blob is not in the index")
        return BlobUnreadable(
            blob_id, [pack for pack, _ in problems], "; ".join(text for _, text in problems)
        )

    def _decode_sync(self, loc: BlobLocation, sealed: bytes | memoryview) -> bytes:
        """Repository.decode_blob (tag, decryption, zstd, SHA-256), by the cheapest way for its size.

        Small blobs (the files of tar, cp -r) go through the C part in two GIL-free calls: most of
        the cost of a small blob is Python, and the worker holding the GIL delays the trio thread,
        which answers every request. Large blobs are decrypted in pieces straight into zstd, so that
        besides the stored bytes only the kept plaintext is whole-size: each whole-size buffer of
        the worker threads counts in the mount's peak memory, and every fresh page costs a fault.
        (A large blob read on its own, the usual case, goes through ``_decode_owned_sync`` instead.)
        """
        if len(sealed) < STREAM_MIN:
            if NATIVE:
                return self._decode_small_sync(loc, sealed)
            return self.repo.decode_blob(loc, sealed)
        return self._decode_large_sync(loc, sealed)

    def _decode_small_sync(self, loc: BlobLocation, sealed: bytes | memoryview) -> bytes:
        what = f"{TYPE_NAMES[loc.blob_type]} blob {loc.blob_id.hex()} in pack {loc.pack_id.hex()}"
        opened = _scratch(len(sealed) - OVERHEAD)
        try:
            self.repo.key.open_into(opened, sealed, what)
            if loc.uncompressed_length:
                plain = unpacked.decompress(opened, loc.uncompressed_length, what)
            else:
                plain = bytes(opened)
        finally:
            opened.release()
        if hashlib.sha256(plain).digest() != loc.blob_id:
            raise IntegrityError(f"{what} is corrupt (content does not match its ID)")
        return plain

    def _decode_large_sync(self, loc: BlobLocation, sealed: bytes | memoryview) -> bytes:
        what = f"{TYPE_NAMES[loc.blob_type]} blob {loc.blob_id.hex()} in pack {loc.pack_id.hex()}"
        body, decryptor = self.repo.key.open_parts(sealed, what)
        if loc.uncompressed_length:
            plain = bytearray(loc.uncompressed_length)
            _decompress_into(plain, _Decrypting(body, decryptor), what)
        else:
            plain = bytearray(len(body) + 15)  # update_into wants room for one more block
            decryptor.update_into(body, plain)
            del plain[len(body) :]
        if hashlib.sha256(plain).digest() != loc.blob_id:
            raise IntegrityError(f"{what} is corrupt (content does not match its ID)")
        return plain  # type: ignore[return-value]  # never changed after this: used as bytes

    def _decode_owned_sync(self, loc: BlobLocation, box: list[bytes]) -> bytes:
        """A large blob whose stored bytes ``box`` holds (and nothing else): decrypted whole in one
        GIL-free C call, the stored bytes freed, then decompressed in one GIL-free call.

        At most two blob-sized buffers are alive at a time (stored + decrypted, then decrypted +
        plaintext), where decoding in pieces kept three (stored, plaintext and zstd's window, which
        each thread's decompressor also kept between blobs); and cryptography's tag check and
        AES-CTR, which hold the GIL, no longer stop the other decoding thread and the trio thread.
        """
        what = f"{TYPE_NAMES[loc.blob_type]} blob {loc.blob_id.hex()} in pack {loc.pack_id.hex()}"
        sealed = box.pop()
        if len(sealed) < OVERHEAD:
            raise FormatError(f"{what} is too short to be encrypted data ({len(sealed)} bytes)")
        opened = bytearray(len(sealed) - OVERHEAD)
        self.repo.key.open_into(opened, sealed, what)
        del sealed
        plain: bytes | bytearray = opened
        if loc.uncompressed_length:
            plain = unpacked.decompress(opened, loc.uncompressed_length, what)
            del opened
        if hashlib.sha256(plain).digest() != loc.blob_id:
            raise IntegrityError(f"{what} is corrupt (content does not match its ID)")
        return plain  # type: ignore[return-value]  # never changed after this: used as bytes

    # -- cache -----------------------------------------------------------------------------------

    def _store(self, blob_id: bytes, data: bytes) -> None:
        if blob_id in self._cache:
            return
        self._cache[blob_id] = data
        self._cached += len(data)
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= len(old)

    def _remember_failure(self, blob_id: bytes, exc: BlobUnreadable) -> None:
        now = trio.current_time()
        self._unreadable.pop(blob_id, None)
        self._unreadable[blob_id] = (now + UNREADABLE_SECONDS, exc)
        while True:  # forget the expired ones, oldest first
            until, _ = next(iter(self._unreadable.values()))
            if until > now:
                break
            self._unreadable.popitem(last=False)

    def _failed(self, blob_id: bytes) -> BlobUnreadable | None:
        """Why the blob could not be read, if that was less than UNREADABLE_SECONDS ago."""
        entry = self._unreadable.get(blob_id)
        if entry is None:
            return None
        if entry[0] > trio.current_time():
            return entry[1]
        del self._unreadable[blob_id]
        return None

    def _drop(self, blob_id: bytes) -> None:
        data = self._cache.pop(blob_id, None)
        if data is not None:
            self._cached -= len(data)

    def _report(self, file: Callable[[], str], exc: BlobUnreadable) -> None:
        path = file()
        packs = exc.packs or [b""]
        fresh = [p for p in packs if (path, p) not in self._logged]
        if not fresh:
            return
        self._logged.update((path, p) for p in fresh)
        where = ", ".join(p.hex() for p in fresh if p) or "none (the index does not list it)"
        log.error(
            "%s: cannot read data blob %s from pack %s: %s; reads of this part of the file fail "
            "with EIO",
            path,
            exc.blob_id.hex(),
            where,
            exc.reason,
        )


class _Decrypting:
    """The plaintext of an authenticated ciphertext as a stream that zstd reads from."""

    def __init__(self, body: memoryview, decryptor: CipherContext) -> None:
        self.body = body
        self.decryptor = decryptor
        self.pos = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self.body) if size < 0 else self.pos + size
        piece = self.body[self.pos : end]
        self.pos += len(piece)
        return self.decryptor.update(piece)


def _decompress_into(out: bytearray, source: _Decrypting, what: str) -> None:
    """Decompress one zstd frame from ``source`` into ``out``, which it must fill exactly
    (FormatError otherwise, as unpacked.decompress)."""
    view = memoryview(out)
    got = 0
    try:
        with unpacked.decompressor().stream_reader(
            source, read_size=DECODE_PIECE, read_across_frames=False
        ) as reader:
            while got < len(view):
                n = reader.readinto(view[got:])
                if not n:
                    break
                got += n
            extra = reader.read(1) if got == len(view) else b""
    except zstandard.ZstdError as exc:
        raise FormatError(f"{what} does not decompress ({exc})") from None
    finally:
        view.release()
    if got != len(out) or extra:
        raise FormatError(
            f"{what} decompressed to {'more than ' if extra else ''}{got} bytes, "
            f"expected {len(out)}"
        )


_local = threading.local()


def _scratch(size: int) -> memoryview:
    """This worker thread's buffer for one small blob's decrypted bytes (``size`` < STREAM_MIN)."""
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = bytearray(STREAM_MIN)
    return memoryview(buf)[: max(size, 0)]


def _call_with_blob(
    fn: Callable[[int, bytes], None], index: int, blob_id: bytes, got: dict[bytes, bytes]
) -> None:
    data = got.get(blob_id)
    if data is not None:
        fn(index, data)


def _runs(locations: list[BlobLocation]) -> list[list[BlobLocation]]:
    """Group locations into runs that are back to back in one pack, each at most MAX_SPAN long."""
    runs: list[list[BlobLocation]] = []
    for loc in sorted(locations, key=lambda x: (x.pack_id, x.offset)):
        if runs:
            last = runs[-1][-1]
            if (
                loc.pack_id == last.pack_id
                and loc.offset == last.offset + last.length
                and loc.offset + loc.length - runs[-1][0].offset <= MAX_SPAN
            ):
                runs[-1].append(loc)
                continue
        runs.append([loc])
    return runs
