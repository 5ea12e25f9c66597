"""Tests for vaultfs.chunker: restic's real cut points, a pure-Python model, streaming and threads.

The known-answer test backs files up with the real restic binary and checks that every chunk we cut
hashes to the data blob restic recorded, in order. The model below is a literal, byte-at-a-time
transcription of FORMAT.md §9 (restic's reset state, skip and window included); the C scanner takes
shortcuts (parallel lanes, no window while the outgoing byte is in the buffer) that it must not be
able to tell apart from the model.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.restic import Restic
from vaultfs.chunker import (
    MAX_SIZE,
    MIN_SIZE,
    Chunker,
    iter_chunks,
    poly,
    split,
)

KiB = 1024
MiB = 1024 * KiB
# restic/chunker's own test polynomial; any irreducible degree-53 polynomial would do.
POL = 0x3DA3358B4DC173


class Model:
    """FORMAT.md §9 one byte at a time, with restic's state (slow: test sizes only)."""

    def __init__(self, pol: int, average_bits: int) -> None:
        self.k = poly.degree(pol)
        self.out_table = []
        for b in range(256):
            h = poly.mod(b, pol)
            for _ in range(63):
                h = poly.mod(h << 8, pol)
            self.out_table.append(h)
        self.mod_table = [poly.mod(b << self.k, pol) | (b << self.k) for b in range(256)]
        self.mask = (1 << average_bits) - 1
        self.reset()

    def reset(self) -> None:
        self.window = [0] * 64
        self.wpos = 0
        self.digest = 0
        self.slide(1)

    def slide(self, b: int) -> None:
        o = self.window[self.wpos]
        self.window[self.wpos] = b
        self.wpos = (self.wpos + 1) % 64
        self.digest ^= self.out_table[o]
        index = self.digest >> (self.k - 8)
        self.digest = ((self.digest << 8) | b) ^ self.mod_table[index]


def model_split(
    data: bytes, pol: int, min_size: int, max_size: int, average_bits: int
) -> list[int]:
    """Chunk lengths by the model."""
    model = Model(pol, average_bits)
    lengths = []
    start = 0
    while start < len(data):
        model.reset()
        count = min(min_size - 64, len(data) - start)  # skipped, never hashed
        end = len(data)
        for i in range(start + count, len(data)):
            model.slide(data[i])
            count += 1
            if count >= min_size and ((model.digest & model.mask) == 0 or count >= max_size):
                end = i + 1
                break
        lengths.append(end - start)
        start = end
    return lengths


def feed_in_pieces(chunker: Chunker, data: bytes, sizes: list[int]) -> list[int]:
    """Feed ``data`` in pieces of the given sizes (cycled); return absolute cut offsets."""
    cuts: list[int] = []
    pos = 0
    i = 0
    while pos < len(data):
        size = sizes[i % len(sizes)] if sizes else len(data)
        i += 1
        piece = data[pos : pos + size]
        cuts.extend(pos + c for c in chunker.feed(piece))
        pos += len(piece)
    return cuts


def lengths_to_cuts(lengths: list[int]) -> list[int]:
    cuts = []
    total = 0
    for n in lengths:
        total += n
        cuts.append(total)
    return cuts


def sha256_hex(chunks) -> list[str]:
    return [hashlib.sha256(c).hexdigest() for c in chunks]


def randbytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def test_test_polynomial_is_usable() -> None:
    assert poly.check_polynomial(POL) == POL


# --- the real restic --------------------------------------------------------------------------


def new_restic_repo(base: Path) -> Restic:
    """``restic init`` a fresh repository under ``base`` (about 2 s of key derivation)."""
    restic = Restic(base / "repo", "x")
    restic.init()
    return restic


