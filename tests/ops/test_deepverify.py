"""vault deep-verify: what it finds in damaged vaults made by the real restic.

The vault (built once per session by restic 0.14, about 1.5 MB) holds three snapshots:

* ``a``: src/a (three 300 kB random files, a text file, a file in a sub-folder)
* ``b``: src/b (three 200 kB random files)
* ``c``: src/a and src/b, after a new file src/a/n.txt was added (shares a's and b's data)

Each backup writes its own packs, so damage to the packs of ``a`` hurts ``a`` and ``c`` but never ``b``.
The helpers here are shared by the rebuild and repair tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zstandard

from tests.helpers.restic import Restic
from tests.tools.cli import one_line_error, vault
from vaultfs.backend import LocalBackend, open_backend
from vaultfs.format import unpacked
from vaultfs.format.index import IndexFile
from vaultfs.format.pack import DATA, PackedBlob, encode_header
from vaultfs.ops.deepverify import deep_verify, parse_header
from vaultfs.ops.rebuild import encode_packindex, rebuild_indexes
from vaultfs.ops.restore import restore
from vaultfs.ops.verify import verify
from vaultfs.repo.cache import VaultCache
from vaultfs.repo.repository import Repository

PASSWORD = "maintenance pw"
_BASE: dict[str, BaseVault] = {}
_KEYS: dict[str, tuple] = {}


@dataclass
class BaseVault:
    path: Path
    ids: dict[str, str]
    #: per snapshot: path inside the snapshot -> content
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)


def _build(base: Path) -> BaseVault:
    src = base / "src"
    a, b = src / "a", src / "b"
    (a / "sub").mkdir(parents=True)
    b.mkdir()
    content: dict[str, bytes] = {}
    rnd = __import__("random").Random(5)
    for i in (1, 2, 3):
        content[f"/src/a/f{i}"] = rnd.randbytes(300_000)
        content[f"/src/b/g{i}"] = rnd.randbytes(200_000)
    content["/src/a/t.txt"] = b"hello vault\n" * 200
    content["/src/a/sub/deep.txt"] = b"deep down\n" * 50
    for path, data in content.items():
        (base / path.lstrip("/")).write_bytes(data)
    restic = Restic(base / "repo", PASSWORD, cache_dir=base / "cache")
    restic.init(version=2)
    ids = [restic.backup(["src/a"], cwd=base, tags=["a"], full_id=False)]
    ids.append(restic.backup(["src/b"], cwd=base, tags=["b"], full_id=False))
    content["/src/a/n.txt"] = b"new file\n"
    (a / "n.txt").write_bytes(content["/src/a/n.txt"])
    ids.append(restic.backup(["src/a", "src/b"], cwd=base, tags=["c"], full_id=False))
    full = restic.full_ids(*ids)
    files = {
        "a": {p: d for p, d in content.items() if p.startswith("/src/a/") and p != "/src/a/n.txt"},
        "b": {p: d for p, d in content.items() if p.startswith("/src/b/")},
        "c": dict(content),
    }
    for root, _dirs, names in os.walk(base / "repo"):
        for name in names:
            os.chmod(os.path.join(root, name), 0o600)  # so tests can damage copies
    return BaseVault(base / "repo", dict(zip("abc", full, strict=True)), files)


def make_vault_copy(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Vault:
    """A fresh copy of the session's three-snapshot vault (built on first use), free to damage."""
    if "v" not in _BASE:
        _BASE["v"] = _build(tmp_path_factory.mktemp("maintenance-base"))
    base = _BASE["v"]
    if "key" not in _KEYS:  # from the pristine vault: a test may damage its copy's keys
        opened = Repository.open(LocalBackend(str(base.path)), PASSWORD.encode())
        _KEYS["key"] = (opened.key, opened.config)
    shutil.copytree(base.path, tmp_path / "vault")
    return Vault(tmp_path / "vault", base.ids, base.files, tmp_path)


@pytest.fixture
def vault_copy(tmp_path_factory, tmp_path) -> Vault:
    return make_vault_copy(tmp_path_factory, tmp_path)


