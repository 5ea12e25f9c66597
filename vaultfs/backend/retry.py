"""Retry wrapper: repeats backend calls that failed with a temporary BackendError, with backoff (and
not sooner than the error's ``retry_after``, when the storage asked for a pause).

Permanent errors (missing objects, permission problems, a full disk) pass through at once. Listings are
retried only before their first item, so a caller never sees an item twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from vaultfs.backend.base import Backend, Source
from vaultfs.errors import BackendError

T = TypeVar("T")


class RetryBackend(Backend):
    def __init__(self, inner: Backend, attempts: int = 5, first_delay: float = 0.5) -> None:
        self.inner = inner
        self.location = inner.location
        self.attempts = attempts
        self.first_delay = first_delay

    def _retry(self, call: Callable[[], T]) -> T:
        delay = self.first_delay
        for attempt in range(self.attempts):
            try:
                return call()
            except BackendError as exc:
                if not exc.temporary or attempt == self.attempts - 1:
                    raise
                wait = max(delay, exc.retry_after or 0.0)
            time.sleep(wait)
            delay = min(delay * 2, 30)
        raise AssertionError("unreachable")

    def list(self, kind: str) -> Iterator[tuple[str, int]]:
        items = self._retry(lambda: list(self.inner.list(kind)))
        yield from items

    def stat(self, kind: str, name: str) -> int:
        return self._retry(lambda: self.inner.stat(kind, name))

    def read(self, kind: str, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self._retry(lambda: self.inner.read(kind, name, offset, length))

    def write(self, kind: str, name: str, data: bytes | bytearray | memoryview) -> None:
        self._retry(lambda: self.inner.write(kind, name, data))

    def write_stream(self, kind: str, name: str, source: Source, size: int) -> None:
        # Every attempt calls source() again, so it re-reads from the first byte.
        self._retry(lambda: self.inner.write_stream(kind, name, source, size))

    def remove(self, kind: str, name: str) -> None:
        self._retry(lambda: self.inner.remove(kind, name))

    def exists(self, kind: str, name: str) -> bool:
        return self._retry(lambda: self.inner.exists(kind, name))

    def create(self) -> None:
        self._retry(self.inner.create)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str):  # noqa: ANN204 - backend-specific extras (path, list_temp, root)
        return getattr(self.inner, name)
