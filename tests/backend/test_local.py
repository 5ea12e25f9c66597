"""Backend conformance suite (run against every backend; the local one for now)."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest

from vaultfs.backend import LocalBackend, open_backend
from vaultfs.backend.local import TEMP_MARK
from vaultfs.errors import BackendError, FormatError, ObjectNotFound, UsageError


@pytest.fixture(params=["local", "rest"])
def backend(request, tmp_path):
    if request.param == "rest":
        # A fresh bucket on the session's bucket server (tests/server/harness.py). The server keeps
        # each bucket as a folder in the vault layout, so the local view of that folder answers the
        # path-based checks (file modes, temp files) about what the REST writes left on its disk.
        from tests.server.harness import shared_server
        from vaultfs.backend.rest import RestBackend

        server = shared_server()
        creds = server.bucket()
        rest = RestBackend(creds.location)
        request.addfinalizer(rest.close)
        local = LocalBackend(os.path.join(server.config.volume_paths[0], creds.name))
        rest.path, rest.root, rest.list_temp = local.path, local.root, local.list_temp
        return rest
    be = LocalBackend(str(tmp_path / "vault"))
    be.create()
    return be


def name_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_write_read_stat_list_remove(backend):
    data = os.urandom(5000)
    name = name_of(data)
    for kind in ("data", "index", "snapshots", "keys", "locks", "packindex"):
        backend.write(kind, name, data)
        assert backend.exists(kind, name)
        assert backend.stat(kind, name) == 5000
        assert backend.read(kind, name) == data
        assert backend.read(kind, name, 100, 50) == data[100:150]
        assert backend.read(kind, name, 4990) == data[4990:]
        assert list(backend.list(kind)) == [(name, 5000)]
        backend.remove(kind, name)
        backend.remove(kind, name)  # idempotent
        assert not backend.exists(kind, name)
        assert list(backend.list(kind)) == []


def test_config_object(backend):
    assert list(backend.list("config")) == []
    backend.write("config", "", b"cfg")
    assert backend.read("config", "") == b"cfg"
    assert list(backend.list("config")) == [("", 3)]


def test_short_read_is_an_error(backend):
    data = b"x" * 100
    backend.write("index", name_of(data), data)
    with pytest.raises(BackendError, match="short read"):
        backend.read("index", name_of(data), 90, 20)


def test_missing_object(backend):
    with pytest.raises(ObjectNotFound):
        backend.read("snapshots", "a" * 64)
    with pytest.raises(ObjectNotFound):
        backend.stat("snapshots", "a" * 64)


@pytest.mark.parametrize(
    "bad", ["../../etc/passwd", "A" * 64, "a" * 63, "", "/abs", "a" * 64 + "/x"]
)
def test_names_are_validated(backend, bad):
    with pytest.raises(FormatError):
        backend.write("data", bad, b"x")
    with pytest.raises(FormatError):
        backend.read("data", bad)


def test_unknown_kind(backend):
    with pytest.raises(FormatError):
        backend.write("tmp", "a" * 64, b"x")


def test_write_never_overwrites(backend):
    name = "b" * 64
    backend.write("index", name, b"first")
    backend.write("index", name, b"second")
    assert backend.read("index", name) == b"first"


def _pieces(data: bytes, size: int = 1 << 20):
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_write_stream(backend):
    data = os.urandom(3 * (1 << 20) + 17)
    name = name_of(data)
    opened = []

    def source():
        opened.append(1)
        yield from _pieces(data)

    backend.write_stream("data", name, source, len(data))
    assert backend.read("data", name) == data
    assert backend.stat("data", name) == len(data)
    backend.write_stream("data", name, lambda: iter([b"other"]), 5)  # written once: kept
    assert backend.read("data", name) == data
    backend.write_stream("keys", name_of(b""), lambda: iter(()), 0)
    assert backend.read("keys", name_of(b"")) == b""
    assert len(opened) == 1


class _Refused(Exception):
    pass


@pytest.mark.parametrize("how", ["source fails", "too short", "too long"])
def test_write_stream_that_fails_stores_nothing(backend, how):
    """A source that raises (a hash check in flight) or gives the wrong number of bytes leaves no
    object and no temp file behind; the source's own exception comes through unchanged."""
    data = os.urandom(2 * (1 << 20) + 5)
    name = name_of(data)

    def source():
        pieces = _pieces(data)
        yield from pieces[:-1]
        if how == "source fails":
            raise _Refused("hash mismatch")
        if how == "too long":
            yield pieces[-1] + b"x"

    expected = _Refused if how == "source fails" else BackendError
    with pytest.raises(expected):
        backend.write_stream("data", name, source, len(data))
    assert not backend.exists("data", name)
    assert list(backend.list("data")) == []
    # The bucket server drops what an aborted upload left as soon as it notices the closed
    # connection, which may be a moment after the client gave up.
    deadline = time.monotonic() + 10
    while list(backend.list_temp("data")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(backend.list_temp("data")) == []
    backend.write_stream("data", name, lambda: iter(_pieces(data)), len(data))  # works after
    assert backend.read("data", name) == data


def test_listing_hides_temp_files_and_files_are_read_only(backend, tmp_path):
    data = b"payload"
    name = name_of(data)
    backend.write("data", name, data)
    path = backend.path("data", name)
    assert path.endswith(f"data/{name[:2]}/{name}")
    assert os.stat(path).st_mode & 0o777 == 0o400
    with open(path + TEMP_MARK + "123", "wb") as f:
        f.write(b"half")
    with open(os.path.join(backend.root, "index", "c" * 64 + TEMP_MARK + "9"), "wb") as f:
        f.write(b"half")
    assert [n for n, _ in backend.list("data")] == [name]
    assert list(backend.list("index")) == []
    assert len(list(backend.list_temp("data"))) == 1


def test_concurrent_writes(backend):
    blobs = [os.urandom(1000) for _ in range(64)]

    def work(chunk):
        for b in chunk:
            backend.write("data", name_of(b), b)

    threads = [threading.Thread(target=work, args=(blobs[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(n for n, _ in backend.list("data")) == sorted(name_of(b) for b in blobs)


def test_write_error_mapping(tmp_path, monkeypatch):
    """An OS error while writing becomes a BackendError with advice and leaves no temp file."""
    be = LocalBackend(str(tmp_path / "v"))
    be.create()
    real_write = os.write

    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(BackendError, match="free some space"):
        be.write("index", "d" * 64, b"data")
    monkeypatch.setattr(os, "write", real_write)
    assert list(be.list_temp("index")) == []
    assert not be.exists("index", "d" * 64)


def test_open_backend_locations(tmp_path):
    assert isinstance(open_backend(str(tmp_path)).inner, LocalBackend)
    assert isinstance(open_backend(f"local:{tmp_path}").inner, LocalBackend)
    with pytest.raises(UsageError):
        open_backend("")
    with pytest.raises(UsageError):
        open_backend("s3:http://127.0.0.1/bucket")


class _Flaky(LocalBackend):
    """A real local backend whose reads fail temporarily a given number of times."""

    def __init__(self, path, failures):
        super().__init__(path)
        self.failures = failures

    def read(self, kind, name, offset=0, length=None):
        if self.failures:
            self.failures -= 1
            raise BackendError("connection reset", temporary=True)
        return super().read(kind, name, offset, length)


def test_retry_wrapper_reopens_the_source_of_a_streamed_write(tmp_path):
    from vaultfs.backend.retry import RetryBackend

    class FlakyWrites(LocalBackend):
        failures = 2

        def write_stream(self, kind, name, source, size):
            if self.failures:
                self.failures -= 1
                next(iter(source()))  # part of the body went out before the connection broke
                raise BackendError("connection reset", temporary=True)
            super().write_stream(kind, name, source, size)

    inner = FlakyWrites(str(tmp_path / "v"))
    inner.create()
    data = os.urandom(3 << 20)
    opened = []

    def source():
        opened.append(1)
        yield from _pieces(data)

    RetryBackend(inner, first_delay=0.001).write_stream("data", name_of(data), source, len(data))
    assert inner.read("data", name_of(data)) == data
    assert len(opened) == 3


def test_retry_wrapper_retries_temporary_errors_only(tmp_path):
    from vaultfs.backend.retry import RetryBackend

    flaky = _Flaky(str(tmp_path / "v"), failures=2)
    flaky.create()
    flaky.write("index", "e" * 64, b"ok")
    assert RetryBackend(flaky, first_delay=0.001).read("index", "e" * 64) == b"ok"
    flaky.failures = 9
    with pytest.raises(BackendError):
        RetryBackend(flaky, attempts=3, first_delay=0.001).read("index", "e" * 64)
    assert flaky.failures == 6
    flaky.failures = 0
    with pytest.raises(ObjectNotFound):
        RetryBackend(flaky, first_delay=0.001).read("index", "f" * 64)


@pytest.mark.parametrize("extra", [0, 1, 4095, 4096 + 17])
def test_page_aligned_buffers_are_written_whole_with_o_direct(backend, monkeypatch, extra):
    """A pack buffer (an anonymous mapping) of several O_DIRECT pieces plus an unaligned tail reads
    back byte for byte, and the aligned part really went through O_DIRECT."""
    import mmap

    import vaultfs.backend.local as local

    size = 2 * local.DIRECT_PIECE + 3 * local.DIRECT_ALIGN + extra
    buf = mmap.mmap(-1, size + 4 * local.DIRECT_ALIGN)
    data = os.urandom(size)
    buf[:size] = data
    opened = []
    real_open = os.open
    monkeypatch.setattr(
        local.os, "open", lambda path, flags, *a: opened.append(flags) or real_open(path, flags, *a)
    )
    name = hashlib.sha256(data).hexdigest()
    with memoryview(buf)[:size] as view:
        backend.write("data", name, view)
    assert backend.read("data", name) == data
    assert any(flags & os.O_DIRECT for flags in opened) == local.LocalBackend.direct_ok
    # bytes (read-only, anywhere in memory) take the page cache, and read back the same
    backend.write("data", hashlib.sha256(data[1:]).hexdigest(), data[1:])
    assert backend.read("data", hashlib.sha256(data[1:]).hexdigest()) == data[1:]
