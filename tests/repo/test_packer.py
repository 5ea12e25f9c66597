"""PackWriter: blobs sealed in place into pooled pack buffers, written in the foreground or by background
writer threads. Every pack is read back from a real local vault folder and checked blob by blob."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from vaultfs.backend import LocalBackend
from vaultfs.crypto import OVERHEAD, MasterKey
from vaultfs.format.pack import DATA, TREE, PackedBlob, decode_header, header_length_from_tail
from vaultfs.repo.packer import PackWriter

KEY = MasterKey.generate()


class Written:
    """The on_pack callback: remembers what each written pack holds."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.packs: dict[bytes, list[PackedBlob]] = {}

    def __call__(self, pack_id: bytes, blobs: list[PackedBlob]) -> None:
        with self.lock:
            assert pack_id not in self.packs
            self.packs[pack_id] = list(blobs)


def make(tmp_path) -> tuple[LocalBackend, Written]:
    backend = LocalBackend(str(tmp_path / "vault"))
    backend.create()
    return backend, Written()


def read_back(backend: LocalBackend, written: Written) -> dict[bytes, bytes]:
    """Every blob of every pack on disk, opened, by ID; checks names, headers and on_pack."""
    blobs: dict[bytes, bytes] = {}
    names = [name for name, _size in backend.list("data")]
    assert sorted(names) == sorted(p.hex() for p in written.packs)
    for name in names:
        data = backend.read("data", name)
        assert hashlib.sha256(data).hexdigest() == name
        hlen = header_length_from_tail(data[-4:], len(data))
        header = decode_header(KEY.open(data[-4 - hlen : -4]))
        assert header == written.packs[bytes.fromhex(name)]
        assert sum(b.length for b in header) + hlen + 4 == len(data)
        for b in header:
            blobs[b.id] = KEY.open(data[b.offset : b.offset + b.length])
    return blobs


def put(writer: PackWriter, blob_type: int, plain: bytes) -> bytes:
    blob_id = hashlib.sha256(plain).digest()
    slot = writer.reserve(blob_type, blob_id, len(plain) + OVERHEAD, 0)
    if slot is not None:
        KEY.seal_into(slot.view, plain)
        writer.commit(slot)
    return blob_id


@pytest.mark.parametrize("writers", [0, 2])
def test_threads_fill_packs_and_every_blob_reads_back(tmp_path, writers):
    backend, written = make(tmp_path)
    writer = PackWriter(backend, KEY, written, target_size=256 * 1024)
    if writers:
        writer.start_writers(writers)
    expected: dict[bytes, bytes] = {}
    lock = threading.Lock()

    def produce(seed: int) -> None:
        rng = __import__("random").Random(seed)
        for i in range(150):
            plain = rng.randbytes(rng.choice([10, 3000, 70_000, 200_000]))
            blob_id = put(writer, TREE if i % 7 == 0 else DATA, plain)
            with lock:
                expected[blob_id] = plain

    threads = [threading.Thread(target=produce, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.stop_writers()
    writer.flush()
    assert read_back(backend, written) == expected
    assert writer.packs_written == len(written.packs) > 10
    for blobs in written.packs.values():
        assert len({b.blob_type for b in blobs}) == 1  # data and trees apart


def test_a_blob_larger_than_a_pack_buffer_gets_a_pack_of_its_own(tmp_path):
    backend, written = make(tmp_path)
    writer = PackWriter(backend, KEY, written, target_size=64 * 1024)
    small = put(writer, TREE, b"small tree")
    big_plain = os.urandom(writer.capacity + 1000)
    big = put(writer, TREE, big_plain)
    writer.flush()
    blobs = read_back(backend, written)
    assert blobs[big] == big_plain and blobs[small] == b"small tree"
    assert sorted(len(b) for b in written.packs.values()) == [1, 1]


def test_the_same_blob_twice_in_the_open_pack_is_stored_once(tmp_path):
    backend, written = make(tmp_path)
    writer = PackWriter(backend, KEY, written)
    assert writer.add(DATA, b"i" * 32, KEY.seal(b"one"), 0)
    assert writer.pending(DATA, b"i" * 32)
    assert not writer.add(DATA, b"i" * 32, KEY.seal(b"one"), 0)
    writer.flush()
    assert [len(b) for b in written.packs.values()] == [1]


def test_an_aborted_slot_drops_its_pack_and_nothing_else(tmp_path):
    backend, written = make(tmp_path)
    writer = PackWriter(backend, KEY, written, target_size=1024)
    first = put(writer, DATA, os.urandom(2000))  # fills and writes the first pack
    slot = writer.reserve(DATA, b"x" * 32, 100 + OVERHEAD, 0)
    assert slot is not None
    writer.abort(slot)
    writer.flush()
    assert list(read_back(backend, written)) == [first]


def test_a_failing_background_write_is_raised_to_producers_and_by_flush(tmp_path):
    backend, written = make(tmp_path)

    def refuse() -> None:
        raise OSError("disk on fire")

    writer = PackWriter(backend, KEY, written, target_size=1024)
    writer.start_writers(1, before_write=refuse)
    with pytest.raises(OSError, match="disk on fire"):
        for _ in range(100):
            put(writer, DATA, os.urandom(2000))
    with pytest.raises(OSError, match="disk on fire"):
        writer.flush()
    writer.stop_writers()
    assert not written.packs and not list(backend.list("data"))


def test_reserve_many_stops_before_waiting_while_it_holds_slots(tmp_path):
    """Slots of packs that are full but not committed keep their buffers: a producer that waited for a
    buffer while holding such slots would wait forever once every buffer is taken."""
    backend, written = make(tmp_path)
    go = threading.Event()
    writer = PackWriter(backend, KEY, written, target_size=1024)
    writer.start_writers(1, before_write=lambda: go.wait(30))
    plains = {hashlib.sha256(p).digest(): p for p in (os.urandom(2000) for _ in range(8))}
    wanted = [(blob_id, len(p) + OVERHEAD, 0) for blob_id, p in plains.items()]
    result: list[list] = []
    first = threading.Thread(target=lambda: result.append(writer.reserve_many(DATA, wanted)))
    first.start()
    first.join(30)
    assert not first.is_alive(), "reserve_many waited for a buffer while holding slots"
    got = result[0]
    assert 0 < len(got) < len(wanted)  # each blob fills a pack: the buffers ran out on the way
    done = 0
    while True:
        for (blob_id, _length, _ulen), slot in zip(wanted[done:], got, strict=False):
            assert slot is not None
            KEY.seal_into(slot.view, plains[blob_id])
            writer.commit(slot)
        done += len(got)
        go.set()
        if done == len(wanted):
            break
        got = writer.reserve_many(DATA, wanted[done:])
    writer.stop_writers()
    writer.flush()
    assert read_back(backend, written) == plains
