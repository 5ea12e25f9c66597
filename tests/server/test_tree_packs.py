"""Trees of a remote vault come a whole pack at a time and go to the local cache (vaultfs/repo/treepacks.py).

Against the real bucket server: the listing through the server is the listing of the same bucket read as a
folder, with a request per tree pack instead of one per folder; later runs read the cached packs; a damaged
cached copy is replaced; a damaged pack in the vault gives the same answer as without the cache.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import httpx

from tests.helpers.damage import flip_blob_byte
from tests.server.harness import BucketCreds, ServerThread, module_server
from tests.tools.cli import vault
from vaultfs.backend import LocalBackend
from vaultfs.format.config import Config
from vaultfs.format.pack import TREE
from vaultfs.repo.repository import Repository

FOLDERS = 40


server = module_server("trees")


def gets(server: ServerThread, bucket: str) -> int:
    """GET requests the server has answered for the bucket so far (from /metrics)."""
    text = httpx.get(f"{server.url}metrics", timeout=30).text
    found = re.findall(
        rf'vaultfs_requests_total{{bucket="{bucket}",method="GET",[^}}]*}} (\d+)', text
    )
    return sum(int(n) for n in found)


def backed_up(server: ServerThread, tmp_path: Path) -> tuple[BucketCreds, Path]:
    """A bucket holding one snapshot of FOLDERS folders, and the bucket's folder on the server."""
    creds = server.bucket()
    src = tmp_path / "src"
    for i in range(FOLDERS):
        folder = src / f"dir{i:02d}" / "inner"
        folder.mkdir(parents=True)
        (folder / "file.txt").write_text(f"file {i}\n")
    vault("-r", creds.location, "init")
    vault("-r", creds.location, "backup", src)
    return creds, Path(server.config.volume_paths[0]) / creds.name


def tree_packs(folder: Path) -> set[str]:
    repo = Repository.open(LocalBackend(str(folder)), b"pw")
    repo.load_index()
    snap = repo.list_snapshots()[0][1]
    packs = set()
    todo = [snap.tree]
    while todo:
        tree = todo.pop()
        loc = repo.index.lookup(tree, TREE)
        assert loc is not None
        packs.add(loc.pack_id.hex())
        todo += [n.subtree for n in repo.load_tree(tree) if n.subtree is not None]
    return packs


def cached(cache: Path) -> dict[str, Path]:
    return {p.name: p for p in cache.glob("vaultfs/*/data/*/*")}


def test_a_remote_walk_reads_whole_tree_packs_and_caches_them(
    server: ServerThread, tmp_path: Path
) -> None:
    creds, folder = backed_up(server, tmp_path)
    expected = vault("-r", folder, "ls", "-l", "latest").out
    assert expected.count("file.txt") == FOLDERS
    cache = tmp_path / "cache"
    env = {"XDG_CACHE_HOME": str(cache)}

    before = gets(server, creds.name)
    assert vault("-r", creds.location, "ls", "-l", "latest", env=env).out == expected
    first = gets(server, creds.name) - before
    # Without the whole-pack reads each of the 2 * FOLDERS + 1 trees was a request of its own.
    assert first < FOLDERS // 2, first
    packs = tree_packs(folder)
    assert set(cached(cache)) == packs
    for name, path in cached(cache).items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == name

    # a cached pack the vault no longer has (pruned since) is deleted
    gone = next(iter(cached(cache).values())).parent.parent / "00" / ("00" * 32)
    gone.parent.mkdir()
    gone.write_bytes(b"pruned")
    before = gets(server, creds.name)
    assert vault("-r", creds.location, "ls", "-l", "latest", env=env).out == expected
    assert gets(server, creds.name) - before == first - len(packs)  # the packs came from the cache
    assert set(cached(cache)) == packs

    # A damaged cached copy is not used, and is replaced by the vault's.
    name, path = next(iter(cached(cache).items()))
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    path.write_bytes(damaged)
    assert vault("-r", creds.location, "ls", "-l", "latest", env=env).out == expected
    assert hashlib.sha256(path.read_bytes()).hexdigest() == name

    # --no-cache: the same listing, and no cache written.
    other = tmp_path / "other-cache"
    result = vault(
        "-r", creds.location, "--no-cache", "ls", "-l", "latest", env={"XDG_CACHE_HOME": str(other)}
    )
    assert result.out == expected
    assert not cached(other)


def test_a_damaged_tree_pack_gives_what_the_vault_itself_gives(
    server: ServerThread, tmp_path: Path
) -> None:
    """The pack fails its hash, so it is neither kept nor cached: every intact tree in it still reads
    (blob by blob), and the damaged one fails as it does when the bucket is read as a folder."""
    creds, folder = backed_up(server, tmp_path)
    repo = Repository.open(LocalBackend(str(folder)), b"pw")
    repo.load_index()
    snap = repo.list_snapshots()[0][1]
    # the last folder the listing enters: every folder before it lists, from the same damaged pack
    victim = repo.find_path(snap.tree, str(tmp_path / "src" / f"dir{FOLDERS - 1:02d}" / "inner"))
    assert victim is not None and victim.subtree is not None
    loc = repo.index.lookup(victim.subtree, TREE)
    assert loc is not None
    flip_blob_byte(repo, loc)

    direct = vault("-r", folder, "ls", "latest", expect=None)
    assert direct.code != 0
    assert direct.out.count("file.txt") == FOLDERS - 1
    cache = tmp_path / "cache"
    # a listing that never needs the damaged tree: the pack still fails its hash, so it is not cached
    first = str(tmp_path / "src" / "dir00")
    part = vault("-r", creds.location, "ls", "latest", first, env={"XDG_CACHE_HOME": str(cache)})
    assert part.out == vault("-r", folder, "ls", "latest", first).out
    assert "dir00/inner/file.txt" in part.out
    assert not cached(cache)
    remote = vault(
        "-r", creds.location, "ls", "latest", expect=None, env={"XDG_CACHE_HOME": str(cache)}
    )
    assert (remote.code, remote.out) == (direct.code, direct.out)
    assert victim.subtree.hex() in remote.err
    assert not cached(cache)


def test_a_vault_whose_id_cannot_name_a_cache_folder_is_read_without_one(
    server: ServerThread, tmp_path: Path
) -> None:
    """The config format takes any string as the vault's id; restic writes 64 hex digits, and the cache
    folder is named after it. Another id: no cache, and still one request per tree pack."""
    creds, folder = backed_up(server, tmp_path)
    repo = Repository.open(LocalBackend(str(folder)), b"pw")
    config = Config(repo.config.version, "not-a-hex-id", repo.config.chunker_polynomial)
    stored = folder / "config"
    os.chmod(stored, 0o600)
    stored.write_bytes(repo.key.seal(config.encode()))
    cache = tmp_path / "cache"
    env = {"XDG_CACHE_HOME": str(cache)}
    before = gets(server, creds.name)
    listing = vault("-r", creds.location, "ls", "latest", env=env).out
    assert listing == vault("-r", folder, "ls", "latest").out
    assert listing.count("file.txt") == FOLDERS
    assert gets(server, creds.name) - before < FOLDERS // 2
    assert not cache.exists()
