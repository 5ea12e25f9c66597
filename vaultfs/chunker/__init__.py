"""Content-defined chunking with restic's exact cut points (FORMAT.md §9).

A file is cut into chunks with a Rabin fingerprint over a 64-byte sliding window, modulo the vault's
random irreducible polynomial (``config.chunker_polynomial``, see :mod:`vaultfs.chunker.poly`). A chunk
ends after a byte whose fingerprint has its low 20 bits zero, but never before 512 KiB and always at
8 MiB; the last chunk of a file ends with the file. Because the cut points are restic's, a vault written
by vaultfs deduplicates against one written by restic and back.

API
---
``Chunker(polynomial, min_size=MIN_SIZE, max_size=MAX_SIZE, average_bits=AVERAGE_BITS)``
    The streaming core (C). ``feed(buffer) -> list[int]`` scans the next bytes of a stream and returns
    the offsets *within that buffer* after which chunks end; state carries over between calls, so any
    split of a stream into ``feed`` calls gives the same chunks. ``reset()`` starts a new stream (file).
    ``pending`` is the size of the unfinished chunk. ``feed`` takes any C-contiguous bytes-like object
    and releases the GIL while scanning, so threads with their own chunkers run in parallel. A chunker
    used by two threads at once raises ``RuntimeError``.

``iter_chunks(source, polynomial, *, read_size=READ_SIZE)``
    Yields the chunks of a file object (``readinto`` or ``read``) or file descriptor as ``bytes``,
    the last one included; an empty file yields nothing. Holds at most ``max_size + read_size`` bytes.

``split(data, polynomial)``
    The chunk lengths of an in-memory byte string; they sum to ``len(data)``.

Cost: the scan runs four independent fingerprint lanes at once (see ``_chunker.c``) and skips the
first 448 KiB of every chunk unhashed. On the development machine (2 vCPUs, shared) it chunked random
data at about 1.1-1.5 GB per CPU-second and its worst input (no content cuts) at about 1.3; run
``bench/chunker.py`` for current figures. That is several times the SHA-256 that follows it.
"""

from __future__ import annotations

import io
from collections.abc import Generator
from typing import Protocol

from vaultfs.chunker._chunker import WINDOW_SIZE, Chunker

__all__ = [
    "AVERAGE_BITS",
    "MAX_SIZE",
    "MIN_SIZE",
    "READ_SIZE",
    "WINDOW_SIZE",
    "Chunker",
    "Readable",
    "iter_chunks",
    "split",
]

MIN_SIZE = 512 * 1024
MAX_SIZE = 8 * 1024 * 1024
AVERAGE_BITS = 20
# Large enough that per-call costs vanish, small enough to keep a few files in flight per worker.
READ_SIZE = 1024 * 1024


class Readable(Protocol):
    """What iter_chunks needs from a source: ``read``; ``readinto`` is used when present."""

    def read(self, size: int, /) -> bytes | None: ...


def _read_into(source: Readable, target: memoryview) -> int | None:
    """``readinto`` for sources that only have ``read``."""
    data = source.read(len(target))
    if data is None:
        return None
    if len(data) > len(target):
        raise ValueError(f"read({len(target)}) returned {len(data)} bytes")
    target[: len(data)] = data
    return len(data)


def split(
    data: bytes | bytearray | memoryview,
    polynomial: int,
    *,
    min_size: int = MIN_SIZE,
    max_size: int = MAX_SIZE,
    average_bits: int = AVERAGE_BITS,
) -> list[int]:
    """Return the lengths of the chunks of ``data`` (empty data: no chunks)."""
    chunker = Chunker(polynomial, min_size, max_size, average_bits)
    lengths = []
    start = 0
    for end in chunker.feed(data):
        lengths.append(end - start)
        start = end
    if start < len(data):
        lengths.append(len(data) - start)
    return lengths


def iter_chunks(
    source: Readable | int,
    polynomial: int,
    *,
    read_size: int = READ_SIZE,
    min_size: int = MIN_SIZE,
    max_size: int = MAX_SIZE,
    average_bits: int = AVERAGE_BITS,
) -> Generator[bytes, None, None]:
    """Yield the chunks of ``source`` in order, reading it to the end in blocks of ``read_size``.

    ``source`` is a binary file object or an open file descriptor (not closed here). Read errors
    propagate as the ``OSError`` the file raised. A non-blocking source that has no data is an error.
    """
    if read_size < 1:
        raise ValueError(f"read_size must be positive, got {read_size}")
    chunker = Chunker(polynomial, min_size, max_size, average_bits)
    if isinstance(source, int):
        source = io.FileIO(source, "rb", closefd=False)
    readinto = getattr(source, "readinto", None)
    # The unfinished chunk (always shorter than max_size) stays at the front; reads land after it.
    buf = bytearray(max_size + read_size)
    view = memoryview(buf)
    try:
        fill = 0
        while True:
            target = view[fill : fill + read_size]
            n = readinto(target) if readinto is not None else _read_into(source, target)
            target.release()
            if n is None:
                raise BlockingIOError("iter_chunks needs a blocking source")
            if n == 0:
                break
            start = 0
            for end in chunker.feed(view[fill : fill + n]):
                yield bytes(view[start : fill + end])
                start = fill + end
            fill += n
            if start:
                # Each byte is moved at most once: only after a cut, and only the cut's remainder.
                view[: fill - start] = view[start:fill]
                fill -= start
        if fill:
            yield bytes(view[:fill])
    finally:
        view.release()
