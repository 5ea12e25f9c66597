"""Commands other than backup, ls and restore, run through a rest: location against the real server.

forget, prune, key, unlock, cat, rebuild-indexes, repair, split, merge and migrate (from the bucket to a
folder) run through the CLI against buckets of the real server, in this process. Their effects are checked
on the bucket's folder on the server's disk, and `vault verify` checks that folder after each change.

One vault with a snapshot of each of three small trees is made through the server once; each test gets a
copy of its files in a new bucket (copied on the server's disk: the backups are not what is tested here).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.env import env_for
from tests.server.harness import BucketCreds, ServerThread, module_server
from tests.tools.cli import Result, one_line_error, vault
from vaultfs.backend import open_backend
from vaultfs.format.gojson import GoTime
from vaultfs.format.lock import Lock
from vaultfs.repo.repository import Repository

PASSWORD = "pw"


server = module_server("rest-commands")


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Three small trees that share no content, so each snapshot has packs of its own."""
    root = tmp_path_factory.mktemp("sources")
    trees = {}
    for part in "abc":
        top = root / part
        (top / "sub").mkdir(parents=True)
        (top / "note.txt").write_text(f"{part}: {os.urandom(16).hex()}\n")
        (top / "sub" / "data.bin").write_bytes(os.urandom(40_000 if part != "b" else 150_000))
        trees[part] = top
    return trees


