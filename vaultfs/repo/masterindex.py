"""The in-memory master index: where every blob of the vault lives (FORMAT.md §4, §5).

The union of all index files says, for each blob (a 32-byte SHA-256 id plus a type, data=0 or
tree=1), in which pack it lives, at which offset, with which stored length and, for compressed
blobs, which plaintext length. The same blob may sit in several packs and one pack may be listed by
several index files, so the index holds *locations*; exact duplicate locations are kept once.

Memory layout (ARCHITECTURE.md "Memory": at most 64 bytes per blob, not a dict of objects)::

    main tier, sorted by key, one row per location (49 bytes):
        keys  uint64[n]      big-endian value of id[0:8], searched with bisect            (8)
        rows  record[n]      id[8:32] | type u8 | pack u32 | offset | length | ulen u32  (41)
        dir   uint32[2^b+1]  where each bucket of the top b key bits starts, 2^b <= n/4  (<= 1)
    pending tier, locations added since the last merge, at most max(pending_min, n/16):
        rows  buffer         id | type u8 | pack u32 | offset | length | ulen u32   (49, fixed size)
        map   dict           key -> row number (a tuple of row numbers when keys collide)
    packs: a list of pack ids; rows name a pack by its uint32 position in that list.

Locations go to the pending tier first; when it is full, one pass of numpy work merges it into a new
main tier. The pending tier holds at most 1/16 of the main tier, so merges cost O(n) each but happen
geometrically rarely, and a full pending tier adds about 10 bytes per blob (about 155 bytes per
pending row: the row, its map entry and two ints), which keeps the whole under 60 bytes per blob.

Offsets and lengths are 32-bit, as in restic's own in-memory index: a value that does not fit raises
FormatError.

Thread safety: every method may be called from any thread. Writers (add_pack, add_arrays,
remove_packs) serialise on one lock. Lookups (lookup, lookup_all, has, size_of, ``in``, ``len``)
take no lock: they read one snapshot, a main tier and the pending tier that belongs to it. A merge
builds new arrays and swaps the whole snapshot with a single assignment, and a pending tier is only
ever appended to (rows are written before the map names them), so a lookup sees each location either
not yet or completely. A lookup racing an add may or may not see that add's locations; it never sees
a wrong location.
"""

from __future__ import annotations

import mmap
import struct
import sys
import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vaultfs.errors import FormatError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["BlobLocation", "MasterIndex", "DATA", "TREE"]

DATA = 0
TREE = 1

_ID_SIZE = 32
_U32_MAX = 0xFFFFFFFF
# Crypto overhead of one stored blob (16-byte IV + 16-byte MAC, FORMAT.md §2.2): an uncompressed
# blob's plaintext is that much shorter than its stored length.
_SEAL_OVERHEAD = 32

# What follows the id (or the rest of it) in every stored location.
_LOCATION_FIELDS = [
    ("type", "u1"),
    ("pack", "<u4"),
    ("offset", "<u4"),
    ("length", "<u4"),
    ("ulen", "<u4"),
]
# One location with its full id: the pending tier's rows and the unit of every batch (the numpy
# record type _ENTRY is made with numpy, below).
_ENTRY_STRUCT = struct.Struct("<32sB4I")
_ENTRY_SIZE = _ENTRY_STRUCT.size  # 49
# One location in the main tier: the id's first 8 bytes live in the separate key array (_ROW).
_ROW_STRUCT = struct.Struct("<24sB4I")
_ROW_SIZE = _ROW_STRUCT.size  # 41
_ENTRY: np.dtype
_ROW: np.dtype


def _load_numpy() -> None:
    """Import numpy and make the record types. Deferred to the first use (the first MasterIndex):
    commands import this module before they open a vault, and numpy's ~15 MB would otherwise be
    resident while the password's key derivation holds its 32 MiB, raising every command's peak."""
    global np, _ENTRY, _ROW
    import numpy

    _ENTRY = numpy.dtype([("id", "V32"), *_LOCATION_FIELDS])
    _ROW = numpy.dtype([("rest", "V24"), *_LOCATION_FIELDS])
    if _ENTRY.itemsize != _ENTRY_SIZE or _ROW.itemsize != _ROW_SIZE:
        raise AssertionError("numpy record types do not match the struct layouts")
    np = numpy


