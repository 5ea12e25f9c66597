"""Restore a snapshot (or a folder or file inside it) into a target folder, as restic's ``restore`` does.

Two phases:

1. **Walk** (calling thread): the snapshot's trees are walked depth-first in name order, the include/exclude
   patterns are applied, folders, symlinks, fifos, devices and hardlinks are created, and every regular file
   is created empty. Each data blob a file needs is planned as (file, offset): the offset of a chunk is the
   sum of the plaintext sizes of the chunks before it, which the index knows without reading anything.
2. **Content** (worker threads): the planned blobs are grouped by pack, blobs of one pack that lie close
   together are read with one range read (from a local vault into the worker's own buffer), each blob is
   decrypted (in place when it can), decompressed and checked against its ID (``Repository.decode_blob``)
   and written with ``os.pwrite`` at its offsets. Each worker reuses its read and decode buffers, and at
   most a few ranges (a few MiB each) are in flight, so memory stays bounded whatever the file sizes. Trees
   are read without the repository's tree cache: a folder's nodes are dropped once it is walked. A file's
   metadata is applied by the worker that writes its last chunk. AES, zstd, SHA-256 and file I/O release
   the GIL, so the workers use both cores.

Finally folder metadata is applied bottom-up, so creating an entry inside a folder never changes the folder's
mtime after it has been set.

Metadata follows restic: mode with setuid/setgid/sticky, atime and mtime with nanoseconds (symlinks' own
times too), numeric owners when running as root, extended attributes; files with ``links > 1`` that share
``inode`` and ``device_id`` in the snapshot become hardlinks of one file; fifos, and devices when root.
Sockets are skipped, as restic does.

Include and exclude patterns have restic's semantics (its ``filter`` package; parsing and matching live in
``vaultfs.ops.excludes``, shared with backup): a pattern is split at ``/`` and matched component-wise with
Go's ``filepath.Match`` syntax against the path inside the restored tree (``/`` plus the path below the
snapshot root or the chosen sub-folder); a pattern starting with ``/`` is anchored at the root and matches a
path that starts with it, any other pattern matches any run of consecutive components; ``**`` matches any
number of folders; ``!pattern`` un-matches. Includes keep matching items and the folders leading to them.

Errors: a blob that is missing or corrupt is reported with the file, pack and blob, and the restore goes on
with everything else; an existing target entry is reported and skipped unless ``overwrite``. A target that
cannot be created or written, or a full disk, raises a VaultError.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import gc
import hashlib
import heapq
import mmap
import os
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from vaultfs.backend import LocalBackend
from vaultfs.crypto import NATIVE, NONCE_SIZE, OVERHEAD
from vaultfs.errors import FormatError, IntegrityError, NotFoundError, UsageError, VaultError
from vaultfs.format import unpacked
from vaultfs.format.pack import DATA, TREE
from vaultfs.format.tree import (
    Node,
    decode_tree,
    display_path,
    fs_bytes,
)
from vaultfs.ops import fsmeta
from vaultfs.ops.excludes import Pattern, matches_any, parse_patterns, split_path
from vaultfs.repo.masterindex import BlobLocation
from vaultfs.repo.repository import Repository

if NATIVE:
    from vaultfs.chunker._blob import Codec
try:
    from vaultfs.ops._newfile import write_file as _write_file
except ImportError:  # a build without the C part: the Python path below does the same
    _write_file = None  # type: ignore[assignment]

#: Blobs of one pack closer than this are read together: reading a small gap is cheaper than a second read.
MERGE_GAP = 256 * 1024
#: Largest range read of several blobs (a single larger blob is still read in one piece). With at most
#: workers + 2 ranges in flight this bounds the memory for content (read plus decoded) to a few dozen MiB.
MAX_RANGE = 4 * 1024 * 1024
#: Decoded bytes a worker's buffers keep resident between blobs (chunks average 1 MiB).
KEEP_DECODED = 2 * 1024 * 1024
#: Worker threads for reading, decoding and writing.
DEFAULT_WORKERS = 4
#: The walk hands its planned blobs to the workers whenever this much content (or this many blobs) is
#: planned: big enough to merge neighbouring blobs into one read, small enough to start writing early.
BATCH_BYTES = 64 * 1024 * 1024
BATCH_BLOBS = 2048
#: Trees loaded ahead of the walk (and not yet entered) at most: a few MB of nodes.
PREFETCH_TREES = 256
#: The progress callback is called after at least this many more bytes (and at the end).
PROGRESS_STEP = 1024 * 1024
#: A chunk of a file the walk created (one of several chunks) with at least this many bytes is written
#: with O_DIRECT: its plaintext is decoded at the file offset's alignment in the worker's buffer, the
#: whole blocks go straight to the disk and only the partial blocks at its ends through the page cache.
#: Copying into freshly allocated page-cache pages costs more CPU than everything else a write does
#: (1 GiB buffered into ext4 here: 0.5-1.4 CPU-seconds; with O_DIRECT 0.09).
DIRECT_MIN = 256 * 1024
_ALIGN = 4096

_WRITE_FLAGS = os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW
_CREATE_FLAGS = _WRITE_FLAGS | os.O_CREAT | os.O_EXCL
# Times the kernel takes (fsmeta.apply_times substitutes or skips others; those files take the Python path).
_MIN_NS, _MAX_NS = -(2**63) + 1, 2**63 - 1
# Codec.check_blobs: a table entry (offset, length, uncompressed length, then the ID), and the statuses
# that say nothing was written yet (tag wrong; too short or outside the data)
_ENTRY = struct.Struct("<QQQ")
_CHECK_AUTH, _CHECK_RANGE = 1, 5
# These hit every later write as well: stop the whole restore with one clear message.
_FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}

ProgressCallback = Callable[[int, int], None]


# -- report -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoreProblem:
    """One problem with one item. ``path`` is the item's path inside the restored tree (``/a/b``),
    a str decoded with surrogateescape; ``display_path`` makes it printable."""

    path: str
    message: str


@dataclass
class RestoreReport:
    """What a restore did. ``errors`` make the restore incomplete (exit 1), ``warnings`` are metadata that
    could not be applied (an xattr the target file system refuses, a device without root)."""

    snapshot_id: str
    target: str
    dry_run: bool = False
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    special: int = 0
    hardlinks: int = 0
    bytes: int = 0
    skipped: int = 0
    errors: list[RestoreProblem] = field(default_factory=list)
    warnings: list[RestoreProblem] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict:
        return {
            "message_type": "summary",
            "snapshot_id": self.snapshot_id,
            "target": display_path(self.target),
            "dry_run": self.dry_run,
            "files_restored": self.files,
            "dirs_restored": self.dirs,
            "symlinks_restored": self.symlinks,
            "special_restored": self.special,
            "hardlinks_restored": self.hardlinks,
            "bytes_restored": self.bytes,
            "skipped": self.skipped,
            "errors": [{"path": display_path(p.path), "message": p.message} for p in self.errors],
            "warnings": [
                {"path": display_path(p.path), "message": p.message} for p in self.warnings
            ],
            "seconds": round(self.seconds, 3),
        }


# -- selection ----------------------------------------------------------------------------------


class _Include:
    """An include pattern plus what ``filter.ListWithChild`` needs: whether something below a path may
    still match. A relative pattern always may; an anchored one when the path is a prefix it can extend."""

    def __init__(self, pattern: Pattern) -> None:
        self.pattern = pattern
        self.negated = pattern.negated
        parts = pattern.parts
        self.anchored = parts[0].text == "/"
        self.star = next((i for i, p in enumerate(parts) if p.double_star), -1)
        # The pattern cut after n components, for n >= 2 (a path has the root marker and one name).
        self.prefixes = {
            n: Pattern("/".join(p.text for p in parts[:n]))
            for n in range(2, len(parts) + 1)
            if self.anchored
        }

    def match(self, strs: list[str]) -> bool:
        return self.pattern.match(strs)

    def child_may_match(self, strs: list[str]) -> bool:
        if not self.anchored:
            return True
        if self.star >= 0 and len(strs) >= self.star:
            strs = strs[: self.star]
        n = min(len(strs), len(self.pattern.parts))
        return n < 2 or self.prefixes[n].match(strs)


class Selector:
    """restic's restore selection: ``select(location, is_dir) -> (restore it, look inside it)``.

    With excludes, an item is restored unless an exclude matches it, and a folder is entered only when it
    is restored. With includes, an item is restored when an include matches it, and a folder is entered
    when an include may match something below it. Without patterns everything is restored.
    """

    def __init__(self, include: Iterable[str] = (), exclude: Iterable[str] = ()) -> None:
        self.include = [_Include(p) for p in parse_patterns(include)]
        self.exclude = parse_patterns(exclude)
        if self.include and self.exclude:
            raise UsageError("--include and --exclude cannot be combined (as in restic)")

    @property
    def active(self) -> bool:
        return bool(self.include or self.exclude)

    def _included(self, strs: list[str]) -> tuple[bool, bool]:
        # restic's filter.ListWithChild: in order, "!" patterns take back both answers.
        negations = any(p.negated for p in self.include)
        matched = child = False
        for pat in self.include:
            m = pat.match(strs)
            if pat.negated:
                matched = matched and not m
                child = child and not m
                continue
            matched = matched or m
            child = child or pat.child_may_match(strs)
            if matched and child and not negations:
                break
        return matched, child

    def select(self, location: str, is_dir: bool) -> tuple[bool, bool]:
        if self.exclude:
            rejected = matches_any(self.exclude, location)
            return not rejected, (not rejected) and is_dir
        if self.include:
            matched, child = self._included(split_path(location))
            return matched, child and is_dir
        return True, is_dir


# -- restore ------------------------------------------------------------------------------------


class _Fatal(Exception):
    """Carries a VaultError out of a worker thread."""


@dataclass(eq=False)
class _File:
    path: bytes
    location: str
    node: Node
    pending: int  # chunk writes still to come; the writer of the last one applies the metadata
    create: bool  # a worker creates it (single-chunk files); otherwise the walk already did


@dataclass(eq=False)
class _Blob:
    loc: BlobLocation
    targets: list[tuple[_File, int]] = field(default_factory=list)


@dataclass(eq=False)
class _Frame:
    path: bytes
    location: str
    node: Node | None
    nodes: list[Node]
    parent: _Frame | None
    selected: bool
    # None: not created yet; True: exists; False: could not be created (children are skipped)
    ready: bool | None
    key: tuple[int, ...] = ()  # the folder's place in the walk (see _TreeLoader)
    index: int = 0
    restored_child: bool = False


class _TreeLoader:
    """Loads the trees the walk will enter, in the walk's order and ahead of it, in a thread of its own.

    A tree's sub-folders are queued as soon as the tree is loaded (not when the walk gets to the
    folder), so while the walk waits for the workers the loader gets up to ``ahead`` trees ahead of it,
    and the walk rarely waits for a tree. Folders are ordered by their place in the walk: the key of the
    i-th node of a folder with key k is k + (i,), so the smallest queued key is always the next
    folder the walk will enter. A tree that is not queued (a subtree that occurs twice is queued once;
    a folder the walk skipped) is loaded by the walk itself.
    """

    def __init__(
        self,
        load: Callable[[bytes], list[Node]],
        enter: Callable[[str], bool],
        ahead: int,
    ) -> None:
        self._load = load
        self._enter = enter  # whether the walk will enter the folder at this location
        self._ahead = ahead
        self._cond = threading.Condition()
        # a heap of (key, tree ID, location)
        self._queue: list[tuple[tuple[int, ...], bytes, str]] = []
        self._queued: set[bytes] = set()  # queued, being loaded or loaded, not yet taken
        self._dropped: set[bytes] = set()  # still in the heap, but the walk will not take it
        self._loaded: dict[bytes, list[Node] | Exception] = {}
        self._waiting = False  # the walk waits: load past ``ahead``
        self._stop = False
        self._thread: threading.Thread | None = None

    def add(self, nodes: list[Node], location: str, key: tuple[int, ...]) -> None:
        """Queue the sub-folders of a folder (its ``nodes``) that the walk will enter."""
        with self._cond:
            self._add(nodes, location, key)

    def _add(self, nodes: list[Node], location: str, key: tuple[int, ...]) -> None:
        added = False
        for i, node in enumerate(nodes):
            tree_id = node.subtree
            if node.type != "dir" or tree_id is None or tree_id in self._queued:
                continue
            child = f"{location}/{node.name}"
            if not self._enter(child):
                continue
            heapq.heappush(self._queue, (key + (i,), tree_id, child))
            self._queued.add(tree_id)
            self._dropped.discard(tree_id)
            added = True
        if added:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="vault-trees", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def take(self, tree_id: bytes, location: str, key: tuple[int, ...]) -> list[Node]:
        """The nodes of a folder the walk enters (raises VaultError if its tree cannot be read)."""
        with self._cond:
            while tree_id in self._queued and tree_id not in self._loaded:
                self._waiting = True
                self._cond.notify_all()
                self._cond.wait()
            self._waiting = False
            found = self._loaded.pop(tree_id, None)
            self._queued.discard(tree_id)
            self._cond.notify_all()
        if found is None:
            found = self._load(tree_id)
            self.add(found, location, key)
        if isinstance(found, Exception):
            raise found  # a VaultError is the walk's to report; anything else is a bug
        return found

    def drop(self, tree_id: bytes) -> None:
        """The walk will not enter this folder after all."""
        with self._cond:
            if tree_id in self._queued:
                if self._loaded.pop(tree_id, None) is None:
                    self._dropped.add(tree_id)
                self._queued.discard(tree_id)
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._loaded.clear()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and (
                    not self._queue or (len(self._loaded) >= self._ahead and not self._waiting)
                ):
                    self._cond.wait()
                if self._stop:
                    return
                key, tree_id, location = heapq.heappop(self._queue)
                if tree_id in self._dropped:
                    self._dropped.discard(tree_id)
                    continue
            result: list[Node] | Exception
            try:
                result = self._load(tree_id)
            except Exception as exc:  # noqa: BLE001 - raised in the walk's thread by take()
                result = exc
            with self._cond:
                if tree_id in self._queued:
                    self._loaded[tree_id] = result
                    if not isinstance(result, Exception):
                        self._add(result, location, key)
                else:
                    self._dropped.discard(tree_id)  # dropped while it was loaded
                self._cond.notify_all()


def _plain_size(loc: BlobLocation) -> int:
    return loc.uncompressed_length or loc.length - 32


class _Buffer:
    """A worker's reusable buffer (pack ranges it reads, blobs it decodes): a private anonymous mapping
    whose pages stay resident from use to use (no allocation, no page faults each time), except past
    ``keep`` bytes, which a rare long blob makes resident and ``trim`` gives back. Requests larger than
    the mapping get a buffer of their own."""

    SIZE = 9 * 1024 * 1024 + _ALIGN  # the largest chunk (8 MiB), zstd's worst case for it, a shift

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.map = mmap.mmap(-1, self.SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.reached = 0

    def view(self, size: int, shift: int = 0) -> memoryview:
        """``size`` bytes, starting ``shift`` bytes past a page boundary when they fit."""
        if size + shift > self.SIZE:
            return memoryview(bytearray(size))
        self.reached = max(self.reached, size + shift)
        return memoryview(self.map)[shift : shift + size]

    def trim(self) -> None:
        if self.reached > self.keep:
            self.map.madvise(mmap.MADV_DONTNEED, self.keep, self.SIZE - self.keep)
        self.reached = 0


class _Restorer:
    """One restore run. The walk runs in the calling thread and hands batches of planned blobs to the
    worker pool as it goes, so reading and writing content overlaps the walk."""

    def __init__(
        self,
        repo: Repository,
        report: RestoreReport,
        selector: Selector,
        *,
        overwrite: bool,
        dry_run: bool,
        progress: ProgressCallback | None,
        workers: int,
    ) -> None:
        self.repo = repo
        self.report = report
        self.selector = selector
        self.overwrite = overwrite
        self.dry_run = dry_run
        self.progress = progress
        self.workers = max(1, workers)
        self.owners = fsmeta.is_root()
        self.lock = threading.Lock()
        self.plan: dict[bytes, dict[tuple[bytes, int], _Blob]] = {}
        self.plan_bytes = 0
        self.plan_blobs = 0
        self.links: dict[tuple[int, int], bytes] = {}
        # inodes whose first name a worker creates, and the further names to link to them after the content
        self.worker_links: set[tuple[int, int]] = set()
        self.later_links: list[tuple[bytes, bytes, str]] = []
        self.dirs_done: list[tuple[bytes, str, Node]] = []
        self.total_bytes = 0
        self.done_bytes = 0
        self.shown_bytes = 0
        self.abort = threading.Event()
        self.pool: ThreadPoolExecutor | None = None
        self.running: set[Future[None]] = set()
        self.trees = _TreeLoader(
            self.load_tree, lambda location: selector.select(location, True)[1], PREFETCH_TREES
        )
        self.local = threading.local()  # per worker: read and decode buffers, zstd context
        self.key_raw = repo.key.raw
        inner = getattr(repo.backend, "inner", repo.backend)
        self.pack_path = inner.path if isinstance(inner, LocalBackend) else None

    # -- problems ---------------------------------------------------------------------------------

    def error(self, location: str, message: str) -> None:
        with self.lock:
            self.report.errors.append(RestoreProblem(location, message))

    def warn(self, location: str, messages: list[str]) -> None:
        if messages:
            with self.lock:
                self.report.warnings.extend(RestoreProblem(location, m) for m in messages)

    def os_error(self, location: str, action: str, exc: OSError) -> None:
        """A per-item error, or a fatal one when the target as a whole is unusable."""
        if exc.errno in _FATAL_ERRNOS:
            raise _Fatal(_fatal_message(exc, location))
        self.error(location, f"cannot {action}: {exc.strerror or exc}")

    def skip_existing(self, location: str, what: str = "already exists") -> None:
        with self.lock:
            self.report.skipped += 1
            hint = "; not overwritten (use --overwrite to replace it)" if not self.overwrite else ""
            self.report.errors.append(RestoreProblem(location, what + hint))

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            setattr(self.report, what, getattr(self.report, what) + n)

    # -- walk -------------------------------------------------------------------------------------

    def walk(self, root_path: bytes, nodes: list[Node]) -> None:
        # paths are joined by hand below (posixpath.join per node was ~4% of the walk's time)
        stack = [_Frame(root_path.rstrip(b"/"), "", None, nodes, None, True, True)]
        while stack:
            frame = stack[-1]
            if frame.index >= len(frame.nodes):
                stack.pop()
                if (
                    frame.node is not None
                    and frame.ready
                    and (frame.selected or frame.restored_child)
                ):
                    self.dirs_done.append((frame.path, frame.location, frame.node))
                    if frame.parent is not None:
                        frame.parent.restored_child = True
                continue
            node = frame.nodes[frame.index]
            frame.index += 1
            if frame.ready is False:
                if node.subtree is not None:
                    self.trees.drop(node.subtree)
                continue
            location = f"{frame.location}/{node.name}"
            if not _valid_name(node.name):
                self.error(location, "invalid name in the snapshot; skipped")
                continue
            path = frame.path + b"/" + fs_bytes(node.name)
            is_dir = node.type == "dir"
            selected, enter = self.selector.select(location, is_dir)
            if is_dir:
                self.visit_dir(frame, stack, node, path, location, selected, enter)
            elif selected and self.ensure_ready(frame):
                self.restore_leaf(node, path, location)
                frame.restored_child = True

    def visit_dir(
        self,
        frame: _Frame,
        stack: list[_Frame],
        node: Node,
        path: bytes,
        location: str,
        selected: bool,
        enter: bool,
    ) -> None:
        if node.subtree is None:
            self.error(location, "folder without a subtree in the snapshot; skipped")
            return
        ready: bool | None = None
        if selected:
            ready = self.ensure_ready(frame) and self.make_dir(path, location)
            if not ready:
                self.trees.drop(node.subtree)
                return
        if not enter:
            self.trees.drop(node.subtree)
            if ready:
                self.dirs_done.append((path, location, node))
                frame.restored_child = True
            return
        key = frame.key + (frame.index - 1,)
        try:
            children = self.trees.take(node.subtree, location, key)
        except VaultError as exc:
            self.error(location, f"cannot read the folder's tree: {exc}")
            children = []
        stack.append(_Frame(path, location, node, children, frame, selected, ready, key))

    def load_tree(self, tree_id: bytes) -> list[Node]:
        """A folder's nodes, not kept in the repository's tree cache: the walk reads each tree once and
        drops it when the folder is done, while the cache would keep every node of the snapshot (20,000
        files: ~25 MB) until the end. From a local vault, read and checked as the workers read data
        (two GIL-free calls instead of six); anything wrong is left to the repository's path, which
        reports it."""
        what = f"tree {tree_id.hex()}"
        loc = self.repo.index.lookup(tree_id, TREE) if self.pack_path is not None else None
        if loc is not None and self.buffers() is not None:
            try:
                plain = self.decode(loc, self.read_range(loc.pack_id, loc.offset, loc.length), True)
                return decode_tree(bytes(plain), what)
            except VaultError:
                pass
        return decode_tree(self.repo.load_blob(TREE, tree_id), what)

    def ensure_ready(self, frame: _Frame) -> bool:
        """Create a folder that was only entered (not itself selected) once something inside is restored."""
        if frame.ready is None:
            assert frame.parent is not None
            frame.ready = self.ensure_ready(frame.parent) and self.make_dir(
                frame.path, frame.location
            )
        return bool(frame.ready)

    def make_dir(self, path: bytes, location: str) -> bool:
        if self.dry_run:
            return self.check_free(path, location, want_dir=True)
        try:
            # 0o700 while restoring: the real mode is set after the content, bottom-up.
            os.mkdir(path, 0o700)
        except FileExistsError:
            try:
                st = os.lstat(path)
            except OSError as exc:
                self.os_error(location, "inspect the existing entry", exc)
                return False
            if stat.S_ISDIR(st.st_mode):
                return True  # merge into an existing folder, as restic does
            if not self.overwrite:
                self.skip_existing(location, "a non-folder is in the way of this folder")
                return False
            try:
                os.unlink(path)
                os.mkdir(path, 0o700)
            except OSError as exc:
                self.os_error(location, "replace the existing entry with a folder", exc)
                return False
        except OSError as exc:
            self.os_error(location, "create the folder", exc)
            return False
        return True

    def check_free(self, path: bytes, location: str, *, want_dir: bool = False) -> bool:
        """Dry run: would the entry be created (or merged, for folders)?"""
        try:
            st = os.lstat(path)
        except OSError:
            return True
        if want_dir and stat.S_ISDIR(st.st_mode):
            return True
        if stat.S_ISDIR(st.st_mode):
            self.skip_existing(location, "a folder is in the way; not replaced")
            return False
        if not self.overwrite:
            self.skip_existing(location)
            return False
        return True

    def create(self, path: bytes, location: str, make: Callable[[], object]) -> object:
        """Run ``make`` (which creates ``path``) and return its result, or None when the entry could not
        be created; an existing entry is replaced or reported per ``overwrite``. Thread-safe."""
        try:
            return make()
        except FileExistsError:
            pass
        except OSError as exc:
            self.os_error(location, "create it", exc)
            return None
        try:
            st = os.lstat(path)
        except OSError as exc:
            self.os_error(location, "inspect the existing entry", exc)
            return None
        if stat.S_ISDIR(st.st_mode):
            self.skip_existing(location, "a folder is in the way; not replaced")
            return None
        if not self.overwrite:
            self.skip_existing(location)
            return None
        try:
            # Unlink rather than truncate: the old file may be a hardlink of something outside the restore.
            os.unlink(path)
            return make()
        except OSError as exc:
            self.os_error(location, "replace the existing entry", exc)
            return None

    def create_entry(self, path: bytes, location: str, make: Callable[[], None]) -> bool:
        if self.dry_run:
            return self.check_free(path, location)
        return self.create(path, location, lambda: make() or True) is not None

    def create_file(self, path: bytes, location: str) -> int | None:
        """Create an empty regular file (mode 0o600 until its metadata is applied); its fd or None."""
        fd = self.create(path, location, lambda: os.open(path, _CREATE_FLAGS, 0o600))
        return fd if isinstance(fd, int) else None

    def restore_leaf(self, node: Node, path: bytes, location: str) -> None:
        kind = node.type
        if kind == "file":
            self.restore_file(node, path, location)
            return
        if kind == "socket":
            return  # restic skips sockets: a socket file is useless without its process
        if kind == "symlink":
            target = fs_bytes(node.linktarget)
            if self.create_entry(path, location, lambda: os.symlink(target, path)):
                self.count("symlinks")
                self.finish(path, location, node)
            return
        if kind == "fifo":
            if self.create_entry(path, location, lambda: os.mkfifo(path, 0o600)):
                self.count("special")
                self.finish(path, location, node)
            return
        if kind in ("dev", "chardev"):
            if not self.owners:
                self.warn(location, ["device not restored: creating devices needs root"])
                return
            fmt = stat.S_IFCHR if kind == "chardev" else stat.S_IFBLK
            if self.create_entry(path, location, lambda: os.mknod(path, fmt | 0o600, node.device)):
                self.count("special")
                self.finish(path, location, node)
            return
        self.error(location, f"cannot restore a node of type {kind!r}; skipped")

    def restore_file(self, node: Node, path: bytes, location: str) -> None:
        linked = node.links > 1 and node.inode != 0
        key = (node.inode, node.device_id)
        first = self.links.get(key) if linked else None
        if first is not None:
            if key in self.worker_links and not self.dry_run:
                self.later_links.append((first, path, location))
            else:
                self.make_link(first, path, location)
            return
        chunks: list[tuple[BlobLocation, int]] = []
        offset = 0
        for blob_id in node.content or []:
            loc = self.repo.index.lookup(blob_id, DATA)
            if loc is None:
                self.error(
                    location,
                    f"content lost: data blob {blob_id.hex()} is not in the index "
                    "(`vault rebuild-indexes` helps if its pack still exists)",
                )
                break
            chunks.append((loc, offset))
            offset += _plain_size(loc)
        # A single-chunk file is created by the worker that writes it: one open, no path lookups for the
        # metadata, and the creation work runs in parallel. Others are created here, so a hardlink can
        # point at them at once and every chunk writer finds them. (A hardlinked single-chunk file is
        # created by its worker too, and its further names linked once the content is written: most
        # files with links > 1 have their other names outside the snapshot.)
        by_worker = len(chunks) == 1 and not self.dry_run
        if not by_worker:
            if self.dry_run:
                if not self.check_free(path, location):
                    return
            else:
                fd = self.create_file(path, location)
                if fd is None:
                    return
                os.close(fd)
            self.count("files")
            if linked:
                self.links[key] = path
        elif linked:
            self.links[key] = path
            self.worker_links.add(key)
        if self.dry_run:
            self.total_bytes += offset
            return
        file = _File(path, location, node, len(chunks), by_worker)
        if not chunks:
            self.finish(path, location, node)
            return
        for loc, off in chunks:
            blobs = self.plan.setdefault(loc.pack_id, {})
            blob = blobs.get((loc.blob_id, loc.offset))
            if blob is None:
                blob = blobs[(loc.blob_id, loc.offset)] = _Blob(loc)
                self.plan_blobs += 1
            blob.targets.append((file, off))
        self.plan_bytes += offset
        with self.lock:
            self.total_bytes += offset
        if self.plan_bytes >= BATCH_BYTES or self.plan_blobs >= BATCH_BLOBS:
            self.flush()

    def finish(self, target: bytes | int, location: str, node: Node) -> None:
        if not self.dry_run:
            self.warn(location, fsmeta.apply_metadata(target, node, owners=self.owners))

    # -- content ----------------------------------------------------------------------------------

    def flush(self) -> None:
        """Hand the planned blobs to the workers: grouped by pack, close ones merged into one read."""
        plan, self.plan = self.plan, {}
        self.plan_bytes = self.plan_blobs = 0
        if self.progress is not None:
            with self.lock:
                self.progress(self.done_bytes, self.total_bytes)
        for pack_id, blobs in plan.items():
            ordered = sorted(blobs.values(), key=lambda b: b.loc.offset)
            group: list[_Blob] = []
            start = end = 0
            for blob in ordered:
                b_start, b_end = blob.loc.offset, blob.loc.offset + blob.loc.length
                if group and (b_start - end > MERGE_GAP or b_end - start > MAX_RANGE):
                    self.submit(pack_id, group)
                    group = []
                if not group:
                    start, end = b_start, b_end
                group.append(blob)
                end = max(end, b_end)
            if group:
                self.submit(pack_id, group)

    def submit(self, pack_id: bytes, blobs: list[_Blob]) -> None:
        # Few ranges in flight: memory stays bounded, and a slow target slows the walk down too.
        while len(self.running) >= self.workers + 2:
            self.reap()
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="vault-restore")
        self.running.add(self.pool.submit(self.restore_range, pack_id, blobs))

    def reap(self) -> None:
        done, self.running = wait(self.running, return_when=FIRST_COMPLETED)
        for fut in done:
            fut.result()  # re-raises _Fatal, and bugs

    def drain(self) -> None:
        while self.running:
            self.reap()
        if self.progress is not None:
            self.progress(self.done_bytes, self.total_bytes)

    def close(self) -> None:
        """Stop the workers (after an error or an interrupt, pending ranges are dropped)."""
        if self.running:
            self.abort.set()
            for fut in self.running:
                fut.cancel()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        self.trees.close()

    def restore_range(self, pack_id: bytes, blobs: list[_Blob]) -> None:
        if self.abort.is_set():
            return
        start = blobs[0].loc.offset
        end = max(b.loc.offset + b.loc.length for b in blobs)
        view: memoryview | None = None
        read_error: VaultError | None = None
        try:
            view = self.read_range(pack_id, start, end - start)
        except VaultError as exc:
            read_error = exc
        if view is not None and _write_file is not None and self.buffers() is not None:
            blobs = self.restore_small(view, start, blobs)
        covered = start  # the end of the blobs before this one
        for i, blob in enumerate(blobs):
            if self.abort.is_set():
                return
            loc = blob.loc
            plain: bytes | memoryview | None = None
            problem = read_error
            if view is not None:
                # In place only when no other blob of the range shares these bytes (a damaged index
                # could say so): the decrypted blob replaces its stored bytes in the buffer.
                b_end = loc.offset + loc.length
                alone = loc.offset >= covered and (
                    i + 1 == len(blobs) or b_end <= blobs[i + 1].loc.offset
                )
                covered = max(covered, b_end)
                try:
                    plain = self.decode(
                        loc, view[loc.offset - start : b_end - start], alone, _direct_shift(blob)
                    )
                except VaultError as exc:
                    problem = exc
            if plain is None:
                plain, problem = self.other_copy(loc, problem)
            if plain is None:
                message = _blob_message(loc, problem)
                for file, _off in blob.targets:
                    self.error(file.location, message)
                    self.write(file, b"", 0)
                continue
            for file, off in blob.targets:
                self.write(file, plain, off)
            del plain
        del view
        buffers = self.buffers()
        if buffers is not None:
            for buf in buffers.values():
                buf.trim()

    def restore_small(self, view: memoryview, start: int, blobs: list[_Blob]) -> list[_Blob]:
        """Check and write the range's files of one chunk each (created by the worker, nothing that only
        the Python path applies) in one GIL-free call: with 20,000 small files, two calls per file
        were 40,000 GIL hand-offs among the workers and the walk. Returns the blobs left to the usual
        path: the others, and those whose check failed or whose file could not be opened."""
        small: list[tuple[_Blob, _File]] = []
        rest: list[_Blob] = []
        for blob in blobs:
            file = blob.targets[0][0] if len(blob.targets) == 1 else None
            if file is None or not (file.create and file.pending == 1) or _python_only(file.node):
                rest.append(blob)
            else:
                small.append((blob, file))
        if len(small) < 2:
            return blobs
        table = bytearray()
        jobs = []
        owners = self.owners
        for blob, file in small:
            loc, node = blob.loc, file.node
            table += _ENTRY.pack(loc.offset - start, loc.length, loc.uncompressed_length)
            table += loc.blob_id
            uid, gid = (node.uid, node.gid) if owners else (-1, -1)
            mode = stat.S_IMODE(node.unix_mode)
            jobs.append((file.path, True, 0, uid, gid, mode, node.atime.ns, node.mtime.ns))
        buffers = self.buffers()
        assert buffers is not None
        opened = self.opened_buffer().view(max(b.loc.length for b, _f in small) - OVERHEAD)
        plain = buffers["plain"].view(max(b.loc.uncompressed_length for b, _f in small))
        results = self.local.codec.restore_files(self.key_raw, view, table, opened, plain, jobs)
        done: list[tuple[_File, int]] = []
        unfinished: list[tuple[_File, tuple[int, int, int, int, int]]] = []
        for (blob, file), result in zip(small, results, strict=True):
            check, status, _err, written, _fd = result
            if check != 0 or status == 1:
                rest.append(blob)  # the usual path tells what is wrong, or replaces what is there
            elif status == 0:
                done.append((file, written))
            else:
                unfinished.append((file, result))  # left open: the Python path finishes it
        try:
            if done:
                self.files_done(done)
            while unfinished:
                file, (_check, status, err, written, fd) = unfinished.pop()
                self.count("files")
                self.after_c_write(file, status, err, written, fd)
        finally:
            for _file, result in unfinished:  # left after a fatal error (a full disk, say)
                os.close(result[4])
        rest.sort(key=lambda b: b.loc.offset)
        return rest

    def files_done(self, done: list[tuple[_File, int]]) -> None:
        """``chunk_done`` for the files ``restore_small`` created and finished, under one lock."""
        with self.lock:
            self.report.files += len(done)
            for file, nbytes in done:
                self.count_chunk(file, nbytes)

    def buffers(self) -> dict[str, _Buffer] | None:
        """This worker's buffers: ``read`` (pack ranges), ``plain`` (decompressed blobs), ``opened``
        (decrypted blobs that cannot be decrypted in place); None without the C part."""
        if not NATIVE:
            return None
        local = self.local
        if not hasattr(local, "codec"):
            local.codec = Codec()
            local.buffers = {"read": _Buffer(MAX_RANGE), "plain": _Buffer(KEEP_DECODED)}
        return local.buffers

    def read_range(self, pack_id: bytes, offset: int, length: int) -> memoryview:
        """Bytes of a pack; from a local vault straight into this worker's read buffer (writable, so
        blobs can be decrypted in place), otherwise (or when that read fails: the backend then
        reports it, or retries) as the backend returns them."""
        buffers = self.buffers()
        if self.pack_path is not None and buffers is not None:
            view = buffers["read"].view(length)
            got = -1
            try:
                fd = os.open(self.pack_path("data", pack_id.hex()), os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                pass
            else:
                try:
                    got = 0
                    while got < length:
                        n = os.preadv(fd, [view[got:]], offset + got)
                        if not n:
                            break
                        got += n
                except OSError:
                    got = -1
                finally:
                    os.close(fd)
            if got == length:
                return view
        return memoryview(self.repo.backend.read("data", pack_id.hex(), offset, length))

    def decode(
        self,
        loc: BlobLocation,
        sealed: memoryview,
        in_place: bool = False,
        shift: int | None = None,
    ) -> bytes | memoryview:
        """``Repository.decode_blob`` into this thread's buffers (valid until its next call): with the
        C part, one GIL-free call checks the tag, decrypts, decompresses and hashes the blob, with no
        allocation. With ``in_place`` and a writable ``sealed``, the blob is decrypted over its own
        ciphertext (the tag is checked before anything is written; libcrypto's CTR takes the same
        input and output). With ``shift``, the plaintext starts that many bytes past a page boundary
        (for an O_DIRECT write; not in place then)."""
        buffers = self.buffers()
        if buffers is None:
            return self.repo.decode_blob(loc, sealed)
        n = len(sealed) - OVERHEAD
        size = loc.uncompressed_length
        in_place = in_place and n >= 0 and not sealed.readonly and (shift is None or size != 0)
        if in_place:
            opened = sealed[NONCE_SIZE : NONCE_SIZE + n]
        else:
            opened = self.opened_buffer().view(max(n, 0), shift or 0)
        plain = buffers["plain"].view(size, shift or 0) if size else opened
        entry = _ENTRY.pack(0, len(sealed), size) + loc.blob_id
        status = self.local.codec.check_blobs(self.key_raw, sealed, entry, opened, plain)[0]
        if status == 0:
            return plain
        # Something is wrong (or zstd's one-shot call refused the frame): the step-by-step path tells
        # what, with the usual messages. Past the tag check an in-place blob was overwritten: read again.
        if in_place and status not in (_CHECK_AUTH, _CHECK_RANGE):
            sealed = memoryview(
                self.repo.backend.read("data", loc.pack_id.hex(), loc.offset, loc.length)
            )
        return self.decode_apart(loc, sealed)

    def opened_buffer(self) -> _Buffer:
        buffers = self.buffers()
        assert buffers is not None
        if "opened" not in buffers:
            buffers["opened"] = _Buffer(KEEP_DECODED)
        return buffers["opened"]

    def decode_apart(self, loc: BlobLocation, sealed: memoryview) -> bytes | memoryview:
        """``decode`` one step at a time into this thread's buffers (``sealed`` is left alone)."""
        what = f"data blob {loc.blob_id.hex()} in pack {loc.pack_id.hex()}"
        opened = self.opened_buffer().view(len(sealed) - OVERHEAD)
        self.repo.key.open_into(opened, sealed, what)
        plain = opened
        if loc.uncompressed_length:
            size = loc.uncompressed_length
            plain = self.buffers()["plain"].view(size)  # type: ignore[index]
            try:
                got = self.local.codec.decompress_into(plain, opened)
            except ValueError:
                # e.g. a frame that does not state its size: the streaming decoder judges it
                plain[:] = unpacked.decompress(opened, size, what)
                got = size
            if got != size:
                raise FormatError(f"{what} decompressed to {got} bytes, expected {size}")
        if hashlib.sha256(plain).digest() != loc.blob_id:
            raise IntegrityError(f"{what} is corrupt (content does not match its ID)")
        return plain

    def other_copy(
        self, loc: BlobLocation, problem: VaultError | None
    ) -> tuple[bytes | None, VaultError | None]:
        """The same blob from another pack that holds it (after a prune or repair there may be two)."""
        for other in self.repo.index.lookup_all(loc.blob_id, DATA):
            if other.pack_id == loc.pack_id and other.offset == loc.offset:
                continue
            try:
                sealed = self.repo.backend.read(
                    "data", other.pack_id.hex(), other.offset, other.length
                )
                return self.repo.decode_blob(other, sealed), None
            except VaultError as exc:
                problem = problem or exc
        return None, problem

    def write(self, file: _File, data: bytes | memoryview, offset: int) -> None:
        """Write one chunk (``data`` empty for a lost one); the last chunk's writer applies metadata."""
        done = 0  # bytes written with O_DIRECT (and the partial block before them)
        if len(data) >= DIRECT_MIN and not file.create and _Direct.ok:
            data, offset, done = self.write_direct(file, data, offset)
        # pending is 1 only for the last chunk still to be written (it only goes down)
        if (
            file.pending == 1
            and _write_file is not None
            and self.write_last(file, data, offset, done)
        ):
            return
        if file.create:
            fd = self.create_file(file.path, file.location)
            if fd is None:
                return
            self.count("files")
        else:
            try:
                fd = os.open(file.path, _WRITE_FLAGS)
            except OSError as exc:
                self.os_error(file.location, "open the file", exc)
                self.chunk_done(file, done)
                return
        written = done
        try:
            view = memoryview(data)
            while written - done < len(view):
                written += os.pwrite(fd, view[written - done :], offset + written - done)
        except OSError as exc:
            self.os_error(file.location, "write the file", exc)
        finally:
            try:
                if self.chunk_done(file, written):
                    self.finish(fd, file.location, file.node)
            finally:
                os.close(fd)

    def write_direct(
        self, file: _File, data: bytes | memoryview, offset: int
    ) -> tuple[bytes | memoryview, int, int]:
        """Write the whole blocks of a chunk with O_DIRECT and the partial block before them through the
        page cache: (what is left to write, its offset, bytes written). Writes nothing when the data is
        not placed for it (see ``decode``) or the file system refuses O_DIRECT (then never again); a
        failure is left to the usual write, which reports it."""
        start = -offset % _ALIGN  # the first whole block, in data
        end = start + (len(data) - start) // _ALIGN * _ALIGN
        if not _aligned_at(data, start):
            return data, offset, 0
        view = memoryview(data)
        try:
            fd = os.open(file.path, _WRITE_FLAGS | os.O_DIRECT)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                _Direct.ok = False  # this file system has no O_DIRECT
            return data, offset, 0
        try:
            written = start
            while written < end:
                written += os.pwrite(fd, view[written:end], offset + written)
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            done = 0
            while done < start:
                done += os.pwrite(fd, view[done:start], offset + done)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                _Direct.ok = False
            return data, offset, 0  # the usual write goes over it all again, and reports
        finally:
            os.close(fd)
        return view[end:], offset + end, end

    def write_last(self, file: _File, data: bytes | memoryview, offset: int, done: int = 0) -> bool:
        """Open (or create), write and finish a file's last chunk in one GIL-free C call: six system calls
        that would each hand the GIL over. False when it is left to ``write``: nothing was opened, or the
        node has what only the Python path applies (extended attributes, a time the kernel cannot take)."""
        node = file.node
        if _python_only(node):
            return False
        atime, mtime = node.atime.ns, node.mtime.ns
        uid, gid = (node.uid, node.gid) if self.owners else (-1, -1)
        status, err, written, fd = _write_file(
            file.path,
            data,
            offset,
            file.create,
            uid,
            gid,
            stat.S_IMODE(node.unix_mode),
            atime,
            mtime,
        )
        if status == 1:
            return False  # ``write`` tries again and reports the problem or replaces what is in the way
        if file.create:
            self.count("files")
        if status == 0:
            self.chunk_done(file, done + written)
            return True
        self.after_c_write(file, status, err, done + written, fd)
        return True

    def after_c_write(self, file: _File, status: int, err: int, written: int, fd: int) -> None:
        """A file the C part opened but could not finish (status 2: writing, 3: the metadata failed):
        the Python path takes over with the open file and reports."""
        try:
            if status == 2:
                self.os_error(file.location, "write the file", OSError(err, os.strerror(err)))
            if self.chunk_done(file, written):
                self.finish(fd, file.location, file.node)
        finally:
            os.close(fd)

    def chunk_done(self, file: _File, nbytes: int) -> bool:
        """Count a finished chunk; True for the file's last one."""
        with self.lock:
            self.count_chunk(file, nbytes)
            return file.pending == 0

    def count_chunk(self, file: _File, nbytes: int) -> None:
        """The counts for a finished chunk, and progress now and then; the caller holds the lock."""
        file.pending -= 1
        self.done_bytes += nbytes
        self.report.bytes += nbytes
        if self.progress is not None and self.done_bytes - self.shown_bytes >= PROGRESS_STEP:
            self.shown_bytes = self.done_bytes
            self.progress(self.done_bytes, self.total_bytes)

    def link_later(self) -> None:
        """The further names of hardlinked files that workers created (before the folders' metadata)."""
        for first, path, location in self.later_links:
            self.make_link(first, path, location)

    def make_link(self, first: bytes, path: bytes, location: str) -> None:
        if self.create_entry(path, location, lambda: os.link(first, path)):
            self.count("hardlinks")
            self.count("files")

    def finish_dirs(self) -> None:
        # dirs_done is in post-order (children before their folder): bottom-up as required.
        for path, location, node in self.dirs_done:
            self.report.dirs += 1
            self.finish(path, location, node)


