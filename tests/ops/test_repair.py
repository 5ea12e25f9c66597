"""Corruption tests: damage a restic-made vault -> verify/deep-verify report exactly that -> repair ->
deep-verify clean -> every unaffected snapshot restores byte-identical, and restic check agrees.

The vault and its helpers are in test_deepverify.py (three snapshots a, b, c; c shares a's and b's
data).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.env import env_for
from tests.ops.test_deepverify import (
    PASSWORD,
    Vault,
    corrupt_at_generation,
    flip,
    make_vault_copy,
)
from tests.tools.cli import one_line_error, vault
from vaultfs.errors import UsageError
from vaultfs.ops.deepverify import deep_verify
from vaultfs.ops.rebuild import rebuild_indexes
from vaultfs.ops.repair import repair
from vaultfs.ops.verify import verify


@pytest.fixture
def vault_copy(tmp_path_factory, tmp_path) -> Vault:
    return make_vault_copy(tmp_path_factory, tmp_path)


def run_repair(v: Vault, **options) -> object:
    repo = v.open()
    if not options.get("delete"):
        options.setdefault("quarantine", str(v.tmp / "quarantine"))
    with repo.lock(exclusive=not options.get("dry_run", False)):
        return repair(repo, **options)


def assert_clean(v: Vault) -> None:
    """deep-verify (with --read-data) and restic check --read-data both find nothing wrong."""
    report = deep_verify(v.open(), read_data=True)
    assert report.ok, report.problems
    assert v.restic_ok("--read-data"), v.restic.run("check", "--read-data", check=False).stderr


def snapshots(v: Vault) -> dict[str, object]:
    return dict(v.open().list_snapshots())


def without(files: dict[str, bytes], lost: set[str]) -> dict[str, bytes]:
    return {p: d for p, d in files.items() if p not in lost}


def test_flipped_bit_in_a_pack_salvage(vault_copy):
    v = vault_copy
    pack = v.damage_blob("a", "/src/a/f2")
    path = f"data/{pack[:2]}/{pack}"
    # verify (no password) sees exactly the damaged file ...
    found = verify(v.open().backend)
    assert [(b.path, b.folder) for b in found.bad] == [(path, "data")]
    # ... deep-verify without reading data cannot (the header and trees are intact), nor restic check
    assert deep_verify(v.open()).ok and v.restic_ok()
    # ... with --read-data both see it, and deep-verify names the snapshots and the file.
    report = deep_verify(v.open(), read_data=True)
    assert {d.id: [f.path for f in d.files] for d in report.damaged_snapshots} == {
        v.ids["a"]: ["/src/a/f2"],
        v.ids["c"]: ["/src/a/f2"],
    }
    assert [d.id for d in report.damaged_packs] == [pack]
    assert report.damaged_packs[0].good_blobs >= 4 and len(report.damaged_packs[0].bad_blobs) == 1
    assert not v.restic_ok("--read-data")

    result = run_repair(v, salvage=True)
    assert result.clean and result.blobs_salvaged >= 4
    assert (v.tmp / "quarantine" / path).exists()
    losses = {s.id: s for s in result.snapshots}
    assert set(losses) == {v.ids["a"], v.ids["c"]}
    assert all([f.path for f in s.files] == ["/src/a/f2"] for s in losses.values())
    assert_clean(v)
    snaps = snapshots(v)
    assert len(snaps) == 3 and v.ids["b"] in snaps
    v.restore_matches(v.ids["b"], v.files["b"])
    for tag in ("a", "c"):
        new_id = losses[v.ids[tag]].replaced_by
        new = snaps[new_id]
        assert new.original == bytes.fromhex(v.ids[tag]) and new.tags == [tag, "repaired"]
        v.restore_matches(new_id, without(v.files[tag], {"/src/a/f2"}))
    # Idempotent: a second run finds nothing to do.
    again = run_repair(v, salvage=True)
    assert again.clean and again.actions == []


def test_truncated_pack_salvages_what_is_before_the_cut(vault_copy):
    v = vault_copy
    repo = v.open()
    cut_at = v.blob_of(repo, "a", "/src/a/f2")
    pack = cut_at.pack_id.hex()
    cut = cut_at.offset + 10
    lost = set()
    for path in v.files["a"]:
        node = repo.find_path(repo.load_snapshot(v.ids["a"]).tree, path)
        for blob in node.content:
            loc = repo.index.lookup(blob, 0)
            if loc.pack_id.hex() == pack and loc.offset + loc.length > cut:
                lost.add(path)
    file = v.pack_file(pack)
    os.truncate(file, cut)
    assert [b.path for b in verify(repo.backend).bad] == [f"data/{pack[:2]}/{pack}"]
    report = deep_verify(v.open())
    assert not report.ok and [d.id for d in report.damaged_packs] == [pack]
    assert "bytes, the index says" in report.damaged_packs[0].reasons[0]
    damaged = {d.id: {f.path for f in d.files} for d in report.damaged_snapshots}
    assert damaged == {v.ids["a"]: lost, v.ids["c"]: lost} and "/src/a/f2" in lost
    assert not v.restic_ok()

    result = run_repair(v, salvage=True)
    assert result.clean
    assert_clean(v)
    v.restore_matches(v.ids["b"], v.files["b"])
    new_a = next(s.replaced_by for s in result.snapshots if s.id == v.ids["a"])
    v.restore_matches(new_a, without(v.files["a"], lost))


def test_damaged_tree_folder_is_cut_out_of_the_snapshots(vault_copy):
    v = vault_copy
    repo = v.open()
    sub = repo.find_path(repo.load_snapshot(v.ids["a"]).tree, "/src/a/sub")
    loc = repo.index.lookup(sub.subtree, 1)
    flip(v.pack_file(loc.pack_id.hex()), loc.offset + 20)
    result = run_repair(v, salvage=True)
    assert result.clean
    assert {s.id: [f.path for f in s.files] for s in result.snapshots} == {
        v.ids["a"]: ["/src/a/sub/"],
        v.ids["c"]: ["/src/a/sub/"],
    }
    assert_clean(v)
    for loss in result.snapshots:
        tag = "a" if loss.id == v.ids["a"] else "c"
        expected = {p: d for p, d in v.files[tag].items() if not p.startswith("/src/a/sub/")}
        v.restore_matches(loss.replaced_by, expected)
    v.restore_matches(v.ids["b"], v.files["b"])


def test_deleted_pack_drops_the_snapshots_that_need_it(vault_copy):
    v = vault_copy
    state = str(v.tmp / "verify-state.json")
    assert verify(v.open().backend, state_path=state).ok
    repo = v.open()
    pack = v.blob_of(repo, "b", "/src/b/g1").pack_id.hex()
    v.pack_file(pack).unlink()
    gone = verify(repo.backend, state_path=state)
    assert gone.ok and [g.path for g in gone.gone_since_last_run] == [f"data/{pack[:2]}/{pack}"]
    report = deep_verify(v.open())
    assert report.missing_packs == [pack]
    assert {d.id for d in report.damaged_snapshots} == {v.ids["b"], v.ids["c"]}
    for d in report.damaged_snapshots:
        assert {f.path for f in d.files} == {"/src/b/g1", "/src/b/g2", "/src/b/g3"}
    assert not v.restic_ok()

    result = run_repair(v)  # no --salvage: damaged snapshots are dropped
    assert result.clean and {s.id for s in result.snapshots} == {v.ids["b"], v.ids["c"]}
    assert all(s.replaced_by is None for s in result.snapshots)
    assert_clean(v)
    assert list(snapshots(v)) == [v.ids["a"]]
    v.restore_matches(v.ids["a"], v.files["a"])
    quarantined = sorted(p.name for p in (v.tmp / "quarantine" / "snapshots").iterdir())
    assert quarantined == sorted([v.ids["b"], v.ids["c"]])


def test_deleted_index_file_is_rebuilt_and_nothing_is_lost(vault_copy):
    v = vault_copy
    repo = v.open()
    pack = v.blob_of(repo, "b", "/src/b/g1").pack_id.hex()
    index_name = next(
        n for n, _ in repo.backend.list("index") if pack in repo.load_unpacked("index", n).decode()
    )
    (v.path / "index" / index_name).unlink()
    report = deep_verify(v.open())
    assert not report.ok and report.damaged_snapshots == [] and report.index_needs_rebuild
    assert [p.kind for p in report.problems] == ["index-incomplete"]
    assert pack in report.unindexed_packs
    assert not v.restic_ok()

    result = run_repair(v)
    assert result.clean and result.snapshots == []
    assert [a.kind for a in result.actions] == ["rebuild-index"]
    assert_clean(v)
    for tag in "abc":
        v.restore_matches(v.ids[tag], v.files[tag])


def test_deleted_snapshot_is_reported_and_its_packindex_removed(vault_copy):
    v = vault_copy
    repo = v.open()
    with repo.lock(exclusive=True):
        rebuild_indexes(repo, packindex=True)
    state = str(v.tmp / "verify-state.sqlite")
    assert verify(repo.backend, state_path=state).ok
    (v.path / "snapshots" / v.ids["a"]).unlink()
    gone = verify(repo.backend, state_path=state)
    assert [g.path for g in gone.gone_since_last_run] == [f"snapshots/{v.ids['a']}"]
    assert gone.gone_since_last_run[0].consequence.startswith("that snapshot is gone")
    report = deep_verify(v.open())
    assert report.ok  # a deleted snapshot cannot be told from a forgotten one ...
    (warning,) = [w for w in report.warnings if w.kind == "packindex-stale"]
    assert v.ids["a"] in warning.message  # ... but its packindex still names it
    assert v.restic_ok()

    result = run_repair(v)
    assert result.clean and [a.object for a in result.actions] == [
        f"packindex/{report.bad_packindex[0]}"
    ]
    assert deep_verify(v.open()).warnings == []
    assert_clean(v)
    for tag in "bc":
        v.restore_matches(v.ids[tag], v.files[tag])


def test_garbage_in_data_is_deleted(vault_copy):
    v = vault_copy
    junk = os.urandom(5000)
    name = "ab" + os.urandom(31).hex()
    (v.path / "data" / "ab" / name).write_bytes(junk)
    (v.path / "data" / "00" / "notes.txt").write_bytes(b"not a pack")
    bad = {b.path for b in verify(v.open().backend).bad}
    assert bad == {f"data/ab/{name}", "data/00/notes.txt"}
    report = deep_verify(v.open())
    assert sorted(report.invalid_files) == ["data/00/notes.txt", f"data/ab/{name}"]
    assert {p.kind for p in report.problems} == {"not-a-pack"}
    assert report.damaged_snapshots == []

    result = run_repair(v, delete=True)
    assert result.clean and result.snapshots == [] and result.quarantine is None
    assert {(a.kind, a.object) for a in result.actions} == {
        ("delete", f"data/ab/{name}"),
        ("delete", "data/00/notes.txt"),
    }
    assert not (v.path / "data" / "ab" / name).exists() and not (v.tmp / "quarantine").exists()
    assert verify(v.open().backend).ok
    assert_clean(v)
    for tag in "abc":
        v.restore_matches(v.ids[tag], v.files[tag])


def test_deleted_key_file_is_fatal_with_a_clear_message(vault_copy):
    v = vault_copy
    for key in (v.path / "keys").iterdir():
        key.unlink()
    found = verify(v.open().backend)
    assert not found.ok and any("no key file" in f for f in found.fatal)
    text = vault("verify", v.path, password=None, expect=1).out
    assert "FATAL" in text and "no key file" in text
    for command in (["deep-verify"], ["repair"], ["rebuild-indexes"]):
        error = one_line_error(vault("-r", v.path, *command, password=PASSWORD, expect=1))
        assert "no key file left" in error and "fatal" in error
    assert not v.restic_ok()


def test_corruption_at_generation_time_needs_read_data(vault_copy):
    v = vault_copy
    pack, blob = corrupt_at_generation(v, "b", "/src/b/g3")
    assert verify(v.open().backend).ok  # every file hashes to its name
    assert deep_verify(v.open()).ok and v.restic_ok()
    report = deep_verify(v.open(), read_data=True)
    assert report.lost_blobs == [f"data:{blob.hex()}"]
    assert [(d.id, d.bad_blobs) for d in report.damaged_packs] == [(pack, [f"data:{blob.hex()}"])]
    assert {d.id: [f.path for f in d.files] for d in report.damaged_snapshots} == {
        v.ids["b"]: ["/src/b/g3"],
        v.ids["c"]: ["/src/b/g3"],
    }
    assert not v.restic_ok("--read-data")

    result = run_repair(v, read_data=True)
    assert result.clean and {s.id for s in result.snapshots} == {v.ids["b"], v.ids["c"]}
    assert_clean(v)
    v.restore_matches(v.ids["a"], v.files["a"])


def test_dry_run_changes_nothing_and_prints_the_plan(vault_copy):
    v = vault_copy
    pack = v.damage_blob("c", "/src/a/n.txt", delta=5)

    def listing() -> list[tuple[str, int]]:
        return sorted(
            (str(p.relative_to(v.path)), p.stat().st_mtime_ns)
            for p in v.path.rglob("*")
            if p.is_file() and "locks" not in p.parts
        )

    before = listing()
    plan = run_repair(v, dry_run=True, salvage=True)
    assert not plan.clean and listing() == before
    assert {a.kind for a in plan.actions} >= {"salvage-pack", "quarantine", "rewrite-snapshot"}
    assert [(s.id, [f.path for f in s.files]) for s in plan.snapshots] == [
        (v.ids["c"], ["/src/a/n.txt"])
    ]
    out = vault("-r", v.path, "repair", "--dry-run", "--json", password=PASSWORD, expect=1).out
    doc = json.loads(out)
    assert doc["dry_run"] and doc["snapshots"][0]["files"][0]["path"] == "/src/a/n.txt"
    assert any(a["object"] == f"data/{pack[:2]}/{pack}" for a in doc["actions"])
    assert listing() == before
    assert not (v.tmp / "quarantine").exists()


def test_rollback_to_removes_everything_newer(vault_copy, tmp_path):
    v = vault_copy
    old = time.time() - 3600
    for p in v.path.rglob("*"):
        if p.is_file():
            os.utime(p, (old, old))
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / "x").write_bytes(os.urandom(50_000))
    late = v.restic.backup(["."], cwd=newer, tags=["late"])
    cutoff = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(old + 1800))
    result = vault("-r", v.path, "repair", "--rollback-to", cutoff, "--quarantine",
                   tmp_path / "q", "--json", password=PASSWORD)  # fmt: skip
    doc = json.loads(result.out)
    assert doc["ok"] and doc["snapshots"] == []
    moved = {a["object"].split("/")[0] for a in doc["actions"] if a["kind"] == "quarantine"}
    assert moved == {"snapshots", "data", "index"}
    assert sorted(snapshots(v)) == sorted(v.ids.values()) and late not in snapshots(v)
    assert_clean(v)
    v.restore_matches(v.ids["c"], v.files["c"])


# -- kill -9 at any point ------------------------------------------------------------------------

_DRIVER = """
import os, signal, sys
target = int(os.environ["KILL_AT"])
count = [0]

