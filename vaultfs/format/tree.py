"""Tree blobs (FORMAT.md §7): ``{"nodes":[...]}`` plus a newline, nodes sorted by name.

Node JSON keys, in Go struct order (``omitempty`` fields left out when zero; times and uid/gid always)::

    name type mode mtime atime ctime uid gid user group inode device_id size links linktarget
    linktarget_raw extended_attributes generic_attributes device content subtree error

``name`` is strconv.Quote'd (outer quotes dropped) before JSON encoding, ``mode`` holds Go FileMode bits,
``content`` is ``null`` for non-files and ``[]`` for empty files. Encoding must match restic byte for byte:
tree blob IDs are SHA-256 of this text, and equal IDs are what makes vaultfs and restic deduplicate.

Names and link targets are ``str`` decoded from the file system bytes with ``surrogateescape`` (as ``os``
returns them), so any byte string round-trips.
"""

from __future__ import annotations

import base64
import json
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from vaultfs.errors import FormatError
from vaultfs.format.gojson import GoTime, go_quote, go_unquote, json_string

# Go fs.FileMode type bits
GO_DIR = 1 << 31
GO_APPEND = 1 << 30
GO_EXCLUSIVE = 1 << 29
GO_TEMPORARY = 1 << 28
GO_SYMLINK = 1 << 27
GO_DEVICE = 1 << 26
GO_NAMED_PIPE = 1 << 25
GO_SOCKET = 1 << 24
GO_SETUID = 1 << 23
GO_SETGID = 1 << 22
GO_CHAR_DEVICE = 1 << 21
GO_STICKY = 1 << 20
GO_IRREGULAR = 1 << 19

try:
    from vaultfs.format._tree import decode_nodes as _decode_nodes
except ImportError:  # built without it: every node goes through Node.from_json
    _decode_nodes = None

NODE_TYPES = ("file", "dir", "symlink", "dev", "chardev", "fifo", "socket", "irregular")
_ZERO_TIME = GoTime.parse("0001-01-01T00:00:00Z")