def file_contents(restic: Restic, snapshot_id: str) -> dict[str, list[str]]:
    """Map each file name in a snapshot to its data blob IDs, in order (names must be unique)."""
    files: dict[str, list[str]] = {}
    pending = [json.loads(restic.cat("snapshot", snapshot_id))["tree"]]
    while pending:
        for node in json.loads(restic.cat("blob", pending.pop()))["nodes"]:
            if node["type"] == "dir":
                pending.append(node["subtree"])
            elif node["type"] == "file":
                assert node["name"] not in files, f"duplicate file name {node['name']}"
                files[node["name"]] = node.get("content") or []
    return files


def _constant_byte_without_cuts(pol: int) -> int:
    """A byte value whose 64-byte runs never satisfy the cut condition, so runs of it hit max_size.

    Zero runs always cut at min_size (their fingerprint is 0); for other values it depends on the
    polynomial (a 1 in 2**20 chance each), so look for one.
    """
    for value in range(1, 256):
        if split(bytes([value]) * (MAX_SIZE + 1), pol) == [MAX_SIZE, 1]:
            return value
    raise AssertionError("every constant byte cuts: impossible for a working chunker")


def _text(seed: int, n: int) -> bytes:
    """Low-entropy, log-like text."""
    rng = random.Random(seed)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"error", b"ok", b"GET", b"/index.html", b"200"]
    lines = []
    size = 0
    serial = 0
    while size < n:
        serial += 1
        line = b"%08d " % serial + b" ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        lines.append(line + b"\n")
        size += len(line) + 1
    return b"".join(lines)[:n]


@pytest.fixture(scope="module")
def restic_backup(tmp_path_factory) -> tuple[int, Path, dict[str, list[str]]]:
    """One restic backup of many edge-case files: (polynomial, folder, data blob IDs per file)."""
    restic = new_restic_repo(tmp_path_factory.mktemp("restic"))
    pol = poly.parse_polynomial(json.loads(restic.cat("config"))["chunker_polynomial"])
    flat = bytes([_constant_byte_without_cuts(pol)])
    files = {
        "empty": b"",
        "tiny": randbytes(1, 1000),
        "random-40M": randbytes(2, 40 * MiB + 12345),
        "text-12M": _text(3, 12 * MiB),
        "zeros-10M": bytes(10 * MiB + 17),
        "flat-20M": flat * (20 * MiB + 3),
        "four-symbols-6M": randbytes(4, 6 * MiB).translate(bytes(b & 3 for b in range(256))),
        "mixed": randbytes(5, 3 * MiB) + bytes(9 * MiB) + randbytes(6, 2 * MiB) + flat * 9 * MiB,
    }
    for name, size in [("min", MIN_SIZE), ("max", MAX_SIZE)]:
        for delta, tag in [(-1, "minus1"), (0, "exact"), (1, "plus1")]:
            files[f"random-{name}-{tag}"] = randbytes(7 + delta, size + delta)
            files[f"flat-{name}-{tag}"] = flat * (size + delta)
            files[f"zeros-{name}-{tag}"] = bytes(size + delta)
    data_dir = tmp_path_factory.mktemp("restic-data")
    for name, data in files.items():
        (data_dir / name).write_bytes(data)
    snapshot = restic.backup([data_dir], full_id=False)
    return pol, data_dir, file_contents(restic, snapshot)


@pytest.mark.restic
@pytest.mark.slow
def test_cut_points_match_restic(restic_backup) -> None:
    pol, data_dir, contents = restic_backup
    names = sorted(p.name for p in data_dir.iterdir())
    assert sorted(contents) == names
    for name in names:
        with open(data_dir / name, "rb") as f:
            ours = sha256_hex(iter_chunks(f, pol))
        assert ours == contents[name], name


