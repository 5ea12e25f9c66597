"""Rebuild the index from the packs themselves, and the packindex files (ARCHITECTURE.md).

``rebuild_indexes`` reads the header at the end of every pack in data/ (or, with ``read_all_packs``,
every whole pack, keeping only blobs that decrypt and hash right), writes a fresh, complete set of index
files, and only then removes the index files that were there before. Packs missing from the old index
get indexed; index entries whose pack is gone disappear; packs whose header cannot be read are left out
and reported (``vault repair`` salvages what is readable in them). A crash at any point leaves either
the old index files, or the new and some old ones (duplicates are harmless), so running it again is
always safe. The caller must hold the vault's exclusive lock.

packindex files: one per snapshot, naming the packs that snapshot needs. Stored encrypted like every
other vault file: the sealed plaintext is msgpack ``{"v": 1, "snapshot": <32 bytes>, "packs":
[<32 bytes>, ...]}`` (pack ids sorted), and the file name is the SHA-256 of the stored bytes.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import msgpack

from vaultfs.crypto import MasterKey
from vaultfs.errors import FormatError, ObjectNotFound, VaultError
from vaultfs.format.index import IndexFile
from vaultfs.format.pack import DATA, TREE, TYPE_NAMES, PackedBlob
from vaultfs.ops.deepverify import check_blobs, parse_header, read_header
from vaultfs.repo.repository import INDEX_FLUSH_BLOBS, Repository

PACKINDEX_VERSION = 1

StageCallback = Callable[[str, "int | None", str], None]
AdvanceCallback = Callable[[int], None]


# -- packindex codec ----------------------------------------------------------------------------


def encode_packindex(key: MasterKey, snapshot_id: bytes, packs: Iterable[bytes]) -> bytes:
    """The stored bytes of a packindex file for one snapshot."""
    doc = {"v": PACKINDEX_VERSION, "snapshot": bytes(snapshot_id), "packs": sorted(set(packs))}
    return key.seal(msgpack.packb(doc, use_bin_type=True))


def decode_packindex(
    key: MasterKey, raw: bytes, what: str = "packindex"
) -> tuple[bytes, list[bytes]]:
    """(snapshot id, pack ids) of a stored packindex file. Raises IntegrityError or FormatError."""
    plain = key.open(raw, what)
    try:
        doc = msgpack.unpackb(plain, raw=False)
        snapshot = doc["snapshot"]
        packs = doc["packs"]
        if doc.get("v") != PACKINDEX_VERSION:
            raise ValueError(f"unknown version {doc.get('v')!r}")
        if not isinstance(snapshot, bytes) or len(snapshot) != 32:
            raise ValueError("bad snapshot id")
        if not isinstance(packs, list) or any(
            not isinstance(p, bytes) or len(p) != 32 for p in packs
        ):
            raise ValueError("bad pack list")
    except (ValueError, KeyError, TypeError, AttributeError, msgpack.UnpackException) as exc:
        raise FormatError(f"{what} is not a valid packindex ({exc})") from None
    return snapshot, packs


# -- report -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnreadablePack:
    id: str
    reason: str


@dataclass
class RebuildReport:
    packs: int = 0
    blobs: int = 0
    #: packs that no old index file named
    packs_added: list[str] = field(default_factory=list)
    #: packs the old index named that are not in data/ any more
    packs_dropped: list[str] = field(default_factory=list)
    #: packs left out of the new index because their header (or content) cannot be read
    packs_unreadable: list[UnreadablePack] = field(default_factory=list)
    #: with read_all_packs: blobs left out because they do not decrypt or hash right (``type:id``)
    blobs_dropped: list[str] = field(default_factory=list)
    old_index_unreadable: list[str] = field(default_factory=list)
    index_files_written: list[str] = field(default_factory=list)
    index_files_removed: list[str] = field(default_factory=list)
    packindex_written: list[str] = field(default_factory=list)
    packindex_removed: list[str] = field(default_factory=list)
    #: snapshots that got no packindex because some of their trees cannot be read
    packindex_skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0


# -- rebuild ------------------------------------------------------------------------------------


def _old_index_packs(repo: Repository, names: list[str], report: RebuildReport) -> set[bytes]:
    def load(name: str) -> IndexFile | VaultError:
        try:
            return IndexFile.decode(repo.load_unpacked("index", name), f"index/{name}")
        except VaultError as exc:
            return exc

    packs: set[bytes] = set()
    with ThreadPoolExecutor(max_workers=8) as pool:
        for name, result in zip(names, pool.map(load, names), strict=True):
            if isinstance(result, VaultError):
                if not isinstance(result, ObjectNotFound):
                    report.old_index_unreadable.append(name)
                continue
            packs.update(result.packs)
    return packs


def rebuild_indexes(
    repo: Repository,
    *,
    read_all_packs: bool = False,
    packindex: bool = False,
    workers: int | None = None,
    on_stage: StageCallback | None = None,
    on_advance: AdvanceCallback | None = None,
) -> RebuildReport:
    """Write a complete index from the packs in data/, then remove the old index files.

    The caller holds the exclusive lock. Afterwards ``repo``'s index is reloaded from the new files.
    With ``packindex``, the packindex files are rewritten too (see ``write_packindex``).
    """
    started = time.monotonic()
    report = RebuildReport()
    old_names = sorted(n for n, _ in repo.backend.list("index"))
    old_packs = _old_index_packs(repo, old_names, report)
    present = dict(repo.backend.list("data"))
    packs = sorted(n for n in present if _is_id(n))
    report.packs_dropped = sorted(p.hex() for p in old_packs if p.hex() not in present)

    def stage(name: str, total: int | None, unit: str = "items") -> None:
        if on_stage is not None:
            on_stage(name, total, unit)

    def one(name: str) -> tuple[list[PackedBlob], list[str]] | VaultError:
        try:
            size = present[name]
            if not read_all_packs:
                blobs = read_header(repo, name, size)
                if on_advance is not None:
                    on_advance(1)
                return blobs, []
            data = repo.backend.read("data", name)
            if len(data) != size:
                size = len(data)
            blobs = parse_header(repo, data, size, name)
            good, bad = [], []
            for b, why in check_blobs(repo, bytes.fromhex(name), data, blobs):
                if why is None:
                    good.append(b)
                else:
                    bad.append(f"{TYPE_NAMES[b.blob_type]}:{b.id.hex()}")
            if on_advance is not None:
                on_advance(len(data))
            return good, bad
        except VaultError as exc:
            return exc

    if read_all_packs:
        stage("reading packs", sum(present[p] for p in packs), "bytes")
    else:
        stage("reading pack headers", len(packs))
    threads = workers or ((os.cpu_count() or 1) + 1 if read_all_packs else 8)
    current = IndexFile()
    written: list[str] = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for name, result in zip(packs, pool.map(one, packs), strict=True):
            if isinstance(result, ObjectNotFound):
                continue
            if isinstance(result, VaultError):
                report.packs_unreadable.append(UnreadablePack(name, str(result)))
                continue
            blobs, bad = result
            report.blobs_dropped += bad
            pack = bytes.fromhex(name)
            if pack not in old_packs:
                report.packs_added.append(name)
            current.packs[pack] = blobs
            report.packs += 1
            report.blobs += len(blobs)
            if current.blob_count() >= INDEX_FLUSH_BLOBS:
                written.append(repo.save_unpacked("index", current.encode()))
                current = IndexFile()
    if current.packs:
        written.append(repo.save_unpacked("index", current.encode()))
    report.index_files_written = written
    # Only now that the complete new index is stored may the old one go (kill -9 safe order).
    for name in old_names:
        if name not in written:
            repo.backend.remove("index", name)
            report.index_files_removed.append(name)
    repo.load_index()
    if packindex:
        write_packindex(repo, report)
    report.seconds = time.monotonic() - started
    return report


def _is_id(name: str) -> bool:
    if len(name) != 64:
        return False
    try:
        return bytes.fromhex(name).hex() == name
    except ValueError:
        return False


# -- packindex ---------------------------------------------------------------------------------


def snapshot_packs(
    repo: Repository, tree_id: bytes, memo: dict[bytes, frozenset[bytes]]
) -> frozenset[bytes]:
    """The packs holding a tree and everything below it (the index must be loaded). Raises a
    VaultError when a tree cannot be read or a blob is not indexed."""
    stack: list[tuple[bytes, bool]] = [(tree_id, False)]
    while stack:
        current, expanded = stack.pop()
        if current in memo:
            continue
        nodes = repo.load_tree(current)
        subtrees = [n.subtree for n in nodes if n.type == "dir" and n.subtree is not None]
        if not expanded:
            stack.append((current, True))
            stack += [(s, False) for s in subtrees if s not in memo]
            continue
        loc = repo.index.lookup(current, TREE)
        if loc is None:
            raise ObjectNotFound(f"tree {current.hex()} is not in the index")
        packs = {loc.pack_id}
        for node in nodes:
            for blob in node.content or ():
                loc = repo.index.lookup(blob, DATA)
                if loc is None:
                    raise ObjectNotFound(f"data blob {blob.hex()} is not in the index")
                packs.add(loc.pack_id)
        for sub in subtrees:
            if sub not in memo:
                raise FormatError(f"tree {current.hex()} contains itself")
            packs |= memo[sub]
        memo[current] = frozenset(packs)
    return memo[tree_id]


def write_packindex(repo: Repository, report: RebuildReport) -> None:
    """Write one packindex file per snapshot (from the loaded index), then remove the old ones."""
    old = [n for n, _ in repo.backend.list("packindex")]
    memo: dict[bytes, frozenset[bytes]] = {}
    new: set[str] = set()
    for sid, snap in repo.list_snapshots(on_error=lambda _exc: None):
        try:
            packs = snapshot_packs(repo, snap.tree, memo)
        except VaultError:
            report.packindex_skipped.append(sid)
            continue
        data = encode_packindex(repo.key, bytes.fromhex(sid), packs)
        name = hashlib.sha256(data).hexdigest()
        repo.backend.write("packindex", name, data)
        new.add(name)
        report.packindex_written.append(name)
    for name in old:
        if name not in new:
            repo.backend.remove("packindex", name)
            report.packindex_removed.append(name)
