"""The C blob functions (vaultfs.chunker._blob) against the pure-Python seal and python-zstandard."""

from __future__ import annotations

import errno
import os

import pytest
import zstandard

from vaultfs import crypto
from vaultfs.chunker import _blob
from vaultfs.crypto import OVERHEAD, MasterKey
from vaultfs.errors import IntegrityError

KEY = MasterKey.generate()
SIZES = [0, 1, 15, 16, 17, 4095, 65536, 1_000_003]

needs_native = pytest.mark.skipif(
    not _blob.available() and os.environ.get("CI") != "true",
    reason="libcrypto.so.3 or libzstd.so.1 missing",
)


@needs_native
@pytest.mark.parametrize("size", SIZES)
def test_seal_into_opens_with_the_python_code_and_back(size):
    plain = os.urandom(size)
    out = bytearray(size + OVERHEAD)
    _blob.seal_into(KEY.raw, out, plain)
    assert out[:16] != bytes(16)
    assert KEY.open(bytes(out)) == plain
    back = bytearray(size)
    assert _blob.open_into(KEY.raw, back, KEY.seal(plain)) and back == plain


@needs_native
def test_open_into_refuses_any_flipped_bit_and_wrong_sizes():
    sealed = bytearray(KEY.seal(b"some plaintext"))
    out = bytearray(len(sealed) - OVERHEAD)
    for i in (0, 15, 16, len(sealed) - 17, len(sealed) - 1):
        bad = bytearray(sealed)
        bad[i] ^= 0x10
        assert not _blob.open_into(KEY.raw, out, bad)
    with pytest.raises(ValueError):
        _blob.open_into(KEY.raw, bytearray(3), sealed)
    with pytest.raises(ValueError):
        _blob.seal_into(KEY.raw, bytearray(10), b"abc")
    with pytest.raises(ValueError):
        _blob.seal_into(b"short key", bytearray(35), b"abc")


@needs_native
def test_codec_frames_read_both_ways_with_python_zstandard():
    text = b"".join(b"line %d of a log file with words\n" % i for i in range(50_000))
    codec = _blob.Codec(1)
    out = bytearray(codec.bound(len(text)))
    n = codec.compress_into(out, text)
    assert n < len(text) // 3
    assert zstandard.ZstdDecompressor().decompress(bytes(out[:n])) == text
    frame = zstandard.ZstdCompressor(level=3, write_checksum=False).compress(text)
    back = bytearray(len(text))
    assert codec.decompress_into(back, frame) == len(text) and back == text
    with pytest.raises(ValueError, match="zstd"):
        codec.decompress_into(back, b"\x28\xb5\x2f\xfd" + os.urandom(100))
    with pytest.raises(ValueError, match="zstd"):
        codec.compress_into(bytearray(10), text)  # no room


def test_master_key_into_methods_agree_with_and_without_the_c_part(monkeypatch):
    plain = os.urandom(5000)
    for native in {crypto.NATIVE, False}:
        monkeypatch.setattr(crypto, "NATIVE", native)
        out = bytearray(len(plain) + OVERHEAD)
        KEY.seal_into(out, plain)
        back = bytearray(len(plain))
        KEY.open_into(back, out)
        assert back == plain
        out[20] ^= 1
        with pytest.raises(IntegrityError):
            KEY.open_into(back, out, "blob X")


def test_master_key_seal_and_open_agree_with_and_without_the_c_part(monkeypatch):
    plain = os.urandom(5000)
    sealed = {}
    for native in {crypto.NATIVE, False}:
        monkeypatch.setattr(crypto, "NATIVE", native)
        sealed[native] = KEY.seal(plain)
        assert len(sealed[native]) == len(plain) + OVERHEAD
    for native in {crypto.NATIVE, False}:
        monkeypatch.setattr(crypto, "NATIVE", native)
        for other in sealed.values():
            assert KEY.open(other) == plain
            damaged = bytearray(other)
            damaged[-1] ^= 1
            with pytest.raises(IntegrityError, match="blob X failed authentication"):
                KEY.open(bytes(damaged), "blob X")