def preload_numpy() -> None:
    """Start importing numpy in a thread of its own, if it is not loaded yet. Repository.open calls
    this just before the password's key derivation, which runs without the GIL for ~0.1 s on one
    core: on the other the import is done by the time the first MasterIndex needs it (a first use
    meanwhile waits for the import, as Python's import lock makes any second importer wait). Costs
    numpy's ~13 MB of resident memory during the derivation's 32 MiB, instead of after it."""
    if isinstance(np, _NumpyOnFirstUse):
        threading.Thread(target=_load_numpy, name="vault-numpy", daemon=True).start()


if not TYPE_CHECKING:

    class _NumpyOnFirstUse:
        """Stands for numpy until the first attribute is asked for; every use in this module starts
        with ``np.<something>`` before it needs _ENTRY or _ROW (a MasterIndex makes its empty tier
        with np.empty first), so both exist by then."""

        def __getattr__(self, name: str) -> Any:
            _load_numpy()
            return getattr(np, name)

    np = _NumpyOnFirstUse()
# Byte widths inside a row: (id or rest) + type identify a (blob, type) group; the whole row
# identifies a location.
_KEY_SIZE = 8
_ROW_GROUP = _ID_SIZE - _KEY_SIZE + 1

_key_of = struct.Struct(">Q").unpack_from

# Arrays at least this large get their own memory mapping (see _mapped_empty).
_MAP_MIN = 1 << 20

# The pending tier never holds fewer rows than this, so small indexes do not merge on every pack.
_PENDING_MIN = 4096
# ... nor more than 1/_PENDING_SHARE of the main tier, which bounds its memory (about 155 bytes a
# row). A smaller share means more merges: 1/16 needs half the merge work of 1/32.
_PENDING_SHARE = 16


@dataclass(frozen=True, slots=True)
class BlobLocation:
    """Where one blob is stored: ``length`` bytes at ``offset`` in pack ``pack_id``.

    ``uncompressed_length`` is the plaintext size of a compressed blob, 0 for an uncompressed one.
    """

    blob_id: bytes
    blob_type: int
    pack_id: bytes
    offset: int
    length: int
    uncompressed_length: int


_new_object = object.__new__
_set_location_fields = tuple(
    BlobLocation.__dict__[name].__set__
    for name in ("blob_id", "blob_type", "pack_id", "offset", "length", "uncompressed_length")
)


def _location(
    blob_id: bytes, blob_type: int, pack_id: bytes, offset: int, length: int, ulen: int
) -> BlobLocation:
    """Build a BlobLocation without the frozen dataclass ``__init__``, which costs twice as much
    (it goes through ``object.__setattr__`` per field); lookups build one per call."""
    loc = _new_object(BlobLocation)
    set_id, set_type, set_pack, set_offset, set_length, set_ulen = _set_location_fields
    set_id(loc, blob_id)
    set_type(loc, blob_type)
    set_pack(loc, pack_id)
    set_offset(loc, offset)
    set_length(loc, length)
    set_ulen(loc, ulen)
    return loc


class _Tier:
    """An immutable sorted array of locations: the main tier (layout in the module docstring)."""

    __slots__ = (
        "n",
        "keys",
        "rows",
        "distinct",
        "_dir",
        "_shift",
        "_keys_mv",
        "_rows_mv",
        "_dir_mv",
    )

    def __init__(self, keys: np.ndarray, rows: np.ndarray, distinct: int) -> None:
        self.n = len(keys)
        self.keys = keys
        self.rows = rows
        self.distinct = distinct
        # A bucket directory on the top key bits narrows the bisect to a handful of rows; ids are
        # uniformly random, so buckets stay near their mean size of 4 to 8 rows.
        bits = max(0, self.n.bit_length() - 3)
        self._shift = 64 - bits
        if bits:
            # Shifted keys are below 2**63, so the int64 view is exact and saves a copy.
            top = np.right_shift(
                keys, np.uint64(self._shift), out=_mapped_empty(self.n, keys.dtype)
            )
            counts = np.bincount(top.view(np.int64), minlength=1 << bits)
            del top
            directory = np.zeros((1 << bits) + 1, dtype=np.uint32)
            np.cumsum(counts, out=directory[1:])
        else:
            directory = np.array([0, self.n], dtype=np.uint32)
        self._dir = directory
        self._keys_mv = keys.data
        self._rows_mv = rows.view(np.uint8).data
        self._dir_mv = directory.data

    @classmethod
    def empty(cls) -> _Tier:
        return cls(np.empty(0, np.uint64), np.empty(0, _ROW), 0)

    def nbytes(self) -> int:
        return self.keys.nbytes + self.rows.nbytes + self._dir.nbytes

    def find(
        self, key: int, rest: bytes, blob_type: int | None, out: list | None = None
    ) -> tuple | None:
        """The first row for (id, type) as a ``_ROW_STRUCT`` tuple, or None. With ``out``, append
        every matching row to it instead and return None."""
        p = key >> self._shift
        hi = self._dir_mv[p + 1]
        i = bisect_left(self._keys_mv, key, self._dir_mv[p], hi)
        keys = self._keys_mv
        while i < hi and keys[i] == key:
            row = _ROW_STRUCT.unpack_from(self._rows_mv, i * _ROW_SIZE)
            if row[0] == rest and (blob_type is None or row[1] == blob_type):
                if out is None:
                    return row
                out.append(row)
            i += 1
        return None


