"""Deep-verify a vault (password needed): is everything every snapshot needs there and intact?

What is checked, in this order:

1. **keys/**: every key file hashes to its name.
2. **index/**: every index file loads (hash, MAC, JSON); the union becomes the master index.
3. **data/**: every indexed pack exists with the size the index implies (blob lengths plus header);
   files that are not packs are reported.
4. **pack headers**: the header at the end of every pack (only that tail is read) decrypts, describes
   exactly the file, and agrees with the index. Packs no index names are listed (rebuild-indexes adds
   them); blobs they hold still count as present.
5. **snapshots/**: every snapshot file loads.
6. **read data** (``read_data``; always for packs whose header or size is wrong, and for ``extra_packs``
   the caller suspects): whole packs are read and every blob must decrypt, decompress and hash to its
   ID; with the header check and the blobs tiling the file exactly, that verifies every byte. (The
   file name is checked against its hash only for suspect packs: ``vault verify`` does that for all.)
   This tells exactly which blobs of a damaged pack survive.
7. **trees**: every tree of every snapshot is read once (tree blobs decrypt and hash right, the JSON
   decodes) and every data blob a file names must have a usable copy. With ``read_data`` this walk
   runs while the packs are read, and again afterwards only if the reading found damage.
8. **packindex/**: each file loads and names only packs that exist.

The truth about blobs is the pack headers: the index only says where to find them. So a blob counts as
lost only when no readable pack holds it; an index that is wrong or incomplete is reported as an index
problem (rebuild-indexes fixes it), not as lost data.

The report names every damaged snapshot and, in it, every affected file or folder by path, and lists
every damaged file of the vault by folder with its consequence (ARCHITECTURE.md). ``ok`` is False when
anything is damaged; warnings (packs no index names, data no snapshot uses, stale packindex files) do
not make it False.

Downloaded pack headers and tree packs go to the local cache (vaultfs/repo/cache.py) when ``cache`` is
on (the default for remote backends): a later run then reads them locally. With the cache, damage that
happened to a tree pack in the vault after it was cached is not seen; ``vault verify`` (or ``cache=False``)
sees it.

Thread safety: ``deep_verify`` is blocking and uses worker threads internally; the Repository may be
used by other threads meanwhile (this module builds its own index and never changes ``repo``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import zstandard
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.poly1305 import Poly1305

from vaultfs.backend import Backend, is_local
from vaultfs.crypto import NATIVE, MasterKey
from vaultfs.errors import FormatError, ObjectNotFound, VaultError
from vaultfs.format.gojson import go_unquote
from vaultfs.format.index import IndexColumns, decode_columns
from vaultfs.format.pack import (
    COMPRESSED_ENTRY,
    DATA,
    PLAIN_ENTRY,
    TAIL_GUESS,
    TREE,
    TYPE_NAMES,
    PackedBlob,
    check_blobs_fit,
    decode_header,
    header_length_from_tail,
)
from vaultfs.format.snapshot import Snapshot
from vaultfs.format.tree import fs_name
from vaultfs.ops.verify import CONSEQUENCES, Subset, object_path
from vaultfs.repo.cache import VaultCache
from vaultfs.repo.masterindex import BlobLocation, MasterIndex
from vaultfs.repo.repository import Repository

if NATIVE:
    from vaultfs.chunker import _blob
    from vaultfs.chunker._blob import Codec

#: --read-data reads a local pack this much at a time (whole blobs; a larger blob in one piece).
READ_PIECE = 4 * 1024 * 1024
#: Tree blobs of one pack closer than this are fetched with one read.
MERGE_GAP = 256 * 1024
MAX_RANGE = 8 * 1024 * 1024
SEAL_OVERHEAD = 32

StageCallback = Callable[[str, "int | None", str], None]
AdvanceCallback = Callable[[int], None]


# -- report -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing found wrong (or, in ``warnings``, worth knowing).

    ``folder`` is the vault folder it concerns, ``object`` the file (``data/3f/3f…``) or blob
    (``tree 3f…``), ``kind`` a stable code for scripts, ``message`` the details, ``consequence`` what
    it means (ARCHITECTURE.md table).
    """

    folder: str
    object: str
    kind: str
    message: str
    consequence: str


@dataclass(frozen=True)
class AffectedFile:
    """A file (or, ending in ``/``, a whole folder) of a snapshot that cannot be restored intact."""

    path: str
    reason: str


@dataclass
class DamagedSnapshot:
    id: str
    time: str
    hostname: str
    paths: list[str]
    tags: list[str]
    #: the root tree is lost: nothing of this snapshot can be restored
    lost: bool
    files: list[AffectedFile] = field(default_factory=list)


@dataclass
class DamagedPack:
    """A pack whose file, header or some blobs are bad. ``bad_blobs`` are ``type:id`` strings;
    ``good_blobs`` counts blobs that were read and are intact (salvageable)."""

    id: str
    reasons: list[str]
    bad_blobs: list[str] = field(default_factory=list)
    good_blobs: int = 0
    read: bool = False


@dataclass
class DeepVerifyReport:
    key_files: int = 0
    index_files: int = 0
    packs: int = 0
    snapshots: int = 0
    trees: int = 0
    blobs: int = 0
    packs_read: int = 0
    blobs_read: int = 0
    bytes_read: int = 0
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    damaged_snapshots: list[DamagedSnapshot] = field(default_factory=list)
    damaged_packs: list[DamagedPack] = field(default_factory=list)
    #: packs the index names that are not in data/
    missing_packs: list[str] = field(default_factory=list)
    #: valid packs that no index names
    unindexed_packs: list[str] = field(default_factory=list)
    #: files in data/ that are not packs (paths relative to the vault)
    invalid_files: list[str] = field(default_factory=list)
    unreadable_keys: list[str] = field(default_factory=list)
    unreadable_index: list[str] = field(default_factory=list)
    unreadable_snapshots: list[str] = field(default_factory=list)
    #: the index disagrees with the packs (missing, unindexed or mismatching packs, bad index files)
    index_needs_rebuild: bool = False
    #: blobs some snapshot needs that no readable pack holds, as ``type:id``
    lost_blobs: list[str] = field(default_factory=list)
    #: packs holding nothing any snapshot uses (only when every tree could be read)
    unused_packs: list[str] = field(default_factory=list)
    #: packindex files that are unreadable, stale or name unknown packs
    bad_packindex: list[str] = field(default_factory=list)
    read_data: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


# -- trees as the walk keeps them -----------------------------------------------------------------


class _Tree:
    """What the walk keeps of one tree: its sub-folders and the damage of its own files."""

    __slots__ = ("subtrees", "damage")

    def __init__(self, subtrees: list[tuple[str, bytes]], damage: list[tuple[str, str]]) -> None:
        self.subtrees = subtrees  # (quoted name, subtree id)
        self.damage = damage  # (quoted name, reason)


