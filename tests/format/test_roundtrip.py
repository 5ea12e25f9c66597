"""Property tests for every codec: decode(encode(x)) == x, and damaged input raises a VaultError only."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vaultfs.crypto import MasterKey
from vaultfs.errors import VaultError
from vaultfs.format import pack, unpacked
from vaultfs.format.config import Config
from vaultfs.format.gojson import GoTime, go_quote, go_unquote, json_string
from vaultfs.format.index import IndexFile, decode_columns
from vaultfs.format.keyfile import KeyFile
from vaultfs.format.lock import Lock
from vaultfs.format.snapshot import Snapshot
from vaultfs.format.tree import NODE_TYPES, Node, decode_tree, encode_tree, fs_name

KEY = MasterKey.generate()
ids = st.binary(min_size=32, max_size=32)
texts = st.text(max_size=30)
go_times = st.builds(
    GoTime,
    st.integers(min_value=-(2**61), max_value=2**61),
    st.integers(min_value=-14 * 60, max_value=14 * 60).map(lambda m: m * 60),
)
names = st.binary(min_size=1, max_size=40).filter(lambda b: b"/" not in b and b"\0" not in b)


@given(st.binary(max_size=5000))
def test_seal_open(plain):
    sealed = KEY.seal(plain)
    assert len(sealed) == len(plain) + 32
    assert KEY.open(sealed) == plain


@given(st.binary(min_size=1, max_size=300), st.data())
def test_seal_detects_any_bit_flip(plain, data):
    sealed = bytearray(KEY.seal(plain))
    bit = data.draw(st.integers(0, len(sealed) * 8 - 1))
    sealed[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(VaultError):
        KEY.open(bytes(sealed))


@given(st.binary(max_size=31))
def test_open_short_input(raw):
    with pytest.raises(VaultError):
        KEY.open(raw)


@given(names)
def test_go_quote_roundtrip(name):
    quoted = go_quote(name)
    assert go_unquote(quoted) == name
    json_string(quoted).encode("ascii", "strict") if quoted.isascii() else None


@given(go_times)
def test_time_roundtrip(t):
    try:
        text = t.format()
    except VaultError:
        return  # outside years 1..9999, as in Go's JSON
    assert GoTime.parse(text) == t


nodes = st.builds(
    Node,
    name=names.map(fs_name),
    type=st.sampled_from(NODE_TYPES),
    mode=st.integers(0, 2**32 - 1),
    mtime=st.integers(0, 2**62).map(GoTime),
    atime=st.integers(0, 2**62).map(GoTime),
    ctime=st.integers(0, 2**62).map(GoTime),
    uid=st.integers(0, 2**32 - 1),
    gid=st.integers(0, 2**32 - 1),
    user=texts,
    group=texts,
    inode=st.integers(0, 2**64 - 1),
    device_id=st.integers(0, 2**64 - 1),
    size=st.integers(0, 2**64 - 1),
    links=st.integers(0, 2**32),
    linktarget=names.map(fs_name),
    extended_attributes=st.lists(
        st.tuples(st.text(min_size=1, max_size=10), st.binary(max_size=20))
    ),
    device=st.integers(0, 2**64 - 1),
    content=st.none() | st.lists(ids, max_size=4),
    subtree=st.none() | ids,
    error=texts,
)


def _valid_utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
        return "\ufffd" not in s
    except UnicodeEncodeError:
        return False


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(nodes, max_size=5, unique_by=lambda n: n.name))
def test_tree_roundtrip(node_list):
    # strings Go writes as JSON text must be valid UTF-8 to survive (Go replaces bad bytes with U+FFFD)
    node_list = [n for n in node_list if all(_valid_utf8(s) for s in (n.user, n.group, n.error))]
    node_list = [n for n in node_list if all(_valid_utf8(a) for a, _ in n.extended_attributes)]
    raw = encode_tree(node_list)
    back = decode_tree(raw)
    assert encode_tree(back) == raw
    assert [n.name for n in back] == sorted((n.name for n in node_list), key=os.fsencode)
    assert sorted(back, key=lambda n: n.name) == sorted(node_list, key=lambda n: n.name)


snapshots = st.builds(
    Snapshot,
    time=go_times.filter(lambda t: 0 <= t.ns < 2**62),
    tree=ids,
    paths=st.lists(texts.filter(_valid_utf8), max_size=3),
    hostname=texts.filter(_valid_utf8),
    username=texts.filter(_valid_utf8),
    uid=st.integers(0, 2**32 - 1),
    gid=st.integers(0, 2**32 - 1),
    excludes=st.lists(texts.filter(_valid_utf8), max_size=2),
    tags=st.lists(texts.filter(_valid_utf8), max_size=3),
    parent=st.none() | ids,
    original=st.none() | ids,
    program_version=texts.filter(_valid_utf8),
)


@given(snapshots)
def test_snapshot_roundtrip(snap):
    raw = snap.encode()
    assert Snapshot.decode(raw) == snap
    assert Snapshot.decode(raw).encode() == raw


packed = st.builds(
    lambda t, length, ulen, blob_id: (t, length, ulen, blob_id),
    st.sampled_from([pack.DATA, pack.TREE]),
    st.integers(32, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    ids,
)


def _with_offsets(entries):
    out, offset = [], 0
    for t, length, ulen, blob_id in entries:
        out.append(pack.PackedBlob(t, offset, length, ulen, blob_id))
        offset += length
    return out


@given(st.lists(packed, max_size=20))
def test_pack_header_roundtrip(entries):
    blobs = _with_offsets(entries)
    assert pack.decode_header(pack.encode_header(blobs), 2) == blobs


@given(
    st.dictionaries(ids, st.lists(packed, min_size=1, max_size=5), max_size=5),
    st.lists(ids.map(bytes.hex)),
)
def test_index_roundtrip(packs, supersedes):
    index = IndexFile({pid: _with_offsets(e) for pid, e in packs.items()}, supersedes)
    raw = index.encode()
    back = IndexFile.decode(raw)
    assert back == index and back.encode() == raw


@given(
    go_times.filter(lambda t: 0 <= t.ns < 2**62), st.booleans(), texts, texts, st.integers(0, 2**31)
)
def test_lock_roundtrip(t, exclusive, host, user, pid):
    lock = Lock(t, exclusive, host, user, pid, 1000, 0)
    if not (_valid_utf8(host) and _valid_utf8(user)):
        return
    assert Lock.decode(lock.encode()) == lock


@given(st.integers(1, 2), st.integers(1, 2**53))
def test_config_roundtrip(version, poly):
    config = Config.new(version, poly)
    assert Config.decode(config.encode()) == config


@given(st.binary(max_size=3000), st.sampled_from([1, 2]))
def test_unpacked_roundtrip(body, version):
    doc = b"{" + body
    assert unpacked.decode(unpacked.encode(doc, version)) == doc


DECODERS = [
    Config.decode,
    IndexFile.decode,
    decode_columns,
    Snapshot.decode,
    decode_tree,
    Lock.decode,
    KeyFile.decode,
    lambda raw: pack.decode_header(raw, 2),
    unpacked.decode,
    MasterKey.from_json,
]


@pytest.mark.parametrize("decode", DECODERS)
@given(raw=st.binary(max_size=300))
def test_random_input_raises_only_vault_errors(decode, raw):
    try:
        decode(raw)
    except VaultError:
        pass


def _valid_samples():
    t = GoTime(1_700_000_000_123_456_789)
    node = Node(name="f", type="file", mtime=t, atime=t, ctime=t, size=3, content=[b"\1" * 32])
    return [
        (Config.decode, Config.new(2, 0x3DA3358B4DC173).encode()),
        (
            IndexFile.decode,
            IndexFile({b"\2" * 32: _with_offsets([(0, 40, 8, b"\3" * 32)])}).encode(),
        ),
        (Snapshot.decode, Snapshot(t, b"\4" * 32, ["/x"], hostname="h").encode()),
        (decode_tree, encode_tree([node])),
        (Lock.decode, Lock(t, True, "h", "u", 1).encode()),
        (unpacked.decode, unpacked.encode(b'{"a":1}', 2)),
    ]


@pytest.mark.parametrize("decode,valid", _valid_samples())
@given(data=st.data())
def test_flipped_or_truncated_input_raises_only_vault_errors(decode, valid, data):
    raw = bytearray(valid)
    if data.draw(st.booleans()):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] ^= 1 << data.draw(st.integers(0, 7))
    else:
        del raw[data.draw(st.integers(0, len(raw) - 1)) :]
    try:
        decode(bytes(raw))
    except VaultError:
        pass


@given(st.dictionaries(ids, st.lists(packed, max_size=5), max_size=5))
def test_index_columns_agree_with_objects(packs):
    raw = IndexFile({pid: _with_offsets(e) for pid, e in packs.items()}).encode()
    cols = decode_columns(raw)
    flat = [
        (pid, b.id, b.blob_type, b.offset, b.length, b.uncompressed_length)
        for pid, blobs in IndexFile.decode(raw).packs.items()
        for b in blobs
    ]
    got = [
        (
            cols.pack_ids[cols.pack_of_blob[i]],
            cols.blob_ids[32 * i : 32 * i + 32],
            cols.blob_types[i],
            cols.offsets[i],
            cols.lengths[i],
            cols.uncompressed_lengths[i],
        )
        for i in range(len(cols.offsets))
    ]
    assert got == flat
    assert cols.pack_ids == list(packs)
