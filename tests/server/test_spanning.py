"""Spanning: a bucket's files spread over several volumes, moved between them while the server runs."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path

import httpx
import pytest

from tests.server.harness import ServerThread, server_config
from tests.tools.cli import vault
from vaultfs.server.storage import Storage, StorageError

V2 = "application/vnd.x.restic.rest.v2"


def blobs(n: int, size: int = 20_000) -> dict[str, bytes]:
    out = {}
    for _ in range(n):
        data = os.urandom(size)
        out[hashlib.sha256(data).hexdigest()] = data
    return out


def move_like_rsync(src: Path, dst: Path) -> None:
    """Copy to a temp name beside the target, rename into place, then remove the source
    (what `rsync --remove-source-files` does): the file is complete wherever it is visible."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name("." + dst.name + ".partial")
    shutil.copyfile(src, tmp)
    os.rename(tmp, dst)
    os.unlink(src)


def test_files_stay_reachable_while_moved_between_volumes(tmp_path):
    vol1, vol2 = tmp_path / "vol1", tmp_path / "vol2"
    srv = ServerThread(server_config(str(tmp_path / "state"), volumes=[str(vol1), str(vol2)]))
    try:
        creds = srv.bucket()
        objects = blobs(24)
        with httpx.Client(base_url=creds.url, auth=creds.auth, timeout=30) as c:
            for name, data in objects.items():
                assert c.post(f"data/{name}", content=data).status_code == 200
        homes = {n: next(v for v in (vol1, vol2) if (v / creds.name / "data" / n[:2] / n).exists())
                 for n in objects}  # fmt: skip
        problems: list[str] = []
        stop = threading.Event()
        # The guarantee is for a file moved once while a listing or a read looks for it (an
        # administrator's rebalancing moves each file once). So every round of moves is followed by
        # a wait until each reader has finished a pass that began after the round: no pass
        # overlaps two rounds, and each file moves at most once during any pass.
        moved = threading.Condition()
        rounds_done = 0
        passes_from = [0, 0]  # per reader: rounds_done when its last finished pass began

        def reader(me: int) -> None:
            with httpx.Client(base_url=creds.url, auth=creds.auth, timeout=30) as c:
                while not stop.is_set():
                    with moved:
                        began = rounds_done
                    listed = {e["name"] for e in c.get("data/", headers={"Accept": V2}).json()}
                    if listed != set(objects):
                        problems.append(f"listing has {len(listed)} of {len(objects)}")
                    for name, data in objects.items():
                        resp = c.get(f"data/{name}")
                        if resp.status_code != 200 or resp.content != data:
                            problems.append(f"{name}: {resp.status_code}")
                    with moved:
                        passes_from[me] = began
                        moved.notify_all()

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for rounds in range(3):
            for name in objects:
                rel = Path(creds.name) / "data" / name[:2] / name
                src = homes[name]
                dst = vol2 if src == vol1 else vol1
                if rounds % 2:
                    os.makedirs(dst / rel.parent, exist_ok=True)
                    os.rename(src / rel, dst / rel)  # mv within one file system
                else:
                    move_like_rsync(src / rel, dst / rel)
                homes[name] = dst
            with moved:
                rounds_done += 1
                assert moved.wait_for(lambda n=rounds_done: min(passes_from) >= n, timeout=60)
        stop.set()
        for t in threads:
            t.join()
        assert problems == []
        # Deletes reach every volume; an upload never shadows a copy on another volume.
        name, data = next(iter(objects.items()))
        with httpx.Client(base_url=creds.url, auth=creds.auth) as c:
            assert c.post(f"data/{name}", content=data).status_code == 403
            assert c.delete(f"data/{name}").status_code == 200
            assert c.head(f"data/{name}").status_code == 404
    finally:
        srv.stop()


def test_new_files_go_to_the_volume_with_most_free_space(tmp_path):
    class Sized(Storage):
        """Real volumes whose free space is stated by the test."""

        free = {}

        def free_sync(self, volume: str) -> int:
            return self.free[volume]

    vols = [str(tmp_path / n) for n in ("a", "b", "c")]
    storage = Sized(vols)
    storage.make_volumes_sync()
    storage.free = {vols[0]: 10, vols[1]: 5000, vols[2]: 300}
    assert storage.pick_volume_sync(100) == vols[1]
    upload = storage.begin_upload_sync("bk", "index", "a" * 64, 100)
    upload.write_sync([b"x"])
    upload.finish_sync()
    storage.commit_sync("bk", "index", "a" * 64, upload)
    assert os.path.exists(os.path.join(vols[1], "bk", "index", "a" * 64))
    try:
        storage.pick_volume_sync(6000)
    except StorageError as exc:
        assert exc.status == 507
    else:
        raise AssertionError("no volume has 6000 bytes free")


