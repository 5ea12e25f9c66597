"""vault restore on real vaults built with the Repository API: content, metadata, hardlinks, special files,
sub-paths, include/exclude, existing targets, damaged blobs, and the CLI's exit codes and JSON."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import mmap
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import pytest

from tests.helpers.env import env_for
from tests.tools.cli import one_line_error, vault
from vaultfs.backend import LocalBackend
from vaultfs.errors import NotFoundError, UsageError, VaultError
from vaultfs.format.gojson import GoTime
from vaultfs.format.lock import Lock
from vaultfs.format.pack import DATA, TREE
from vaultfs.format.snapshot import Snapshot
from vaultfs.format.tree import (
    GO_DEVICE,
    GO_DIR,
    GO_NAMED_PIPE,
    GO_SETGID,
    GO_SETUID,
    GO_SOCKET,
    GO_STICKY,
    GO_SYMLINK,
    Node,
)
from vaultfs.ops import restore as restore_mod
from vaultfs.ops.restore import Selector, restore
from vaultfs.repo.repository import Repository

ROOT = os.geteuid() == 0
T0 = 1_600_000_000_123_456_789


def _t(i: int) -> GoTime:
    return GoTime(T0 + i * 1_000_000_007)


class VaultBuilder:
    """Builds trees of Nodes into a fresh vault; times and inodes are handed out deterministically."""

    def __init__(self, path: Path, version: int = 2) -> None:
        self.repo = Repository.init(LocalBackend(str(path)), b"pw", version=version)
        self.repo.load_index()
        self.clock = 0
        self.chunks: dict[bytes, bytes] = {}

    def times(self) -> dict:
        self.clock += 1
        return {"mtime": _t(self.clock), "atime": _t(self.clock - 1000), "ctime": _t(self.clock)}

    def file(self, name: str, pieces: list[bytes], mode: int = 0o644, **extra) -> Node:
        ids = []
        for piece in pieces:
            blob_id, _ = self.repo.save_blob(DATA, piece)
            self.chunks[blob_id] = piece
            ids.append(blob_id)
        fields = {"uid": 0, "gid": 0, "links": 1, **self.times(), **extra}
        return Node(
            name=name,
            type="file",
            mode=mode,
            size=sum(map(len, pieces)),
            content=ids,
            **fields,
        )

    def dir(self, name: str, children: list[Node], mode: int = 0o755, **extra) -> Node:
        return Node(
            name=name,
            type="dir",
            mode=GO_DIR | mode,
            subtree=self.repo.save_tree(children),
            **{**self.times(), **extra},
        )

    def symlink(self, name: str, target: str, **extra) -> Node:
        return Node(
            name=name,
            type="symlink",
            mode=GO_SYMLINK | 0o777,
            linktarget=target,
            **{**self.times(), **extra},
        )

    def snapshot(self, children: list[Node]) -> str:
        tree = self.repo.save_tree(children)
        snap_id = self.repo.save_snapshot(Snapshot(GoTime.now(), tree, ["/src"], hostname="h"))
        self.repo.flush()
        return snap_id


def _mtime(path: Path) -> int:
    return os.lstat(path).st_mtime_ns


def _atime(path: Path) -> int:
    return os.lstat(path).st_atime_ns


@pytest.fixture
def sample(tmp_path):
    """A vault with one snapshot holding most kinds of entries; returns (builder, snapshot id, nodes)."""
    b = VaultBuilder(tmp_path / "vault")
    big = [os.urandom(n) for n in (300_000, 1, 70_000, 250_000)]
    nodes = {
        "big": b.file("big", big, mode=0o640),
        "empty": b.file("empty", []),
        "noaccess": b.file("noaccess", [b"mode zero\n"], mode=0o000),
        "setuid": b.file("setuid", [b"#!/bin/sh\n"], mode=0o755 | GO_SETUID | GO_SETGID),
        "xattr": b.file(
            "xattr",
            [b"x\n"],
            extended_attributes=[("user.one", b"1"), ("user.bin", bytes(range(256)))],
        ),
        "hl1": b.file("hl1", [b"shared inode\n"], links=2, inode=77, device_id=5),
        "odd": b.file("odd name \udcff\n", [b"odd\n"]),
        "owned": b.file("owned", [b"owned\n"], uid=1234, gid=5678),
    }
    inner = [
        b.file("hl2", [b"shared inode\n"], links=2, inode=77, device_id=5),
        b.file("deep", [b"deep\n"]),
        b.dir("empty-dir", [], mode=0o700),
    ]
    nodes["sub"] = b.dir("sub", inner, mode=0o775 | GO_SETGID | GO_STICKY)
    nodes["link"] = b.symlink("link", "sub/deep")
    nodes["dangling"] = b.symlink("dangling", "no/such/thing")
    nodes["fifo"] = Node(name="fifo", type="fifo", mode=GO_NAMED_PIPE | 0o640, **b.times())
    nodes["sock"] = Node(name="sock", type="socket", mode=GO_SOCKET | 0o755, **b.times())
    nodes["null"] = Node(
        name="null", type="chardev", mode=GO_DEVICE | 0o666, device=os.makedev(1, 3), **b.times()
    )
    snap_id = b.snapshot(list(nodes.values()))
    return b, snap_id, nodes


@pytest.mark.parametrize("version", [1, 2])
def test_restore_everything(tmp_path, version):
    b = VaultBuilder(tmp_path / f"vault{version}", version)
    pieces = [os.urandom(200_000), b"tail"]
    snap = b.snapshot([b.file("f", pieces), b.dir("d", [b.file("g", [b"g\n"])])])
    target = tmp_path / "out"
    report = restore(b.repo, snap, target)
    assert report.ok and report.files == 2 and report.dirs == 1
    assert (target / "f").read_bytes() == b"".join(pieces)
    assert (target / "d" / "g").read_bytes() == b"g\n"
    assert report.bytes == 200_000 + len(b"tail") + len(b"g\n")


def test_content_and_metadata(sample, tmp_path):
    b, snap_id, nodes = sample
    target = tmp_path / "out"
    seen = []
    report = restore(
        b.repo, snap_id, target, progress=lambda done, total: seen.append((done, total))
    )
    assert report.errors == []
    assert seen and seen[-1][0] == seen[-1][1] == report.bytes
    # every file's content once; the hardlink's second name shares the first one's inode
    assert report.bytes == sum(n.size for n in nodes.values() if n.type == "file") + len(b"deep\n")
    # nanosecond times: files, folders (set after their content), symlinks themselves; checked before
    # anything is read, since reading updates the access time
    for key in ("big", "empty", "noaccess", "sub", "link", "dangling", "fifo", "odd"):
        node = nodes[key]
        assert _mtime(target / node.name) == node.mtime.ns, key
        assert _atime(target / node.name) == node.atime.ns, key
    assert (target / "big").read_bytes() == b"".join(b.chunks[c] for c in nodes["big"].content)
    assert (target / "empty").read_bytes() == b""
    assert (target / "noaccess").read_bytes() == b"mode zero\n"
    modes = {
        "big": 0o640,
        "noaccess": 0o000,
        "setuid": 0o6755,
        "sub": 0o3775,
        "sub/empty-dir": 0o700,
        "fifo": 0o640,
    }
    for name, mode in modes.items():
        assert stat.S_IMODE(os.lstat(target / name).st_mode) == mode, name
    assert stat.S_ISFIFO(os.lstat(target / "fifo").st_mode)
    assert not (target / "sock").exists()
    assert os.readlink(target / "link") == "sub/deep"
    assert os.readlink(target / "dangling") == "no/such/thing"
    assert (target / "odd name \udcff\n").read_bytes() == b"odd\n"
    assert os.getxattr(target / "xattr", "user.one") == b"1"
    assert os.getxattr(target / "xattr", "user.bin") == bytes(range(256))
    # hardlinks: the two names share one inode
    st1, st2 = os.stat(target / "hl1"), os.stat(target / "sub" / "hl2")
    assert st1.st_ino == st2.st_ino and st1.st_nlink == 2
    assert report.hardlinks == 1
    if ROOT:
        assert (os.lstat(target / "owned").st_uid, os.lstat(target / "owned").st_gid) == (
            1234,
            5678,
        )
        null = os.lstat(target / "null")
        assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
        assert stat.S_IMODE(null.st_mode) == 0o666
    else:
        assert not (target / "null").exists()
        assert any("device" in w.message for w in report.warnings)


def test_subpath_restores_folder_contents_or_one_file(sample, tmp_path):
    b, snap_id, nodes = sample
    report = restore(b.repo, snap_id, tmp_path / "a", subpath="/sub")
    assert report.ok
    assert sorted(os.listdir(tmp_path / "a")) == ["deep", "empty-dir", "hl2"]
    assert (tmp_path / "a" / "deep").read_bytes() == b"deep\n"
    restore(b.repo, snap_id, tmp_path / "b", subpath="sub/deep")
    assert os.listdir(tmp_path / "b") == ["deep"]
    with pytest.raises(NotFoundError):
        restore(b.repo, snap_id, tmp_path / "c", subpath="/nope")


def _restored(root: Path) -> set[str]:
    out = set()
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            out.add(os.path.relpath(os.path.join(folder, name), root))
    return out


@pytest.fixture
def filter_vault(tmp_path):
    b = VaultBuilder(tmp_path / "vault")
    tree = [
        b.dir(
            "a",
            [b.dir("b", [b.file("f.txt", [b"f"])]), b.file("g.log", [b"g"])],
            mode=0o750,
        ),
        b.dir("c", [b.file("h.txt", [b"h"])]),
        b.file("top.txt", [b"t"]),
    ]
    return b, b.snapshot(tree), tree


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        (["/a/b"], [], {"a", "a/b", "a/b/f.txt"}),
        (["*.txt"], [], {"a", "a/b", "a/b/f.txt", "c", "c/h.txt", "top.txt"}),
        (["b"], [], {"a", "a/b", "a/b/f.txt"}),
        (["*/top.txt"], [], set()),
        (["*.txt", "!/a/b"], [], {"c", "c/h.txt", "top.txt"}),
        (["/a/**/f.txt"], [], {"a", "a/b", "a/b/f.txt"}),
        (["[^a]"], [], {"a", "a/b", "a/b/f.txt", "c", "c/h.txt"}),
        (["a/"], [], {"a", "a/b", "a/b/f.txt", "a/g.log"}),
        ([], ["a"], {"c", "c/h.txt", "top.txt"}),
        ([], ["./a"], {"c", "c/h.txt", "top.txt"}),
        ([], ["*.txt", "!c/h.txt"], {"a", "a/b", "a/g.log", "c", "c/h.txt"}),
        ([], ["!a"], {"a", "a/b", "a/b/f.txt", "a/g.log", "c", "c/h.txt", "top.txt"}),
    ],
)
def test_include_exclude_follow_restic(filter_vault, tmp_path, include, exclude, expected):
    # The expected sets are what restic 0.14 restores for these patterns (the interop test checks the
    # same against the real binary).
    b, snap_id, _tree = filter_vault
    report = restore(b.repo, snap_id, tmp_path / "out", include=include, exclude=exclude)
    assert report.ok
    assert _restored(tmp_path / "out") == expected


def test_include_restores_metadata_of_folders_leading_to_matches(filter_vault, tmp_path):
    b, snap_id, tree = filter_vault
    restore(b.repo, snap_id, tmp_path / "out", include=["f.txt"])
    a = tree[0]
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "a").st_mode) == 0o750
    assert _mtime(tmp_path / "out" / "a") == a.mtime.ns


def test_bad_patterns_are_usage_errors():
    for bad in (["["], ["a[]"], ["x\\"], ["[a-"], ["[]a]"], ["[-a]"]):
        with pytest.raises(UsageError):
            Selector(include=bad)
    with pytest.raises(UsageError):
        Selector(include=["a"], exclude=["b"])
    # Go's filepath.Match rules: ranges, escapes, negated classes
    sel = Selector(include=["/[a-c]\\*", "/x[^0-9]?"])
    assert sel.select("/b*", False) == (True, False)
    assert sel.select("/bz", False) == (False, False)
    assert sel.select("/xa1", False)[0] and not sel.select("/x11", False)[0]
    assert Selector(include=["a]"]).select("/d/a]", False)[0]  # ']' alone is literal


def test_existing_files_are_skipped_unless_overwrite(sample, tmp_path):
    b, snap_id, _nodes = sample
    target = tmp_path / "out"
    (target / "sub").mkdir(parents=True)
    (target / "big").write_bytes(b"mine")
    (target / "sub" / "deep").symlink_to("/etc/passwd")
    report = restore(b.repo, snap_id, target)
    assert not report.ok and report.skipped == 2
    assert {p.path for p in report.errors} == {"/big", "/sub/deep"}
    assert (target / "big").read_bytes() == b"mine"
    assert os.readlink(target / "sub" / "deep") == "/etc/passwd"
    assert (target / "empty").exists()  # everything else was restored
    again = restore(b.repo, snap_id, target, overwrite=True)
    assert again.ok, again.errors
    assert (target / "big").stat().st_size == 620_001
    assert (target / "sub" / "deep").read_bytes() == b"deep\n"
    assert not (target / "sub" / "deep").is_symlink()


def test_overwrite_never_removes_a_folder(sample, tmp_path):
    b, snap_id, _nodes = sample
    target = tmp_path / "out"
    (target / "big").mkdir(parents=True)
    (target / "big" / "keep").write_text("keep")
    report = restore(b.repo, snap_id, target, overwrite=True)
    assert [p.path for p in report.errors] == ["/big"]
    assert (target / "big" / "keep").read_text() == "keep"


def test_dry_run_changes_nothing(sample, tmp_path):
    b, snap_id, nodes = sample
    report = restore(b.repo, snap_id, tmp_path / "out", dry_run=True)
    assert report.ok and report.dry_run
    assert not (tmp_path / "out").exists()
    assert report.files == sum(1 for n in nodes.values() if n.type == "file") + 2
    assert report.bytes > 620_000


def _damage(repo: Repository, blob_id: bytes, blob_type: int = DATA) -> tuple[str, int]:
    loc = repo.index.lookup(blob_id, blob_type)
    path = repo.backend.path("data", loc.pack_id.hex())
    os.chmod(path, 0o600)
    raw = bytearray(Path(path).read_bytes())
    raw[loc.offset + loc.length // 2] ^= 0x40
    Path(path).write_bytes(raw)
    return loc.pack_id.hex(), loc.offset


def test_a_damaged_tree_is_one_error_and_the_rest_is_restored(tmp_path):
    """Trees are read and checked like data (one C call); a damaged one is reported by the
    repository's path, with what is wrong, and its folder's siblings are restored."""
    b = VaultBuilder(tmp_path / "vault")
    broken = b.dir("broken", [b.file("lost", [b"lost"])])
    snap_id = b.snapshot([broken, b.dir("fine", [b.file("kept", [b"kept"])])])
    _damage(b.repo, broken.subtree, TREE)
    report = restore(_reopen(b.repo), snap_id, tmp_path / "out")
    assert [(p.path, "cannot read the folder's tree" in p.message) for p in report.errors] == [
        ("/broken", True)
    ]
    assert "corrupt" in report.errors[0].message or "authenticat" in report.errors[0].message
    assert (tmp_path / "out" / "fine" / "kept").read_bytes() == b"kept"


@pytest.mark.parametrize("gap", [0, restore_mod.MERGE_GAP])
def test_corrupt_blob_names_the_file_and_the_rest_is_restored(tmp_path, monkeypatch, gap):
    monkeypatch.setattr(restore_mod, "MERGE_GAP", gap)
    b = VaultBuilder(tmp_path / "vault")
    pieces = [os.urandom(100_000) for _ in range(3)]
    victim = os.urandom(50_000)
    nodes = [
        b.file("a-before", [pieces[0]]),
        b.file("b-victim", [pieces[1], victim, pieces[2]]),
        b.file("c-after", [pieces[2], pieces[0]]),
    ]
    snap_id = b.snapshot(nodes)
    victim_id = nodes[1].content[1]
    pack, _ = _damage(b.repo, victim_id)
    report = restore(b.repo, snap_id, tmp_path / "out", workers=2)
    assert [p.path for p in report.errors] == ["/b-victim"]
    message = report.errors[0].message
    assert victim_id.hex() in message and pack in message
    out = tmp_path / "out"
    assert (out / "a-before").read_bytes() == pieces[0]
    assert (out / "c-after").read_bytes() == pieces[2] + pieces[0]
    damaged = (out / "b-victim").read_bytes()
    assert damaged[:100_000] == pieces[1] and damaged[150_000:] == pieces[2]


def test_missing_pack_and_unknown_blob_are_reported(tmp_path):
    b = VaultBuilder(tmp_path / "vault")
    nodes = [b.file("lost", [os.urandom(1000)])]
    b.repo.flush()  # "kept" goes into another pack
    nodes.append(b.file("kept", [b"kept"]))
    nodes.append(
        Node(name="unindexed", type="file", mode=0o644, size=3, content=[b"\x01" * 32], **b.times())
    )
    snap_id = b.snapshot(nodes)
    lost = b.repo.index.lookup(nodes[0].content[0], DATA)
    os.remove(b.repo.backend.path("data", lost.pack_id.hex()))
    report = restore(b.repo, snap_id, tmp_path / "out")
    errors = {p.path: p.message for p in report.errors}
    assert set(errors) == {"/lost", "/unindexed"}
    assert lost.pack_id.hex() in errors["/lost"]
    assert ("01" * 32) in errors["/unindexed"]
    assert (tmp_path / "out" / "lost").exists()  # created, with its metadata, but empty
    assert (tmp_path / "out" / "kept").read_bytes() == b"kept"


def test_many_files_across_batches_and_ranges(tmp_path, monkeypatch):
    # Small batches and ranges exercise the pipelined hand-over and range splitting.
    monkeypatch.setattr(restore_mod, "BATCH_BLOBS", 7)
    monkeypatch.setattr(restore_mod, "MAX_RANGE", 64 * 1024)
    b = VaultBuilder(tmp_path / "vault")
    shared = os.urandom(20_000)
    files = {f"f{i:03d}": [os.urandom(1 + i * 97 % 5000), shared] for i in range(120)}
    snap_id = b.snapshot([b.dir("d", [b.file(n, p) for n, p in files.items()])])
    report = restore(b.repo, snap_id, tmp_path / "out", workers=3)
    assert report.ok and report.files == 120
    for name, pieces in files.items():
        assert (tmp_path / "out" / "d" / name).read_bytes() == b"".join(pieces)


def test_the_walk_keeps_no_tree_after_its_folder(tmp_path):
    # Every folder's nodes would otherwise stay in the repository's tree cache until the end.
    b = VaultBuilder(tmp_path / "vault")
    folders = [b.dir(f"d{i}", [b.dir("inner", [b.file("f", [b"x%d" % i])])]) for i in range(5)]
    snap_id = b.snapshot(folders)
    repo = _reopen(b.repo)
    report = restore(repo, snap_id, tmp_path / "out")
    assert report.ok and report.files == 5 and report.dirs == 10
    assert len(repo._tree_cache) <= 1  # the snapshot's root at most


def test_blobs_sharing_stored_bytes_are_decoded_apart(tmp_path):
    # A damaged index can place a second blob ID on the stored bytes of another blob. Blobs are
    # decrypted in place in the read buffer; the bogus one must not destroy the real one's bytes.
    b = VaultBuilder(tmp_path / "vault")
    real = os.urandom(30_000)
    node = b.file("real", [real])
    b.repo.flush()
    loc = b.repo.index.lookup(node.content[0], DATA)
    bogus = b"\x02" * 32
    b.repo.index.add_pack(
        loc.pack_id, [(bogus, DATA, loc.offset, loc.length, loc.uncompressed_length)]
    )
    # "a-bogus" comes first in the walk, so its blob is decoded first
    tree = [
        Node(name="a-bogus", type="file", mode=0o644, size=len(real), content=[bogus], **b.times()),
        node,
    ]
    snap_id = b.snapshot(tree)
    report = restore(b.repo, snap_id, tmp_path / "out", workers=1)
    assert [p.path for p in report.errors] == ["/a-bogus"]
    assert (tmp_path / "out" / "real").read_bytes() == real


@pytest.mark.parametrize("wrong_size", [False, True])
def test_a_blob_decrypted_in_place_that_fails_later_checks_is_reported_as_such(
    tmp_path, wrong_size
):
    # The tag is right, so the blob is decrypted over its stored bytes before its hash (or size) is
    # found wrong: the report must still say what is wrong, not that the bytes fail authentication.
    b = VaultBuilder(tmp_path / "vault")
    node = b.file("real", [os.urandom(30_000)])
    b.repo.flush()
    loc = b.repo.index.lookup(node.content[0], DATA)
    bogus = b"\x03" * 32
    size = 12345 if wrong_size else loc.uncompressed_length
    b.repo.index.add_pack(loc.pack_id, [(bogus, DATA, loc.offset, loc.length, size)])
    tree = [Node(name="only", type="file", mode=0o644, size=1, content=[bogus], **b.times())]
    report = restore(b.repo, b.snapshot(tree), tmp_path / "out", workers=1)
    [problem] = report.errors
    assert "authentication" not in problem.message
    expected = "decompressed to 30000 bytes, expected 12345" if wrong_size else "does not match"
    assert expected in problem.message


def _tree_state(root: Path) -> dict[str, tuple]:
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            content = path.read_bytes() if stat.S_ISREG(st.st_mode) else None
            key = str(path.relative_to(root))
            state[key] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_size, content)
    return state


@pytest.mark.skipif(restore_mod._write_file is None, reason="built without the C part")
def test_native_file_writes_match_the_python_path(sample, tmp_path, monkeypatch):
    b, snap_id, _nodes = sample
    calls = []
    native = restore_mod._write_file

    def counting(*args):
        calls.append(args[0])
        return native(*args)

    batched: list[bytes] = []  # files of one chunk written by one call per range (restore_small)
    files_done = restore_mod._Restorer.files_done

    def recording(self, done):
        batched.extend(file.path for file, _n in done)
        return files_done(self, done)

    monkeypatch.setattr(restore_mod, "_write_file", counting)
    monkeypatch.setattr(restore_mod._Restorer, "files_done", recording)
    native_report = restore(b.repo, snap_id, tmp_path / "native")
    monkeypatch.setattr(restore_mod, "_write_file", None)
    python_report = restore(b.repo, snap_id, tmp_path / "python")
    assert native_report.ok and python_report.ok
    assert native_report.to_json() | {"seconds": 0, "target": ""} == python_report.to_json() | {
        "seconds": 0,
        "target": "",
    }
    assert _tree_state(tmp_path / "native") == _tree_state(tmp_path / "python")
    # created by the worker (single chunk), opened for the last of several chunks, and a hardlink's
    # first name all took a one-call path; the file with extended attributes did not
    names = {os.path.basename(p) for p in calls + batched}
    assert {b"deep", b"big", b"hl1", b"noaccess", b"setuid", b"owned"} <= names
    assert b"xattr" not in names
    assert batched, "files of one chunk in one range are written by one call"


def test_target_that_cannot_be_created_is_one_vault_error(sample, tmp_path):
    b, snap_id, _nodes = sample
    (tmp_path / "plainfile").write_text("x")
    with pytest.raises(VaultError, match="plainfile"):
        restore(b.repo, snap_id, tmp_path / "plainfile" / "sub")
    with pytest.raises(VaultError, match="not a folder"):
        restore(b.repo, snap_id, tmp_path / "plainfile")


@pytest.fixture
def tiny_fs(tmp_path):
    """A 256 KiB tmpfs (needs root and mount rights; skipped where the sandbox forbids mounting)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_full_disk_is_one_vault_error(tmp_path, tiny_fs):
    b = VaultBuilder(tmp_path / "vault")
    snap_id = b.snapshot([b.file(f"f{i}", [os.urandom(100_000)]) for i in range(5)])
    with pytest.raises(VaultError, match="free some space") as info:
        restore(b.repo, snap_id, tiny_fs / "out")
    assert "\n" not in str(info.value)
    res = vault(
        "-r", b.repo.backend.root, "-q", "restore", snap_id, "-t", tiny_fs / "cli", expect=1
    )
    assert "No space left on device" in one_line_error(res)


