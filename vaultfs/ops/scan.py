"""Reading file-system entries into tree nodes exactly as restic 0.14's backup records them (FORMAT.md §7).

restic builds a node from ``lstat`` (never following symlinks) and records, byte for byte:

- ``mode``: Go FileMode bits (permissions, type, setuid/setgid/sticky), not the Unix ``st_mode``;
- ``mtime`` and ``ctime`` as local times with nanoseconds; ``atime`` is a copy of ``mtime`` (restic stores the
  real access time only with ``--with-atime``, which changes on every read and would defeat dedup of trees);
- ``uid``/``gid`` and the names they map to (``user``/``group``, empty when unknown), ``inode`` and
  ``device_id`` (``st_dev``) for every type;
- ``size`` for files; ``links`` (``st_nlink``) for files, symlinks and devices but not for folders or fifos;
  ``linktarget`` for symlinks; ``device`` (raw ``st_rdev``) for block and character devices;
- extended attributes in the order the kernel lists them: restic 0.14 does not sort them (measured: an
  ext4 file with attributes set as zeta, alpha, mid is recorded in that order), and the order is part of
  the tree's bytes and so of its ID.

Sockets have a node type but restic's backup leaves them out; :func:`node_type` reports them and the caller
skips them. Paths are ``bytes`` (``os.fsencode``) because names need not be UTF-8; node names are ``str``
decoded with surrogateescape (``vaultfs.format.tree.fs_name``).

Everything here is thread-safe and does blocking system calls only; nothing prints.
"""

from __future__ import annotations

import base64
import errno
import grp
import os
import pwd
import stat
import time
from typing import Any

from vaultfs.format.gojson import GoTime, json_string
from vaultfs.format.tree import Node, fs_name, go_mode_from_stat

# errno values meaning "no extended attributes here" rather than a failure: restic 0.14 ignores the same
# ones (ENOTSUP, and ENOATTR/ENODATA from SMB mounts).
_NO_XATTRS = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.ENODATA})

_TYPES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFBLK: "dev",
    stat.S_IFCHR: "chardev",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}
# Node types whose link count restic records.
_WITH_LINKS = frozenset({"file", "symlink", "dev", "chardev"})


# seconds since the epoch -> ("YYYY-MM-DDTHH:MM:SS" or None, UTC offset, "Z" or "+hh:mm")
_SECONDS: dict[int, tuple[str | None, int, str]] = {}
_SECONDS_CACHED = 4096


def _local_second(seconds: int) -> tuple[str | None, int, str]:
    try:
        tm = time.localtime(seconds)
    except (OverflowError, OSError, ValueError):
        return None, 0, ""
    offset = tm.tm_gmtoff
    if not 0 < tm.tm_year <= 9999:
        return None, offset, ""
    prefix = (
        f"{tm.tm_year:04d}-{tm.tm_mon:02d}-{tm.tm_mday:02d}"
        f"T{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d}"
    )
    if not offset:
        return prefix, 0, "Z"
    hours, rest = divmod(abs(offset), 3600)
    return prefix, offset, f"{'+' if offset > 0 else '-'}{hours:02d}:{rest // 60:02d}"


class LocalTime(GoTime):
    """A GoTime in the local zone (as Go's ``time.Unix`` shows it) with its RFC 3339 text made once.

    Every file of a backup needs two of these, and a node's encoding and change detection need them as
    text: one ``localtime`` call per second (cached, since files of one folder tend to share seconds)
    gives both the offset and the text. The text is the same as ``GoTime.format``'s (the tests check
    it). Compares equal to a GoTime of the same instant and offset.
    """

    __slots__ = ("_text",)

    def __init__(self, ns: int) -> None:  # noqa: D107 - a frozen dataclass: fields are set directly
        seconds, fraction = divmod(ns, 1_000_000_000)
        cached = _SECONDS.get(seconds)
        if cached is None:
            cached = _SECONDS[seconds] = _local_second(seconds)
            if len(_SECONDS) > _SECONDS_CACHED:
                _SECONDS.clear()  # files of one folder tend to share seconds; old ones rarely return
        prefix, offset, zone = cached
        setattr_ = object.__setattr__
        setattr_(self, "ns", ns)
        setattr_(self, "offset", offset)
        if prefix is None:
            setattr_(self, "_text", None)  # out of RFC 3339's range: format() raises as GoTime does
        elif fraction:
            setattr_(self, "_text", f"{prefix}.{fraction:09d}".rstrip("0") + zone)
        else:
            setattr_(self, "_text", prefix + zone)

    def format(self) -> str:
        return self._text if self._text is not None else GoTime.format(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, GoTime):
            return self.ns == other.ns and self.offset == other.offset
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.ns, self.offset))


