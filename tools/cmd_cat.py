"""vault cat: print the decrypted content of one vault object (JSON documents, or raw bytes of packs and blobs).

Objects: config, masterkey, key ID, index ID, snapshot ID, lock ID, tree ID (or SNAPSHOT[:PATH]), pack ID, blob ID.
IDs may be unique prefixes for files (key, index, snapshot, lock, pack); blob and tree IDs must be complete.
"""

from __future__ import annotations

import argparse
import json
import sys

from vaultfs.errors import NotFoundError, UsageError
from vaultfs.format.pack import DATA, TREE
from vaultfs.repo.repository import _unique
from vaultfs.tools.common import Output, open_repository

OBJECTS = ("config", "masterkey", "key", "index", "snapshot", "lock", "tree", "pack", "blob")


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("cat", help="print a decrypted vault object", description=__doc__)
    p.add_argument(
        "object", choices=OBJECTS, metavar="OBJECT", help="one of: " + ", ".join(OBJECTS)
    )
    p.add_argument(
        "id", nargs="?", metavar="ID", help="ID of the object (not for config and masterkey)"
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace, out: Output) -> int:
    repo = open_repository(args)
    what = args.object
    if what not in ("config", "masterkey") and not args.id:
        raise UsageError(f"`vault cat {what}` needs an ID")
    if what == "config":
        _json_out(repo.key.open(repo.backend.read("config", ""), "config"))
    elif what == "masterkey":
        _json_out(repo.key.to_json())
    elif what == "key":
        _json_out(repo.backend.read("keys", repo.find_key(args.id)))
    elif what in ("index", "snapshot", "lock"):
        kind = {"index": "index", "snapshot": "snapshots", "lock": "locks"}[what]
        if what == "snapshot" and args.id == "latest":
            name = repo.find_snapshot("latest")[0]
        else:
            name = _unique(args.id, [n for n, _ in repo.backend.list(kind)], what)
        _json_out(repo.load_unpacked(kind, name))
    elif what == "pack":
        name = _unique(args.id, [n for n, _ in repo.backend.list("data")], "pack")
        _raw_out(repo.backend.read("data", name))
    elif what == "tree":
        repo.load_index()
        tree_id = _tree_id(repo, args.id)
        _json_out(repo.load_blob(TREE, tree_id))
    else:
        repo.load_index()
        blob_id = _full_id(args.id)
        for blob_type in (DATA, TREE):
            if repo.index.has(blob_id, blob_type):
                _raw_out(repo.load_blob(blob_type, blob_id))
                return 0
        raise NotFoundError(f"blob {args.id} is not in the index")
    return 0


def _tree_id(repo, spec: str) -> bytes:  # noqa: ANN001
    if ":" in spec or spec == "latest" or len(spec) < 64:
        snap_spec, _, path = spec.partition(":")
        _sid, snap = repo.find_snapshot(snap_spec)
        node = repo.find_path(snap.tree, path)
        if node is None:
            return snap.tree
        if node.subtree is None:
            raise NotFoundError(f"{path} is not a folder in the snapshot")
        return node.subtree
    return _full_id(spec)


def _full_id(text: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise UsageError(f"{text!r} is not a full 64-character ID")
    return raw


def _json_out(raw: bytes) -> None:
    try:
        doc = json.loads(raw)
    except ValueError:
        _raw_out(raw)
        return
    sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


def _raw_out(raw: bytes) -> None:
    sys.stdout.flush()
    sys.stdout.buffer.write(raw)
    sys.stdout.buffer.flush()