def hook(real):
    def call(*args, **kwargs):
        count[0] += 1
        if count[0] == target:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return call

# Every change a repair makes to the vault is a rename (atomic writes, quarantine) or an unlink.
os.rename = hook(os.rename)
os.unlink = hook(os.unlink)
from vaultfs.tools.main import main
code = main(sys.argv[1:])
sys.stderr.write(f"changes: {count[0]}\\n")
sys.exit(code)
"""


def _killed_repair(v: Vault, kill_at: int) -> subprocess.CompletedProcess[str]:
    env = env_for(PASSWORD)
    env["KILL_AT"] = str(kill_at)
    args = ["-r", str(v.path), "repair", "--salvage", "--quarantine", str(v.tmp / "quarantine")]
    return subprocess.run(
        [sys.executable, "-c", _DRIVER, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )


def test_repair_killed_at_random_points_then_rerun(vault_copy, tmp_path):
    template = vault_copy
    template.damage_blob("a", "/src/a/f2")
    pristine = tmp_path / "damaged"
    shutil.copytree(template.path, pristine)
    full = _killed_repair(template, 0)
    assert full.returncode == 0, full.stderr
    changes = int(full.stderr.rsplit("changes: ", 1)[1])
    assert changes > 8  # salvage pack, index, quarantine, rebuild, trees, snapshots ...
    points = sorted({1, changes} | set(random.Random(1).sample(range(2, changes), 3)))
    for kill_at in points:
        v = Vault(tmp_path / f"k{kill_at}", template.ids, template.files, tmp_path / f"t{kill_at}")
        v.tmp.mkdir()
        shutil.copytree(pristine, v.path)
        killed = _killed_repair(v, kill_at)
        assert killed.returncode == -signal.SIGKILL, (kill_at, killed.stderr)
        result = run_repair(v, salvage=True)
        assert result.clean, (kill_at, result.remaining)
        assert_clean(v)
        snaps = snapshots(v)
        assert len(snaps) == 3, (kill_at, sorted(snaps))  # no duplicate salvaged snapshots
        v.restore_matches(v.ids["b"], v.files["b"])
        for sid, snap in snaps.items():
            if sid != v.ids["b"]:
                v.restore_matches(sid, without(v.files[snap.tags[0]], {"/src/a/f2"}))


def test_repair_cli_text(vault_copy):
    v = vault_copy
    v.damage_blob("b", "/src/b/g1")
    text = vault("-r", v.path, "repair", "--read-data", password=PASSWORD).out
    assert v.ids["b"][:8] in text and "/src/b/g1" in text and "clean now" in text
    quarantines = [p for p in v.path.parent.iterdir() if ".quarantine-" in p.name]
    assert len(quarantines) == 1 and (quarantines[0] / "MANIFEST.jsonl").exists()
    assert "nothing to repair" in vault("-r", v.path, "repair", password=PASSWORD).out


def test_repair_trusts_files_a_recent_verify_found_intact(vault_copy, tmp_path):
    """repair --state S --max-age: files that `vault verify --state S` found intact are not hashed
    again (their records keep their time); the damaged pack verify found is hashed, salvaged and
    moved away, and the vault ends clean."""
    v = vault_copy
    pack = v.damage_blob("b", "/src/b/g1")
    path = f"data/{pack[:2]}/{pack}"
    state = tmp_path / "verify-state.json"
    found = verify(v.open().backend, state_path=str(state))
    assert [b.path for b in found.bad] == [path]
    before = json.loads(state.read_text())["files"]

    result = run_repair(v, salvage=True, verify_state=str(state), verify_max_age=86400.0)
    assert result.clean and any(a.object == path for a in result.actions)
    assert (v.tmp / "quarantine" / path).exists()
    after = json.loads(state.read_text())["files"]
    assert path not in after  # moved away by the repair: not "gone since the last run" next time
    kept = [p for p in before if p.startswith("data/") and p in after]
    assert len(kept) >= 3
    assert all(after[p] == before[p] for p in kept), "intact packs were hashed again"
    assert_clean(v)
    v.restore_matches(v.ids["a"], v.files["a"])


def test_repair_max_age_needs_state(vault_copy):
    v = vault_copy
    with pytest.raises(UsageError, match="--state"):
        run_repair(v, verify_max_age=60.0)
    line = one_line_error(
        vault("-r", v.path, "repair", "--max-age", "1d", password=PASSWORD, expect=2)
    )
    assert "--state" in line
