"""Known-answer tests: decode files restic 0.14 wrote (tests/data) and re-encode them byte for byte."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from vaultfs.errors import WrongPassword
from vaultfs.format import pack, unpacked
from vaultfs.format.config import Config
from vaultfs.format.gojson import go_quote, json_string
from vaultfs.format.index import IndexFile
from vaultfs.format.keyfile import KeyFile
from vaultfs.format.snapshot import Snapshot
from vaultfs.format.tree import GO_DIR, GO_NAMED_PIPE, GO_SYMLINK, decode_tree, encode_tree

DATA = Path(__file__).resolve().parents[1] / "data"
PASSWORD = b"known-answer"


def only(folder: Path) -> Path:
    (path,) = [p for p in folder.rglob("*") if p.is_file()]
    return path


@pytest.fixture(scope="module", params=[1, 2], ids=["v1", "v2"])
def repo(request):
    root = DATA / f"restic-v{request.param}"
    raw = only(root / "keys").read_bytes()
    master = KeyFile.decode(raw).open(PASSWORD)  # scrypt: once per module
    return request.param, root, master


def test_key_file_opens_and_names_match(repo):
    _version, root, _master = repo
    path = only(root / "keys")
    raw = path.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == path.name
    kf = KeyFile.decode(raw)
    assert (kf.n, kf.r) == (32768, 8) and len(kf.salt) == 64
    assert KeyFile.decode(kf.encode()) == kf
    with pytest.raises(WrongPassword):
        kf.open(b"not the password")


def test_config_reencodes_exactly(repo):
    version, root, master = repo
    plain = master.open((root / "config").read_bytes())
    config = Config.decode(plain)
    assert config.version == version
    assert config.encode() == plain
    assert len(plain) == 123


def _unpacked(root: Path, kind: str, master) -> tuple[bytes, bytes]:
    path = only(root / kind)
    raw = path.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == path.name
    plain = master.open(raw)
    return plain, unpacked.decode(plain)


def test_index_and_snapshot_reencode_exactly(repo):
    version, root, master = repo
    plain, doc = _unpacked(root, "index", master)
    assert (plain[0] == 2) == (version == 2)
    assert IndexFile.decode(doc).encode() == doc
    _plain, doc = _unpacked(root, "snapshots", master)
    snap = Snapshot.decode(doc)
    assert snap.hostname == "kat" and snap.tags == ["t1"]
    assert snap.encode() == doc


def test_packs_blobs_and_trees(repo):
    version, root, master = repo
    _plain, doc = _unpacked(root, "index", master)
    index = IndexFile.decode(doc)
    trees = {}
    for path in (root / "data").rglob("*"):
        if not path.is_file():
            continue
        raw = path.read_bytes()
        assert hashlib.sha256(raw).hexdigest() == path.name
        hlen = pack.header_length_from_tail(raw[-4:], len(raw))
        header = pack.decode_header(master.open(raw[-4 - hlen : -4]), version)
        pack.check_blobs_fit(header, hlen, len(raw), path.name)
        assert sorted(b.id for b in header) == sorted(
            b.id for b in index.packs[bytes.fromhex(path.name)]
        )
        assert pack.encode_header(header) == master.open(raw[-4 - hlen : -4])
        for b in header:
            plain = master.open(raw[b.offset : b.offset + b.length])
            if b.compressed:
                assert version == 2
                plain = unpacked.decompress(plain, b.uncompressed_length)
            assert hashlib.sha256(plain).digest() == b.id
            if b.blob_type == pack.TREE:
                trees[b.id] = plain
    _plain, doc = _unpacked(root, "snapshots", master)
    snap = Snapshot.decode(doc)
    nodes_by_name = {}
    for blob_id, plain in trees.items():
        nodes = decode_tree(plain)
        assert encode_tree(nodes) == plain, "tree must re-encode to restic's exact bytes"
        assert hashlib.sha256(encode_tree(nodes)).digest() == blob_id
        nodes_by_name.update({n.name: n for n in nodes})
    assert snap.tree in trees
    hello = nodes_by_name["hello.txt"]
    assert hello.type == "file" and hello.size == 13 and (hello.uid, hello.gid) == (1000, 1000)
    assert hello.extended_attributes == [("user.k", b"val")]
    assert hello.mtime.format().startswith("2024-05-06T07:08:09.123456789")
    assert nodes_by_name["link"].linktarget == "hello.txt"
    assert nodes_by_name["link"].mode & GO_SYMLINK
    assert nodes_by_name["fifo"].mode & GO_NAMED_PIPE and nodes_by_name["fifo"].content is None
    assert nodes_by_name["empty"].content == []
    assert nodes_by_name["dir"].mode & GO_DIR
    assert 'a"b\\c' in nodes_by_name


def test_name_quoting_matches_restic():
    assert json_string(go_quote(b'a"b\\c')) == '"a\\\\\\"b\\\\\\\\c"'
    assert go_quote(b"new\nline") == "new\\nline"
    assert go_quote(b"\xff\xfe") == "\\xff\\xfe"
    assert go_quote("caf\u00e9 \U0001f600".encode()) == "caf\u00e9 \U0001f600"
    assert go_quote(b"\x7f\x01") == "\\x7f\\x01"
    assert go_quote("\u00a0".encode()) == "\\u00a0"
    assert json_string("<&>") == '"\\u003c\\u0026\\u003e"'
