"""vault ls: list the files of a snapshot, below PATH if given (recursively)."""

from __future__ import annotations

import argparse
import stat

from vaultfs.format.tree import Node, display_path
from vaultfs.tools.common import Output, add_snapshot_filters, open_repository, snapshot_json


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("ls", help="list files in a snapshot", description=__doc__)
    p.add_argument(
        "snapshot", metavar="SNAPSHOT", help="snapshot ID, unique ID prefix, or 'latest'"
    )
    p.add_argument(
        "subpath", metavar="PATH", nargs="?", default="/", help="folder or file inside the snapshot"
    )
    p.add_argument(
        "-l", "--long", action="store_true", help="show mode, owner, size and time like ls -l"
    )
    add_snapshot_filters(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace, out: Output) -> int:
    repo = open_repository(args)
    repo.load_index()
    snap_id, snap = repo.find_snapshot(
        args.snapshot, hosts=args.host, tags=args.tag, paths=args.path
    )
    base = "/" + args.subpath.strip("/") if args.subpath.strip("/") else ""
    node = repo.find_path(snap.tree, base)
    if out.json:
        out.emit_line({"message_type": "snapshot", **snapshot_json(snap_id, snap)})
    if node is None or node.type == "dir":
        if node is not None and out.json:
            out.emit_line(_node_json(base, node))
        elif node is not None:
            _print(out, base, node, args.long)
        tree_id = snap.tree if node is None else node.subtree
        if tree_id is not None:
            for rel, child in repo.walk(tree_id, base.lstrip("/")):
                path = "/" + rel
                if out.json:
                    out.emit_line(_node_json(path, child))
                else:
                    _print(out, path, child, args.long)
    elif out.json:
        out.emit_line(_node_json(base, node))
    else:
        _print(out, base, node, args.long)
    return 0


def _print(out: Output, path: str, node: Node, long: bool) -> None:
    shown = display_path(path)
    if not long:
        out.line(shown)
        return
    mode = stat.filemode(node.unix_mode)
    owner = node.user or str(node.uid)
    group = node.group or str(node.gid)
    when = node.mtime.format()[:19].replace("T", " ")
    target = f" -> {node.linktarget}" if node.type == "symlink" else ""
    out.line(f"{mode} {owner:>8} {group:>8} {node.size:>12} {when} {shown}{target}")


def _node_json(path: str, node: Node) -> dict:
    doc = {
        "message_type": "node",
        "struct_type": "node",
        "name": node.name,
        "type": node.type,
        "path": path,
        "uid": node.uid,
        "gid": node.gid,
        "size": node.size,
        "mode": node.unix_mode,
        "permissions": stat.filemode(node.unix_mode),
        "mtime": node.mtime.format(),
        "atime": node.atime.format(),
        "ctime": node.ctime.format(),
    }
    if node.type == "symlink":
        doc["linktarget"] = node.linktarget
    return doc
