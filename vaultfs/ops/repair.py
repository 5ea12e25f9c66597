"""Repair a damaged vault: the recovery Comet's documentation describes by hand, automated.

One run does, in this order (each step only when needed):

1. removes locks left by dead processes on this host (a killed job; they would block restic);
2. with ``rollback_to``: moves away every file of data/, index/, snapshots/ and packindex/ written
   after that time (recovery "by modification date", e.g. after ransomware or a bad sync);
3. finds corrupt files by hash (``verify``) and checks the vault (``deep_verify``), reading every pack
   that is suspect (and every pack with ``read_data``), which tells exactly which blobs survive. With
   ``verify_state`` (a ``vault verify --state`` file) and ``verify_max_age``, files that verify found
   intact less than that long ago are not hashed again (the same trust ``vault verify --max-age``
   gives them); the state records what this run hashes;
4. copies the intact blobs of every damaged pack into new packs (their sealed bytes unchanged), then
   moves the damaged packs, corrupt index/snapshot/packindex/lock files, files that are not vault
   objects and leftover temp files to the quarantine folder (or deletes them with ``delete``);
5. rebuilds the index from the pack headers when it is incomplete or wrong (rebuild.py);
6. for every snapshot that needs data that is now gone: drops it, or with ``salvage`` writes a new
   snapshot without the damaged files and folders (new trees, tag ``repaired``, ``original`` pointing
   at the first version) and then drops the old one; removes packindex files of dropped snapshots;
7. checks again, and repeats from 3 (without reading all data) until the vault is clean or nothing
   more can be done.

The quarantine folder lies outside the vault's folders (default ``<vault>/../<name>.quarantine-<time>/``
for a local vault) and keeps each file at its vault path, plus MANIFEST.jsonl saying why it was moved.

Crash safety: every step writes before it removes (new packs and their index before the damaged pack
goes, the complete new index before the old index files go, a rewritten snapshot before the old one
goes), so a kill -9 at any point leaves a vault that a second run repairs; running repair on a clean
vault changes nothing. ``dry_run`` changes nothing and reports the plan: what would be moved, and which
snapshots and files would be lost.

The caller must hold the vault's exclusive lock (a shared one is enough for ``dry_run``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from vaultfs.backend import Backend, LocalBackend
from vaultfs.errors import ObjectNotFound, UsageError, VaultError
from vaultfs.format.pack import PackedBlob
from vaultfs.format.tree import Node
from vaultfs.ops.deepverify import (
    DamagedSnapshot,
    DeepVerifyReport,
    Problem,
    check_blobs,
    deep_verify,
    parse_header,
)
from vaultfs.ops.rebuild import decode_packindex, rebuild_indexes
from vaultfs.ops.verify import Subset, forget_verified, object_path, verify
from vaultfs.repo.repository import Repository

DEFAULT_TAG = "repaired"
MAX_ROUNDS = 5

StageCallback = Callable[[str, "int | None", str], None]
AdvanceCallback = Callable[[int], None]


# -- report -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    """One change (or, in a dry run, one planned change) to the vault.

    ``kind``: remove-lock, quarantine, delete, salvage-pack, rebuild-index, drop-snapshot,
    rewrite-snapshot. ``object`` is a vault path or a snapshot id.
    """

    kind: str
    object: str
    detail: str


@dataclass
class SnapshotLoss(DamagedSnapshot):
    """A snapshot that lost the ``files`` it lists: dropped, or (``replaced_by``) rewritten without
    them. ``lost`` means nothing of it could be read (root tree lost, or its file corrupt)."""

    replaced_by: str | None = None


@dataclass
class RepairReport:
    dry_run: bool
    quarantine: str | None = None
    rounds: int = 0
    actions: list[Action] = field(default_factory=list)
    snapshots: list[SnapshotLoss] = field(default_factory=list)
    blobs_salvaged: int = 0
    #: True when the final check found nothing wrong (in a dry run: the vault needs no repair)
    clean: bool = False
    #: what the final check still found (problems that repair cannot fix, e.g. a lost key file)
    remaining: list[Problem] = field(default_factory=list)
    seconds: float = 0.0


# -- quarantine --------------------------------------------------------------------------------


class Quarantine:
    """Moves vault files out of the vault (or deletes them), keeping their vault paths."""

    def __init__(
        self,
        backend: Backend,
        folder: str | None,
        *,
        delete: bool,
        dry_run: bool,
        report: RepairReport,
    ) -> None:
        self.backend = backend
        inner = getattr(backend, "inner", backend)
        self.local: LocalBackend | None = inner if isinstance(inner, LocalBackend) else None
        self.delete = delete
        self.dry_run = dry_run
        self.report = report
        if folder is None and not delete:
            if self.local is not None:
                root = self.local.root.rstrip("/")
                stamp = time.strftime("%Y%m%d-%H%M%S")
                folder = os.path.join(
                    os.path.dirname(root), f"{os.path.basename(root)}.quarantine-{stamp}"
                )
            elif not dry_run:
                # A dry run of a remote repair moves nothing, so it needs no place to move to.
                raise UsageError(
                    "repair of a remote vault needs --quarantine DIR (a local folder) or --delete"
                )
        if folder is not None and self.local is not None:
            vault = os.path.realpath(self.local.root)
            target = os.path.realpath(folder)
            if target == vault or target.startswith(vault + os.sep):
                raise UsageError("the quarantine folder must be outside the vault")
        self.folder = None if delete else folder
        report.quarantine = self.folder

    def take(self, path: str, why: str) -> None:
        """Move (or delete) the file at vault path ``path`` (``data/3f/3f…``, ``index/…``)."""
        self.report.actions.append(Action("delete" if self.delete else "quarantine", path, why))
        if self.dry_run:
            return
        if self.local is not None:
            self._take_local(path)
        else:
            self._take_remote(path)
        if self.folder is not None:
            entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "path": path, "reason": why}
            with open(os.path.join(self.folder, "MANIFEST.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")

    def _take_local(self, path: str) -> None:
        assert self.local is not None
        src = os.path.join(self.local.root, path)
        try:
            if self.folder is None:
                os.unlink(src)
                _fsync_dir(os.path.dirname(src))
                return
            dst = os.path.join(self.folder, path)
            os.makedirs(os.path.dirname(dst), mode=0o700, exist_ok=True)
            try:
                os.rename(src, dst)
            except OSError as exc:
                if exc.errno != 18:  # EXDEV: another file system, copy then remove
                    raise
                shutil.copy2(src, dst)
                with open(dst, "rb") as f:
                    os.fsync(f.fileno())
                os.unlink(src)
            _fsync_dir(os.path.dirname(dst))
            _fsync_dir(os.path.dirname(src))
        except FileNotFoundError:
            return  # gone already (a re-run after a crash)
        except OSError as exc:
            raise VaultError(
                f"cannot move {path} out of the vault: {exc.strerror}; check the permissions "
                "of the vault and the quarantine folder"
            ) from None

    def _take_remote(self, path: str) -> None:
        kind = path.split("/", 1)[0]
        name = path.rsplit("/", 1)[1]
        if self.folder is not None:
            try:
                data = self.backend.read(kind, name)
            except ObjectNotFound:
                return
            dst = os.path.join(self.folder, path)
            os.makedirs(os.path.dirname(dst), mode=0o700, exist_ok=True)
            with open(dst, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        self.backend.remove(kind, name)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the repair --------------------------------------------------------------------------------


class _Repair:
    def __init__(
        self,
        repo: Repository,
        *,
        quarantine: str | None,
        delete: bool,
        salvage: bool,
        dry_run: bool,
        rollback_to: int | None,
        read_data: bool,
        subset: Subset | None,
        tag: str,
        max_rounds: int,
        verify_state: str | None,
        verify_max_age: float | None,
        on_stage: StageCallback | None,
        on_advance: AdvanceCallback | None,
    ) -> None:
        self.repo = repo
        self.verify_state = verify_state
        self.verify_max_age = verify_max_age
        self.backend = repo.backend
        self.salvage = salvage
        self.dry_run = dry_run
        self.rollback_to = rollback_to
        self.read_data = read_data
        self.subset = subset
        self.tag = tag
        self.max_rounds = max_rounds
        self.on_stage = on_stage
        self.on_advance = on_advance
        self.report = RepairReport(dry_run=dry_run)
        self.q = Quarantine(
            self.backend, quarantine, delete=delete, dry_run=dry_run, report=self.report
        )
        self.gone: set[str] = set()  # vault paths moved away (or, in a dry run, to be)
        self.suspect_packs: set[str] = set()
        self.index_dirty = False  # an index file or an indexed pack was moved away
        self._index_packs: set[str] | None = None

    def stage(self, name: str) -> None:
        if self.on_stage is not None:
            self.on_stage(name, None, "items")

    def act(self, kind: str, obj: str, detail: str) -> None:
        self.report.actions.append(Action(kind, obj, detail))

    def take(self, path: str, why: str) -> None:
        if path in self.gone:
            return
        if path.startswith("index/") or (
            path.startswith("data/") and self._indexed(path.rsplit("/", 1)[1])
        ):
            self.index_dirty = True
        self.gone.add(path)
        self.q.take(path, why)

    def _indexed(self, name: str) -> bool:
        """Whether the current index names this pack (then removing it calls for a rebuild)."""
        if self._index_packs is None:
            if not self.repo.index_loaded:
                self.repo.load_index(on_error=lambda _exc: None)
            self._index_packs = {p.hex() for p in self.repo.index.pack_ids()}
        return name in self._index_packs

    # -- steps ----------------------------------------------------------------------------------

    def remove_dead_locks(self) -> None:
        for info in self.repo.locks.list_locks():
            if info.dead_here():
                self.act("remove-lock", f"locks/{info.name}", f"left by {info.describe()}")
                if not self.dry_run:
                    self.backend.remove("locks", info.name)

    def rollback(self) -> None:
        inner = getattr(self.backend, "inner", self.backend)
        if not isinstance(inner, LocalBackend):
            raise UsageError("--rollback-to needs a vault in a local folder (it reads file times)")
        assert self.rollback_to is not None
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.rollback_to / 1e9))
        for kind in ("snapshots", "index", "packindex", "data"):
            for name, _size in self.backend.list(kind):
                try:
                    mtime = os.stat(inner.path(kind, name)).st_mtime_ns
                except (OSError, VaultError):
                    continue
                if mtime > self.rollback_to:
                    self.take(object_path(kind, name), f"written after {when} (--rollback-to)")

    def find_corrupt_files(self) -> None:
        self.stage("hashing every file")
        found = verify(
            self.backend,
            state_path=self.verify_state,
            max_age=self.verify_max_age,
            progress=self.on_advance,
        )
        for bad in found.bad:
            if bad.path in self.gone:
                continue
            if bad.path.endswith("/"):
                continue  # a folder where none belongs: left for the admin
            if bad.folder == "data" and bad.kind != "unexpected":
                # A pack is not moved at once: its intact blobs are salvaged first.
                self.suspect_packs.add(bad.path.rsplit("/", 1)[1])
            else:
                self.take(bad.path, bad.problem)
        for path in found.temp_files:
            if not path.startswith("locks/"):  # our own lock refresh may be writing one right now
                self.take(path, "leftover temp file of an interrupted write")

    def check(self, first: bool) -> DeepVerifyReport:
        self.stage("checking the vault")
        return deep_verify(
            self.repo,
            read_data=self.read_data and first,
            subset=self.subset,
            extra_packs=self.suspect_packs,
            assume_gone=self.gone,
            cache=False,
            on_advance=self.on_advance,
        )

    def salvage_packs(self, found: DeepVerifyReport) -> set[str]:
        """Copy the intact blobs of damaged packs into new packs; returns the packs to move away."""
        doomed = {d.id for d in found.damaged_packs} | (self.suspect_packs - self.gone_packs())
        if not doomed:
            return set()
        if not self.repo.index_loaded:
            self.repo.load_index(on_error=lambda _exc: None)
        copied = 0
        for name in sorted(doomed):
            try:
                data = self.backend.read("data", name)
            except ObjectNotFound:
                continue
            except VaultError:
                continue  # unreadable: nothing to salvage
            pack = bytes.fromhex(name)
            try:
                blobs = parse_header(self.repo, data, len(data), name)
            except VaultError:
                # No readable header: the index still says where the blobs should be.
                blobs = [
                    PackedBlob(
                        loc.blob_type, loc.offset, loc.length, loc.uncompressed_length, loc.blob_id
                    )
                    for loc in self.repo.index.blobs_in_pack(pack)
                ]
            if not blobs:
                continue  # not a pack at all: nothing to salvage
            n = 0
            for b, why in check_blobs(self.repo, pack, data, blobs):
                if why is not None:
                    continue
                elsewhere = any(
                    loc.pack_id.hex() not in doomed
                    and object_path("data", loc.pack_id.hex()) not in self.gone
                    for loc in self.repo.index.lookup_all(b.id, b.blob_type)
                )
                if elsewhere:
                    continue
                n += 1
                if not self.dry_run:
                    sealed = bytes(data[b.offset : b.offset + b.length])
                    self.repo.packer.add(b.blob_type, b.id, sealed, b.uncompressed_length)
            copied += n
            self.act("salvage-pack", object_path("data", name), f"{n} intact blob(s) copied")
        if not self.dry_run:
            # New packs and their index are stored before any damaged pack goes away.
            self.repo.flush()
        self.report.blobs_salvaged += copied
        return doomed

    def gone_packs(self) -> set[str]:
        return {p.rsplit("/", 1)[1] for p in self.gone if p.startswith("data/")}

    def fix_files(self, found: DeepVerifyReport, doomed: set[str]) -> None:
        for name in sorted(doomed):
            reasons = next((d.reasons for d in found.damaged_packs if d.id == name), [])
            why = "; ".join(reasons) or "its content does not hash to its name"
            self.take(object_path("data", name), f"damaged pack: {why}")
        for path in found.invalid_files:
            self.take(path, "not a valid pack")
        for path in found.unreadable_index:
            self.take(path, "unreadable index file")
        for path in found.unreadable_snapshots:
            self.take(path, "unreadable snapshot file: the snapshot is lost")
            sid = path.rsplit("/", 1)[1]
            self.report.snapshots.append(SnapshotLoss(sid, "", "", [], [], True))
        for path in found.unreadable_keys:
            self.take(path, "corrupt key file")
        for name in found.bad_packindex:
            self.take(f"packindex/{name}", "unreadable, stale or naming unknown packs")

    def rebuild(self) -> None:
        self.act("rebuild-index", "index/", "write a complete index from the pack headers")
        if self.dry_run:
            return
        self.stage("rebuilding the index")
        result = rebuild_indexes(self.repo, on_advance=self.on_advance)
        self.index_dirty = False
        self._index_packs = None
        for bad in result.packs_unreadable:
            # The header went bad since the check: next round salvages it.
            self.suspect_packs.add(bad.id)

    def fix_snapshots(self, found: DeepVerifyReport) -> bool:
        if not found.damaged_snapshots:
            return False
        lost_data = {bytes.fromhex(b[5:]) for b in found.lost_blobs if b.startswith("data:")}
        lost_trees = {bytes.fromhex(b[5:]) for b in found.lost_blobs if b.startswith("tree:")}
        memo: dict[bytes, bytes] = {}
        existing: list[tuple[str, object]] | None = None
        if not self.dry_run and not self.repo.index_loaded:
            self.repo.load_index(on_error=lambda _exc: None)
        for damaged in found.damaged_snapshots:
            loss = SnapshotLoss(
                **{f.name: getattr(damaged, f.name) for f in dataclasses.fields(damaged)}
            )
            self.report.snapshots.append(loss)
            path = f"snapshots/{damaged.id}"
            if not self.salvage or damaged.lost:
                self.act("drop-snapshot", damaged.id, f"{len(damaged.files)} damaged file(s)")
                self.take(path, "the snapshot needs data that is lost")
                continue
            if self.dry_run:
                self.act(
                    "rewrite-snapshot",
                    damaged.id,
                    f"without {len(damaged.files)} damaged file(s) or folder(s)",
                )
                continue
            snap = self.repo.load_snapshot(damaged.id)
            root = self._rewrite(snap.tree, lost_data, lost_trees, memo)
            self.repo.flush()  # trees (and their index) before the snapshot that names them
            new = dataclasses.replace(
                snap,
                tree=root,
                tags=snap.tags + ([self.tag] if self.tag not in snap.tags else []),
                original=snap.original or bytes.fromhex(damaged.id),
            )
            if existing is None:
                existing = self.repo.list_snapshots(on_error=lambda _exc: None)
            # An earlier, interrupted run may have written this very snapshot already.
            same = next(
                (
                    sid
                    for sid, other in existing
                    if other.tree == new.tree
                    and other.original == new.original
                    and other.time == new.time
                    and sid != damaged.id
                ),
                None,
            )
            loss.replaced_by = same or self.repo.save_snapshot(new)
            self.act(
                "rewrite-snapshot",
                damaged.id,
                f"new snapshot {loss.replaced_by[:8]} without {len(damaged.files)} damaged "
                "file(s) or folder(s)",
            )
            self.take(path, f"replaced by snapshot {loss.replaced_by} (salvaged)")
        return True

    def _rewrite(
        self, root: bytes, lost_data: set[bytes], lost_trees: set[bytes], memo: dict[bytes, bytes]
    ) -> bytes:
        """The id of ``root`` rewritten without lost files and folders (post-order, iterative)."""
        stack: list[tuple[bytes, bool]] = [(root, False)]
        while stack:
            tree_id, expanded = stack.pop()
            if tree_id in memo:
                continue
            nodes = self.repo.load_tree(tree_id)
            subs = [n.subtree for n in nodes if n.type == "dir" and n.subtree is not None]
            if not expanded:
                stack.append((tree_id, True))
                stack += [(s, False) for s in subs if s not in memo and s not in lost_trees]
                continue
            kept: list[Node] = []
            changed = False
            for node in nodes:
                if node.type == "file" and any(c in lost_data for c in node.content or ()):
                    changed = True
                    continue
                if node.type == "dir" and node.subtree is not None:
                    if node.subtree in lost_trees:
                        changed = True
                        continue
                    new_sub = memo[node.subtree]
                    if new_sub != node.subtree:
                        node = dataclasses.replace(node, subtree=new_sub)
                        changed = True
                kept.append(node)
            memo[tree_id] = self.repo.save_tree(kept) if changed else tree_id
        return memo[root]

    def drop_stale_packindex(self) -> None:
        """packindex files of snapshots that no longer exist (dropped or rewritten just now)."""
        snapshots = {n for n, _ in self.backend.list("snapshots")}
        snapshots -= {p.rsplit("/", 1)[1] for p in self.gone if p.startswith("snapshots/")}
        for name, _size in self.backend.list("packindex"):
            path = f"packindex/{name}"
            if path in self.gone:
                continue
            try:
                snap, _packs = decode_packindex(
                    self.repo.key, self.backend.read("packindex", name), path
                )
            except VaultError:
                continue  # the next check reports it
            if snap.hex() not in snapshots:
                self.take(path, f"its snapshot {snap.hex()[:8]} is gone")

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> RepairReport:
        started = time.monotonic()
        self.remove_dead_locks()
        if self.rollback_to is not None:
            self.rollback()
        self.find_corrupt_files()
        found = self.check(first=True)
        for round_no in range(1, self.max_rounds + 1):
            if self._nothing_to_do(found):
                break
            self.report.rounds = round_no
            doomed = self.salvage_packs(found)
            self.fix_files(found, doomed)
            if found.index_needs_rebuild or self.index_dirty:
                self.rebuild()
            changed = self.fix_snapshots(found)
            if not self.dry_run and (changed or any(p.startswith("snapshots/") for p in self.gone)):
                self.drop_stale_packindex()
            if self.dry_run:
                break
            self.suspect_packs -= self.gone_packs()
            found = self.check(first=False)
        if self.verify_state is not None and not self.dry_run and self.gone:
            forget_verified(self.backend, self.verify_state, self.gone)
        if self.dry_run:
            self.report.clean = not self.report.actions
        else:
            self.report.clean = found.ok
            self.report.remaining = list(found.problems)
        self.report.seconds = time.monotonic() - started
        return self.report

    def _nothing_to_do(self, found: DeepVerifyReport) -> bool:
        pending_packs = self.suspect_packs - self.gone_packs()
        return (
            found.ok
            and not found.index_needs_rebuild
            and not found.bad_packindex
            and not pending_packs
        )


def repair(
    repo: Repository,
    *,
    quarantine: str | None = None,
    delete: bool = False,
    salvage: bool = False,
    dry_run: bool = False,
    rollback_to: int | None = None,
    read_data: bool = False,
    subset: Subset | None = None,
    tag: str = DEFAULT_TAG,
    max_rounds: int = MAX_ROUNDS,
    verify_state: str | None = None,
    verify_max_age: float | None = None,
    on_stage: StageCallback | None = None,
    on_advance: AdvanceCallback | None = None,
) -> RepairReport:
    """Repair the vault; see the module docstring.

    ``quarantine`` is the folder damaged files go to (default next to a local vault; required for a
    remote one unless ``delete``). ``rollback_to`` is a time in ns since the epoch. ``read_data``
    (with ``subset``) also reads every pack in the first check, to find blobs that are damaged inside
    packs whose files hash right. ``verify_state`` and ``verify_max_age`` (seconds) are verify's
    ``state_path`` and ``max_age`` for the hashing step. Raises UsageError for bad options; VaultError
    when the vault cannot be changed (permissions, full disk). The caller holds the exclusive lock.
    """
    if delete and quarantine is not None:
        raise UsageError("--delete and --quarantine exclude each other")
    if verify_max_age is not None and verify_state is None:
        raise UsageError("--max-age needs --state FILE (it is where verification times are kept)")
    worker = _Repair(
        repo,
        quarantine=quarantine,
        delete=delete,
        salvage=salvage,
        dry_run=dry_run,
        rollback_to=rollback_to,
        read_data=read_data,
        subset=subset,
        tag=tag,
        max_rounds=max_rounds,
        verify_state=verify_state,
        verify_max_age=verify_max_age,
        on_stage=on_stage,
        on_advance=on_advance,
    )
    return worker.run()


__all__ = ["Action", "Quarantine", "RepairReport", "SnapshotLoss", "repair"]
