"""vault prune: deletes exactly what no snapshot needs, repacks partly used packs, refuses to delete when a
kept snapshot depends on a missing blob, and leaves a valid vault when it is killed at any point.

The vaults here are small (a few hundred KiB in packs of 64 KiB) so that a handful of backups spread over
many packs; every snapshot's files are kept on disk, and after each prune the kept snapshots are read
back blob by blob and compared with them. The helpers are shared with test_split.py and test_migrate.py.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.restic import Restic, ResticRepo, require_restic
from tests.tools.cli import one_line_error, vault
from vaultfs.backend import Backend, LocalBackend
from vaultfs.crypto import MasterKey
from vaultfs.errors import VaultLocked
from vaultfs.format.config import Config
from vaultfs.format.gojson import GoTime
from vaultfs.format.lock import Lock
from vaultfs.format.pack import DATA
from vaultfs.ops.backup import backup
from vaultfs.ops.deepverify import deep_verify
from vaultfs.ops.forget import Policy, forget
from vaultfs.ops.packindex import load_all
from vaultfs.ops.prune import MissingData, prune
from vaultfs.ops.restore import restore
from vaultfs.repo.repository import Repository

PASSWORD = "pw"
PACK_SIZE = 64 * 1024
DAY = 86_400 * 1_000_000_000


@dataclass
class Built:
    """A vault and, per snapshot, the files it holds (relative path -> content)."""

    path: Path
    files: dict[str, dict[str, bytes]]
    prefix: str  # where the backed-up folder sits in the snapshots
    key: MasterKey
    config: Config

    def repo(self, backend: Backend | None = None) -> Repository:
        """The vault opened with its master key (no key derivation: tests open vaults often)."""
        repo = Repository(backend or LocalBackend(str(self.path)), self.key, self.config)
        repo.pack_size = PACK_SIZE
        repo.load_index()
        return repo


def build_vault(
    base: Path, snapshots: int = 6, hosts: tuple[str, ...] = ("alpha",), seed: int = 1
) -> Built:
    """Back up ``snapshots`` versions of a small folder, one day apart: a few files never change, the
    others change from version to version, so forgetting versions leaves packs partly used."""
    rng = random.Random(seed)
    path = base / "vault"
    repo = Repository.init(LocalBackend(str(path)), PASSWORD.encode())
    repo.pack_size = PACK_SIZE
    repo.load_index()
    fixed = {f"same/{i}": rng.randbytes(rng.randint(2_000, 30_000)) for i in range(4)}
    files: dict[str, dict[str, bytes]] = {}
    current = dict(fixed)
    for n in range(snapshots):
        for i in range(6):
            if n == 0 or rng.random() < 0.5:
                current[f"varies/{i}"] = rng.randbytes(rng.randint(2_000, 40_000))
        current[f"new-{n}"] = rng.randbytes(rng.randint(1_000, 20_000))
        src = base / "src"
        for rel, data in current.items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes(data)
        report = backup(
            repo,
            [src],
            host=hosts[n % len(hosts)],
            snapshot_time=GoTime(1_700_000_000 * 1_000_000_000 + n * DAY),
            workers=1,
            readers=1,
        )
        files[report.snapshot_id] = dict(current)
    return Built(path, files, str(base / "src").lstrip("/") + "/", repo.key, repo.config)


def snapshot_files(repo: Repository, sid: str, prefix: str) -> dict[str, bytes]:
    """Files of a snapshot read back blob by blob, keyed by path below the backed-up folder."""
    out = {}
    for path, node in repo.walk(repo.load_snapshot(sid).tree):
        if node.type == "file":
            assert path.startswith(prefix)
            out[path[len(prefix) :]] = b"".join(repo.load_blob(DATA, b) for b in node.content or [])
    return out


def restored_files(repo: Repository, sid: str, prefix: str, target: Path) -> dict[str, bytes]:
    """Files of a snapshot as `vault restore` writes them, keyed like Built.files."""
    report = restore(repo, sid, target, subpath=prefix)
    assert not report.errors
    return {
        str(p.relative_to(target)): p.read_bytes() for p in sorted(target.rglob("*")) if p.is_file()
    }


def assert_snapshots_intact(repo: Repository, built: Built, ids: list[str] | None = None) -> None:
    repo.load_index()
    present = [n for n, _ in repo.backend.list("snapshots")]
    for sid in ids if ids is not None else present:
        assert sid in present
        assert snapshot_files(repo, sid, built.prefix) == built.files[sid], sid


def data_files(path: Path) -> set[str]:
    return {f.name for f in (path / "data").rglob("*") if f.is_file()}


class Crash(BaseException):
    """Stands for a kill -9: a BaseException, so no `except Exception` in the code under test stops it."""


class CrashingBackend(Backend):
    """Passes every call through, and raises Crash at the ``after``-th write or remove (locks aside)
    and at every one after it; ``after=None`` only counts."""

    def __init__(self, inner: Backend, after: int | None = None) -> None:
        self.inner = inner
        self.location = inner.location
        self.left = after
        self.mutations = 0
        self.log: list[tuple[str, str]] = []  # (call, kind) of each counted mutation
        self._lock = threading.Lock()

    def _mutate(self, kind: str, call: str = "") -> None:
        if kind == "locks":
            return
        with self._lock:
            self.mutations += 1
            self.log.append((call, kind))
            if self.left is not None:
                self.left -= 1
                if self.left < 0:
                    self.crash()

    def crash(self) -> None:
        raise Crash

    def write(self, kind: str, name: str, data: bytes | bytearray | memoryview) -> None:
        self._mutate(kind, "write")
        self.inner.write(kind, name, data)

    def remove(self, kind: str, name: str) -> None:
        self._mutate(kind, "remove")
        self.inner.remove(kind, name)

    def list(self, kind: str) -> Iterator[tuple[str, int]]:
        return self.inner.list(kind)

    def stat(self, kind: str, name: str) -> int:
        return self.inner.stat(kind, name)

    def read(self, kind: str, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.inner.read(kind, name, offset, length)

    def exists(self, kind: str, name: str) -> bool:
        return self.inner.exists(kind, name)

    def create(self) -> None:
        self.inner.create()

    def __getattr__(self, name: str):  # noqa: ANN204 - root, path, list_temp of a local backend
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def forgotten(tmp_path_factory) -> tuple[Built, list[str]]:
    """Six snapshots, the three oldest forgotten: the starting point of most prune tests (copy it)."""
    built = build_vault(tmp_path_factory.mktemp("prune"))
    repo = built.repo()
    report = forget(repo, Policy(last=3))
    assert len(report.removed) == 3
    kept = [n for n, _ in repo.backend.list("snapshots")]
    return built, kept


def copy_of(built: Built, dest: Path) -> Built:
    shutil.copytree(built.path, dest / "vault")
    return Built(dest / "vault", built.files, built.prefix, built.key, built.config)


def test_prune_deletes_and_repacks_and_restic_agrees(forgotten, tmp_path):
    built, kept = forgotten
    built = copy_of(built, tmp_path)
    repo = built.repo()
    before = data_files(built.path)
    dry = prune(repo, dry_run=True)
    assert data_files(built.path) == before
    # a dry run may assume snapshots forgotten (forget --dry-run --prune): then nothing is needed
    none_kept = prune(repo, dry_run=True, forgotten=kept)
    assert sorted(none_kept.packs_deleted) == sorted(before) and not none_kept.packs_repacked
    report = prune(repo)
    assert report.packs_deleted == dry.packs_deleted and report.packs_repacked == dry.packs_repacked
    assert report.packs_deleted and report.packs_repacked and report.packs_written
    assert report.unused_bytes_before > 0 and report.unused_bytes_after == 0
    after = data_files(built.path)
    assert not after & set(report.packs_deleted + report.packs_repacked)
    assert set(report.packs_written) <= after
    assert_snapshots_intact(repo, built, kept)
    # one packindex file per kept snapshot, naming only packs that exist
    files = load_all(repo).files
    assert sorted(f.snapshot for f in files) == sorted(kept)
    assert all({p.hex() for p in f.packs} <= after for f in files)
    require_restic()
    Restic(built.path, PASSWORD).check("--read-data")
    assert deep_verify(repo, read_data=True).ok
    # nothing left to do; a full walk agrees with what the packindex files said
    again = prune(repo, use_packindex=False)
    assert not (again.packs_deleted or again.packs_repacked or again.packs_unindexed_deleted)


def test_lock_conflict_found_by_the_late_check_writes_nothing(forgotten, tmp_path):
    """vault prune reads and plans while its lock's second check runs (confirm_lock): a conflict that
    check finds stops it before its first write or delete, in a dry run too."""
    built, _kept = forgotten
    built = copy_of(built, tmp_path)
    counting = CrashingBackend(LocalBackend(str(built.path)))
    before = data_files(built.path)
    calls = []

    def conflict() -> None:
        calls.append(counting.mutations)
        raise VaultLocked("the vault is locked: exclusive lock by someone@another-host")

    for dry_run in (False, True):
        with pytest.raises(VaultLocked):
            prune(built.repo(counting), dry_run=dry_run, confirm_lock=conflict)
    assert calls == [0, 0] and counting.mutations == 0
    assert data_files(built.path) == before
    report = prune(built.repo(counting), confirm_lock=lambda: calls.append(counting.mutations))
    assert calls[-1] == 0 and counting.mutations > 0 and report.packs_deleted


def test_cli_prune_refuses_a_vault_locked_elsewhere(forgotten, tmp_path):
    built, _kept = forgotten
    built = copy_of(built, tmp_path)
    other = Lock(GoTime.now(), False, "another-host", "someone", 4242)
    built.repo().save_unpacked("locks", other.encode())
    before = data_files(built.path)
    result = vault("-r", built.path, "prune", password=PASSWORD, expect=11)
    assert "another-host" in one_line_error(result)
    assert data_files(built.path) == before
    assert len(list(LocalBackend(str(built.path)).list("locks"))) == 1  # only the other one


def test_packindex_spares_walks_and_unlimited_only_deletes(forgotten, tmp_path):
    built, kept = forgotten
    built = copy_of(built, tmp_path)
    repo = built.repo()
    prune(repo)
    newest = max(kept, key=lambda s: repo.load_snapshot(s).time.ns)
    forget(repo, Policy(last=1))
    # a leftover pack of an interrupted job: in data/ but in no index
    stray = repo.backend.read("data", next(iter(data_files(built.path))))
    leftover = bytes(reversed(stray))
    repo.backend.write("data", hashlib.sha256(leftover).hexdigest(), leftover)
    report = prune(repo, max_unused=None)
    assert report.snapshots_trusted == 1 and report.snapshots_walked == 0
    assert report.packs_repacked == [] and report.packs_unindexed_deleted
    assert hashlib.sha256(leftover).hexdigest() not in data_files(built.path)
    assert_snapshots_intact(repo, built, [newest])
    full = prune(repo, use_packindex=False)
    assert full.snapshots_walked == 1
    assert_snapshots_intact(repo, built, [newest])
    assert deep_verify(repo).ok


def test_missing_pack_refuses_and_names_the_snapshot(forgotten, tmp_path):
    built, kept = forgotten
    built = copy_of(built, tmp_path)
    repo = built.repo()
    # a data pack that the newest snapshot needs
    newest = max(kept, key=lambda s: repo.load_snapshot(s).time.ns)
    blob = next(
        b
        for _p, node in repo.walk(repo.load_snapshot(newest).tree)
        if node.type == "file" and node.name == "new-5"
        for b in node.content
    )
    pack = repo.index.lookup(blob, DATA).pack_id.hex()
    os.remove(LocalBackend(str(built.path)).path("data", pack))
    before = data_files(built.path)
    index_before = sorted(n for n, _ in repo.backend.list("index"))
    with pytest.raises(MissingData) as caught:
        prune(repo)
    assert f"snapshot {newest[:8]} depends on missing data blob " in str(caught.value)
    assert any(m.snapshot == newest and m.blob_id == blob.hex() for m in caught.value.missing)
    assert data_files(built.path) == before
    assert sorted(n for n, _ in repo.backend.list("index")) == index_before
    result = vault("-r", built.path, "prune", password=PASSWORD, expect=1)
    assert f"snapshot {newest[:8]} depends on missing" in one_line_error(result)
    assert data_files(built.path) == before


def test_prune_crashing_at_every_step_leaves_a_valid_vault(forgotten, tmp_path):
    built, _kept = forgotten
    # pruned once (so packindex files exist), then one more forgotten: the second prune removes a
    # stale packindex file too
    built = copy_of(built, tmp_path)
    repo = built.repo()
    prune(repo)
    forget(repo, Policy(last=2))
    kept = [n for n, _ in repo.backend.list("snapshots")]
    (tmp_path / "count").mkdir()
    counting = CrashingBackend(LocalBackend(str(copy_of(built, tmp_path / "count").path)))
    prune(built.repo(counting))
    # Crash at the first and the last step of every phase (writing packs, index, packindex, removing
    # packindex, index, packs): every transition the order of writes and deletes depends on.
    log = counting.log
    points = sorted(
        {i for i in range(len(log)) if i == 0 or log[i] != log[i - 1]}
        | {i for i in range(len(log)) if i == len(log) - 1 or log[i] != log[i + 1]}
    )
    assert {("write", "data"), ("remove", "packindex"), ("remove", "data")} <= set(log)
    assert len(points) >= 8
    for k in points:
        dest = tmp_path / f"crash-{k}"
        dest.mkdir()
        copy = copy_of(built, dest)
        with pytest.raises(Crash):
            prune(copy.repo(CrashingBackend(LocalBackend(str(copy.path)), after=k)))
        repo = copy.repo()
        assert deep_verify(repo).ok, k
        assert_snapshots_intact(repo, copy, kept)
        prune(repo)
        assert_snapshots_intact(repo, copy, kept)
        again = prune(repo, use_packindex=False)
        assert not (again.packs_deleted or again.packs_repacked), k
        assert again.unused_bytes_before == 0, k
        shutil.rmtree(dest)


KILLER = """
import os, signal, sys
from tests.ops.test_prune import CrashingBackend
from vaultfs.backend import LocalBackend
from vaultfs.ops.prune import prune
from vaultfs.repo.repository import Repository

