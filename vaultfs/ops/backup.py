"""Back up files and folders into a vault, recording them exactly as restic 0.14 does.

What a snapshot holds (FORMAT.md §6, §7)
----------------------------------------
The targets are arranged as restic's archiver arranges them: an absolute target ``/a/b/c`` appears as
``a/b/c`` below the snapshot root, the folders ``a`` and ``b`` recorded with their own metadata (read with
``stat``, so a symlinked folder on the way shows its target's metadata); a relative target ``x/y`` appears
as ``x/y``; ``..`` components are dropped (``../x`` is ``x``); a target without components (``.``, ``/``)
stands for its entries, so ``vault backup .`` puts the contents of the current folder at the root. Two
targets that end up with the same name but live in different folders get ``name-1``, ``name-2`` ...
Every entry is turned into a node by :mod:`vaultfs.ops.scan`; with the same metadata the tree JSON is
byte-identical to restic's, so tree IDs (and therefore deduplication of trees) match restic's.

The snapshot's ``paths`` are the absolute targets in the order given, ``excludes`` the ``--exclude``
patterns (not those from exclude files), ``parent`` the snapshot used for change detection.

Change detection
----------------
Unless told otherwise the parent is the newest snapshot of the same host whose paths include all of this
backup's paths and whose time is not in the future (restic's rule). A regular file whose type, size,
mtime, ctime and inode equal the parent's node at the same place reuses that node's content list without
being read, provided every one of its blobs is still in the index. Its extended attributes are taken from
the parent's node as well: changing them (like its mode, owner or link count) would have changed its ctime.

Pipeline
--------
- The calling thread walks the targets depth-first (``lstat``, exclude rules, change detection) and builds
  the nodes of everything that needs no reading. Files to read go to the readers, small ones (below the
  smallest chunk) in batches, since a hand-off costs about as much as reading a small file.
- ``readers`` threads open, ``fstat`` and read those files, cutting them with restic's chunker (C, GIL
  released). A file's last (for most files the only) chunk is hashed, compressed and sealed right there,
  straight from the read buffer; the other chunks of a large file are copied into one of a fixed set of
  chunk buffers and go to
- ``workers`` threads that hash (SHA-256, the blob ID), look the blob up in the index, compress (zstd,
  vault version 2) and seal (AES-CTR + Poly1305) it.
- Storing a blob (any of those threads) compresses it into the thread's scratch buffer and seals it
  straight into a region reserved at the end of the open pack (vaultfs.repo.packer): the blob's bytes
  are written once, and no buffer is allocated per blob. One more thread writes each pack once it is
  full (SHA-256, write, fsync) while the others go on; they also write an index now and then.
- A folder's tree is encoded and stored by whichever thread completes its last entry, so trees are saved
  bottom-up as soon as they can be. A folder whose entries all equal the parent snapshot's has the parent's
  tree, which is then neither encoded nor stored again.

hashlib, the chunker, file I/O and the C part of ``vaultfs.chunker._blob`` (zstd, AES-CTR and Poly1305
in one call each; without it zstandard and cryptography, which release the GIL too) let the threads use
all cores. Memory is bounded whatever the number and size of files: ``workers + 2`` chunk buffers, one
read buffer per reader and one compression buffer per thread (anonymous mappings of the largest chunk
size, resident only as far as chunks reach), at most ``4 * readers`` files or batches queued, and
``PACK_WRITERS + 2`` pack buffers (one open per blob type, the others being written); folders are
released as soon as their tree is stored.

Safety
------
Packs are written before the index that names them, and the snapshot last, so an interrupted backup
(Ctrl-C, kill -9, a crash) leaves a valid vault without the new snapshot. An index is also written every
``index_interval`` seconds, so a later backup reuses what a killed one stored; on Ctrl-C the open packs
and their index are written before the interruption propagates. A file or folder that cannot be read, or
that vanishes, becomes an entry in ``BackupReport.errors`` and is left out; the backup goes on (the CLI
exits with code 3). The caller holds a (shared) lock on the vault while this runs, or hands in a
:class:`LockGate` that takes it meanwhile.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import mmap
import os
import pwd
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import zstandard

from vaultfs.chunker import MAX_SIZE, MIN_SIZE, READ_SIZE, Chunker
from vaultfs.crypto import NATIVE, OVERHEAD
from vaultfs.errors import UsageError, VaultError
from vaultfs.format.gojson import GoTime, go_quote, go_unquote
from vaultfs.format.pack import DATA, TREE
from vaultfs.format.snapshot import Snapshot
from vaultfs.format.tree import (
    Node,
    display_path,
    encode_tree,
    fs_bytes,
    fs_name,
)
from vaultfs.ops.excludes import Excluder, go_clean
from vaultfs.ops.scan import (
    LocalTime,
    OwnerNames,
    file_doc,
    file_json,
    node_from_stat,
    node_type,
    read_xattrs,
)
from vaultfs.repo.locks import hostname as local_hostname
from vaultfs.repo.repository import Repository, filter_snapshots

if NATIVE:
    from vaultfs.chunker._blob import Codec, seal_many, sha256_spans

    try:
        from vaultfs.ops._files import read_files as _read_files
        from vaultfs.ops._files import scan_dir as _scan_dir
        from vaultfs.ops._files import unchanged_files as _unchanged_files
    except ImportError:  # built without it: the Python path reads small files one by one
        _read_files = _scan_dir = _unchanged_files = None
else:
    _read_files = _scan_dir = _unchanged_files = None

#: Threads reading and chunking files.
DEFAULT_READERS = 2
#: Threads hashing, compressing and sealing the chunks of large files.
DEFAULT_WORKERS = 2
#: Small files (below the smallest chunk) are handed to the readers in batches of this many or bytes.
BATCH_FILES = 32
BATCH_BYTES = 1024 * 1024
#: A reader's buffer for one batch of small files read in one C call (``_files.read_files``): the batch's
#: bytes plus its last file, which may take it past BATCH_BYTES. A file that grew meanwhile and no
#: longer fits goes the chunking way instead.
BATCH_BUFFER = BATCH_BYTES + MIN_SIZE + 64 * 1024
#: Outcomes of ``_files.read_files``.
_READ, _BIG, _OPEN_FAILED, _FAILED, _NOT_REGULAR = range(5)
#: Seconds between index files written during a long backup (restic: 10 minutes).
DEFAULT_INDEX_INTERVAL = 60.0
#: zstd level of data and tree blobs (vault version 2). restic's "auto" is close to level 3; level 1
#: compresses text about 1.5 times as fast (335 against 212 MB/s per core on the benchmark's logs) for
#: about 3% more output there, and needs half the memory per thread (1.3 against 2.5 MiB).
ZSTD_LEVEL = 1
#: Blobs shorter than the smallest chunk (small files, trees, the tail of a file) get this level: on
#: such short inputs level 3 costs little more than level 1 (benchmark's 20,000 small files: 0.57
#: against 0.51 CPU-s) and saves 1.5% of their size, most of the difference to restic's repository
#: (benchmark set: 788.4 -> 785.9 MB; restic 784.6 MB; all blobs at level 3: 784.0 MB, +0.4 CPU-s).
SMALL_BLOB_LEVEL = 3
#: Threads writing full packs (SHA-256, write, fsync: 50 to 100 ms per pack here) while the others go
#: on. One keeps up with two cores of producers on the benchmark; a second one cost ~20 MB of peak RSS
#: (its pack buffer) for no measurable speed.
PACK_WRITERS = 1
#: Seconds between progress reports.
PROGRESS_INTERVAL = 0.5

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_NOATIME = getattr(os, "O_NOATIME", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


# -- report ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackupProblem:
    """An item that could not be backed up. ``path`` is its absolute path (str, surrogateescape)."""

    path: str
    message: str


@dataclass
class BackupReport:
    """What a backup did. ``errors`` lists the items left out; the snapshot exists unless ``dry_run``."""

    snapshot_id: str = ""
    parent_id: str = ""
    paths: list[str] = field(default_factory=list)
    dry_run: bool = False
    files_new: int = 0
    files_changed: int = 0
    files_unmodified: int = 0
    dirs_new: int = 0
    dirs_changed: int = 0
    dirs_unmodified: int = 0
    data_blobs: int = 0
    tree_blobs: int = 0
    #: plaintext bytes of the blobs this backup added to the vault (data and trees)
    data_added: int = 0
    #: the same blobs as stored: compressed and sealed
    data_added_packed: int = 0
    total_files_processed: int = 0
    total_bytes_processed: int = 0
    errors: list[BackupProblem] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict[str, Any]:
        """restic's ``backup --json`` summary fields, plus vaultfs's."""
        return {
            "message_type": "summary",
            "files_new": self.files_new,
            "files_changed": self.files_changed,
            "files_unmodified": self.files_unmodified,
            "dirs_new": self.dirs_new,
            "dirs_changed": self.dirs_changed,
            "dirs_unmodified": self.dirs_unmodified,
            "data_blobs": self.data_blobs,
            "tree_blobs": self.tree_blobs,
            "data_added": self.data_added,
            "data_added_packed": self.data_added_packed,
            "total_files_processed": self.total_files_processed,
            "total_bytes_processed": self.total_bytes_processed,
            "total_duration": round(self.seconds, 3),
            "snapshot_id": self.snapshot_id,
            "parent": self.parent_id,
            "paths": [display_path(p) for p in self.paths],
            "dry_run": self.dry_run,
            "errors": [{"path": display_path(p.path), "message": p.message} for p in self.errors],
        }


@dataclass(frozen=True)
class BackupProgress:
    """A progress report. Totals come from a scan that runs alongside and may not be finished yet."""

    seconds: float
    files_done: int
    bytes_done: int
    total_files: int
    total_bytes: int
    scan_finished: bool
    errors: int

    def to_json(self) -> dict[str, Any]:
        """restic's ``backup --json`` status line fields."""
        if self.scan_finished and self.total_bytes:
            fraction = min(1.0, self.bytes_done / self.total_bytes)
        else:
            fraction = 0.0
        doc: dict[str, Any] = {
            "message_type": "status",
            "seconds_elapsed": int(self.seconds),
            "percent_done": round(fraction, 4),
            "total_files": self.total_files,
            "files_done": self.files_done,
            "total_bytes": self.total_bytes,
            "bytes_done": self.bytes_done,
            "error_count": self.errors,
        }
        if self.scan_finished and 0 < fraction < 1 and self.bytes_done:
            doc["seconds_remaining"] = int(self.seconds / fraction - self.seconds)
        return doc


