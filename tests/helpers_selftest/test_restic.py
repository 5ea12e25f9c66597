"""The restic driver, the restic repository fixtures, and the skip-or-fail rule for missing tools."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers import ci, fuse, restic
from tests.helpers.env import env_for
from tests.helpers.restic import (
    MAIN_HOST,
    OTHER_HOST,
    OTHER_SUBDIR,
    OTHER_TAG,
    Restic,
    ResticError,
    ResticRepo,
)


@pytest.mark.restic
@pytest.mark.parametrize("version", [1, 2])
def test_repo_fixture(request: pytest.FixtureRequest, version: int) -> None:
    repo: ResticRepo = request.getfixturevalue(f"restic_repo_v{version}")
    r = repo.restic()
    assert json.loads(r.cat("config"))["version"] == version
    snaps = {s["id"]: s for s in r.snapshots()}
    assert set(snaps) == set(repo.snapshot_ids)
    assert all(len(i) == 64 for i in repo.snapshot_ids)
    main, other = snaps[repo.snapshot_id], snaps[repo.tagged_snapshot_id]
    assert (main["hostname"], main.get("tags"), main["paths"]) == (
        MAIN_HOST,
        None,
        [str(repo.source)],
    )
    assert (other["hostname"], other["tags"], other["paths"]) == (
        OTHER_HOST,
        [OTHER_TAG],
        [str(repo.source / OTHER_SUBDIR)],
    )
    # "latest" must keep meaning the whole tree: the tagged snapshot is dated earlier.
    assert [s["id"] for s in r.snapshots("latest")] == [repo.snapshot_id]
    assert [s["id"] for s in r.snapshots("--tag", OTHER_TAG)] == [repo.tagged_snapshot_id]


@pytest.mark.restic
def test_restic_error_carries_stderr(tmp_path: Path) -> None:
    r = Restic(tmp_path / "no-such-repo", "pw")
    with pytest.raises(ResticError) as info:
        r.run("snapshots")
    assert info.value.returncode != 0
    assert "no-such-repo" in str(info.value)
    assert info.value.stderr.strip() in str(info.value)
    assert r.run("snapshots", check=False).returncode == info.value.returncode


@pytest.mark.restic
def test_restic_ignores_user_settings_and_uses_password_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The user's own RESTIC_* settings must not leak into the test's restic runs.
    monkeypatch.setenv("RESTIC_REPOSITORY", str(tmp_path / "wrong"))
    monkeypatch.setenv("RESTIC_PASSWORD", "wrong password")
    monkeypatch.setenv("RESTIC_CACHE_DIR", str(tmp_path / "wrong-cache"))
    pw = tmp_path / "password"
    pw.write_text("from a file\n")
    r = Restic(tmp_path / "repo", password_file=pw, cache_dir=tmp_path / "cache")
    assert "RESTIC_PASSWORD" not in r.env()
    r.init(version=2)
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_bytes(b"x")
    snap = r.backup(["."], cwd=data, tags=["a", "b"])
    (listed,) = r.snapshots()
    assert listed["id"] == snap and listed["tags"] == ["a", "b"]
    assert not (tmp_path / "wrong").exists() and not (tmp_path / "wrong-cache").exists()
    assert any((tmp_path / "cache").iterdir())
    lines = r.json("ls", snap)  # JSON lines: the snapshot, then one object per node
    assert isinstance(lines, list) and lines[0]["id"] == snap
    assert [n["name"] for n in lines[1:]] == ["f"]
    out = r.restore(snap, tmp_path / "restored")
    assert (out / "f").read_bytes() == b"x"


@pytest.mark.restic
def test_restic_private_cache_is_removed(tmp_path: Path) -> None:
    r = Restic(tmp_path / "repo", "pw")
    cache = Path(r.cache_dir)
    assert cache.is_dir()
    del r
    assert not cache.exists()


def _no_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(restic.shutil, "which", lambda name: None)
    monkeypatch.setattr(fuse.shutil, "which", lambda name: None)


@pytest.mark.parametrize("require", [restic.require_restic, fuse.require_fuse])
def test_missing_tool_skips_outside_ci(monkeypatch: pytest.MonkeyPatch, require) -> None:
    _no_tools(monkeypatch)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require()
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        require()


@pytest.mark.parametrize("require", [restic.require_restic, fuse.require_fuse])
def test_missing_tool_fails_in_ci(monkeypatch: pytest.MonkeyPatch, require) -> None:
    _no_tools(monkeypatch)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require()


def test_missing_dev_fuse_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fuse.os.path, "exists", lambda path: False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="/dev/fuse"):
        fuse.require_fuse()


def test_tools_found_here() -> None:
    # Where the tools exist (this machine, CI) the helpers return them instead of skipping.
    if not ci.in_ci() and (
        not os.path.exists("/dev/fuse") or not os.path.exists("/usr/bin/restic")
    ):
        pytest.skip("restic or FUSE missing on this machine")
    assert restic.require_restic().endswith("restic")
    assert fuse.require_fuse().endswith("fusermount3")


def test_env_for(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VAULT_PASSWORD_FILE", "/somewhere")
    monkeypatch.setenv("VAULT_PASSWORD_COMMAND", "echo x")
    monkeypatch.setenv("VAULT_REPOSITORY", "/repo")
    monkeypatch.setenv("VAULT_PASSWORD", "old")
    env = env_for("secret", cache_dir=tmp_path)
    assert env["VAULT_PASSWORD"] == "secret"
    assert env["XDG_CACHE_HOME"] == str(tmp_path)
    for name in ("VAULT_PASSWORD_FILE", "VAULT_PASSWORD_COMMAND", "VAULT_REPOSITORY"):
        assert name not in env
    assert env["PATH"] == os.environ["PATH"]
    assert "VAULT_PASSWORD" not in env_for(None)
    assert os.environ["VAULT_PASSWORD"] == "old"  # a copy, never os.environ itself


def test_session_cache_home_is_private() -> None:
    home = os.path.expanduser("~")
    assert not os.environ["XDG_CACHE_HOME"].startswith(home + os.sep) or home == "/"
    assert "xdg-cache" in os.environ["XDG_CACHE_HOME"]