class _Direct:
    #: False once a file system refused O_DIRECT: every later chunk goes through the page cache.
    ok = True


def _direct_shift(blob: _Blob) -> int | None:
    """Where a blob's plaintext should start past a page boundary so that its first target that may be
    written with O_DIRECT (see ``DIRECT_MIN``) lines up with the file's blocks; None if none may."""
    if not _Direct.ok or _plain_size(blob.loc) < DIRECT_MIN:
        return None
    for file, off in blob.targets:
        if not file.create:
            return off % _ALIGN
    return None


def _aligned_at(data: bytes | memoryview, index: int) -> bool:
    """Whether ``data[index]`` sits on a page boundary (only a writable buffer can be written from)."""
    if not isinstance(data, memoryview) or data.readonly:
        return False
    return (ctypes.addressof(ctypes.c_char.from_buffer(data)) + index) % _ALIGN == 0


def _python_only(node: Node) -> bool:
    """Whether a file has what only the Python path applies: extended attributes, or a time the
    kernel cannot take (fsmeta.apply_times substitutes or skips those)."""
    return bool(node.extended_attributes) or not (
        _MIN_NS <= node.atime.ns <= _MAX_NS and _MIN_NS <= node.mtime.ns <= _MAX_NS
    )


def _valid_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def _blob_message(loc: BlobLocation, problem: VaultError | None) -> str:
    text = str(problem) if problem else "unreadable"
    ids = f"data blob {loc.blob_id.hex()} in pack {loc.pack_id.hex()}"
    if loc.blob_id.hex() not in text:
        text = f"{ids}: {text}"
    return f"content lost: {text}"


