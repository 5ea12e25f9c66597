"""Tests for vaultfs/repo/masterindex.py: the compact in-memory master index.

The index is checked against a plain set-of-locations model under hypothesis (random adds, the same
blob in several packs, re-added packs, removals, lookups of missing ids, type filters), with a tiny
pending tier so that merges happen all the time; then for lock-free lookups racing adds and
removals; then for its memory budget (ARCHITECTURE.md: at most 64 bytes per blob).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import sys
import threading
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from vaultfs.errors import FormatError
from vaultfs.repo.masterindex import BlobLocation, MasterIndex

Row = tuple[bytes, int, bytes, int, int, int]  # (blob_id, type, pack_id, offset, length, ulen)


def _h(*parts: object) -> bytes:
    return hashlib.sha256(repr(parts).encode()).digest()


# Blob ids in groups of three that share their first 8 bytes, so the index's key ties are exercised.
BLOB_IDS = [_h("prefix", g)[:8] + _h("rest", g, i)[:24] for g in range(4) for i in range(3)]
MISSING_IDS = [_h("prefix", 0)[:8] + _h("missing")[:24], _h("missing entirely")]
PACK_IDS = [_h("pack", i) for i in range(6)]

blob_entries = st.tuples(
    st.sampled_from(BLOB_IDS),
    st.sampled_from([0, 1]),
    st.sampled_from([0, 7, 2**32 - 1]),
    st.sampled_from([32, 100, 2**32 - 1]),
    st.sampled_from([0, 5, 2**32 - 1]),
)


def _loc(row: Row) -> BlobLocation:
    return BlobLocation(*row)


class IndexAgainstModel(RuleBasedStateMachine):
    """The index must answer exactly like a set of locations plus a set of packs."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: set[Row] = set()
        self.packs: set[bytes] = set()
        self.index = MasterIndex()

    @initialize(pending_min=st.integers(min_value=1, max_value=8))
    def make_index(self, pending_min: int) -> None:
        self.index = MasterIndex(pending_min=pending_min)

    @rule(pack=st.sampled_from(PACK_IDS), blobs=st.lists(blob_entries, max_size=12))
    def add_pack(self, pack: bytes, blobs: list[tuple[bytes, int, int, int, int]]) -> None:
        self.index.add_pack(pack, blobs)
        self.packs.add(pack)
        self.rows.update((b, t, pack, o, n, u) for b, t, o, n, u in blobs)

    @rule(
        packs=st.lists(st.sampled_from(PACK_IDS), min_size=1, max_size=3, unique=True),
        blobs=st.lists(st.tuples(st.integers(0, 2), blob_entries), max_size=20),
    )
    def add_arrays(self, packs: list[bytes], blobs: list[tuple[int, tuple]]) -> None:
        blobs = [(i % len(packs), entry) for i, entry in blobs]
        self.index.add_arrays(
            packs,
            [i for i, _ in blobs],
            b"".join(e[0] for _, e in blobs),
            [e[1] for _, e in blobs],
            [e[2] for _, e in blobs],
            [e[3] for _, e in blobs],
            [e[4] for _, e in blobs],
        )
        self.packs.update(packs)
        self.rows.update((e[0], e[1], packs[i], e[2], e[3], e[4]) for i, e in blobs)

    @rule(doomed=st.sets(st.sampled_from([*PACK_IDS, _h("never added")]), max_size=3))
    def remove_packs(self, doomed: set[bytes]) -> None:
        self.index.remove_packs(doomed)
        self.packs -= doomed
        self.rows = {r for r in self.rows if r[2] not in doomed}

    @invariant()
    def lookups_agree(self) -> None:
        for blob_id in BLOB_IDS + MISSING_IDS:
            for blob_type in (None, 0, 1):
                want = {
                    _loc(r)
                    for r in self.rows
                    if r[0] == blob_id and (blob_type is None or r[1] == blob_type)
                }
                got = self.index.lookup_all(blob_id, blob_type)
                assert len(got) == len(set(got)), "a location was reported twice"
                assert set(got) == want
                first = self.index.lookup(blob_id, blob_type)
                assert (first is None) if not want else (first in want)
                assert self.index.has(blob_id, blob_type) == bool(want)
                if blob_type is not None:
                    sizes = {loc.uncompressed_length or loc.length - 32 for loc in want}
                    size = self.index.size_of(blob_id, blob_type)
                    assert (size is None) if not want else (size in sizes)
            assert (blob_id in self.index) == any(r[0] == blob_id for r in self.rows)

    @invariant()
    def counts_agree(self) -> None:
        assert len(self.index) == len({(r[0], r[1]) for r in self.rows})
        assert self.index.pack_ids() == self.packs

    @invariant()
    def listings_agree(self) -> None:
        listed = Counter(self.index.iter_blobs())
        assert listed == Counter(_loc(r) for r in self.rows)
        for pack in PACK_IDS:
            in_pack = self.index.blobs_in_pack(pack)
            assert Counter(in_pack) == Counter(_loc(r) for r in self.rows if r[2] == pack)
            assert [loc.offset for loc in in_pack] == sorted(loc.offset for loc in in_pack)