class _State:
    """One consistent snapshot: a main tier plus the pending tier that belongs to it.

    Only a writer (holding the lock) appends to the pending tier; a merge replaces the whole state.
    """

    __slots__ = ("main", "p_rows", "p_map", "p_cap", "p_used", "p_new")

    def __init__(self, main: _Tier, capacity: int) -> None:
        self.main = main
        # Fixed capacity: a buffer that never resizes cannot fail with BufferError while a reader
        # unpacks from it, and its memory is bounded up front. A large one is an anonymous mapping:
        # only rows written so far are resident, and all of it goes back to the OS after a merge.
        self.p_rows: bytearray | mmap.mmap = (
            bytearray(capacity * _ENTRY_SIZE)
            if capacity * _ENTRY_SIZE < _MAP_MIN
            else mmap.mmap(-1, capacity * _ENTRY_SIZE)
        )
        self.p_map: dict[int, int | tuple[int, ...]] = {}
        self.p_cap = capacity
        self.p_used = 0
        # Distinct (id, type) groups in the pending tier that are not in the main tier.
        self.p_new = 0

    def pending_find(
        self, key: int, blob_id: bytes, blob_type: int | None, out: list | None = None
    ) -> tuple | None:
        """Like ``_Tier.find`` for the pending tier; rows are ``_ENTRY_STRUCT`` tuples."""
        found = self.p_map.get(key)
        if found is None:
            return None
        for r in (found,) if isinstance(found, int) else found:
            row = _ENTRY_STRUCT.unpack_from(self.p_rows, r * _ENTRY_SIZE)
            if row[0] == blob_id and (blob_type is None or row[1] == blob_type):
                if out is None:
                    return row
                out.append(row)
        return None

    def pending_entries(self) -> np.ndarray:
        """A copy of the pending rows as an ``_ENTRY`` array."""
        return np.frombuffer(self.p_rows, _ENTRY, self.p_used).copy()


def _keys_of_entries(entries: np.ndarray) -> np.ndarray:
    """The native uint64 keys (big-endian id[0:8]) of an ``_ENTRY`` array."""
    raw = entries.view(np.uint8).reshape(-1, _ENTRY_SIZE)
    return np.ascontiguousarray(raw[:, :_KEY_SIZE]).view(">u8").ravel().astype(np.uint64)


def _rows_of_entries(entries: np.ndarray) -> np.ndarray:
    """The ``_ROW`` part (everything but the key) of an ``_ENTRY`` array."""
    rows = np.empty(len(entries), _ROW)
    rows.view(np.uint8).reshape(-1, _ROW_SIZE)[:] = entries.view(np.uint8).reshape(-1, _ENTRY_SIZE)[
        :, _KEY_SIZE:
    ]
    return rows


