"""The tricky tree holds what it promises, restic restores it exactly, and compare_trees sees changes."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.helpers.restic import ResticRepo
from tests.helpers.trees import (
    DEEP_LEVELS,
    EDGE_SIZES,
    OTHER_GID,
    OTHER_UID,
    TRICKY_NAMES,
    WIDE_ENTRIES,
    Entry,
    assert_same_tree,
    compare_trees,
    make_tricky_tree,
    scan_tree,
)

IS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def scanned(tricky_tree: Path) -> dict[bytes, Entry]:
    return scan_tree(tricky_tree)


@pytest.mark.restic
@pytest.mark.parametrize("fixture", ["restic_repo_v1", "restic_repo_v2"])
def test_restic_restore_equals_source(request: pytest.FixtureRequest, fixture: str) -> None:
    # Proves both halves at once: the builder makes nothing restic cannot carry, and the scanner and
    # comparator see every kind of entry the same way on both sides. Every check is on, including folder
    # and symlink times: restic 0.14 restores all of them.
    repo: ResticRepo = request.getfixturevalue(fixture)
    assert_same_tree(repo.source, repo.restored, owners=True)


def test_tree_has_edge_sizes_and_content(scanned: dict[bytes, Entry]) -> None:
    for size in EDGE_SIZES:
        entry = scanned[b"sizes/%d" % size]
        assert (entry.kind, entry.size) == ("file", size)
    assert len({scanned[b"sizes/%d" % size].sha256 for size in EDGE_SIZES}) == len(EDGE_SIZES)
    assert scanned[b"empty-file"].size == 0
    assert scanned[b"text/hello.txt"].sha256 == scanned[b"text/hello-copy.txt"].sha256
    total = sum(e.size for e in scanned.values() if e.kind == "file")
    assert 25_000_000 < total < 40_000_000


def test_tree_is_deterministic(tmp_path: Path, tricky_tree: Path) -> None:
    # Inode numbers and therefore nothing else may differ between two builds.
    assert_same_tree(tricky_tree, make_tricky_tree(tmp_path / "again"), owners=True)


def test_tree_has_empty_folders(scanned: dict[bytes, Entry]) -> None:
    for rel in (b"empty-dir", b"empty-dirs/nested/empty"):
        assert scanned[rel].kind == "dir"
        assert not any(p.startswith(rel + b"/") for p in scanned)


def test_tree_has_tricky_names(scanned: dict[bytes, Entry]) -> None:
    for name in TRICKY_NAMES:
        assert scanned[b"names/" + name].kind == "file"
    names = [rel for rel in scanned if rel.startswith(b"names/")]
    undecodable = [n for n in names if not _is_utf8(n)]
    assert len(undecodable) >= 2
    assert any(b"\n" in n for n in names) and any(b"\\" in n for n in names)
    assert any("\U0001f600".encode() in n for n in names)


def _is_utf8(name: bytes) -> bool:
    try:
        name.decode()
    except UnicodeDecodeError:
        return False
    return True


def test_tree_has_symlinks(scanned: dict[bytes, Entry]) -> None:
    targets = {rel: e.target for rel, e in scanned.items() if e.kind == "symlink"}
    assert targets[b"links/relative"] == b"../text/hello.txt"
    assert targets[b"links/absolute"] == b"/etc/passwd"
    assert targets[b"links/dangling"] == b"does/not/exist"


def test_tree_has_a_hardlink_group_across_folders(scanned: dict[bytes, Entry]) -> None:
    group = (b"hardlinks-elsewhere/third", b"hardlinks/first", b"hardlinks/second")
    for rel in group:
        assert scanned[rel].links == group
    assert scanned[b"hardlinks/pair-a"].links == (b"hardlinks/pair-a", b"hardlinks/pair-b")
    assert scanned[b"text/hello.txt"].links == ()


def test_tree_has_special_files(scanned: dict[bytes, Entry]) -> None:
    assert scanned[b"special/fifo"].kind == "fifo"
    if IS_ROOT:
        assert scanned[b"special/chardev"].kind == "chardev"
        assert scanned[b"special/chardev"].rdev == os.makedev(1, 3)
        assert scanned[b"special/blockdev"].kind == "blockdev"


def test_tree_has_xattrs(scanned: dict[bytes, Entry]) -> None:
    file_attrs = dict(scanned[b"xattrs/tagged-file"].xattrs)
    assert file_attrs["user.binary"] == bytes(range(256))
    assert file_attrs["user.empty"] == b""
    assert dict(scanned[b"xattrs/tagged-dir"].xattrs)["user.folder"].startswith(b"\x00")


def test_tree_has_modes(scanned: dict[bytes, Entry]) -> None:
    assert scanned[b"modes/no-access"].mode == (0 if IS_ROOT else 0o400)
    assert scanned[b"modes/private-dir"].mode == 0o700
    assert scanned[b"modes/setgid-sticky-dir"].mode == stat.S_ISGID | stat.S_ISVTX | 0o775
    assert scanned[b"modes/setuid-exec"].mode == stat.S_ISUID | 0o755


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="foreign owners need root")
def test_tree_has_foreign_owners(scanned: dict[bytes, Entry]) -> None:
    assert (scanned[b"owners/other-owner"].uid, scanned[b"owners/other-owner"].gid) == (
        OTHER_UID,
        OTHER_GID,
    )
    assert scanned[b"owners/other-symlink"].uid == OTHER_UID
    assert scanned[b"owners/other-group-only"].uid == 0


def test_tree_is_deep_and_wide(scanned: dict[bytes, Entry]) -> None:
    bottom = b"deep/" + b"d/" * DEEP_LEVELS + b"bottom"
    assert scanned[bottom].kind == "file"
    wide = [rel for rel in scanned if rel.startswith(b"wide/")]
    assert len(wide) == WIDE_ENTRIES


def test_mtimes_are_distinct_with_nanoseconds(scanned: dict[bytes, Entry]) -> None:
    by_inode = {e.links or rel: e.mtime_ns for rel, e in scanned.items()}
    assert len(set(by_inode.values())) == len(by_inode)
    with_ns = [t for t in by_inode.values() if t % 10**9]
    assert len(with_ns) >= len(by_inode) - 1  # one file keeps a whole-second time on purpose
    assert scanned[b"times/before-epoch"].mtime_ns < 0


# The comparator must be able to fail: copy a small part of the tree with cp -a (which keeps hardlinks,
# xattrs, modes and nanosecond times), check that the copy compares equal, then break one thing.

COPIED = ("text", "modes", "xattrs", "hardlinks", "hardlinks-elsewhere", "links", "special")


@pytest.fixture
def pair(tricky_tree: Path, tmp_path: Path) -> tuple[Path, Path]:
    a = tmp_path / "a"
    a.mkdir()
    subprocess.run(["cp", "-a", *(str(tricky_tree / d) for d in COPIED), str(a)], check=True)
    b = tmp_path / "b"
    subprocess.run(["cp", "-a", str(a), str(b)], check=True)
    assert compare_trees(a, b, owners=True) == []
    return a, b


def _keep_mtime(path: Path):
    st = os.lstat(path)
    return lambda: os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _flip_byte(b: Path) -> None:
    path = b / "text/lines.txt"
    restore = _keep_mtime(path)
    with open(path, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    restore()


def _chmod(b: Path) -> None:
    os.chmod(b / "modes/executable", 0o744)


def _touch_file(b: Path) -> None:
    st = os.stat(b / "text/hello.txt")
    os.utime(b / "text/hello.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 1))


def _touch_dir(b: Path) -> None:
    st = os.stat(b / "xattrs")
    os.utime(b / "xattrs", ns=(st.st_atime_ns, st.st_mtime_ns - 1))


def _touch_symlink(b: Path) -> None:
    path = b / "links/relative"
    st = os.lstat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9), follow_symlinks=False)


def _drop_xattr(b: Path) -> None:
    os.removexattr(b / "xattrs/tagged-file", "user.binary")


def _drop_dir_xattr(b: Path) -> None:
    os.removexattr(b / "xattrs/tagged-dir", "user.folder")
    _keep_mtime(b / "xattrs/tagged-dir")()


def _break_hardlink(b: Path) -> None:
    # Same content, mode and time, but its own inode: only the group membership differs.
    path = b / "hardlinks-elsewhere/third"
    parent = _keep_mtime(path.parent)
    st = os.stat(path)
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)
    os.chmod(path, stat.S_IMODE(st.st_mode))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    parent()


def _retarget_symlink(b: Path) -> None:
    path = b / "links/dangling"
    parent = _keep_mtime(path.parent)
    st = os.lstat(path)
    path.unlink()
    os.symlink("does/not/exist/either", path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    parent()


def _remove_file(b: Path) -> None:
    parent = _keep_mtime(b / "text")
    (b / "text/crlf.txt").unlink()
    parent()


def _fifo_to_file(b: Path) -> None:
    path = b / "special/fifo"
    parent = _keep_mtime(path.parent)
    path.unlink()
    path.write_bytes(b"")
    parent()


def _chown(b: Path) -> None:
    os.lchown(b / "links/absolute", 4321, 8765)


BREAKAGES = {
    "changed byte": (_flip_byte, ["'text/lines.txt': content sha256"]),
    "changed mode": (_chmod, ["'modes/executable': mode '0o755' != '0o744'"]),
    "changed file mtime": (_touch_file, ["'text/hello.txt': mtime"]),
    "changed folder mtime": (_touch_dir, ["'xattrs': mtime"]),
    "changed symlink mtime": (_touch_symlink, ["'links/relative': mtime"]),
    "missing file xattr": (_drop_xattr, ["'xattrs/tagged-file': xattrs"]),
    "missing folder xattr": (_drop_dir_xattr, ["'xattrs/tagged-dir': xattrs"]),
    "broken hardlink group": (
        _break_hardlink,
        [
            "'hardlinks-elsewhere/third': hardlink group",
            "'hardlinks/first': hardlink group",
            "'hardlinks/second': hardlink group",
        ],
    ),
    "changed symlink target": (_retarget_symlink, ["'links/dangling': symlink target"]),
    "missing file": (_remove_file, ["'text/crlf.txt': only in the first tree (file)"]),
    "changed type": (_fifo_to_file, ["'special/fifo': type fifo != file"]),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_compare_trees_reports(pair: tuple[Path, Path], breakage: str) -> None:
    a, b = pair
    damage, expected = BREAKAGES[breakage]
    damage(b)
    diffs = compare_trees(a, b, owners=True)
    assert len(diffs) == len(expected), diffs
    for diff, prefix in zip(diffs, expected, strict=True):
        assert diff.startswith(prefix), diffs
    with pytest.raises(AssertionError, match="differences"):
        assert_same_tree(a, b, owners=True)


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="changing owners needs root")
def test_compare_trees_reports_owners_only_when_asked(pair: tuple[Path, Path]) -> None:
    a, b = pair
    _chown(b)
    assert compare_trees(a, b, owners=False) == []
    (diff,) = compare_trees(a, b, owners=True)
    assert diff.startswith("'links/absolute': owner uid:gid '0:0' != '4321:8765'")


@pytest.mark.parametrize(
    ("damage", "option"),
    [
        (_touch_file, {"times": False}),
        (_touch_dir, {"times": False}),
        (_touch_dir, {"dir_times": False}),
        (_touch_symlink, {"symlink_times": False}),
        (_drop_xattr, {"xattrs": False}),
        (_break_hardlink, {"hardlinks": False}),
    ],
)
def test_compare_trees_options_ignore(pair: tuple[Path, Path], damage, option: dict) -> None:
    a, b = pair
    damage(b)
    assert compare_trees(a, b, owners=True) != []
    assert compare_trees(a, b, owners=True, **option) == []


def test_dir_times_flag_keeps_file_times(pair: tuple[Path, Path]) -> None:
    a, b = pair
    _touch_file(b)
    assert compare_trees(a, b, owners=True, dir_times=False, symlink_times=False) != []


def test_scan_does_not_follow_symlinks(tricky_tree: Path) -> None:
    scanned = scan_tree(tricky_tree / "links")
    assert {e.kind for e in scanned.values()} == {"symlink"}


def test_make_tricky_tree_refuses_a_full_folder(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("occupied")
    with pytest.raises(FileExistsError):
        make_tricky_tree(tmp_path)


def test_copytree_hint_keeps_symlinks(tricky_tree: Path, tmp_path: Path) -> None:
    # conftest.py tells tests to copy session trees with copytree(symlinks=True); make sure that works
    # on the tree (dangling links and loops included).
    shutil.copytree(tricky_tree / "links", tmp_path / "links", symlinks=True)
    assert scan_tree(tmp_path / "links").keys() == scan_tree(tricky_tree / "links").keys()
