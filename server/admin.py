"""Bucket administration on a server's data folder (server running or not): the library behind
`vault server bucket ...` and `vault server volumes`.

Creating a bucket makes a random 128-bit PSK, stores only bcrypt(sha512(PSK)) and returns the PSK once:
it cannot be shown again (``set --new-psk`` replaces it). A running server sees changes within a few
seconds (BucketRegistry.ttl).
"""

from __future__ import annotations

import builtins
import re
import secrets
from dataclasses import dataclass

from vaultfs.errors import UsageError
from vaultfs.server.auth import hash_psk, new_psk
from vaultfs.server.config import ServerConfig
from vaultfs.server.main import open_state
from vaultfs.server.state import Bucket, check_bucket_name
from vaultfs.server.storage import VolumeUsage

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\Z", re.IGNORECASE)
_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_size(text: str) -> int:
    """``500M``, ``10G``, ``1.5T``, ``1024`` (bytes; K/M/G/T/P are powers of 1024); 0 = no quota."""
    match = _SIZE.match(text.strip())
    if match is None:
        raise UsageError(f"bad size {text!r}: use a number with an optional K, M, G, T or P suffix")
    number, unit, _ = match.groups()
    return int(float(number) * 1024 ** _UNITS[unit.lower()])


@dataclass
class BucketInfo:
    name: str
    quota: int
    append_only: bool
    created: str
    stored: int
    files: int


@dataclass
class NewBucket:
    bucket: BucketInfo
    psk: str  # hex; shown once


class Admin:
    """Opens the state and volumes of ``config``; close() when done (or use as a context manager)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.registry, self.storage = open_state(config)

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.registry.close()

    def _info(self, bucket: Bucket) -> BucketInfo:
        stored, files = self.storage.usage_sync(bucket.name)
        return BucketInfo(
            bucket.name, bucket.quota, bucket.append_only, bucket.created, stored, files
        )

    def create(
        self, name: str | None = None, *, quota: int = 0, append_only: bool = False
    ) -> NewBucket:
        name = check_bucket_name(name) if name else secrets.token_hex(8)
        psk = new_psk()
        bucket = self.registry.create(
            name, hash_psk(psk, self.config.bcrypt_rounds), quota=quota, append_only=append_only
        )
        self.storage.create_layout_sync(name)
        return NewBucket(self._info(bucket), psk.hex())

    def list(self) -> list[BucketInfo]:
        return [self._info(b) for b in self.registry.list()]

    def info(self, name: str) -> BucketInfo:
        return self._info(self.registry.require(name))

    def set(
        self,
        name: str,
        *,
        quota: int | None = None,
        append_only: bool | None = None,
        rotate_psk: bool = False,
    ) -> tuple[BucketInfo, str | None]:
        """Change a bucket; with ``rotate_psk`` the returned hex PSK replaces the old one."""
        psk = new_psk() if rotate_psk else None
        bucket = self.registry.update(
            name,
            quota=quota,
            append_only=append_only,
            psk_hash=hash_psk(psk, self.config.bcrypt_rounds) if psk else None,
        )
        return self._info(bucket), psk.hex() if psk else None

    def delete(self, name: str, *, keep_files: bool = False) -> None:
        self.registry.require(name)
        self.registry.delete(name)
        if not keep_files:
            self.storage.delete_bucket_sync(name)

    def volumes(self) -> builtins.list[VolumeUsage]:
        return self.storage.volume_report_sync()
