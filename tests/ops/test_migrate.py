"""vault migrate: a byte-identical copy of every vault file, hash-checked, resumable after kill -9,
refusing to mix two vaults, deleting the source only after the copy verified, to a folder or a REST
server.

Vault builders and the crash-injecting backend come from test_prune.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from tests.backend.test_rest import Rclone
from tests.ops.test_prune import (
    PASSWORD,
    Built,
    CrashingBackend,
    assert_snapshots_intact,
    build_vault,
    copy_of,
)
from tests.tools.cli import vault
from vaultfs.backend import LocalBackend, open_backend
from vaultfs.errors import IntegrityError, UsageError, VaultError, VaultLocked
from vaultfs.format.gojson import GoTime
from vaultfs.format.lock import Lock
from vaultfs.ops.migrate import PIECE, migrate
from vaultfs.repo.repository import Repository

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Built:
    """A small vault of three snapshots. Do not modify (copy it)."""
    return build_vault(tmp_path_factory.mktemp("migrate"), snapshots=3)


def vault_files(root: Path) -> dict[str, bytes]:
    """Every file below a vault folder but the locks, by relative path."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).parts[0] != "locks"
    }


def test_copy_is_byte_identical_and_a_second_run_copies_nothing(source, tmp_path):
    report = migrate(LocalBackend(str(source.path)), LocalBackend(str(tmp_path / "t")), verify=True)
    expected = vault_files(source.path)
    assert report.ok and report.verified and report.copied == report.files == len(expected)
    assert vault_files(tmp_path / "t") == expected
    again = migrate(LocalBackend(str(source.path)), LocalBackend(str(tmp_path / "t")))
    assert again.copied == 0 and again.skipped == again.files
    moved = Built(tmp_path / "t", source.files, source.prefix, source.key, source.config)
    assert_snapshots_intact(moved.repo(), moved)


KILLER = """
import os, signal, sys
from tests.ops.test_prune import CrashingBackend
from vaultfs.backend import LocalBackend
from vaultfs.ops.migrate import PIECE, migrate

class Killer(CrashingBackend):
    def crash(self):
        os.kill(os.getpid(), signal.SIGKILL)

# one worker: the writes before the kill are complete, so the resumed run has files to check
migrate(LocalBackend(sys.argv[1]), Killer(LocalBackend(sys.argv[2]), int(sys.argv[3])), workers=1)
"""