class Vault:
    """A damageable copy of the base vault, with helpers to find, damage and restore things."""

    def __init__(self, path: Path, ids: dict[str, str], files: dict, tmp: Path) -> None:
        self.path = path
        self.ids = ids
        self.files = files
        self.tmp = tmp
        self._restic: Restic | None = None

    def open(self) -> Repository:
        """The vault opened with the session's master key (scrypt runs once per session)."""
        key, config = _KEYS["key"]
        repo = Repository(LocalBackend(str(self.path)), key, config)
        repo.load_index()
        return repo

    @property
    def restic(self) -> Restic:
        if self._restic is None:
            self._restic = Restic(self.path, PASSWORD, cache_dir=self.tmp / "restic-cache")
        return self._restic

    def restic_ok(self, *args: str) -> bool:
        return self.restic.run("check", *args, check=False).returncode == 0

    def pack_file(self, pack: str) -> Path:
        return self.path / "data" / pack[:2] / pack

    def blob_of(self, repo: Repository, tag: str, path: str):
        """The index location of the first data blob of ``path`` in snapshot ``tag``."""
        snap = repo.load_snapshot(self.ids[tag])
        node = repo.find_path(snap.tree, path)
        assert node is not None and node.content
        return repo.index.lookup(node.content[0], DATA)

    def damage_blob(self, tag: str, path: str, delta: int = 100) -> str:
        """Flip a bit inside the first blob of a file; returns the pack's id."""
        repo = self.open()
        loc = self.blob_of(repo, tag, path)
        flip(self.pack_file(loc.pack_id.hex()), loc.offset + delta)
        return loc.pack_id.hex()

    def restore_matches(self, snap_id: str, expected: dict[str, bytes]) -> None:
        """Restore with vaultfs and compare every file with ``expected`` (path -> content)."""
        target = self.tmp / f"restore-{snap_id[:8]}"
        report = restore(self.open(), snap_id, target)
        assert report.ok, report.errors
        got = {}
        for root, _dirs, names in os.walk(target):
            for name in names:
                full = os.path.join(root, name)
                got["/" + os.path.relpath(full, target)] = Path(full).read_bytes()
        assert got.keys() == expected.keys()
        for path, data in expected.items():
            assert got[path] == data, path
        shutil.rmtree(target)


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    os.chmod(path, 0o600)
    path.write_bytes(bytes(data))


def corrupt_at_generation(v: Vault, tag: str, path: str) -> tuple[str, bytes]:
    """Rewrite the pack holding ``path``'s first blob so that blob decrypts fine (its MAC is right)
    but to the wrong content, as if RAM had flipped a bit before the pack was written. The pack file
    is named by its hash and the index points at it, so only reading the blob can tell. Returns
    (new pack id, damaged blob id)."""
    repo = v.open()
    loc = v.blob_of(repo, tag, path)
    old = loc.pack_id.hex()
    data = v.pack_file(old).read_bytes()
    blobs = parse_header(repo, data, len(data), old)
    parts, entries, offset = [], [], 0
    for b in blobs:
        sealed = data[b.offset : b.offset + b.length]
        if b.id == loc.blob_id:
            plain = bytearray(repo.decode_blob(loc, sealed))
            plain[7] ^= 0x40
            sealed = repo.key.seal(unpacked.compress(bytes(plain)) if b.compressed else plain)
        parts.append(sealed)
        entries.append(PackedBlob(b.blob_type, offset, len(sealed), b.uncompressed_length, b.id))
        offset += len(sealed)
    header = repo.key.seal(encode_header(entries))
    pack = b"".join(parts) + header + struct.pack("<I", len(header))
    new = hashlib.sha256(pack).hexdigest()
    repo.backend.write("data", new, pack)
    for name, _size in list(repo.backend.list("index")):
        index = IndexFile.decode(repo.load_unpacked("index", name))
        if loc.pack_id in index.packs:
            del index.packs[loc.pack_id]
            index.packs[bytes.fromhex(new)] = entries
            repo.save_unpacked("index", index.encode())
            repo.backend.remove("index", name)
    repo.backend.remove("data", old)
    return new, loc.blob_id


