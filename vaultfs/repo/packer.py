"""Pack writer: collects sealed blobs into packs of about 16 MiB, data and trees apart (FORMAT.md §4.2).

Each open pack is one reusable buffer (an anonymous mapping: only the pages a pack reaches become
resident, and a buffer keeps them from pack to pack instead of allocating, and faulting in, a new 16 MiB
per pack). A blob goes in two steps so its bytes are written only once, in place: ``reserve`` gives a
region of the exact stored length at the end of the open pack (under a lock, so blobs of several threads
interleave), the caller seals into it with no lock held (``MasterKey.seal_into``), then ``commit``.
``add`` does both for a blob sealed elsewhere. A pack is finished once it reaches the target size and
every reserved region in it is committed: its header is sealed and appended, and the buffer is stored
under the SHA-256 of its bytes, by the thread that committed last, or by ``writers`` background threads
after ``start_writers`` (a backup's producers then go on while packs are written and fsynced).

``on_pack`` is called after each pack is safely in the backend, with the pack id and its header entries,
so the caller can index it: packs are always written before the index that names them. Thread-safe.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
import threading
from collections import deque
from collections.abc import Callable

from vaultfs.backend import Backend
from vaultfs.crypto import OVERHEAD, MasterKey
from vaultfs.format.pack import COMPRESSED_ENTRY, MAX_HEADER, PackedBlob, encode_header

DEFAULT_PACK_SIZE = 16 * 1024 * 1024
#: Room past the target size in a pooled buffer: the largest data blob (8 MiB chunk, zstd's worst case
#: and the seal) and a large header still fit; a bigger blob gets a buffer of its own.
_SLACK = 9 * 1024 * 1024

OnPack = Callable[[bytes, list[PackedBlob]], None]

#: ``PackWriter._reserve``'s answer when it would have to wait for a buffer.
_WOULD_WAIT = object()


def _header_room(entries: int) -> int:
    """Bytes the sealed header and its length take for this many entries (at most)."""
    return entries * COMPRESSED_ENTRY + OVERHEAD + 4


class _OpenPack:
    __slots__ = ("buf", "pooled", "size", "blobs", "ids", "unfilled", "closed", "poisoned")

    def __init__(self, buf: mmap.mmap | bytearray, pooled: bool) -> None:
        self.buf = buf
        self.pooled = pooled
        self.size = 0
        self.blobs: list[PackedBlob] = []
        self.ids: set[bytes] = set()
        self.unfilled = 0  # reserved regions not committed yet
        self.closed = False  # takes no more blobs
        self.poisoned = False  # a region was never filled: the pack must not be written


class BlobSlot:
    """A reserved region of a pack: fill ``view`` (exactly the stored length), then ``commit`` it."""

    __slots__ = ("pack", "view")

    def __init__(self, pack: _OpenPack, view: memoryview) -> None:
        self.pack = pack
        self.view = view


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
        self.capacity = target_size + _SLACK
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._open: dict[int, _OpenPack] = {}
        self._free: list[mmap.mmap] = []
        self._buffers = 0  # pooled buffers in existence
        self._max_buffers: int | None = None  # None: no limit (no background writers)
        self._queue: deque[_OpenPack] = deque()
        self._writing = 0
        self._threads: list[threading.Thread] = []
        self._before_write: Callable[[], None] | None = None
        self._after_write: Callable[[], None] | None = None
        self._error: BaseException | None = None
        self.packs_written = 0
        self.bytes_written = 0

    # -- adding blobs ---------------------------------------------------------------------------

    def add(self, blob_type: int, blob_id: bytes, sealed: bytes, uncompressed_length: int) -> bool:
        """Queue a sealed blob. Returns False (and drops it) when the open pack already holds it."""
        slot = self.reserve(blob_type, blob_id, len(sealed), uncompressed_length)
        if slot is None:
            return False
        slot.view[:] = sealed
        self.commit(slot)
        return True

    def reserve(
        self, blob_type: int, blob_id: bytes, length: int, uncompressed_length: int
    ) -> BlobSlot | None:
        """A region of ``length`` bytes for a sealed blob, or None when the open pack already holds
        ``blob_id``. Every slot must be passed to ``commit`` (or ``abort``); may wait for a free
        buffer while background writers are busy. Raises what a background write raised."""
        with self._lock:
            slot = self._reserve(blob_type, blob_id, length, uncompressed_length, wait=True)
            background = bool(self._threads)
        if not background:
            self._write_closed()  # a pack closed above because this blob did not fit
        assert slot is not _WOULD_WAIT
        return slot  # type: ignore[return-value]

    def reserve_many(
        self, blob_type: int, blobs: list[tuple[bytes, int, int]]
    ) -> list[BlobSlot | None]:
        """``reserve`` for each (blob_id, length, uncompressed_length) of ``blobs`` under one lock, in
        order, as far as it goes without waiting for a buffer: the slots of the first so many blobs
        (None for one the open pack holds). Waiting while holding slots could deadlock (their packs
        are written only once they are committed), so the caller seals and commits these, then asks
        again for the rest; with no slot taken yet it waits as ``reserve`` does."""
        slots: list[BlobSlot | None] = []
        with self._lock:
            for blob_id, length, uncompressed_length in blobs:
                slot = self._reserve(
                    blob_type, blob_id, length, uncompressed_length, wait=not slots
                )
                if slot is _WOULD_WAIT:
                    break
                slots.append(slot)  # type: ignore[arg-type]
            background = bool(self._threads)
        if not background:
            self._write_closed()
        return slots

    def _reserve(
        self, blob_type: int, blob_id: bytes, length: int, uncompressed_length: int, wait: bool
    ) -> BlobSlot | None | object:
        """``reserve`` with the lock held; _WOULD_WAIT instead of waiting for a buffer unless ``wait``."""
        while True:
            if self._error is not None:
                raise self._error
            pack = self._open.get(blob_type)
            if pack is not None:
                if blob_id in pack.ids:
                    return None
                if pack.size + length + _header_room(len(pack.blobs) + 1) <= len(pack.buf):
                    break
                if not wait and self._must_wait(length + _header_room(1)):
                    return _WOULD_WAIT
                self._close(blob_type, pack)  # this blob does not fit: a new pack
                continue
            if not wait and self._must_wait(length + _header_room(1)):
                return _WOULD_WAIT
            # Waiting for a buffer lets go of the lock: another thread may have opened a pack
            # of this type meanwhile, which then takes the blob instead.
            pack = self._new_pack(length + _header_room(1))
            if blob_type not in self._open:
                self._open[blob_type] = pack
                break
            self._give_back(pack, locked=True)
        offset = pack.size
        pack.size += length
        pack.blobs.append(PackedBlob(blob_type, offset, length, uncompressed_length, blob_id))
        pack.ids.add(blob_id)
        pack.unfilled += 1
        header_full = _header_room(len(pack.blobs) + 1) >= MAX_HEADER
        if pack.size >= self.target_size or header_full:
            self._close(blob_type, pack)
        return BlobSlot(pack, memoryview(pack.buf)[offset : offset + length])

    def commit(self, slot: BlobSlot) -> None:
        """The slot's region is filled: the pack is written once it is closed and complete."""
        self._settle(slot, poison=False)

    def abort(self, slot: BlobSlot) -> None:
        """The slot's region could not be filled. Its pack is dropped instead of written (its blobs
        are never indexed, so a later backup stores them again); for a failing job only."""
        self._settle(slot, poison=True)

    def _settle(self, slot: BlobSlot, poison: bool) -> None:
        slot.view.release()
        pack = slot.pack
        with self._lock:
            pack.poisoned = pack.poisoned or poison
            pack.unfilled -= 1
            ready = pack.closed and not pack.unfilled
            if ready and self._threads:
                self._queue.append(pack)
                self._changed.notify_all()
                return
        if ready:
            self._finish(pack)

    def pending(self, blob_type: int, blob_id: bytes) -> bool:
        with self._lock:
            pack = self._open.get(blob_type)
            return pack is not None and blob_id in pack.ids

    # -- buffers (lock held) --------------------------------------------------------------------

    def _must_wait(self, need: int) -> bool:
        """Whether ``_new_pack(need)`` would wait for a buffer."""
        return (
            need <= self.capacity
            and not self._free
            and self._max_buffers is not None
            and self._buffers >= self._max_buffers
        )

    def _new_pack(self, need: int) -> _OpenPack:
        if need > self.capacity:
            return _OpenPack(bytearray(need), pooled=False)
        while not self._free and self._max_buffers is not None:
            if self._buffers < self._max_buffers:
                break
            self._changed.wait()
            if self._error is not None:
                raise self._error
        if self._free:
            return _OpenPack(self._free.pop(), pooled=True)
        self._buffers += 1
        return _OpenPack(mmap.mmap(-1, self.capacity), pooled=True)

    def _close(self, blob_type: int, pack: _OpenPack) -> None:
        pack.closed = True
        if self._open.get(blob_type) is pack:
            del self._open[blob_type]
        if not pack.unfilled:
            # complete already: a writer thread takes it, or (none running) the caller once it has
            # let go of the lock
            self._queue.append(pack)
            self._changed.notify_all()

    def _give_back(self, pack: _OpenPack, locked: bool = False) -> None:
        if not locked:
            with self._lock:
                self._give_back(pack, locked=True)
            return
        if pack.pooled:
            assert isinstance(pack.buf, mmap.mmap)
            self._free.append(pack.buf)
        self._changed.notify_all()

    # -- writing --------------------------------------------------------------------------------

    def _finish(self, pack: _OpenPack) -> None:
        """Seal the header after the blobs and store the pack; gives its buffer back."""
        try:
            if pack.poisoned or not pack.blobs:
                return
            header = self.key.seal(encode_header(pack.blobs))
            end = pack.size + len(header)
            buf = pack.buf
            buf[pack.size : end] = header
            buf[end : end + 4] = struct.pack("<I", len(header))
            with memoryview(buf)[: end + 4] as data:
                pack_id = hashlib.sha256(data).digest()
                self.backend.write("data", pack_id.hex(), data)
            self.on_pack(pack_id, pack.blobs)
            with self._lock:
                self.packs_written += 1
                self.bytes_written += end + 4
        finally:
            self._give_back(pack)

    def _write_closed(self) -> None:
        """Write the packs closed while a reserve held the lock (no background writers)."""
        while True:
            with self._lock:
                if not self._queue:
                    return
                pack = self._queue.popleft()
            self._finish(pack)

    def flush(self) -> None:
        """Write every open pack, however small, and wait until every closed one is written. Raises
        what a background write raised. Frees the pooled buffers when nothing is in flight."""
        with self._lock:
            for blob_type, pack in list(self._open.items()):
                self._close(blob_type, pack)
            if self._threads:
                while (self._queue or self._writing) and self._error is None:
                    self._changed.wait()
                if self._error is not None:
                    raise self._error
        self._write_closed()
        with self._lock:
            if not self._open and not self._writing and not self._queue:
                for buf in self._free:
                    try:
                        buf.close()
                    except BufferError:  # a view is still alive somewhere: let it go later
                        pass
                self._buffers -= len(self._free)
                self._free.clear()

    # -- background writers ---------------------------------------------------------------------

    def start_writers(
        self,
        threads: int,
        before_write: Callable[[], None] | None = None,
        after_write: Callable[[], None] | None = None,
    ) -> None:
        """Write full packs in ``threads`` background threads from now on; at most ``threads + 2``
        pooled buffers exist then, so producers wait while all writers are busy. ``before_write``
        runs before each write (e.g. waiting for the vault lock), ``after_write`` after each pack is
        written and indexed (e.g. writing an index file now and then). Stop with ``stop_writers``."""
        with self._lock:
            if self._threads:
                raise RuntimeError("background writers already running")
            self._max_buffers = threads + 2
            self._before_write = before_write
            self._after_write = after_write
            self._threads = [
                threading.Thread(target=self._run, name="vault-pack-writer", daemon=True)
                for _ in range(threads)
            ]
        for thread in self._threads:
            thread.start()

    def stop_writers(self) -> None:
        """Write what is queued (not the open packs: see ``flush``), then stop the threads."""
        with self._lock:
            threads, self._threads = self._threads, []
            self._changed.notify_all()
        for thread in threads:
            thread.join()
        with self._lock:
            self._max_buffers = None
            self._before_write = self._after_write = None
        self._write_closed()

    def _run(self) -> None:
        me = threading.current_thread()
        while True:
            with self._lock:
                while not self._queue and me in self._threads:
                    self._changed.wait()
                if not self._queue:
                    return
                pack = self._queue.popleft()
                self._writing += 1
            try:
                if self._error is None:
                    if self._before_write is not None:
                        self._before_write()
                    self._finish(pack)
                    if self._after_write is not None:
                        self._after_write()
                else:
                    self._give_back(pack)
            except BaseException as exc:  # noqa: BLE001 - raised to the producers and by flush()
                with self._lock:
                    if self._error is None:
                        self._error = exc
            finally:
                with self._lock:
                    self._writing -= 1
                    self._changed.notify_all()
