"""vault rebuild-indexes: a complete index from the pack headers, on restic-made vaults (see
test_deepverify.py for the vault and its helpers)."""

from __future__ import annotations

import json
import os

import pytest

from tests.ops.test_deepverify import PASSWORD, Vault, corrupt_at_generation, make_vault_copy
from tests.tools.cli import vault
from vaultfs.backend import RetryBackend
from vaultfs.ops.deepverify import deep_verify
from vaultfs.ops.rebuild import rebuild_indexes


@pytest.fixture
def vault_copy(tmp_path_factory, tmp_path) -> Vault:
    return make_vault_copy(tmp_path_factory, tmp_path)


class Recording(RetryBackend):
    """Passes everything through and records the order of writes and removals."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.log: list[tuple[str, str]] = []

    def write(self, kind, name, data):
        self.log.append(("write", kind))
        super().write(kind, name, data)

    def remove(self, kind, name):
        self.log.append(("remove", kind))
        super().remove(kind, name)


def test_every_index_file_lost_is_rebuilt_new_before_old(vault_copy):
    v = vault_copy
    repo = v.open()
    packs = sorted(n for n, _ in repo.backend.list("data"))
    old = sorted(n for n, _ in repo.backend.list("index"))
    (v.path / "index" / old[0]).unlink()
    repo.backend = Recording(repo.backend)
    with repo.lock(exclusive=True):
        report = rebuild_indexes(repo)
    assert report.packs == len(packs) and report.packs_unreadable == []
    assert len(report.packs_added) >= 1 and report.packs_dropped == []
    assert sorted(report.index_files_removed) == old[1:]
    index_ops = [op for op, kind in repo.backend.log if kind == "index"]
    assert index_ops == ["write"] * len(report.index_files_written) + ["remove"] * (len(old) - 1)
    assert sorted(n for n, _ in repo.backend.list("index")) == sorted(report.index_files_written)
    assert len(repo.index) == report.blobs  # the repository's index was reloaded
    assert deep_verify(v.open()).ok
    assert v.restic_ok()
    for tag in "abc":
        v.restore_matches(v.ids[tag], v.files[tag])


def test_gone_and_unreadable_packs(vault_copy):
    v = vault_copy
    repo = v.open()
    gone = v.blob_of(repo, "b", "/src/b/g1").pack_id.hex()
    broken = v.blob_of(repo, "a", "/src/a/f1").pack_id.hex()
    v.pack_file(gone).unlink()
    os.truncate(v.pack_file(broken), 1000)
    out = vault("-r", v.path, "rebuild-indexes", "--json", password=PASSWORD, expect=1).out
    doc = json.loads(out)
    assert doc["ok"] is False and doc["packs_dropped"] == [gone]
    assert [p["id"] for p in doc["packs_unreadable"]] == [broken]
    repo = v.open()
    assert repo.index.pack_ids() == {bytes.fromhex(n) for n, _ in repo.backend.list("data")} - {
        bytes.fromhex(broken)
    }
    report = deep_verify(repo)
    # The index matches the packs now; what is missing is data, and it is reported as such.
    assert report.missing_packs == [] and not report.index_needs_rebuild
    assert report.invalid_files == [f"data/{broken[:2]}/{broken}"]
    assert {d.id for d in report.damaged_snapshots} == set(v.ids.values())


def test_read_all_packs_keeps_only_blobs_that_hash_right(vault_copy):
    v = vault_copy
    pack, blob = corrupt_at_generation(v, "b", "/src/b/g3")
    repo = v.open()
    assert repo.index.has(blob, 0)
    with repo.lock(exclusive=True):
        headers_only = rebuild_indexes(repo)
    assert headers_only.blobs_dropped == [] and repo.index.has(blob, 0)
    with repo.lock(exclusive=True):
        report = rebuild_indexes(repo, read_all_packs=True)
    assert report.blobs_dropped == [f"data:{blob.hex()}"]
    assert not repo.index.has(blob, 0) and bytes.fromhex(pack) in repo.index.pack_ids()
    found = deep_verify(v.open(), read_data=True)
    assert {d.id for d in found.damaged_snapshots} == {v.ids["b"], v.ids["c"]}


def test_cli_on_a_clean_vault(vault_copy):
    v = vault_copy
    doc = json.loads(vault("-r", v.path, "rebuild-indexes", "--json", password=PASSWORD).out)
    assert doc["ok"] is True and doc["packs_added"] == [] and doc["packs_unreadable"] == []
    assert v.restic_ok()