def _entries_of_rows(keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Rebuild full ``_ENTRY`` records from a key array and a ``_ROW`` array."""
    entries = np.empty(len(keys), _ENTRY)
    raw = entries.view(np.uint8).reshape(-1, _ENTRY_SIZE)
    raw[:, :_KEY_SIZE] = keys.astype(">u8").view(np.uint8).reshape(-1, _KEY_SIZE)
    raw[:, _KEY_SIZE:] = rows.view(np.uint8).reshape(-1, _ROW_SIZE)
    return entries


def _canonical_order(entries: np.ndarray) -> np.ndarray:
    """Indexes that sort entries by id, then type, then the rest of the location."""
    raw = entries.view(np.uint8).reshape(-1, _ENTRY_SIZE)
    words = np.ascontiguousarray(raw[:, :_ID_SIZE]).view(">u8")
    fields = np.ascontiguousarray(raw[:, _ID_SIZE + 1 :]).view("<u4")
    columns = [fields[:, 3], fields[:, 2], fields[:, 1], fields[:, 0], raw[:, _ID_SIZE]]
    columns += [words[:, 3], words[:, 2], words[:, 1], words[:, 0]]
    return np.lexsort(columns)


def _tie_positions(keys: np.ndarray) -> np.ndarray:
    """Positions of rows of a key-sorted array whose key also appears in a neighbouring row."""
    tie = keys[1:] == keys[:-1]
    in_run = np.zeros(len(keys), dtype=bool)
    in_run[1:] |= tie
    in_run[:-1] |= tie
    return np.flatnonzero(in_run)


def _normalize(entries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Sort a batch by key, drop exact duplicate locations, mark the first row of each (id, type).

    Returns (entries, keys, group_start, whether some keys are equal). Rows with equal keys are rare
    (the same blob in several packs, or with both types), so only they go through the full sort.
    """
    keys = _keys_of_entries(entries)
    order = np.argsort(keys, kind="stable")
    entries = entries[order]
    keys = keys[order]
    group_start = np.ones(len(keys), dtype=bool)
    ties = _tie_positions(keys)
    if not len(ties):
        return entries, keys, group_start, False
    sub = entries[ties]
    # Equal keys sort together, so reordering tied rows among their own positions keeps key order.
    sub = sub[_canonical_order(sub)]
    entries[ties] = sub
    raw = sub.view(np.uint8).reshape(-1, _ENTRY_SIZE)
    same_group = np.all(raw[1:, : _ID_SIZE + 1] == raw[:-1, : _ID_SIZE + 1], axis=1)
    duplicate = same_group & np.all(raw[1:] == raw[:-1], axis=1)
    group_start[ties[1:]] = ~same_group
    keep = np.ones(len(keys), dtype=bool)
    keep[ties[1:][duplicate]] = False
    return entries[keep], keys[keep], group_start[keep], True


def _count_distinct(keys: np.ndarray, rows: np.ndarray) -> int:
    """Number of distinct (id, type) groups in a key-sorted tier."""
    ties = _tie_positions(keys)
    if not len(ties):
        return len(keys)
    sub = _entries_of_rows(keys[ties], rows[ties])
    raw = sub[_canonical_order(sub)].view(np.uint8).reshape(-1, _ENTRY_SIZE)
    same_group = np.all(raw[1:, : _ID_SIZE + 1] == raw[:-1, : _ID_SIZE + 1], axis=1)
    return len(keys) - int(np.count_nonzero(same_group))


def _match_main(
    main: _Tier, entries: np.ndarray, keys: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each batch row: is this exact location in the main tier, and is its (id, type)?"""
    exact = np.zeros(len(keys), dtype=bool)
    group = np.zeros(len(keys), dtype=bool)
    if not main.n:
        return exact, group
    lo = np.searchsorted(main.keys, keys, side="left")
    cand = np.flatnonzero(main.keys[np.minimum(lo, main.n - 1)] == keys)
    if not len(cand):
        return exact, group
    # Pair each candidate with every main row of its key run (runs are short); compare all at once.
    lo = lo[cand]
    span = np.searchsorted(main.keys, keys[cand], side="right") - lo
    which = np.repeat(cand, span)
    first = np.repeat(lo, span)
    starts = np.repeat(np.cumsum(span) - span, span)
    other = first + (np.arange(len(which)) - starts)
    mine = entries.view(np.uint8).reshape(-1, _ENTRY_SIZE)[which, _KEY_SIZE:]
    theirs = main.rows.view(np.uint8).reshape(-1, _ROW_SIZE)[other]
    same_row = mine == theirs
    exact[which[np.all(same_row, axis=1)]] = True
    group[which[np.all(same_row[:, :_ROW_GROUP], axis=1)]] = True
    return exact, group


def _mapped_empty(n: int, dtype: np.dtype) -> np.ndarray:
    """An uninitialised array; a large one lives in its own anonymous memory mapping.

    Every merge replaces the main tier's arrays and makes temporaries of their size. Left to
    malloc, the old ones stay in the heap as free but resident memory (glibc raises its mmap and
    trim thresholds up to 32 and 64 MiB), which doubled the process's RSS per blob at a million
    blobs. A mapping goes back to the OS as soon as its array dies.
    """
    size = n * dtype.itemsize
    if size < _MAP_MIN:
        return np.empty(n, dtype)
    return np.frombuffer(mmap.mmap(-1, size), dtype, n)


def _merge(main: _Tier, entries: np.ndarray, distinct: int) -> _Tier:
    """A new tier holding the main tier's rows plus ``entries`` (any order, no exact duplicates)."""
    keys = _keys_of_entries(entries)
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    rows = _rows_of_entries(entries[order])
    total = main.n + len(keys)
    new_keys = _mapped_empty(total, keys.dtype)
    new_rows = _mapped_empty(total, _ROW)
    void = f"V{_ROW_SIZE}"
    if not main.n:
        new_keys[:] = keys
        new_rows.view(void)[:] = rows.view(void)
        return _Tier(new_keys, new_rows, distinct)
    # Each new row goes after the main rows with a key <= its own; shifting by its rank among the
    # new rows gives its final position, and the old rows fill the rest in order.
    dest = np.searchsorted(main.keys, keys, side="right") + np.arange(len(keys))
    old = _mapped_empty(total, np.dtype(bool))
    old[:] = True
    old[dest] = False
    new_keys[old] = main.keys
    new_keys[dest] = keys
    new_rows.view(void)[old] = main.rows.view(void)
    new_rows.view(void)[dest] = rows.view(void)
    return _Tier(new_keys, new_rows, distinct)


def _check_u32(column: np.ndarray, what: str) -> None:
    """Offsets and lengths must fit restic's 32-bit index fields."""
    if len(column) and (int(column.min()) < 0 or int(column.max()) > _U32_MAX):
        bad = int(column.min()) if int(column.min()) < 0 else int(column.max())
        raise FormatError(
            f"index entry {what} {bad} does not fit in 32 bits; rebuild the index "
            "(`vault rebuild-indexes`)"
        )


class MasterIndex:
    """The union of all index files: blob (id, type) -> locations, compact and thread-safe.

    ``pending_min`` is the smallest capacity of the pending tier (a tuning knob; small values make
    merges frequent, which tests use to exercise them).

    Any method may be called from any thread at any time; see the module docstring for what a lookup
    racing an add can see.
    """

    def __init__(self, *, pending_min: int = _PENDING_MIN) -> None:
        if pending_min < 1:
            raise ValueError("pending_min must be at least 1")
        self._pending_min = pending_min
        self._lock = threading.Lock()
        self._pack_list: list[bytes] = []
        self._pack_number: dict[bytes, int] = {}
        self._live: set[int] = set()
        self._state = _State(_Tier.empty(), pending_min)

    # ----------------------------------------------------------------------------- writing

    def add_pack(self, pack_id: bytes, blobs: Iterable[tuple[bytes, int, int, int, int]]) -> None:
        """Add the blobs of one pack: ``(blob_id, blob_type, offset, length, uncompressed_length)``.

        Adding the same pack (or the same locations) again is harmless: exact duplicate locations
        are kept once. A pack with no blobs is still recorded in ``pack_ids()``.

        Raises ValueError for ids that are not 32 bytes or types other than 0 and 1 (the index
        parser rejects those), FormatError when offset or lengths do not fit in 32 bits.
        Thread-safe; may merge, which takes about 10 ms per million blobs.
        """
        _check_id(pack_id, "pack id")
        rows = list(blobs)
        if not rows:
            ids: Sequence[bytes] = ()
            columns: list[Sequence[int]] = [(), (), (), ()]
        else:
            try:
                ids, types, offsets, lengths, ulens = zip(*rows, strict=True)
            except ValueError:
                raise ValueError(
                    "each blob must be (blob_id, blob_type, offset, length, uncompressed_length)"
                ) from None
            columns = [types, offsets, lengths, ulens]
        with self._lock:
            number = self._intern(pack_id)
            entries = _make_entries(ids, np.full(len(ids), number, np.uint32), *columns)
            self._add_entries_locked(entries)
            self._live.add(number)

    def add_arrays(
        self,
        pack_ids: Sequence[bytes],
        pack_of_blob: Any,
        blob_ids: bytes | bytearray | memoryview,
        blob_types: Any,
        offsets: Any,
        lengths: Any,
        uncompressed_lengths: Any,
    ) -> None:
        """Bulk-add many packs given as columns: the fast path for loading parsed index files.

        ``pack_ids`` are the packs of this call (each recorded in ``pack_ids()`` even if no blob
        names it); ``pack_of_blob[i]`` is the position in ``pack_ids`` of blob i's pack;
        ``blob_ids`` is the concatenation of the 32-byte blob ids; the other columns are integer
        sequences or arrays of the same length. Same semantics and errors as calling ``add_pack``
        per pack; thread-safe.
        """
        for pack_id in pack_ids:
            _check_id(pack_id, "pack id")
        raw = memoryview(blob_ids).cast("B")
        if len(raw) % _ID_SIZE:
            raise ValueError("blob_ids must be a concatenation of 32-byte ids")
        n = len(raw) // _ID_SIZE
        local = np.asarray(pack_of_blob, dtype=np.int64)
        if local.shape != (n,):
            raise ValueError(f"pack_of_blob: expected {n} values, got shape {local.shape}")
        if n and (int(local.min()) < 0 or int(local.max()) >= len(pack_ids)):
            raise ValueError("pack_of_blob refers to a pack outside pack_ids")
        with self._lock:
            numbers = np.array([self._intern(p) for p in pack_ids], dtype=np.uint32)
            entries = _make_entries(
                raw, numbers[local], blob_types, offsets, lengths, uncompressed_lengths
            )
            self._add_entries_locked(entries)
            self._live.update(numbers.tolist())

    def remove_packs(self, pack_ids: set[bytes]) -> None:
        """Forget every location in these packs (prune, repair). Unknown pack ids are ignored.

        Costs a pass over the whole index. Thread-safe; lookups running meanwhile see the index
        either before or after the removal.
        """
        with self._lock:
            numbers = {self._pack_number[p] for p in pack_ids if p in self._pack_number}
            if not numbers:
                return
            self._fold_locked(None)
            main = self._state.main
            doomed = np.isin(main.rows["pack"], np.fromiter(numbers, np.uint32, len(numbers)))
            if doomed.any():
                kept = ~doomed
                count = int(np.count_nonzero(kept))
                keys = np.compress(kept, main.keys, out=_mapped_empty(count, main.keys.dtype))
                rows = _mapped_empty(count, _ROW)
                void = f"V{_ROW_SIZE}"
                np.compress(kept, main.rows.view(void), out=rows.view(void))
                tier = _Tier(keys, rows, _count_distinct(keys, rows))
                self._state = _State(tier, self._capacity_for(tier.n))
            self._live -= numbers

    def _intern(self, pack_id: bytes) -> int:
        pack_id = bytes(pack_id)
        number = self._pack_number.get(pack_id)
        if number is None:
            number = len(self._pack_list)
            if number > _U32_MAX:
                raise FormatError("more than 2**32 packs; the index cannot hold them")
            # Append before publishing: a reader only learns the number from rows written later.
            self._pack_list.append(pack_id)
            self._pack_number[pack_id] = number
        return number

    def _capacity_for(self, main_rows: int) -> int:
        return max(self._pending_min, main_rows // _PENDING_SHARE)

    def _add_entries_locked(self, entries: np.ndarray) -> None:
        """Add a batch (``_ENTRY`` array, any order), skipping locations the index already has."""
        if not len(entries):
            return
        st = self._state
        entries, keys, group_start, ties = _normalize(entries)
        exact, group = _match_main(st.main, entries, keys)
        key_list = keys.tolist()
        collide = bool(st.p_map) and not st.p_map.keys().isdisjoint(key_list)
        if collide:
            # Keys already pending (rare: duplicates, re-added packs): compare these one by one.
            for i, key in enumerate(key_list):
                if key not in st.p_map:
                    continue
                wanted = entries[i : i + 1].tobytes()
                found: list[tuple] = []
                st.pending_find(key, wanted[:_ID_SIZE], wanted[_ID_SIZE], found)
                if found:
                    group[i] = True
                    exact[i] |= any(_ENTRY_STRUCT.pack(*row) == wanted for row in found)
        new_groups = int(np.count_nonzero(group_start & ~group))
        if exact.any():
            entries = entries[~exact]
            keys = keys[~exact]
            key_list = keys.tolist()
        n = len(entries)
        if not n:
            return
        if n > st.p_cap - st.p_used:
            self._fold_locked(entries, new_groups)
            return
        base = st.p_used
        st.p_rows[base * _ENTRY_SIZE : (base + n) * _ENTRY_SIZE] = entries.tobytes()
        # Rows are in place before the map names them: a concurrent lookup never reads a blank.
        p_map = st.p_map
        if not (ties or collide):
            p_map.update(zip(key_list, range(base, base + n), strict=True))
        else:
            for key, r in zip(key_list, range(base, base + n), strict=True):
                old = p_map.get(key)
                if old is None:
                    p_map[key] = r
                elif isinstance(old, int):
                    p_map[key] = (old, r)
                else:
                    p_map[key] = (*old, r)
        st.p_used = base + n
        st.p_new += new_groups
        if st.p_used >= st.p_cap:
            self._fold_locked(None)

    def _fold_locked(self, extra: np.ndarray | None, extra_new: int = 0) -> None:
        """Merge the pending tier and ``extra`` (checked for duplicates) into a new main tier."""
        st = self._state
        parts = [st.pending_entries()] if st.p_used else []
        if extra is not None:
            parts.append(extra)
        if not parts:
            return
        entries = parts[0] if len(parts) == 1 else np.concatenate(parts)
        tier = _merge(st.main, entries, st.main.distinct + st.p_new + extra_new)
        self._state = _State(tier, self._capacity_for(tier.n))

    # ----------------------------------------------------------------------------- reading

    def _first(self, blob_id: bytes, blob_type: int | None) -> tuple[bytes, tuple] | None:
        """(blob_id as bytes, one matching row) or None; rows of both tiers share fields 1 to 5."""
        if len(blob_id) != _ID_SIZE:
            return None
        if blob_id.__class__ is not bytes:
            blob_id = bytes(blob_id)
        st = self._state
        key = _key_of(blob_id)[0]
        row = st.main.find(key, blob_id[_KEY_SIZE:], blob_type)
        if row is None:
            row = st.pending_find(key, blob_id, blob_type)
            if row is None:
                return None
        return blob_id, row

    def lookup(self, blob_id: bytes, blob_type: int | None = None) -> BlobLocation | None:
        """One location of the blob (any type when ``blob_type`` is None), or None. Lock-free."""
        found = self._first(blob_id, blob_type)
        if found is None:
            return None
        blob_id, row = found
        return _location(blob_id, row[1], self._pack_list[row[2]], row[3], row[4], row[5])

    def lookup_all(self, blob_id: bytes, blob_type: int | None = None) -> list[BlobLocation]:
        """Every location of the blob (of one type, or of any type when ``blob_type`` is None).

        No order is promised. Lock-free.
        """
        if len(blob_id) != _ID_SIZE:
            return []
        blob_id = bytes(blob_id)
        st = self._state
        key = _key_of(blob_id)[0]
        rows: list[tuple] = []
        st.main.find(key, blob_id[_KEY_SIZE:], blob_type, rows)
        st.pending_find(key, blob_id, blob_type, rows)
        packs = self._pack_list
        return [_location(blob_id, r[1], packs[r[2]], r[3], r[4], r[5]) for r in rows]

    def has(self, blob_id: bytes, blob_type: int | None = None) -> bool:
        """True if the index knows the blob (of that type, or of any type). Lock-free."""
        return self._first(blob_id, blob_type) is not None

    def __contains__(self, blob_id: object) -> bool:
        """``blob_id in index``: the blob is known with any type."""
        if not isinstance(blob_id, (bytes, bytearray, memoryview)):
            return False
        return self.has(bytes(blob_id))

    def size_of(self, blob_id: bytes, blob_type: int) -> int | None:
        """The blob's plaintext size (``uncompressed_length``, or ``length - 32`` when stored
        uncompressed), or None when the blob is unknown. Lock-free."""
        loc = self.lookup(blob_id, blob_type)
        if loc is None:
            return None
        return loc.uncompressed_length or loc.length - _SEAL_OVERHEAD

    def __len__(self) -> int:
        """Number of distinct (blob_id, blob_type) pairs. Lock-free."""
        st = self._state
        return st.main.distinct + st.p_new

    def pack_ids(self) -> set[bytes]:
        """Every pack added and not removed since (including packs added with no blobs)."""
        with self._lock:
            return {self._pack_list[n] for n in self._live}

    def blobs_in_pack(self, pack_id: bytes) -> list[BlobLocation]:
        """Every location in one pack, in offset order. Scans the whole index (a few milliseconds
        per million blobs): meant for maintenance, not for hot paths."""
        number = self._pack_number.get(pack_id)
        if number is None:
            return []
        with self._lock:
            st = self._state
            pending = st.pending_entries()
        main = st.main
        mine = np.flatnonzero(main.rows["pack"] == number)
        found = list(self._locations(_entries_of_rows(main.keys[mine], main.rows[mine])))
        found += self._locations(pending[pending["pack"] == number])
        found.sort(key=lambda loc: (loc.offset, loc.blob_id, loc.blob_type))
        return found

    def iter_blobs(self) -> Iterator[BlobLocation]:
        """Every location, in no promised order (one per location: a blob in two packs comes twice).

        Iterates over a snapshot taken at the call, so concurrent adds neither disturb nor show up.
        """
        with self._lock:
            st = self._state
            pending = st.pending_entries()
        main = st.main

        def generate() -> Iterator[BlobLocation]:
            # Batches keep the temporary copies small while iterating a large index.
            for start in range(0, main.n, 65536):
                stop = start + 65536
                yield from self._locations(
                    _entries_of_rows(main.keys[start:stop], main.rows[start:stop])
                )
            yield from self._locations(pending)

        return generate()

    def nbytes(self) -> int:
        """Bytes held by the index: the arrays, the pending tier and its map, the pack list."""
        with self._lock:
            st = self._state
            total = st.main.nbytes() + len(st.p_rows) + sys.getsizeof(st.p_map)
            for key, rows in st.p_map.items():
                total += sys.getsizeof(key) + sys.getsizeof(rows)
            total += sys.getsizeof(self._pack_list) + sys.getsizeof(self._pack_number)
            total += sum(sys.getsizeof(p) for p in self._pack_list)
            total += sys.getsizeof(self._live) + sys.getsizeof(len(self._live)) * len(self._live)
            return total

    def _locations(self, entries: np.ndarray) -> Iterator[BlobLocation]:
        packs = self._pack_list
        for row in _ENTRY_STRUCT.iter_unpack(entries.tobytes()):
            yield _location(row[0], row[1], packs[row[2]], row[3], row[4], row[5])


def _check_id(value: Any, what: str) -> None:
    if not isinstance(value, (bytes, bytearray)) or len(value) != _ID_SIZE:
        raise ValueError(f"{what} must be {_ID_SIZE} bytes")


def _make_entries(
    ids: Sequence[bytes] | memoryview,
    packs: np.ndarray,
    types: Any,
    offsets: Any,
    lengths: Any,
    ulens: Any,
) -> np.ndarray:
    """Validate columns and pack them into an ``_ENTRY`` array. ``ids`` is a sequence of 32-byte ids
    or one buffer of concatenated ids."""
    n = len(packs)
    entries = np.empty(n, _ENTRY)
    if not n:
        return entries
    if isinstance(ids, memoryview):
        joined: Any = ids
    else:
        if set(map(len, ids)) != {_ID_SIZE}:
            raise ValueError(f"blob ids must be {_ID_SIZE} bytes")
        joined = b"".join(ids)
    entries["id"] = np.frombuffer(joined, "V32")
    try:
        # One conversion for all four integer columns is much cheaper than four.
        numbers = np.array([types, offsets, lengths, ulens], dtype=np.int64)
    except OverflowError:
        raise FormatError(
            "index entry offset or length is out of range (more than 32 bits); rebuild the index "
            "(`vault rebuild-indexes`)"
        ) from None
    if numbers.shape != (4, n):
        raise ValueError(f"every column must have {n} values")
    if int(numbers[0].min()) < DATA or int(numbers[0].max()) > TREE:
        raise ValueError("blob types must be 0 (data) or 1 (tree)")
    for what, column in zip(("offset", "length", "uncompressed_length"), numbers[1:], strict=True):
        _check_u32(column, what)
    entries["type"] = numbers[0]
    entries["pack"] = packs
    entries["offset"] = numbers[1]
    entries["length"] = numbers[2]
    entries["ulen"] = numbers[3]
    return entries