def test_volumes_command_reports_each_volume(tmp_path):
    vol1, vol2 = tmp_path / "v1", tmp_path / "v2"
    config = tmp_path / "server.toml"
    config.write_text(
        f'data = "{tmp_path / "state"}"\nvolumes = ["{vol1}", "{vol2}"]\nbcrypt_rounds = 4\n'
    )
    vault("server", "--config", config, "bucket", "create", "span", password=None)
    (vol2 / "span" / "index").mkdir(parents=True)
    (vol2 / "span" / "index" / ("b" * 64)).write_bytes(b"12345")
    result = vault("server", "volumes", "--config", config, "--json", password=None)
    import json

    report = {v["path"]: v for v in json.loads(result.out)}
    assert report[str(vol2)]["stored"] == 5 and report[str(vol2)]["files"] == 1
    assert report[str(vol1)]["online"] and report[str(vol1)]["files"] == 0
    info = json.loads(
        vault("server", "bucket", "info", "span", "--config", config, "--json", password=None).out
    )
    assert info["stored"] == 5


# The moments at which a file can move while a listing or a read looks for it, made exact: the test
# wraps the OS call (not our code) so the file moves right before or right after one look.
def _two_volumes(tmp_path: Path) -> tuple[Storage, list[Path], str]:
    vols = [tmp_path / "v1", tmp_path / "v2"]
    storage = Storage([str(v) for v in vols])
    storage.make_volumes_sync()
    for v in vols:
        (v / "bk" / "data" / "ab").mkdir(parents=True)
    name = "ab" + "c" * 62
    return storage, vols, name


@pytest.mark.parametrize(
    "src, dst, moment",
    [
        (0, 1, "before the look at the source"),
        (0, 1, "between the source's scan and the stat of its entry"),
        (1, 0, "before the look at the source"),
        (1, 0, "between the source's scan and the stat of its entry"),
    ],
)
def test_a_listing_finds_a_file_moved_once_during_it(tmp_path, monkeypatch, src, dst, moment):
    storage, vols, name = _two_volumes(tmp_path)
    rel = Path("bk") / "data" / "ab" / name
    (vols[src] / rel).write_bytes(b"12345")
    real_scandir = os.scandir
    looks: list[str] = []

    def scandir(path):
        looks.append(str(path))
        if str(path) == str((vols[src] / rel).parent) and looks.count(str(path)) == 1:
            if moment.startswith("before"):
                os.rename(vols[src] / rel, vols[dst] / rel)
            else:
                entries = list(real_scandir(path))
                os.rename(vols[src] / rel, vols[dst] / rel)
                return iter(entries)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert storage.list_sync("bk", "data") == [(name, 5)]
    assert str((vols[src] / rel).parent) in looks  # the move happened during the listing


@pytest.mark.parametrize("src, dst", [(0, 1), (1, 0)])
def test_a_read_finds_a_file_moved_once_between_its_looks(tmp_path, monkeypatch, src, dst):
    storage, vols, name = _two_volumes(tmp_path)
    rel = Path("bk") / "data" / "ab" / name
    (vols[src] / rel).write_bytes(b"12345")
    real_open = os.open
    moved = []

    def open_(path, flags, *args):
        # The file moves right before the first look at its old place: from v2 to v1 after v1 was
        # looked at (found on the second pass), from v1 to v2 before v2 is looked at.
        if not moved and str(path) == str(vols[src] / rel):
            os.rename(vols[src] / rel, vols[dst] / rel)
            moved.append(path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_)
    found = storage.open_sync("bk", "data", name)
    assert found is not None and moved
    fd, size = found
    try:
        assert size == 5 and os.pread(fd, 5, 0) == b"12345"
    finally:
        os.close(fd)


def test_a_listing_is_not_fooled_by_moves_while_other_folders_are_scanned(tmp_path, monkeypatch):
    # Each folder is scanned in every volume before the next folder: a file moved to and fro while
    # data/cd is scanned was already listed from data/ab. (Scanning one volume entirely, then the
    # next, missed it: v1/ab, v1/cd - moved to v1 -, v2/ab, v2/cd - moved back -, v1/ab again.)
    storage, vols, name = _two_volumes(tmp_path)
    rel = Path("bk") / "data" / "ab" / name
    for v in vols:
        (v / "bk" / "data" / "cd").mkdir()
    (vols[1] / rel).write_bytes(b"12345")
    real_scandir = os.scandir
    moves = {
        str(vols[0] / "bk" / "data" / "cd"): (1, 0),
        str(vols[1] / "bk" / "data" / "cd"): (0, 1),
    }

    def scandir(path):
        if str(path) in moves:
            src, dst = moves.pop(str(path))
            os.rename(vols[src] / rel, vols[dst] / rel)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert storage.list_sync("bk", "data") == [(name, 5)]
    assert not moves  # both moves happened during the listing