def test_invalid_names_in_a_snapshot_are_refused(tmp_path):
    b = VaultBuilder(tmp_path / "vault")
    evil = b.file("..", [b"evil"])
    snap_id = b.snapshot([b.dir("d", [evil]), b.file("ok", [b"ok"])])
    report = restore(b.repo, snap_id, tmp_path / "t" / "out")
    assert [p.path for p in report.errors] == ["/d/.."]
    assert sorted(os.listdir(tmp_path / "t")) == ["out"]


def test_trees_loaded_ahead_cover_repeats_skips_depth_and_width(tmp_path):
    """The tree loader runs ahead of the walk: a subtree that occurs several times (one tree ID), a
    folder the walk skips (a file in its way) with that subtree, a chain deeper than anything
    queued at the start, and more sibling folders than it may hold ahead (PREFETCH_TREES)."""
    b = VaultBuilder(tmp_path / "vault")
    inner = b.dir("same", [b.file("a", [b"A"]), b.dir("deeper", [b.file("z", [b"Z"])])])
    copies = [dataclasses.replace(inner, name=n) for n in ("one", "two", "blocked", "three")]
    chain = b.file("bottom", [b"B"])
    for i in range(40):
        chain = b.dir(f"d{i}", [chain])
    width = restore_mod.PREFETCH_TREES + 44
    wide = b.dir("wide", [b.dir(f"w{i}", [b.file("f", [b"%d" % i])]) for i in range(width)])
    snap_id = b.snapshot([*copies, chain, wide])
    target = tmp_path / "out"
    target.mkdir()
    (target / "blocked").write_text("in the way")
    report = restore(b.repo, snap_id, target)
    assert [p.path for p in report.errors] == ["/blocked"]
    assert (target / "blocked").read_text() == "in the way"
    for name in ("one", "two", "three"):
        assert (target / name / "a").read_bytes() == b"A"
        assert (target / name / "deeper" / "z").read_bytes() == b"Z"
    assert target.joinpath(*[f"d{i}" for i in reversed(range(40))], "bottom").read_bytes() == b"B"
    assert [(target / "wide" / f"w{i}" / "f").read_bytes() for i in range(width)] == [
        b"%d" % i for i in range(width)
    ]


