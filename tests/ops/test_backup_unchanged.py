"""Change detection in C (``vaultfs.ops._files.unchanged_files``) against the Python definition.

For each entry of a folder, the C call says "unchanged, here are the parent's content IDs" only where
backup's Python path (reusable_content, then file_doc(...) == the parent's entry) says so too, and it
says so for every plain file (ASCII name, known owner, no extended attributes). Backups made with and
without it give the same trees.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

import vaultfs.ops.backup as backup_module
from tests.helpers.ci import unavailable
from vaultfs.backend import LocalBackend
from vaultfs.format.tree import fs_name, go_quote
from vaultfs.ops.backup import _stat_result, _xattrs_of, backup
from vaultfs.ops.scan import LocalTime, OwnerNames, file_doc
from vaultfs.repo.repository import Repository

try:
    from vaultfs.ops._files import scan_dir, unchanged_files
except ImportError:  # pragma: no cover - the build makes it
    scan_dir = unchanged_files = None

ROOT = os.geteuid() == 0


@pytest.fixture(autouse=True)
def _native():
    if unchanged_files is None:
        unavailable("vaultfs.ops._files is not built (pip install -e . builds it)")


def make_tree(root: Path) -> Path:
    root.mkdir()
    (root / "sub").mkdir()
    for name in ["plain.txt", "é-unicode.txt", 'quo"te', "back\\slash", "tab\tname", "sub/inner"]:
        (root / name).write_bytes(name.encode() * 50)
    (root / "empty").write_bytes(b"")
    (root / "ctime-only").write_bytes(b"c")
    (root / "setuid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "setuid", 0o4755)
    (root / "sticky").write_bytes(b"x")
    os.chmod(root / "sticky", 0o1640)
    (root / "hard1").write_bytes(b"linked")
    os.link(root / "hard1", root / "hard2")
    (root / "xattr.txt").write_bytes(b"with attribute")
    try:
        os.setxattr(root / "xattr.txt", "user.note", b"v")
    except OSError:
        pass
    (root / "frac").write_bytes(b"f")
    os.utime(root / "frac", ns=(1_700_000_000_120_000_000, 1_700_000_000_120_000_000))
    (root / "whole").write_bytes(b"w")
    os.utime(root / "whole", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    (root / "old").write_bytes(b"o")
    os.utime(root / "old", ns=(-86_400_000_000_123, -86_400_000_000_123))
    os.symlink("plain.txt", root / "link")
    os.mkfifo(root / "fifo")
    if ROOT:
        (root / "nobody-owns").write_bytes(b"n")
        os.chown(root / "nobody-owns", 54321, 54322)
    return root


def open_vault(path: Path) -> Repository:
    if not path.exists():
        Repository.init(LocalBackend(str(path)), b"pw", version=2)
    repo = Repository.open(LocalBackend(str(path)), b"pw")
    repo.load_index()
    return repo


def python_says(
    bk: Any, st: os.stat_result, prev: dict[str, Any] | None, raw: bytes, owners: OwnerNames
) -> list[bytes] | None:
    """What backup's Python path (add_file) decides for a regular file: the reused content IDs when
    reusable_content finds them and the file's node encodes to the parent's entry, else None."""
    times: list[LocalTime] = []
    ids = bk.reusable_content(st, prev, times)
    if ids is None:
        return None
    assert prev is not None
    doc = file_doc(
        go_quote(raw), st, owners, times[0], times[1], _xattrs_of(prev) or [], prev["content"]
    )
    return ids if doc == prev else None


def check_folder(
    repo: Repository, folder: Path, tree_id: bytes, owners: OwnerNames
) -> dict[str, bool]:
    """Compare the C call with the Python path on every entry of ``folder``; which ones C took."""
    bk = backup_module._Backup.__new__(backup_module._Backup)  # its two lookups, nothing else
    bk.repo, bk.index = repo, repo.index
    prev, _count = bk.load_previous(tree_id)
    assert prev is not None
    listing = scan_dir(os.fsencode(folder))
    for _raw, t in listing:  # owner names as backup looks them up (C only uses known ones)
        if isinstance(t, tuple):
            owners.user(t[4])
            owners.group(t[5])
    users, groups = owners.known()
    got = unchanged_files(listing, prev, users, groups)
    taken = {}
    for (raw, t), ids in zip(listing, got, strict=True):
        name = fs_name(raw)
        st = _stat_result(t)
        want = (
            python_says(bk, st, prev.get(name), raw, owners) if stat.S_ISREG(st.st_mode) else None
        )
        if ids is not None:
            assert ids == want, name  # C never says more than Python
        plain = (
            raw.isascii() and raw.decode().isprintable() and b'"' not in raw and b"\\" not in raw
        )
        if want is not None and plain and not (prev.get(name) or {}).get("extended_attributes"):
            assert ids == want, name  # and for plain files it says as much
        taken[name] = ids is not None
        if ids is not None:  # its JSON, written from the parent's entry, is the node's
            entry = backup_module._Unchanged(name, os.fsencode(folder) + b"/" + raw, t, [], [], ids)
            entry.doc = prev[name]
            assert entry.encode() == entry.node(owners).encode(), name
    return taken


def data_tree(repo: Repository, snap_id: str, src: Path) -> bytes:
    node = repo.find_path(repo.load_snapshot(snap_id).tree, str(src).lstrip("/"))
    assert node is not None and node.subtree is not None
    return node.subtree


def test_c_and_python_agree_on_every_entry(tmp_path):
    src = make_tree(tmp_path / "src")
    repo = open_vault(tmp_path / "vault")
    first = backup(repo, [str(src)])
    tree = data_tree(repo, first.snapshot_id, src)
    owners = OwnerNames()
    taken = check_folder(repo, src, tree, owners)
    for name in [
        "plain.txt",
        "empty",
        "ctime-only",
        "setuid",
        "sticky",
        "hard1",
        "hard2",
        "frac",
        "whole",
        "old",
    ]:
        assert taken[name], name
    for name in ["é-unicode.txt", 'quo"te', "back\\slash", "tab\tname", "link", "fifo", "sub"]:
        assert not taken[name], name
    if ROOT:
        assert taken["nobody-owns"]  # an id without a name: no "user"/"group" key, as in file_doc
    if os.listxattr(src / "xattr.txt"):
        assert not taken["xattr.txt"]  # extended attributes: Python's

    # Changes: every one of them makes the entry a Python decision, and Python says "changed".
    os.utime(src / "plain.txt", ns=(1, 2))
    time.sleep(0.05)  # past the kernel's timestamp granularity
    st = os.stat(src / "ctime-only")
    os.chown(src / "ctime-only", st.st_uid, st.st_gid)  # changes nothing but the ctime
    os.chmod(src / "setuid", 0o755)
    (src / "empty").write_bytes(b"now something")
    os.unlink(src / "hard2")  # hard1's link count drops
    (src / "whole").unlink()
    (src / "whole").write_bytes(b"w")  # same size, new inode and times
    taken = check_folder(repo, src, tree, owners)
    for name in ["plain.txt", "setuid", "empty", "hard1", "whole", "ctime-only"]:
        assert not taken[name], name
    assert taken["frac"] and taken["old"] and taken["sticky"]


def test_backups_with_and_without_it_make_the_same_trees(tmp_path, monkeypatch):
    src = make_tree(tmp_path / "src")
    repo = open_vault(tmp_path / "vault")
    backup(repo, [str(src)])
    fast = backup(repo, [str(src)])
    assert fast.files_unmodified > 10 and fast.files_changed == fast.files_new == 0
    (src / "plain.txt").write_bytes(b"changed content")
    os.utime(src / "frac", ns=(5, 5))
    fast_changed = backup(repo, [str(src)])
    assert fast_changed.files_changed == 2
    with monkeypatch.context() as m:
        m.setattr(backup_module, "_unchanged_files", None)
        slow_changed = backup(repo, [str(src)])
    assert data_tree(repo, fast_changed.snapshot_id, src) == data_tree(
        repo, slow_changed.snapshot_id, src
    )
    assert slow_changed.files_unmodified == fast_changed.files_unmodified + 2
    again = backup(repo, [str(src)])
    assert again.files_unmodified == slow_changed.files_unmodified
    assert data_tree(repo, again.snapshot_id, src) == data_tree(repo, slow_changed.snapshot_id, src)
