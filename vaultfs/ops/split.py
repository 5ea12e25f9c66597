"""Split: copy some snapshots into a vault of their own that shares the master key and chunker polynomial.

Because the two vaults share the master key and the polynomial, they keep deduplicating against each
other: they can be merged back (vaultfs/ops/merge.py) or split again, and every stored blob, pack and
snapshot file is valid in both as it is. So nothing is re-encrypted: snapshot files are copied byte for
byte (same IDs), packs whose every blob is needed are copied whole, and the needed blobs of other packs
are copied into new packs (each blob decrypted and hash-checked on the way).

``copy_snapshots`` does the work for split and merge; in the target it writes packs, then the index,
then the snapshot files, then their packindex files, so a kill -9 leaves a valid target, and running the
same command again skips what is there and finishes. ``split(..., move=True)`` then forgets the copied
snapshots in the source and prunes it; that happens only after the target is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from vaultfs.backend import Backend
from vaultfs.crypto import MasterKey
from vaultfs.errors import IntegrityError, UsageError, VaultError, WrongPassword
from vaultfs.format.pack import PackedBlob
from vaultfs.format.snapshot import Snapshot
from vaultfs.ops.forget import ForgetReport, forget
from vaultfs.ops.prune import (
    DEFAULT_WORKERS,
    AdvanceCallback,
    BlobKey,
    PruneReport,
    StageCallback,
    Walk,
    copy_blobs,
    missing_blobs,
    prune,
    refuse_missing,
    walk_snapshots,
    write_index,
    write_packindexes,
)
from vaultfs.repo.masterindex import BlobLocation
from vaultfs.repo.repository import Repository


def same_key(a: MasterKey, b: MasterKey) -> bool:
    """Both keys encrypt and authenticate alike (r compared clamped, as Poly1305 uses it)."""
    return a.encrypt == b.encrypt and a.mac_k == b.mac_k and _clamp(a.mac_r) == _clamp(b.mac_r)


def _clamp(r: bytes) -> bytes:
    out = bytearray(r)
    for i in (3, 7, 11, 15):
        out[i] &= 15
    for i in (4, 8, 12):
        out[i] &= 252
    return bytes(out)


def check_compatible(a: Repository, b: Repository, what: str) -> None:
    """Raise VaultError unless the two vaults share master key, polynomial and format version."""
    if not same_key(a.key, b.key):
        raise VaultError(
            f"{what}: the vaults at {a.backend} and {b.backend} have different master keys, so "
            "their data cannot be shared; only vaults made from one another by `vault split` (or "
            "copies of one vault) can be merged"
        )
    if a.config.chunker_polynomial != b.config.chunker_polynomial:
        raise VaultError(
            f"{what}: the vaults at {a.backend} and {b.backend} use different chunker polynomials, "
            "so they would not deduplicate; refusing"
        )
    if a.version != b.version:
        raise VaultError(
            f"{what}: the vault at {a.backend} has format version {a.version} and the one at "
            f"{b.backend} version {b.version}; run `restic migrate upgrade_repo_v2` on the older one"
        )


def open_target(src: Repository, backend: Backend, password: bytes) -> tuple[Repository, bool]:
    """The target of a split: a new vault with ``src``'s master key, polynomial and version, or, when
    one exists there already, that vault if it shares them (a split that is run again). Returns
    (repository, created)."""
    if not backend.exists("config", ""):
        return (
            Repository.init(
                backend,
                password,
                version=src.version,
                polynomial=src.config.chunker_polynomial,
                master=src.key,
            ),
            True,
        )
    try:
        dst = Repository.open(backend, password)
    except WrongPassword:
        raise VaultError(
            f"a vault already exists at {backend} and the password does not open it; split into "
            "a new location"
        ) from None
    check_compatible(src, dst, f"cannot split into {backend}")
    return dst, False


@dataclass
class CopyReport:
    snapshots_copied: list[str] = field(default_factory=list)
    snapshots_present: list[str] = field(default_factory=list)  # already in the target
    packs_copied: list[str] = field(default_factory=list)  # whole pack files
    packs_written: list[str] = field(default_factory=list)  # new packs of copied blobs
    blobs_present: int = 0  # needed blobs the target already had
    blobs_copied: int = 0
    bytes_copied: int = 0  # bytes written into the target's data/
    index_files_written: list[str] = field(default_factory=list)
    packindex_written: list[str] = field(default_factory=list)


def walk_checked(
    src: Repository,
    snapshots: Sequence[tuple[str, Snapshot]],
    *,
    workers: int = DEFAULT_WORKERS,
    on_stage: StageCallback | None = None,
    on_advance: AdvanceCallback | None = None,
) -> Walk:
    """Walk the snapshots' trees and raise MissingData unless ``src`` has every blob they need. The
    index of ``src`` must be loaded."""
    if on_stage is not None:
        on_stage("reading trees", None, "trees")
    walk = walk_snapshots(src, snapshots, workers=workers, on_advance=on_advance)
    listed = {bytes.fromhex(n) for n, _ in src.backend.list("data")}

    def present(key: BlobKey) -> bool:
        return any(loc.pack_id in listed for loc in src.index.lookup_all(key[1], key[0]))

    refuse_missing(missing_blobs(walk, present), "copy")
    return walk


def copy_snapshots(
    src: Repository,
    dst: Repository,
    snapshots: Sequence[tuple[str, Snapshot]],
    *,
    walk: Walk | None = None,
    dry_run: bool = False,
    workers: int = DEFAULT_WORKERS,
    on_stage: StageCallback | None = None,
    on_advance: AdvanceCallback | None = None,
) -> CopyReport:
    """Make ``dst`` hold ``snapshots`` of ``src`` and everything they need (see the module docstring).

    Both vaults must share the master key (check_compatible). Loads ``dst``'s index, and ``src``'s
    unless ``walk`` (from walk_checked over at least these snapshots) is given. Raises MissingData when
    a snapshot depends on a blob ``src`` does not have (nothing is copied then), IntegrityError when a
    blob to copy is damaged in every copy."""
    report = CopyReport()
    if walk is None:
        src.load_index()
    dst.load_index()
    existing = {n for n, _ in dst.backend.list("snapshots")}
    todo = [(sid, snap) for sid, snap in snapshots if sid not in existing]
    report.snapshots_present = [sid for sid, _ in snapshots if sid in existing]
    if not todo:
        return report
    if walk is None:
        walk = walk_checked(src, todo, workers=workers, on_stage=on_stage, on_advance=on_advance)
    src_listed = {bytes.fromhex(n): size for n, size in src.backend.list("data")}

    def locations(key: BlobKey) -> list[BlobLocation]:
        return [loc for loc in src.index.lookup_all(key[1], key[0]) if loc.pack_id in src_listed]

    needed: set[BlobKey] = set()
    for key in _blobs_of(walk, [sid for sid, _ in todo]):
        if dst.index.has(key[1], key[0]):
            report.blobs_present += 1
        else:
            needed.add(key)
    # Packs all of whose blobs are needed are copied as files; the rest blob by blob.
    dst_listed = {bytes.fromhex(n) for n, _ in dst.backend.list("data")}
    pack_blobs: dict[bytes, list[PackedBlob]] = defaultdict(list)
    partly: set[bytes] = set()
    if needed:
        for loc in src.index.iter_blobs():
            if loc.pack_id not in src_listed or loc.pack_id in partly:
                continue
            if (loc.blob_type, loc.blob_id) not in needed:
                partly.add(loc.pack_id)
                pack_blobs.pop(loc.pack_id, None)
                continue
            pack_blobs[loc.pack_id].append(
                PackedBlob(
                    loc.blob_type, loc.offset, loc.length, loc.uncompressed_length, loc.blob_id
                )
            )
    whole: dict[bytes, list[PackedBlob]] = {}
    there: dict[bytes, list[PackedBlob]] = {}  # whole packs the target has but does not index
    for pack, blobs in sorted(pack_blobs.items(), key=lambda item: -len(item[1])):
        if not any((b.blob_type, b.id) in needed for b in blobs):
            continue
        # Pack files are named by their content: one the target has (a copy interrupted before its
        # index was written) is this very pack and only needs indexing.
        (there if pack in dst_listed else whole)[pack] = blobs
        needed.difference_update((b.blob_type, b.id) for b in blobs)
    by_pack: dict[bytes, list[BlobLocation]] = defaultdict(list)
    for key in needed:
        loc = locations(key)[0]
        by_pack[loc.pack_id].append(loc)
    for locs in by_pack.values():
        locs.sort(key=lambda loc: loc.offset)
    report.packs_copied = sorted(p.hex() for p in whole)
    report.blobs_copied = len(needed) + sum(len(b) for b in whole.values())
    if dry_run:
        report.snapshots_copied = [sid for sid, _ in todo]
        report.bytes_copied = sum(loc.length for locs in by_pack.values() for loc in locs)
        report.bytes_copied += sum(src_listed[p] for p in whole)
        return report

    if on_stage is not None:
        on_stage("copying packs", sum(src_listed.get(p, 0) for p in whole), "bytes")

    def copy_pack(pack: bytes) -> int:
        size = copy_file(src.backend, dst.backend, "data", pack.hex())
        if on_advance is not None:
            on_advance(size)
        return size

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        report.bytes_copied += sum(pool.map(copy_pack, whole))
    copied = copy_blobs(
        src, dst, by_pack, workers=workers, on_stage=on_stage, on_advance=on_advance
    )
    report.packs_written = sorted(p.hex() for p, _ in copied.packs)
    report.bytes_copied += copied.bytes_written
    entries = {**whole, **there}
    entries.update(copied.packs)
    report.index_files_written = write_index(dst, entries)
    if on_stage is not None:
        on_stage("copying snapshots", len(todo), "snapshots")
    for sid, _snap in todo:
        copy_file(src.backend, dst.backend, "snapshots", sid)
        report.snapshots_copied.append(sid)
        if on_advance is not None:
            on_advance(1)
    dst.load_index()

    def pack_of(key: BlobKey) -> bytes:
        loc = dst.index.lookup(key[1], key[0])
        if loc is None:  # cannot happen: every needed blob was copied or was there
            raise IntegrityError(f"blob {key[1].hex()} is missing from {dst.backend} after copying")
        return loc.pack_id

    report.packindex_written = write_packindexes(dst, walk, [sid for sid, _ in todo], pack_of)
    return report


def _blobs_of(walk: Walk, snapshot_ids: list[str]) -> set[BlobKey]:
    """The blobs below some of the walked snapshots (all of them when they are all there is)."""
    if len(snapshot_ids) == len(walk.roots):
        return set(walk.blobs())
    out: set[BlobKey] = set()
    for sid in snapshot_ids:
        out.update(walk.below(walk.roots[sid]))
    return out


def copy_file(src: Backend, dst: Backend, kind: str, name: str) -> int:
    """Copy one content-addressed file, checking its hash on the way. Returns its size."""
    data = src.read(kind, name)
    if hashlib.sha256(data).hexdigest() != name:
        raise IntegrityError(
            f"{kind}/{name} in {src} is corrupt (its hash does not match its name); nothing was "
            "copied from it. Run `vault deep-verify` on that vault"
        )
    dst.write(kind, name, data)
    return len(data)


@dataclass
class SplitReport:
    target: str
    created: bool
    dry_run: bool
    copy: CopyReport
    moved: bool = False
    forget: ForgetReport | None = None
    prune: PruneReport | None = None
    seconds: float = 0.0


def split(
    src: Repository,
    target: Backend,
    password: bytes,
    snapshots: Sequence[tuple[str, Snapshot]],
    *,
    move: bool = False,
    dry_run: bool = False,
    prune_options: Mapping[str, Any] | None = None,
    workers: int = DEFAULT_WORKERS,
    on_stage: StageCallback | None = None,
    on_advance: AdvanceCallback | None = None,
) -> SplitReport:
    """Copy ``snapshots`` of ``src`` into the vault at ``target`` (created with ``password`` and
    ``src``'s master key and polynomial, or continued when it exists with them). With ``move``, then
    forget them in ``src`` and prune it (``prune_options`` are prune's keyword arguments, such as
    ``max_unused``).

    The caller holds a lock on ``src``: exclusive with ``move``, shared otherwise. Raises UsageError
    for an empty selection, VaultError when another vault is at ``target``, MissingData when a selected
    snapshot is damaged (nothing is copied or deleted then)."""
    started = time.monotonic()
    if not snapshots:
        raise UsageError(
            "no snapshot matches the selection, nothing to split off (if an earlier `split "
            "--move` was interrupted after forgetting them, run `vault prune` to finish it)"
        )
    src.load_index()
    # Before the target is created: a damaged selection must not leave an empty vault behind.
    walk = walk_checked(src, snapshots, workers=workers, on_stage=on_stage, on_advance=on_advance)
    if dry_run and not target.exists("config", ""):
        # An empty stand-in: a dry run must not create the target.
        dst, created = Repository(target, src.key, src.config), True
    else:
        dst, created = open_target(src, target, password)
    report = SplitReport(str(target), created, dry_run, CopyReport())
    with dst.lock(exclusive=False) if not dry_run else contextlib.nullcontext():
        report.copy = copy_snapshots(
            src,
            dst,
            snapshots,
            walk=walk,
            dry_run=dry_run,
            workers=workers,
            on_stage=on_stage,
            on_advance=on_advance,
        )
    if move:
        report.moved = not dry_run
        report.forget = forget(src, snapshot_ids=[sid for sid, _ in snapshots], dry_run=dry_run)
        report.prune = prune(
            src,
            **dict(prune_options or {}),
            dry_run=dry_run,
            forgotten=report.forget.removed if dry_run else (),
            workers=workers,
            on_stage=on_stage,
            on_advance=on_advance,
        )
    report.seconds = time.monotonic() - started
    return report


__all__ = [
    "CopyReport",
    "SplitReport",
    "check_compatible",
    "copy_file",
    "copy_snapshots",
    "open_target",
    "same_key",
    "split",
    "walk_checked",
]