TestIndexAgainstModel = IndexAgainstModel.TestCase
TestIndexAgainstModel.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


def _synthetic_packs(seed: int, blobs: int, sizes: tuple[int, int]) -> Iterator[tuple[bytes, list]]:
    """Packs of random size holding ``blobs`` random data blobs in total, deterministic per seed."""
    rng = random.Random(seed)
    made = 0
    while made < blobs:
        count = min(rng.randint(*sizes), blobs - made)
        pack = rng.randbytes(32)
        entries = [(rng.randbytes(32), 0, i * 4096, 4096, 8000) for i in range(count)]
        made += count
        yield pack, entries


def test_the_same_blob_in_several_packs() -> None:
    index = MasterIndex(pending_min=2)
    blob = _h("blob")
    index.add_pack(PACK_IDS[0], [(blob, 0, 0, 100, 0)])
    index.add_pack(PACK_IDS[1], [(blob, 0, 50, 100, 0), (blob, 1, 150, 60, 200)])
    index.add_pack(PACK_IDS[1], [(blob, 0, 50, 100, 0)])  # the same pack again: harmless
    assert len(index) == 2
    assert {loc.pack_id for loc in index.lookup_all(blob, 0)} == {PACK_IDS[0], PACK_IDS[1]}
    assert index.size_of(blob, 1) == 200
    assert index.size_of(blob, 0) == 68
    index.remove_packs({PACK_IDS[0]})
    assert index.lookup_all(blob, 0) == [BlobLocation(blob, 0, PACK_IDS[1], 50, 100, 0)]
    index.remove_packs({PACK_IDS[1]})
    assert len(index) == 0
    assert index.lookup(blob) is None
    assert index.pack_ids() == set()


def test_empty_pack_is_recorded_and_removable() -> None:
    index = MasterIndex()
    index.add_pack(bytearray(PACK_IDS[0]), [])
    assert index.pack_ids() == {PACK_IDS[0]}
    assert len(index) == 0
    index.remove_packs({PACK_IDS[0]})
    assert index.pack_ids() == set()


def test_odd_lookups_answer_not_found() -> None:
    index = MasterIndex()
    index.add_pack(PACK_IDS[0], [(BLOB_IDS[0], 0, 0, 40, 0)])
    assert index.lookup(b"short") is None
    assert index.lookup_all(b"") == []
    assert not index.has(BLOB_IDS[0] + b"x")
    assert "text" not in index
    assert 42 not in index
    assert bytearray(BLOB_IDS[0]) in index
    assert index.lookup(memoryview(BLOB_IDS[0])) == BlobLocation(
        BLOB_IDS[0], 0, PACK_IDS[0], 0, 40, 0
    )
    assert index.size_of(BLOB_IDS[0], 1) is None
    assert index.blobs_in_pack(_h("unknown")) == []


