"""vault split: a new vault with the same master key holding some snapshots, copied without
re-encryption; --move forgets and prunes them in the source; a split killed half-way is finished by
running it again; a damaged selection is refused before anything is created.

Merging back is in test_merge.py. Vault builders and the crash-injecting backend come from
test_prune.py.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers.restic import Restic, require_restic
from tests.ops.test_prune import (
    PASSWORD,
    Built,
    Crash,
    CrashingBackend,
    assert_snapshots_intact,
    build_vault,
    copy_of,
    data_files,
    restored_files,
)
from tests.tools.cli import vault
from vaultfs.backend import LocalBackend
from vaultfs.format.pack import DATA
from vaultfs.ops.deepverify import deep_verify
from vaultfs.ops.prune import MissingData
from vaultfs.ops.split import same_key, split
from vaultfs.repo.repository import Repository, filter_snapshots


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory) -> Built:
    """Four snapshots, alternately of hosts alpha and beta (they share most files). Do not modify."""
    return build_vault(tmp_path_factory.mktemp("split"), snapshots=4, hosts=("alpha", "beta"))


def test_split_move_keeps_ids_and_both_vaults_verify(two_hosts, tmp_path):
    built = copy_of(two_hosts, tmp_path)
    repo = built.repo()
    everything = repo.list_snapshots()
    beta = filter_snapshots(everything, hosts=["beta"])
    target = tmp_path / "beta"
    report = split(repo, LocalBackend(str(target)), PASSWORD.encode(), beta, move=True)
    assert report.created and report.moved
    assert sorted(report.copy.snapshots_copied) == sorted(sid for sid, _ in beta)
    assert report.copy.packs_copied or report.copy.packs_written
    # the new vault opens with the same password, shares the key and polynomial, and has a key of
    # its own
    other = Repository.open(LocalBackend(str(target)), PASSWORD.encode())
    assert same_key(other.key, repo.key)
    assert other.config.chunker_polynomial == repo.config.chunker_polynomial
    assert other.config.id != repo.config.id
    moved = Built(target, built.files, built.prefix, built.key, other.config)
    assert sorted(n for n, _ in other.backend.list("snapshots")) == sorted(s for s, _ in beta)
    assert_snapshots_intact(moved.repo(), moved)
    for sid, _snap in beta:
        restored = restored_files(other, sid, built.prefix, tmp_path / "restored" / sid)
        assert restored == built.files[sid]
    alpha = [sid for sid, snap in everything if snap.hostname == "alpha"]
    assert sorted(n for n, _ in repo.backend.list("snapshots")) == sorted(alpha)
    assert_snapshots_intact(built.repo(), built)
    assert report.prune is not None and report.prune.packs_deleted
    for path in (built.path, target):
        assert deep_verify(Repository(LocalBackend(str(path)), repo.key, repo.config)).ok
    require_restic()
    Restic(target, PASSWORD).check("--read-data")
    Restic(built.path, PASSWORD).check()


def test_split_killed_half_way_is_finished_by_running_it_again(two_hosts, tmp_path):
    built = copy_of(two_hosts, tmp_path)
    repo = built.repo()
    beta = filter_snapshots(repo.list_snapshots(), hosts=["beta"])
    counting = CrashingBackend(LocalBackend(str(tmp_path / "count")))
    split(repo, counting, PASSWORD.encode(), beta)
    log = counting.log
    kinds = [kind for _call, kind in log]
    # keys and config first (a new vault), then packs, index, snapshots, packindex
    assert kinds.index("data") < kinds.index("index") < kinds.index("snapshots")
    assert kinds.index("snapshots") < kinds.index("packindex")
    points = sorted({i for i in range(1, len(log)) if log[i] != log[i - 1]} | {0, len(log) - 1})
    for k in points:
        target = tmp_path / f"crash-{k}"
        with pytest.raises(Crash):
            split(
                repo, CrashingBackend(LocalBackend(str(target)), after=k), PASSWORD.encode(), beta
            )
        had_config = (target / "config").exists()
        if had_config:
            half = Repository.open(LocalBackend(str(target)), PASSWORD.encode())
            assert deep_verify(half).ok, k
        again = split(repo, LocalBackend(str(target)), PASSWORD.encode(), beta)
        assert again.created == (not had_config)
        done = Built(target, built.files, built.prefix, built.key, built.config)
        assert sorted(n for n, _ in done.repo().backend.list("snapshots")) == sorted(
            s for s, _ in beta
        )
        assert_snapshots_intact(done.repo(), done)
        assert deep_verify(done.repo()).ok, k
    # the source was never changed
    assert data_files(built.path) == data_files(two_hosts.path)


def test_damaged_selection_is_refused_before_the_target_exists(two_hosts, tmp_path):
    built = copy_of(two_hosts, tmp_path)
    repo = built.repo()
    alpha = filter_snapshots(repo.list_snapshots(), hosts=["alpha"])
    sid, snap = alpha[-1]
    blob = next(b for _p, n in repo.walk(snap.tree) if n.type == "file" for b in n.content)
    os.remove(
        LocalBackend(str(built.path)).path("data", repo.index.lookup(blob, DATA).pack_id.hex())
    )
    with pytest.raises(MissingData, match=f"snapshot {sid[:8]} depends on missing"):
        split(repo, LocalBackend(str(tmp_path / "t")), PASSWORD.encode(), alpha, move=True)
    assert not (tmp_path / "t").exists()
    assert sorted(n for n, _ in repo.backend.list("snapshots")) == sorted(built.files)


def test_split_cli_dry_run_then_real(two_hosts, tmp_path):
    built = copy_of(two_hosts, tmp_path)
    first = sorted(built.files)[0]
    target = tmp_path / "one"
    dry = vault(
        "-r", built.path, "--json", "split", "--to", target, "--snapshot", first[:8], "--dry-run"
    )
    assert json.loads(dry.out)["copy"]["snapshots_copied"] == [first]
    assert not target.exists()
    result = vault("-r", built.path, "--json", "split", "--to", target, "--snapshot", first[:8])
    doc = json.loads(result.out)
    assert doc["created"] and doc["copy"]["snapshots_copied"] == [first] and not doc["moved"]
    done = Built(target, built.files, built.prefix, built.key, built.config)
    assert_snapshots_intact(done.repo(), done, [first])
    # the source still has everything
    assert sorted(n for n, _ in built.repo().backend.list("snapshots")) == sorted(built.files)
