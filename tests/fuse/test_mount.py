"""`vault mount` on real FUSE mounts: what the mount shows must equal restic's own restore of the same
snapshot (and the source tree), damage must cost EIO only where the damaged data is needed, new snapshots
must appear in a live mount, and the process must end cleanly however the mount ends.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.fuse.conftest import DEADLINE, Mounter
from tests.helpers.ci import unavailable
from tests.helpers.damage import flip_blob_byte
from tests.helpers.env import env_for
from tests.helpers.restic import (
    MAIN_HOST,
    OTHER_HOST,
    OTHER_SUBDIR,
    OTHER_TAG,
    Restic,
    ResticRepo,
)
from tests.helpers.trees import assert_same_tree, scan_tree
from tests.server.harness import ServerThread, server_config
from tests.tools.cli import one_line_error, vault
from vaultfs.backend import LocalBackend
from vaultfs.format.pack import DATA
from vaultfs.fuse.layout import time_name
from vaultfs.fuse.reader import UNREADABLE_SECONDS
from vaultfs.repo.repository import Repository

pytestmark = [pytest.mark.fuse, pytest.mark.restic]


@pytest.fixture(params=[1, 2], ids=["restic-v1", "restic-v2"])
def restic_repo(request: pytest.FixtureRequest) -> ResticRepo:
    return request.getfixturevalue(f"restic_repo_v{request.param}")


def copy_repo(repo: ResticRepo, dest: Path) -> Path:
    """A private copy of a session repository, for tests that change it."""
    shutil.copytree(repo.path, dest, symlinks=True)
    return dest


def open_vault(path: Path, password: str) -> Repository:
    repo = Repository.open(LocalBackend(str(path)), password.encode())
    repo.load_index()
    return repo


def read_all(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- what the mount shows --------------------------------------------------------------------------


def test_snapshot_matches_restic_restore_and_source(
    mounter: Mounter, restic_repo: ResticRepo
) -> None:
    m = mounter.mount(restic_repo.path, restic_repo.password, "--no-lock")
    shown = scan_tree(m.mnt / "ids" / restic_repo.snapshot_id[:8])
    # Everything restic restores -- content, modes, owners, times of files, folders and symlinks,
    # xattrs, hardlink groups, fifos, devices -- the mount shows, and so did the source.
    assert_same_tree(restic_repo.restored, shown, owners=True)
    assert_same_tree(restic_repo.source, shown, owners=True)


def test_listings(mounter: Mounter, restic_repo_v2: ResticRepo) -> None:
    repo = restic_repo_v2
    m = mounter.mount(repo.path, repo.password, "--no-lock")
    vault_repo = open_vault(repo.path, repo.password)
    main = time_name(vault_repo.load_snapshot(repo.snapshot_id).time)
    other = time_name(vault_repo.load_snapshot(repo.tagged_snapshot_id).time)
    mnt = m.mnt
    assert sorted(os.listdir(mnt)) == ["hosts", "ids", "snapshots", "tags"]
    assert sorted(os.listdir(mnt / "snapshots")) == sorted([main, other, "latest"])
    # the main snapshot is the newer one, so every "latest" that sees it points to it
    assert os.readlink(mnt / "snapshots" / "latest") == main
    assert sorted(os.listdir(mnt / "hosts")) == sorted([MAIN_HOST, OTHER_HOST])
    assert os.listdir(mnt / "hosts" / OTHER_HOST) == [other, "latest"]
    assert os.listdir(mnt / "tags") == [OTHER_TAG]
    assert os.readlink(mnt / "tags" / OTHER_TAG / "latest") == other
    short = {repo.snapshot_id[:8], repo.tagged_snapshot_id[:8]}
    assert set(os.listdir(mnt / "ids")) == short | {"latest"}
    assert os.readlink(mnt / "ids" / "latest") == repo.snapshot_id[:8]
    assert stat.S_ISLNK(os.lstat(mnt / "ids" / "latest").st_mode)
    # the tagged snapshot holds the text folder only; reached through a symlink it is the same
    assert_same_tree(repo.source / OTHER_SUBDIR, mnt / "tags" / OTHER_TAG / "latest", owners=True)
    # snapshot folders carry the snapshot's time
    assert (
        os.stat(mnt / "snapshots" / main).st_mtime_ns
        == vault_repo.load_snapshot(repo.snapshot_id).time.ns
    )


def test_posix_details(mounter: Mounter, restic_repo_v2: ResticRepo) -> None:
    repo = restic_repo_v2
    m = mounter.mount(repo.path, repo.password, "--no-lock")
    root = m.mnt / "snapshots" / "latest"
    links = [
        root / "hardlinks/first",
        root / "hardlinks/second",
        root / "hardlinks-elsewhere/third",
    ]
    infos = [os.stat(p) for p in links]
    assert len({st.st_ino for st in infos}) == 1
    assert [st.st_nlink for st in infos] == [3, 3, 3]
    assert os.stat(root / "hardlinks/pair-a").st_ino != infos[0].st_ino
    assert os.stat(root / "text/hello.txt").st_nlink == 1
    # resumable readdir: 10,000 names arrive in many kernel-sized pieces, none lost or repeated
    names = os.listdir(root / "wide")
    assert len(names) == len(set(names)) == 10_000
    tagged = root / "xattrs/tagged-file"
    assert os.getxattr(tagged, "user.binary") == bytes(range(256))
    assert os.getxattr(tagged, "user.empty") == b""
    assert sorted(os.listxattr(tagged)) == ["user.binary", "user.comment", "user.empty"]
    with pytest.raises(OSError) as missing:
        os.getxattr(tagged, "user.nothing")
    assert missing.value.errno == errno.ENODATA
    assert os.listxattr(root / "text/hello.txt") == []
    assert stat.S_ISFIFO(os.lstat(root / "special/fifo").st_mode)
    fs = os.statvfs(m.mnt)
    assert fs.f_blocks > 0 and fs.f_bavail == 0
    # read-only all the way down
    with pytest.raises(OSError) as readonly:
        open(root / "text/new-file", "wb")  # noqa: SIM115
    assert readonly.value.errno == errno.EROFS
    # partial reads at odd offsets, across chunk borders of a multi-chunk file
    big = root / "sizes/8388609"
    source = read_all(repo.source / "sizes/8388609")
    with open(big, "rb") as f:
        for offset in (0, 1, 524_287, 4_000_000, 8_388_000):
            f.seek(offset)
            assert f.read(100_000) == source[offset : offset + 100_000]


def test_inodes_forgotten_by_the_kernel_come_back(
    mounter: Mounter, restic_repo_v2: ResticRepo
) -> None:
    if os.geteuid() != 0:
        unavailable("dropping the kernel's dentry and inode caches needs root")
    m = mounter.mount(restic_repo_v2.path, restic_repo_v2.password, "--no-lock")
    root = m.mnt / "snapshots" / "latest"
    first = scan_tree(root)
    numbers = os.stat(root / "hardlinks/first").st_ino
    # The kernel evicts every unused dentry and inode and sends FORGET for them; the mount drops
    # those inodes and must hand out fresh ones (numbers are never reused) for the same entries.
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")
    assert os.stat(root / "hardlinks/first").st_ino != numbers
    assert (
        os.stat(root / "hardlinks-elsewhere/third").st_ino
        == os.stat(root / "hardlinks/first").st_ino
    )
    assert_same_tree(first, scan_tree(root), owners=True)


def test_single_snapshot_folder(mounter: Mounter, restic_repo_v1: ResticRepo) -> None:
    repo = restic_repo_v1
    spec = f"{repo.snapshot_id[:10]}:/{OTHER_SUBDIR}"
    m = mounter.mount(repo.path, repo.password, "--no-lock", "--snapshot", spec)
    assert_same_tree(repo.restored / OTHER_SUBDIR, m.mnt, owners=True)


def test_vault_written_by_vaultfs(mounter: Mounter, tmp_path: Path, tricky_tree: Path) -> None:
    repo = tmp_path / "vault"
    vault("-r", repo, "init")
    subprocess.run(
        [sys.executable, "-m", "vaultfs.tools.main", "-r", str(repo), "backup", "."],
        cwd=tricky_tree,
        env=env_for("pw"),
        check=True,
        capture_output=True,
    )
    m = mounter.mount(repo, "pw")
    assert_same_tree(tricky_tree, m.mnt / "snapshots" / "latest", owners=True)


def test_vault_through_the_bucket_server(
    mounter: Mounter, tmp_path: Path, tricky_tree: Path
) -> None:
    """A remote vault (rest:, issue 7 item 6): folders come from tree packs fetched whole and cached
    (vaultfs/repo/treepacks.py), file data blob by blob over HTTP."""
    server = ServerThread(server_config(str(tmp_path / "server")))
    try:
        location = server.bucket().location
        vault("-r", location, "init")
        subprocess.run(
            [sys.executable, "-m", "vaultfs.tools.main", "-r", location, "backup", "."],
            cwd=tricky_tree,
            env=env_for("pw"),
            check=True,
            capture_output=True,
        )
        m = mounter.mount(location, "pw")  # type: ignore[arg-type]  # a location, not a folder
        assert_same_tree(tricky_tree, m.mnt / "snapshots" / "latest", owners=True)
        m.stop()
        assert "Traceback" not in m.log_path.read_text()
    finally:
        server.stop()


def test_remote_mount_reads_many_small_folders_in_few_requests(
    mounter: Mounter, tmp_path: Path
) -> None:
    """Over rest:, reading a tree of small folders in tar's order fetches the files of the folders
    ahead in a few requests (fs.py _walk_on), not one request per folder; the files read are right."""
    src = tmp_path / "src"
    for top in range(6):
        for sub in range(6):
            folder = src / f"t{top}" / f"s{sub}"
            folder.mkdir(parents=True)
            for k in range(3):
                (folder / f"f{k}.txt").write_bytes(os.urandom(1500))
    server = ServerThread(server_config(str(tmp_path / "server")))
    try:
        creds = server.bucket()
        vault("-r", creds.location, "init")
        vault("-r", creds.location, "backup", src)

        def gets() -> int:
            text = httpx.get(f"{server.url}metrics", timeout=30).text
            found = re.findall(
                rf'vaultfs_requests_total{{bucket="{creds.name}",method="GET",[^}}]*}} (\d+)', text
            )
            return sum(int(n) for n in found)

        m = mounter.mount(creds.location, "pw")  # type: ignore[arg-type]  # a location
        shown = m.mnt / "snapshots" / "latest" / src.relative_to("/")
        assert sorted(os.listdir(shown)) == [f"t{top}" for top in range(6)]
        before = gets()
        # through cat: GNU tar does not read the files when its archive is /dev/null
        subprocess.run("tar -cf - . | cat > /dev/null", shell=True, cwd=shown, check=True)
        folders = 36
        assert gets() - before <= folders // 4, "about one request per folder"
        assert_same_tree(src, shown, owners=True)
        m.stop()
        assert "Traceback" not in m.log_path.read_text()
    finally:
        server.stop()


# -- a live vault ------------------------------------------------------------------------------------


def test_new_snapshot_appears_without_remount(
    mounter: Mounter, restic_repo_v2: ResticRepo, tmp_path: Path
) -> None:
    repo_path = copy_repo(restic_repo_v2, tmp_path / "repo")
    m = mounter.mount(repo_path, restic_repo_v2.password)
    assert len(os.listdir(m.mnt / "ids")) == 3  # two snapshots and latest
    new_src = tmp_path / "new"
    new_src.mkdir()
    (new_src / "fresh.txt").write_bytes(b"written after the mount started\n")
    new_id = Restic(repo_path, restic_repo_v2.password).backup(["."], cwd=new_src, tags=["late"])
    deadline = time.monotonic() + DEADLINE
    while new_id[:8] not in os.listdir(m.mnt / "ids"):
        assert time.monotonic() < deadline, f"new snapshot never appeared:\n{m.log()}"
        time.sleep(0.2)
    assert (
        read_all(m.mnt / "ids" / new_id[:8] / "fresh.txt") == b"written after the mount started\n"
    )
    assert read_all(m.mnt / "tags" / "late" / "latest" / "fresh.txt").startswith(b"written")
    assert os.readlink(m.mnt / "ids" / "latest") == new_id[:8]
    # and a forgotten snapshot goes away (`restic forget` would wait for the mount's shared lock)
    gone = restic_repo_v2.tagged_snapshot_id[:8]
    os.remove(repo_path / "snapshots" / restic_repo_v2.tagged_snapshot_id)
    while gone in os.listdir(m.mnt / "ids"):
        assert time.monotonic() < deadline, f"forgotten snapshot never went away:\n{m.log()}"
        time.sleep(0.2)
    assert not (m.mnt / "tags" / OTHER_TAG).exists()


# -- damage ------------------------------------------------------------------------------------------


def files_with_blobs(repo: Repository, tree: bytes, blobs: set[bytes]) -> set[str]:
    return {
        path
        for path, node in repo.walk(tree)
        if node.type == "file" and blobs & set(node.content or [])
    }


def check_reads(root: Path, source: Path, broken: set[str]) -> None:
    """Every file under ``root`` reads like ``source`` except those in ``broken``, which give EIO."""
    failed = set()
    for path, entry in scan_tree(source).items():
        if entry.kind != "file":
            continue
        rel = os.fsdecode(path)
        try:
            data = read_all(root / rel)
        except OSError as exc:
            assert exc.errno == errno.EIO, (rel, exc)
            failed.add(rel)
            continue
        assert data == read_all(source / rel), rel
    assert failed == broken


def test_damaged_blob_gives_eio_only_where_needed(
    mounter: Mounter, restic_repo_v2: ResticRepo, tmp_path: Path
) -> None:
    repo_path = copy_repo(restic_repo_v2, tmp_path / "repo")
    vr = open_vault(repo_path, restic_repo_v2.password)
    snap = vr.load_snapshot(restic_repo_v2.snapshot_id)
    victim = vr.find_path(snap.tree, "text/lines.txt")
    assert victim is not None and victim.content
    loc = vr.index.lookup(victim.content[0], DATA)
    assert loc is not None
    flip_blob_byte(vr, loc)
    broken = files_with_blobs(vr, snap.tree, {victim.content[0]})
    assert broken == {"text/lines.txt"}
    m = mounter.mount(repo_path, restic_repo_v2.password)
    root = m.mnt / "ids" / restic_repo_v2.snapshot_id[:8]
    # other blobs of the same pack still read: only the damaged blob's own byte range is fetched
    check_reads(root, restic_repo_v2.source, broken)
    for _ in range(3):
        with pytest.raises(OSError):
            read_all(root / "text/lines.txt")
    # the error is logged once, naming the file and the pack
    lines = [ln for ln in m.log().splitlines() if loc.pack_id.hex() in ln]
    assert len(lines) == 1, m.log()
    assert "text/lines.txt" in lines[0]


@pytest.mark.parametrize("damage", ["flipped byte", "resealed other content"])
def test_damaged_large_blob_gives_eio_for_its_range_only(
    mounter: Mounter, restic_repo: ResticRepo, tmp_path: Path, damage: str
) -> None:
    """Large blobs are decoded in pieces (reader.py): a bad tag, and content that authenticates but
    does not match the blob ID (sealed again with the vault's own key), must still give EIO."""
    repo_path = copy_repo(restic_repo, tmp_path / "repo")
    vr = open_vault(repo_path, restic_repo.password)
    snap = vr.load_snapshot(restic_repo.snapshot_id)
    big = vr.find_path(snap.tree, "sizes/8388609")
    assert big is not None and big.content and len(big.content) > 1
    victim = big.content[0]
    loc = vr.index.lookup(victim, DATA)
    assert loc is not None and loc.length >= 256 * 1024
    pack = Path(vr.backend.path("data", loc.pack_id.hex()))
    sealed = vr.backend.read("data", loc.pack_id.hex(), loc.offset, loc.length)
    if damage == "flipped byte":
        changed = bytearray(sealed)
        changed[len(changed) // 2] ^= 0xFF
    else:
        plain = bytearray(vr.key.open(sealed))
        plain[len(plain) // 2] ^= 0xFF  # v2: inside the zstd frame's raw block of random data
        changed = bytearray(vr.key.seal(plain))
    assert len(changed) == loc.length
    os.chmod(pack, 0o600)
    with open(pack, "r+b") as f:
        f.seek(loc.offset)
        f.write(changed)
    m = mounter.mount(repo_path, restic_repo.password)
    path = m.mnt / "ids" / restic_repo.snapshot_id[:8] / "sizes/8388609"
    source = read_all(restic_repo.source / "sizes/8388609")
    first = vr.index.size_of(victim, DATA)
    assert first is not None
    after = -(-first // 4096) * 4096  # the first page that needs none of the damaged blob
    with open(path, "rb") as f:
        f.seek(after)
        assert f.read(4096) == source[after : after + 4096]
        f.seek(0)
        with pytest.raises(OSError) as exc:
            f.read(4096)
        assert exc.value.errno == errno.EIO
    assert loc.pack_id.hex() in m.log()


def test_missing_pack_gives_eio_only_where_needed(
    mounter: Mounter, restic_repo_v1: ResticRepo, tmp_path: Path
) -> None:
    repo_path = copy_repo(restic_repo_v1, tmp_path / "repo")
    vr = open_vault(repo_path, restic_repo_v1.password)
    snap = vr.load_snapshot(restic_repo_v1.snapshot_id)
    big = vr.find_path(snap.tree, "sizes/8388609")
    assert big is not None and big.content
    loc = vr.index.lookup(big.content[-1], DATA)
    assert loc is not None
    lost = {b.blob_id for b in vr.index.blobs_in_pack(loc.pack_id)}
    pack = Path(vr.backend.path("data", loc.pack_id.hex()))
    kept = tmp_path / "lost-pack"
    shutil.move(pack, kept)
    broken = files_with_blobs(vr, snap.tree, lost)
    assert "sizes/8388609" in broken
    m = mounter.mount(repo_path, restic_repo_v1.password)
    root = m.mnt / "ids" / restic_repo_v1.snapshot_id[:8]
    check_reads(root, restic_repo_v1.source, broken)
    # inside a damaged file, the parts stored in other packs still read
    source = read_all(restic_repo_v1.source / "sizes/8388609")
    offset = 0
    with open(root / "sizes/8388609", "rb") as f:
        for blob in big.content:
            size = vr.index.size_of(blob, DATA)
            assert size is not None
            f.seek(offset)
            if blob in lost:
                with pytest.raises(OSError) as exc:
                    f.read(4096)
                assert exc.value.errno == errno.EIO
            else:
                assert f.read(4096) == source[offset : offset + 4096]
            offset += size
    assert loc.pack_id.hex() in m.log()

    # A failure is remembered only for a while (reader.UNREADABLE_SECONDS): with the pack back, the
    # same files read again.
    shutil.move(kept, pack)
    time.sleep(UNREADABLE_SECONDS + 0.5)
    assert read_all(root / "sizes/8388609") == source
    for rel in sorted(broken)[:20]:
        assert read_all(root / rel) == read_all(restic_repo_v1.source / rel), rel


# -- lifecycle ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(
    mounter: Mounter, restic_repo_v2: ResticRepo, tmp_path: Path, sig: signal.Signals
) -> None:
    repo_path = copy_repo(restic_repo_v2, tmp_path / "repo")
    m = mounter.mount(repo_path, restic_repo_v2.password)
    assert read_all(m.mnt / "snapshots/latest/text/hello.txt") == b"Hello, vault!\n"
    m.proc.send_signal(sig)
    assert m.wait_exit() == 0, m.log()
    assert not os.path.ismount(m.mnt)
    assert os.listdir(m.mnt) == []
    assert "Traceback" not in m.log()
    assert os.listdir(repo_path / "locks") == []  # the shared lock was released


def test_fusermount_ends_the_process(mounter: Mounter, restic_repo_v2: ResticRepo) -> None:
    m = mounter.mount(restic_repo_v2.path, restic_repo_v2.password, "--no-lock")
    os.listdir(m.mnt / "snapshots" / "latest")
    subprocess.run(["fusermount3", "-u", str(m.mnt)], check=True)
    assert m.wait_exit() == 0, m.log()
    assert "Traceback" not in m.log()


def test_unusable_mount_points(
    mounter: Mounter, restic_repo_v2: ResticRepo, tmp_path: Path
) -> None:
    repo = restic_repo_v2
    full = tmp_path / "full"
    full.mkdir()
    (full / "something").write_text("x")
    result = vault("-r", repo.path, "mount", full, password=repo.password, expect=1)
    assert "not empty" in one_line_error(result)

    result = vault("-r", repo.path, "mount", tmp_path / "nowhere", password=repo.password, expect=1)
    assert "does not exist" in one_line_error(result)

    m = mounter.mount(repo.path, repo.password, "--no-lock")
    result = vault("-r", repo.path, "mount", m.mnt, password=repo.password, expect=1)
    assert "busy" in one_line_error(result)

    # a mount whose process died: the kernel answers ENOTCONN until someone cleans up
    m.proc.kill()
    m.proc.wait()
    result = vault("-r", repo.path, "mount", m.mnt, password=repo.password, expect=1)
    assert "stale" in one_line_error(result)