def test_an_unexpected_error_loading_a_tree_ahead_is_raised_not_waited_for(tmp_path, monkeypatch):
    """A tree the loader thread fails to load with something other than a VaultError (a bug) reaches
    the walk as that exception, as a future's result did, instead of leaving the walk waiting."""
    b = VaultBuilder(tmp_path / "vault")
    bad = b.dir("bad", [b.file("f", [b"f"])])
    snap_id = b.snapshot([b.dir("a", [b.dir("b", [bad])])])
    load_tree = restore_mod._Restorer.load_tree

    def failing(self, tree_id):
        if tree_id == bad.subtree:
            raise RuntimeError("a bug while loading")
        return load_tree(self, tree_id)

    monkeypatch.setattr(restore_mod._Restorer, "load_tree", failing)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            restore(_reopen(b.repo), snap_id, tmp_path / "out")
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the restore hangs"
    assert isinstance(outcome[0], RuntimeError)


def _resident_pages(path: Path) -> int:
    """How many of a file's pages are in the page cache (mincore(2) of a mapping of it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    libc.mmap.argtypes += [ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "rb") as f:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vec = ctypes.create_string_buffer(pages)
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in vec.raw)
        finally:
            libc.munmap(addr, size)


@pytest.mark.parametrize("version", [1, 2])
def test_large_chunks_are_written_with_o_direct_and_read_back_right(tmp_path, monkeypatch, version):
    """Chunks of multi-chunk files of at least DIRECT_MIN bytes go to the disk with O_DIRECT, only
    the partial blocks at their ends through the page cache (v1: decrypted at the file's alignment;
    v2: decompressed there). A chunk that two files hold at different alignments is written through
    the page cache for the file it was not placed for. Every byte reads back right either way."""
    monkeypatch.setattr(restore_mod._Direct, "ok", True)  # a file system seen earlier may refuse it
    target = tmp_path / "out"
    target.mkdir()
    probe = target / "probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
        direct = True
    except OSError:
        direct = False  # then the page cache takes all of it, and the content is still checked
    probe.unlink()
    b = VaultBuilder(tmp_path / "vault", version)
    pieces = [os.urandom(300_001), b"text line\n" * 70_012 + os.urandom(3), os.urandom(400_000)]
    pieces.append(os.urandom(5000))  # too small for O_DIRECT: the last chunk's usual path
    big = b.file("big", pieces)
    # the same two chunks at other alignments (big comes first in the walk: its chunks are placed for it)
    again = b.file("copy", [pieces[1], pieces[0]])
    snap_id = b.snapshot([big, again, b.file("small", [b"x"])])
    report = restore(b.repo, snap_id, target)
    assert report.ok and report.bytes == sum(map(len, pieces)) + len(pieces[1] + pieces[0]) + 1
    if direct:
        # per chunk at most the partial block at each end, and the small last chunk
        assert _resident_pages(target / "big") <= 2 * len(pieces)
    assert (target / "big").read_bytes() == b"".join(pieces)
    assert (target / "copy").read_bytes() == pieces[1] + pieces[0]
    assert os.stat(target / "big").st_mtime_ns == big.mtime.ns


# -- the CLI --------------------------------------------------------------------------------------


def test_cli_restore_json_and_exit_codes(sample, tmp_path):
    b, snap_id, _nodes = sample
    repo = b.repo.backend.root
    target = tmp_path / "cli"
    res = vault("-r", repo, "restore", f"{snap_id[:8]}:/sub", "--target", target, "--json")
    doc = json.loads(res.out)
    assert doc["files_restored"] == 2 and doc["errors"] == [] and doc["bytes_restored"] == 18
    assert sorted(os.listdir(target)) == ["deep", "empty-dir", "hl2"]
    # existing files: errors for each, exit 1, listed in the JSON document
    res = vault("-r", repo, "restore", "latest:sub", "--target", target, "--json", expect=1)
    doc = json.loads(res.out)
    assert sorted(e["path"] for e in doc["errors"]) == ["/deep", "/hl2"]
    assert doc["skipped"] == 2
    res = vault("-r", repo, "restore", "latest:sub", "-t", target, "--overwrite")
    assert "restored 2 files" in res.out
    res = vault(
        "-r", repo, "restore", "latest", "-t", target, "--include", "a", "--exclude", "b", expect=2
    )
    assert "cannot be combined" in one_line_error(res)
    res = vault("-r", repo, "restore", "nosuch", "-t", target, expect=1)
    assert "nosuch" in one_line_error(res)
    res = vault("-r", repo, "restore", "latest:/missing", "-t", target, expect=1)
    assert "missing" in one_line_error(res)
    (tmp_path / "afile").write_text("x")
    res = vault("-r", repo, "restore", "latest", "-t", tmp_path / "afile", expect=1)
    assert "not a folder" in one_line_error(res)


def test_cli_errors_for_damaged_data_print_the_file(tmp_path):
    b = VaultBuilder(tmp_path / "vault")
    node = b.file("victim", [os.urandom(5000)])
    snap_id = b.snapshot([node, b.file("fine", [b"fine"])])
    _damage(b.repo, node.content[0])
    res = vault("-r", b.repo.backend.root, "restore", snap_id, "-t", tmp_path / "out", expect=1)
    assert "error: /victim: content lost" in res.err and node.content[0].hex() in res.err
    assert (tmp_path / "out" / "fine").read_bytes() == b"fine"


def test_cli_restore_stops_when_the_locks_second_check_finds_a_conflict(tmp_path):
    """restore starts without waiting for its lock's second check (200 ms later). An exclusive lock
    that appears before that check (a racing process) stops it with exit 11 and the usual message;
    its own lock is removed."""
    b = VaultBuilder(tmp_path / "vault")
    snap_id = b.snapshot([b.file(f"f{i}", [os.urandom(2000)]) for i in range(50)])
    locks = Path(b.repo.backend.root) / "locks"
    elsewhere = _reopen(b.repo)  # the racing process, ready before the restore starts
    other = Lock(GoTime.now(), True, "another-host", "someone", 4242).encode()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vaultfs.tools.main", "-r", b.repo.backend.root, "restore"]
        + [snap_id, "-t", str(tmp_path / "out")],
        env=env_for("pw"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not os.listdir(locks):  # restore's lock: the second check is due 200 ms from now
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.001)
    other_name = elsewhere.save_unpacked("locks", other)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 11, err
    lines = [ln for ln in err.decode().splitlines() if ln.strip()]
    assert lines[0].startswith("restoring snapshot"), err  # the note: the restore had begun
    assert len(lines) == 2 and lines[1].startswith("vault: error: the vault is locked"), err
    assert "another-host" in lines[1] and "vault unlock" in lines[1]
    assert os.listdir(locks) == [other_name]


NOBODY = 65534


def _reopen(repo: Repository) -> Repository:
    return Repository.open(LocalBackend(repo.backend.root), b"pw")


def _as_nobody(work):
    """Run ``work()`` in a forked child that dropped root for uid/gid 65534; return its JSON result.
    (The interpreter lives under /root, so a fresh process as another user cannot even start.)"""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            result = json.dumps(work()).encode()
            os.write(write_end, result)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "the restore as nobody failed"
    return json.loads(data)


@pytest.mark.skipif(not ROOT, reason="switching to another user needs root")
def test_restore_as_an_ordinary_user(tmp_path):
    # Without root: no owners and no devices, but a mode-000 file, a read-only folder and xattrs on a
    # read-only file must still come back (content and xattrs first, modes last, folders bottom-up).
    base = Path(tempfile.mkdtemp(prefix="vault-nonroot-"))
    try:
        os.chmod(base, 0o755)
        b = VaultBuilder(base / "vault")
        locked = b.dir(
            "locked",
            [
                b.file("zero", [b"secret\n"], mode=0o000),
                b.file("ro", [b"ro\n"], mode=0o444, extended_attributes=[("user.k", b"v")]),
            ],
            mode=0o500,
        )
        dev = Node(
            name="dev", type="dev", mode=GO_DEVICE | 0o600, device=os.makedev(7, 0), **b.times()
        )
        snap_id = b.snapshot([locked, dev, b.file("owned", [b"o"], uid=1234, gid=5678)])
        subprocess.run(["chown", "-R", str(NOBODY), str(base)], check=True)
        target = base / "out"
        doc = _as_nobody(lambda: restore(_reopen(b.repo), snap_id, target).to_json())
        assert doc["errors"] == [] and [w["path"] for w in doc["warnings"]] == ["/dev"]
        assert not (target / "dev").exists()
        assert (target / "locked" / "zero").read_bytes() == b"secret\n"  # root may read it
        assert stat.S_IMODE(os.stat(target / "locked" / "zero").st_mode) == 0
        assert stat.S_IMODE(os.stat(target / "locked").st_mode) == 0o500
        assert os.getxattr(target / "locked" / "ro", "user.k") == b"v"
        assert _mtime(target / "locked") == locked.mtime.ns
        assert os.stat(target / "owned").st_uid == NOBODY
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(not restore_mod.NATIVE, reason="built without the C part")
def test_restore_with_the_c_part_loads_no_cryptography(sample, tmp_path):
    """Opening the vault, reading its index, trees and snapshots and writing the lock all take the C
    part, so cryptography (~7 MB resident once imported) stays unloaded."""
    b, snap_id, _nodes = sample
    probe = (
        "import sys\n"
        "from vaultfs.tools.main import main\n"
        f"code = main(['-r', {b.repo.backend.root!r}, 'restore', '-q', {snap_id!r},"
        f" '-t', {str(tmp_path / 'out')!r}])\n"
        "print(code, 'cryptography' in sys.modules, file=sys.stderr)\n"
    )
    env = {**os.environ, "VAULT_PASSWORD": "pw"}
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=False
    )
    assert proc.stderr.strip().splitlines()[-1] == "0 False", proc.stderr