def test_locations_are_real_frozen_dataclasses() -> None:
    index = MasterIndex()
    index.add_pack(PACK_IDS[0], [(BLOB_IDS[0], 1, 8, 40, 9)])
    loc = index.lookup(BLOB_IDS[0])
    assert loc == BlobLocation(BLOB_IDS[0], 1, PACK_IDS[0], 8, 40, 9)
    assert hash(loc) == hash(BlobLocation(BLOB_IDS[0], 1, PACK_IDS[0], 8, 40, 9))
    assert repr(loc).startswith("BlobLocation(blob_id=")
    with pytest.raises(dataclasses.FrozenInstanceError):
        loc.offset = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "entry",
    [
        (b"x" * 31, 0, 0, 40, 0),
        (b"x" * 33, 0, 0, 40, 0),
        (b"x" * 32, 2, 0, 40, 0),
        (b"x" * 32, 0, 0),
    ],
)
def test_malformed_entries_are_refused(entry: tuple) -> None:
    index = MasterIndex()
    with pytest.raises(ValueError):
        index.add_pack(PACK_IDS[0], [(BLOB_IDS[0], 0, 0, 40, 0), entry])
    assert len(index) == 0


@pytest.mark.parametrize("field", [2, 3, 4])
@pytest.mark.parametrize("value", [-1, 2**32, 2**64])
def test_numbers_beyond_32_bits_are_a_format_error(field: int, value: int) -> None:
    entry = [BLOB_IDS[0], 0, 0, 40, 0]
    entry[field] = value
    index = MasterIndex()
    with pytest.raises(FormatError):
        index.add_pack(PACK_IDS[0], [tuple(entry)])
    assert len(index) == 0 and index.pack_ids() == set()


def test_bad_pack_ids_and_arrays_are_refused() -> None:
    index = MasterIndex()
    with pytest.raises(ValueError):
        index.add_pack(b"short", [])
    with pytest.raises(ValueError):
        index.add_arrays([PACK_IDS[0]], [0], b"x" * 31, [0], [0], [40], [0])
    with pytest.raises(ValueError):
        index.add_arrays([PACK_IDS[0]], [1], b"x" * 32, [0], [0], [40], [0])
    with pytest.raises(ValueError):
        index.add_arrays([PACK_IDS[0]], [0, 0], b"x" * 64, [0], [0], [40], [0])
    with pytest.raises(ValueError):
        MasterIndex(pending_min=0)


def test_add_arrays_equals_add_pack() -> None:
    packs = list(_synthetic_packs(1, 20_000, (1, 700)))
    one_by_one = MasterIndex(pending_min=256)
    for pack, entries in packs:
        one_by_one.add_pack(pack, entries)
    bulk = MasterIndex()
    rows = [(p, e) for p, (_, entries) in enumerate(packs) for e in entries]
    bulk.add_arrays(
        [pack for pack, _ in packs],
        np.array([p for p, _ in rows]),
        b"".join(e[0] for _, e in rows),
        np.array([e[1] for _, e in rows], dtype=np.uint8),
        np.array([e[2] for _, e in rows], dtype=np.uint32),
        np.array([e[3] for _, e in rows], dtype=np.uint32),
        np.array([e[4] for _, e in rows], dtype=np.uint32),
    )
    assert len(bulk) == len(one_by_one) == 20_000
    assert set(bulk.iter_blobs()) == set(one_by_one.iter_blobs())
    assert bulk.pack_ids() == one_by_one.pack_ids() == {pack for pack, _ in packs}
    # Loading everything a second time (every index file listed twice) changes nothing.
    for pack, entries in packs:
        bulk.add_pack(pack, entries)
    assert len(bulk) == 20_000
    assert sum(1 for _ in bulk.iter_blobs()) == 20_000