def contents(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by its path relative to ``root``."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@dataclass
class Bucket:
    """A bucket of the test server, and its folder on the server's disk."""

    creds: BucketCreds
    folder: Path
    cache: Path
    vault_id: str = ""
    snapshots: dict[str, str] = field(default_factory=dict)  # source part -> snapshot ID
    packs: dict[str, set[str]] = field(
        default_factory=dict
    )  # source part -> packs its backup wrote

    @property
    def location(self) -> str:
        return self.creds.location

    def run(self, *args: Any, **kw: Any) -> Result:
        """``vault -r rest:... ARGS``, with the local cache of remote vaults in the test's folder."""
        env = {"XDG_CACHE_HOME": str(self.cache), **kw.pop("env", {})}
        return vault("-r", self.location, *args, env=env, **kw)

    def json(self, *args: Any, **kw: Any) -> Any:
        return json.loads(self.run("--json", *args, **kw).out)

    def names(self, kind: str) -> set[str]:
        """Names of the files the bucket holds in ``kind`` (data, index, snapshots, keys, locks…)."""
        where = self.folder / kind
        return {p.name for p in where.rglob("*") if p.is_file()} if where.exists() else set()

    def files(self) -> dict[str, bytes]:
        """Every file of the vault in the bucket but its locks."""
        return {k: v for k, v in contents(self.folder).items() if not k.startswith("locks/")}

    def verify(self) -> None:
        """`vault verify` on the bucket's folder (no password) finds every file intact."""
        vault("-r", self.folder, "verify", password=None)

    def backup(self, part: str, src: Path) -> str:
        before = self.names("data")
        summary = self.run("--json", "backup", src).out.splitlines()[-1]
        snap = json.loads(summary)["snapshot_id"]
        self.snapshots[part] = snap
        self.packs[part] = self.names("data") - before
        assert self.packs[part], "the backup wrote no pack of its own"
        return snap

    def restores(self, snap: str, src: Path, target: Path) -> None:
        """Restoring ``snap`` gives the files of ``src`` back, byte for byte."""
        self.run("restore", snap, "--target", target)
        assert contents(target / src.relative_to(src.anchor)) == contents(src)


def new_bucket(server: ServerThread, tmp_path: Path, name: str = "cache") -> Bucket:
    creds = server.bucket()
    folder = Path(server.config.volume_paths[0]) / creds.name
    return Bucket(creds, folder, tmp_path / name)


@pytest.fixture(scope="module")
def template(server: ServerThread, tmp_path_factory, sources: dict[str, Path]) -> Bucket:
    """A vault with snapshots of a, b and c (made in that order). Tests use copies: see backed_up()."""
    bucket = new_bucket(server, tmp_path_factory.mktemp("template"))
    bucket.vault_id = bucket.json("init")["id"]
    for part in "abc":
        bucket.backup(part, sources[part])
    assert bucket.names("snapshots") == set(bucket.snapshots.values())
    return bucket


@pytest.fixture
def backed_up(server: ServerThread, tmp_path: Path, template: Bucket) -> Bucket:
    """A new bucket holding a copy of the template vault."""
    bucket = new_bucket(server, tmp_path)
    shutil.copytree(template.folder, bucket.folder, dirs_exist_ok=True)
    bucket.vault_id = template.vault_id
    bucket.snapshots = dict(template.snapshots)
    bucket.packs = {part: set(packs) for part, packs in template.packs.items()}
    return bucket


def pack_path(folder: Path, name: str) -> Path:
    return folder / "data" / name[:2] / name


# -- forget and prune ---------------------------------------------------------------------------


def test_forget_and_prune_free_exactly_the_packs_of_forgotten_snapshots(
    backed_up: Bucket, tmp_path: Path, sources: dict[str, Path]
) -> None:
    bucket = backed_up
    a, b, c = (bucket.snapshots[p] for p in "abc")
    every_pack = bucket.names("data")
    assert every_pack == bucket.packs["a"] | bucket.packs["b"] | bucket.packs["c"]

    # a dry run names what a policy would remove, and removes nothing
    (group,) = bucket.json("forget", "--dry-run", "--group-by", "", "--keep-last", "2")
    assert [s["id"] for s in group["remove"]] == [a]
    assert bucket.names("snapshots") == {a, b, c}

    # by ID: only the snapshot file goes; its packs stay until prune
    bucket.run("forget", b[:10])
    assert bucket.names("snapshots") == {a, c}
    assert bucket.names("data") == every_pack
    bucket.verify()

    pruned = bucket.json("prune")
    assert set(pruned["packs_deleted"]) == bucket.packs["b"]
    assert bucket.names("data") == bucket.packs["a"] | bucket.packs["c"]
    assert not set(pruned["index_files_removed"]) & bucket.names("index")
    bucket.verify()

    # a policy and --prune in one run: restic's JSON, then prune's report
    forgot, prune_line = bucket.run(
        "--json", "forget", "--group-by", "", "--keep-last", "1", "--prune"
    ).out.splitlines()
    (group,) = json.loads(forgot)
    assert [s["id"] for s in group["keep"]] == [c]
    assert [s["id"] for s in group["remove"]] == [a]
    assert set(json.loads(prune_line)["packs_deleted"]) == bucket.packs["a"]
    assert bucket.names("snapshots") == {c}
    assert bucket.names("data") == bucket.packs["c"]
    bucket.verify()
    bucket.restores(c, sources["c"], tmp_path / "restored")


# -- key ----------------------------------------------------------------------------------------


def test_keys_add_list_remove_and_passwd(backed_up: Bucket, tmp_path: Path) -> None:
    bucket = backed_up
    (first,) = bucket.names("keys")
    new_password = tmp_path / "new-password"
    new_password.write_text("second\n")

    added = bucket.json("key", "add", "--new-password-file", new_password)["id"]
    assert bucket.names("keys") == {first, added}
    keys = bucket.json("key", "list")
    assert {(k["id"], k["current"]) for k in keys} == {(first, True), (added, False)}
    # the new password opens the vault, with the new key
    keys = bucket.json("key", "list", password="second")
    assert {(k["id"], k["current"]) for k in keys} == {(first, False), (added, True)}

    assert bucket.json("key", "remove", first[:10], password="second") == {"removed": first}
    assert bucket.names("keys") == {added}

    new_password.write_text("third\n")
    changed = bucket.json("key", "passwd", "--new-password-file", new_password, password="second")
    assert changed["removed"] == added
    assert bucket.names("keys") == {changed["id"]}
    keys = bucket.json("key", "list", password="third")
    assert [(k["id"], k["current"]) for k in keys] == [(changed["id"], True)]
    bucket.run("snapshots", password="second", expect=12)
    bucket.verify()


# -- cat ----------------------------------------------------------------------------------------


def test_cat_prints_each_kind_of_object(backed_up: Bucket, sources: dict[str, Path]) -> None:
    bucket = backed_up
    snap = bucket.snapshots["a"]

    config = bucket.json("cat", "config")
    assert config["id"] == bucket.vault_id and config["version"] == 2
    snapshot = json.loads(bucket.run("cat", "snapshot", snap[:8]).out)
    assert snapshot["paths"] == [str(sources["a"])]
    index = min(bucket.names("index"))
    listed = {p["id"] for p in json.loads(bucket.run("cat", "index", index[:8]).out)["packs"]}
    assert listed and listed <= bucket.names("data")

    inner = str(sources["a"].relative_to(sources["a"].anchor))
    nodes = json.loads(bucket.run("cat", "tree", f"{snap[:8]}:{inner}").out)["nodes"]
    (note,) = [n for n in nodes if n["name"] == "note.txt"]
    (blob,) = note["content"]
    assert bucket.run("cat", "blob", blob).out == (sources["a"] / "note.txt").read_text()

    # a pack comes out as the raw bytes of its file (read in binary: it is no text)
    pack = max(bucket.packs["a"], key=lambda p: pack_path(bucket.folder, p).stat().st_size)
    raw = subprocess.run(
        [
            sys.executable,
            "-m",
            "vaultfs.tools.main",
            "-r",
            bucket.location,
            "cat",
            "pack",
            pack[:8],
        ],
        capture_output=True,
        env=env_for(PASSWORD, cache_dir=bucket.cache),
        timeout=300,
        check=True,
    ).stdout
    assert raw == pack_path(bucket.folder, pack).read_bytes()
    assert hashlib.sha256(raw).hexdigest() == pack


# -- unlock -------------------------------------------------------------------------------------


def test_unlock_removes_stale_locks_and_with_remove_all_every_lock(backed_up: Bucket) -> None:
    bucket = backed_up
    backend = open_backend(bucket.location)
    try:
        repo = Repository.open(backend, PASSWORD.encode())
        hour_ago = GoTime.local(time.time_ns() - 3600 * 10**9)
        other = f"not-{socket.gethostname()}"
        stale = repo.save_unpacked("locks", Lock(hour_ago, True, other, "x", 4242).encode())
        fresh = repo.save_unpacked("locks", Lock(GoTime.now(), True, other, "y", 4343).encode())
    finally:
        backend.close()
    assert bucket.names("locks") == {stale, fresh}
    assert "vault unlock" in one_line_error(bucket.run("prune", expect=11))

    assert bucket.json("unlock") == {"removed": [stale]}
    assert bucket.names("locks") == {fresh}
    bucket.run("prune", expect=11)  # the lock of a live process elsewhere still holds

    assert bucket.json("unlock", "--remove-all") == {"removed": [fresh]}
    assert bucket.names("locks") == set()
    bucket.run("prune")
    assert bucket.names("locks") == set()
    bucket.verify()


# -- rebuild-indexes ----------------------------------------------------------------------------


def test_rebuild_indexes_brings_back_a_lost_index(
    backed_up: Bucket, tmp_path: Path, sources: dict[str, Path]
) -> None:
    bucket = backed_up
    snap = bucket.snapshots["b"]
    for name in bucket.names("index"):
        (bucket.folder / "index" / name).unlink()
    failed = bucket.run("restore", snap, "--target", tmp_path / "failed", expect=1)
    assert "rebuild-indexes" in failed.err

    report = bucket.json("rebuild-indexes")
    assert report["ok"] and report["packs"] == len(bucket.names("data"))
    assert set(report["packs_added"]) == bucket.names("data")
    assert bucket.names("index") == set(report["index_files_written"])
    bucket.verify()
    bucket.restores(snap, sources["b"], tmp_path / "restored")


# -- repair -------------------------------------------------------------------------------------


def damage(bucket: Bucket) -> str:
    """Damage the biggest pack of snapshot b's backup (one data blob of b and nothing else)."""
    pack = max(bucket.packs["b"], key=lambda p: pack_path(bucket.folder, p).stat().st_size)
    path = pack_path(bucket.folder, pack)
    os.chmod(path, 0o600)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(data)
    vault("-r", bucket.folder, "verify", password=None, expect=1)
    return pack


def listing(folder: Path) -> list[tuple[str, int, int]]:
    return sorted(
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file() and "locks" not in p.parts
    )


def test_repair_dry_run_of_a_remote_vault_reports_the_damage_and_changes_nothing(
    backed_up: Bucket, sources: dict[str, Path]
) -> None:
    """No --quarantine or --delete is needed for a dry run: it moves nothing."""
    bucket = backed_up
    pack = damage(bucket)
    before = listing(bucket.folder)
    plan = bucket.json("repair", "--dry-run", expect=1)
    assert plan["dry_run"] and not plan["ok"] and plan["quarantine"] is None
    assert ("quarantine", f"data/{pack[:2]}/{pack}") in [
        (a["kind"], a["object"]) for a in plan["actions"]
    ]
    assert [(s["id"], [f["path"] for f in s["files"]]) for s in plan["snapshots"]] == [
        (bucket.snapshots["b"], [str(sources["b"] / "sub" / "data.bin")])
    ]
    assert listing(bucket.folder) == before


def test_repair_of_a_remote_vault_quarantines_a_damaged_pack_locally(
    backed_up: Bucket, tmp_path: Path
) -> None:
    bucket = backed_up
    a, b, c = (bucket.snapshots[p] for p in "abc")
    pack = damage(bucket)
    damaged_bytes = pack_path(bucket.folder, pack).read_bytes()
    # a real repair still needs somewhere to put what it moves out of a remote vault
    assert "--quarantine" in one_line_error(bucket.run("repair", expect=2))
    assert pack in bucket.names("data")

    quarantine = tmp_path / "quarantine"
    report = bucket.json("repair", "--quarantine", quarantine)
    assert report["ok"] and report["quarantine"] == str(quarantine)
    assert [s["id"] for s in report["snapshots"]] == [b]
    assert pack not in bucket.names("data")
    assert bucket.names("snapshots") == {a, c}
    assert pack_path(quarantine, pack).read_bytes() == damaged_bytes
    assert (quarantine / "snapshots" / b).is_file()
    manifest = (quarantine / "MANIFEST.jsonl").read_text().splitlines()
    assert f"data/{pack[:2]}/{pack}" in [json.loads(line)["path"] for line in manifest]
    bucket.verify()
    bucket.run("deep-verify")
    # clean now: a dry run plans nothing
    assert bucket.json("repair", "--dry-run")["actions"] == []


# -- split and merge ----------------------------------------------------------------------------


def test_split_move_to_another_bucket_and_merge_back(
    server: ServerThread, backed_up: Bucket, tmp_path: Path, sources: dict[str, Path]
) -> None:
    bucket = backed_up
    a, b, c = (bucket.snapshots[p] for p in "abc")
    other = new_bucket(server, tmp_path, "other-cache")
    snapshot_file = (bucket.folder / "snapshots" / b).read_bytes()

    split = bucket.json("split", "--to", other.location, "--snapshot", b[:8], "--move")
    assert split["created"] and split["moved"] and split["copy"]["snapshots_copied"] == [b]
    assert other.names("snapshots") == {b}
    assert bucket.names("snapshots") == {a, c}
    assert bucket.names("data") == bucket.packs["a"] | bucket.packs["c"]
    # copied byte for byte, and the other vault opens it: they share the master key
    assert (other.folder / "snapshots" / b).read_bytes() == snapshot_file
    bucket.verify()
    other.verify()
    other.restores(b, sources["b"], tmp_path / "from-other")

    merged = bucket.json("merge", "--from", other.location)
    assert merged["copy"]["snapshots_copied"] == [b]
    assert bucket.names("snapshots") == {a, b, c}
    assert (bucket.folder / "snapshots" / b).read_bytes() == snapshot_file
    assert other.names("snapshots") == {b}  # merge only reads the other vault
    bucket.verify()
    bucket.restores(b, sources["b"], tmp_path / "merged")


# -- migrate ------------------------------------------------------------------------------------


def test_migrate_from_a_bucket_to_a_folder(
    backed_up: Bucket, tmp_path: Path, sources: dict[str, Path]
) -> None:
    bucket = backed_up
    files = bucket.files()
    target = tmp_path / "copy"
    report = bucket.json("migrate", "--to", target, "--verify")
    assert report["ok"] and report["verified"] and report["copied"] == report["files"] == len(files)
    assert contents(target) == files
    vault("-r", target, "verify", password=None)
    restored = tmp_path / "restored"
    vault("-r", target, "restore", bucket.snapshots["b"], "--target", restored)
    src = sources["b"]
    assert contents(restored / src.relative_to(src.anchor)) == contents(src)

    # again with --delete-source: nothing left to copy, then the bucket is emptied
    again = bucket.json("migrate", "--to", target, "--delete-source")
    assert again["skipped"] == again["files"] == len(files) and again["source_deleted"]
    assert bucket.files() == {}
    bucket.run("snapshots", expect=10)
    assert contents(target) == files