def fs_name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def fs_bytes(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def display_path(path: str) -> str:
    """A path as printable text: undecodable bytes as \\xNN (JSON and terminals cannot carry them)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def go_mode_from_stat(st_mode: int) -> int:
    """Unix st_mode -> Go FileMode as restic records it (permissions, type and special bits)."""
    mode = st_mode & 0o777
    fmt = stat.S_IFMT(st_mode)
    if fmt == stat.S_IFDIR:
        mode |= GO_DIR
    elif fmt == stat.S_IFLNK:
        mode |= GO_SYMLINK
    elif fmt == stat.S_IFBLK:
        mode |= GO_DEVICE
    elif fmt == stat.S_IFCHR:
        mode |= GO_DEVICE | GO_CHAR_DEVICE
    elif fmt == stat.S_IFIFO:
        mode |= GO_NAMED_PIPE
    elif fmt == stat.S_IFSOCK:
        mode |= GO_SOCKET
    if st_mode & stat.S_ISUID:
        mode |= GO_SETUID
    if st_mode & stat.S_ISGID:
        mode |= GO_SETGID
    if st_mode & stat.S_ISVTX:
        mode |= GO_STICKY
    return mode


def unix_perm_from_go(mode: int) -> int:
    """Go FileMode -> the permission and special bits of a Unix mode (no file type)."""
    perm = mode & 0o777
    if mode & GO_SETUID:
        perm |= stat.S_ISUID
    if mode & GO_SETGID:
        perm |= stat.S_ISGID
    if mode & GO_STICKY:
        perm |= stat.S_ISVTX
    return perm


def unix_type_bits(node_type: str) -> int:
    return {
        "file": stat.S_IFREG,
        "dir": stat.S_IFDIR,
        "symlink": stat.S_IFLNK,
        "dev": stat.S_IFBLK,
        "chardev": stat.S_IFCHR,
        "fifo": stat.S_IFIFO,
        "socket": stat.S_IFSOCK,
    }.get(node_type, stat.S_IFREG)


@dataclass
class Node:
    name: str
    type: str
    mode: int = 0
    mtime: GoTime = _ZERO_TIME
    atime: GoTime = _ZERO_TIME
    ctime: GoTime = _ZERO_TIME
    uid: int = 0
    gid: int = 0
    user: str = ""
    group: str = ""
    inode: int = 0
    device_id: int = 0
    size: int = 0
    links: int = 0
    linktarget: str = ""
    extended_attributes: list[tuple[str, bytes]] = field(default_factory=list)
    generic_attributes: dict[str, Any] | None = None
    device: int = 0
    content: list[bytes] | None = None
    subtree: bytes | None = None
    error: str = ""

    def encode(self) -> str:
        parts = [f'{{"name":{json_string(go_quote(fs_bytes(self.name)))},"type":"{self.type}"']
        if self.mode:
            parts.append(f',"mode":{self.mode}')
        parts.append(
            f',"mtime":"{self.mtime.format()}","atime":"{self.atime.format()}",'
            f'"ctime":"{self.ctime.format()}","uid":{self.uid},"gid":{self.gid}'
        )
        if self.user:
            parts.append(f',"user":{json_string(self.user)}')
        if self.group:
            parts.append(f',"group":{json_string(self.group)}')
        if self.inode:
            parts.append(f',"inode":{self.inode}')
        if self.device_id:
            parts.append(f',"device_id":{self.device_id}')
        if self.size:
            parts.append(f',"size":{self.size}')
        if self.links:
            parts.append(f',"links":{self.links}')
        if self.linktarget:
            raw = fs_bytes(self.linktarget)
            parts.append(f',"linktarget":{json_string(raw)}')
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                parts.append(f',"linktarget_raw":"{base64.b64encode(raw).decode()}"')
        if self.extended_attributes:
            attrs = ",".join(
                f'{{"name":{json_string(name)},"value":"{base64.b64encode(value).decode()}"}}'
                for name, value in self.extended_attributes
            )
            parts.append(f',"extended_attributes":[{attrs}]')
        if self.generic_attributes:
            parts.append(
                ',"generic_attributes":'
                + json.dumps(self.generic_attributes, separators=(",", ":"), sort_keys=True)
            )
        if self.device:
            parts.append(f',"device":{self.device}')
        if self.content is None:
            parts.append(',"content":null')
        else:
            parts.append(',"content":[' + ",".join(f'"{c.hex()}"' for c in self.content) + "]")
        if self.subtree is not None:
            parts.append(f',"subtree":"{self.subtree.hex()}"')
        if self.error:
            parts.append(f',"error":{json_string(self.error)}')
        parts.append("}")
        return "".join(parts)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Node:
        linktarget = doc.get("linktarget") or ""
        raw_target = doc.get("linktarget_raw")
        if raw_target:
            linktarget = fs_name(base64.b64decode(raw_target, validate=True))
        content = doc.get("content")
        subtree = doc.get("subtree")
        node_type = doc["type"]
        if node_type not in NODE_TYPES:
            raise ValueError(f"unknown node type {node_type!r}")
        name = fs_name(go_unquote(doc["name"]))
        mode = int(doc.get("mode") or 0)
        # A node's three times are often the same text: parse it once (GoTime is immutable).
        mtime_text, atime_text, ctime_text = doc.get("mtime"), doc.get("atime"), doc.get("ctime")
        mtime = _time(mtime_text)
        atime = mtime if atime_text == mtime_text else _time(atime_text)
        if ctime_text == mtime_text:
            ctime = mtime
        else:
            ctime = atime if ctime_text == atime_text else _time(ctime_text)
        return cls(
            name=name,
            type=node_type,
            mode=mode,
            mtime=mtime,
            atime=atime,
            ctime=ctime,
            uid=int(doc.get("uid") or 0),
            gid=int(doc.get("gid") or 0),
            user=doc.get("user") or "",
            group=doc.get("group") or "",
            inode=int(doc.get("inode") or 0),
            device_id=int(doc.get("device_id") or 0),
            size=int(doc.get("size") or 0),
            links=int(doc.get("links") or 0),
            linktarget=linktarget,
            extended_attributes=[
                (a["name"], base64.b64decode(a.get("value") or "", validate=True))
                for a in doc.get("extended_attributes") or []
            ],
            generic_attributes=doc.get("generic_attributes") or None,
            device=int(doc.get("device") or 0),
            content=None if content is None else [_id(c) for c in content],
            subtree=None if subtree is None else _id(subtree),
            error=doc.get("error") or "",
        )

    @property
    def unix_mode(self) -> int:
        """st_mode for this node: type bits from ``type`` plus permission/special bits from ``mode``."""
        return unix_type_bits(self.type) | unix_perm_from_go(self.mode)


def _time(text: str | None) -> GoTime:
    return _ZERO_TIME if not text else GoTime.parse(text)


def _id(text: str) -> bytes:
    raw = bytes.fromhex(text)
    if len(raw) != 32:
        raise ValueError(f"ID {text!r} has the wrong length")
    return raw


def encode_tree(nodes: Iterable[Node]) -> bytes:
    """Tree blob plaintext; sorts nodes by name bytes, rejects duplicate names."""
    ordered = sorted(nodes, key=lambda n: fs_bytes(n.name))
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.name == b.name:
            raise FormatError(f"duplicate name {a.name!r} in tree")
    return ('{"nodes":[' + ",".join(n.encode() for n in ordered) + "]}\n").encode("utf-8")


def decode_tree(raw: bytes, what: str = "tree") -> list[Node]:
    try:
        doc = json.loads(raw)
        nodes = doc["nodes"]
        if nodes is None:
            return []
        if _decode_nodes is not None and type(nodes) is list:
            # Node.from_json in C for the usual nodes; the others go to from_json itself.
            return _decode_nodes(nodes, Node, GoTime, _ZERO_TIME, Node.from_json)
        return [Node.from_json(n) for n in nodes]
    except FormatError as exc:
        raise FormatError(f"{what}: {exc}") from None
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{what} is not a valid tree ({exc})") from None
