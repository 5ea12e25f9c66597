"""vault backup as a library (vaultfs/ops/backup.py) on real vaults in temp folders: content and metadata
in the snapshot, the layout of targets, change detection, the unchanged-tree shortcut, excludes, dry runs,
snapshot fields, parent selection and index writes during long backups.

Byte-identity with restic's trees, restic check and restic restore are in
tests/interop/test_backup_interop.py; the CLI, interruptions and concurrency in test_backup_cli.py.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from vaultfs.backend import LocalBackend
from vaultfs.errors import NotFoundError, UsageError
from vaultfs.format.gojson import GoTime
from vaultfs.format.pack import DATA
from vaultfs.format.tree import Node, fs_bytes
from vaultfs.ops.backup import LockGate, backup
from vaultfs.ops.scan import OwnerNames, node_from_stat
from vaultfs.repo.repository import Repository

ROOT = os.geteuid() == 0


def make_vault(path: Path, version: int = 2) -> Repository:
    repo = Repository.init(LocalBackend(str(path)), b"pw", version=version)
    repo.load_index()
    return repo


def reopen(path: Path) -> Repository:
    repo = Repository.open(LocalBackend(str(path)), b"pw")
    repo.load_index()
    return repo


def entries(repo: Repository, snap_id: str) -> dict[str, Node]:
    return dict(repo.walk(repo.load_snapshot(snap_id).tree))


def content_of(repo: Repository, node: Node) -> bytes:
    return b"".join(repo.load_blob(DATA, blob_id) for blob_id in node.content or [])


def rand(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture
def src(tmp_path) -> Path:
    """A small tree of every kind of entry, with files around the chunker's limits."""
    root = tmp_path / "src"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "empty").write_bytes(b"")
    (root / "small.txt").write_bytes(b"hello\n" * 100)
    (root / "sub" / "big.bin").write_bytes(rand(1, 9 * 1024 * 1024 + 17))
    (root / "sub" / "deeper" / "copy.bin").write_bytes(rand(1, 9 * 1024 * 1024 + 17))
    (root / "sub" / "min.bin").write_bytes(rand(2, 512 * 1024))
    os.link(root / "small.txt", root / "sub" / "hardlink.txt")
    os.symlink("sub/big.bin", root / "link")
    os.symlink("/nonexistent/target", root / "dangling")
    os.mkfifo(root / "fifo")
    (root / "exec.sh").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "exec.sh", 0o4755)
    try:
        os.setxattr(root / "small.txt", "user.note", b"\x00binary\xff")
    except OSError:
        pass
    os.utime(root / "small.txt", ns=(1, 1_234_567_890_123_456_789))
    return root


def test_snapshot_holds_content_and_metadata(tmp_path, src, monkeypatch):
    repo = make_vault(tmp_path / "vault")
    monkeypatch.chdir(src)
    report = backup(repo, ["."])
    assert report.ok and report.snapshot_id
    assert report.files_new == 7 and report.files_changed == report.files_unmodified == 0
    snap = reopen(tmp_path / "vault")
    got = entries(snap, report.snapshot_id)
    expected = {}
    owners = OwnerNames()
    for dirpath, dirnames, filenames in os.walk(src):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            expected[os.path.relpath(path, src)] = path
    assert set(got) == set(expected)
    for rel, path in expected.items():
        node = got[rel]
        raw = os.fsencode(path)
        want = node_from_stat(node.name, raw, os.lstat(raw), owners)
        if want.type == "file":
            assert content_of(snap, node) == Path(path).read_bytes(), rel
            want.content = node.content
        if want.type == "dir":
            want.subtree = node.subtree
        assert node.encode() == want.encode(), rel
    # the two equal 9 MiB files share their chunks (more than the largest chunk: at least two)
    assert got["sub/big.bin"].content == got["sub/deeper/copy.bin"].content
    assert len(got["sub/big.bin"].content) >= 2
    assert got["empty"].content == [] and got["fifo"].content is None