@needs_native
def test_the_batch_functions_match_one_blob_at_a_time():
    """sha256_spans, Codec.compress_spans and seal_many give what hashlib, zstandard and the Python
    seal give blob by blob, and refuse spans outside the data or too little room for the frames."""
    import hashlib

    pieces = [os.urandom(n // 2) + bytes(n - n // 2) for n in (1, 100, 5000, 70_000)]
    data = b"".join(pieces)
    spans: list[int] = []
    pos = 0
    for p in pieces:
        spans += (pos, len(p))
        pos += len(p)
    assert _blob.sha256_spans(data, spans) == [hashlib.sha256(p).digest() for p in pieces]
    codec = _blob.Codec(3)
    out = bytearray(sum(codec.bound(len(p)) for p in pieces))
    lengths = codec.compress_spans(out, data, spans)
    frames = []
    pos = 0
    for n in lengths:
        frames.append(bytes(out[pos : pos + n]))
        pos += n
    assert [zstandard.ZstdDecompressor().decompress(f) for f in frames] == pieces
    sealed = [bytearray(len(f) + OVERHEAD) for f in frames]
    _blob.seal_many(KEY.raw, list(zip(sealed, frames, strict=True)))
    assert [KEY.open(bytes(s)) for s in sealed] == frames
    assert len({bytes(s[:16]) for s in sealed}) == len(sealed)  # a nonce of its own each
    with pytest.raises(ValueError):
        _blob.sha256_spans(data, [len(data) - 1, 2])
    with pytest.raises(ValueError):
        codec.compress_spans(bytearray(100), data, spans)
    with pytest.raises(ValueError):
        _blob.seal_many(KEY.raw, [(bytearray(10), b"abc")])


@needs_native
def test_restore_files_writes_checked_blobs_and_touches_nothing_else(tmp_path):
    """Codec.restore_files: a right blob is written with its mode and times; a blob that fails its
    check leaves its file alone; a file that is in the way is reported (status 1, errno)."""
    import hashlib
    import struct

    codec = _blob.Codec()
    plain = [os.urandom(1000), b"compressible " * 400, b"damaged", b"in the way"]
    frames = [bytes(plain[0]), codec_frame(codec, plain[1]), plain[2], plain[3]]
    sealed = [bytearray(KEY.seal(f)) for f in frames]
    sealed[2][-1] ^= 1  # the tag no longer matches
    data = b"".join(sealed)
    table, offset = bytearray(), 0
    for p, f, s in zip(plain, frames, sealed, strict=True):
        ulen = len(p) if f is not p else 0
        table += struct.pack("<QQQ", offset, len(s), ulen) + hashlib.sha256(p).digest()
        offset += len(s)
    (tmp_path / "d").write_bytes(b"old")  # a file in the way of an O_EXCL create
    paths = [os.fsencode(tmp_path / n) for n in ("a", "b", "c", "d")]
    mtime = 1_700_000_000_123_456_789
    files = [(p, True, 0, -1, -1, 0o640, mtime - 5, mtime) for p in paths]
    got = codec.restore_files(KEY.raw, data, bytes(table), bytearray(2000), bytearray(6000), files)
    assert [(c, s) for c, s, _e, _w, _fd in got] == [(0, 0), (0, 0), (1, -1), (0, 1)]
    assert got[0][3] == 1000 and got[3][2] == errno.EEXIST and got[0][4] == -1
    st = os.stat(tmp_path / "b")  # before reading it: reading updates the access time
    assert st.st_mtime_ns == mtime and st.st_atime_ns == mtime - 5 and st.st_mode & 0o777 == 0o640
    assert (tmp_path / "a").read_bytes() == plain[0] and (tmp_path / "b").read_bytes() == plain[1]
    assert not (tmp_path / "c").exists() and (tmp_path / "d").read_bytes() == b"old"


def codec_frame(codec: _blob.Codec, data: bytes) -> bytes:
    out = bytearray(codec.bound(len(data)))
    return bytes(out[: codec.compress_into(out, data)])