ProgressCallback = Callable[[BackupProgress], None]
ProblemCallback = Callable[[BackupProblem], None]


# -- targets (restic's archiver tree) --------------------------------------------------------------


def _clean(path: bytes) -> bytes:
    return os.fsencode(go_clean(os.fsdecode(path)))


def _join(a: bytes, b: bytes) -> bytes:
    return _clean(a + b"/" + b)


def _components(path: bytes) -> list[bytes]:
    """The components of a path as restic's archiver sees it: relative paths hang below "/", so ".."
    at the start disappears and "." has none."""
    if not path.startswith(b"/"):
        path = b"/" + path
    return [c for c in _clean(path).split(b"/") if c]


def _root_of(path: bytes) -> bytes:
    """The folder holding a target's first component: "/" for absolute targets, else "." or "../..".
    Targets with the same name but different roots are different entries."""
    if path.startswith(b"/"):
        return b"/"
    root = b"."
    for part in _clean(path).split(b"/"):
        if part == b"..":
            root = _join(root, part)
    return root


class _Target:
    """A node of the target tree: a leaf (``path``: back up what is there) or an intermediate folder
    (``info_path``: record that folder's metadata, then the children)."""

    __slots__ = ("nodes", "path", "info_path", "root")

    def __init__(self, root: bytes = b"") -> None:
        self.nodes: dict[bytes, _Target] = {}
        self.path: bytes | None = None
        self.info_path: bytes | None = None
        self.root = root

    def add_target(self, path: bytes) -> None:
        parts = _components(path)
        if not parts:
            raise UsageError(f"invalid backup path {os.fsdecode(path)!r}")
        root = _root_of(path)
        name = orig = parts[0]
        sub = _Target(root)
        i = 0
        while name in self.nodes:
            other = self.nodes[name]
            i += 1
            if other.root == root:
                sub = other
                break
            name = b"%s-%d" % (orig, i)
        if len(parts) > 1:
            subroot = _join(root, orig)
            sub._add(path, subroot, parts[1:])
            sub.info_path = subroot
        else:
            sub.path = path
        self.nodes[name] = sub

    def _add(self, target: bytes, root: bytes, parts: list[bytes]) -> None:
        name = parts[0]
        if len(parts) == 1:
            node = self.nodes.get(name)
            if node is None:
                leaf = _Target()
                leaf.path = target
                self.nodes[name] = leaf
            elif node.path is not None:
                raise UsageError(f"backup path {os.fsdecode(target)!r} is given twice")
            else:
                node.path = target
            return
        node = self.nodes.setdefault(name, _Target())
        subroot = _join(root, name)
        node.info_path = subroot
        node._add(target, subroot, parts[1:])

    def unroll(self) -> None:
        """A leaf that also has children (targets /a and /a/b) becomes an intermediate folder whose
        other entries are leaves."""
        if self.path is not None and self.nodes:
            for entry in os.listdir(self.path):
                full = _join(self.path, entry)
                node = self.nodes.get(entry)
                if node is None:
                    leaf = _Target()
                    leaf.path = full
                    self.nodes[entry] = leaf
                elif node.path is None:
                    node.path = full
                elif node.path != full:
                    raise UsageError(f"backup paths collide at {os.fsdecode(full)!r}")
            self.info_path = self.info_path or self.path
            self.path = None
        for node in self.nodes.values():
            node.unroll()


def _expand_targets(targets: Iterable[bytes]) -> list[bytes]:
    """restic's resolveRelativeTargets: a target without components stands for its entries."""
    out = []
    for target in targets:
        target = _clean(target)
        if _components(target):
            out.append(target)
            continue
        for entry in sorted(os.listdir(target)):
            out.append(_join(target, entry))
    return out


def build_targets(paths: Sequence[bytes]) -> _Target:
    """The target tree of existing paths (see the module docstring)."""
    top = _Target()
    seen: set[bytes] = set()
    for target in _expand_targets(paths):
        target = _clean(target)
        if target in seen:
            continue
        seen.add(target)
        top.add_target(target)
    top.unroll()
    return top


# -- the lock -------------------------------------------------------------------------------------


class LockGate:
    """Takes the vault lock in a helper thread while the backup starts.

    Taking a lock includes restic's 200 ms wait before the re-check. Nothing is written to the vault
    before ``wait()`` returns, so the backup may read the index and walk the files meanwhile: if the
    lock fails, it aborts without having changed anything. ``take`` is e.g. ``lambda: repo.lock()``
    (shared); ``release()`` releases the lock if it was taken.
    """

    def __init__(self, take: Callable[[], Any]) -> None:
        self._held: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(take,), name="vault-backup-lock", daemon=True
        )
        self._thread.start()

    def _run(self, take: Callable[[], Any]) -> None:
        try:
            self._held = take()
        except BaseException as exc:  # noqa: BLE001 - re-raised by wait() in the caller's thread
            self._error = exc

    @property
    def failed(self) -> bool:
        return not self._thread.is_alive() and self._error is not None

    def wait(self) -> None:
        """Block until the lock is held; raises what taking it raised."""
        self._thread.join()
        if self._error is not None:
            raise self._error

    def release(self) -> None:
        self._thread.join()
        if self._held is not None:
            held, self._held = self._held, None
            held.release()


