"""Damage stored objects the way a failing disk does, for tests of what readers make of it."""

from __future__ import annotations

import os
from pathlib import Path

from vaultfs.repo.masterindex import BlobLocation
from vaultfs.repo.repository import Repository


def flip_blob_byte(repo: Repository, loc: BlobLocation) -> Path:
    """Invert one byte in the middle of the stored blob at ``loc`` (a local vault); returns the pack."""
    pack = Path(repo.backend.path("data", loc.pack_id.hex()))
    os.chmod(pack, 0o600)
    with open(pack, "r+b") as f:
        f.seek(loc.offset + loc.length // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    return pack
