"""Putting decrypted data into the kernel's page cache before the kernel asks for it (FUSE notify_store).

Every read request costs a round trip through the kernel and pyfuse3, which costs more than the copy
itself. When the mount has fetched data ahead of a reader (the next blobs of a file read sequentially),
it stores that data straight into the page cache of the file's inode, and the reader's ``read()`` is
then answered by the kernel without a request. (Small files are stored whole while their open is
answered, in the trio thread: see ``VaultOperations._store_whole``.)

``notify_store`` may block until a read request for the same pages has been answered (the kernel locks
the pages meanwhile), so it runs in a worker thread of its own, never in one that a pending read waits
for, and the trio thread keeps answering requests. Before the mount is told to stop, ``close()`` waits
for the stores in flight, so none is left inside libfuse when the session is destroyed.
"""

from __future__ import annotations

import pyfuse3
import trio

#: Data queued for the kernel beyond this is dropped (pushing is only a shortcut; reads still work).
MAX_QUEUED = 8 * 1024 * 1024


class PagePusher:
    """Queue of (inode, offset, data) stores, sent to the kernel by one worker thread at a time.

    ``nursery`` must be set before the first ``push``. Lives in the trio thread.
    """

    def __init__(self) -> None:
        self.nursery: trio.Nursery | None = None
        self._limiter = trio.CapacityLimiter(1)
        self._queue: list[tuple[int, int, bytes | memoryview]] = []
        self._queued = 0
        self._busy = False
        self._closed = False
        self._idle = trio.Event()
        self._idle.set()

    def push(self, ino: int, offset: int, data: bytes | memoryview) -> None:
        """Store ``data`` at ``offset`` of inode ``ino`` in the page cache, soon (best effort)."""
        if self._closed or self.nursery is None or self._queued + len(data) > MAX_QUEUED:
            return
        self._queue.append((ino, offset, data))
        self._queued += len(data)
        if not self._busy:
            self._busy = True
            self._idle = trio.Event()
            self.nursery.start_soon(self._drain)

    async def close(self) -> None:
        """Stop pushing and wait until no store is in flight."""
        self._closed = True
        await self._idle.wait()

    async def _drain(self) -> None:
        try:
            while self._queue and not self._closed:
                batch, self._queue, self._queued = self._queue, [], 0
                await trio.to_thread.run_sync(_store_sync, batch, limiter=self._limiter)
        finally:
            self._busy = False
            self._idle.set()


def _store_sync(batch: list[tuple[int, int, bytes | memoryview]]) -> None:
    for ino, offset, data in batch:
        try:
            pyfuse3.notify_store(ino, offset, data)  # type: ignore[arg-type]  # any buffer works
        except OSError:
            pass  # the kernel has forgotten the inode, or the mount is going away
