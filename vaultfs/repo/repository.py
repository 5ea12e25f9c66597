"""Repository: an opened vault — master key, config, index, blob reads and writes, snapshots, locks.

Typical use::

    repo = Repository.open(open_backend(path), password)
    repo.load_index()
    for snap_id, snap in repo.list_snapshots(): ...
    nodes = repo.load_tree(snap.tree)

Thread-safe: blob reads and writes may run in many threads at once. Every blob read is checked against its
SHA-256 id; every unpacked file (index, snapshot, lock) against its file name.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vaultfs.backend import Backend
from vaultfs.crypto import MasterKey
from vaultfs.errors import (
    FormatError,
    IntegrityError,
    NotFoundError,
    NoVault,
    ObjectNotFound,
    UsageError,
    VaultError,
    WrongPassword,
)
from vaultfs.format import unpacked
from vaultfs.format.config import Config
from vaultfs.format.index import IndexColumns, IndexFile, decode_columns
from vaultfs.format.keyfile import KeyFile
from vaultfs.format.pack import DATA, TREE, TYPE_NAMES, PackedBlob
from vaultfs.format.snapshot import Snapshot
from vaultfs.format.tree import Node, decode_tree, encode_tree
from vaultfs.repo.locks import HeldLock, LockManager, hostname, username
from vaultfs.repo.masterindex import BlobLocation, MasterIndex, preload_numpy
from vaultfs.repo.packer import DEFAULT_PACK_SIZE, PackWriter

if TYPE_CHECKING:
    from vaultfs.repo.treepacks import TreePacks

# restic flushes an intermediate index at this many blobs
INDEX_FLUSH_BLOBS = 50_000
TREE_CACHE_ENTRIES = 4096


def _polynomial() -> int:
    from vaultfs.chunker.poly import random_polynomial

    return random_polynomial()


@dataclass(frozen=True)
class KeyInfo:
    id: str
    username: str
    hostname: str
    created: str
    current: bool


class Repository:
    def __init__(self, backend: Backend, key: MasterKey, config: Config, key_id: str = "") -> None:
        self.backend = backend
        self.key = key
        self.config = config
        self.key_id = key_id
        self.index = MasterIndex()
        self.index_loaded = False
        self._tree_cache: OrderedDict[bytes, list[Node]] = OrderedDict()
        self._tree_lock = threading.Lock()
        #: Set for a remote vault: tree blobs then come a whole pack at a time (repo/treepacks.py).
        self.tree_packs: TreePacks | None = None
        self._new_index = IndexFile()
        self._new_index_lock = threading.Lock()
        self._packer: PackWriter | None = None
        self.pack_size = DEFAULT_PACK_SIZE
        self.locks = LockManager(
            save=lambda data: self.save_unpacked("locks", data),
            load=lambda name: self.load_unpacked("locks", name),
            list_names=lambda: [n for n, _ in self.backend.list("locks")],
            remove=lambda name: self.backend.remove("locks", name),
        )

    # -- opening -------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self.config.version

    @property
    def id(self) -> str:
        return self.config.id

    @classmethod
    def init(
        cls,
        backend: Backend,
        password: bytes,
        *,
        version: int = 2,
        polynomial: int | None = None,
        master: MasterKey | None = None,
    ) -> Repository:
        """Create a new vault. Refuses when a config already exists at that location."""
        if version not in (1, 2):
            raise UsageError(f"repository version must be 1 or 2, not {version}")
        if backend.exists("config", ""):
            raise VaultError(f"a vault already exists at {backend}; choose another location")
        backend.create()
        master = master or MasterKey.generate()
        config = Config.new(version, polynomial if polynomial is not None else _polynomial())
        repo = cls(backend, master, config)
        repo.key_id = repo.add_key(password)
        backend.write("config", "", master.seal(config.encode()))
        return repo

    @classmethod
    def open(cls, backend: Backend, password: bytes, key_hint: str | None = None) -> Repository:
        """Open with a password: tries every key file (the hinted one first)."""
        try:
            sealed_config = backend.read("config", "")
        except ObjectNotFound:
            raise NoVault(
                f"there is no vault at {backend} (no config file); create one with `vault init`"
            ) from None
        names = [n for n, _ in backend.list("keys")]
        if not names:
            raise FormatError(
                f"the vault at {backend} has no key files in keys/; it cannot be opened"
            )
        if key_hint:
            names.sort(key=lambda n: not n.startswith(key_hint))
        master, key_id = None, ""
        problems = []
        preload_numpy()  # while the key derivation runs
        for name in names:
            try:
                raw = backend.read("keys", name)
                if hashlib.sha256(raw).hexdigest() != name:
                    problems.append(f"keys/{name} is corrupt (hash does not match its name)")
                    continue
                master = KeyFile.decode(raw, f"keys/{name}").open(password, f"keys/{name}")
                key_id = name
                break
            except WrongPassword:
                continue
            except (FormatError, ObjectNotFound) as exc:
                problems.append(str(exc))
        if master is None:
            if problems and len(problems) == len(names):
                raise FormatError(f"no usable key file: {problems[0]}")
            raise WrongPassword(
                f"wrong password: no key file of the vault at {backend} opens with it"
            )
        try:
            config = Config.decode(master.open(sealed_config, "config"))
        except IntegrityError:
            raise IntegrityError(
                "config is corrupt (authentication failed); the vault cannot be opened"
            ) from None
        except FormatError as exc:
            raise FormatError(f"config is corrupt: {exc}") from None
        return cls(backend, master, config, key_id)

    # -- keys ----------------------------------------------------------------------------------

    def add_key(self, password: bytes, *, user: str | None = None, host: str | None = None) -> str:
        kf = KeyFile.create(
            self.key, password, username=user or username(), hostname=host or hostname()
        )
        raw = kf.encode()
        name = hashlib.sha256(raw).hexdigest()
        self.backend.write("keys", name, raw)
        return name

    def list_keys(self) -> list[KeyInfo]:
        out = []
        for name, _size in self.backend.list("keys"):
            try:
                kf = KeyFile.decode(self.backend.read("keys", name), f"keys/{name}")
                out.append(KeyInfo(name, kf.username, kf.hostname, kf.created, name == self.key_id))
            except VaultError:
                out.append(KeyInfo(name, "?", "?", "", name == self.key_id))
        return sorted(out, key=lambda k: k.created)

    def find_key(self, prefix: str) -> str:
        return _unique(prefix, [n for n, _ in self.backend.list("keys")], "key")

    def remove_key(self, key_id: str) -> None:
        names = [n for n, _ in self.backend.list("keys")]
        if key_id not in names:
            raise NotFoundError(f"key {key_id} does not exist")
        if len(names) <= 1:
            raise VaultError(
                "refusing to remove the last key: the vault could never be opened again"
            )
        if key_id == self.key_id:
            raise VaultError(
                "refusing to remove the key this command opened the vault with; "
                "open it with another password first"
            )
        self.backend.remove("keys", key_id)

    # -- unpacked files ------------------------------------------------------------------------

    def save_unpacked(self, kind: str, json_bytes: bytes) -> str:
        data = self.key.seal(unpacked.encode(json_bytes, self.version))
        name = hashlib.sha256(data).hexdigest()
        self.backend.write(kind, name, data)
        return name

    def load_unpacked(self, kind: str, name: str) -> bytes:
        what = f"{kind}/{name}"
        data = self.backend.read(kind, name)
        if hashlib.sha256(data).hexdigest() != name:
            raise IntegrityError(f"{what} is corrupt (its hash does not match its name)")
        return unpacked.decode(self.key.open(data, what), what)

    # -- snapshots -----------------------------------------------------------------------------

    def load_snapshot(self, snap_id: str) -> Snapshot:
        return Snapshot.decode(self.load_unpacked("snapshots", snap_id), f"snapshots/{snap_id}")

    def save_snapshot(self, snap: Snapshot) -> str:
        return self.save_unpacked("snapshots", snap.encode())

    def list_snapshots(
        self, on_error: Callable[[VaultError], None] | None = None
    ) -> list[tuple[str, Snapshot]]:
        """All snapshots, oldest first. Unreadable ones raise, or go to ``on_error`` when given."""
        names = [n for n, _ in self.backend.list("snapshots")]

        def load(name: str) -> tuple[str, Snapshot] | VaultError:
            try:
                return name, self.load_snapshot(name)
            except VaultError as exc:
                return exc

        out = []
        with ThreadPoolExecutor(max_workers=8) as pool:
            for result in pool.map(load, names):
                if isinstance(result, VaultError):
                    if on_error is None:
                        raise result
                    on_error(result)
                else:
                    out.append(result)
        out.sort(key=lambda item: (item[1].time.ns, item[0]))
        return out

    def find_snapshot(
        self,
        spec: str,
        *,
        hosts: list[str] | None = None,
        tags: list[str] | None = None,
        paths: list[str] | None = None,
    ) -> tuple[str, Snapshot]:
        """A full ID, a unique prefix, or ``latest`` (the newest matching the filters)."""
        if spec == "latest":
            snaps = filter_snapshots(self.list_snapshots(), hosts=hosts, tags=tags, paths=paths)
            if not snaps:
                raise NotFoundError("no snapshot matches; `vault snapshots` lists them")
            return snaps[-1]
        name = _unique(spec, [n for n, _ in self.backend.list("snapshots")], "snapshot")
        return name, self.load_snapshot(name)

    # -- index ---------------------------------------------------------------------------------

    def load_index(self, on_error: Callable[[VaultError], None] | None = None) -> MasterIndex:
        """Read every index file into the master index (in parallel). Returns it."""
        names = [n for n, _ in self.backend.list("index")]

        def load(name: str) -> IndexColumns | VaultError:
            try:
                return decode_columns(self.load_unpacked("index", name), f"index/{name}")
            except VaultError as exc:
                return exc

        index = MasterIndex()
        with ThreadPoolExecutor(max_workers=4) as pool:
            for result in pool.map(load, names):
                if isinstance(result, VaultError):
                    if on_error is None:
                        raise result
                    on_error(result)
                    continue
                index.add_arrays(*result)
        self.index = index
        self.index_loaded = True
        return index

    def _require_index(self) -> None:
        if not self.index_loaded:
            raise RuntimeError("load_index() must be called before reading or writing blobs")

    # -- blobs ---------------------------------------------------------------------------------

    def decode_blob(self, loc: BlobLocation, sealed: bytes | memoryview, what: str = "") -> bytes:
        """Decrypt, decompress and hash-check one stored blob."""
        what = (
            what
            or f"{TYPE_NAMES[loc.blob_type]} blob {loc.blob_id.hex()} in pack {loc.pack_id.hex()}"
        )
        plain = self.key.open(sealed, what)
        if loc.uncompressed_length:
            plain = unpacked.decompress(plain, loc.uncompressed_length, what)
        if hashlib.sha256(plain).digest() != loc.blob_id:
            raise IntegrityError(f"{what} is corrupt (content does not match its ID)")
        return plain

    def load_blob(self, blob_type: int, blob_id: bytes) -> bytes:
        """Plaintext of a blob, checked against its ID; tries every pack that holds it."""
        self._require_index()
        locations = self.index.lookup_all(blob_id, blob_type)
        if not locations:
            raise ObjectNotFound(
                f"{TYPE_NAMES[blob_type]} blob {blob_id.hex()} is not in the index; "
                "run `vault rebuild-indexes` if packs are missing from it"
            )
        error: VaultError | None = None
        for loc in locations:
            if blob_type == TREE and self.tree_packs is not None:
                sealed = self.tree_packs.read(loc)
                if sealed is not None:
                    try:
                        return self.decode_blob(loc, sealed)
                    except VaultError:
                        self.tree_packs.drop(loc.pack_id)  # and read the blob on its own
            try:
                sealed = self.backend.read("data", loc.pack_id.hex(), loc.offset, loc.length)
                return self.decode_blob(loc, sealed)
            except VaultError as exc:
                error = exc
        assert error is not None
        raise error

    def load_tree(self, tree_id: bytes) -> list[Node]:
        with self._tree_lock:
            nodes = self._tree_cache.get(tree_id)
            if nodes is not None:
                self._tree_cache.move_to_end(tree_id)
                return nodes
        nodes = decode_tree(self.load_blob(TREE, tree_id), f"tree {tree_id.hex()}")
        with self._tree_lock:
            self._tree_cache[tree_id] = nodes
            while len(self._tree_cache) > TREE_CACHE_ENTRIES:
                self._tree_cache.popitem(last=False)
        return nodes

    def seal_blob(
        self, blob_type: int, plain: bytes | memoryview, compress: bool = True
    ) -> tuple[bytes, int]:
        """(sealed bytes, uncompressed length or 0) as the vault's version stores this blob type."""
        # an empty blob is stored raw: uncompressed length 0 would read as "not compressed"
        if self.version >= 2 and plain and (compress or blob_type == TREE):
            return self.key.seal(unpacked.compress(plain)), len(plain)
        return self.key.seal(plain), 0

    @property
    def packer(self) -> PackWriter:
        if self._packer is None:
            self._packer = PackWriter(self.backend, self.key, self._on_pack, self.pack_size)
        return self._packer

    def _on_pack(self, pack_id: bytes, blobs: list[PackedBlob]) -> None:
        self.index.add_pack(
            pack_id, [(b.id, b.blob_type, b.offset, b.length, b.uncompressed_length) for b in blobs]
        )
        with self._new_index_lock:
            self._new_index.packs[pack_id] = blobs
            full = self._new_index.blob_count() >= INDEX_FLUSH_BLOBS
        if full:
            self.flush_index()

    def save_blob(
        self, blob_type: int, plain: bytes, blob_id: bytes | None = None
    ) -> tuple[bytes, bool]:
        """Store a blob unless the vault already has it. Returns (id, stored_now)."""
        self._require_index()
        blob_id = blob_id or hashlib.sha256(plain).digest()
        if self.index.has(blob_id, blob_type) or self.packer.pending(blob_type, blob_id):
            return blob_id, False
        sealed, ulen = self.seal_blob(blob_type, plain)
        return blob_id, self.packer.add(blob_type, blob_id, sealed, ulen)

    def save_tree(self, nodes: list[Node]) -> bytes:
        blob_id, _ = self.save_blob(TREE, encode_tree(nodes))
        return blob_id

    def flush(self) -> None:
        """Write all open packs, then an index file for every pack written since the last flush."""
        if self._packer is not None:
            self._packer.flush()
        self.flush_index()

    def flush_index(self) -> None:
        with self._new_index_lock:
            if not self._new_index.packs:
                return
            index, self._new_index = self._new_index, IndexFile()
        self.save_unpacked("index", index.encode())

    # -- locks ---------------------------------------------------------------------------------

    def lock(self, exclusive: bool = False) -> HeldLock:
        return self.locks.acquire(exclusive)

    # -- walking -------------------------------------------------------------------------------

    def walk(self, tree_id: bytes, prefix: str = "") -> Iterator[tuple[str, Node]]:
        """Depth-first (path, node) for everything below a tree; paths use "/" and no leading slash."""
        for node in self.load_tree(tree_id):
            path = f"{prefix}/{node.name}" if prefix else node.name
            yield path, node
            if node.type == "dir" and node.subtree is not None:
                yield from self.walk(node.subtree, path)

    def find_path(self, tree_id: bytes, path: str) -> Node | None:
        """The node at ``path`` below a tree ("" or "/" gives None: the tree itself)."""
        parts = [p for p in path.strip("/").split("/") if p]
        node = None
        current = tree_id
        for i, part in enumerate(parts):
            if current is None:
                raise NotFoundError(f"{'/'.join(parts[:i])} is not a folder in the snapshot")
            match = next((n for n in self.load_tree(current) if n.name == part), None)
            if match is None:
                raise NotFoundError(f"/{'/'.join(parts[: i + 1])} does not exist in the snapshot")
            node = match
            current = match.subtree if match.type == "dir" else None
        return node


