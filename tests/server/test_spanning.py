"""Spanning: a bucket's files spread over several volumes, moved between them while the server runs."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path

import httpx

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

        def reader() -> None:
            with httpx.Client(base_url=creds.url, auth=creds.auth, timeout=30) as c:
                while not stop.is_set():
                    listed = {e["name"] for e in c.get("data/", headers={"Accept": V2}).json()}
                    if listed != set(objects):
                        problems.append(f"listing has {len(listed)} of {len(objects)}")
                    for name, data in objects.items():
                        resp = c.get(f"data/{name}")
                        if resp.status_code != 200 or resp.content != data:
                            problems.append(f"{name}: {resp.status_code}")

        threads = [threading.Thread(target=reader) for _ in range(2)]
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
