"""Uploads on disk: the O_DIRECT path (whole buffers straight from the receive buffer, the tail through
the page cache), the page-cache path, and the fall-back when a file system refuses direct writes."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat

import pytest

from vaultfs.server import storage as storage_module
from vaultfs.server.storage import UPLOAD_BUFFER, Storage, Upload, upload_buffer


def supports_direct(folder: str) -> bool:
    try:
        fd = os.open(os.path.join(folder, "probe"), os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    os.unlink(os.path.join(folder, "probe"))
    return True


def feed_through_space(upload: Upload, data: bytes, step: int) -> None:
    """What the protocol's pump does: receive into ``space()``, then report with ``filled_sync``."""
    view = memoryview(data)
    while view:
        space = upload.space()
        n = min(len(space), len(view), step)
        space[:n] = view[:n]
        upload.filled_sync(n)
        view = view[n:]


def buffers() -> tuple:
    return upload_buffer(), upload_buffer()


def store(
    tmp_path, data: bytes, how: str, buffer=None, hashed: bool = True
) -> tuple[Storage, Upload, str]:
    storage = Storage([str(tmp_path / "vol")])
    storage.make_volumes_sync()
    name = hashlib.sha256(data).hexdigest()
    upload = storage.begin_upload_sync("bk", "data", name, len(data), buffer, hashed=hashed)
    started_direct = upload.direct
    if how == "space":
        feed_through_space(upload, data, 200_001)
    else:
        for at in range(0, len(data), 300_007):
            upload.write_one_sync(data[at : at + 300_007])
    upload.finish_sync()
    storage.commit_sync("bk", "data", name, upload)
    return storage, upload, str(started_direct)


@pytest.mark.parametrize("hashed", [True, False])
@pytest.mark.parametrize("how", ["space", "pieces"])
@pytest.mark.parametrize(
    "size", [3 * UPLOAD_BUFFER + 12_345, 2 * UPLOAD_BUFFER, UPLOAD_BUFFER - 1, 4097]
)
def test_upload_keeps_every_byte(tmp_path, size, how, hashed):
    """Every byte reaches the file, however it arrives; the hash is computed only when asked for
    (the server skips it when it does not check uploads)."""
    data = os.urandom(size)
    storage, upload, started_direct = store(tmp_path, data, how, buffers(), hashed)
    expect_direct = size >= UPLOAD_BUFFER and supports_direct(str(tmp_path))
    assert started_direct == str(expect_direct)
    name = hashlib.sha256(data).hexdigest()
    if hashed:
        assert upload.hash is not None and upload.hash.hexdigest() == name
    else:
        assert upload.hash is None
    assert upload.size == size
    path = tmp_path / "vol" / "bk" / "data" / name[:2] / name
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    assert [p.name for p in path.parent.iterdir()] == [name]  # no temp file left


def test_a_file_system_that_refuses_direct_writes_gets_buffered_ones(tmp_path, monkeypatch):
    """O_DIRECT accepted at open but refused (EINVAL) at the first write: the upload carries on
    through the page cache, and later uploads do not try O_DIRECT again."""
    if not supports_direct(str(tmp_path)):
        pytest.skip("no O_DIRECT here")
    real_write = os.write
    refused = []

    def write(fd: int, data) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(storage_module.os, "write", write)
    monkeypatch.setattr(Upload, "direct_ok", True)
    data = os.urandom(2 * UPLOAD_BUFFER + 99)
    _storage, upload, started_direct = store(tmp_path, data, "space", buffers())
    assert started_direct == "True" and refused == [UPLOAD_BUFFER]
    assert not Upload.direct_ok
    name = hashlib.sha256(data).hexdigest()
    assert (tmp_path / "vol" / "bk" / "data" / name[:2] / name).read_bytes() == data
    again = os.urandom(UPLOAD_BUFFER + 5)
    _storage, _upload, started_direct = store(tmp_path, again, "space", buffers())
    assert started_direct == "False" and refused == [UPLOAD_BUFFER]


def test_aborted_direct_upload_leaves_nothing(tmp_path):
    storage = Storage([str(tmp_path / "vol")])
    storage.make_volumes_sync()
    upload = storage.begin_upload_sync("bk", "data", "ab" * 32, 5 * UPLOAD_BUFFER, buffers())
    feed_through_space(upload, os.urandom(2 * UPLOAD_BUFFER + 10), 65_536)  # a write in flight
    upload.abort_sync()
    assert list((tmp_path / "vol" / "bk" / "data" / "ab").iterdir()) == []


def test_sweep_removes_only_temp_files_nobody_wrote_to_lately(tmp_path):
    volumes = [str(tmp_path / "v1"), str(tmp_path / "v2")]
    storage = Storage(volumes)
    storage.make_volumes_sync()
    old = [tmp_path / "v1" / "bk" / "data" / "ab" / f"{'ab' * 32}-tmp-1",
           tmp_path / "v2" / "other" / "snapshots" / f"{'cd' * 32}-tmp-2"]  # fmt: skip
    fresh = tmp_path / "v1" / "bk" / "index" / f"{'ef' * 32}-tmp-3"
    stored = tmp_path / "v1" / "bk" / "data" / "ab" / ("ab" * 32)
    state = tmp_path / "v1" / ".vaultfs-server" / "x-tmp-4"  # the server's own folder: not a bucket
    for path in [*old, fresh, stored, state]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 10_000)
    hour_ago = os.stat(fresh).st_mtime - 3600
    for path in [*old, stored, state]:
        os.utime(path, (hour_ago, hour_ago))
    removed, freed = storage.sweep_temp_sync(600)
    assert removed == 2 and freed >= 2 * 10_000
    assert not any(p.exists() for p in old)
    assert fresh.exists() and stored.exists() and state.exists()
    assert storage.sweep_temp_sync(600) == (0, 0)