# -- tests ---------------------------------------------------------------------------------------


def test_clean_vault_agrees_with_restic(vault_copy):
    v = vault_copy
    report = deep_verify(v.open(), read_data=True)
    assert report.ok and report.problems == [] and report.warnings == []
    assert report.snapshots == 3 and report.key_files == 1
    assert report.packs_read == report.packs and report.blobs_read >= report.blobs
    assert v.restic_ok("--read-data")


def test_damaged_tree_names_the_snapshots_and_folders(vault_copy):
    v = vault_copy
    repo = v.open()
    snap = repo.load_snapshot(v.ids["a"])
    sub = repo.find_path(snap.tree, "/src/a/sub")
    loc = repo.index.lookup(sub.subtree, 1)
    flip(v.pack_file(loc.pack_id.hex()), loc.offset + 20)
    report = deep_verify(v.open())  # tree blobs are always read: no --read-data needed
    assert not report.ok
    damaged = {d.id: d for d in report.damaged_snapshots}
    assert set(damaged) == {v.ids["a"], v.ids["c"]}
    for sid in (v.ids["a"], v.ids["c"]):
        assert [f.path for f in damaged[sid].files] == ["/src/a/sub/"]
        assert "folder is lost" in damaged[sid].files[0].reason
    assert f"tree:{sub.subtree.hex()}" in report.lost_blobs
    assert any(p.kind == "tree-lost" for p in report.problems)
    assert not v.restic_ok()


def test_packindex_naming_an_unknown_pack_is_reported(vault_copy):
    v = vault_copy
    repo = v.open()
    with repo.lock(exclusive=True):
        rebuilt = rebuild_indexes(repo, packindex=True)
    assert len(rebuilt.packindex_written) == 3 and rebuilt.packindex_skipped == []
    assert deep_verify(repo).ok
    ghost = os.urandom(32)
    data = encode_packindex(repo.key, bytes.fromhex(v.ids["b"]), [ghost])
    name = hashlib.sha256(data).hexdigest()
    repo.backend.write("packindex", name, data)
    report = deep_verify(repo)
    assert not report.ok and report.bad_packindex == [name]
    (problem,) = report.problems
    assert problem.folder == "packindex" and problem.kind == "packindex-unknown-pack"
    assert f"snapshot {v.ids['b'][:8]} refers to unknown pack {ghost.hex()}" in problem.message
    assert v.restic_ok()  # restic does not know packindex/: only deep-verify can see this


