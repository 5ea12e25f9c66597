"""vault backup against real restic 0.14: byte-identical trees, restic check --read-data on vaults vault
backed up into (v1 and v2), restic restore of vault snapshots, and deduplication in both directions.

Tree IDs are SHA-256 of the tree JSON, so equal IDs mean vault recorded every name, type, mode, time,
owner, inode, link count, xattr (in order), device number and content list exactly as restic did.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.env import env_for
from tests.helpers.restic import Restic, ResticRepo
from tests.helpers.trees import assert_same_tree
from vaultfs.backend import LocalBackend
from vaultfs.format.pack import TREE
from vaultfs.repo.repository import Repository

pytestmark = pytest.mark.restic
ROOT = os.geteuid() == 0
PASSWORD = "interop pw"


def vault_backup(repo: Path, password: str, *args: str, cwd: Path | None = None) -> dict:
    """Run `vault backup --json ARGS` and return its summary."""
    proc = subprocess.run(
        [sys.executable, "-m", "vaultfs.tools.main", "-r", str(repo), "backup", "--json", *args],
        env=env_for(password),
        cwd=cwd,
        capture_output=True,
        text=True,
        errors="surrogateescape",
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def restic_backup(restic: Restic, *args: str, cwd: Path | None = None) -> dict:
    lines = restic.json("backup", *args, cwd=cwd)
    lines = lines if isinstance(lines, list) else [lines]
    summary = next(m for m in lines if m.get("message_type") == "summary")
    summary["snapshot_id"] = restic.full_ids(summary["snapshot_id"])[0]
    return summary


def tree_of(restic: Restic, snapshot_id: str) -> str:
    return json.loads(restic.cat("snapshot", snapshot_id))["tree"]


@pytest.fixture(params=[1, 2], ids=["v1", "v2"])
def restic_copy(request, tmp_path) -> tuple[ResticRepo, Path]:
    """A writable copy of a restic-made repository (the session fixture stays untouched)."""
    repo: ResticRepo = request.getfixturevalue(f"restic_repo_v{request.param}")
    copy = tmp_path / "repo"
    shutil.copytree(repo.path, copy)
    return repo, copy


def test_trees_are_byte_identical_to_restics(restic_copy):
    fixture, copy = restic_copy
    restic = Restic(copy, fixture.password)
    summary = vault_backup(copy, fixture.password, ".", cwd=fixture.source)
    # the same tree ID as restic's snapshot of the same folder (made when the session started)
    assert tree_of(restic, summary["snapshot_id"]) == tree_of(restic, fixture.snapshot_id)
    # restic's snapshot of another host is not a parent; nothing but trees was stored
    assert summary["parent"] == "" and summary["data_blobs"] == 0
    restic.check("--read-data")


@pytest.fixture(params=[1, 2], ids=["v1", "v2"])
def vault_of_tricky_tree(request, tmp_path, tricky_tree) -> tuple[Path, dict]:
    repo = tmp_path / "vault"
    subprocess.run(
        [sys.executable, "-m", "vaultfs.tools.main", "-r", str(repo), "init", "-q"]
        + ["--repository-version", str(request.param)],
        env=env_for(PASSWORD),
        check=True,
        capture_output=True,
    )
    return repo, vault_backup(repo, PASSWORD, ".", cwd=tricky_tree)


def test_restic_checks_and_restores_what_vault_backed_up(
    vault_of_tricky_tree, tricky_tree, tmp_path
):
    repo, summary = vault_of_tricky_tree
    restic = Restic(repo, PASSWORD)
    restic.check("--read-data")
    target = restic.restore(summary["snapshot_id"], tmp_path / "restored")
    assert_same_tree(tricky_tree, target, owners=ROOT)


def test_dedup_in_both_directions(vault_of_tricky_tree, tricky_tree):
    repo, summary = vault_of_tricky_tree
    restic = Restic(repo, PASSWORD)
    total = summary["total_bytes_processed"]
    assert summary["data_added"] > total // 2  # the first backup stored the data
    # restic backing up the same folder after vault adds nothing: same chunks, same trees
    theirs = restic_backup(restic, ".", cwd=tricky_tree)
    assert theirs["data_added"] == 0, theirs
    assert tree_of(restic, theirs["snapshot_id"]) == tree_of(restic, summary["snapshot_id"])
    # and vault after restic (restic's snapshot is the parent now: same host and path)
    again = vault_backup(repo, PASSWORD, ".", cwd=tricky_tree)
    assert again["data_added"] == 0 and again["parent"] == theirs["snapshot_id"]
    restic.check("--read-data")


def test_vault_after_restic_on_new_data_stores_nothing(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        (data / f"f{i}").write_bytes(os.urandom(3 * 1024 * 1024 + i))
    restic = Restic(tmp_path / "repo", PASSWORD)
    restic.init(version=2)
    # "." keeps /tmp (whose times other tests change) out of the trees
    theirs = restic_backup(restic, ".", cwd=data)
    ours = vault_backup(tmp_path / "repo", PASSWORD, ".", "--force", cwd=data)
    assert ours["data_blobs"] == 0 and ours["tree_blobs"] == 0 and ours["data_added"] == 0
    assert tree_of(restic, ours["snapshot_id"]) == tree_of(restic, theirs["snapshot_id"])


def _chain(repo: Path, password: str, tree_id: str) -> list[dict]:
    """The nodes from the snapshot root down a chain of single-entry trees."""
    r = Repository.open(LocalBackend(str(repo)), password.encode())
    r.load_index()
    out = []
    current: str | None = tree_id
    while current:
        nodes = json.loads(r.load_blob(TREE, bytes.fromhex(current)))["nodes"]
        if len(nodes) != 1:
            break
        out.append(nodes[0])
        current = nodes[0].get("subtree")
    return out


def test_absolute_path_is_recorded_as_restic_does(tmp_path):
    """Backing up /.../a/b/c: every folder on the way is a node with its own metadata."""
    leaf = tmp_path / "a" / "b" / "c"
    leaf.mkdir(parents=True)
    (leaf / "file").write_bytes(b"content\n")
    restic = Restic(tmp_path / "repo", PASSWORD)
    restic.init(version=2)
    theirs = restic_backup(restic, str(leaf))
    ours = vault_backup(tmp_path / "repo", PASSWORD, str(leaf), "--force")
    a = _chain(tmp_path / "repo", PASSWORD, tree_of(restic, theirs["snapshot_id"]))
    b = _chain(tmp_path / "repo", PASSWORD, tree_of(restic, ours["snapshot_id"]))
    parts = str(leaf).strip("/").split("/")
    assert [n["name"] for n in a] == [n["name"] for n in b] == [*parts, "file"]
    mine = len(str(tmp_path).strip("/").split("/"))
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if i < mine - 1:
            # folders above the test's own may change meanwhile (other tests write to /tmp)
            assert (x["type"], x["inode"], x["mode"]) == (y["type"], y["inode"], y["mode"])
        else:
            assert x == y
    assert (
        json.loads(restic.cat("snapshot", ours["snapshot_id"]))["paths"]
        == json.loads(restic.cat("snapshot", theirs["snapshot_id"]))["paths"]
        == [str(leaf)]
    )


def test_relative_and_clashing_targets_match_restic(tmp_path):
    work = tmp_path / "w"
    for rel, body in (("a/x/f", b"1"), ("x/h", b"2"), ("z", b"3")):
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_bytes(body)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "g").write_bytes(b"4")
    restic = Restic(tmp_path / "repo", PASSWORD)
    restic.init(version=2)
    targets = ["a/x", "x", "../x", "z", "./a/x"]
    theirs = restic_backup(restic, *targets, cwd=work)
    ours = vault_backup(tmp_path / "repo", PASSWORD, *targets, "--force", cwd=work)
    assert tree_of(restic, ours["snapshot_id"]) == tree_of(restic, theirs["snapshot_id"])
    assert (
        json.loads(restic.cat("snapshot", ours["snapshot_id"]))["paths"]
        == json.loads(restic.cat("snapshot", theirs["snapshot_id"]))["paths"]
    )


EXCLUDES = [
    "*.txt",
    "!hello*",
    "sizes/5*",
    "deep/**/bottom",
    "wide",
    "**/xattrs/tagged-*",
    "names/*space*",
    "[e]mpty-di?",
]


def test_excludes_match_restics(restic_copy, tmp_path):
    fixture, copy = restic_copy
    restic = Restic(copy, fixture.password)
    args = [a for p in EXCLUDES for a in ("--exclude", p)]
    excl = tmp_path / "excludes"
    excl.write_text("# from a file\nlinks/rel*\n\n")
    args += ["--exclude-file", str(excl)]
    theirs = restic_backup(restic, ".", *args, cwd=fixture.source)
    ours = vault_backup(copy, fixture.password, ".", *args, "--force", cwd=fixture.source)
    assert tree_of(restic, ours["snapshot_id"]) == tree_of(restic, theirs["snapshot_id"])
    snap = json.loads(restic.cat("snapshot", ours["snapshot_id"]))
    assert (
        snap["excludes"]
        == EXCLUDES
        == json.loads(restic.cat("snapshot", theirs["snapshot_id"]))["excludes"]
    )
