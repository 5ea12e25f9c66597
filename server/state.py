"""Server state in SQLite (WAL): the bucket registry.

One row per bucket: its name, bcrypt(sha512(PSK)), quota in bytes (0 = none), the append-only flag and
the creation time. The server process and the admin commands (`vault server bucket ...`) open the same
file; WAL lets the server read while an admin command writes, and the server re-reads a row at most
``BucketRegistry.ttl`` seconds old, so admin changes take effect without a restart.

Thread-safe: one connection guarded by a lock (SQLite calls are short).
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from dataclasses import dataclass

from vaultfs.errors import NotFoundError, UsageError

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}\Z")
#: Top-level paths the server answers itself; a bucket must not shadow them.
RESERVED = frozenset({"metrics", "healthz"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS buckets (
    name TEXT PRIMARY KEY,
    psk_hash BLOB NOT NULL,
    quota INTEGER NOT NULL DEFAULT 0,
    append_only INTEGER NOT NULL DEFAULT 0,
    created TEXT NOT NULL
)
"""


def check_bucket_name(name: str) -> str:
    """Return ``name`` if it is a valid bucket name, else raise UsageError."""
    if not _NAME.match(name) or name in RESERVED:
        raise UsageError(
            f"invalid bucket name {name!r}: use 1-63 characters a-z, 0-9, '-' and '_', "
            "starting with a letter or digit (not 'metrics' or 'healthz')"
        )
    return name


@dataclass(frozen=True)
class Bucket:
    name: str
    psk_hash: bytes
    quota: int
    append_only: bool
    created: str


class BucketRegistry:
    """The bucket table. ``get`` serves the request path from a short-lived cache."""

    ttl = 2.0

    def __init__(self, state_dir: str) -> None:
        try:
            os.makedirs(state_dir, mode=0o700, exist_ok=True)
            self._db = sqlite3.connect(
                os.path.join(state_dir, "state.sqlite3"),
                check_same_thread=False,
                isolation_level=None,
                timeout=30,
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise UsageError(f"cannot open the server state in {state_dir}: {exc}") from None
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, Bucket | None]] = {}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    @staticmethod
    def _bucket(row: tuple) -> Bucket:
        return Bucket(row[0], bytes(row[1]), int(row[2]), bool(row[3]), row[4])

    def get(self, name: str, *, fresh: bool = False) -> Bucket | None:
        now = time.monotonic()
        hit = self._cache.get(name)
        if hit is not None and not fresh and now - hit[0] < self.ttl:
            return hit[1]
        rows = self._rows(
            "SELECT name, psk_hash, quota, append_only, created FROM buckets WHERE name = ?",
            (name,),
        )
        bucket = self._bucket(rows[0]) if rows else None
        if len(self._cache) > 10_000:
            self._cache.clear()  # bounded: unknown names could otherwise fill it
        self._cache[name] = (now, bucket)
        return bucket

    def require(self, name: str) -> Bucket:
        bucket = self.get(name, fresh=True)
        if bucket is None:
            raise NotFoundError(f"no bucket named {name!r}; `vault server bucket list` shows them")
        return bucket

    def list(self) -> list[Bucket]:
        rows = self._rows(
            "SELECT name, psk_hash, quota, append_only, created FROM buckets ORDER BY name"
        )
        return [self._bucket(r) for r in rows]

    def create(
        self, name: str, psk_hash: bytes, *, quota: int = 0, append_only: bool = False
    ) -> Bucket:
        check_bucket_name(name)
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:
            with self._lock:
                self._db.execute(
                    "INSERT INTO buckets (name, psk_hash, quota, append_only, created) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (name, psk_hash, quota, int(append_only), created),
                )
        except sqlite3.IntegrityError:
            raise UsageError(f"a bucket named {name!r} exists already") from None
        self._cache.pop(name, None)
        return self.require(name)

    def update(
        self,
        name: str,
        *,
        quota: int | None = None,
        append_only: bool | None = None,
        psk_hash: bytes | None = None,
    ) -> Bucket:
        self.require(name)
        with self._lock:
            if quota is not None:
                self._db.execute("UPDATE buckets SET quota = ? WHERE name = ?", (quota, name))
            if append_only is not None:
                self._db.execute(
                    "UPDATE buckets SET append_only = ? WHERE name = ?", (int(append_only), name)
                )
            if psk_hash is not None:
                self._db.execute("UPDATE buckets SET psk_hash = ? WHERE name = ?", (psk_hash, name))
        self._cache.pop(name, None)
        return self.require(name)

    def delete(self, name: str) -> None:
        self.require(name)
        with self._lock:
            self._db.execute("DELETE FROM buckets WHERE name = ?", (name,))
        self._cache.pop(name, None)
