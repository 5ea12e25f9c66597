"""Prune: delete the data no snapshot needs any more, repack partly used packs, keep the vault valid.

What happens, in this order (the caller holds the vault's exclusive lock):

1. **Load** every index file (an unreadable one stops prune: its packs would look unused), list data/,
   read every snapshot (an unreadable snapshot stops prune: what it needs is unknown) and the packindex
   files.
2. **Walk** the trees of the snapshots that need it (see "packindex" below) and collect the tree and data
   blobs they use. Every used blob must have a copy in a pack that exists; otherwise prune refuses and
   names each snapshot and the blob it misses ("snapshot S depends on missing data blob B"), before
   anything is written or deleted.
3. **Plan**. A blob in several packs uses the copy in the pack that is kept anyway, else in the fullest
   pack. A pack none of whose blobs is used is deleted; a pack whose unused share (by stored blob bytes)
   is above ``max_unused`` percent is repacked: its used blobs are copied into new packs. Packs in data/
   that no index names are leftovers of interrupted jobs and are deleted; index entries of packs that are
   gone from data/ are dropped.
4. **Write** the new packs (every copied blob is decrypted and hash-checked on the way; the stored bytes
   are copied as they are), then index files for the new packs and for the surviving packs of every index
   file that named a pack going away, then the packindex files of the walked snapshots.
5. **Delete** obsolete packindex files, then the old index files, then the packs.

So a kill -9 at any point leaves a valid vault: before step 5 nothing is deleted (new packs are either not
indexed yet, or indexed twice, both harmless); old index files go only when the new ones are written;
packs go only when no index names them. Running prune again finishes the job.

packindex (vaultfs/ops/packindex.py): a kept snapshot with a valid packindex file (its packs all exist)
need not be walked when none of its packs can have changed: prune treats the packs named by valid files
as in use, except the packs that forgotten snapshots used (their packindex files are now stale), which may
have become partly unused. Only snapshots without a valid file, or whose packs overlap those, are walked;
the rest is trusted to the packindex. ``use_packindex=False`` walks everything. A pack that only became
partly unused without a snapshot being forgotten (a crash, an earlier prune with a higher
``max_unused``) is therefore only repacked by a full walk.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from vaultfs.errors import FormatError, IntegrityError, ObjectNotFound, VaultError
from vaultfs.format.index import IndexFile, decode_columns
from vaultfs.format.pack import DATA, TREE, TYPE_NAMES, PackedBlob
from vaultfs.format.snapshot import Snapshot
from vaultfs.ops import packindex
from vaultfs.repo.masterindex import BlobLocation, MasterIndex
from vaultfs.repo.packer import PackWriter
from vaultfs.repo.repository import INDEX_FLUSH_BLOBS, Repository

StageCallback = Callable[[str, "int | None", str], None]
AdvanceCallback = Callable[[int], None]

DEFAULT_MAX_UNUSED = 5.0
DEFAULT_WORKERS = 4
#: Blobs of one pack closer than this are read with one request when repacking.
MERGE_GAP = 256 * 1024
#: How many damaged snapshots a refusal message names before "and N more".
SHOW_MISSING = 5

BlobKey = tuple[int, bytes]  # (blob type, blob id)


# -- walking snapshots ----------------------------------------------------------------------------


@dataclass
class Walk:
    """The tree graph below some snapshots: what each tree holds, and which trees could not be read."""

    roots: dict[str, bytes] = field(default_factory=dict)
    #: tree id -> (subtree ids, data blob ids of its files)
    trees: dict[bytes, tuple[tuple[bytes, ...], tuple[bytes, ...]]] = field(default_factory=dict)
    #: tree id -> why it could not be read
    bad_trees: dict[bytes, str] = field(default_factory=dict)
    #: every data blob id named (one bytes object per id, shared by the tuples above)
    data: dict[bytes, bytes] = field(default_factory=dict)

    def blobs(self) -> Iterator[BlobKey]:
        """Every blob the walked snapshots need: readable and unreadable trees, and data."""
        for tree in self.trees:
            yield TREE, tree
        for tree in self.bad_trees:
            yield TREE, tree
        for blob in self.data:
            yield DATA, blob

    def below(self, root: bytes) -> Iterator[BlobKey]:
        """Every blob below one root tree (the tree itself included), each once."""
        seen = {root}
        stack = [root]
        while stack:
            tree = stack.pop()
            yield TREE, tree
            subs, blobs = self.trees.get(tree, ((), ()))
            for blob in blobs:
                yield DATA, blob
            for sub in subs:
                if sub not in seen:
                    seen.add(sub)
                    stack.append(sub)


Links = tuple[tuple[bytes, ...], tuple[bytes, ...]]  # (subtree ids, data blob ids) of one tree


def tree_links(plain: bytes, what: str) -> Links:
    """The subtrees and data blobs a tree names. Only those fields are decoded: a walk that needs
    nothing else is several times faster than building every node. Raises FormatError."""
    subs, blobs = [], []
    try:
        for node in json.loads(plain)["nodes"] or ():
            if node.get("type") == "dir" and node.get("subtree"):
                subs.append(_blob_id(node["subtree"]))
            for blob in node.get("content") or ():
                blobs.append(_blob_id(blob))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FormatError(f"{what} is not a valid tree ({exc})") from None
    return tuple(subs), tuple(blobs)


def _blob_id(text: str) -> bytes:
    raw = bytes.fromhex(text)
    if len(raw) != 32:
        raise ValueError(f"ID {text!r} has the wrong length")
    return raw


def walk_snapshots(
    repo: Repository,
    snapshots: Iterable[tuple[str, Snapshot]],
    *,
    workers: int = DEFAULT_WORKERS,
    on_advance: AdvanceCallback | None = None,
) -> Walk:
    """Read every tree below the snapshots once, level by level with ``workers`` threads; the trees of
    one level that sit close together in a pack are fetched with one read. A tree that cannot be read
    lands in ``bad_trees``; nothing is raised for damage. The index must be loaded."""
    walk = Walk()
    frontier: list[bytes] = []
    for sid, snap in snapshots:
        walk.roots[sid] = snap.tree
        if snap.tree not in walk.trees and snap.tree not in frontier:
            frontier.append(snap.tree)
    seen = set(frontier)

    def slow(tree: bytes) -> Links | str:
        """One tree on its own, trying every copy the index knows."""
        try:
            return tree_links(repo.load_blob(TREE, tree), f"tree {tree.hex()}")
        except VaultError as exc:
            return str(exc)

    def load(run: list[BlobLocation]) -> list[tuple[bytes, Links | str]]:
        start = run[0].offset
        try:
            raw = repo.backend.read(
                "data", run[0].pack_id.hex(), start, run[-1].offset + run[-1].length - start
            )
        except VaultError:
            return [(loc.blob_id, slow(loc.blob_id)) for loc in run]
        view = memoryview(raw)
        out: list[tuple[bytes, Links | str]] = []
        for loc in run:
            try:
                plain = repo.decode_blob(
                    loc, view[loc.offset - start : loc.offset - start + loc.length]
                )
                out.append((loc.blob_id, tree_links(plain, f"tree {loc.blob_id.hex()}")))
            except VaultError:
                out.append((loc.blob_id, slow(loc.blob_id)))
        return out

    interned = walk.data
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        while frontier:
            by_pack: dict[bytes, list[BlobLocation]] = defaultdict(list)
            for tree in frontier:
                loc = repo.index.lookup(tree, TREE)
                if loc is None:
                    walk.bad_trees[tree] = f"tree {tree.hex()} is not in the index"
                else:
                    by_pack[loc.pack_id].append(loc)
            runs = [
                run
                for locs in by_pack.values()
                for run in _ranges(sorted(locs, key=lambda loc: loc.offset))
            ]
            following: list[bytes] = []
            for results in pool.map(load, runs):
                for tree, result in results:
                    if isinstance(result, str):
                        walk.bad_trees[tree] = result
                        continue
                    subs, blobs = result
                    # One bytes object per blob id: the graph of a big vault names each many times.
                    blobs = tuple(interned.setdefault(b, b) for b in blobs)
                    walk.trees[tree] = (subs, blobs)
                    for sub in subs:
                        if sub not in seen:
                            seen.add(sub)
                            following.append(sub)
            if on_advance is not None:
                on_advance(len(frontier))
            frontier = following
    return walk


@dataclass(frozen=True)
class MissingBlob:
    snapshot: str
    blob_type: str
    blob_id: str
    reason: str = ""


class MissingData(IntegrityError):
    """Kept snapshots depend on blobs the vault does not have: nothing may be deleted."""

    def __init__(self, message: str, missing: list[MissingBlob]) -> None:
        super().__init__(message)
        self.missing = missing


def missing_blobs(walk: Walk, present: Callable[[BlobKey], bool]) -> list[MissingBlob]:
    """(snapshot, blob) for every blob a walked snapshot needs that ``present`` denies or whose tree
    could not be read, snapshots in walk order."""
    absent: dict[BlobKey, str] = {}
    for key in walk.blobs():
        if key[1] in walk.bad_trees and key[0] == TREE:
            absent[key] = walk.bad_trees[key[1]]
        elif not present(key):
            absent[key] = "not in any pack of the vault"
    if not absent:
        return []
    out = []
    for sid, root in walk.roots.items():
        for key in walk.below(root):
            if key in absent:
                out.append(MissingBlob(sid, TYPE_NAMES[key[0]], key[1].hex(), absent[key]))
    return out


def refuse_missing(missing: list[MissingBlob], what: str) -> None:
    """Raise MissingData naming every damaged snapshot (the first few in the message) with the first
    blob it misses, when there are any."""
    if not missing:
        return
    by_snapshot: dict[str, list[MissingBlob]] = {}
    for m in missing:
        by_snapshot.setdefault(m.snapshot, []).append(m)
    parts = []
    for sid, blobs in list(by_snapshot.items())[:SHOW_MISSING]:
        first = blobs[0]
        more = f" (and {len(blobs) - 1} more blobs)" if len(blobs) > 1 else ""
        parts.append(
            f"snapshot {sid[:8]} depends on missing {first.blob_type} blob {first.blob_id}{more}"
        )
    if len(by_snapshot) > SHOW_MISSING:
        parts.append(f"and {len(by_snapshot) - SHOW_MISSING} more snapshots")
    raise MissingData(
        f"refusing to {what}: {'; '.join(parts)}; nothing was deleted. Run `vault deep-verify` to "
        "see the damage, then `vault repair` (or forget the damaged snapshots)",
        missing,
    )


# -- loading --------------------------------------------------------------------------------------


@dataclass
class VaultState:
    """What prune reads before deciding: the index (with the packs of each index file), data/, the
    snapshots and the packindex files."""

    index: MasterIndex
    index_files: dict[str, list[bytes]]
    listed: dict[bytes, int]  # pack id -> file size
    snapshots: list[tuple[str, Snapshot]]
    packindexes: packindex.PackIndexes

    @property
    def present(self) -> set[bytes]:
        """Packs that are both indexed and in data/."""
        return self.index.pack_ids() & self.listed.keys()


def load_state(repo: Repository, workers: int = DEFAULT_WORKERS) -> VaultState:
    """Read everything prune decides on; installs the loaded index as ``repo.index``. Raises
    IntegrityError when an index or snapshot file cannot be read."""
    names = [n for n, _ in repo.backend.list("index")]

    def load(name: str):  # noqa: ANN202 - IndexColumns or the error
        try:
            return decode_columns(repo.load_unpacked("index", name), f"index/{name}")
        except VaultError as exc:
            return exc

    index = MasterIndex()
    files: dict[str, list[bytes]] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for name, cols in zip(names, pool.map(load, names), strict=True):
            if isinstance(cols, VaultError):
                raise IntegrityError(
                    f"refusing to prune: {cols}; the packs it lists would look unused. Run "
                    "`vault rebuild-indexes` first"
                )
            index.add_arrays(*cols)
            files[name] = list(cols.pack_ids)
    repo.index = index
    repo.index_loaded = True
    listed = {bytes.fromhex(n): size for n, size in repo.backend.list("data")}
    # A listing can miss a file (eventually consistent stores): confirm before treating a pack as gone.
    for pack in index.pack_ids() - listed.keys():
        try:
            listed[pack] = repo.backend.stat("data", pack.hex())
        except ObjectNotFound:
            pass

    def unreadable(exc: VaultError) -> None:
        raise IntegrityError(
            f"refusing to prune: {exc}; what that snapshot needs is unknown. Repair or remove it "
            "first (`vault repair`)"
        )

    snaps = repo.list_snapshots(on_error=unreadable)
    return VaultState(index, files, listed, snaps, packindex.load_all(repo))


# -- planning -------------------------------------------------------------------------------------


@dataclass
class PrunePlan:
    """What prune will do. Packs are ids; sizes are bytes."""

    walked: list[str]
    trusted: list[str]  # kept snapshots whose valid packindex spared the walk
    stable: set[bytes]  # packs in use that are not looked at blob by blob
    chosen: dict[BlobKey, BlobLocation]  # the copy used of each walked blob
    delete: set[bytes]  # indexed packs with nothing in use
    repack: dict[bytes, list[BlobLocation]]  # pack -> its used blobs to copy
    unindexed: set[bytes]  # packs in data/ that no index names
    gone: set[bytes]  # indexed packs missing from data/
    used_bytes: int
    unused_bytes: int
    repack_bytes: int  # used blob bytes that will be copied
    unused_after: int


def _scan_index(
    index: MasterIndex, present: set[bytes], wanted: set[BlobKey]
) -> tuple[dict[bytes, int], dict[BlobKey, list[BlobLocation]]]:
    """One pass over the index: stored bytes per pack, and the copies in present packs of the
    wanted blobs (cheaper than a lookup per blob)."""
    totals: dict[bytes, int] = defaultdict(int)
    copies: dict[BlobKey, list[BlobLocation]] = {}
    for loc in index.iter_blobs():
        totals[loc.pack_id] += loc.length
        key = (loc.blob_type, loc.blob_id)
        if key in wanted and loc.pack_id in present:
            copies.setdefault(key, []).append(loc)
    return totals, copies


def plan(
    repo: Repository,
    state: VaultState,
    *,
    max_unused: float | None = DEFAULT_MAX_UNUSED,
    max_repack_bytes: int | None = None,
    use_packindex: bool = True,
    workers: int = DEFAULT_WORKERS,
    on_stage: StageCallback | None = None,
    on_advance: AdvanceCallback | None = None,
) -> tuple[PrunePlan, Walk]:
    """Decide what to delete and repack (see the module docstring). Raises MissingData when a kept
    snapshot depends on a missing blob."""
    present = state.present
    kept_ids = {sid for sid, _ in state.snapshots}
    valid = state.packindexes.for_snapshots(kept_ids, present) if use_packindex else {}
    forgotten: set[bytes] = set()
    for f in state.packindexes.files:
        if f.snapshot not in kept_ids:
            forgotten |= f.packs
    named = set().union(*(f.packs for f in valid.values())) if valid else set()
    # Without repacking, pack-level knowledge is enough: a pack a valid packindex names is in use.
    stable = named if max_unused is None else named - forgotten
    candidates = present - stable
    walk_list = [
        (sid, snap)
        for sid, snap in state.snapshots
        if sid not in valid or (max_unused is not None and valid[sid].packs & candidates)
    ]
    walked = {sid for sid, _ in walk_list}
    if on_stage is not None:
        on_stage("reading trees", None, "trees")
    walk = walk_snapshots(repo, walk_list, workers=workers, on_advance=on_advance)
    totals, copies = _scan_index(state.index, present, set(walk.blobs()))
    refuse_missing(missing_blobs(walk, copies.__contains__), "prune")

    # Copies: the one in a pack that stays anyway, else in the pack with most used bytes per byte.
    in_use: dict[bytes, int] = defaultdict(int)
    several: list[tuple[BlobKey, list[BlobLocation]]] = []
    chosen: dict[BlobKey, BlobLocation] = {}
    for key, locs in copies.items():
        for loc in locs:
            in_use[loc.pack_id] += loc.length
        if len(locs) == 1:
            chosen[key] = locs[0]
        else:
            several.append((key, locs))
    for key, locs in several:
        chosen[key] = max(
            locs,
            key=lambda loc: (
                loc.pack_id in stable,
                in_use[loc.pack_id] / max(1, totals[loc.pack_id]),
                loc.pack_id,
            ),
        )
    used: dict[bytes, int] = defaultdict(int)
    by_pack: dict[bytes, list[BlobLocation]] = defaultdict(list)
    for loc in chosen.values():
        used[loc.pack_id] += loc.length
        if loc.pack_id not in stable:
            by_pack[loc.pack_id].append(loc)
    delete = {p for p in candidates if not used.get(p)}
    repack: dict[bytes, list[BlobLocation]] = {}
    if max_unused is not None:
        shares = []
        for pack in candidates - delete:
            unused_share = 100.0 * (totals[pack] - used[pack]) / max(1, totals[pack])
            if unused_share > max_unused:
                shares.append((unused_share, pack))
        budget = max_repack_bytes
        for _share, pack in sorted(shares, reverse=True):
            if budget is not None:
                if used[pack] > budget:
                    continue
                budget -= used[pack]
            repack[pack] = sorted(by_pack[pack], key=lambda loc: loc.offset)
    # Packs trusted to packindex files count as wholly used: their blob-level use was not looked at.
    used_total = sum(n for p, n in used.items() if p not in stable)
    used_total += sum(totals[p] for p in stable)
    all_total = sum(totals[p] for p in present)
    kept_total = sum(totals[p] for p in present - delete - repack.keys())
    repack_bytes = sum(used[p] for p in repack)
    result = PrunePlan(
        walked=[sid for sid, _ in state.snapshots if sid in walked],
        trusted=[sid for sid, _ in state.snapshots if sid not in walked],
        stable=stable,
        chosen=chosen,
        delete=delete,
        repack=repack,
        unindexed=set(state.listed) - state.index.pack_ids(),
        gone=state.index.pack_ids() - state.listed.keys(),
        used_bytes=used_total,
        unused_bytes=all_total - used_total,
        repack_bytes=repack_bytes,
        unused_after=max(0, kept_total + repack_bytes - used_total),
    )
    return result, walk


# -- doing ----------------------------------------------------------------------------------------


@dataclass
class PruneReport:
    dry_run: bool
    snapshots: int = 0
    snapshots_walked: int = 0
    snapshots_trusted: int = 0  # spared the walk by a valid packindex file
    packs_before: int = 0
    packs_deleted: list[str] = field(default_factory=list)
    packs_repacked: list[str] = field(default_factory=list)
    packs_unindexed_deleted: list[str] = field(default_factory=list)
    packs_written: list[str] = field(default_factory=list)
    index_entries_dropped: list[str] = field(default_factory=list)  # packs gone from data/
    bytes_before: int = 0  # size of all packs in data/
    bytes_deleted: int = 0  # size of every pack file removed
    bytes_written: int = 0  # size of the new packs
    used_bytes: int = 0  # stored bytes of the blobs in use
    unused_bytes_before: int = 0
    unused_bytes_after: int = 0
    blobs_repacked: int = 0
    index_files_written: list[str] = field(default_factory=list)
    index_files_removed: list[str] = field(default_factory=list)
    packindex_written: list[str] = field(default_factory=list)
    packindex_removed: list[str] = field(default_factory=list)
    seconds: float = 0.0


def prune(
    repo: Repository,
    *,
    max_unused: float | None = DEFAULT_MAX_UNUSED,
    max_repack_bytes: int | None = None,
    dry_run: bool = False,
    use_packindex: bool = True,
    forgotten: Collection[str] = (),
    workers: int = DEFAULT_WORKERS,
    on_stage: StageCallback | None = None,
    on_advance: AdvanceCallback | None = None,
    confirm_lock: Callable[[], object] | None = None,
) -> PruneReport:
    """Prune the vault (see the module docstring). ``max_unused`` is the percentage of unused bytes a
    pack may hold before it is repacked (None: never repack, only delete packs wholly unused);
    ``max_repack_bytes`` caps the bytes copied. Snapshots in ``forgotten`` count as gone (what a dry
    run after a dry-run forget needs; only allowed with ``dry_run``).

    The caller must hold the exclusive lock. A lock taken with ``LockManager.acquire_unconfirmed``
    is passed as ``confirm_lock`` (its ``confirm``): prune reads and plans while the lock's second check
    runs and calls it before it writes or deletes anything (a dry run: before it returns). Raises MissingData (an IntegrityError) when a kept snapshot
    depends on a missing blob, IntegrityError when an index or snapshot file is unreadable or a blob to
    be copied is damaged in every copy, and BackendError when the storage fails; in every case the vault
    is left valid. Never prints; ``on_stage``/``on_advance`` report progress.
    """
    started = time.monotonic()
    if max_unused is not None and not 0 <= max_unused <= 100:
        raise ValueError("max_unused is a percentage between 0 and 100")
    if forgotten and not dry_run:
        raise ValueError("forgotten snapshots can only be assumed in a dry run")
    if on_stage is not None:
        on_stage("loading index", None, "items")
    state = load_state(repo, workers)
    state.snapshots = [(sid, snap) for sid, snap in state.snapshots if sid not in forgotten]
    the_plan, walk = plan(
        repo,
        state,
        max_unused=max_unused,
        max_repack_bytes=max_repack_bytes,
        use_packindex=use_packindex,
        workers=workers,
        on_stage=on_stage,
        on_advance=on_advance,
    )
    report = PruneReport(
        dry_run,
        snapshots=len(state.snapshots),
        snapshots_walked=len(the_plan.walked),
        snapshots_trusted=len(the_plan.trusted),
        packs_before=len(state.listed),
        packs_deleted=sorted(p.hex() for p in the_plan.delete),
        packs_repacked=sorted(p.hex() for p in the_plan.repack),
        packs_unindexed_deleted=sorted(p.hex() for p in the_plan.unindexed),
        index_entries_dropped=sorted(p.hex() for p in the_plan.gone),
        bytes_before=sum(state.listed.values()),
        used_bytes=the_plan.used_bytes,
        unused_bytes_before=the_plan.unused_bytes,
        unused_bytes_after=the_plan.unused_after,
        blobs_repacked=sum(len(v) for v in the_plan.repack.values()),
    )
    doomed = the_plan.delete | the_plan.repack.keys() | the_plan.unindexed
    report.bytes_deleted = sum(state.listed.get(p, 0) for p in doomed)
    if confirm_lock is not None:
        confirm_lock()  # raises VaultLocked when another job holds the vault: nothing written yet
    if dry_run:
        report.bytes_written = the_plan.repack_bytes
        report.seconds = time.monotonic() - started
        return report

    copied = copy_blobs(
        repo,
        repo,
        the_plan.repack,
        workers=workers,
        on_stage=on_stage,
        on_advance=on_advance,
        stage="repacking",
    )
    report.packs_written = sorted(p.hex() for p, _ in copied.packs)
    report.bytes_written = copied.bytes_written
    removed_packs = the_plan.delete | the_plan.repack.keys() | the_plan.gone
    if on_stage is not None:
        on_stage("writing index", None, "files")
    report.index_files_written, obsolete_index = rewrite_index(
        repo, state, removed_packs, copied.packs
    )
    if on_stage is not None:
        on_stage("writing packindex", None, "files")

    def final_pack(key: BlobKey) -> bytes:
        return copied.moved.get(key) or the_plan.chosen[key].pack_id

    keep_names = set(
        write_packindexes(repo, walk, the_plan.walked, final_pack, state.packindexes.files)
    )
    report.packindex_written = sorted(keep_names - {f.name for f in state.packindexes.files})
    trusted_files = state.packindexes.for_snapshots(the_plan.trusted, state.present)
    keep_names |= {f.name for f in trusted_files.values()}
    stale = [f.name for f in state.packindexes.files if f.name not in keep_names]
    stale += state.packindexes.damaged
    if on_stage is not None:
        on_stage("deleting", len(stale) + len(obsolete_index) + len(doomed), "files")
    # Order matters for a crash: packindex files naming doomed packs, then the index files that
    # name them, then the packs themselves.
    for name in stale:
        repo.backend.remove("packindex", name)
        _tick(on_advance)
    report.packindex_removed = sorted(stale)
    for name in obsolete_index:
        repo.backend.remove("index", name)
        _tick(on_advance)
    report.index_files_removed = sorted(obsolete_index)
    _remove_packs(repo, doomed, workers, on_advance)
    repo.load_index()
    report.seconds = time.monotonic() - started
    return report


def _tick(on_advance: AdvanceCallback | None) -> None:
    if on_advance is not None:
        on_advance(1)


def _remove_packs(
    repo: Repository, packs: Iterable[bytes], workers: int, on_advance: AdvanceCallback | None
) -> None:
    def remove(pack: bytes) -> None:
        repo.backend.remove("data", pack.hex())
        _tick(on_advance)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(remove, sorted(packs)))


def _ranges(locs: Sequence[BlobLocation], gap: int = MERGE_GAP) -> Iterator[list[BlobLocation]]:
    """Runs of blobs (sorted by offset) close enough to be read with one request."""
    run: list[BlobLocation] = []
    for loc in locs:
        if run and loc.offset - (run[-1].offset + run[-1].length) > gap:
            yield run
            run = []
        run.append(loc)
    if run:
        yield run


@dataclass
class Copied:
    """What copy_blobs wrote: the new packs with their header entries (not indexed yet), where each
    copied blob went, and the bytes written."""

    packs: list[tuple[bytes, list[PackedBlob]]]
    moved: dict[BlobKey, bytes]
    bytes_written: int


def copy_blobs(
    src: Repository,
    dst: Repository,
    packs: dict[bytes, list[BlobLocation]],
    *,
    workers: int = DEFAULT_WORKERS,
    on_stage: StageCallback | None = None,
    on_advance: AdvanceCallback | None = None,
    stage: str = "copying blobs",
) -> Copied:
    """Copy the given blobs of ``src``'s packs into new packs of ``dst`` (the same vault, or one with
    the same master key): each blob is read, decrypted and hash-checked, and its stored bytes are
    written unchanged. A damaged blob is taken from another copy in ``src`` if there is one, else
    IntegrityError is raised (the packs written so far are then unindexed leftovers, harmless). The
    caller writes the index of the new packs."""
    written: list[tuple[bytes, list[PackedBlob]]] = []
    moved: dict[BlobKey, bytes] = {}
    lock = threading.Lock()

    def on_pack(pack_id: bytes, blobs: list[PackedBlob]) -> None:
        with lock:
            written.append((pack_id, list(blobs)))
            for b in blobs:
                moved[(b.blob_type, b.id)] = pack_id

    writer = PackWriter(dst.backend, dst.key, on_pack, dst.pack_size)
    total = sum(loc.length for locs in packs.values() for loc in locs)
    if on_stage is not None:
        on_stage(stage, total, "bytes")

    def one(pack: bytes) -> None:
        for run in _ranges(packs[pack]):
            start = run[0].offset
            raw = src.backend.read(
                "data", pack.hex(), start, run[-1].offset + run[-1].length - start
            )
            view = memoryview(raw)
            for loc in run:
                sealed = view[loc.offset - start : loc.offset - start + loc.length]
                try:
                    src.decode_blob(loc, sealed)
                except VaultError:
                    loc, sealed = _other_copy(src, loc)
                writer.add(loc.blob_type, loc.blob_id, bytes(sealed), loc.uncompressed_length)
                if on_advance is not None:
                    on_advance(loc.length)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for future in [pool.submit(one, pack) for pack in packs]:
            future.result()
    writer.flush()
    return Copied(written, moved, writer.bytes_written)


def _other_copy(repo: Repository, bad: BlobLocation) -> tuple[BlobLocation, bytes]:
    for loc in repo.index.lookup_all(bad.blob_id, bad.blob_type):
        if loc.pack_id == bad.pack_id:
            continue
        try:
            sealed = repo.backend.read("data", loc.pack_id.hex(), loc.offset, loc.length)
            repo.decode_blob(loc, sealed)
            return loc, sealed
        except VaultError:
            continue
    raise IntegrityError(
        f"{TYPE_NAMES[bad.blob_type]} blob {bad.blob_id.hex()} in pack {bad.pack_id.hex()} is "
        "damaged and the vault has no other copy; nothing was deleted. Run `vault deep-verify` "
        "and `vault repair`"
    )


def rewrite_index(
    repo: Repository,
    state: VaultState,
    removed: set[bytes],
    new_packs: list[tuple[bytes, list[PackedBlob]]],
) -> tuple[list[str], list[str]]:
    """Write index files for the new packs and for the packs that stay of every index file naming a
    removed pack. Returns (written, obsolete) index file names; the caller removes the obsolete ones."""
    obsolete = [name for name, packs in state.index_files.items() if removed.intersection(packs)]
    covered: set[bytes] = set()
    for name, packs in state.index_files.items():
        if name not in obsolete:
            covered.update(packs)
    carry = {
        p
        for name in obsolete
        for p in state.index_files[name]
        if p not in removed and p not in covered
    }
    entries: dict[bytes, list[PackedBlob]] = defaultdict(list)
    if carry:
        for loc in state.index.iter_blobs():
            if loc.pack_id in carry:
                entries[loc.pack_id].append(
                    PackedBlob(
                        loc.blob_type, loc.offset, loc.length, loc.uncompressed_length, loc.blob_id
                    )
                )
        for pack in carry:
            entries.setdefault(pack, [])
    for pack, blobs in new_packs:
        entries[pack] = blobs
    written = write_index(repo, entries)
    return written, [n for n in obsolete if n not in written]


def write_index(repo: Repository, packs: dict[bytes, list[PackedBlob]]) -> list[str]:
    """Index files for these packs (at most INDEX_FLUSH_BLOBS blobs each); returns their names."""
    written = []
    current, count = IndexFile(), 0
    for pack, blobs in packs.items():
        current.packs[pack] = sorted(blobs, key=lambda b: b.offset)
        count += len(blobs)
        if count >= INDEX_FLUSH_BLOBS:
            written.append(repo.save_unpacked("index", current.encode()))
            current, count = IndexFile(), 0
    if current.packs:
        written.append(repo.save_unpacked("index", current.encode()))
    return written


def pack_sets(
    walk: Walk, snapshot_ids: Iterable[str], pack_of: Callable[[BlobKey], bytes]
) -> dict[str, frozenset[bytes]]:
    """The packs each walked snapshot needs, given where each blob lives. Subtrees shared between
    snapshots are computed once; equal sets are stored once."""
    memo: dict[bytes, frozenset[bytes]] = {}
    canon: dict[frozenset[bytes], frozenset[bytes]] = {}
    out = {}
    for sid in snapshot_ids:
        root = walk.roots[sid]
        stack: list[tuple[bytes, bool]] = [(root, False)]
        while stack:
            tree, expanded = stack.pop()
            if tree in memo:
                continue
            subs, blobs = walk.trees[tree]
            if not expanded:
                stack.append((tree, True))
                stack.extend((s, False) for s in subs if s not in memo)
                continue
            packs = {pack_of((TREE, tree))}
            packs.update(pack_of((DATA, b)) for b in blobs)
            for sub in subs:
                packs |= memo[sub]
            frozen = frozenset(packs)
            memo[tree] = canon.setdefault(frozen, frozen)
        out[sid] = memo[root]
    return out


def write_packindexes(
    repo: Repository,
    walk: Walk,
    snapshot_ids: Iterable[str],
    pack_of: Callable[[BlobKey], bytes],
    existing: Iterable[packindex.PackIndexFile] = (),
) -> list[str]:
    """Make sure each walked snapshot has a packindex file naming the packs it needs: an ``existing``
    file that says exactly that is kept, otherwise a new one is written. Returns the file names."""
    have = {(f.snapshot, f.packs): f.name for f in existing}
    names = []
    for sid, packs in pack_sets(walk, snapshot_ids, pack_of).items():
        name = have.get((sid, packs))
        names.append(name if name is not None else packindex.write(repo, sid, packs))
    return names


__all__ = [
    "DEFAULT_MAX_UNUSED",
    "Copied",
    "MissingBlob",
    "MissingData",
    "PrunePlan",
    "PruneReport",
    "VaultState",
    "Walk",
    "copy_blobs",
    "load_state",
    "missing_blobs",
    "pack_sets",
    "plan",
    "prune",
    "refuse_missing",
    "rewrite_index",
    "walk_snapshots",
    "write_index",
    "write_packindexes",
]
