"""The pyfuse3 Operations of a vault mount: a read-only file system over the vault's snapshots.

Inodes are allocated lazily: a folder's tree blob is loaded when the folder is first opened or searched,
and its entries get inode numbers when the kernel first hears of them (``lookup`` or ``readdir``, which
pyfuse3 serves as readdirplus: every listed entry counts as a lookup). Each inode counts its lookups and
is dropped when ``forget`` brings the count to zero; inode numbers are never reused, so a stale number can
never name the wrong object. Files that restic recorded as hardlinks (same ``device_id`` and ``inode``,
``links`` > 1) get one inode number per snapshot folder, with ``links`` as their link count.

Virtual folders (snapshots/, hosts/, tags/, ids/, see layout.py) are cached by the kernel for one second
only, and looking into them re-lists the vault's snapshots at most every ``refresh_interval`` seconds,
so a backup that finishes while the vault is mounted shows up without remounting. Everything inside a
snapshot never changes, so the kernel may keep its names, attributes and pages for a long time.

Request handlers may raise only FUSEError (anything else would stop pyfuse3's main loop), so every
handler goes through ``_guarded``: a VaultError becomes EIO with its message logged, any other exception
is a bug, logged with its traceback, and also becomes EIO.

Thread/task safety: all state lives in the trio thread; repository calls run in worker threads through
``trio.to_thread.run_sync`` with one CapacityLimiter.
"""

from __future__ import annotations

import errno
import functools
import logging
import mmap
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3
import trio

from vaultfs.backend import is_local
from vaultfs.errors import VaultError
from vaultfs.format.snapshot import Snapshot
from vaultfs.format.tree import Node, fs_bytes
from vaultfs.fuse.catalog import Catalog
from vaultfs.fuse.inodes import Inode, Leaf, TreeDir, VirtualDir, VirtualLink, node_attrs, xattrs
from vaultfs.fuse.layout import Child, Layout, SnapRoot, VDir, build_layout
from vaultfs.fuse.pages import PagePusher
from vaultfs.fuse.reader import BlobReader, BlobUnreadable, FileContent, file_content_sync
from vaultfs.repo.repository import Repository

log = logging.getLogger("vaultfs.fuse")

ROOT = pyfuse3.ROOT_INODE
#: Seconds the kernel may cache names and attributes inside a snapshot: they never change.
TREE_TIMEOUT = 3600.0
#: Seconds for the virtual folders, whose contents change when snapshots are added or removed.
LIVE_TIMEOUT = 1.0
BLOCK_SIZE = 128 * 1024
#: Reads this close to where the previous read of the same open file ended count as sequential.
SEQUENTIAL_SLACK = 1024 * 1024
#: A file read sequentially stops having read-ahead pushed into the page cache after this many reads
#: that asked for data already queued for it (see read()).
LATE_PUSHES = 3
#: Files with more blobs than this get their offset table built in a worker thread.
INLINE_BLOBS = 64
PAGE = mmap.PAGESIZE
#: Opening a file up to this size fetches it together with the small files that follow it in its
#: folder (the order tar, cp and rsync read them), up to SIBLING_BYTES and SIBLING_FILES at a time.
SMALL_FILE = 1024 * 1024
SIBLING_BYTES = 4 * 1024 * 1024
SIBLING_FILES = 256
#: Over a remote vault, where every request costs a round trip, that prefetch goes on past the end of
#: the folder into the folders that follow in a depth-first walk (the order tar, cp -r and rsync visit
#: them), loading at most WALK_TREES trees per walk.
WALK_TREES = 256
#: Listing a folder loads the trees of up to this many of its subfolders in the background; trees
#: holding up to PREFETCHED_NODES entries in all wait for their folders to be visited.
SUBTREE_PREFETCH = 256
PREFETCHED_NODES = 50_000


class _OpenFile:
    __slots__ = ("leaf", "content", "path", "next_off", "high", "pushed_to", "late")

    def __init__(self, leaf: Leaf, content: FileContent, path: Callable[[], str]) -> None:
        self.leaf = leaf
        self.content = content
        self.path = path  # computed only for error messages
        self.next_off = 0  # where the last read ended
        self.high = 0  # the end of the furthest read: pages below it were asked for already
        self.pushed_to = 0  # the end of the furthest data queued for the page cache
        self.late = 0  # reads that asked for data already queued (see read())


_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])