def test_killed_migrate_resumes_to_a_byte_identical_copy(source, tmp_path):
    target = tmp_path / "t"
    counting = CrashingBackend(LocalBackend(str(tmp_path / "count")))
    migrate(LocalBackend(str(source.path)), counting)
    kinds = [kind for _call, kind in counting.log]
    assert kinds[-1] == "config" and kinds.count("data") > 3
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            KILLER,
            str(source.path),
            str(target),
            str(kinds.count("data") // 2),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -9, proc.stderr
    assert not (target / "config").exists()  # not a vault until the copy is complete
    # damage the resumed run must notice: a copied pack with the right size and wrong bytes, and a
    # temp file a write interrupted mid-way would have left
    packs = sorted(p for p in (target / "data").rglob("*") if p.is_file())
    assert len(packs) == kinds.count("data") // 2
    packs[0].chmod(0o600)
    packs[0].write_bytes(bytes(len(packs[0].read_bytes())))
    (packs[-1].parent / f"{packs[-1].name}-tmp-0123456789abcdef").write_bytes(b"half")
    result = vault(
        "-r", source.path, "--json", "migrate", "--to", target, "--verify", password=PASSWORD
    )
    doc = json.loads(result.out)
    assert doc["ok"] and doc["verified"] and doc["replaced"] == 1 and doc["skipped"] >= 1
    assert vault_files(target) == vault_files(source.path)


def test_refuses_another_vault_and_itself(source, tmp_path):
    Repository.init(LocalBackend(str(tmp_path / "other")), PASSWORD.encode())
    before = vault_files(tmp_path / "other")
    with pytest.raises(VaultError, match="another vault"):
        migrate(LocalBackend(str(source.path)), LocalBackend(str(tmp_path / "other")))
    assert vault_files(tmp_path / "other") == before
    with pytest.raises(UsageError):
        migrate(LocalBackend(str(source.path)), LocalBackend(str(source.path) + "/"))


def test_lock_conflict_found_late_stops_before_the_config(source, tmp_path):
    """vault migrate takes its shared lock without the up-front wait: the lock's second check runs
    while files are copied (confirm(False) after each file) and must pass (confirm(True)) before the
    target gets its config. A conflict found then leaves a config-less target a re-run completes."""
    calls: list[bool] = []

    def confirm(wait: bool) -> None:
        calls.append(wait)
        if wait:
            raise VaultLocked("the vault is locked: exclusive lock by someone@another-host")

    with pytest.raises(VaultLocked):
        migrate(LocalBackend(str(source.path)), LocalBackend(str(tmp_path / "t")), confirm=confirm)
    assert calls.count(False) == len(vault_files(source.path)) - 1 and calls[-1] is True
    assert not (tmp_path / "t" / "config").exists()
    again = migrate(LocalBackend(str(source.path)), LocalBackend(str(tmp_path / "t")))
    assert again.ok and again.copied == 1  # only the config was left to copy
    assert vault_files(tmp_path / "t") == vault_files(source.path)


def test_cli_migrate_refuses_a_vault_locked_elsewhere(source, tmp_path):
    src = copy_of(source, tmp_path)
    other = Lock(GoTime.now(), True, "another-host", "someone", 4242)
    src.repo().save_unpacked("locks", other.encode())
    result = vault("-r", src.path, "migrate", "--to", tmp_path / "t", password=PASSWORD, expect=11)
    assert "another-host" in result.err
    assert not (tmp_path / "t" / "config").exists()


class _Flipping(LocalBackend):
    """A target whose reads of one pack come back damaged: verification must catch it."""

    def read(self, kind: str, name: str, offset: int = 0, length: int | None = None) -> bytes:
        data = super().read(kind, name, offset, length)
        if kind == "data" and name.startswith(self.victim):
            data = bytes([data[0] ^ 1]) + data[1:]
        return data


def test_delete_source_only_after_the_copy_verified(source, tmp_path):
    src = copy_of(source, tmp_path)
    bad = _Flipping(str(tmp_path / "bad"))
    bad.victim = next(iter(p.name for p in (src.path / "data").rglob("*") if p.is_file()))
    with pytest.raises(IntegrityError, match="source was not deleted"):
        migrate(LocalBackend(str(src.path)), bad, delete_source=True)
    assert vault_files(src.path) == vault_files(source.path)
    report = migrate(
        LocalBackend(str(src.path)), LocalBackend(str(tmp_path / "t")), delete_source=True
    )
    assert report.verified and report.source_deleted
    assert vault_files(src.path) == {}
    moved = Built(tmp_path / "t", source.files, source.prefix, source.key, source.config)
    assert_snapshots_intact(moved.repo(), moved)


def test_damaged_source_file_is_not_copied_and_the_copy_gets_no_config(source, tmp_path):
    src = copy_of(source, tmp_path)
    snap = next((src.path / "snapshots").iterdir())
    snap.chmod(0o600)
    raw = snap.read_bytes()
    snap.write_bytes(bytes([raw[0] ^ 1]) + raw[1:])  # a constant byte would match 1 time in 256
    report = migrate(LocalBackend(str(src.path)), LocalBackend(str(tmp_path / "t")))
    assert report.corrupt == [f"snapshots/{snap.name}"] and not report.ok
    assert not (tmp_path / "t" / "config").exists()


def _add_data_file(root: Path, data: bytes, name: str | None = None) -> str:
    name = name or hashlib.sha256(data).hexdigest()
    (root / "data" / name[:2]).mkdir(exist_ok=True)
    (root / "data" / name[:2] / name).write_bytes(data)
    return name


def test_files_are_streamed_and_hash_checked_in_flight(source, tmp_path):
    """A 24 MiB file is copied with memory bounded by the piece size, not the file size; a damaged
    multi-piece file is refused before its last piece, leaving nothing at the target."""
    src = copy_of(source, tmp_path)
    big = _add_data_file(src.path, os.urandom(24 << 20))
    damaged = os.urandom(3 << 20)
    bad = _add_data_file(src.path, damaged, hashlib.sha256(damaged + b"!").hexdigest())
    tracemalloc.start()
    try:
        report = migrate(LocalBackend(str(src.path)), LocalBackend(str(tmp_path / "t")), workers=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.corrupt == [f"data/{bad}"]
    assert peak < 4 * PIECE  # a whole-file copy would hold at least 24 MiB
    copied = tmp_path / "t" / "data" / big[:2] / big
    assert hashlib.sha256(copied.read_bytes()).hexdigest() == big
    assert not (tmp_path / "t" / "data" / bad[:2] / bad).exists()
    assert list(LocalBackend(str(tmp_path / "t")).list_temp("data")) == []


def test_migrate_to_a_rest_server(source, tmp_path):
    server = Rclone(tmp_path / "rclone")
    location = server.location("/moved/")
    target = open_backend(location)
    try:
        report = migrate(LocalBackend(str(source.path)), target, verify=True)
        assert report.ok and report.verified
        repo = Repository.open(target, PASSWORD.encode())
        moved = Built(source.path, source.files, source.prefix, source.key, source.config)
        assert sorted(n for n, _ in repo.backend.list("snapshots")) == sorted(source.files)
        assert_snapshots_intact(repo, moved)
        assert vault_files(tmp_path / "rclone" / "moved") == vault_files(source.path)
    finally:
        target.close()
        server.stop()