def node_type(st_mode: int) -> str | None:
    """The restic node type of a Unix mode, or None for a type restic does not know."""
    return _TYPES.get(stat.S_IFMT(st_mode))


class OwnerNames:
    """uid -> user name and gid -> group name, looked up once each (restic caches them the same way).

    An id without a name maps to "" (restic's ``omitempty`` then leaves the field out). Safe to share
    between threads: a racing double lookup only does the same work twice.
    """

    def __init__(self) -> None:
        self._users: dict[int, str] = {}
        self._groups: dict[int, str] = {}

    def user(self, uid: int) -> str:
        name = self._users.get(uid)
        if name is None:
            try:
                name = pwd.getpwuid(uid).pw_name
            except (KeyError, OverflowError):
                name = ""
            self._users[uid] = name
        return name

    def known(self) -> tuple[dict[int, str], dict[int, str]]:
        """The uid -> user and gid -> group names looked up so far (live: not to be changed)."""
        return self._users, self._groups

    def group(self, gid: int) -> str:
        name = self._groups.get(gid)
        if name is None:
            try:
                name = grp.getgrgid(gid).gr_name
            except (KeyError, OverflowError):
                name = ""
            self._groups[gid] = name
        return name


def read_xattrs(path: bytes | int) -> list[tuple[str, bytes]]:
    """Extended attributes of ``path`` (a path, not followed if a symlink, or an open file descriptor)
    as (name, value) pairs in the kernel's listing order, which is the order restic 0.14 records.

    No support for attributes gives []. An attribute removed between listing and reading is left out.
    Other errors (EACCES, EIO) raise OSError.
    """
    follow = isinstance(path, int)  # follow_symlinks=False is refused for descriptors
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in _NO_XATTRS:
            return []
        raise
    out = []
    for name in names:
        try:
            out.append((name, os.getxattr(path, name, follow_symlinks=follow)))
        except OSError as exc:
            if exc.errno in _NO_XATTRS:
                continue
            raise
    return out


def node_from_stat(
    name: str,
    path: bytes,
    st: os.stat_result,
    owners: OwnerNames,
    *,
    fd: int | None = None,
    mtime: LocalTime | None = None,
    ctime: LocalTime | None = None,
    xattrs: list[tuple[str, bytes]] | None = None,
) -> Node:
    """The node restic would record for the entry at ``path`` whose ``lstat`` is ``st``.

    ``name`` is the node's name in the snapshot (usually the base name of ``path``). When ``fd`` is an
    open descriptor of the same file, extended attributes are read through it, so they belong to the
    file whose content is read even if ``path`` is replaced meanwhile. ``mtime``, ``ctime`` and
    ``xattrs`` may be given when the caller already has them for ``st``. Regular files get
    ``content=[]`` (the caller fills it); other types ``None``. Raises OSError when the link target or
    the extended attributes cannot be read, and ValueError for an unknown file type.
    """
    kind = node_type(st.st_mode)
    if kind is None:
        raise ValueError(f"unknown file type {stat.S_IFMT(st.st_mode):o}")
    if mtime is None:
        mtime = LocalTime(st.st_mtime_ns)
    node = Node(
        name=name,
        type=kind,
        mode=go_mode_from_stat(st.st_mode),
        mtime=mtime,
        atime=mtime,
        ctime=LocalTime(st.st_ctime_ns) if ctime is None else ctime,
        uid=st.st_uid,
        gid=st.st_gid,
        user=owners.user(st.st_uid),
        group=owners.group(st.st_gid),
        inode=st.st_ino,
        device_id=st.st_dev,
    )
    if kind in _WITH_LINKS:
        node.links = st.st_nlink
    if kind == "file":
        node.size = st.st_size
        node.content = []
    elif kind == "symlink":
        node.linktarget = fs_name(os.readlink(path))
    elif kind == "dev" or kind == "chardev":
        node.device = st.st_rdev
    if xattrs is None:
        xattrs = read_xattrs(path if fd is None else fd)
    node.extended_attributes = xattrs
    return node