@pytest.mark.restic
@pytest.mark.slow
def test_restic_edge_cases_have_the_expected_shape(restic_backup) -> None:
    """The edge-case files really exercise the edges (a guard on the fixture, not on restic)."""
    pol, data_dir, contents = restic_backup
    assert contents["empty"] == []
    assert len(contents["tiny"]) == 1
    assert len(contents["random-min-minus1"]) == 1
    assert len(contents["random-min-exact"]) == 1
    # zero runs cut at exactly min_size, flat runs of the chosen byte at exactly max_size
    zeros = split((data_dir / "zeros-10M").read_bytes(), pol)
    assert zeros[:-1] == [MIN_SIZE] * (len(zeros) - 1)
    assert split((data_dir / "flat-20M").read_bytes(), pol) == [MAX_SIZE, MAX_SIZE, 4 * MiB + 3]
    assert split((data_dir / "flat-max-plus1").read_bytes(), pol) == [MAX_SIZE, 1]
    assert split((data_dir / "flat-max-exact").read_bytes(), pol) == [MAX_SIZE]
    assert len(split((data_dir / "random-40M").read_bytes(), pol)) > 15


@pytest.mark.restic
@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "read_size"),
    [
        ("random-min-plus1", 1),
        ("random-40M", 4093),
        ("random-40M", 64 * KiB + 7),
        ("mixed", 3 * MiB),
        ("mixed", 9 * MiB),
    ],
)
def test_restic_cut_points_with_any_read_size(restic_backup, name, read_size) -> None:
    pol, data_dir, contents = restic_backup
    with open(data_dir / name, "rb") as f:
        assert sha256_hex(iter_chunks(f.fileno(), pol, read_size=read_size)) == contents[name]


# --- the model --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("min_size", "max_size", "average_bits"),
    [
        (64, 1 * MiB, 13),  # many cuts, most in the first lane of a block
        (64, 1 * MiB, 16),  # cuts spread over all lanes
        (1000, 96 * KiB, 17),  # max_size forces cuts between content cuts
        (70 * KiB, 200 * KiB, 15),
    ],
)
def test_model_random_data(min_size, max_size, average_bits) -> None:
    data = randbytes(min_size + average_bits, 700 * KiB) + bytes(100 * KiB) + randbytes(9, 50 * KiB)
    expected = model_split(data, POL, min_size, max_size, average_bits)
    assert len(expected) > 3
    assert split(data, POL, min_size=min_size, max_size=max_size, average_bits=average_bits) == (
        expected
    )


def test_model_default_parameters_small_input() -> None:
    """Default sizes: the first allowed cut position and the 64-byte window right before it."""
    data = randbytes(11, MIN_SIZE + 5000)
    assert split(data, POL) == model_split(data, POL, MIN_SIZE, MAX_SIZE, 20)


def _data_strategy():
    seeded = st.builds(
        lambda seed, n: randbytes(seed, n),
        st.integers(0, 2**32),
        st.integers(0, 12_000),
    )
    return st.one_of(st.binary(max_size=6000), seeded)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=_data_strategy(),
    min_size=st.integers(64, 3000),
    extra=st.integers(0, 5000),
    average_bits=st.integers(1, 12),
)
def test_model_hypothesis(data, min_size, extra, average_bits) -> None:
    max_size = min_size + extra
    expected = model_split(data, POL, min_size, max_size, average_bits)
    got = split(data, POL, min_size=min_size, max_size=max_size, average_bits=average_bits)
    assert got == expected
    assert sum(got) == len(data)


def test_model_other_degrees() -> None:
    """Degrees other than 53 take the generic scanner; the model covers them too."""
    rng = random.Random(5)
    data = randbytes(12, 200 * KiB)
    for k in (8, 21, 40, 52):
        while True:
            pol = (rng.getrandbits(k) | 1 << k) | 1
            if poly.is_irreducible(pol):
                break
        assert split(data, pol, min_size=64, max_size=150 * KiB, average_bits=8) == (
            model_split(data, pol, 64, 150 * KiB, 8)
        ), k


