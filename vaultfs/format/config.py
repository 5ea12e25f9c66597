"""The vault config (FORMAT.md §2.4): ``config``, sealed with the master key, never compressed.

Plaintext (Go json.Marshal, no newline)::

    {"version":2,"id":"<64 hex>","chunker_polynomial":"<hex>"}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from vaultfs.errors import FormatError


@dataclass(frozen=True)
class Config:
    version: int
    id: str
    chunker_polynomial: int

    @classmethod
    def new(cls, version: int, polynomial: int) -> Config:
        if version not in (1, 2):
            raise FormatError(f"unsupported repository version {version}")
        return cls(version, os.urandom(32).hex(), polynomial)

    def encode(self) -> bytes:
        return (
            f'{{"version":{self.version},"id":"{self.id}",'
            f'"chunker_polynomial":"{self.chunker_polynomial:x}"}}'
        ).encode("ascii")

    @classmethod
    def decode(cls, raw: bytes) -> Config:
        try:
            doc = json.loads(raw)
            version = doc["version"]
            repo_id = doc["id"]
            poly = int(doc["chunker_polynomial"], 16)
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"config is not valid JSON ({exc})") from None
        if version not in (1, 2):
            raise FormatError(f"config has unsupported repository version {version!r}")
        if not isinstance(repo_id, str) or not repo_id:
            raise FormatError("config has no repository id")
        if poly == 0:
            raise FormatError("config has an invalid chunker polynomial")
        return cls(version, repo_id, poly)
