"""Repository: open/init, blob save/load through packs and index, unpacked files, locks. Real local vaults."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from tests.helpers.restic import Restic
from vaultfs.backend import LocalBackend
from vaultfs.errors import IntegrityError, NoVault, ObjectNotFound, VaultLocked, WrongPassword
from vaultfs.format.gojson import GoTime
from vaultfs.format.pack import DATA, TREE, decode_header, header_length_from_tail
from vaultfs.format.snapshot import Snapshot
from vaultfs.format.tree import GO_DIR, Node
from vaultfs.repo import locks
from vaultfs.repo.repository import Repository


def make(tmp_path, version=2) -> Repository:
    repo = Repository.init(LocalBackend(str(tmp_path / "vault")), b"pw", version=version)
    repo.load_index()
    return repo


def reopen(repo: Repository) -> Repository:
    again = Repository.open(LocalBackend(repo.backend.root), b"pw")
    again.load_index()
    return again


def test_open_errors(tmp_path):
    with pytest.raises(NoVault):
        Repository.open(LocalBackend(str(tmp_path / "none")), b"pw")
    repo = make(tmp_path)
    with pytest.raises(WrongPassword):
        Repository.open(LocalBackend(repo.backend.root), b"nope")
    second = repo.add_key(b"other")
    opened = Repository.open(LocalBackend(repo.backend.root), b"other")
    assert opened.key_id == second and opened.key == repo.key and opened.config == repo.config


@pytest.mark.parametrize("version", [1, 2])
def test_blobs_roundtrip_through_packs_and_index(tmp_path, version):
    repo = make(tmp_path, version)
    repo.pack_size = 4 * 1024 * 1024
    blobs = [os.urandom(300_000) for _ in range(30)] + [b"a" * 1_000_000]
    ids = [repo.save_blob(DATA, b)[0] for b in blobs]
    assert repo.save_blob(DATA, blobs[0]) == (ids[0], False)  # dedup
    leaf = Node(
        name="f",
        type="file",
        mtime=GoTime(10**18),
        atime=GoTime(10**18),
        ctime=GoTime(10**18),
        size=3,
        content=ids[:2],
    )
    tree_id = repo.save_tree([leaf])
    repo.flush()
    again = reopen(repo)
    for blob_id, data in zip(ids, blobs, strict=True):
        assert again.load_blob(DATA, blob_id) == data
    assert again.load_tree(tree_id)[0].content == ids[:2]
    # data and trees never share a pack; packs are near the target size
    packs = {}
    for name, size in again.backend.list("data"):
        raw = again.backend.read("data", name)
        hlen = header_length_from_tail(raw[-4:], size)
        header = decode_header(again.key.open(raw[-4 - hlen : -4]), version)
        packs[name] = {b.blob_type for b in header}
        assert hashlib.sha256(raw).hexdigest() == name
        if version == 2 and TREE in packs[name]:
            assert all(b.compressed for b in header)
        if version == 1:
            assert not any(b.compressed for b in header)
    assert all(len(types) == 1 for types in packs.values())
    assert len(packs) >= 3
    snap = Snapshot(GoTime.now(), tree_id, ["/x"], hostname="h")
    again.save_snapshot(snap)
    Restic(repo.backend.root, "pw").run("check", "--read-data")


def test_restic_reads_a_tree_we_wrote(tmp_path):
    repo = make(tmp_path)
    data_id, _ = repo.save_blob(DATA, b"hello restic\n")
    t = GoTime.local(1_700_000_000_000_000_000)
    file_node = Node(
        name="hello.txt",
        type="file",
        mode=0o644,
        mtime=t,
        atime=t,
        ctime=t,
        uid=0,
        gid=0,
        size=13,
        links=1,
        content=[data_id],
    )
    root = Node(
        name="dir",
        type="dir",
        mode=GO_DIR | 0o755,
        mtime=t,
        atime=t,
        ctime=t,
        subtree=repo.save_tree([file_node]),
    )
    snap_id = repo.save_snapshot(
        Snapshot(GoTime.now(), repo.save_tree([root]), ["/dir"], hostname="h")
    )
    repo.flush()
    r = Restic(repo.backend.root, "pw")
    r.run("check", "--read-data")
    out = r.run("dump", snap_id, "/dir/hello.txt").stdout
    assert out == "hello restic\n"


def test_corrupt_blob_is_detected_and_named(tmp_path):
    repo = make(tmp_path, 1)
    blob_id, _ = repo.save_blob(DATA, b"precious" * 1000)
    repo.flush()
    loc = repo.index.lookup(blob_id)
    path = repo.backend.path("data", loc.pack_id.hex())
    os.chmod(path, 0o600)
    raw = bytearray(Path(path).read_bytes())
    raw[loc.offset + 100] ^= 4
    Path(path).write_bytes(raw)
    with pytest.raises(IntegrityError, match=loc.pack_id.hex()):
        reopen(repo).load_blob(DATA, blob_id)
    with pytest.raises(ObjectNotFound):
        repo.load_blob(DATA, b"\0" * 32)


def test_unpacked_files_are_checked_against_their_names(tmp_path):
    repo = make(tmp_path)
    name = repo.save_unpacked("snapshots", b'{"a":1}')
    assert repo.load_unpacked("snapshots", name) == b'{"a":1}'
    path = repo.backend.path("snapshots", name)
    os.chmod(path, 0o600)
    raw = bytearray(Path(path).read_bytes())
    raw[-1] ^= 1
    Path(path).write_bytes(raw)
    with pytest.raises(IntegrityError, match=f"snapshots/{name}"):
        repo.load_unpacked("snapshots", name)


def test_concurrent_blob_saves(tmp_path):
    repo = make(tmp_path)
    repo.pack_size = 4 * 1024 * 1024
    blobs = [os.urandom(100_000) for _ in range(120)]

    def work(part):
        for b in part:
            repo.save_blob(DATA, b)

    threads = [threading.Thread(target=work, args=(blobs[i::3] + blobs[:10],)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    repo.flush()
    again = reopen(repo)
    assert len(again.index) == 120
    for b in blobs:
        assert again.load_blob(DATA, hashlib.sha256(b).digest()) == b


def test_locks_follow_restics_rules(tmp_path):
    repo = make(tmp_path)
    a = repo.lock(exclusive=False)
    b = repo.lock(exclusive=False)  # shared + shared is fine
    with pytest.raises(VaultLocked):
        repo.lock(exclusive=True)
    a.release()
    b.release()
    ex = repo.lock(exclusive=True)
    with pytest.raises(VaultLocked):
        repo.lock(exclusive=False)
    old = ex.name
    ex.refresh()  # refresh writes a new lock file and removes the old one
    names = [n for n, _ in repo.backend.list("locks")]
    assert names == [ex.name] and ex.name != old
    ex.release()
    assert list(repo.backend.list("locks")) == []


def test_stale_locks(tmp_path):
    repo = make(tmp_path)
    from vaultfs.format.lock import Lock

    old = Lock(GoTime(GoTime.now().ns - 31 * 60 * 10**9), True, "elsewhere", "u", 1)
    fresh = Lock(GoTime.now(), False, "elsewhere", "u", 1)
    dead = Lock(GoTime.now(), True, locks.hostname(), "u", 2**22 + 999)
    for lock in (old, fresh, dead):
        repo.save_unpacked("locks", lock.encode())
    infos = {i.lock.hostname + str(i.lock.exclusive): i for i in repo.locks.list_locks()}
    assert infos["elsewhereTrue"].stale() and not infos["elsewhereFalse"].stale()
    assert infos[locks.hostname() + "True"].stale()
    # the old exclusive lock from another host still blocks (restic's rule); the dead local one does not
    with pytest.raises(VaultLocked, match="elsewhere"):
        repo.lock(exclusive=False)
    repo.locks.remove_stale()  # the old lock; the dead local one may already be gone (see next check)
    assert {i.lock.hostname for i in repo.locks.list_locks()} == {"elsewhere"}
    assert not any(i.lock.exclusive for i in repo.locks.list_locks())
    repo.save_unpacked("locks", dead.encode())
    repo.lock(exclusive=False).release()
    assert len(repo.locks.list_locks()) == 1, "the dead local lock is removed on the way"
    with pytest.raises(VaultLocked):
        repo.lock(exclusive=True)  # the fresh shared lock of another host