@pytest.mark.parametrize("version", [1, 2])
def test_vault_versions_store_blobs_as_restic_does(tmp_path, src, version):
    repo = make_vault(tmp_path / "vault", version)
    report = backup(repo, [str(src)])
    snap = reopen(tmp_path / "vault")
    blobs = list(snap.index.iter_blobs())
    assert blobs and report.data_blobs == sum(1 for b in blobs if b.blob_type == DATA)
    compressed = {b.uncompressed_length > 0 for b in blobs}
    assert compressed == ({True} if version == 2 else {False})


def _tree_names(repo: Repository, snap_id: str) -> set[str]:
    return {path for path, _ in repo.walk(repo.load_snapshot(snap_id).tree)}


def test_absolute_target_keeps_its_full_path(tmp_path, src):
    repo = make_vault(tmp_path / "vault")
    report = backup(repo, [str(src / "sub")])
    names = _tree_names(repo, report.snapshot_id)
    parts = str(src / "sub").strip("/").split("/")
    for i in range(1, len(parts) + 1):
        assert "/".join(parts[:i]) in names
    top = repo.load_tree(repo.load_snapshot(report.snapshot_id).tree)
    assert [n.name for n in top] == [parts[0]]
    # intermediate folders carry their own metadata
    first = top[0]
    assert first.type == "dir" and first.inode == os.stat("/" + parts[0]).st_ino
    assert repo.load_snapshot(report.snapshot_id).paths == [str(src / "sub")]


def test_relative_targets_and_name_clashes(tmp_path, monkeypatch):
    work = tmp_path / "w"
    (work / "a" / "x").mkdir(parents=True)
    (work / "a" / "x" / "f").write_bytes(b"1")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "g").write_bytes(b"2")
    (work / "z").write_bytes(b"3")
    monkeypatch.chdir(work)
    repo = make_vault(tmp_path / "vault")
    report = backup(repo, ["a/x", "../x", "z", "./z"])
    names = _tree_names(repo, report.snapshot_id)
    # "a/x" keeps its folder a; "../x" loses the ".." and clashes with nothing at the top; "./z" is "z"
    assert names == {"a", "a/x", "a/x/f", "x", "x/g", "z"}
    (work / "x").mkdir()
    (work / "x" / "h").write_bytes(b"4")
    report = backup(repo, ["x", "../x"])  # same name, different folders: the second becomes x-1
    assert not report.errors
    assert _tree_names(repo, report.snapshot_id) == {"x", "x/h", "x-1", "x-1/g"}
    assert repo.load_snapshot(report.snapshot_id).paths == [str(work / "x"), str(tmp_path / "x")]


def test_nested_targets_merge(tmp_path, src):
    repo = make_vault(tmp_path / "vault")
    report = backup(repo, [str(src / "sub" / "deeper"), str(src)])
    prefix = str(src).strip("/")
    names = {n[len(prefix) + 1 :] for n in _tree_names(repo, report.snapshot_id) if n != prefix}
    names.discard("")
    assert {"sub/deeper/copy.bin", "small.txt", "sub/big.bin"} <= names


def test_missing_target_is_a_problem_not_a_failure(tmp_path, src):
    repo = make_vault(tmp_path / "vault")
    report = backup(repo, [str(src / "small.txt"), str(src / "missing")])
    assert [p.path for p in report.errors] == [str(src / "missing")]
    assert report.snapshot_id
    with pytest.raises(UsageError, match="nothing to back up"):
        backup(repo, [str(src / "missing")])


def test_second_backup_reads_and_stores_nothing(tmp_path, src, monkeypatch):
    repo = make_vault(tmp_path / "vault")
    monkeypatch.chdir(src)
    first = backup(repo, ["."])
    packs = set(repo.backend.list("data"))
    second = backup(repo, ["."])
    assert second.parent_id == first.snapshot_id
    assert second.files_unmodified == 7 and second.files_new == second.files_changed == 0
    assert second.data_blobs == second.tree_blobs == second.data_added == 0
    assert set(repo.backend.list("data")) == packs  # not even a tree pack
    assert repo.load_snapshot(second.snapshot_id).tree == repo.load_snapshot(first.snapshot_id).tree