def filter_snapshots(
    snaps: list[tuple[str, Snapshot]],
    *,
    hosts: list[str] | None = None,
    tags: list[str] | None = None,
    paths: list[str] | None = None,
) -> list[tuple[str, Snapshot]]:
    """restic's filter semantics: any host; each --tag value is a comma list that must all match (OR
    between values); all given paths must be among the snapshot's paths."""
    out = []
    for sid, snap in snaps:
        if hosts and snap.hostname not in hosts:
            continue
        if tags and not any(set(t.split(",")) <= set(snap.tags) for t in tags):
            continue
        if paths and not {os.path.normpath(p) for p in paths} <= {
            os.path.normpath(p) for p in snap.paths
        }:
            continue
        out.append((sid, snap))
    return out


def _unique(prefix: str, names: list[str], what: str) -> str:
    prefix = prefix.lower()
    matches = [n for n in names if n.startswith(prefix)]
    if not prefix or not matches:
        raise NotFoundError(f"no {what} with ID {prefix!r}")
    if len(matches) > 1:
        raise NotFoundError(
            f"{what} ID prefix {prefix!r} is ambiguous ({len(matches)} match); give more characters"
        )
    return matches[0]


__all__ = ["DATA", "TREE", "Repository", "KeyInfo", "filter_snapshots"]