def _guarded(fn: _F) -> _F:
    @functools.wraps(fn)
    async def wrapper(self: VaultOperations, *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except VaultError as exc:
            log.error("%s", exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("internal error in %s (a bug; please report it)", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


class VaultOperations(pyfuse3.Operations):
    """Read-only view of a vault. Build it, call ``load_sync()`` (reads index and snapshots), then mount.

    With ``catalog`` the root shows the virtual folders; with ``root_tree`` it shows that one folder of a
    snapshot instead (``vault mount --snapshot``), and ``root_node`` (or ``root_snap``) gives its
    attributes.
    """

    supports_dot_lookup = True

    def __init__(
        self,
        repo: Repository,
        *,
        mountpoint: str,
        catalog: Catalog | None = None,
        root_tree: bytes | None = None,
        root_node: Node | None = None,
        root_snap: Snapshot | None = None,
        cache_bytes: int = 64 * 1024 * 1024,
        threads: int = 4,
        refresh_interval: float = 3.0,
        push_pages: bool = True,
    ) -> None:
        super().__init__()
        self.repo = repo
        self.mountpoint = mountpoint
        self.catalog = catalog
        self.limiter = trio.CapacityLimiter(threads)
        self.reader = BlobReader(repo, self.limiter, cache_bytes)
        self.pusher = PagePusher() if push_pages else None
        self.refresh_interval = refresh_interval
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.started_ns = time.time_ns()
        self.layout = Layout()
        self._inodes: dict[int, Inode] = {}
        self._vchildren: dict[tuple, int] = {}
        self._next_ino = ROOT + 1
        self._files: dict[int, _OpenFile] = {}
        self._dirs: dict[int, tuple[Inode, list[Any]]] = {}
        self._next_fh = 1
        self._refresh_lock = trio.Lock()
        self._next_refresh = 0.0
        self._statfs: tuple[float, int] | None = None
        self._bad_trees: set[bytes] = set()
        self._trees: OrderedDict[bytes, list[Node]] = OrderedDict()
        self._tree_nodes = 0  # entries in self._trees
        self._tree_fetches: dict[bytes, trio.Event] = {}
        self.walk_folders = not is_local(repo.backend)  # see _walk_on
        self._walk_mark: bytes | None = None
        self._walking = False
        root: Inode
        if catalog is not None:
            root = VirtualDir(ROOT, ROOT, b"", ())
        else:
            root = TreeDir(ROOT, ROOT, b"", root_tree, {}, node=root_node, snap=root_snap)
        root.lookups = 1  # the kernel never forgets the root
        self._inodes[ROOT] = root
        #: Called (in the trio thread) when the kernel's INIT request arrives, before it is answered.
        self.on_init: Callable[[], None] | None = None

    def init(self) -> None:
        if self.on_init is not None:
            self.on_init()

    def load_sync(self) -> None:
        """Read the index and the snapshot list (blocking; call before mounting)."""
        if self.catalog is not None:
            self.catalog.load_sync()
            self.layout = build_layout(self.catalog.listing(), self.started_ns)

    # -- inode table -----------------------------------------------------------------------------

    def _get(self, ino: int) -> Inode:
        inode = self._inodes.get(ino)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return inode

    def _add(self, inode: Inode) -> Inode:
        self._inodes[inode.ino] = inode
        return inode

    def _new_ino(self) -> int:
        ino = self._next_ino
        self._next_ino += 1
        return ino

    def _drop(self, inode: Inode) -> None:
        """Forget an inode the kernel no longer knows, and every map entry that points to it."""
        if inode.ino == ROOT or self._inodes.get(inode.ino) is not inode:
            return
        del self._inodes[inode.ino]
        parent = self._inodes.get(inode.parent)
        if isinstance(parent, TreeDir) and parent.children.get(inode.name) == inode.ino:
            del parent.children[inode.name]
        if (
            isinstance(inode, Leaf)
            and inode.hardlink is not None
            and inode.links.get(inode.hardlink) == inode.ino
        ):
            del inode.links[inode.hardlink]
        if inode.vkey is not None and self._vchildren.get(inode.vkey) == inode.ino:
            del self._vchildren[inode.vkey]

    def _tree_child(self, parent: TreeDir, index: int) -> Inode:
        """The inode of entry ``index`` of a loaded folder (allocated on first use)."""
        assert parent.nodes is not None
        name = parent.names[index]
        known = parent.children.get(name)
        if known is not None:
            inode = self._inodes.get(known)
            if inode is not None:
                return inode
        node = parent.nodes[index]
        hardlink = None
        if node.type != "dir" and node.links > 1 and node.inode:
            hardlink = (node.device_id, node.inode)
            shared = parent.links.get(hardlink)
            if shared is not None and (inode := self._inodes.get(shared)) is not None:
                parent.children[name] = shared
                return inode
        ino = self._new_ino()
        if node.type == "dir":
            inode = TreeDir(ino, parent.ino, name, node.subtree, parent.links, node=node)
        else:
            inode = Leaf(ino, parent.ino, name, node, parent.links, hardlink, index)
            if hardlink is not None:
                parent.links[hardlink] = ino
        parent.children[name] = ino
        return self._add(inode)

    def _virtual_child(self, parent: VirtualDir, name: bytes, child: Child) -> Inode:
        """The inode of one entry of a virtual folder (allocated on first use)."""
        key: tuple
        if isinstance(child, VDir):
            key = ("dir", child.path)
        elif isinstance(child, SnapRoot):
            key = ("snap", parent.path, name, child.snap_id)
        else:
            key = ("link", parent.path, name, child.target)
        known = self._vchildren.get(key)
        if known is not None:
            existing = self._inodes.get(known)
            if existing is not None:
                return existing
        ino = self._new_ino()
        inode: Inode
        if isinstance(child, VDir):
            inode = VirtualDir(ino, parent.ino, name, child.path)
        elif isinstance(child, SnapRoot):
            snap = self._snapshot(child.snap_id)
            inode = TreeDir(ino, parent.ino, name, snap.tree, {}, snap=snap)
        else:
            snap = self._snapshot(child.snap_id)
            inode = VirtualLink(ino, parent.ino, name, child.target, snap.time.ns)
        inode.vkey = key
        self._vchildren[key] = ino
        return self._add(inode)

    def _snapshot(self, snap_id: str) -> Snapshot:
        assert self.catalog is not None
        snap = self.catalog.snapshots.get(snap_id)
        if snap is None:
            raise pyfuse3.FUSEError(errno.ENOENT)  # forgotten between listing and lookup
        return snap

    def _path(self, inode: Inode) -> str:
        """The inode's path below the mount point, for messages."""
        parts = []
        while inode.ino != ROOT:
            parts.append(inode.name)
            parent = self._inodes.get(inode.parent)
            if parent is None:
                parts.append(b"...")
                break
            inode = parent
        rel = b"/".join(reversed(parts))
        return os.path.join(self.mountpoint, os.fsdecode(rel))

    # -- attributes ------------------------------------------------------------------------------

    def _attrs(self, inode: Inode) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode.ino
        attr.st_blksize = BLOCK_SIZE
        timeout = TREE_TIMEOUT
        if isinstance(inode, Leaf):
            node_attrs(attr, inode.node)
            attr.st_nlink = inode.node.links if inode.hardlink is not None else 1
        elif isinstance(inode, TreeDir):
            if inode.node is not None:
                node_attrs(attr, inode.node)
            else:
                snap = inode.snap
                attr.st_mode = stat.S_IFDIR | 0o555
                attr.st_uid = snap.uid if snap is not None else self.uid
                attr.st_gid = snap.gid if snap is not None else self.gid
                ns = snap.time.ns if snap is not None else self.started_ns
                attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = ns
            # restic records no link count for folders; 1 tells find and fts "unknown"
            attr.st_nlink = 1
            if inode.vkey is not None:
                timeout = LIVE_TIMEOUT
        elif isinstance(inode, VirtualDir):
            children = self.layout.dirs.get(inode.path, {})
            attr.st_mode = stat.S_IFDIR | 0o555
            attr.st_nlink = 2 + sum(isinstance(c, VDir | SnapRoot) for c in children.values())
            attr.st_uid = self.uid
            attr.st_gid = self.gid
            ns = self.layout.mtime_ns.get(inode.path, self.started_ns)
            attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = ns
            timeout = LIVE_TIMEOUT
        elif isinstance(inode, VirtualLink):
            attr.st_mode = stat.S_IFLNK | 0o777
            attr.st_nlink = 1
            attr.st_uid = self.uid
            attr.st_gid = self.gid
            attr.st_size = len(inode.target)
            attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = inode.time_ns
            timeout = LIVE_TIMEOUT
        attr.entry_timeout = timeout
        attr.attr_timeout = timeout
        return attr

    # -- loading ---------------------------------------------------------------------------------

    async def _load_dir(self, inode: TreeDir) -> list[Node]:
        """The folder's entries, loading its tree if needed; starts loading its subfolders' trees."""
        if inode.nodes is not None:
            return inode.nodes
        nodes: list[Node] = []
        tree_id = inode.tree_id
        if tree_id is not None:
            pending = self._tree_fetches.get(tree_id)
            if pending is not None:
                await pending.wait()
            prefetched = self._trees.pop(tree_id, None)
            if prefetched is not None:
                self._tree_nodes -= len(prefetched)
                nodes = prefetched
            else:
                try:
                    nodes = await trio.to_thread.run_sync(
                        self.repo.load_tree, tree_id, limiter=self.limiter
                    )
                except VaultError as exc:
                    if tree_id not in self._bad_trees:
                        self._bad_trees.add(tree_id)
                        log.error("%s: cannot list this folder: %s", self._path(inode), exc)
                    raise pyfuse3.FUSEError(errno.EIO) from None
        if inode.nodes is None:  # another task may have loaded it meanwhile
            inode.nodes = nodes
            inode.names = [fs_bytes(node.name) for node in nodes]
            self._prefetch_subtrees(nodes)
        return inode.nodes

    def _prefetch_subtrees(self, nodes: list[Node]) -> None:
        """Load the trees of a folder's subfolders in one background worker call: a walk (find, du,
        tar) then finds each folder's entries ready instead of waiting for a thread hop per folder."""
        if self.reader.nursery is None:
            return
        wanted = []
        for node in nodes:
            tree_id = node.subtree
            if node.type != "dir" or tree_id is None:
                continue
            if tree_id in self._trees or tree_id in self._tree_fetches:
                continue
            wanted.append(tree_id)
            if len(wanted) >= SUBTREE_PREFETCH:
                break
        if not wanted:
            return
        done = trio.Event()
        for tree_id in wanted:
            self._tree_fetches[tree_id] = done
        self.reader.nursery.start_soon(self._fetch_trees, wanted, done)

    async def _fetch_trees(self, tree_ids: list[bytes], done: trio.Event) -> None:
        try:
            trees = await trio.to_thread.run_sync(
                self._load_trees_sync, tree_ids, limiter=self.limiter
            )
            for tree_id, nodes in trees.items():
                if tree_id not in self._trees:
                    self._trees[tree_id] = nodes
                    self._tree_nodes += len(nodes)
            while self._tree_nodes > PREFETCHED_NODES and self._trees:
                self._tree_nodes -= len(self._trees.popitem(last=False)[1])
        finally:
            for tree_id in tree_ids:
                if self._tree_fetches.get(tree_id) is done:
                    del self._tree_fetches[tree_id]
            done.set()

    def _load_trees_sync(self, tree_ids: list[bytes]) -> dict[bytes, list[Node]]:
        """Runs in a worker thread. Trees that fail are left out: the folder's own visit reports it."""
        trees = {}
        for tree_id in tree_ids:
            try:
                trees[tree_id] = self.repo.load_tree(tree_id)
            except VaultError:
                continue
        return trees

    async def _refresh(self) -> None:
        """Re-list the vault's snapshots if the last listing is older than ``refresh_interval``."""
        if self.catalog is None or trio.current_time() < self._next_refresh:
            return
        async with self._refresh_lock:
            if trio.current_time() < self._next_refresh:
                return
            try:
                changed = await trio.to_thread.run_sync(
                    self.catalog.refresh_sync, limiter=self.limiter
                )
            except VaultError as exc:
                log.warning("cannot re-list the snapshots: %s", exc)
                changed = False
            finally:
                self._next_refresh = trio.current_time() + self.refresh_interval
            if changed:
                self.layout = build_layout(self.catalog.listing(), self.started_ns)

    async def _content(self, leaf: Leaf) -> FileContent:
        if leaf.content is None:
            blobs = leaf.node.content or []
            if len(blobs) > INLINE_BLOBS:
                content = await trio.to_thread.run_sync(
                    file_content_sync, self.repo.index, blobs, limiter=self.limiter
                )
            else:
                content = file_content_sync(self.repo.index, blobs)
            leaf.content = content
        return leaf.content

    # -- request handlers ------------------------------------------------------------------------

    @_guarded
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._get(parent_inode)
        if name == b".":
            found: Inode = parent
        elif name == b"..":
            found = self._get(parent.parent)
        elif isinstance(parent, VirtualDir):
            await self._refresh()
            child = self.layout.child(parent.path, name)
            if child is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            found = self._virtual_child(parent, name, child)
        elif isinstance(parent, TreeDir):
            await self._load_dir(parent)
            if parent.by_name is None:
                parent.by_name = {n: i for i, n in enumerate(parent.names)}
            index = parent.by_name.get(name)
            if index is None:
                # A snapshot never changes, so the kernel may remember that the name is missing.
                negative = pyfuse3.EntryAttributes()
                negative.st_ino = 0
                negative.entry_timeout = TREE_TIMEOUT
                return negative
            found = self._tree_child(parent, index)
        else:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        found.lookups += 1
        return self._attrs(found)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        try:
            for ino, count in inode_list:
                inode = self._inodes.get(ino)
                if inode is None:
                    continue
                inode.lookups -= count
                if inode.lookups <= 0:
                    self._drop(inode)
        except Exception:
            log.exception("internal error in forget (a bug; please report it)")

    @_guarded
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._get(inode))

    @_guarded
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        found = self._get(inode)
        if isinstance(found, VirtualLink):
            return found.target
        if isinstance(found, Leaf) and found.node.type == "symlink":
            return fs_bytes(found.node.linktarget)
        raise pyfuse3.FUSEError(errno.EINVAL)

    @_guarded
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        found = self._get(inode)
        entries: list[Any]
        if isinstance(found, VirtualDir):
            await self._refresh()
            entries = list(self.layout.dirs.get(found.path, {}).items())
        elif isinstance(found, TreeDir):
            entries = await self._load_dir(found)
        else:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = (found, entries)
        return fh

    @_guarded
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        folder, entries = self._dirs[fh]
        # The offset handed back with each entry is its position + 1 in a list fixed at opendir, so
        # a listing resumes exactly where the kernel's buffer ran full.
        for i in range(start_id, len(entries)):
            if isinstance(folder, TreeDir):
                name = folder.names[i]
                child = self._tree_child(folder, i)
            else:
                assert isinstance(folder, VirtualDir)
                name, spec = entries[i]
                try:
                    child = self._virtual_child(folder, name, spec)
                except pyfuse3.FUSEError:
                    continue  # its snapshot was forgotten since opendir
            if not pyfuse3.readdir_reply(token, name, self._attrs(child), i + 1):
                if child.lookups == 0:
                    self._drop(child)
                return
            child.lookups += 1

    @_guarded
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @_guarded
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        found = self._get(inode)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if not isinstance(found, Leaf):
            raise pyfuse3.FUSEError(errno.EISDIR if isinstance(found, TreeDir) else errno.EINVAL)
        content = await self._content(found)
        path = functools.partial(self._path, found)
        found.opened += 1
        try:
            if found.node.size <= SMALL_FILE:
                self._prefetch_siblings(found, content)
                if self.pusher is not None and not found.stored and found.opened == 1:
                    await self._store_whole(found, content, path)
        except BaseException:
            found.opened -= 1
            raise
        fh = self._next_fh
        self._next_fh += 1
        self._files[fh] = _OpenFile(found, content, path)
        # The inode's content never changes (inode numbers are never reused), so pages the kernel
        # cached from an earlier open stay valid.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def _store_whole(self, leaf: Leaf, content: FileContent, path: Callable[[], str]) -> None:
        """Put a small file into the kernel's page cache before the open is answered, so the reads
        that follow need no request: for a folder of small files (tar, cp -r, rsync) that halves the
        requests per file, and the data is mostly in the cache already (``_prefetch_siblings``).

        The store is done here, in the trio thread, without the pusher's queue: a store waits while
        a read request for the same pages is pending, and none can be, since the file has no other
        open handle (``opened`` is 1: ours, counted before the wait for the data), and the kernel
        sends a release only after every read of that handle was answered.
        """
        size = leaf.node.size
        if not size or content.readable < size:
            return
        try:
            data = await self.reader.read(content, 0, size, path, sequential=False)
        except BlobUnreadable:
            return  # reads of the file fail with EIO, reported there
        if leaf.opened != 1 or leaf.stored:
            return  # opened again meanwhile: its reads may be pending
        try:
            pyfuse3.notify_store(leaf.ino, 0, data)  # type: ignore[arg-type]  # any buffer works
        except OSError:
            return  # the kernel refused it; reads come as requests
        leaf.stored = True

    def _prefetch_siblings(self, leaf: Leaf, content: FileContent) -> None:
        """Keep the small files that follow an opened one in its folder fetched ahead of the reader
        (and, over a remote vault, those of the folders after it: ``_walk_on``).

        Programs that read a folder (tar, cp -r, rsync, grep -r) open its files in listing order. Each
        batch covers up to SIBLING_BYTES of small files and is fetched in one worker call; the next
        batch starts when the reader is half-way through the current one, so decoding overlaps with
        reading. A file opened outside the fetched range starts a batch of its own.
        """
        missing = bool(content.blobs) and not self.reader.cached(content.blobs[0])
        self._prefetch_folder(leaf, content, missing)
        walk = self.walk_folders and content.blobs and not self._walking
        if walk and (missing or content.blobs[0] == self._walk_mark):
            self._walk_on(leaf)

    def _prefetch_folder(self, leaf: Leaf, content: FileContent, missing: bool) -> None:
        parent = self._inodes.get(leaf.parent)
        if not isinstance(parent, TreeDir) or parent.nodes is None:
            if missing:
                self.reader.prefetch(content.blobs)
            return
        pos = leaf.pos
        if missing or pos >= parent.ahead:
            start = pos
        elif pos >= parent.refill:
            start = parent.ahead
        else:
            return
        blobs: list[bytes] = []
        total = 0
        end = start
        for node in parent.nodes[start : start + SIBLING_FILES]:
            if node.type == "file" and node.content:
                if node.size > SMALL_FILE or total + node.size > SIBLING_BYTES:
                    break
                blobs.extend(node.content)
                total += node.size
            end += 1
        parent.ahead = end
        parent.refill = start + (end - start) // 2
        self.reader.prefetch(blobs)

    def _walk_on(self, leaf: Leaf) -> None:
        """Fetch the small files met by a depth-first walk that starts at ``leaf``, up to SIBLING_BYTES.

        One request per folder is cheap from a local folder, but over a network each folder's first
        file would wait for a round trip. The files of consecutive folders lie back to back in the
        packs (backup wrote them in this order), so a walk's files come in a few reads. The next walk
        starts when the file half-way through this one is opened (files fetched already are skipped),
        or when a file opened is not fetched: the reader left the walk's path.
        """
        if self.reader.nursery is None:
            return
        frames: list[list[Any]] = []  # [nodes, next index], innermost last
        inode = self._inodes.get(leaf.parent)
        index = leaf.pos
        while isinstance(inode, TreeDir) and inode.nodes is not None:
            frames.append([inode.nodes, index])
            parent = self._inodes.get(inode.parent)
            if inode.snap is not None or not isinstance(parent, TreeDir) or parent is inode:
                break  # a snapshot's root folder: the walk stays in the snapshot
            if parent.nodes is None:
                break
            if parent.by_name is None:
                parent.by_name = {n: i for i, n in enumerate(parent.names)}
            found = parent.by_name.get(inode.name)
            if found is None:
                break
            inode, index = parent, found + 1
        frames.reverse()
        self._walking = True
        self.reader.nursery.start_soon(self._walk, frames)

    async def _walk(self, frames: list[list[Any]]) -> None:
        try:
            blobs, self._walk_mark = await trio.to_thread.run_sync(
                self._walk_sync, frames, limiter=self.limiter
            )
            self.reader.prefetch(blobs)
        except Exception:
            # Only a prefetch: the reads themselves fetch what they need and report what fails.
            log.exception("prefetching the folders ahead failed (a bug; please report it)")
        finally:
            self._walking = False

    def _walk_sync(self, frames: list[list[Any]]) -> tuple[list[bytes], bytes | None]:
        """Runs in a worker thread: the blobs of the small files the walk meets, and the first blob
        of the file past half of them (where the next walk starts; None when the walk ran out)."""
        blobs: list[bytes] = []
        total = files = trees = 0
        mark = None
        while frames:
            frame = frames[-1]
            nodes, i = frame
            if i >= len(nodes):
                frames.pop()
                continue
            node = nodes[i]
            if node.type == "file" and node.content and node.size <= SMALL_FILE:
                if total + node.size > SIBLING_BYTES or files >= SIBLING_FILES:
                    break
                if mark is None and total >= SIBLING_BYTES // 2:
                    mark = node.content[0]
                blobs.extend(node.content)
                total += node.size
                files += 1
            elif node.type == "dir" and node.subtree is not None:
                if trees >= WALK_TREES:
                    break
                trees += 1
                frame[1] = i + 1
                try:
                    frames.append([self.repo.load_tree(node.subtree), 0])
                except VaultError:
                    pass  # the folder's own visit reports it
                continue
            frame[1] = i + 1
        return blobs, mark

    def _push_ahead(self, f: _OpenFile, index: int, data: bytes) -> None:
        """Put a blob that read-ahead fetched into the kernel's page cache.

        The kernel takes a stored page as valid only when the store fills it whole (or reaches the end
        of the file), and blob borders fall anywhere: so the body of the blob goes from its first to
        its last page border, and the page it shares with the blob before goes as one more store when
        that blob is still in the cache. Pages the kernel has already asked for are left alone.
        """
        assert self.pusher is not None
        ino = f.leaf.ino
        if ino not in self._inodes:
            return
        content = f.content
        size = f.leaf.node.size
        start = content.start(index)
        end = min(content.ends[index], size)
        first_page = start - start % PAGE
        if first_page < start and first_page >= f.high and index:
            before = self.reader.peek(content.blobs[index - 1])
            page_end = min(first_page + PAGE, size)
            if before is not None and start - first_page <= len(before) and page_end <= end:
                head = before[len(before) - (start - first_page) :] + data[: page_end - start]
                self.pusher.push(ino, first_page, head)
        body = max(-(-start // PAGE) * PAGE, -(-f.high // PAGE) * PAGE)
        body_end = end if end == size else end - end % PAGE
        if body_end > body:
            self.pusher.push(ino, body, memoryview(data)[body - start : body_end - start])
            f.pushed_to = max(f.pushed_to, body_end)

    @_guarded
    async def read(  # type: ignore[override]  # pyfuse3 sends any buffer; a memoryview is zero-copy
        self, fh: int, off: int, size: int
    ) -> bytes | memoryview:
        f = self._files[fh]
        file_size = f.leaf.node.size
        if off >= file_size:
            return b""
        size = min(size, file_size - off)
        sequential = abs(off - f.next_off) <= SEQUENTIAL_SLACK
        f.next_off = off + size
        f.high = max(f.high, off + size)
        if off < f.pushed_to:
            # The kernel asks for data queued for its page cache: the reader keeps up with the
            # decoding, so each push would arrive after the reply and only copy the data again.
            f.late += 1
        try:
            push = self.pusher is not None and f.late < LATE_PUSHES
            ahead = functools.partial(self._push_ahead, f) if push else None
            return await self.reader.read(f.content, off, size, f.path, sequential, ahead)
        except BlobUnreadable:
            raise pyfuse3.FUSEError(errno.EIO) from None

    @_guarded
    async def release(self, fh: int) -> None:
        f = self._files.pop(fh, None)
        if f is not None:
            f.leaf.opened -= 1
            if not f.leaf.opened and len(f.content.blobs) <= INLINE_BLOBS:
                # Cheap to build again at the next open; kept, the offset tables of every file a
                # tar has read added about 110 bytes each to the mount's memory.
                f.leaf.content = None

    @_guarded
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        for key, value in xattrs(self._get(inode)):
            if fs_bytes(key) == name:
                return value
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    @_guarded
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [fs_bytes(key) for key, _ in xattrs(self._get(inode))]

    @_guarded
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        now = trio.current_time()
        if self._statfs is None or now - self._statfs[0] > 60:
            total = await trio.to_thread.run_sync(self._pack_bytes_sync, limiter=self.limiter)
            self._statfs = (now, total)
        data = pyfuse3.StatvfsData()
        data.f_bsize = BLOCK_SIZE
        data.f_frsize = 4096
        data.f_blocks = (self._statfs[1] + 4095) // 4096
        data.f_bfree = data.f_bavail = 0
        data.f_files = len(self.repo.index) + len(self._inodes)
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    def _pack_bytes_sync(self) -> int:
        return sum(size for _, size in self.repo.backend.list("data"))