def _backup_pair(repo: Repository, target: str) -> tuple[bytes, bytes, object]:
    """Tree with change detection (and its report), and tree of a --force backup."""
    with_parent = backup(repo, [target])
    forced = backup(repo, [target], force=True)
    return (
        repo.load_snapshot(with_parent.snapshot_id).tree,
        repo.load_snapshot(forced.snapshot_id).tree,
        with_parent,
    )


def test_change_detection_follows_restic(tmp_path, src, monkeypatch):
    repo = make_vault(tmp_path / "vault")
    monkeypatch.chdir(src)
    backup(repo, ["."])
    f = src / "small.txt"
    st = os.stat(f)
    # same size, same mtime, new content: only the ctime tells, and restic's rule reads it again
    f.write_bytes(b"HELLO\n" * 100)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    tree, forced, report = _backup_pair(repo, ".")
    assert report.files_changed == 2  # small.txt and its hardlink
    assert tree == forced
    node = entries(repo, report.snapshot_id)["small.txt"]
    assert content_of(repo, node) == b"HELLO\n" * 100
    # reading a file (atime only) changes nothing
    (src / "sub" / "big.bin").read_bytes()
    tree, forced, report = _backup_pair(repo, ".")
    assert report.files_unmodified == 7 and tree == forced
    # a new inode with the same content, size and times is read again
    data = (src / "empty").read_bytes()
    (src / "empty").unlink()
    (src / "empty").write_bytes(data)
    tree, forced, report = _backup_pair(repo, ".")
    assert report.files_changed == 1 and report.data_blobs == 0 and tree == forced


def test_unchanged_tree_shortcut_never_keeps_a_stale_tree(tmp_path, src, monkeypatch):
    """Each metadata change below must show in the tree, exactly as a backup without parent has it."""
    repo = make_vault(tmp_path / "vault")
    monkeypatch.chdir(src)
    backup(repo, ["."])
    changes = [
        lambda: os.chmod(src / "exec.sh", 0o755),
        lambda: os.utime(src / "sub", ns=(0, 10**18)),
        lambda: os.rename(src / "empty", src / "empty2"),
        lambda: (src / "empty-dir" / "new").write_bytes(b""),
        lambda: os.unlink(src / "sub" / "hardlink.txt"),  # the other name's link count drops
        lambda: os.symlink("elsewhere", src / "link2"),
        lambda: (os.unlink(src / "link"), os.symlink("other", src / "link")),
        lambda: shutil.rmtree(src / "sub" / "deeper"),
    ]
    if ROOT:
        changes.append(lambda: os.chown(src / "small.txt", 4321, 4321))
    try:
        os.setxattr(src / "sub" / "min.bin", "user.x", b"1")
        changes.append(lambda: os.setxattr(src / "sub" / "min.bin", "user.x", b"2"))
        changes.append(lambda: os.setxattr(src / "sub", "user.dir", b"d"))
    except OSError:
        pass
    previous = None
    for change in changes:
        change()
        tree, forced, _report = _backup_pair(repo, ".")
        assert tree == forced
        assert tree != previous
        previous = tree


def test_excludes(tmp_path, src):
    repo = make_vault(tmp_path / "vault")
    excl = tmp_path / "excl"
    excl.write_text("# comment\n*.bin\n!min.bin\n")
    report = backup(repo, [str(src)], excludes=["deeper", "/nonexistent"], exclude_files=[excl])
    prefix = str(src).strip("/") + "/"
    names = {
        n[len(prefix) :] for n in _tree_names(repo, report.snapshot_id) if n.startswith(prefix)
    }
    assert "sub/min.bin" in names and "sub/big.bin" not in names
    assert not any("deeper" in n for n in names)
    assert "small.txt" in names
    snap = repo.load_snapshot(report.snapshot_id)
    assert snap.excludes == ["deeper", "/nonexistent"]  # as restic: only --exclude patterns
    with pytest.raises(UsageError):
        backup(repo, [str(src)], excludes=["["])