def test_cache_is_used_and_validated(vault_copy, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    v = vault_copy
    repo = v.open()
    first = deep_verify(repo, cache=True)
    assert first.ok
    cache = VaultCache(repo.id)
    headers = list((Path(cache.root) / "headers").rglob("*"))
    assert len([h for h in headers if h.is_file()]) == first.packs
    tree_packs = [p for p in (Path(cache.root) / "data").rglob("*") if p.is_file()]
    assert tree_packs and all(
        hashlib.sha256(p.read_bytes()).hexdigest() == p.name for p in tree_packs
    )
    # A damaged cache entry is dropped and read again from the vault, never trusted.
    flip(tree_packs[0], 30)
    assert deep_verify(repo, cache=True).ok
    assert hashlib.sha256(tree_packs[0].read_bytes()).hexdigest() == tree_packs[0].name


def test_remote_vault_verify_deep_verify_and_cache(vault_copy, tmp_path, monkeypatch):
    from tests.backend.test_rest import Rclone

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    v = vault_copy
    server = Rclone(v.tmp, "--append-only")  # serves the copy as /vault/
    location = server.location("/vault/")
    remote = open_backend(location)
    try:
        assert verify(remote).ok
        repo = Repository(remote, *_KEYS["key"])
        first = deep_verify(repo)  # remote: pack headers and tree packs go to the cache
        assert first.ok and first.snapshots == 3
        cached = [p for p in Path(VaultCache(repo.id).root).rglob("*") if p.is_file()]
        assert len(cached) > first.packs
        pack = v.damage_blob("a", "/src/a/f1")
        found = verify(remote)
        assert [b.path for b in found.bad] == [f"data/{pack[:2]}/{pack}"]
        assert deep_verify(repo, read_data=True).damaged_snapshots
        refused = vault("-r", location, "repair", password=PASSWORD, expect=2)
        assert "--quarantine" in one_line_error(refused)
    finally:
        remote.close()
        server.stop()


def test_cli_json_and_text(vault_copy):
    v = vault_copy
    ok = json.loads(vault("-r", v.path, "deep-verify", "--json", password=PASSWORD).out)
    assert ok["ok"] is True and ok["snapshots"] == 3 and ok["problems"] == []
    pack = v.damage_blob("b", "/src/b/g2")
    text = vault("-r", v.path, "deep-verify", "--read-data", password=PASSWORD, expect=1).out
    assert pack in text and v.ids["b"][:8] in text and "/src/b/g2" in text
    assert v.ids["a"][:8] not in text
    bad = vault(
        "-r", v.path, "deep-verify", "--read-data-subset", "0/3", password=PASSWORD, expect=2
    )
    assert one_line_error(bad)


@pytest.mark.parametrize("native", [True, False], ids=["c-blob-path", "python"])
def test_check_blobs_names_each_kind_of_damage(native, monkeypatch):
    """check_blobs (the --read-data work) gives the same verdicts with and without the C part."""
    from vaultfs import crypto
    from vaultfs.ops import deepverify

    if native and not crypto.NATIVE:
        pytest.skip("the C blob path is not built")
    monkeypatch.setattr(deepverify, "NATIVE", native)
    key = crypto.MasterKey.generate()
    repo = type("R", (), {"key": key})()
    rnd = __import__("random").Random(7)
    plain = [rnd.randbytes(5000), b"abc" * 20000, rnd.randbytes(300), b"x" * 70000, b"y" * 9000]
    plain += [b"u" * 30000, b"v" * 8000]
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(plain[5])
    sealed = [
        key.seal(plain[0]),  # intact, stored plain
        key.seal(unpacked.compress(plain[1])),  # intact, compressed
        key.seal(plain[2]),  # tag broken below
        key.seal(b"not zstd at all" * 10),  # says compressed, is not
        key.seal(unpacked.compress(b"z" * 9000)),  # decompresses, but to other content
        key.seal(unsized),  # intact, a frame that does not state its size
        key.seal(unpacked.compress(b"v" * 7000)),  # decompresses to fewer bytes than indexed
    ]
    lengths = [0, len(plain[1]), 0, len(plain[3]), len(plain[4]), len(plain[5]), len(plain[6])]
    data = bytearray()
    blobs = []
    for p, s, u in zip(plain, sealed, lengths, strict=True):
        blobs.append(PackedBlob(DATA, len(data), len(s), u, hashlib.sha256(p).digest()))
        data += s
    data[blobs[2].offset + 20] ^= 1
    blobs.append(PackedBlob(DATA, len(data) - 10, 40, 0, b"\0" * 32))  # runs past the end
    got = {b.offset: why for b, why in deepverify.check_blobs(repo, b"p" * 32, data, blobs)}
    assert got == {
        blobs[0].offset: None,
        blobs[1].offset: None,
        blobs[2].offset: "it fails authentication",
        blobs[3].offset: "it does not decompress",
        blobs[4].offset: "its content does not match its ID",
        blobs[5].offset: None,
        blobs[6].offset: "it does not decompress",
        blobs[7].offset: "the pack ends before this blob",
    }
    # A part of the pack from some offset on, with the blobs' offsets as in the pack.
    start = blobs[1].offset
    part = {
        b.offset: why
        for b, why in deepverify.check_blobs(repo, b"p" * 32, data[start:], blobs[1:], start)
    }
    assert part == {off: why for off, why in got.items() if off >= start}