def test_iter_blobs_is_a_snapshot() -> None:
    index = MasterIndex(pending_min=16)
    packs = list(_synthetic_packs(2, 2_000, (10, 50)))
    for pack, entries in packs[: len(packs) // 2]:
        index.add_pack(pack, entries)
    listing = index.iter_blobs()
    before = len(index)
    for pack, entries in packs[len(packs) // 2 :]:
        index.add_pack(pack, entries)
    assert sum(1 for _ in listing) == before < len(index)


def test_lookups_racing_adds_and_removals_are_never_wrong() -> None:
    """Readers look up blobs of finished packs (must be found, exactly), of unfinished or doomed
    packs (found exactly or not at all) and unknown blobs (never found) while two writers add packs,
    merging constantly, and a third removes some packs."""
    index = MasterIndex(pending_min=64)
    plans = [list(_synthetic_packs(seed, 30_000, (1, 400))) for seed in (10, 11)]
    doomed = {pack for plan in plans for pack, _ in plan[::7]}
    expected = {
        e[0]: BlobLocation(e[0], e[1], pack, e[2], e[3], e[4])
        for plan in plans
        for pack, entries in plan
        for e in entries
    }
    everything = list(expected)
    finished: list[bytes] = []  # blobs of packs whose add_pack returned and that are never removed
    errors: list[str] = []
    writing = threading.Event()
    writing.set()

    def writer(plan: list[tuple[bytes, list]], bulk: bool) -> None:
        for i, (pack, entries) in enumerate(plan):
            if bulk and i % 2:
                index.add_arrays(
                    [pack],
                    [0] * len(entries),
                    b"".join(e[0] for e in entries),
                    *[[e[f] for e in entries] for f in range(1, 5)],
                )
            else:
                index.add_pack(pack, entries)
            if pack not in doomed:
                finished.extend(e[0] for e in entries)

    def remover() -> None:
        rng = random.Random(3)
        while writing.is_set():
            index.remove_packs(set(rng.sample(sorted(doomed), 5)))

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        while writing.is_set() or rng.random() < 0.999:
            if finished:
                blob = finished[rng.randrange(len(finished))]
                if index.lookup(blob, 0) != expected[blob] or not index.has(blob):
                    errors.append(f"finished blob {blob.hex()} not found exactly")
                if index.lookup_all(blob) != [expected[blob]]:
                    errors.append(f"finished blob {blob.hex()}: {index.lookup_all(blob)}")
            blob = everything[rng.randrange(len(everything))]
            if index.lookup(blob) not in (None, expected[blob]):
                errors.append(f"blob {blob.hex()} found with a wrong location")
            if index.lookup(_h("unknown", rng.random())) is not None:
                errors.append("an unknown blob was found")
            if index.lookup(blob, 1) is not None:
                errors.append(f"data blob {blob.hex()} found as a tree")
            if len(index) > len(expected):
                errors.append(f"len() {len(index)} exceeds what was ever added")

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        writers = [
            threading.Thread(target=writer, args=(plan, bool(i))) for i, plan in enumerate(plans)
        ]
        others = [threading.Thread(target=remover)]
        others += [threading.Thread(target=reader, args=(s,)) for s in range(3)]
        for t in writers + others:
            t.start()
        for t in writers:
            t.join()
        writing.clear()
        for t in others:
            t.join()
    finally:
        sys.setswitchinterval(old_interval)
    assert not errors, errors[:5]
    index.remove_packs(doomed)
    survivors = {b: loc for b, loc in expected.items() if loc.pack_id not in doomed}
    assert len(index) == len(survivors)
    assert set(index.iter_blobs()) == set(survivors.values())


def test_memory_per_blob_stays_within_budget() -> None:
    """ARCHITECTURE.md "Memory": at most 64 bytes per blob, however full the pending tier is."""
    index = MasterIndex()
    worst = 0.0
    for i, (pack, entries) in enumerate(_synthetic_packs(4, 200_000, (100, 1000))):
        index.add_pack(pack, entries)
        if len(index) >= 100_000 and i % 5 == 0:
            worst = max(worst, index.nbytes() / len(index))
    assert len(index) == 200_000
    final = index.nbytes() / len(index)
    # The arrays alone take 49 bytes per location: a smaller figure would mean nbytes() undercounts.
    assert 49 <= final <= 64
    assert worst <= 64


def test_numpy_is_imported_by_the_first_index_not_by_the_module():
    """Commands import this module before the key derivation; numpy must load only afterwards."""
    import subprocess

    probe = (
        "import sys\n"
        "from vaultfs.repo.masterindex import MasterIndex\n"
        "before = 'numpy' in sys.modules\n"
        "index = MasterIndex()\n"
        "print(before, 'numpy' in sys.modules, len(index))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "0"]