# --- streaming --------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    size=st.integers(0, 400 * KiB),
    zero_run=st.integers(0, 100 * KiB),
    pieces=st.lists(st.integers(1, 150 * KiB), max_size=8),
    small_pieces=st.lists(st.integers(1, 100), max_size=8),
    average_bits=st.integers(8, 16),
)
def test_streaming_matches_one_call(
    seed, size, zero_run, pieces, small_pieces, average_bits
) -> None:
    data = randbytes(seed, size // 2) + bytes(zero_run) + randbytes(seed + 1, size - size // 2)
    params = dict(min_size=4 * KiB, max_size=160 * KiB, average_bits=average_bits)
    whole = Chunker(POL, **params).feed(data)
    assert feed_in_pieces(Chunker(POL, **params), data, pieces + small_pieces) == whole


@pytest.mark.parametrize("piece", [1, 63, 64, 65, 4095, 65537, 1 * MiB + 1])
def test_streaming_default_parameters(piece) -> None:
    data = randbytes(13, 6 * MiB) + bytes(2 * MiB) + b"\x07" * (9 * MiB)
    if piece == 1:
        data = data[: 2 * MiB]  # a Python loop per byte: keep it short
    whole = Chunker(POL).feed(data)
    assert whole
    assert feed_in_pieces(Chunker(POL), data, [piece]) == whole


def test_reset_starts_a_new_stream() -> None:
    data = randbytes(14, 3 * MiB)
    chunker = Chunker(POL)
    chunker.feed(randbytes(15, 700 * KiB))
    assert chunker.pending > 0
    chunker.reset()
    assert chunker.pending == 0
    assert chunker.feed(data) == Chunker(POL).feed(data)


def test_pending_counts_the_unfinished_chunk() -> None:
    chunker = Chunker(POL)
    assert chunker.feed(bytes(MIN_SIZE - 1)) == []
    assert chunker.pending == MIN_SIZE - 1
    assert chunker.feed(bytes(10)) == [1]
    assert chunker.pending == 9


def test_feed_accepts_buffers() -> None:
    data = randbytes(16, 2 * MiB)
    expected = Chunker(POL).feed(data)
    assert Chunker(POL).feed(bytearray(data)) == expected
    assert Chunker(POL).feed(memoryview(data)) == expected
    assert Chunker(POL).feed(b"") == []
    with pytest.raises(TypeError):
        Chunker(POL).feed("text")  # type: ignore[arg-type]
    with pytest.raises(BufferError):
        Chunker(POL).feed(memoryview(data)[::2])


def test_attributes() -> None:
    chunker = Chunker(POL, 1000, 5000, 9)
    assert (chunker.polynomial, chunker.min_size, chunker.max_size, chunker.average_bits) == (
        POL,
        1000,
        5000,
        9,
    )
    default = Chunker(POL)
    assert (default.min_size, default.max_size, default.average_bits) == (MIN_SIZE, MAX_SIZE, 20)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(polynomial=0),
        dict(polynomial=0xFF >> 1),  # degree 6
        dict(polynomial=1 << 54 | 1),  # degree 54
        dict(polynomial=-5),
        dict(polynomial=1 << 70),
        dict(polynomial=POL, min_size=63),
        dict(polynomial=POL, min_size=2000, max_size=1999),
        dict(polynomial=POL, average_bits=0),
        dict(polynomial=POL, average_bits=64),
    ],
)
def test_bad_parameters(kwargs) -> None:
    with pytest.raises(ValueError):
        Chunker(**kwargs)


def test_polynomial_must_be_int() -> None:
    with pytest.raises(TypeError):
        Chunker("3da3358b4dc173")  # type: ignore[arg-type]


# --- iter_chunks and split --------------------------------------------------------------------


