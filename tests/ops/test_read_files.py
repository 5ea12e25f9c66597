"""Backup's batched small-file reads in C (vaultfs.ops._files.read_files), on real files: what it reads,
what it hands back open, and every failure as an errno."""

from __future__ import annotations

import errno
import mmap
import os

import pytest

if os.environ.get("CI") == "true":  # make test builds it: missing is a failure there
    from vaultfs.ops import _files
else:
    _files = pytest.importorskip("vaultfs.ops._files")

LIMIT = 4096


def test_small_files_are_read_whole_one_after_the_other(tmp_path):
    a = tmp_path / "a"
    a.write_bytes(b"alpha" * 10)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    b = tmp_path / "b"
    b.write_bytes(b"x" * LIMIT)  # exactly the limit: still one read
    os.setxattr(a, "user.first", b"1")
    os.setxattr(a, "user.second", b"")
    buf = mmap.mmap(-1, 3 * LIMIT)
    results = _files.read_files([bytes(a), bytes(empty), bytes(b)], buf, LIMIT)
    assert [r[0] for r in results] == [0, 0, 0]
    (_, st_a, off_a, len_a, x_a), (_, _, off_e, len_e, x_e), (_, st_b, off_b, len_b, _) = results
    assert (off_a, len_a, off_e, len_e, off_b, len_b) == (0, 50, 50, 0, 50, LIMIT)
    assert (
        buf[off_a : off_a + len_a] == b"alpha" * 10 and buf[off_b : off_b + len_b] == b"x" * LIMIT
    )
    assert x_a == list(
        zip(os.listxattr(a), [os.getxattr(a, n) for n in os.listxattr(a)], strict=True)
    )
    assert x_e == []
    real = os.stat(a)
    assert st_a[:7] == (real.st_mode, real.st_ino, real.st_dev, real.st_nlink, real.st_uid,
                        real.st_gid, 50)  # fmt: skip
    assert st_a[8:10] == (real.st_mtime_ns, real.st_ctime_ns)
    assert st_b[6] == LIMIT


def test_a_file_past_the_limit_or_the_room_comes_back_open_at_offset_0(tmp_path):
    big = tmp_path / "big"
    big.write_bytes(os.urandom(LIMIT + 1))
    small = tmp_path / "small"
    small.write_bytes(b"s" * 100)
    buf = mmap.mmap(-1, 150)
    results = _files.read_files([bytes(big), bytes(small), bytes(small)], buf, LIMIT)
    assert results[0][0] == 1
    fd = results[0][1]
    try:
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0 and os.read(fd, LIMIT + 10) == big.read_bytes()
    finally:
        os.close(fd)
    # 150 bytes of room: the first copy of small fits, the second does not and comes back open
    assert [r[0] for r in results[1:]] == [0, 1]
    assert results[1][2:4] == (0, 100) and buf[:100] == b"s" * 100
    os.close(results[2][1])


def test_failures_come_back_as_errno(tmp_path):
    (tmp_path / "target").write_bytes(b"t")
    os.symlink("target", tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    buf = mmap.mmap(-1, LIMIT)
    paths = [tmp_path / "missing", tmp_path / "link", tmp_path, tmp_path / "fifo"]
    results = _files.read_files([bytes(p) for p in paths], buf, LIMIT)
    assert results == [
        (2, errno.ENOENT),
        (2, errno.ELOOP),
        (4, 0),
        (4, 0),
    ]  # a fifo is not waited on


def test_bad_arguments_raise():
    with pytest.raises(TypeError):
        _files.read_files(["not bytes"], bytearray(10), LIMIT)
    with pytest.raises(ValueError):
        _files.read_files([b"a\0b"], bytearray(10), LIMIT)
    with pytest.raises((TypeError, BufferError)):
        _files.read_files([b"/"], b"read-only", LIMIT)


def test_scan_dir_lists_sorted_names_with_their_lstat(tmp_path):
    from vaultfs.ops.backup import _stat_result

    names = [b"b", b"a", b"\xff-not-utf8", b"Z", b"dir", b"link", b"fifo"]
    for raw in names[:4]:
        with open(os.path.join(bytes(tmp_path), raw), "wb") as f:
            f.write(raw * 3)
    (tmp_path / "dir").mkdir()
    os.symlink("nowhere", tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    found = _files.scan_dir(bytes(tmp_path))
    assert [raw for raw, _ in found] == sorted(names)
    for raw, st in found:
        want = os.lstat(os.path.join(bytes(tmp_path), raw))
        got = _stat_result(st)
        assert tuple(got) == tuple(want)
        assert (got.st_mtime_ns, got.st_ctime_ns, got.st_atime_ns, got.st_mtime) == (
            want.st_mtime_ns, want.st_ctime_ns, want.st_atime_ns, want.st_mtime
        )  # fmt: skip
    assert _files.scan_dir(bytes(tmp_path / "missing")) == errno.ENOENT
    assert _files.scan_dir(bytes(tmp_path / "a")) == errno.ENOTDIR
    os.symlink("dir", tmp_path / "dirlink")
    assert _files.scan_dir(bytes(tmp_path / "dirlink")) in (
        errno.ENOTDIR,
        errno.ELOOP,
    )  # not followed
    assert _files.scan_dir(bytes(tmp_path / "dir")) == []