# -- the walk -------------------------------------------------------------------------------------


class _Cancelled(Exception):
    """Raised in worker threads once the backup is being abandoned."""


class _Dir:
    """A folder whose tree is being built: ``pending`` counts entries still in work plus one for the
    listing itself; the last one to finish stores the tree.

    ``same`` stays true while every entry equals the parent snapshot's entry of that name (``expected``
    is how many the parent had); a folder that ends up the same has the parent's tree as it is.
    ``meta_same`` says whether the folder's own node equals the parent's (its subtree aside)."""

    __slots__ = (
        "parent",
        "slot",
        "node",
        "nodes",
        "pending",
        "previous",
        "had_previous",
        "same",
        "expected",
        "meta_same",
    )

    def __init__(
        self, parent: _Dir | None, slot: int, node: Node | None, previous: bytes | None
    ) -> None:
        self.parent = parent
        self.slot = slot
        self.node = node
        self.nodes: list[Node | _Unchanged | None] = []
        self.pending = 1
        self.previous = previous
        self.had_previous = False
        self.same = False
        self.expected = 0
        self.meta_same = False


class _Pending:
    """A folder waiting to be walked."""

    __slots__ = ("dir", "path", "abspath")

    def __init__(self, d: _Dir, path: bytes, abspath: str) -> None:
        self.dir = d
        self.path = path
        self.abspath = abspath


class _Listing:
    """A scanned folder: its entries (name, lstat or error) in byte order, or the error listing it
    gave, and its parent tree's entries (None: no parent tree here). From ``_files.scan_dir`` an
    lstat is its stat tuple and an error its errno (see ``_entry_stat``)."""

    __slots__ = ("entries", "error", "previous", "expected")

    def __init__(self) -> None:
        self.entries: list[tuple[bytes, os.stat_result | OSError | tuple[int, ...] | int]] = []
        self.error: OSError | None = None
        self.previous: dict[str, dict[str, Any]] | None = None
        self.expected = 0