def _fatal_message(exc: OSError, location: str) -> str:
    if exc.filename:
        where = display_path(os.fsdecode(exc.filename))
    else:
        where = f"{display_path(location)} (in the restore target)"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"cannot write {where}: {exc.strerror}; free some space and run the restore again"
    if exc.errno == errno.EROFS:
        return f"cannot write {where}: the target is on a read-only file system"
    return f"cannot write {where}: {exc.strerror}"


def prepare_target(target: str, dry_run: bool = False) -> None:
    """Create the target folder (not in a dry run) and check it is a writable folder; VaultError if not."""
    if dry_run:
        if os.path.exists(target) and not os.path.isdir(target):
            raise VaultError(f"restore target {target} exists and is not a folder")
        return
    try:
        os.makedirs(target, exist_ok=True)
    except FileExistsError:
        raise VaultError(f"restore target {target} exists and is not a folder") from None
    except OSError as exc:
        raise VaultError(f"cannot create restore target {target}: {exc.strerror}") from None
    if not os.path.isdir(target):
        raise VaultError(f"restore target {target} exists and is not a folder")
    if not os.access(target, os.W_OK | os.X_OK):
        raise VaultError(f"restore target {target} is not writable; choose another --target")


def restore(
    repo: Repository,
    snapshot_id: str,
    target: str | os.PathLike[str],
    *,
    subpath: str = "",
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    overwrite: bool = False,
    dry_run: bool = False,
    progress: ProgressCallback | None = None,
    workers: int = DEFAULT_WORKERS,
) -> RestoreReport:
    """Restore snapshot ``snapshot_id`` (a full ID; ``Repository.find_snapshot`` resolves prefixes and
    ``latest``) into the folder ``target`` (created if missing).

    ``subpath`` picks a folder inside the snapshot whose contents go into ``target`` (a file or other
    entry is restored as ``target/<name>``). ``include``/``exclude`` are restic patterns (see the module
    docstring); they cannot be combined. Without ``overwrite`` existing entries are reported as errors and
    left alone; with it they are replaced (folders are merged, never removed). ``dry_run`` only reports.
    ``progress(done_bytes, total_bytes)`` is called from worker threads, serialized.

    Loads the index if needed; pauses the cyclic garbage collector while it runs. Raises NotFoundError
    for a missing ``subpath``, UsageError for bad patterns, VaultError when the target is unusable or
    the disk is full; per-item problems go into the report. Never prints. Thread-safe as long as two
    restores do not write into the same target.
    """
    started = time.monotonic()
    selector = Selector(include, exclude)
    if not repo.index_loaded:
        repo.load_index()
    snap = repo.load_snapshot(snapshot_id)
    nodes = _root_nodes(repo, snap.tree, subpath)
    target_s = os.fspath(target)
    report = RestoreReport(snapshot_id=snapshot_id, target=target_s, dry_run=dry_run)
    prepare_target(target_s, dry_run)
    restorer = _Restorer(
        repo,
        report,
        selector,
        overwrite=overwrite,
        dry_run=dry_run,
        progress=progress,
        workers=workers,
    )
    # The walk allocates a few objects per node and makes no reference cycles; the cyclic collector
    # would only re-scan the index and trees over and over (about 6% of a restore's CPU time).
    collecting = gc.isenabled()
    gc.disable()
    try:
        restorer.trees.add(nodes, "", ())
        restorer.walk(os.fsencode(target_s), nodes)
        restorer.flush()
        restorer.drain()
        restorer.link_later()
        restorer.finish_dirs()
    except _Fatal as exc:
        raise VaultError(str(exc)) from None
    finally:
        restorer.close()
        if collecting:
            gc.enable()
    if dry_run:
        report.bytes = restorer.total_bytes
    report.seconds = time.monotonic() - started
    return report


def _root_nodes(repo: Repository, tree_id: bytes, subpath: str) -> list[Node]:
    """The entries to restore into the target: the snapshot root's, a sub-folder's, or one node."""
    if not subpath.strip("/"):
        return repo.load_tree(tree_id)
    node = repo.find_path(tree_id, subpath)
    if node is None:
        return repo.load_tree(tree_id)
    if node.type == "dir":
        if node.subtree is None:
            raise NotFoundError(f"{subpath} is a folder without a subtree in the snapshot")
        return repo.load_tree(node.subtree)
    return [node]


__all__ = [
    "DEFAULT_WORKERS",
    "RestoreProblem",
    "RestoreReport",
    "Selector",
    "display_path",
    "prepare_target",
    "restore",
]