@pytest.mark.skipif(not ROOT, reason="mounting a tmpfs needs root")
def test_one_file_system_keeps_mount_points_empty(tmp_path, src):
    mnt = src / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "none", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mnt / "inside").write_bytes(b"on another file system")
        repo = make_vault(tmp_path / "vault")
        prefix = str(src).strip("/") + "/"
        report = backup(repo, [str(src)], one_file_system=True)
        names = {n[len(prefix) :] for n in _tree_names(repo, report.snapshot_id)}
        assert "mnt" in names and "mnt/inside" not in names and "small.txt" in names
        report = backup(repo, [str(src)])
        names = {n[len(prefix) :] for n in _tree_names(repo, report.snapshot_id)}
        assert "mnt/inside" in names
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_dry_run_writes_nothing(tmp_path, src):
    repo = make_vault(tmp_path / "vault")
    before = {kind: set(repo.backend.list(kind)) for kind in ("data", "index", "snapshots")}
    report = backup(repo, [str(src)], dry_run=True)
    assert report.dry_run and not report.snapshot_id
    assert report.files_new == 7 and report.data_added > 3 * 1024 * 1024
    assert {kind: set(repo.backend.list(kind)) for kind in before} == before


def test_snapshot_fields(tmp_path, src):
    repo = make_vault(tmp_path / "vault")
    when = GoTime(1_700_000_000_000_000_000, 3600)
    report = backup(
        repo,
        [str(src / "sub"), str(src / "small.txt")],
        tags=["a,b", "c", " d "],
        host="elsewhere",
        snapshot_time=when,
    )
    snap = repo.load_snapshot(report.snapshot_id)
    assert snap.tags == ["a", "b", "c", "d"]
    assert snap.hostname == "elsewhere" and snap.time == when
    assert snap.paths == [str(src / "sub"), str(src / "small.txt")]
    assert snap.parent is None and snap.uid == os.getuid() and snap.gid == os.getgid()
    assert snap.username and not snap.excludes


def test_parent_selection(tmp_path, src):
    repo = make_vault(tmp_path / "vault")
    t = 1_700_000_000_000_000_000
    a = backup(repo, [str(src)], host="h1", snapshot_time=GoTime(t))
    # another host, other paths, or a later time do not count
    assert backup(repo, [str(src)], host="h2", snapshot_time=GoTime(t + 1)).parent_id == ""
    assert backup(repo, [str(src / "sub")], host="h1", snapshot_time=GoTime(t + 2)).parent_id == ""
    assert backup(repo, [str(src)], host="h1", snapshot_time=GoTime(t - 1)).parent_id == ""
    # a snapshot of more paths than this backup's may be the parent (restic: all paths included)
    b = backup(repo, [str(src), str(tmp_path / "vault")], host="h1", snapshot_time=GoTime(t + 3))
    assert b.parent_id == ""
    c = backup(repo, [str(src)], host="h1", snapshot_time=GoTime(t + 4))
    assert c.parent_id == b.snapshot_id
    # explicit parent and force
    assert backup(repo, [str(src)], host="h1", parent=a.snapshot_id[:8]).parent_id == a.snapshot_id
    forced = backup(repo, [str(src)], host="h1", force=True)
    assert forced.parent_id == "" and forced.files_new == 7
    with pytest.raises(NotFoundError):
        backup(repo, [str(src)], parent="ffffffff")


def test_lock_gate_holds_writes_until_the_lock_is_taken(tmp_path, src):
    repo = make_vault(tmp_path / "vault")
    gate = LockGate(lambda: repo.lock(exclusive=False))
    try:
        report = backup(repo, [str(src)], gate=gate)
    finally:
        gate.release()
    assert report.snapshot_id and not list(repo.backend.list("locks"))
    held = repo.lock(exclusive=True)
    try:
        gate = LockGate(lambda: repo.lock(exclusive=False))
        with pytest.raises(Exception, match="locked"):
            backup(repo, [str(src)], gate=gate, force=True)
        gate.release()
        assert len(list(repo.backend.list("snapshots"))) == 1
    finally:
        held.release()


