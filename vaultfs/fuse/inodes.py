"""The inodes of a vault mount: what the kernel knows by number, and the attributes it is shown.

Four kinds: the virtual folders and ``latest`` symlinks above the snapshots (VirtualDir, VirtualLink),
folders inside a snapshot and snapshot root folders (TreeDir), and everything else inside a snapshot
(Leaf: files, symlinks, devices, fifos, sockets). Plain data holders with ``__slots__``: a walk over a
large snapshot creates one per entry the kernel has heard of.
"""

from __future__ import annotations

import pyfuse3

from vaultfs.format.snapshot import Snapshot
from vaultfs.format.tree import Node, fs_bytes
from vaultfs.fuse.reader import FileContent


class Inode:
    """Something the kernel knows by number. ``parent``/``name`` give its path (for messages and ``..``);
    ``vkey`` is its key among the virtual folders' children, if it is one."""

    __slots__ = ("ino", "lookups", "parent", "name", "vkey")

    def __init__(self, ino: int, parent: int, name: bytes) -> None:
        self.ino = ino
        self.lookups = 0
        self.parent = parent
        self.name = name
        self.vkey: tuple | None = None


class VirtualDir(Inode):
    __slots__ = ("path",)

    def __init__(self, ino: int, parent: int, name: bytes, path: tuple[bytes, ...]) -> None:
        super().__init__(ino, parent, name)
        self.path = path


class VirtualLink(Inode):
    __slots__ = ("target", "time_ns")

    def __init__(self, ino: int, parent: int, name: bytes, target: bytes, time_ns: int) -> None:
        super().__init__(ino, parent, name)
        self.target = target
        self.time_ns = time_ns


class TreeDir(Inode):
    """A folder inside a snapshot (``node`` set) or a snapshot's root folder (``snap`` set).

    ``links`` maps (device_id, inode) of hardlinked files to their inode number; one dict is shared by
    all folders of one snapshot folder. ``names``/``nodes`` hold the loaded tree; ``children`` maps the
    names the kernel has heard of to their inode numbers.
    """

    __slots__ = (
        "tree_id",
        "node",
        "snap",
        "links",
        "nodes",
        "names",
        "by_name",
        "children",
        "ahead",
        "refill",
    )

    def __init__(
        self,
        ino: int,
        parent: int,
        name: bytes,
        tree_id: bytes | None,
        links: dict[tuple[int, int], int],
        node: Node | None = None,
        snap: Snapshot | None = None,
    ) -> None:
        super().__init__(ino, parent, name)
        self.tree_id = tree_id
        self.node = node
        self.snap = snap
        self.links = links
        self.nodes: list[Node] | None = None
        self.names: list[bytes] = []
        self.by_name: dict[bytes, int] | None = None
        self.children: dict[bytes, int] = {}
        # Small-file prefetch: entries before ``ahead`` have been fetched or are being fetched; the
        # next batch starts when a file at or after ``refill`` is opened.
        self.ahead = 0
        self.refill = 0


class Leaf(Inode):
    """A file, symlink, device, fifo or socket inside a snapshot; ``pos`` is its index in the parent."""

    __slots__ = ("node", "links", "hardlink", "content", "pos", "opened", "stored")

    def __init__(
        self,
        ino: int,
        parent: int,
        name: bytes,
        node: Node,
        links: dict[tuple[int, int], int],
        hardlink: tuple[int, int] | None,
        pos: int,
    ) -> None:
        super().__init__(ino, parent, name)
        self.node = node
        self.links = links
        self.hardlink = hardlink
        self.content: FileContent | None = None
        self.pos = pos
        self.opened = 0  # open file handles
        self.stored = False  # its data was put into the kernel's page cache at open


def node_attrs(attr: pyfuse3.EntryAttributes, node: Node) -> None:
    """Fill ``attr`` with what restic recorded for ``node`` (everything but inode number and links)."""
    attr.st_mode = node.unix_mode
    attr.st_uid = node.uid
    attr.st_gid = node.gid
    if node.type == "file":
        attr.st_size = node.size
    elif node.type == "symlink":
        attr.st_size = len(fs_bytes(node.linktarget))
    elif node.type in ("dev", "chardev"):
        attr.st_rdev = node.device
    attr.st_blocks = (attr.st_size + 511) // 512
    attr.st_atime_ns = node.atime.ns
    attr.st_mtime_ns = node.mtime.ns
    attr.st_ctime_ns = node.ctime.ns


def xattrs(inode: Inode) -> list[tuple[str, bytes]]:
    """The extended attributes recorded for an inode inside a snapshot (none for virtual ones)."""
    node = inode.node if isinstance(inode, Leaf | TreeDir) else None
    return node.extended_attributes if node is not None else []
