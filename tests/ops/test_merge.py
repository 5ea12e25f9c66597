"""vault merge: split a vault in two, merge it back, and every snapshot restores byte-identical; blobs the
target has are not copied again; vaults with different master keys are refused with a clear message.

Vault builders come from test_prune.py.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers.restic import Restic, require_restic
from tests.ops.test_prune import PASSWORD, Built, build_vault, data_files, restored_files
from tests.tools.cli import one_line_error, vault
from vaultfs.backend import LocalBackend
from vaultfs.errors import VaultError
from vaultfs.ops.deepverify import deep_verify
from vaultfs.ops.merge import merge
from vaultfs.ops.split import split
from vaultfs.repo.repository import Repository, filter_snapshots


def test_split_then_merge_gives_back_every_snapshot(tmp_path):
    built = build_vault(tmp_path / "a", snapshots=4, hosts=("alpha", "beta"))
    repo = built.repo()
    everything = repo.list_snapshots()
    beta = filter_snapshots(everything, hosts=["beta"])
    split(repo, LocalBackend(str(tmp_path / "b")), PASSWORD.encode(), beta, move=True)
    assert len(repo.list_snapshots()) == 2
    other = Repository.open(LocalBackend(str(tmp_path / "b")), PASSWORD.encode())
    report = merge(repo, other)
    assert sorted(report.copy.snapshots_copied) == sorted(sid for sid, _ in beta)
    # alpha and beta share most files: those blobs were in the target already
    assert report.copy.blobs_present > 0
    assert sorted(n for n, _ in repo.backend.list("snapshots")) == sorted(built.files)
    assert deep_verify(repo, read_data=True).ok
    for sid in built.files:
        assert restored_files(repo, sid, built.prefix, tmp_path / "r" / sid) == built.files[sid]
    # merging again copies nothing; the source was only read
    before = data_files(built.path)
    again = merge(repo, other)
    assert again.copy.snapshots_present and not again.copy.snapshots_copied
    assert data_files(built.path) == before
    require_restic()
    Restic(built.path, PASSWORD).check("--read-data")


def test_merge_refuses_vaults_with_different_keys(tmp_path):
    built = build_vault(tmp_path / "a", snapshots=1)
    stranger = Repository.init(LocalBackend(str(tmp_path / "c")), PASSWORD.encode())
    with pytest.raises(VaultError, match="different master keys"):
        merge(built.repo(), stranger)
    result = vault("-r", built.path, "merge", "--from", tmp_path / "c", password=PASSWORD, expect=1)
    assert "different master keys" in one_line_error(result)
    assert [n for n, _ in stranger.backend.list("snapshots")] == []


def test_merge_cli_copies_a_split_back(tmp_path):
    built = build_vault(tmp_path / "a", snapshots=2, hosts=("alpha", "beta"))
    repo = built.repo()
    beta = filter_snapshots(repo.list_snapshots(), hosts=["beta"])
    split(repo, LocalBackend(str(tmp_path / "b")), PASSWORD.encode(), beta, move=True)
    result = vault("-r", built.path, "--json", "merge", "--from", tmp_path / "b", password=PASSWORD)
    doc = json.loads(result.out)
    assert doc["copy"]["snapshots_copied"] == [beta[0][0]]
    merged = Built(built.path, built.files, built.prefix, built.key, built.config)
    assert sorted(n for n, _ in merged.repo().backend.list("snapshots")) == sorted(built.files)