_CLEAN_LEAF = _Tree([], [])


def _name(quoted: str) -> str:
    try:
        return fs_name(go_unquote(quoted))
    except FormatError:
        return quoted


# -- the checker ---------------------------------------------------------------------------------


class _Checker:
    def __init__(
        self,
        repo: Repository,
        *,
        read_data: bool,
        subset: Subset | None,
        extra_packs: Iterable[str],
        assume_gone: Iterable[str],
        cache: bool | None,
        workers: int | None,
        on_stage: StageCallback | None,
        on_advance: AdvanceCallback | None,
    ) -> None:
        self.repo = repo
        self.gone = set(assume_gone)
        self.backend: Backend = repo.backend
        self.local = is_local(self.backend)
        self.read_data = read_data
        self.subset = subset
        self.extra_packs = {bytes.fromhex(p) for p in extra_packs}
        use_cache = (not self.local) if cache is None else cache
        self.cache = VaultCache.of(repo.id) if use_cache else None
        self.io_workers = workers or 8
        # Local packs: one reading thread per core (each piece is one GIL-free call, the reads rarely
        # wait, so a spare thread only adds switches); remote ones: one more to cover the waits.
        cores = os.cpu_count() or 1
        self.cpu_workers = workers or (cores if self.local else cores + 1)
        self._on_stage = on_stage
        self._on_advance = on_advance
        self.report = DeepVerifyReport()
        self.index = MasterIndex()
        # Header entries the index lacks (unindexed packs, packs the index describes wrongly).
        self.extra = MasterIndex()
        # pack -> (blob count, size implied by the index, first index file naming it, fingerprint)
        self.pack_info: dict[bytes, tuple[int, int, str, int]] = {}
        self.present: dict[bytes, int] = {}
        self.bad_packs: dict[bytes, list[str]] = {}
        self.header_unreadable: set[bytes] = set()
        self.bad_locs: dict[tuple[bytes, int, bytes], str] = {}
        self.good_locs: set[tuple[bytes, int, bytes]] = set()
        self.pack_bad_blobs: dict[bytes, list[str]] = defaultdict(list)
        self.pack_good_blobs: dict[bytes, int] = defaultdict(int)
        self.packs_read: set[bytes] = set()
        self.read_found_damage = False
        self.lost: dict[tuple[int, bytes], str] = {}
        self.used_packs: set[bytes] = set()
        self.needed_unindexed: set[bytes] = set()
        self.trees: dict[bytes, _Tree | str] = {}
        self.snapshots: list[tuple[str, Snapshot]] = []
        self._local = threading.local()
        # Reads started before the targets are known (start_early_reads).
        self._pool: ThreadPoolExecutor | None = None
        self._early: dict[bytes, Future] = {}

    # -- helpers ------------------------------------------------------------------------------

    def listing(self, kind: str) -> list[tuple[str, int]]:
        """The backend's listing without the objects the caller asked to treat as gone."""
        items = list(self.backend.list(kind))
        if self.gone:
            items = [(n, s) for n, s in items if object_path(kind, n) not in self.gone]
        return items

    def stage(self, name: str, total: int | None = None, unit: str = "items") -> None:
        if self._on_stage is not None:
            self._on_stage(name, total, unit)

    def advance(self, n: int = 1) -> None:
        if self._on_advance is not None:
            self._on_advance(n)

    def problem(
        self, folder: str, obj: str, kind: str, message: str, consequence: str = ""
    ) -> None:
        self.report.problems.append(
            Problem(folder, obj, kind, message, consequence or CONSEQUENCES.get(folder, ""))
        )

    def warning(self, folder: str, obj: str, kind: str, message: str, consequence: str) -> None:
        self.report.warnings.append(Problem(folder, obj, kind, message, consequence))

    def _unusable(self, pack: bytes, offset: int, blob_id: bytes) -> str | None:
        """None when this copy of a blob can be used, else why not."""
        if pack not in self.present:
            return f"its pack {pack.hex()[:12]} is missing"
        why = self.bad_locs.get((pack, offset, blob_id))
        if why is not None:
            return why
        reasons = self.bad_packs.get(pack)
        if reasons and (pack, offset, blob_id) not in self.good_locs:
            return f"its pack {pack.hex()[:12]} is damaged ({reasons[0]})"
        return None

    def locate(self, blob_type: int, blob_id: bytes) -> tuple[BlobLocation | None, str]:
        """A usable copy of a blob, or (None, why there is none)."""
        loc = self.index.lookup(blob_id, blob_type)
        if loc is not None and self._unusable(loc.pack_id, loc.offset, blob_id) is None:
            return loc, ""
        why = "it is in no index and no pack"
        for source in (self.index, self.extra):
            for loc in source.lookup_all(blob_id, blob_type):
                reason = self._unusable(loc.pack_id, loc.offset, blob_id)
                if reason is None:
                    if source is self.extra:
                        # Found, but only through a pack header: restore cannot find it yet.
                        self.needed_unindexed.add(loc.pack_id)
                    return loc, ""
                why = reason
        return None, why

    # -- 1. keys --------------------------------------------------------------------------------

    def check_keys(self) -> None:
        names = [n for n, _ in self.listing("keys")]
        self.report.key_files = len(names)
        for name in names:
            try:
                ok = hashlib.sha256(self.backend.read("keys", name)).hexdigest() == name
                why = "its hash does not match its name"
            except ObjectNotFound:
                continue
            except VaultError as exc:
                ok, why = False, str(exc)
            if not ok:
                self.report.unreadable_keys.append(f"keys/{name}")
                last = len(names) == 1
                self.problem(
                    "keys",
                    f"keys/{name}",
                    "key-damaged",
                    f"key file keys/{name} is damaged: {why}",
                    "the vault cannot be opened: fatal"
                    if last
                    else "the password of this key no longer opens the vault; other keys still do",
                )

    # -- 2. index -------------------------------------------------------------------------------

    def load_index(self) -> None:
        names = [n for n, _ in self.listing("index")]
        self.report.index_files = len(names)
        self.stage("loading index files", len(names))

        def load(name: str) -> IndexColumns | VaultError:
            try:
                return decode_columns(self.repo.load_unpacked("index", name), f"index/{name}")
            except VaultError as exc:
                return exc

        with ThreadPoolExecutor(max_workers=self.io_workers) as pool:
            for name, result in zip(names, pool.map(load, names), strict=True):
                self.advance()
                if isinstance(result, ObjectNotFound):
                    continue  # removed meanwhile (a prune or repair racing us)
                if isinstance(result, VaultError):
                    self.report.unreadable_index.append(f"index/{name}")
                    self.report.index_needs_rebuild = True
                    self.problem("index", f"index/{name}", "index-damaged", str(result))
                    continue
                self._note_packs(name, result)
                self.index.add_arrays(*result)
        self.report.blobs = len(self.index)

    def _note_packs(self, name: str, cols: IndexColumns) -> None:
        """Record each pack's blob count, implied size and fingerprint from one index file."""
        packs = [[0, SEAL_OVERHEAD + 4, 0] for _ in cols.pack_ids]
        ids = cols.blob_ids
        for i, number in enumerate(cols.pack_of_blob):
            info = packs[number]
            ulen = cols.uncompressed_lengths[i]
            info[0] += 1
            info[1] += cols.lengths[i] + (COMPRESSED_ENTRY if ulen else PLAIN_ENTRY)
            entry = (ids[32 * i : 32 * i + 32], cols.blob_types[i], cols.offsets[i])
            info[2] += hash((*entry, cols.lengths[i], ulen))
        for pack_id, (count, size, fingerprint) in zip(cols.pack_ids, packs, strict=True):
            seen = self.pack_info.get(pack_id)
            if seen is None:
                self.pack_info[pack_id] = (count, size, name, fingerprint & _MASK64)
            elif seen[:2] != (count, size):
                self.report.index_needs_rebuild = True
                self.problem(
                    "index",
                    f"index/{name}",
                    "index-conflict",
                    f"index/{name} and index/{seen[2]} describe pack {pack_id.hex()} differently",
                )

    # -- 3. pack files --------------------------------------------------------------------------

    def list_packs(self) -> None:
        for name, size in self.listing("data"):
            try:
                pack = bytes.fromhex(name)
                if len(pack) != 32 or name != pack.hex():
                    raise ValueError(name)
            except ValueError:
                path = self._stray_path(name)
                self.report.invalid_files.append(path)
                self.problem(
                    "data",
                    path,
                    "not-a-pack",
                    f"{path} is not named like a pack",
                    "none for the snapshots (nothing uses it); repair moves it away",
                )
                continue
            self.present[pack] = size
        self.report.packs = len(self.present)
        for pack, (_count, expected, index_name, _fp) in sorted(self.pack_info.items()):
            path = object_path("data", pack.hex())
            size = self.present.get(pack)
            if size is None:
                self.report.missing_packs.append(pack.hex())
                self.report.index_needs_rebuild = True
                self.problem(
                    "data",
                    path,
                    "pack-missing",
                    f"{path} is missing (index/{index_name} lists it)",
                )
            elif size != expected:
                self.bad_packs.setdefault(pack, []).append(
                    f"it has {size} bytes, the index says {expected}"
                )

    def _stray_path(self, name: str) -> str:
        """The vault path of a file in data/ that is not named like a pack."""
        if self.local:
            root = self.backend.root
            for sub in sorted(os.listdir(os.path.join(root, "data"))):
                if os.path.isfile(os.path.join(root, "data", sub, name)):
                    return f"data/{sub}/{name}"
        return f"data/{name}"

    # -- 4. pack headers ------------------------------------------------------------------------

    def header(self, pack: bytes, size: int) -> list[PackedBlob]:
        return read_header(self.repo, pack.hex(), size, self.cache)

    def check_headers(self) -> None:
        packs = sorted(self.present)
        self.stage("reading pack headers", len(packs))

        def one(pack: bytes) -> list[PackedBlob] | VaultError:
            try:
                return self.header(pack, self.present[pack])
            except VaultError as exc:
                return exc
            finally:
                self.advance()

        with ThreadPoolExecutor(max_workers=self.io_workers) as pool:
            for pack, result in zip(packs, pool.map(one, packs), strict=True):
                self._compare_header(pack, result)
        for pack, reasons in sorted(self.bad_packs.items()):
            path = object_path("data", pack.hex())
            self.problem("data", path, "pack-damaged", f"{path} is damaged: {'; '.join(reasons)}")

    def _compare_header(self, pack: bytes, result: list[PackedBlob] | VaultError) -> None:
        name = pack.hex()
        path = object_path("data", name)
        indexed = pack in self.pack_info
        if isinstance(result, ObjectNotFound):
            self.present.pop(pack, None)  # deleted meanwhile
            return
        if isinstance(result, VaultError):
            self.header_unreadable.add(pack)
            if indexed:
                self.bad_packs.setdefault(pack, []).append(f"its header is unreadable: {result}")
            else:
                self.report.invalid_files.append(path)
                self.problem(
                    "data",
                    path,
                    "not-a-pack",
                    f"{path} is not a valid pack ({result}) and no index names it",
                    "none for the snapshots (nothing uses it); repair moves it away",
                )
            return
        entries = [(b.id, b.blob_type, b.offset, b.length, b.uncompressed_length) for b in result]
        if not indexed:
            self.extra.add_pack(pack, entries)
            self.report.unindexed_packs.append(name)
            self.report.index_needs_rebuild = True
            self.warning(
                "data",
                path,
                "pack-unindexed",
                f"{path} ({len(result)} blobs) is in no index",
                "its blobs are still found; rebuild-indexes adds it, prune removes it if unused",
            )
            return
        count, _size, _name, fingerprint = self.pack_info[pack]
        if count == len(result) and fingerprint == _fingerprint(result):
            return  # the common case: the header lists exactly what the index says
        unlisted = []
        for b in result:
            if not any(
                loc.pack_id == pack
                and loc.offset == b.offset
                and loc.length == b.length
                and loc.uncompressed_length == b.uncompressed_length
                for loc in self.index.lookup_all(b.id, b.blob_type)
            ):
                unlisted.append((b.id, b.blob_type, b.offset, b.length, b.uncompressed_length))
        if not unlisted and count == len(result):
            return
        if unlisted:
            self.extra.add_pack(pack, unlisted)
        in_header = {(b.id, b.blob_type, b.offset, b.length) for b in result}
        for loc in self.index.blobs_in_pack(pack):
            if (loc.blob_id, loc.blob_type, loc.offset, loc.length) not in in_header:
                self.bad_locs[(pack, loc.offset, loc.blob_id)] = (
                    f"the index places it in pack {name[:12]}, whose header does not list it"
                )
        self.report.index_needs_rebuild = True
        self.problem(
            "index",
            path,
            "index-mismatch",
            f"the index and the header of pack {name} disagree "
            f"({len(unlisted)} blobs of the header are not indexed as stored)",
        )

    # -- 6. read data ---------------------------------------------------------------------------

    def _buffer(self, size: int) -> memoryview:
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < size:
            buf = self._local.buf = bytearray(max(size, READ_PIECE))
        return memoryview(buf)[:size]

    def _read_in_pieces(self, pack: bytes, advance: bool = True) -> tuple[bool, list, int] | None:
        """``_read_pack`` for a local pack whose header reads right: the blobs are read and checked
        READ_PIECE bytes at a time (a blob larger than that in one piece), so a worker holds a few
        MiB instead of a whole pack. None when the header does not read right: the whole-file path
        then tells what is wrong."""
        name = pack.hex()
        try:
            fd = os.open(self.backend.path("data", name), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            size = os.fstat(fd).st_size
            tail = os.pread(fd, min(size, TAIL_GUESS), size - min(size, TAIL_GUESS))
            try:
                hlen = header_length_from_tail(tail[-4:], size, f"pack {name}")
                if hlen + 4 > len(tail):
                    tail = os.pread(fd, hlen + 4, size - hlen - 4)
                blobs = sorted(parse_header(self.repo, tail, size, name), key=lambda b: b.offset)
            except VaultError:
                return None
            results: list[tuple[PackedBlob, str | None]] = []
            i = 0
            while i < len(blobs):
                start = blobs[i].offset
                j = i + 1
                while j < len(blobs) and blobs[j].offset + blobs[j].length - start <= READ_PIECE:
                    j += 1
                group = blobs[i:j]
                end = group[-1].offset + group[-1].length
                view = self._buffer(end - start)
                got = 0
                while got < len(view):
                    n = os.preadv(fd, [view[got:]], start + got)
                    if n == 0:
                        break
                    got += n
                results += check_blobs(self.repo, pack, view[:got], group, start)
                i = j
        except OSError as exc:
            raise VaultError(f"cannot read data/{name[:2]}/{name}: {exc.strerror}") from None
        finally:
            os.close(fd)
        if advance:
            self.advance(size)
        return True, results, size

    def _read_whole(self, pack: bytes) -> memoryview:
        name = pack.hex()
        if self.local:
            path = self.backend.path("data", name)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                size = os.fstat(fd).st_size
                view = self._buffer(size)
                got = 0
                while got < size:
                    n = os.preadv(fd, [view[got:]], got)
                    if n == 0:
                        break
                    got += n
                return view[:got]
            except OSError as exc:
                raise VaultError(f"cannot read data/{name[:2]}/{name}: {exc.strerror}") from None
            finally:
                os.close(fd)
        return memoryview(self.backend.read("data", name))

    def _read_pack(self, pack: bytes) -> tuple[bool, list[tuple[PackedBlob, str | None]], int]:
        """(file hash right, [(blob, None or why bad)], bytes read) for one whole pack.

        The file is hashed only when it is suspect already: when every blob and the header
        authenticate and hash right and the blobs tile the file exactly, every byte of it is
        verified, and the one thing the file hash adds (the name) is what ``vault verify`` checks
        without the password. Skipping it saves a sixth of the CPU time of --read-data.
        """
        name = pack.hex()
        suspect = self._suspect(pack)
        if self.local and not suspect:
            done = self._read_in_pieces(pack)
            if done is not None:
                return done
        view = self._read_whole(pack)
        size = len(view)
        file_ok = True
        if suspect:
            file_ok = hashlib.sha256(view).hexdigest() == name
        try:
            blobs = parse_header(self.repo, view, size, name)
        except VaultError:
            # Without a header, the index still says where the blobs should be.
            blobs = [
                PackedBlob(
                    loc.blob_type, loc.offset, loc.length, loc.uncompressed_length, loc.blob_id
                )
                for loc in self.index.blobs_in_pack(pack)
            ]
        results = check_blobs(self.repo, pack, view, blobs)
        self.advance(size)
        return file_ok, results, size

    def read_targets(self) -> list[bytes]:
        """The packs to read whole: suspect ones, and with ``read_data`` every (selected) pack."""
        targets = {p for p in self.bad_packs if p in self.present}
        targets |= self.extra_packs & self.present.keys()
        if self.read_data:
            for pack in self.present:
                if pack in self.header_unreadable and pack not in self.pack_info:
                    continue  # not a pack at all; reported already
                if self.subset is None or self.subset.selects(pack.hex()):
                    targets.add(pack)
        return sorted(targets)

    def read_packs(self, packs: list[bytes]) -> None:
        """Read the ``packs`` whole and check every blob; sets ``read_found_damage`` when that
        changes what the tree walk would conclude."""
        if not packs:
            return
        self.stage("reading packs", sum(self.present[p] for p in packs), "bytes")
        early, self._early = self._early, {}
        pool, self._pool = self._pool, None
        if pool is None:
            pool = ThreadPoolExecutor(max_workers=self.cpu_workers)
        with pool:
            futures: dict[bytes, tuple[Future, bool]] = {}
            for pack in packs:
                done = early.pop(pack, None)
                if done is not None and not self._suspect(pack):
                    futures[pack] = (done, True)
                else:
                    futures[pack] = (pool.submit(self._read_one, pack), False)
                    if done is not None:
                        done.cancel()
            for done in early.values():
                done.cancel()
            for pack in packs:
                future, was_early = futures.pop(pack)
                outcome = future.result()
                if was_early:
                    if outcome is None:  # the header did not read right: the whole-file path
                        outcome = self._read_one(pack)
                    elif not isinstance(outcome, VaultError):
                        self.advance(outcome[2])
                if isinstance(outcome, ObjectNotFound):
                    continue
                path = object_path("data", pack.hex())
                if isinstance(outcome, VaultError):
                    self.read_found_damage = True
                    self.bad_packs.setdefault(pack, []).append(f"it cannot be read: {outcome}")
                    self.problem("data", path, "pack-unreadable", f"{path}: {outcome}")
                    continue
                file_ok, results, size = outcome
                self.packs_read.add(pack)
                self.report.packs_read += 1
                self.report.bytes_read += size
                self.report.blobs_read += len(results)
                newly_bad = not file_ok and pack not in self.bad_packs
                if not file_ok:
                    self.bad_packs.setdefault(pack, []).append(
                        "its content does not hash to its name"
                    )
                bad = []
                for b, why in results:
                    if why is not None:
                        key = (pack, b.offset, b.id)
                        self.bad_locs[key] = f"it is damaged in pack {pack.hex()[:12]} ({why})"
                        bad.append(f"{TYPE_NAMES[b.blob_type]}:{b.id.hex()}")
                if bad and pack not in self.bad_packs:
                    self.bad_packs[pack] = [f"{len(bad)} blob(s) do not decrypt or hash right"]
                    newly_bad = True
                if pack in self.bad_packs:
                    self.read_found_damage = True
                    # Only damaged packs need to know which of their blobs are intact.
                    self.pack_bad_blobs[pack] += bad
                    for b, why in results:
                        if why is None:
                            self.good_locs.add((pack, b.offset, b.id))
                            self.pack_good_blobs[pack] += 1
                if newly_bad:
                    self.problem(
                        "data",
                        path,
                        "pack-damaged",
                        f"{path} is damaged: {'; '.join(self.bad_packs[pack])}",
                    )

    def _suspect(self, pack: bytes) -> bool:
        """Whether a pack is read whole and hashed rather than checked blob by blob."""
        return pack in self.extra_packs or pack in self.bad_packs

    def start_early_reads(self) -> None:
        """Start checking the blobs of a local vault's packs as soon as the key is known, while the
        index, the headers and the snapshots load (those are mostly Python and I/O waits; this is
        C without the GIL). read_packs takes the results of packs that are still targets and not
        suspect by then; the others are read again or dropped."""
        if not (self.read_data and self.local):
            return
        packs = []
        for name, _size in sorted(self.listing("data")):
            try:
                pack = bytes.fromhex(name)
            except ValueError:
                continue
            if len(pack) != 32 or name != pack.hex() or pack in self.extra_packs:
                continue
            if self.subset is None or self.subset.selects(name):
                packs.append(pack)
        if packs:
            self._pool = pool = ThreadPoolExecutor(max_workers=self.cpu_workers)
            self._early = {p: pool.submit(self._early_one, p) for p in packs}

    def stop_early_reads(self) -> None:
        """Drop early reads nobody took (when checking ended before reading packs)."""
        pool, self._pool = self._pool, None
        early, self._early = self._early, {}
        for done in early.values():
            done.cancel()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _early_one(self, pack: bytes) -> tuple[bool, list, int] | VaultError | None:
        try:
            return self._read_in_pieces(pack, advance=False)
        except VaultError as exc:
            return exc

    def _read_one(self, pack: bytes) -> tuple[bool, list, int] | VaultError:
        try:
            return self._read_pack(pack)
        except VaultError as exc:
            return exc

    # -- 5. snapshots ---------------------------------------------------------------------------

    def load_snapshots(self) -> None:
        names = [n for n, _ in self.listing("snapshots")]
        self.report.snapshots = len(names)

        def load(name: str) -> tuple[str, Snapshot] | VaultError:
            try:
                return name, self.repo.load_snapshot(name)
            except VaultError as exc:
                return exc

        with ThreadPoolExecutor(max_workers=self.io_workers) as pool:
            for name, result in zip(names, pool.map(load, names), strict=True):
                if isinstance(result, ObjectNotFound):
                    continue
                if isinstance(result, VaultError):
                    self.report.unreadable_snapshots.append(f"snapshots/{name}")
                    self.problem("snapshots", f"snapshots/{name}", "snapshot-damaged", str(result))
                else:
                    self.snapshots.append(result)
        self.snapshots.sort(key=lambda item: (item[1].time.ns, item[0]))

    # -- 7. trees -------------------------------------------------------------------------------

    def data_missing(self, blob_id: bytes) -> str | None:
        loc = self.index.lookup(blob_id, DATA)
        if loc is not None and self._unusable(loc.pack_id, loc.offset, blob_id) is None:
            self.used_packs.add(loc.pack_id)
            return None
        known = self.lost.get((DATA, blob_id))
        if known is not None:
            return known
        loc, why = self.locate(DATA, blob_id)
        if loc is not None:
            self.used_packs.add(loc.pack_id)
            return None
        reason = f"data blob {blob_id.hex()[:12]} is lost: {why}"
        self.lost[(DATA, blob_id)] = reason
        return reason

    def parse_tree(self, plain: bytes, what: str) -> _Tree:
        try:
            nodes = json.loads(plain)["nodes"] or []
            subtrees: list[tuple[str, bytes]] = []
            damage: list[tuple[str, str]] = []
            for node in nodes:
                kind = node["type"]
                if kind == "dir":
                    sub = node.get("subtree")
                    if sub is None:
                        damage.append((node["name"] + "/", "the folder has no subtree"))
                    else:
                        subtrees.append((node["name"], _id(sub)))
                elif kind == "file":
                    for content in node.get("content") or ():
                        why = self.data_missing(_id(content))
                        if why is not None:
                            damage.append((node["name"], why))
                            break
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FormatError(f"{what} is not a valid tree ({exc})") from None
        if not subtrees and not damage:
            return _CLEAN_LEAF
        return _Tree(subtrees, damage)

    def _fetch(self, pack: bytes, locs: list[BlobLocation]) -> list[tuple[BlobLocation, object]]:
        """Read and decode the tree blobs ``locs`` of one pack; each result is a _Tree or error."""
        out: list[tuple[BlobLocation, object]] = []
        name = pack.hex()
        whole = None
        if self.cache is not None:
            whole = self.cache.load_pack(name)
            if whole is None:
                try:
                    whole = self.backend.read("data", name)
                    self.cache.save_pack(name, whole)
                except VaultError as exc:
                    return [(loc, exc) for loc in locs]
        locs = sorted(locs, key=lambda loc: loc.offset)
        for group in _ranges(locs):
            start = group[0].offset
            end = max(loc.offset + loc.length for loc in group)
            try:
                if whole is not None:
                    if end > len(whole):
                        raise FormatError(f"pack {name} is shorter than the index says")
                    data = memoryview(whole)[start:end]
                else:
                    data = memoryview(self.backend.read("data", name, start, end - start))
            except VaultError as exc:
                out += [(loc, exc) for loc in group]
                continue
            for loc in group:
                what = f"tree {loc.blob_id.hex()}"
                try:
                    sealed = data[loc.offset - start : loc.offset - start + loc.length]
                    plain = self.repo.decode_blob(loc, sealed, what)
                    out.append((loc, self.parse_tree(plain, what)))
                except VaultError as exc:
                    out.append((loc, exc))
        return out

    def load_trees(self) -> None:
        self.stage("reading trees", None)
        self.walk_trees()
        self.report_trees()

    def walk_trees(self, quiet: bool = False) -> None:
        """Read every tree of every snapshot once (``quiet``: without progress)."""
        todo = {snap.tree for _sid, snap in self.snapshots}
        with ThreadPoolExecutor(max_workers=self.io_workers) as pool:
            while todo:
                by_pack: dict[bytes, list[BlobLocation]] = defaultdict(list)
                for tree_id in todo:
                    loc, why = self.locate(TREE, tree_id)
                    if loc is None:
                        self.trees[tree_id] = why
                        self.lost[(TREE, tree_id)] = why
                    else:
                        by_pack[loc.pack_id].append(loc)
                todo = set()
                jobs = [pool.submit(self._fetch, p, locs) for p, locs in by_pack.items()]
                for job in jobs:
                    for loc, result in job.result():
                        tree_id = loc.blob_id
                        if isinstance(result, VaultError):
                            self.bad_locs[(loc.pack_id, loc.offset, tree_id)] = (
                                f"it is damaged in pack {loc.pack_id.hex()[:12]} ({_blob_problem(result)})"
                            )
                            todo.add(tree_id)  # try another copy, if there is one
                            continue
                        assert isinstance(result, _Tree)
                        self.trees[tree_id] = result
                        self.used_packs.add(loc.pack_id)
                        if not quiet:
                            self.advance()
                        for _, sub in result.subtrees:
                            if sub not in self.trees:
                                todo.add(sub)
                todo -= self.trees.keys()

    def report_trees(self) -> None:
        self.report.trees = sum(1 for t in self.trees.values() if isinstance(t, _Tree))
        for tree_id, info in self.trees.items():
            if isinstance(info, str):
                self.problem("data", f"tree {tree_id.hex()}", "tree-lost", f"tree blob {info}")

    def damage_of(self, memo: dict[bytes, tuple[tuple[str, str], ...]], root: bytes) -> None:
        """Fill ``memo[tree]`` with the (path, reason) damage below each tree reachable from root."""
        busy: set[bytes] = set()
        stack: list[tuple[bytes, bool]] = [(root, False)]
        while stack:
            tree_id, expanded = stack.pop()
            if tree_id in memo:
                continue
            info = self.trees.get(tree_id)
            assert isinstance(info, _Tree)
            if not expanded:
                busy.add(tree_id)
                stack.append((tree_id, True))
                for _n, sub in info.subtrees:
                    if (
                        sub not in memo
                        and sub not in busy
                        and isinstance(self.trees.get(sub), _Tree)
                    ):
                        stack.append((sub, False))
                continue
            busy.discard(tree_id)
            if info is _CLEAN_LEAF:
                memo[tree_id] = ()
                continue
            out = [(_name(n), why) for n, why in info.damage]
            for quoted, sub in info.subtrees:
                name = _name(quoted)
                sub_info = self.trees.get(sub)
                if isinstance(sub_info, str):
                    out.append(
                        (name + "/", f"the folder is lost: tree {sub.hex()[:12]} {sub_info}")
                    )
                elif sub not in memo:
                    out.append((name + "/", "the folder contains itself (a tree cycle)"))
                else:
                    out += [(f"{name}/{path}", why) for path, why in memo[sub]]
            memo[tree_id] = tuple(out)

    def classify(self) -> None:
        memo: dict[bytes, tuple[tuple[str, str], ...]] = {}
        for sid, snap in self.snapshots:
            root = self.trees.get(snap.tree)
            files: list[AffectedFile] = []
            lost = not isinstance(root, _Tree)
            if not lost:
                self.damage_of(memo, snap.tree)
                files = [AffectedFile("/" + p, why) for p, why in memo[snap.tree]]
            if lost or files:
                self.report.damaged_snapshots.append(
                    DamagedSnapshot(
                        sid,
                        snap.time.format(),
                        snap.hostname,
                        list(snap.paths),
                        list(snap.tags),
                        lost,
                        files,
                    )
                )
        for damaged in self.report.damaged_snapshots:
            what = (
                "is lost entirely (its root tree cannot be read)"
                if damaged.lost
                else f"has {len(damaged.files)} damaged file(s) or folder(s)"
            )
            self.problem(
                "snapshots",
                f"snapshots/{damaged.id}",
                "snapshot-damaged",
                f"snapshot {damaged.id[:8]} ({damaged.time}, {', '.join(damaged.paths)}) {what}",
                "those files cannot be restored from this snapshot",
            )
        if self.needed_unindexed:
            self.report.index_needs_rebuild = True
            self.problem(
                "index",
                "index/",
                "index-incomplete",
                f"snapshots need blobs that no index lists where they are (they are in "
                f"{len(self.needed_unindexed)} pack(s): "
                + ", ".join(sorted(p.hex()[:12] for p in self.needed_unindexed)[:5])
                + ("..." if len(self.needed_unindexed) > 5 else "")
                + "); restore cannot find them until `vault rebuild-indexes`",
            )
        self.report.lost_blobs = sorted(f"{TYPE_NAMES[t]}:{i.hex()}" for t, i in self.lost)
        data_lost = sum(1 for t, _i in self.lost if t == DATA)
        if data_lost:
            self.problem(
                "data",
                "data/",
                "blobs-lost",
                f"{data_lost} data blob(s) that snapshots need are in no readable pack",
            )

    # -- 8. packindex ---------------------------------------------------------------------------

    def check_packindex(self) -> None:
        from vaultfs.ops.rebuild import decode_packindex

        known = {sid for sid, _ in self.snapshots} | {
            p.removeprefix("snapshots/") for p in self.report.unreadable_snapshots
        }
        for name, _size in self.listing("packindex"):
            path = f"packindex/{name}"
            try:
                raw = self.backend.read("packindex", name)
                if hashlib.sha256(raw).hexdigest() != name:
                    raise FormatError(f"{path} is corrupt (its hash does not match its name)")
                snap, packs = decode_packindex(self.repo.key, raw, path)
            except ObjectNotFound:
                continue
            except VaultError as exc:
                self.report.bad_packindex.append(name)
                self.problem("packindex", path, "packindex-damaged", str(exc))
                continue
            unknown = [p for p in packs if p not in self.present]
            if unknown:
                self.report.bad_packindex.append(name)
                self.problem(
                    "packindex",
                    path,
                    "packindex-unknown-pack",
                    f"packindex {name[:12]} for snapshot {snap.hex()[:8]} refers to unknown pack "
                    f"{unknown[0].hex()}"
                    + (f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""),
                )
            elif snap.hex() not in known:
                self.report.bad_packindex.append(name)
                self.warning(
                    "packindex",
                    path,
                    "packindex-stale",
                    f"packindex {name[:12]} belongs to snapshot {snap.hex()}, which does not exist "
                    "(forgotten or deleted)",
                    CONSEQUENCES["packindex"],
                )

    # -- the rest -------------------------------------------------------------------------------

    def unused(self) -> None:
        if any(isinstance(t, str) for t in self.trees.values()) or self.report.unreadable_snapshots:
            return  # usage is unknown when some trees or snapshots cannot be read
        unused = sorted(p for p in self.pack_info if p in self.present and p not in self.used_packs)
        unused += sorted(p for p in self.extra.pack_ids() if p not in self.used_packs)
        self.report.unused_packs = [p.hex() for p in unused]
        if unused:
            total = sum(self.present.get(p, 0) for p in unused)
            self.warning(
                "data",
                "data/",
                "packs-unused",
                f"{len(unused)} pack(s) ({total / 1048576:.1f} MiB) hold only data no snapshot uses",
                "`vault prune` removes them (expected after forget, a lost snapshot or a repair)",
            )

    def damaged_packs(self) -> None:
        for pack in sorted(set(self.bad_packs) | {p for p, b in self.pack_bad_blobs.items() if b}):
            self.report.damaged_packs.append(
                DamagedPack(
                    pack.hex(),
                    list(self.bad_packs.get(pack, [])),
                    list(self.pack_bad_blobs.get(pack, [])),
                    self.pack_good_blobs.get(pack, 0),
                    pack in self.packs_read,
                )
            )

    def read_and_walk(self) -> None:
        """Read packs (step 5) and walk the trees (step 7). When every pack is read and nothing is
        known to be damaged yet, the walk runs in a thread meanwhile: it is mostly Python (the GIL)
        while reading is mostly C without it. If the reading then finds damage, the walk is done
        again, since which copies of blobs are usable has changed."""
        packs = self.read_targets()
        if not (self.read_data and packs and not self.bad_packs and not self.bad_locs):
            self.read_packs(packs)
            self.load_trees()
            return
        failure: list[BaseException] = []

        def walk() -> None:
            try:
                self.walk_trees(quiet=True)
            except BaseException as exc:  # re-raised in the calling thread
                failure.append(exc)

        walker = threading.Thread(target=walk, name="deep-verify-trees")
        walker.start()
        try:
            self.read_packs(packs)
        finally:
            walker.join()
        if failure:
            raise failure[0]
        if self.read_found_damage:
            self.trees.clear()
            self.lost.clear()
            self.used_packs.clear()
            self.needed_unindexed.clear()
            self.load_trees()
        else:
            self.report_trees()

    def run(self) -> DeepVerifyReport:
        started = time.monotonic()
        self.report.read_data = (
            "" if not self.read_data else str(self.subset) if self.subset else "all"
        )
        self.check_keys()
        self.start_early_reads()
        try:
            self.load_index()
            self.list_packs()
            self.check_headers()
            self.load_snapshots()
            self.read_and_walk()
        finally:
            self.stop_early_reads()
        self.classify()
        self.check_packindex()
        self.unused()
        self.damaged_packs()
        if self.cache is not None:
            self.cache.forget_except(p.hex() for p in self.present)
        self.report.seconds = time.monotonic() - started
        return self.report


def read_tail(repo: Repository, name: str, size: int, cache: VaultCache | None = None) -> bytes:
    """The sealed header plus the 4-byte length at the end of pack ``name`` (``size`` bytes), read
    with one small read in the common case (from ``cache`` when it has it)."""
    if cache is not None:
        cached = cache.load_header(name, size)
        if cached is not None:
            return cached
    length = min(size, TAIL_GUESS)
    tail = repo.backend.read("data", name, size - length, length)
    hlen = header_length_from_tail(tail, size, f"pack {name}")
    if hlen + 4 > len(tail):
        tail = repo.backend.read("data", name, size - hlen - 4, hlen + 4)
    tail = tail[len(tail) - hlen - 4 :]
    if cache is not None:
        cache.save_header(name, size, tail)
    return tail


def parse_header(
    repo: Repository, tail: bytes | memoryview, size: int, name: str
) -> list[PackedBlob]:
    """Decrypt and decode a pack header from the end of ``tail`` (the tail or the whole pack) and
    check that it describes a file of exactly ``size`` bytes. Raises FormatError/IntegrityError."""
    what = f"header of pack {name}"
    hlen = header_length_from_tail(tail[-4:], size, f"pack {name}")
    if hlen + 4 > len(tail):
        raise FormatError(f"pack {name} is shorter than its header length says")
    end = len(tail) - 4
    plain = repo.key.open(tail[end - hlen : end], what)
    blobs = decode_header(plain, repo.version, what)
    check_blobs_fit(blobs, hlen, size, what)
    return blobs


def read_header(
    repo: Repository, name: str, size: int, cache: VaultCache | None = None
) -> list[PackedBlob]:
    """The header entries of pack ``name``, reading only its tail."""
    return parse_header(repo, read_tail(repo, name, size, cache), size, name)


def check_blobs(
    repo: Repository,
    pack: bytes,
    data: bytes | memoryview,
    blobs: list[PackedBlob],
    base: int = 0,
) -> list[tuple[PackedBlob, str | None]]:
    """Decrypt, decompress and hash every blob of a whole pack ``data``: [(blob, None or why bad)].
    With ``base``, ``data`` is the part of the pack from that offset on (the blobs' offsets stay
    those in the pack).

    The same checks as Repository.decode_blob, without its per-blob costs: each blob is decrypted
    and decompressed into reused buffers (no allocation, GIL released) and only the hash of the
    plaintext is kept. Thread-safe."""
    view = memoryview(data)
    end = base + len(view)
    whole = [
        b
        for b in blobs
        if b.offset >= base and b.offset + b.length <= end and b.length >= SEAL_OVERHEAD
    ]
    results: list[tuple[PackedBlob, str | None]] = []
    if whole:
        if NATIVE:
            results = _check_native(repo.key, view, whole, base)
        elif base:
            moved = [
                PackedBlob(b.blob_type, b.offset - base, b.length, b.uncompressed_length, b.id)
                for b in whole
            ]
            results = [
                (b, why)
                for b, (_, why) in zip(whole, _check_python(repo.key, view, moved), strict=True)
            ]
        else:
            results = _check_python(repo.key, view, whole)
    if len(whole) < len(blobs):
        results += [
            (b, "the pack ends before this blob")
            for b in blobs
            if b.offset < base or b.offset + b.length > end
        ]
        results += [
            (b, "it is too short to be encrypted")
            for b in blobs
            if base <= b.offset and b.offset + b.length <= end and b.length < SEAL_OVERHEAD
        ]
    return results


def _check_python(
    key: MasterKey, view: memoryview, whole: list[PackedBlob]
) -> list[tuple[PackedBlob, str | None]]:
    """check_blobs for blobs inside ``view`` without the C part: the Poly1305 keys of all blobs come
    from one AES-128 call over their nonces, each blob is decrypted into one reused buffer."""
    results: list[tuple[PackedBlob, str | None]] = []
    # Poly1305-AES: the one-time key of a blob is r || AES-128_k(nonce).
    nonces = b"".join(view[b.offset : b.offset + 16] for b in whole)
    pads = Cipher(algorithms.AES(key.mac_k), modes.ECB()).encryptor().update(nonces)
    out = _plain_buffer(max(b.length for b in whole))
    for i, b in enumerate(whole):
        start, n = b.offset + 16, b.length - SEAL_OVERHEAD
        sealed = view[start : start + n]
        tag = Poly1305.generate_tag(key.mac_r + pads[16 * i : 16 * i + 16], sealed)
        if not hmac.compare_digest(tag, view[start + n : start + n + 16]):
            results.append((b, "it fails authentication"))
            continue
        nonce = view[b.offset : start]
        Cipher(algorithms.AES(key.encrypt), modes.CTR(nonce)).decryptor().update_into(sealed, out)
        plain: bytes | memoryview = out[:n]
        if b.uncompressed_length:
            try:
                plain = _decompressor().decompress(plain, max_output_size=b.uncompressed_length)
            except zstandard.ZstdError:
                results.append((b, "it does not decompress"))
                continue
            if len(plain) != b.uncompressed_length:
                results.append((b, "it does not decompress"))
                continue
        if hashlib.sha256(plain).digest() != b.id:
            results.append((b, "its content does not match its ID"))
            continue
        results.append((b, None))
    return results


def _check_native(
    key: MasterKey, view: memoryview, whole: list[PackedBlob], base: int
) -> list[tuple[PackedBlob, str | None]]:
    """check_blobs for blobs inside ``view`` with the C blob path: one GIL-free call checks the tag,
    decrypts, decompresses and hashes every blob (into this thread's reused buffers), so reading
    threads take the GIL once per call rather than several times per blob."""
    opened_buf = _plain_buffer(max(b.length for b in whole))
    plain_buf = _unpacked_buffer(max(b.uncompressed_length for b in whole))
    pack = _ENTRY.pack
    table = b"".join([pack(b.offset - base, b.length, b.uncompressed_length) + b.id for b in whole])
    status = _codec().check_blobs(key.raw, view, table, opened_buf, plain_buf)
    results: list[tuple[PackedBlob, str | None]] = []
    for b, code in zip(whole, status, strict=True):
        if code == 3:
            results.append((b, _check_unsized(key, view[b.offset - base :], b)))
        else:
            results.append((b, _VERDICTS[code]))
    return results


#: Codec.check_blobs' table entry (offset, length, uncompressed length; the ID follows) and the
#: meaning of its status bytes (3, a frame zstd's one-shot call refuses, is judged again in Python).
_ENTRY = struct.Struct("<QQQ")
_VERDICTS: tuple[str | None, ...] = (
    None,
    "it fails authentication",
    "it does not decompress",
    None,
    "its content does not match its ID",
    "it is too short to be encrypted",
)


def _check_unsized(key: MasterKey, view: memoryview, b: PackedBlob) -> str | None:
    """The verdict on blob ``b`` (at the start of ``view``) whose zstd frame the one-shot decoder
    refused (e.g. one that does not state its size): the streaming decoder judges it."""
    n = b.length - SEAL_OVERHEAD
    opened = _plain_buffer(n)[:n]
    if not _blob.open_into(key.raw, opened, view[: b.length]):
        return "it fails authentication"
    size = b.uncompressed_length
    try:
        plain = _decompressor().decompress(opened, max_output_size=size)
    except zstandard.ZstdError:
        return "it does not decompress"
    if len(plain) != size:
        return "it does not decompress"
    if hashlib.sha256(plain).digest() != b.id:
        return "its content does not match its ID"
    return None


_scratch = threading.local()


def _plain_buffer(size: int) -> memoryview:
    """This thread's reused decryption buffer, at least ``size`` bytes (update_into wants 15 spare)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or len(buf) < size + 15:
        buf = _scratch.buf = bytearray(max(size + 15, 1 << 20))
    return memoryview(buf)


def _unpacked_buffer(size: int) -> memoryview:
    """This thread's reused buffer for decompressed blobs, at least ``size`` bytes."""
    buf = getattr(_scratch, "unpacked", None)
    if buf is None or len(buf) < size:
        buf = _scratch.unpacked = bytearray(max(size, 1 << 20))
    return memoryview(buf)


def _codec() -> Codec:
    codec = getattr(_scratch, "codec", None)
    if codec is None:
        codec = _scratch.codec = Codec()
    return codec


def _decompressor() -> zstandard.ZstdDecompressor:
    dec = getattr(_scratch, "dec", None)
    if dec is None:
        dec = _scratch.dec = zstandard.ZstdDecompressor()
    return dec


_MASK64 = 0xFFFFFFFFFFFFFFFF


def _fingerprint(blobs: Iterable[PackedBlob]) -> int:
    """An order-independent digest of a pack's entries: equal for the index and the header of a
    pack when they list the same blobs at the same places (hash() is stable within a process).
    The index side (_note_packs) hashes the same tuples."""
    total = 0
    for b in blobs:
        total += hash((b.id, b.blob_type, b.offset, b.length, b.uncompressed_length))
    return total & _MASK64


def _id(text: str) -> bytes:
    raw = bytes.fromhex(text)
    if len(raw) != 32:
        raise ValueError(f"ID {text!r} has the wrong length")
    return raw


def _blob_problem(exc: BaseException) -> str:
    """A short reason for a blob that does not decode (the blob and pack are named elsewhere)."""
    text = str(exc)
    if "failed authentication" in text:
        return "it fails authentication"
    if "does not match its ID" in text:
        return "its content does not match its ID"
    if "decompress" in text:
        return "it does not decompress"
    return _short(exc)


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 160 else text[:157] + "..."


def _ranges(locs: list[BlobLocation]) -> Iterator[list[BlobLocation]]:
    """Group offset-sorted blobs into reads: neighbours closer than MERGE_GAP, at most MAX_RANGE."""
    group: list[BlobLocation] = []
    start = end = 0
    for loc in locs:
        if group and (loc.offset - end > MERGE_GAP or loc.offset + loc.length - start > MAX_RANGE):
            yield group
            group = []
        if not group:
            start = end = loc.offset
        group.append(loc)
        end = max(end, loc.offset + loc.length)
    if group:
        yield group


def deep_verify(
    repo: Repository,
    *,
    read_data: bool = False,
    subset: Subset | None = None,
    extra_packs: Iterable[str] = (),
    assume_gone: Iterable[str] = (),
    cache: bool | None = None,
    workers: int | None = None,
    on_stage: StageCallback | None = None,
    on_advance: AdvanceCallback | None = None,
) -> DeepVerifyReport:
    """Check the whole vault; see the module docstring. Never changes the vault.

    ``read_data`` reads every pack (or the ``subset`` of them) and checks every blob; ``extra_packs``
    (hex ids) are read in any case. ``assume_gone`` (vault paths such as ``index/…``) are treated as
    absent: what a repair would see after removing them. ``cache`` None means: use the local cache for remote backends only.
    ``on_stage(name, total, unit)`` announces each phase, ``on_advance(n)`` reports progress in it
    (from worker threads). Raises only for errors that stop the whole check (the backend cannot be
    listed); everything found wrong is in the report.
    """
    checker = _Checker(
        repo,
        read_data=read_data,
        subset=subset,
        extra_packs=extra_packs,
        assume_gone=assume_gone,
        cache=cache,
        workers=workers,
        on_stage=on_stage,
        on_advance=on_advance,
    )
    return checker.run()
