"""packindex files: for each snapshot, the packs it needs (ARCHITECTURE.md, "What vaultfs adds").

A packindex file is sealed with the master key like every other vault file and named by the SHA-256 of
its stored bytes, so keyless tools (verify, the bucket server's upload check) treat it like the rest.
The plaintext is msgpack::

    {"v": 1, "snapshot": <32-byte snapshot id>, "packs": [<32-byte pack id>, ...]}   (packs sorted)

The file is an accelerator and never the truth: it is valid only while its snapshot exists and every pack
it names is still in the vault. Prune writes one for each snapshot it had to walk and uses the valid ones
to skip walking snapshots whose packs it does not touch; files of forgotten snapshots ("stale") tell it
which packs may have become partly unused. A missing, stale or damaged file makes retention slower, never
wrong.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from vaultfs.errors import VaultError
from vaultfs.ops.rebuild import PACKINDEX_VERSION, decode_packindex, encode_packindex
from vaultfs.repo.repository import Repository

# The codec lives with rebuild-indexes, which wrote packindex files first; one format, one codec.
encode = encode_packindex
decode = decode_packindex


@dataclass(frozen=True)
class PackIndexFile:
    name: str
    snapshot: str  # hex id
    packs: frozenset[bytes]


@dataclass
class PackIndexes:
    """Every readable packindex file of a vault, and the names of the unreadable ones."""

    files: list[PackIndexFile]
    damaged: list[str]

    def for_snapshots(
        self, snapshots: Iterable[str], present: set[bytes] | frozenset[bytes]
    ) -> dict[str, PackIndexFile]:
        """The valid file of each snapshot that has exactly one: every pack it names is in ``present``.

        A snapshot with several files (a prune that crashed between writing the new file and removing
        the old one) has none: which of them is current is unknown, so the snapshot gets walked.
        """
        wanted = set(snapshots)
        count: dict[str, int] = {}
        for f in self.files:
            count[f.snapshot] = count.get(f.snapshot, 0) + 1
        return {
            f.snapshot: f
            for f in self.files
            if f.snapshot in wanted and count[f.snapshot] == 1 and f.packs <= present
        }


def load_all(repo: Repository, workers: int = 8) -> PackIndexes:
    """Read every packindex file (in parallel). Unreadable files are listed, never raised."""
    names = [n for n, _ in repo.backend.list("packindex")]

    def one(name: str) -> PackIndexFile | None:
        try:
            raw = repo.backend.read("packindex", name)
            if hashlib.sha256(raw).hexdigest() != name:
                return None
            snap, packs = decode(repo.key, raw, f"packindex/{name}")
        except VaultError:
            return None
        return PackIndexFile(name, snap.hex(), frozenset(packs))

    result = PackIndexes([], [])
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for name, f in zip(names, pool.map(one, names), strict=True):
            if f is None:
                result.damaged.append(name)
            else:
                result.files.append(f)
    return result


def write(repo: Repository, snapshot_id: str, packs: Iterable[bytes]) -> str:
    """Store the packindex file of one snapshot; returns its name."""
    data = encode(repo.key, bytes.fromhex(snapshot_id), packs)
    name = hashlib.sha256(data).hexdigest()
    repo.backend.write("packindex", name, data)
    return name


__all__ = [
    "PACKINDEX_VERSION",
    "PackIndexFile",
    "PackIndexes",
    "decode",
    "encode",
    "load_all",
    "write",
]
