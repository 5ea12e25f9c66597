"""The backend contract: a tiny byte store addressed by (kind, name), never by free paths.

Kinds: ``config`` (one file, empty name), ``keys``, ``data``, ``index``, ``snapshots``, ``locks``, ``packindex``.
Names are 64 lower-case hex characters. ``read`` with a length returns exactly that many bytes or raises;
``write`` is atomic and never overwrites; ``write_stream`` is the same for an object too large to hold in
memory, taken piece by piece from a re-openable source; ``remove`` is idempotent. Backends are thread-safe.
Errors are BackendError (``temporary`` tells the retry wrapper whether to try again) or ObjectNotFound.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator

from vaultfs.errors import BackendError, FormatError

KINDS = ("config", "keys", "data", "index", "snapshots", "locks", "packindex")
_NAME = re.compile(r"[0-9a-f]{64}\Z")

#: The bytes of an object to stream: each call starts a fresh pass over them from the first byte (a
#: retry calls it again), yielding pieces of any size.
Source = Callable[[], Iterable[bytes | bytearray | memoryview]]


def check_name(kind: str, name: str) -> None:
    if kind not in KINDS:
        raise FormatError(f"unknown object kind {kind!r}")
    if kind == "config":
        if name:
            raise FormatError("the config object has no name")
    elif not _NAME.match(name):
        raise FormatError(f"invalid {kind} name {name!r} (need 64 hex characters)")


class Backend(ABC):
    """Byte store. Subclasses implement the abstract methods; all are thread-safe."""

    location: str

    @abstractmethod
    def list(self, kind: str) -> Iterator[tuple[str, int]]:
        """(name, size) of every object of ``kind``; temp files are never listed."""

    @abstractmethod
    def stat(self, kind: str, name: str) -> int:
        """Size in bytes; ObjectNotFound when missing."""

    @abstractmethod
    def read(self, kind: str, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes [offset, offset+length) (to the end when length is None); short reads raise."""

    @abstractmethod
    def write(self, kind: str, name: str, data: bytes | bytearray | memoryview) -> None:
        """Store atomically; an object that already exists is left as it is (written once)."""

    def write_stream(self, kind: str, name: str, source: Source, size: int) -> None:
        """Store the ``size`` bytes that ``source()`` yields, atomically and write-once as ``write``.

        Memory stays bounded by the source's piece size in backends that stream (local, REST); this
        default joins the pieces and calls ``write``. An exception raised while iterating the source
        aborts the write with nothing stored and propagates unchanged, so a source may check the
        bytes in flight (a hash) and refuse before its last piece. A source that yields more or
        fewer than ``size`` bytes is a permanent BackendError.
        """
        data = b"".join(bytes(piece) for piece in source())
        check_streamed_size(kind, name, len(data), size)
        self.write(kind, name, data)

    @abstractmethod
    def remove(self, kind: str, name: str) -> None:
        """Delete; no error if it does not exist."""

    @abstractmethod
    def exists(self, kind: str, name: str) -> bool: ...

    def create(self) -> None:
        """Make the folder structure of a new vault (idempotent)."""

    def close(self) -> None:
        pass

    def __str__(self) -> str:
        return self.location


def check_streamed_size(kind: str, name: str, got: int, size: int) -> None:
    if got != size:
        where = "config" if kind == "config" else f"{kind}/{name}"
        raise BackendError(
            f"writing {where}: the source gave {got} bytes, not the {size} announced"
        )