class Killer(CrashingBackend):
    def crash(self):
        os.kill(os.getpid(), signal.SIGKILL)

repo = Repository.open(Killer(LocalBackend(sys.argv[1]), int(sys.argv[2])), b"pw")
repo.pack_size = 64 * 1024
with repo.lock(exclusive=True):
    prune(repo)
"""


def test_prune_killed_with_sigkill_then_rerun(forgotten, tmp_path):
    require_restic()
    built, kept = forgotten
    built = copy_of(built, tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, str(built.path), "6"],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -9, proc.stderr
    restic = Restic(built.path, PASSWORD)
    restic.check("--no-lock")  # restic does not skip the dead process's lock
    assert_snapshots_intact(built.repo(), built, kept)
    # the dead process's lock does not block the re-run on this host
    vault("-r", built.path, "prune", password=PASSWORD)
    restic.check("--no-lock", "--read-data")
    repo = built.repo()
    assert_snapshots_intact(repo, built, kept)
    assert deep_verify(repo).ok


def _prune_restics_repository(made: ResticRepo, tmp_path: Path) -> None:
    """Forget the big snapshot of a repository restic made and prune it: restic must still be happy."""
    shutil.copytree(made.path, tmp_path / "repo")
    repo = Repository.open(LocalBackend(str(tmp_path / "repo")), made.password.encode())
    with repo.lock(exclusive=True):
        forget(repo, snapshot_ids=[made.snapshot_id])
        report = prune(repo)
    assert (report.packs_deleted or report.packs_repacked) and report.unused_bytes_after == 0
    Restic(tmp_path / "repo", made.password).check("--read-data")
    assert deep_verify(repo).ok
    assert [n for n, _ in repo.backend.list("snapshots")] == [made.tagged_snapshot_id]


def test_prune_a_restic_v1_repository(restic_repo_v1, tmp_path):
    _prune_restics_repository(restic_repo_v1, tmp_path)


def test_prune_a_restic_v2_repository(restic_repo_v2, tmp_path):
    _prune_restics_repository(restic_repo_v2, tmp_path)