class _Unchanged:
    """A file equal to the parent snapshot's: its node is only made if its folder's tree changed.
    ``st`` may still be scan_dir's stat tuple, and ``times`` empty: both are made when needed.

    ``doc`` is the parent's entry when ``_files.unchanged_files`` found the file's node would encode
    to it (a plain file: ASCII name, no extended attributes): ``encode`` then writes that node's
    JSON from it, as Node.encode would, without making the node."""

    __slots__ = ("name", "path", "st", "times", "xattrs", "content", "doc")

    def __init__(
        self,
        name: str,
        path: bytes,
        st: os.stat_result | tuple[int, ...],
        times: list[LocalTime],
        xattrs: list[tuple[str, bytes]],
        content: list[bytes],
        doc: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.path = path
        self.st = st
        self.times = times
        self.xattrs = xattrs
        self.content = content
        self.doc = doc

    def encode(self) -> str:
        """Node.encode of this file's node, written from ``doc`` (only where it is set)."""
        assert self.doc is not None
        return file_json(self.doc, self.content)

    def node(self, owners: OwnerNames) -> Node:
        st = self.st if isinstance(self.st, os.stat_result) else _stat_result(self.st)
        mtime, ctime = self.times or (LocalTime(st.st_mtime_ns), LocalTime(st.st_ctime_ns))
        node = node_from_stat(
            self.name,
            self.path,
            st,
            owners,
            mtime=mtime,
            ctime=ctime,
            xattrs=self.xattrs,
        )
        node.content = self.content
        return node


class _File:
    """A file being read: its chunks' IDs arrive in any order."""

    __slots__ = ("dir", "slot", "node", "abspath", "content", "pending", "failed", "known")

    def __init__(self, d: _Dir, slot: int, abspath: str, known: bool) -> None:
        self.dir = d
        self.slot = slot
        self.abspath = abspath
        self.node: Node | None = None
        self.content: list[bytes | None] = []
        self.pending = 1
        self.failed = False
        self.known = known  # the parent snapshot had a file here


class _ReaderState(threading.local):
    """A reader thread's chunker and read buffer. The buffer is an anonymous mapping: only the pages
    a file's unfinished chunk actually reaches become resident (a few KiB for small files), where a
    bytearray would be zero-filled, 9 MiB at once."""

    def __init__(self) -> None:
        self.buffer: mmap.mmap | None = None
        self.chunker: Chunker | None = None
        self.batch: mmap.mmap | None = None


class _ChunkBuffers:
    """The buffers chunks travel in from a reader to a worker: a fixed number, so the chunks in flight
    are bounded, and reused, so no multi-MiB allocation is made per chunk (the allocator would keep
    such memory per thread). Each is an anonymous mapping of the largest chunk size whose pages
    become resident only as far as chunks reach; a chunk longer than ``KEEP`` gives the pages past
    that back afterwards."""

    KEEP = 2 * 1024 * 1024

    def __init__(self, count: int, cancel: threading.Event) -> None:
        self.cancel = cancel
        self.free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        for _ in range(count):
            self.free.put(mmap.mmap(-1, MAX_SIZE))

    def get(self) -> mmap.mmap:
        while True:
            try:
                return self.free.get(timeout=0.2)
            except queue.Empty:
                if self.cancel.is_set():
                    raise _Cancelled from None

    def put(self, buf: mmap.mmap, used: int) -> None:
        if used > self.KEEP:
            buf.madvise(mmap.MADV_DONTNEED, self.KEEP, MAX_SIZE - self.KEEP)
        self.free.put(buf)


class _Backup:
    def __init__(
        self,
        repo: Repository,
        *,
        excluder: Excluder,
        dry_run: bool,
        readers: int,
        workers: int,
        index_interval: float,
        on_problem: ProblemCallback | None,
        gate: LockGate | None,
    ) -> None:
        self.repo = repo
        self.gate = gate
        self.gate_open = gate is None
        self.index = repo.index
        self.excluder = excluder
        self.dry_run = dry_run
        self.owners = OwnerNames()
        self.report = BackupReport(dry_run=dry_run)
        self.on_problem = on_problem
        self.polynomial = repo.config.chunker_polynomial
        self.lock = threading.Lock()
        self.stats_lock = threading.Lock()
        self.cancel = threading.Event()
        self.done = threading.Event()
        self.failure: BaseException | None = None
        self.root_id: bytes | None = None
        self.files_done = 0
        self.bytes_done = 0
        self.readers = ThreadPoolExecutor(readers, thread_name_prefix="vault-backup-read")
        self.workers = ThreadPoolExecutor(workers, thread_name_prefix="vault-backup-blob")
        self.file_slots = threading.BoundedSemaphore(4 * readers)
        self.unmodified_files = 0
        self.unmodified_bytes = 0
        self.batch: list[tuple[_File, str, bytes]] = []
        self.batch_bytes = 0
        self.buffers = _ChunkBuffers(workers + 2, self.cancel)
        self.reader_state = _ReaderState()
        self.packer = None if dry_run else repo.packer
        if self.packer is not None:
            self.packer.start_writers(
                PACK_WRITERS, before_write=self.open_gate, after_write=self.maybe_flush_index
            )
        self.compressors = threading.local()
        self.compress = repo.version >= 2
        self.claimed: tuple[set[bytes], set[bytes]] = (set(), set())
        self.claim_limit = 100_000
        self.claim_lock = threading.Lock()
        self.index_interval = index_interval
        self.index_lock = threading.Lock()
        self.last_index = time.monotonic()
        self.indexed_packs = 0

    # -- problems and failures ----------------------------------------------------------------

    def problem(self, path: str, message: str) -> None:
        item = BackupProblem(path, message)
        with self.stats_lock:
            self.report.errors.append(item)
        if self.on_problem is not None:
            self.on_problem(item)

    def fail(self, exc: BaseException) -> None:
        """A worker hit something that is not the source's fault (vault I/O, a bug): stop everything."""
        with self.stats_lock:
            if self.failure is None:
                self.failure = exc
        self.cancel.set()
        self.done.set()

    def check(self) -> None:
        if self.failure is not None:
            raise self.failure
        if self.cancel.is_set():
            raise _Cancelled
        if self.gate is not None and self.gate.failed:
            self.gate.wait()  # raises why the lock could not be taken

    def open_gate(self) -> None:
        """Wait for the vault lock before the first write."""
        if not self.gate_open:
            assert self.gate is not None
            self.gate.wait()
            self.gate_open = True

    # -- blobs --------------------------------------------------------------------------------

    def claim(self, blob_id: bytes, blob_type: int) -> bool:
        """True when this backup must store the blob: not in the index, not being stored already."""
        if self.index.has(blob_id, blob_type):
            return False
        with self.claim_lock:
            claimed = self.claimed[blob_type]
            if blob_id in claimed:
                return False
            claimed.add(blob_id)
            if len(claimed) > self.claim_limit:
                # Forget blobs whose packs are indexed by now: the index answers for them.
                claimed.difference_update([b for b in claimed if self.index.has(b, blob_type)])
                self.claim_limit = max(100_000, 2 * len(claimed))
        return True

    def store(self, blob_type: int, plain: bytes | bytearray | memoryview) -> bytes:
        """Hash, dedup, compress, seal and pack one blob; returns its ID."""
        blob_id = hashlib.sha256(plain).digest()
        if not self.claim(blob_id, blob_type):
            return blob_id
        size = len(plain)
        if self.dry_run:
            stored = size
        else:
            stored = self.pack(blob_type, blob_id, plain)
        with self.stats_lock:
            if blob_type == DATA:
                self.report.data_blobs += 1
            else:
                self.report.tree_blobs += 1
            self.report.data_added += size
            self.report.data_added_packed += stored
        return blob_id

    def pack(self, blob_type: int, blob_id: bytes, plain: bytes | bytearray | memoryview) -> int:
        """Compress (vault version 2) into this thread's scratch buffer and seal straight into the
        pack; returns the stored length. No allocation per blob: see vaultfs.repo.packer."""
        src: bytes | bytearray | memoryview = plain
        ulen = 0
        if self.compress and plain:  # an empty blob is stored raw (ulen 0 reads as "raw")
            src = self.compress_into(plain)
            ulen = len(plain)
        assert self.packer is not None
        slot = self.packer.reserve(blob_type, blob_id, len(src) + OVERHEAD, ulen)
        if slot is None:
            return 0
        try:
            self.repo.key.seal_into(slot.view, src)
        except BaseException:
            self.packer.abort(slot)
            raise
        self.packer.commit(slot)
        return len(src) + OVERHEAD

    def codecs(self) -> threading.local:
        """This thread's compressors (and, with the C part, its scratch buffer), made at first use."""
        local = self.compressors
        if getattr(local, "codec", None) is None:
            if not NATIVE:
                # One per thread: a zstandard compressor shared between threads can crash.
                local.codec = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=False)
                local.small = zstandard.ZstdCompressor(level=SMALL_BLOB_LEVEL, write_checksum=False)
            else:
                local.codec = Codec(ZSTD_LEVEL)
                local.small = Codec(SMALL_BLOB_LEVEL)
                local.scratch = mmap.mmap(-1, local.codec.bound(MAX_SIZE))
                local.reached = 0
        return local

    def compress_into(self, plain: bytes | bytearray | memoryview) -> memoryview:
        """One zstd frame of ``plain`` in this thread's scratch buffer (valid until its next call)."""
        local = self.codecs()
        codec = local.codec
        if len(plain) < MIN_SIZE:
            codec = local.small
        if not NATIVE:
            return memoryview(codec.compress(plain))
        scratch = local.scratch
        keep = _ChunkBuffers.KEEP
        if local.reached > keep:
            # The previous blob was long (its caller is done with it): give back the pages past
            # KEEP that most blobs never need, as the chunk buffers do.
            scratch.madvise(mmap.MADV_DONTNEED, keep, len(scratch) - keep)
            local.reached = 0
        if len(plain) > MAX_SIZE:  # only a tree can be this large
            big = bytearray(codec.bound(len(plain)))
            return memoryview(big)[: codec.compress_into(big, plain)]
        n = local.reached = codec.compress_into(scratch, plain)
        return memoryview(scratch)[:n]

    def maybe_flush_index(self) -> None:
        """Write an index for the packs written so far when the interval is over, so that a backup
        killed later does not leave all its packs unknown to the next one."""
        written = self.repo.packer.packs_written
        if (
            written == self.indexed_packs
            or time.monotonic() - self.last_index < self.index_interval
        ):
            return
        if not self.index_lock.acquire(blocking=False):
            return
        try:
            self.indexed_packs = self.repo.packer.packs_written
            self.repo.flush_index()
            self.last_index = time.monotonic()
        finally:
            self.index_lock.release()

    # -- completion ---------------------------------------------------------------------------

    def reserve(self, d: _Dir) -> int:
        with self.lock:
            d.nodes.append(None)
            d.pending += 1
            return len(d.nodes) - 1

    def complete(self, d: _Dir, slot: int, node: Node | None) -> None:
        """Entry ``slot`` of ``d`` is finished (None: left out). Stores every tree this completes."""
        with self.lock:
            if slot >= 0:
                d.nodes[slot] = node
            d.pending -= 1
            if d.pending:
                return
        while True:
            # d is complete: nothing else refers to it any more.
            tree_id = self.tree_of(d)
            node = d.node
            parent = d.parent
            if node is None:
                self.root_id = tree_id
                self.done.set()
                return
            node.subtree = tree_id
            unmodified = d.previous == tree_id
            with self.stats_lock:
                if not d.had_previous:
                    self.report.dirs_new += 1
                elif unmodified:
                    self.report.dirs_unmodified += 1
                else:
                    self.report.dirs_changed += 1
            assert parent is not None
            if not (unmodified and d.meta_same):
                parent.same = False
            with self.lock:
                parent.nodes[d.slot] = node
                parent.pending -= 1
                if parent.pending:
                    return
            d = parent

    def tree_of(self, d: _Dir) -> bytes:
        """The ID of the finished folder's tree, stored unless the vault has it."""
        entries = d.nodes
        d.nodes = []
        if d.same and d.previous is not None and len(entries) == d.expected:
            # Every entry equals the parent's and none is missing: the parent's tree, which the
            # index has (it was read from the vault), byte for byte.
            return d.previous
        # An unchanged plain file encodes itself from the parent's entry (see _Unchanged.encode).
        nodes = [
            e.node(self.owners) if isinstance(e, _Unchanged) and e.doc is None else e
            for e in entries
        ]
        return self.store(TREE, encode_tree([n for n in nodes if n is not None]))

    def drop_dir(self, d: _Dir) -> None:
        """``d`` cannot be listed: leave it out of its parent, as restic does."""
        assert d.parent is not None
        self.complete(d.parent, d.slot, None)

    def count_file(self, size: int, kind: str) -> None:
        """One more file read; ``kind`` is the report counter it adds to (files_new ...)."""
        with self.stats_lock:
            self.report.total_files_processed += 1
            self.report.total_bytes_processed += size
            setattr(self.report, kind, getattr(self.report, kind) + 1)
            self.files_done += 1

    # -- previous snapshot --------------------------------------------------------------------

    def previous_entries(self, d: _Dir) -> dict[str, dict[str, Any]]:
        """The parent snapshot's entries of folder ``d`` by name; sets up ``d.same``."""
        entries, count = self.load_previous(d.previous)
        d.same = entries is not None
        d.expected = count
        return entries or {}

    def load_previous(self, tree_id: bytes | None) -> tuple[dict[str, dict[str, Any]] | None, int]:
        """A parent tree's entries by name as raw JSON objects (cheaper than Nodes, and comparable
        with ``file_doc``) and how many there are; None when there is none or it cannot be loaded
        (then there is no parent here)."""
        if tree_id is None:
            return None, 0
        try:
            doc = json.loads(self.repo.load_blob(TREE, tree_id))
            entries = doc.get("nodes") or []
            return {fs_name(go_unquote(e["name"])): e for e in entries}, len(entries)
        except (VaultError, ValueError, KeyError, TypeError, AttributeError):
            return None, 0

    def scan(self, path: bytes, previous: bytes | None) -> _Listing:
        """List a folder, ``lstat`` its entries (through the folder's descriptor: the kernel looks up
        one name, not the whole path) and load its parent tree."""
        listing = _Listing()
        if _scan_dir is not None:
            # One GIL-free call for the folder: no GIL hand-off per entry.
            found = _scan_dir(path)
            if isinstance(found, int):
                listing.error = OSError(found, os.strerror(found))
                return listing
            listing.entries = found  # stat tuples and errnos: see _entry_stat
            listing.previous, listing.expected = self.load_previous(previous)
            return listing
        try:
            fd = os.open(path, _DIR_FLAGS)
        except OSError as exc:
            listing.error = exc
            return listing
        try:
            # A descriptor lists str names; back to the exact bytes, in restic's (byte) order.
            names = sorted(os.fsencode(n) for n in os.listdir(fd))
            entries: list[tuple[bytes, os.stat_result | OSError]] = []
            for raw in names:
                try:
                    entries.append((raw, os.lstat(raw, dir_fd=fd)))
                except OSError as exc:
                    entries.append((raw, exc))
            listing.entries = entries
        except OSError as exc:
            listing.error = exc
            return listing
        finally:
            os.close(fd)
        listing.previous, listing.expected = self.load_previous(previous)
        return listing

    def same_node(self, node: Node, prev: dict[str, Any] | None) -> bool:
        """Whether ``node`` (without its subtree) encodes to the parent snapshot's entry."""
        if prev is None:
            return False
        if "subtree" in prev:
            prev = {k: v for k, v in prev.items() if k != "subtree"}
        return bool(json.loads(node.encode()) == prev)

    def reusable_content(
        self, st: os.stat_result, prev: dict[str, Any] | None, times: list[LocalTime]
    ) -> list[bytes] | None:
        """restic's change detection: the parent's content list when the file there had the same
        size, inode, mtime and ctime and all its blobs are still in the index; else None. Puts the
        mtime and ctime it made into ``times`` for reuse."""
        if (
            prev is None
            or prev.get("type") != "file"
            or prev.get("size", 0) != st.st_size
            or prev.get("inode", 0) != st.st_ino
        ):
            return None
        content = prev.get("content")
        if content is None:
            return None
        times += (LocalTime(st.st_mtime_ns), LocalTime(st.st_ctime_ns))
        if prev.get("mtime") != times[0].format() or prev.get("ctime") != times[1].format():
            return None
        try:
            ids = [bytes.fromhex(c) for c in content]
        except (TypeError, ValueError):
            return None
        has = self.index.has
        for blob_id in ids:
            if not has(blob_id, DATA):
                return None
        return ids

    # -- walking ------------------------------------------------------------------------------

    def add_entry(
        self,
        d: _Dir,
        name: str,
        path: bytes,
        abspath: str,
        prev: dict[str, Any] | None,
        subdirs: list[_Pending],
        st: os.stat_result | OSError | None = None,
    ) -> None:
        """One directory entry (or leaf target): left out, recorded now, or handed to the readers.
        ``st`` is its ``lstat`` (or the error it gave) when the folder was scanned ahead."""
        if self.excluder.patterns and self.excluder.excluded_by_name(abspath):
            return
        if st is None:
            try:
                st = os.lstat(path)
            except OSError as exc:
                st = exc
        if isinstance(st, OSError):
            self.problem(abspath, _os_message(st))
            return
        mode = st.st_mode
        if self.excluder.devices is not None and self.excluder.excluded_by_device(
            abspath, st.st_dev, stat.S_ISDIR(mode)
        ):
            return
        if stat.S_ISREG(mode):
            self.add_file(d, name, path, abspath, prev, st)
            return
        if stat.S_ISSOCK(mode) or node_type(mode) is None:
            return  # restic's backup leaves sockets out
        try:
            node = node_from_stat(name, path, st, self.owners)
        except OSError as exc:
            d.same = False
            self.problem(abspath, _os_message(exc))
            return
        if node.type == "dir":
            sub = _Dir(d, self.reserve(d), node, _subtree(prev))
            sub.had_previous = prev is not None and prev.get("type") == "dir"
            sub.meta_same = d.same and self.same_node(node, prev)
            subdirs.append(_Pending(sub, path, abspath))
            return
        if d.same and not self.same_node(node, prev):
            d.same = False
        d.nodes.append(node)

    def unchanged_files(
        self, listing: _Listing, prev: dict[str, dict[str, Any]]
    ) -> list[list[bytes] | None] | None:
        """For each entry, the parent's content IDs when it is a file whose node would encode to the
        parent's entry unchanged (found by one C call for the folder); None where Python decides.
        Only without excludes, whose checks come first (see add_entry)."""
        if (
            _unchanged_files is None
            or not prev
            or self.excluder.patterns
            or self.excluder.devices is not None
        ):
            return None
        users, groups = self.owners.known()
        return _unchanged_files(listing.entries, prev, users, groups)

    def add_unchanged(
        self,
        d: _Dir,
        name: str,
        path: bytes,
        st: tuple[int, ...],
        content: list[bytes],
        doc: dict[str, Any],
    ) -> bool:
        """add_file for a file ``unchanged_files`` found equal to the parent's entry ``doc`` (which
        has no extended attributes): False if a blob of it is no longer in the index."""
        has = self.index.has
        for blob_id in content:
            if not has(blob_id, DATA):
                return False
        self.unmodified_files += 1
        self.unmodified_bytes += st[6]
        # Whether or not the folder's tree is made anew, the entry encodes itself from doc.
        d.nodes.append(_Unchanged(name, path, st, [], [], content, doc))
        return True

    def add_file(
        self,
        d: _Dir,
        name: str,
        path: bytes,
        abspath: str,
        prev: dict[str, Any] | None,
        st: os.stat_result,
    ) -> None:
        times: list[LocalTime] = []
        content = self.reusable_content(st, prev, times)
        if content is None:
            d.same = False
            job = _File(d, self.reserve(d), abspath, prev is not None)
            if st.st_size >= MIN_SIZE:
                self.submit([(job, name, path)])
                return
            # Small files travel in batches: a hand-off to a reader thread costs about as much as
            # reading a small file.
            self.batch.append((job, name, path))
            self.batch_bytes += st.st_size
            if len(self.batch) >= BATCH_FILES or self.batch_bytes >= BATCH_BYTES:
                self.submit_batch()
            return
        assert prev is not None
        # Setting an extended attribute (like chmod, chown, link and unlink) updates the ctime, which
        # is the parent's here: the attributes are the parent's too, no need to list them again.
        xattrs = _xattrs_of(prev)
        if xattrs is None:
            try:
                xattrs = read_xattrs(path)
            except OSError as exc:
                d.same = False
                self.problem(abspath, _os_message(exc))
                return
        # Counted here, in the walking thread only: no lock per file.
        self.unmodified_files += 1
        self.unmodified_bytes += st.st_size
        if d.same:
            doc = file_doc(
                go_quote(fs_bytes(name)),
                st,
                self.owners,
                times[0],
                times[1],
                xattrs,
                prev["content"],
            )
            if doc == prev:
                d.nodes.append(_Unchanged(name, path, st, times, xattrs, content))
                return
            d.same = False
        node = _Unchanged(name, path, st, times, xattrs, content).node(self.owners)
        d.nodes.append(node)

    def walk_targets(self, top: _Target, root: _Dir) -> list[_Pending]:
        """Lay out the target tree under ``root``; returns the folders still to be walked."""
        pending: list[_Pending] = []
        stack = [(top, root)]
        while stack:
            target, d = stack.pop()
            prev = self.previous_entries(d)
            for raw in sorted(target.nodes):
                child = target.nodes[raw]
                name = fs_name(raw)
                if child.path is not None:
                    abspath = _abspath(child.path)
                    self.add_entry(d, name, child.path, abspath, prev.get(name), pending)
                    continue
                assert child.info_path is not None
                try:
                    st = os.stat(child.info_path)
                    if not stat.S_ISDIR(st.st_mode):
                        raise OSError(errno.ENOTDIR, "not a folder")
                    node = node_from_stat(name, child.info_path, st, self.owners)
                except OSError as exc:
                    self.problem(_abspath(child.info_path), _os_message(exc))
                    continue
                p = prev.get(name)
                sub = _Dir(d, self.reserve(d), node, _subtree(p))
                sub.had_previous = p is not None and p.get("type") == "dir"
                sub.meta_same = d.same and self.same_node(node, p)
                stack.append((child, sub))
            # Virtual folders are complete once laid out; the entries they hold finish them later.
            self.complete(d, -1, None)
        return pending

    def walk(self, pending: list[_Pending]) -> None:
        """Depth-first over the folders to back up, in name order. (Listing folders ahead in a helper
        thread was tried: the GIL hand-offs cost more than the overlap gained.)"""
        stack = list(reversed(pending))
        while stack:
            self.check()
            item = stack.pop()
            d = item.dir
            listing = self.scan(item.path, d.previous)
            if listing.error is not None:
                self.problem(item.abspath, _os_message(listing.error))
                self.drop_dir(d)
                continue
            prev = listing.previous
            if prev is not None:
                d.same = True
                d.expected = listing.expected
            else:
                d.same = False
                prev = {}
            subdirs: list[_Pending] = []
            base = item.path if item.path.endswith(b"/") else item.path + b"/"
            abase = item.abspath if item.abspath.endswith("/") else item.abspath + "/"
            reusable = self.unchanged_files(listing, prev)
            for i, (raw, st) in enumerate(listing.entries):
                name = fs_name(raw)
                ids = reusable[i] if reusable is not None else None
                if ids is not None and self.add_unchanged(d, name, base + raw, st, ids, prev[name]):
                    continue
                self.add_entry(
                    d, name, base + raw, abase + name, prev.get(name), subdirs, _entry_stat(st)
                )
            self.complete(d, -1, None)
            stack.extend(reversed(subdirs))
        self.submit_batch()

    # -- reading files (reader threads) -------------------------------------------------------

    def submit(self, jobs: list[tuple[_File, str, bytes]]) -> None:
        self.file_slots.acquire()
        self.readers.submit(self.read_files, jobs)

    def submit_batch(self) -> None:
        if self.batch:
            batch, self.batch, self.batch_bytes = self.batch, [], 0
            self.submit(batch)

    def read_files(self, jobs: list[tuple[_File, str, bytes]]) -> None:
        try:
            if _read_files is not None and len(jobs) > 1:
                self._read_batch(jobs)
            else:
                for job, name, path in jobs:
                    self._read_file(job, name, path)
        except _Cancelled:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which re-raises
            self.fail(exc)
        finally:
            self.file_slots.release()

    def _read_batch(self, jobs: list[tuple[_File, str, bytes]]) -> None:
        """Small files: opened, checked and read whole by one C call (one GIL hand-off for the batch
        instead of about six per file), hashed by one, and stored by ``store_spans``. A file that
        turned out too long for that comes back open and is chunked like any large file."""
        if self.cancel.is_set():
            return
        state = self.reader_state
        if state.batch is None:
            state.batch = mmap.mmap(-1, BATCH_BUFFER)
        buf = state.batch
        results = _read_files([path for _, _, path in jobs], buf, MIN_SIZE)
        big: list[tuple[_File, str, bytes, int]] = []
        read: list[
            tuple[_File, str, bytes, tuple[int, ...], int, int, list[tuple[str, bytes]]]
        ] = []
        try:
            for (job, name, path), res in zip(jobs, results, strict=True):
                status = res[0]
                if status == _READ:
                    read.append((job, name, path, res[1], res[2], res[3], res[4]))
                elif status == _BIG:
                    big.append((job, name, path, res[1]))
                elif status == _NOT_REGULAR:
                    self.problem(job.abspath, "changed type while being backed up")
                    self.complete(job.dir, job.slot, None)
                else:
                    self.problem(job.abspath, _os_message(OSError(res[1], os.strerror(res[1]))))
                    self.complete(job.dir, job.slot, None)
            spans: list[int] = []
            for item in read:
                if item[5]:
                    spans += (item[4], item[5])
            ids = iter(self.store_spans(buf, spans) if spans else ())
            total = 0
            owners = self.owners
            for job, name, path, t, _offset, length, xattrs in read:
                node = node_from_stat(name, path, _stat_result(t), owners, xattrs=xattrs)
                node.size = length
                node.content = [next(ids)] if length else []
                total += length
                self.complete(job.dir, job.slot, node)
            with self.stats_lock:
                report = self.report
                report.total_files_processed += len(read)
                report.total_bytes_processed += total
                known = sum(1 for item in read if item[0].known)
                report.files_changed += known
                report.files_new += len(read) - known
                self.files_done += len(read)
                self.bytes_done += total
            while big:
                job, name, path, fd = big.pop(0)
                self._read_file(job, name, path, fd)
        finally:
            for _job, _name, _path, fd in big:
                os.close(fd)

    def store_spans(self, data: mmap.mmap, spans: list[int]) -> list[bytes]:
        """``store`` for many blobs at once, ``data[offset:offset + length]`` for each (offset, length)
        in ``spans`` (none empty): hashed, compressed and sealed with one GIL hand-off each for all
        of them. Returns their IDs in order."""
        ids = sha256_spans(data, spans)
        todo = [i for i, blob_id in enumerate(ids) if self.claim(blob_id, DATA)]
        if not todo:
            return ids
        sizes = [spans[2 * i + 1] for i in todo]
        if self.dry_run:
            stored = sum(sizes)
        else:
            todo_spans: list[int] = []
            for i in todo:
                todo_spans += (spans[2 * i], spans[2 * i + 1])
            if self.compress:
                local = self.codecs()
                scratch = local.scratch
                lengths = local.small.compress_spans(scratch, data, todo_spans)
                local.reached = max(local.reached, sum(lengths))
                view = memoryview(scratch)
                srcs = []
                pos = 0
                for n in lengths:
                    srcs.append(view[pos : pos + n])
                    pos += n
            else:
                view = memoryview(data)
                srcs = [
                    view[todo_spans[k] : todo_spans[k] + todo_spans[k + 1]]
                    for k in range(0, len(todo_spans), 2)
                ]
                lengths = sizes
            assert self.packer is not None
            packer = self.packer
            wanted = [
                (ids[i], lengths[k] + OVERHEAD, sizes[k] if self.compress else 0)
                for k, i in enumerate(todo)
            ]
            try:
                done = 0
                while done < len(wanted):
                    # As many slots as fit without waiting for a pack buffer; sealed and committed
                    # before asking for more (see PackWriter.reserve_many).
                    got = packer.reserve_many(DATA, wanted[done:])
                    slots = [(slot, srcs[done + k]) for k, slot in enumerate(got) if slot]
                    try:
                        seal_many(self.repo.key.raw, [(slot.view, src) for slot, src in slots])
                    except BaseException:
                        for slot, _src in slots:
                            packer.abort(slot)
                        raise
                    for slot, _src in slots:
                        packer.commit(slot)
                    done += len(got)
            finally:
                srcs.clear()
                view.release()
            stored = sum(lengths) + OVERHEAD * len(lengths)
        with self.stats_lock:
            self.report.data_blobs += len(todo)
            self.report.data_added += sum(sizes)
            self.report.data_added_packed += stored
        return ids

    def _read_file(self, job: _File, name: str, path: bytes, fd: int | None = None) -> None:
        if self.cancel.is_set():
            if fd is not None:
                os.close(fd)
            return
        if fd is None:
            try:
                fd = _open_file(path)
            except OSError as exc:
                self.problem(job.abspath, _os_message(exc))
                self.complete(job.dir, job.slot, None)
                return
        size = 0
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "changed type while being backed up")
            job.node = node_from_stat(name, path, st, self.owners, fd=fd)
            size = self._chunk(job, fd)
            # What was read, even if the file grew or shrank since fstat: size and content agree.
            job.node.size = size
        except OSError as exc:
            job.failed = True
            self.problem(job.abspath, _os_message(exc))
        finally:
            os.close(fd)
        if not job.failed:
            self.count_file(size, "files_changed" if job.known else "files_new")
        self.file_part_done(job)

    def _chunk(self, job: _File, fd: int) -> int:
        """Read and cut the file; returns its size. Chunks before the last go to the workers; the
        last one (for most files the only one) is stored right here, straight from the buffer."""
        state = self.reader_state
        if state.buffer is None or state.chunker is None:
            state.buffer = mmap.mmap(-1, MAX_SIZE + READ_SIZE)
            state.chunker = Chunker(self.polynomial)
        chunker = state.chunker
        chunker.reset()
        view = memoryview(state.buffer)
        reached = 0  # how far into the buffer this file's reads went
        try:
            fill = 0  # bytes of the unfinished chunk at the front of the buffer
            fed = 0  # how many of them the chunker has seen
            total = 0
            while True:
                if self.cancel.is_set():
                    raise _Cancelled
                n = os.readv(fd, [view[fill : fill + READ_SIZE]])
                if n == 0:
                    break
                total += n
                fill += n
                reached = max(reached, fill)
                if fill < MIN_SIZE:
                    # No chunk ends before the minimum size, so the chunker (and its GIL hand-off)
                    # is not needed yet, and never for a file smaller than that.
                    continue
                start = 0
                for end in chunker.feed(view[fed:fill]):
                    self.submit_chunk(job, view[start : fed + end])
                    start = fed + end
                fed = fill
                if start:
                    view[: fill - start] = view[start:fill]
                    fill -= start
                    fed -= start
            if fill:
                blob_id = self.store(DATA, view[:fill])
                with self.lock:
                    job.content.append(blob_id)
                self.progress_bytes(fill)
            return total
        finally:
            view.release()
            if reached > _ChunkBuffers.KEEP:
                # A long chunk made pages resident that most files never need again: give them back.
                state.buffer.madvise(
                    mmap.MADV_DONTNEED, _ChunkBuffers.KEEP, reached - _ChunkBuffers.KEEP
                )

    def submit_chunk(self, job: _File, chunk: memoryview) -> None:
        """Copy a chunk out of the read buffer into a free chunk buffer (waiting for one: this bounds
        the chunks in flight) and hand it to the workers."""
        buf = self.buffers.get()
        size = len(chunk)
        buf[:size] = chunk
        with self.lock:
            job.pending += 1
            slot = len(job.content)
            job.content.append(None)
        try:
            self.workers.submit(self.store_chunk, job, slot, buf, size)
        except RuntimeError:  # the pool is shutting down after a failure
            self.buffers.put(buf, size)
            raise _Cancelled from None

    def store_chunk(self, job: _File, slot: int, buf: mmap.mmap, size: int) -> None:
        view = memoryview(buf)[:size]
        try:
            if self.cancel.is_set():
                return
            job.content[slot] = self.store(DATA, view)
            self.progress_bytes(size)
            self.file_part_done(job)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which re-raises
            self.fail(exc)
        finally:
            view.release()
            self.buffers.put(buf, size)

    def progress_bytes(self, n: int) -> None:
        with self.stats_lock:
            self.bytes_done += n

    def file_part_done(self, job: _File) -> None:
        with self.lock:
            job.pending -= 1
            if job.pending:
                return
        node = job.node
        if job.failed or node is None:
            self.complete(job.dir, job.slot, None)
            return
        node.content = [c for c in job.content if c is not None]
        self.complete(job.dir, job.slot, node)

    # -- finishing ----------------------------------------------------------------------------

    def wait(self) -> bytes:
        """Wait until the root tree is stored (or a worker failed, which is raised here)."""
        while not self.done.wait(0.2):
            self.check()
        self.check()
        assert self.root_id is not None
        with self.stats_lock:
            self.report.files_unmodified += self.unmodified_files
            self.report.total_files_processed += self.unmodified_files
            self.report.total_bytes_processed += self.unmodified_bytes
        return self.root_id

    def shutdown(self) -> None:
        """Stop the threads; blobs already sealed still go into packs."""
        self.readers.shutdown(wait=True, cancel_futures=True)
        self.workers.shutdown(wait=True, cancel_futures=True)
        if self.packer is not None:
            self.packer.stop_writers()

    def progress(self, started: float, scan: _Scan | None) -> BackupProgress:
        with self.stats_lock:
            return BackupProgress(
                seconds=time.monotonic() - started,
                files_done=self.files_done + self.unmodified_files,
                bytes_done=self.bytes_done + self.unmodified_bytes,
                total_files=scan.files if scan else 0,
                total_bytes=scan.bytes if scan else 0,
                scan_finished=scan.finished if scan else False,
                errors=len(self.report.errors),
            )


