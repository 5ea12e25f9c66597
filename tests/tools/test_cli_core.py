"""The core commands through the real CLI: init, key, snapshots, ls, cat, unlock, version, and their errors."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest

from tests.helpers.restic import MAIN_HOST, OTHER_HOST, OTHER_TAG, Restic
from tests.tools.cli import one_line_error, vault
from vaultfs.backend import LocalBackend
from vaultfs.format.gojson import GoTime
from vaultfs.format.lock import Lock
from vaultfs.repo.repository import Repository


@pytest.mark.parametrize("version", [1, 2])
def test_init_makes_a_vault_restic_accepts(tmp_path, version):
    repo = tmp_path / "vault"
    out = vault("-r", repo, "init", "--repository-version", str(version), "--json")
    doc = json.loads(out.out)
    assert doc["version"] == version and len(doc["id"]) == 64
    assert sorted(p.name for p in repo.iterdir()) == [
        "config",
        "data",
        "index",
        "keys",
        "locks",
        "packindex",
        "snapshots",
    ]
    assert len(list((repo / "data").iterdir())) == 256
    cfg = json.loads(Restic(repo, "pw").run("cat", "config").stdout)
    assert cfg["version"] == version and cfg["id"] == doc["id"]
    Restic(repo, "pw").run("check")
    # init refuses to overwrite an existing vault
    err = one_line_error(vault("-r", repo, "init", expect=1))
    assert "already exists" in err


def test_keys_add_list_passwd_remove_and_restic_sees_them(tmp_path):
    repo = tmp_path / "vault"
    vault("-r", repo, "init")
    newpw = tmp_path / "new"
    newpw.write_text("second\n")
    added = json.loads(vault("-r", repo, "key", "add", "--new-password-file", newpw, "--json").out)[
        "id"
    ]
    keys = json.loads(vault("-r", repo, "key", "list", "--json").out)
    assert {k["id"] for k in keys} >= {added} and len(keys) == 2
    assert [k["current"] for k in keys].count(True) == 1
    # restic opens the vault with both passwords and lists both keys
    restic_keys = json.loads(Restic(repo, "second").run("key", "list", "--json").stdout)
    assert {k["id"] for k in restic_keys} == {k["id"][:8] for k in keys}
    Restic(repo, "pw").run("check")
    # the key in use cannot be removed; another one can
    first = next(k["id"] for k in keys if k["current"])
    assert "refusing" in one_line_error(vault("-r", repo, "key", "remove", first[:10], expect=1))
    vault("-r", repo, "key", "remove", first[:10], password="second")
    # now the last key cannot be removed at all
    err = one_line_error(vault("-r", repo, "key", "remove", added, password="second", expect=1))
    assert "last key" in err
    # passwd replaces the current key
    newpw.write_text("third\n")
    vault("-r", repo, "key", "passwd", "--new-password-file", newpw, password="second")
    assert vault("-r", repo, "snapshots", password="second", expect=12).code == 12
    keys = json.loads(vault("-r", repo, "key", "list", "--json", password="third").out)
    assert len(keys) == 1
    Restic(repo, "third").run("key", "list")


def test_quiet_init_prints_nothing(tmp_path):
    loud = vault("-r", tmp_path / "a", "init")
    assert loud.out.startswith("created vault ")
    quiet = vault("-r", tmp_path / "b", "init", "-q")
    assert (quiet.out, quiet.err) == ("", "")
    assert (tmp_path / "b" / "config").is_file()


def test_exit_codes_no_vault_wrong_password_usage(tmp_path):
    err = one_line_error(vault("-r", tmp_path / "nothing", "snapshots", expect=10))
    assert "no vault" in err
    vault("-r", tmp_path / "v", "init")
    err = one_line_error(vault("-r", tmp_path / "v", "snapshots", password="wrong", expect=12))
    assert "wrong password" in err
    one_line_error(vault("-r", tmp_path / "v", "snapshots", password=None, expect=2))
    vault("snapshots", "--no-such-option", expect=2)
    one_line_error(vault("snapshots", expect=2))  # no repository given


def test_locked_vault_exit_11_and_unlock(tmp_path):
    path = tmp_path / "v"
    vault("-r", path, "init")
    repo = Repository.open(LocalBackend(str(path)), b"pw")
    other = Lock(GoTime.now(), True, "another-host", "someone", 4242)
    repo.save_unpacked("locks", other.encode())
    err = one_line_error(
        vault("-r", path, "key", "add", env={"VAULT_NEW_PASSWORD": "x"}, expect=11)
    )
    assert "another-host" in err and "vault unlock" in err
    # a fresh lock of a live process elsewhere is not stale: plain unlock keeps it
    assert json.loads(vault("-r", path, "unlock", "--json").out)["removed"] == []
    assert (
        len(json.loads(vault("-r", path, "unlock", "--remove-all", "--json").out)["removed"]) == 1
    )
    vault("-r", path, "key", "add", env={"VAULT_NEW_PASSWORD": "x"})
    # a lock left by a dead process on this host is stale, and does not block
    dead = Lock(GoTime.now(), True, socket.gethostname(), "someone", 2**22 + 12345)
    repo.save_unpacked("locks", dead.encode())
    vault("-r", path, "key", "add", env={"VAULT_NEW_PASSWORD": "y"})
    assert list((path / "locks").iterdir()) == [], "the dead process's lock is cleaned up"
    Restic(path, "pw").run("list", "keys")


@pytest.fixture(params=[1, 2], ids=["v1", "v2"])
def restic_repo(request):
    return request.getfixturevalue(f"restic_repo_v{request.param}")


def test_snapshots_filters_match_restic(restic_repo):
    r = Restic(restic_repo.path, restic_repo.password)
    for filters in (
        [],
        ["--host", OTHER_HOST],
        ["--host", MAIN_HOST, "--host", OTHER_HOST],
        ["--tag", OTHER_TAG],
        ["--tag", "nosuchtag"],
        ["--path", str(restic_repo.source)],
        ["--path", "/nonexistent"],
    ):
        ours = json.loads(
            vault(
                "-r",
                restic_repo.path,
                "snapshots",
                "--json",
                *filters,
                password=restic_repo.password,
            ).out
        )
        theirs = json.loads(r.run("snapshots", "--json", *filters).stdout) or []
        assert [s["id"] for s in ours] == [s["id"] for s in theirs], filters
        for a, b in zip(ours, theirs, strict=True):
            assert (a["hostname"], a.get("tags"), a["paths"], a["tree"]) == (
                b["hostname"],
                b.get("tags"),
                b["paths"],
                b["tree"],
            )


def test_ls_lists_what_restic_lists(restic_repo):
    r = Restic(restic_repo.path, restic_repo.password)
    snap = restic_repo.snapshot_ids[0]

    def paths(lines):
        return sorted(d["path"] for d in map(json.loads, lines) if d.get("struct_type") == "node")

    ours = vault("-r", restic_repo.path, "ls", snap[:8], "--json", password=restic_repo.password)
    theirs = r.run("ls", "--json", snap).stdout.splitlines()
    assert paths(ours.out.splitlines()) == paths(theirs)
    long = vault("-r", restic_repo.path, "ls", "latest", "--long", password=restic_repo.password)
    rows = [ln for ln in long.out.splitlines() if ln[:1] in "-dlpcbs" and " /" in ln]
    assert len(rows) >= len(paths(theirs)) - 10  # names with newlines span several lines
    assert any(r.startswith("lrwxrwxrwx") and " -> " in r for r in rows)


def test_cat_objects(restic_repo):
    args = ("-r", restic_repo.path)
    pw = restic_repo.password
    cfg = json.loads(vault(*args, "cat", "config", password=pw).out)
    assert cfg["version"] in (1, 2)
    mk = json.loads(vault(*args, "cat", "masterkey", password=pw).out)
    assert set(mk) == {"mac", "encrypt"}
    snap = json.loads(
        vault(*args, "cat", "snapshot", restic_repo.snapshot_ids[0][:6], password=pw).out
    )
    tree = json.loads(vault(*args, "cat", "tree", snap["tree"], password=pw).out)
    assert tree["nodes"]
    same = json.loads(
        vault(*args, "cat", "tree", restic_repo.snapshot_ids[0][:8] + ":", password=pw).out
    )
    assert same == tree
    blob = vault(*args, "cat", "blob", snap["tree"], password=pw).out
    assert json.loads(blob) == tree
    one_line_error(vault(*args, "cat", "snapshot", "ffffffffff", password=pw, expect=1))
    one_line_error(vault(*args, "cat", "index", password=pw, expect=2))


def _copy(restic_repo, tmp_path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(restic_repo.path, dest)
    for root, dirs, files in os.walk(dest):
        for name in dirs + files:
            os.chmod(os.path.join(root, name), 0o700)
    return dest


def _flip(path: Path, offset: int = 40) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


def test_corrupt_files_give_one_line_errors(restic_repo_v2, tmp_path):
    pw = restic_repo_v2.password
    repo = _copy(restic_repo_v2, tmp_path)
    # snapshot file
    snap_file = next((repo / "snapshots").iterdir())
    _flip(snap_file)
    err = one_line_error(
        vault("-r", repo, "cat", "snapshot", snap_file.name, password=pw, expect=1)
    )
    assert f"snapshots/{snap_file.name}" in err
    res = vault("-r", repo, "snapshots", password=pw, expect=1)
    assert snap_file.name in res.err and "Traceback" not in res.err
    # index file
    idx = next((repo / "index").iterdir())
    _flip(idx)
    err = one_line_error(vault("-r", repo, "ls", "latest", password=pw, expect=1))
    assert f"index/{idx.name}" in err
    # config
    _flip(repo / "config", 30)
    err = one_line_error(vault("-r", repo, "snapshots", password=pw, expect=1))
    assert "config" in err
    # the only key file
    for key in (repo / "keys").iterdir():
        _flip(key, 200)
    err = one_line_error(vault("-r", repo, "snapshots", password=pw, expect=1))
    assert "keys/" in err


def test_corrupt_pack_names_the_pack(restic_repo_v1, tmp_path):
    pw = restic_repo_v1.password
    repo = _copy(restic_repo_v1, tmp_path)
    r = Repository.open(LocalBackend(str(repo)), pw.encode())
    r.load_index()
    snap_id, snap = r.find_snapshot("latest")
    loc = r.index.lookup(snap.tree)
    pack_file = repo / "data" / loc.pack_id.hex()[:2] / loc.pack_id.hex()
    _flip(pack_file, loc.offset + 20)
    err = one_line_error(vault("-r", repo, "cat", "tree", snap.tree.hex(), password=pw, expect=1))
    assert loc.pack_id.hex() in err and snap.tree.hex() in err


def test_version_and_help():
    doc = json.loads(vault("version", "--json", password=None).out)
    assert doc["version"]
    out = vault("--help", password=None).out
    for command in ("init", "snapshots", "ls", "restore", "cat", "key", "unlock", "version"):
        assert command in out


def test_commands_without_a_vault_take_no_vault_options():
    # serve, server and version open no vault: their help and man pages list no location or
    # password options nor the variables that name them, and giving one there is a usage error, not
    # silently ignored.
    from vaultfs.tools import manpages

    pages = manpages.render_all()
    for command in ("serve", "server", "version"):
        shown = vault(command, "--help", password=None).out
        assert "--password-file" not in shown and "VAULT_PASSWORD" not in shown
        assert "\\-\\-password\\-file" not in pages[f"vault-{command}.1"]
        assert "VAULT_PASSWORD" not in pages[f"vault-{command}.1"]
        assert ".SH EXIT STATUS" in pages[f"vault-{command}.1"]
        action = ["volumes"] if command == "server" else []
        err = vault(command, *action, "--no-cache", password=None, expect=2).err
        assert "unrecognized arguments: --no-cache" in err
    assert "\\-\\-password\\-file" in pages["vault-backup.1"]
    assert "VAULT_PASSWORD" in pages["vault-backup.1"] and "HTTPS_PROXY" in pages["vault-backup.1"]
    assert "VAULT_PASSWORD" in vault("backup", "--help", password=None).out
    assert vault("--no-cache", "version", password=None).code == 0


def test_man_pages_are_current():
    from vaultfs.tools import manpages

    man = Path(__file__).resolve().parents[2] / "man"
    pages = manpages.render_all()
    stale = [
        name
        for name, text in pages.items()
        if not (man / name).exists() or (man / name).read_text() != text
    ]
    assert not stale, f"man pages are stale, run `make man`: {stale}"
    extra = {p.name for p in man.glob("vault*.1")} - set(pages)
    assert not extra, f"man pages for commands that no longer exist: {extra}"


def test_password_sources(tmp_path):
    repo = tmp_path / "v"
    vault("-r", repo, "init")
    pwfile = tmp_path / "pw.txt"
    pwfile.write_text("pw\nignored second line\n")
    vault("-r", repo, "snapshots", "--password-file", pwfile, password=None)
    vault("-r", repo, "snapshots", "--password-command", "echo pw", password=None)
    vault("-r", repo, "snapshots", password=None, env={"VAULT_PASSWORD_FILE": str(pwfile)})
    vault("-r", repo, "snapshots", password=None, env={"VAULT_PASSWORD_COMMAND": "printf pw"})
    # an explicit option wins over the environment
    vault("-r", repo, "snapshots", "--password-file", pwfile, password="wrong")
    vault(
        "-r",
        repo,
        "snapshots",
        password=None,
        env={"VAULT_REPOSITORY": str(repo), "VAULT_PASSWORD": "pw"},
    )
    err = one_line_error(
        vault("-r", repo, "snapshots", "--password-command", "false", password=None, expect=2)
    )
    assert "password command" in err
    err = one_line_error(
        vault(
            "-r", repo, "snapshots", "--password-file", tmp_path / "nope", password=None, expect=2
        )
    )
    assert "cannot read password file" in err
