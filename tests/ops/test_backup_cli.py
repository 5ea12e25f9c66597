"""`vault backup` through the real CLI: output and exit codes, unreadable sources (exit 3), Ctrl-C and
kill -9 in the middle of a backup, two backups into one vault at the same time, and the lock.

After every interruption the vault must still pass `restic check --read-data`, hold no snapshot of the
interrupted run, and take the next backup.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.env import env_for
from tests.helpers.restic import Restic, require_restic
from tests.tools.cli import one_line_error, vault
from vaultfs.backend import LocalBackend
from vaultfs.repo.repository import Repository

ROOT = os.geteuid() == 0
MIB = 1024 * 1024


def _random_tree(root: Path, files: int, size: int, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (root / f"part-{seed}-{i:03d}.bin").write_bytes(os.urandom(size))
    (root / "notes.txt").write_text("small text file\n" * 50)
    return root


@pytest.fixture
def vault_repo(tmp_path) -> Path:
    repo = tmp_path / "vault"
    vault("-r", repo, "init", "-q")
    return repo


def _snapshots(repo: Path) -> list[str]:
    return [n for n, _ in LocalBackend(str(repo)).list("snapshots")]


def _start(repo: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vaultfs.tools.main", "-r", str(repo), "backup", *args],
        env=env_for("pw"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_packs(repo: Path, proc: subprocess.Popen, count: int = 1) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if len(list(LocalBackend(str(repo)).list("data"))) >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(
                f"backup ended before it wrote {count} packs: {proc.stderr.read()}"
            )
        time.sleep(0.01)
    raise AssertionError("no pack appeared")


def test_text_and_json_output(vault_repo, tmp_path):
    data = _random_tree(tmp_path / "data", 2, MIB)
    out = vault("-r", vault_repo, "backup", data, "--tag", "t1,t2", "--host", "h")
    assert "Files:        3 new" in out.out and "snapshot " in out.out
    out = vault("-r", vault_repo, "backup", data, "--json", "--host", "h")
    lines = [json.loads(ln) for ln in out.out.splitlines()]
    summary = lines[-1]
    assert summary["message_type"] == "summary"
    assert summary["files_unmodified"] == 3 and summary["data_blobs"] == 0
    assert all(ln["message_type"] in ("status", "summary") for ln in lines)
    vault("-r", vault_repo, "backup", data)
    snaps = json.loads(vault("-r", vault_repo, "snapshots", "--json").out)
    assert sorted(s["hostname"] for s in snaps) == ["h", "h", os.uname().nodename]
    assert next(s for s in snaps if s["hostname"] == "h")["tags"] == ["t1", "t2"]
    # --quiet prints nothing, --dry-run stores nothing
    assert vault("-r", vault_repo, "backup", "-q", data).out == ""
    before = _snapshots(vault_repo)
    out = vault("-r", vault_repo, "backup", "--dry-run", "--force", data)
    assert "Would add" in out.out and _snapshots(vault_repo) == before


def test_time_option_and_bad_usage(vault_repo, tmp_path):
    data = _random_tree(tmp_path / "data", 1, 1000)
    out = vault("-r", vault_repo, "backup", data, "--time", "2021-02-03 04:05:06", "--json")
    snap_id = json.loads(out.out.splitlines()[-1])["snapshot_id"]
    snaps = json.loads(vault("-r", vault_repo, "snapshots", "--json").out)
    assert next(s for s in snaps if s["id"] == snap_id)["time"].startswith("2021-02-03T")
    assert "--time" in one_line_error(
        vault("-r", vault_repo, "backup", data, "--time", "x", expect=2)
    )
    err = one_line_error(vault("-r", vault_repo, "backup", data, "--exclude", "[", expect=2))
    assert "invalid exclude pattern" in err
    err = one_line_error(vault("-r", vault_repo, "backup", tmp_path / "missing", expect=2))
    assert "nothing to back up" in err


def test_missing_target_gives_exit_3_and_a_snapshot(vault_repo, tmp_path):
    data = _random_tree(tmp_path / "data", 1, 1000)
    res = vault("-r", vault_repo, "backup", data, tmp_path / "missing", "--json", expect=3)
    lines = [json.loads(ln) for ln in res.out.splitlines()]
    errors = [ln for ln in lines if ln["message_type"] == "error"]
    assert [e["item"] for e in errors] == [str(tmp_path / "missing")]
    assert lines[-1]["snapshot_id"] and len(_snapshots(vault_repo)) == 1


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder everyone may use (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="vaultfs-backup-test-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _as_unprivileged(cmd: list[str]) -> list[str]:
    if not ROOT:
        return cmd
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot drop privileges to test permissions")
    return ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", *cmd]


def test_unreadable_items_are_reported_and_skipped(shared_dir):
    data = shared_dir / "data"
    data.mkdir()
    (data / "ok.txt").write_text("readable\n")
    (data / "secret.txt").write_text("no access\n")
    (data / "secret.txt").chmod(0)
    (data / "closed").mkdir()
    (data / "closed" / "inside").write_text("x")
    (data / "closed").chmod(0)
    for path in (shared_dir, data):
        path.chmod(0o777)
    repo = shared_dir / "vault"
    base = [sys.executable, "-m", "vaultfs.tools.main", "-r", str(repo)]
    env = env_for("pw")
    subprocess.run(_as_unprivileged([*base, "init", "-q"]), env=env, check=True)
    proc = subprocess.run(
        _as_unprivileged([*base, "backup", "--json", str(data)]),
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [json.loads(ln) for ln in proc.stdout.splitlines()]
    errors = sorted(ln["item"] for ln in lines if ln["message_type"] == "error")
    assert errors == [str(data / "closed"), str(data / "secret.txt")]
    summary = lines[-1]
    assert summary["files_new"] == 1 and len(summary["errors"]) == 2
    # the snapshot holds what could be read
    repo_obj = Repository.open(LocalBackend(str(repo)), b"pw")
    repo_obj.load_index()
    tree = repo_obj.load_snapshot(summary["snapshot_id"]).tree
    names = {p.rsplit("/", 1)[-1] for p, _ in repo_obj.walk(tree)}
    assert "ok.txt" in names and "secret.txt" not in names and "closed" not in names


def _restic(repo: Path) -> Restic:
    require_restic()
    return Restic(repo, "pw")


@pytest.mark.restic
def test_ctrl_c_leaves_a_valid_vault_and_the_next_backup_reuses_the_data(vault_repo, tmp_path):
    data = _random_tree(tmp_path / "data", 24, 4 * MIB)
    proc = _start(vault_repo, str(data))
    _wait_for_packs(vault_repo, proc, 2)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert _snapshots(vault_repo) == []
    assert not list(LocalBackend(str(vault_repo)).list("locks"))
    _restic(vault_repo).check("--read-data")
    # what was stored before Ctrl-C is in an index, so the next backup does not store it again
    stored = sum(size for _, size in LocalBackend(str(vault_repo)).list("data"))
    out = vault("-r", vault_repo, "backup", data, "--json")
    summary = json.loads(out.out.splitlines()[-1])
    assert summary["data_added_packed"] < 96 * MIB - stored * 0.9
    _restic(vault_repo).check("--read-data")


@pytest.mark.restic
def test_kill_9_leaves_a_valid_vault(vault_repo, tmp_path):
    data = _random_tree(tmp_path / "data", 24, 4 * MIB)
    proc = _start(vault_repo, str(data))
    _wait_for_packs(vault_repo, proc, 2)
    proc.kill()
    proc.communicate(timeout=60)
    assert _snapshots(vault_repo) == []
    restic = _restic(vault_repo)
    restic.run("unlock")  # the killed process's lock is stale: same host, process gone
    restic.check("--read-data")
    # our own lock code ignores a lock of a dead process on this host: no unlock needed
    vault("-r", vault_repo, "backup", data)
    assert len(_snapshots(vault_repo)) == 1
    restic.check("--read-data")
    restic_ls = restic.run("ls", "latest").stdout
    assert "notes.txt" in restic_ls


@pytest.mark.restic
def test_kill_9_after_an_index_was_written_reuses_the_packs(vault_repo, tmp_path):
    """A long backup writes an index now and then; a backup killed after one reuses its packs."""
    data = _random_tree(tmp_path / "data", 24, 4 * MIB)
    script = (
        "import sys\n"
        "from vaultfs.backend import LocalBackend\n"
        "from vaultfs.ops.backup import backup\n"
        "from vaultfs.repo.repository import Repository\n"
        "repo = Repository.open(LocalBackend(sys.argv[1]), b'pw')\n"
        "with repo.lock():\n"
        "    backup(repo, [sys.argv[2]], index_interval=0.0)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(vault_repo), str(data)],
        env=env_for("pw"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    backend = LocalBackend(str(vault_repo))
    while len(list(backend.list("index"))) < 2:
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    proc.kill()
    proc.communicate(timeout=60)
    assert _snapshots(vault_repo) == []
    restic = _restic(vault_repo)
    restic.run("unlock")
    restic.check("--read-data")
    indexed = Repository.open(backend, b"pw")
    indexed.load_index()
    known = sum(loc.length for loc in indexed.index.iter_blobs())
    assert known > 0
    summary = json.loads(vault("-r", vault_repo, "backup", data, "--json").out.splitlines()[-1])
    assert summary["data_added_packed"] <= 96 * MIB + 2 * MIB - known
    restic.check("--read-data")


@pytest.mark.restic
def test_two_hosts_back_up_into_one_vault_at_the_same_time(vault_repo, tmp_path):
    a = _random_tree(tmp_path / "a", 8, 2 * MIB, seed=1)
    b = _random_tree(tmp_path / "b", 8, 2 * MIB, seed=2)
    # the same file on both hosts: both may store it, the vault stays valid either way
    shutil.copy(a / "part-1-000.bin", b / "shared.bin")
    procs = [
        _start(vault_repo, "--host", "alpha", str(a)),
        _start(vault_repo, "--host", "beta", str(b)),
    ]
    for proc in procs:
        _out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    snaps = json.loads(vault("-r", vault_repo, "snapshots", "--json").out)
    assert sorted(s["hostname"] for s in snaps) == ["alpha", "beta"]
    restic = _restic(vault_repo)
    restic.check("--read-data")
    for snap in snaps:
        target = tmp_path / f"restored-{snap['hostname']}"
        restic.restore(snap["id"], target)
        src = a if snap["hostname"] == "alpha" else b
        for f in src.iterdir():
            assert (target / str(src).lstrip("/") / f.name).read_bytes() == f.read_bytes()


def test_an_exclusive_lock_blocks_backup(vault_repo, tmp_path):
    data = _random_tree(tmp_path / "data", 1, 1000)
    repo = Repository.open(LocalBackend(str(vault_repo)), b"pw")
    held = repo.lock(exclusive=True)
    try:
        err = one_line_error(vault("-r", vault_repo, "backup", data, expect=11))
        assert "locked" in err
    finally:
        held.release()
    assert _snapshots(vault_repo) == []
    vault("-r", vault_repo, "backup", data)