def _subtree(prev: dict[str, Any] | None) -> bytes | None:
    if prev is None or prev.get("type") != "dir" or not prev.get("subtree"):
        return None
    try:
        return bytes.fromhex(prev["subtree"])
    except (TypeError, ValueError):
        return None


def _xattrs_of(prev: dict[str, Any]) -> list[tuple[str, bytes]] | None:
    """A parent node's extended attributes, or None if they do not decode."""
    attrs = prev.get("extended_attributes")
    if not attrs:
        return []
    try:
        return [(a["name"], base64.b64decode(a.get("value") or "", validate=True)) for a in attrs]
    except (KeyError, TypeError, ValueError):
        return None


def _abspath(path: bytes) -> str:
    return go_clean(os.fsdecode(os.path.join(os.getcwdb(), path)))


def _entry_stat(st: os.stat_result | OSError | tuple[int, ...] | int) -> os.stat_result | OSError:
    """A listing's lstat as add_entry takes it (scan_dir gives a stat tuple or an errno)."""
    if isinstance(st, tuple) and not isinstance(st, os.stat_result):
        return _stat_result(st)
    if isinstance(st, int):
        return OSError(st, os.strerror(st))
    return st


def _stat_result(t: tuple[int, ...]) -> os.stat_result:
    """The os.stat_result of a stat tuple of vaultfs.ops._files: (mode, ino, dev, nlink, uid, gid, size,
    atime_ns, mtime_ns, ctime_ns, rdev, blksize, blocks)."""
    (a, a_ns), (m, m_ns), (c, c_ns) = divmod(t[7], 10**9), divmod(t[8], 10**9), divmod(t[9], 10**9)
    return os.stat_result(
        (*t[:7], a, m, c, a + a_ns * 1e-9, m + m_ns * 1e-9, c + c_ns * 1e-9,
         t[7], t[8], t[9], t[11], t[12], t[10])
    )  # fmt: skip