def file_doc(
    quoted_name: str,
    st: os.stat_result,
    owners: OwnerNames,
    mtime: LocalTime,
    ctime: LocalTime,
    xattrs: list[tuple[str, bytes]],
    content: list[str],
) -> dict[str, object]:
    """What ``json.loads`` gives for the encoding of the node ``node_from_stat`` makes for the regular
    file ``st`` with ``content`` (hex IDs), built without making the node.

    Backup compares it with the parent snapshot's node: when they are equal the file's JSON is the
    parent's, and a folder whose entries all compare equal has the parent's tree, which then need not
    be encoded or hashed again. It follows ``vaultfs.format.tree.Node.encode`` field for field
    (including which zero values are left out); the tests check the two against each other.
    """
    doc: dict[str, object] = {"name": quoted_name, "type": "file"}
    go_mode = go_mode_from_stat(st.st_mode)
    if go_mode:
        doc["mode"] = go_mode
    text = mtime.format()
    doc["mtime"] = text
    doc["atime"] = text
    doc["ctime"] = ctime.format()
    doc["uid"] = st.st_uid
    doc["gid"] = st.st_gid
    user = owners.user(st.st_uid)
    if user:
        doc["user"] = user
    group = owners.group(st.st_gid)
    if group:
        doc["group"] = group
    if st.st_ino:
        doc["inode"] = st.st_ino
    if st.st_dev:
        doc["device_id"] = st.st_dev
    if st.st_size:
        doc["size"] = st.st_size
    if st.st_nlink:
        doc["links"] = st.st_nlink
    if xattrs:
        doc["extended_attributes"] = [
            {"name": n, "value": base64.b64encode(v).decode("ascii")} for n, v in xattrs
        ]
    doc["content"] = content
    return doc


def file_json(doc: dict[str, Any], content: list[bytes]) -> str:
    """``Node.encode`` of the regular file whose ``file_doc`` is ``doc`` (its content IDs as bytes),
    written from the doc without making the node: Node.encode's fields in its order, the optional
    ones as file_doc leaves them out; a file has no link target, device, subtree or error. Only for
    docs without extended attributes (backup uses it for files equal to the parent's entry)."""
    parts = ['{"name":', json_string(doc["name"]), ',"type":"file"']
    mode = doc.get("mode")
    if mode:
        parts.append(f',"mode":{mode}')
    parts.append(
        f',"mtime":"{doc["mtime"]}","atime":"{doc["atime"]}","ctime":"{doc["ctime"]}"'
        f',"uid":{doc["uid"]},"gid":{doc["gid"]}'
    )
    for key in ("user", "group"):
        text = doc.get(key)
        if text:
            parts.append(f',"{key}":{json_string(text)}')
    for key in ("inode", "device_id", "size", "links"):
        number = doc.get(key)
        if number:
            parts.append(f',"{key}":{number}')
    parts.append(',"content":[' + ",".join(f'"{c.hex()}"' for c in content) + "]}")
    return "".join(parts)


__all__ = [
    "LocalTime",
    "OwnerNames",
    "file_doc",
    "file_json",
    "node_from_stat",
    "node_type",
    "read_xattrs",
]