class ShortReads(io.RawIOBase):
    """A raw stream that returns a few random bytes per read, as pipes and sockets do."""

    def __init__(self, data: bytes, seed: int) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._rng = random.Random(seed)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self._rng.randint(1, 300 * KiB), len(self._data) - self._pos)
        b[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


class ReadOnly:
    """An object with nothing but ``read``."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def read(self, n: int) -> bytes:
        return self._f.read(n)


@pytest.mark.parametrize(
    "size",
    [0, 1, MIN_SIZE - 1, MIN_SIZE, MIN_SIZE + 1, MAX_SIZE - 1, MAX_SIZE, MAX_SIZE + 1, 21 * MiB],
)
def test_iter_chunks_matches_split(size, tmp_path) -> None:
    data = randbytes(size, size // 2) + b"\x05" * (size - size // 2)
    lengths = split(data, POL)
    expected = []
    pos = 0
    for n in lengths:
        expected.append(data[pos : pos + n])
        pos += n
    assert b"".join(expected) == data
    assert all(n > 0 for n in lengths)
    assert list(iter_chunks(io.BytesIO(data), POL)) == expected
    assert list(iter_chunks(ShortReads(data, size), POL, read_size=700 * KiB)) == expected
    assert list(iter_chunks(ReadOnly(data), POL, read_size=3 * MiB)) == expected
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert list(iter_chunks(fd, POL, read_size=MAX_SIZE)) == expected
        os.fstat(fd)  # still open
    finally:
        os.close(fd)


def test_split_edges() -> None:
    assert split(b"", POL) == []
    assert split(b"x", POL) == [1]
    assert split(bytes(MIN_SIZE), POL) == [MIN_SIZE]
    assert split(bytes(MIN_SIZE + 1), POL) == [MIN_SIZE, 1]
    assert split(bytes(3 * MIN_SIZE), POL) == [MIN_SIZE] * 3


def test_iter_chunks_propagates_read_errors() -> None:
    class Broken(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:
            raise OSError(5, "Input/output error")

    with pytest.raises(OSError, match="Input/output"):
        list(iter_chunks(Broken(), POL))


def test_iter_chunks_rejects_nonblocking_source() -> None:
    class WouldBlock(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, b):
            return None

    with pytest.raises(BlockingIOError):
        list(iter_chunks(WouldBlock(), POL))


def test_iter_chunks_rejects_oversized_reads() -> None:
    class TooMuch:
        def read(self, n: int) -> bytes:
            return bytes(n + 1)

    with pytest.raises(ValueError, match="returned"):
        list(iter_chunks(TooMuch(), POL))


def test_iter_chunks_can_be_abandoned() -> None:
    chunks = iter_chunks(io.BytesIO(bytes(5 * MIN_SIZE)), POL)
    assert next(chunks) == bytes(MIN_SIZE)
    chunks.close()


# --- threads ----------------------------------------------------------------------------------


def test_threads_give_the_sequential_result() -> None:
    buffers = [randbytes(20 + i, 24 * MiB) for i in range(2)]
    sequential = [split(b, POL) for b in buffers]
    barrier = threading.Barrier(2)

    def work(i: int) -> list[list[int]]:
        barrier.wait()
        return [split(buffers[i], POL) for _ in range(3)]

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(work, range(2)))
    for i in range(2):
        assert results[i] == [sequential[i]] * 3


def test_threads_streaming_with_own_chunkers() -> None:
    data = randbytes(22, 20 * MiB)
    expected = Chunker(POL).feed(data)

    def work(seed: int) -> list[int]:
        rng = random.Random(seed)
        return feed_in_pieces(Chunker(POL), data, [rng.randint(1, 3 * MiB) for _ in range(20)])

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(work, range(8))) == [expected] * 8


def test_feed_releases_the_gil_and_refuses_a_second_thread() -> None:
    """While one thread scans, another runs Python code and cannot use the same chunker.

    A bytearray cannot be resized while feed() holds its buffer; if this thread ever sees that, it ran
    while the other was inside feed(), which it could not have done had feed() kept the GIL.
    """
    buf = bytearray(randbytes(30, 32 * MiB))
    chunker = Chunker(POL)
    done = threading.Event()
    errors: list[BaseException] = []

    def scan() -> None:
        for _ in range(100):
            if done.is_set():
                return
            chunker.feed(buf)

    worker = threading.Thread(target=scan)
    worker.start()
    try:
        while worker.is_alive() and not done.is_set():
            try:
                buf.append(0)
            except BufferError:
                try:
                    chunker.reset()
                except RuntimeError as e:
                    errors.append(e)
                    done.set()
            else:
                buf.pop()
    finally:
        done.set()
        worker.join()
    assert errors, "feed() never let this thread run while it held the buffer"
    assert "in use by another thread" in str(errors[0])