def test_index_is_written_during_long_backups(tmp_path):
    """With a short interval each finished pack is indexed at once, so a killed backup's packs are
    known to the next one (see test_backup_cli.py for the kill)."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        (data / f"f{i}").write_bytes(rand(10 + i, 6 * 1024 * 1024))
    repo = make_vault(tmp_path / "vault")
    backup(repo, [str(data)], index_interval=0.0)
    packs = list(repo.backend.list("data"))
    indexes = list(repo.backend.list("index"))
    assert len(packs) >= 3 and len(indexes) >= 2


def test_content_survives_many_workers_and_small_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    want = {}
    for i in range(300):
        body = rand(i, (i * 977) % 20000) if i % 3 else b"same small file\n"
        (data / f"f{i:03d}").write_bytes(body)
        want[f"f{i:03d}"] = hashlib.sha256(body).hexdigest()
    (data / "big").write_bytes(rand(999, 20 * 1024 * 1024 + 5))
    want["big"] = hashlib.sha256((data / "big").read_bytes()).hexdigest()
    repo = make_vault(tmp_path / "vault")
    report = backup(repo, [str(data)], readers=3, workers=3)
    got = {
        path.rsplit("/", 1)[1]: hashlib.sha256(content_of(repo, node)).hexdigest()
        for path, node in entries(repo, report.snapshot_id).items()
        if node.type == "file"
    }
    assert got == want
    for path, node in entries(repo, report.snapshot_id).items():
        if node.type == "file":
            assert node.size == os.lstat(os.path.join("/", path)).st_size


def test_names_that_are_not_utf8(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    raw = os.fsencode(data) + b'/caf\xe9 \n\\"x'
    with open(raw, "wb") as f:
        f.write(b"odd")
    repo = make_vault(tmp_path / "vault")
    report = backup(repo, [str(data)])
    node = next(n for p, n in entries(repo, report.snapshot_id).items() if p.endswith("x"))
    assert fs_bytes(node.name) == b'caf\xe9 \n\\"x' and content_of(repo, node) == b"odd"
    assert stat.S_ISREG(os.lstat(raw).st_mode)


@pytest.mark.parametrize("room", ["enough", "short"])
def test_batched_c_reads_record_what_the_python_path_records(tmp_path, monkeypatch, room):
    """Small files go through vaultfs.ops._files in batches; the snapshot must be byte for byte the one
    the file-by-file Python path makes (same trees, so the same root tree ID). With a batch buffer too
    short for most files (as when files grow after the folder was listed) those come back open and
    take the chunking path: the same trees again."""
    import vaultfs.ops.backup as backup_module

    if room == "short":
        monkeypatch.setattr(backup_module, "BATCH_BUFFER", 6000)

    root = tmp_path / "many"
    for d in range(3):
        (root / f"d{d}").mkdir(parents=True)
        for i in range(70):
            f = root / f"d{d}" / f"f{i:03d}"
            f.write_bytes(rand(d * 1000 + i, random.Random(i).choice([0, 1, 100, 5000, 70_000])))
            if i % 9 == 0:
                try:
                    os.setxattr(f, "user.i", str(i).encode())
                except OSError:
                    pass
        os.symlink(f"f{d:03d}", root / f"d{d}" / "link")
    (root / "d0" / "same").write_bytes(rand(5, 100))  # content equal to another file's
    real = backup_module._read_files
    if real is None:
        assert os.environ.get("CI") != "true", "the C small-file reader was not built"
        pytest.skip("vaultfs.ops._files not built")
    calls = []

    statuses = []

    def counting(*args):
        calls.append(len(args[0]))
        results = real(*args)
        statuses.extend(r[0] for r in results)
        return results

    trees = []
    for reader in (counting, None):
        monkeypatch.setattr(backup_module, "_read_files", reader)
        repo = make_vault(tmp_path / f"vault-{len(trees)}")
        report = backup(repo, [str(root)])
        assert report.ok and report.files_new == 3 * 70 + 1
        got = entries(reopen(tmp_path / f"vault-{len(trees)}"), report.snapshot_id)
        # the folders above "many" differ (the first vault is made beside it): compare below it
        (many,) = [node for path, node in got.items() if path.endswith("/many")]
        trees.append(many.subtree)
    assert sum(calls) == 3 * 70 + 1 and len(calls) > 3  # batches, not one file per call
    assert trees[0] is not None and trees[0] == trees[1]
    assert (1 in statuses) == (room == "short")  # 1: handed back open, chunked