def _open_file(path: bytes) -> int:
    if _NOATIME:
        try:
            return os.open(path, _OPEN_FLAGS | _NOATIME)
        except PermissionError:
            pass  # O_NOATIME needs to own the file; read it the ordinary way
    return os.open(path, _OPEN_FLAGS)


def _os_message(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "changed into a symlink while being backed up"
    return exc.strerror or str(exc)


# -- totals for the progress bar --------------------------------------------------------------------


class _Scan(threading.Thread):
    """Counts files and bytes of the targets (with the same excludes) so progress can show an ETA."""

    def __init__(self, paths: list[bytes], excluder: Excluder, cancel: threading.Event) -> None:
        super().__init__(name="vault-backup-scan", daemon=True)
        self.paths = paths
        self.excluder = excluder
        self.cancel = cancel
        self.files = 0
        self.bytes = 0
        self.finished = False

    def run(self) -> None:
        stack = [(p, _abspath(p)) for p in self.paths]
        while stack and not self.cancel.is_set():
            path, abspath = stack.pop()
            if self.excluder.excluded_by_name(abspath):
                continue
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                self.files += 1
                self.bytes += st.st_size
            elif stat.S_ISDIR(st.st_mode):
                if self.excluder.excluded_by_device(abspath, st.st_dev, True):
                    continue
                try:
                    names = os.listdir(path)
                except OSError:
                    continue
                base = path.rstrip(b"/") + b"/"
                abase = abspath.rstrip("/") + "/"
                stack.extend((base + n, abase + fs_name(n)) for n in names)
        self.finished = True


# -- entry point ----------------------------------------------------------------------------------


def find_parent(
    repo: Repository, abs_paths: list[str], host: str, before: GoTime
) -> tuple[str, Snapshot] | None:
    """restic's default parent: the newest snapshot of ``host`` that holds all ``abs_paths`` and is not
    newer than ``before``."""
    snaps = filter_snapshots(repo.list_snapshots(), hosts=[host], paths=abs_paths)
    snaps = [(sid, s) for sid, s in snaps if s.time.ns <= before.ns]
    return snaps[-1] if snaps else None


def backup(
    repo: Repository,
    paths: Sequence[str | bytes | os.PathLike[str]],
    *,
    tags: Sequence[str] = (),
    host: str | None = None,
    excludes: Sequence[str] = (),
    exclude_files: Sequence[str | os.PathLike[str]] = (),
    one_file_system: bool = False,
    parent: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    snapshot_time: GoTime | None = None,
    progress: ProgressCallback | None = None,
    on_problem: ProblemCallback | None = None,
    readers: int = DEFAULT_READERS,
    workers: int = DEFAULT_WORKERS,
    index_interval: float = DEFAULT_INDEX_INTERVAL,
    gate: LockGate | None = None,
) -> BackupReport:
    """Back up ``paths`` (files or folders, absolute or relative to the current folder) into ``repo``
    and write a snapshot, unless ``dry_run``.

    ``host`` defaults to this machine's name. ``parent`` is a snapshot ID, prefix or ``latest`` to use
    for change detection instead of the default (see the module docstring); ``force`` reads every file
    and records no parent. ``excludes`` and ``exclude_files`` are restic patterns
    (:mod:`vaultfs.ops.excludes`); ``one_file_system`` stays on the targets' file systems.
    ``progress`` is called about twice a second from a helper thread; ``on_problem`` for each item left
    out, from any thread. Both must be thread-safe and quick.

    The caller must hold a lock on the vault (shared is enough), or pass a ``gate`` that is taking
    one: then nothing is written before the lock is held. Loads the index if needed. Raises
    UsageError for bad patterns or when no target exists, NotFoundError for an unknown ``parent``,
    VaultError when the vault cannot be written. Problems with source files go into the report (the
    snapshot is still written). On KeyboardInterrupt the packs and index written so far are completed
    and the interruption propagates; no snapshot is written. Never prints.
    """
    started = time.monotonic()
    if readers < 1 or workers < 1:
        raise UsageError("readers and workers must be at least 1")
    if not paths:
        raise UsageError("nothing to back up: give at least one file or folder")
    when = snapshot_time or GoTime.now()
    host = host or local_hostname()
    problems: list[BackupProblem] = []
    existing: list[bytes] = []
    for p in paths:
        raw = os.fsencode(p)
        try:
            os.lstat(raw)
        except OSError as exc:
            problems.append(BackupProblem(_abspath(raw), f"cannot back up: {_os_message(exc)}"))
            continue
        existing.append(raw)
    if not existing:
        reasons = "; ".join(f"{display_path(p.path)}: {p.message}" for p in problems)
        raise UsageError(f"nothing to back up, no target can be read ({reasons})")
    abs_paths = [_abspath(p) for p in existing]
    excluder = Excluder(
        excludes, exclude_files, one_file_system_targets=abs_paths if one_file_system else None
    )
    try:
        top = build_targets(existing)
    except OSError as exc:
        raise UsageError(f"cannot read the backup targets: {_os_message(exc)}") from None

    if not repo.index_loaded:
        repo.load_index()
    parent_id = ""
    parent_tree: bytes | None = None
    if not force:
        if parent:
            parent_id, parent_snap = repo.find_snapshot(parent)
            parent_tree = parent_snap.tree
        else:
            found = find_parent(repo, abs_paths, host, when)
            if found is not None:
                parent_id, parent_tree = found[0], found[1].tree

    job = _Backup(
        repo,
        excluder=excluder,
        dry_run=dry_run,
        readers=readers,
        workers=workers,
        index_interval=index_interval,
        on_problem=on_problem,
        gate=gate,
    )
    for item in problems:
        job.problem(item.path, item.message)
    report = job.report
    report.paths = abs_paths
    report.parent_id = parent_id

    scan = None
    ticker = None
    stop_ticker = threading.Event()
    if progress is not None:
        scan = _Scan(existing, excluder, job.cancel)
        scan.start()

        def tick() -> None:
            while not stop_ticker.wait(PROGRESS_INTERVAL):
                progress(job.progress(started, scan))

        ticker = threading.Thread(target=tick, name="vault-backup-progress", daemon=True)
        ticker.start()

    try:
        try:
            root = _Dir(None, -1, None, parent_tree)
            job.walk(job.walk_targets(top, root))
            root_id = job.wait()
        except BaseException as exc:
            job.cancel.set()
            job.shutdown()
            if not dry_run and job.gate_open:
                # Packs already filled are written and indexed so a later backup reuses them; a
                # failing vault may fail again here, which must not hide the first error.
                try:
                    repo.flush()
                except VaultError:
                    pass
            if isinstance(exc, _Cancelled) and job.failure is not None:
                raise job.failure from None
            raise
        job.shutdown()
        job.open_gate()
        if not dry_run:
            repo.flush()  # packs, then the index naming them, then (below) the snapshot
            snap = Snapshot(
                time=when,
                tree=root_id,
                paths=abs_paths,
                hostname=host,
                username=_current_user(),
                uid=os.getuid(),
                gid=os.getgid(),
                excludes=list(excludes),
                tags=_flatten_tags(tags),
                parent=bytes.fromhex(parent_id) if parent_id else None,
            )
            report.snapshot_id = repo.save_snapshot(snap)
    finally:
        job.cancel.set()  # stops the scan thread
        stop_ticker.set()
        if ticker is not None:
            ticker.join()
    report.seconds = time.monotonic() - started
    if progress is not None:
        progress(job.progress(started, scan))
    return report


def _current_user() -> str:
    """The user name restic records (Go's user.Current: the name of the real uid, not $USER)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return ""


def _flatten_tags(tags: Sequence[str]) -> list[str]:
    """restic's TagLists.Flatten: each value may hold several comma-separated tags."""
    return [t.strip() for value in tags for t in value.split(",") if t.strip()]


__all__ = [
    "DEFAULT_READERS",
    "DEFAULT_WORKERS",
    "BackupProblem",
    "BackupProgress",
    "BackupReport",
    "LockGate",
    "backup",
    "build_targets",
    "display_path",
    "find_parent",
]
