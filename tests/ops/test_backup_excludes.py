"""restic's exclude rules (vaultfs/ops/excludes.py): pattern matching, exclude files, one file system.

The pattern cases follow restic's filter package semantics; tests/interop/test_backup_interop.py checks
the same patterns against real restic backups.
"""

from __future__ import annotations

import os

import pytest

from vaultfs.errors import UsageError
from vaultfs.ops.excludes import (
    DeviceRule,
    Excluder,
    expand_env,
    go_clean,
    matches_any,
    parse_patterns,
    read_exclude_file,
)

PATH = "/foo/bar/test.go"


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("*.go", PATH, True),
        ("*.c", PATH, False),
        ("*.go", "/foo/bar/test.go.bak", False),
        ("foo", PATH, True),  # any component: everything below a folder named foo
        ("bar", PATH, True),
        ("/bar", PATH, False),  # anchored at the root
        ("/foo", PATH, True),
        ("/foo/bar", PATH, True),
        ("foo/bar", PATH, True),
        ("bar/test.go", PATH, True),
        ("foo/test.go", PATH, False),
        ("test.go/", PATH, True),  # cleaned like filepath.Clean
        ("./foo//bar/", PATH, True),
        ("**/test.go", PATH, True),
        ("/**/test.go", PATH, True),
        ("/**/bar", PATH, True),
        ("foo/**/test.go", PATH, True),
        ("foo/**/bar/**/test.go", PATH, True),
        ("/foo/**", PATH, True),
        ("**/baz", PATH, False),
        ("?est.go", PATH, True),
        ("t??t.go", PATH, True),
        ("[a-t]est.go", PATH, True),
        ("[^t]est.go", PATH, False),
        ("[u-z]est.go", PATH, False),
        ("[z-a]est.go", PATH, False),  # a reversed range matches nothing
        ("\\*.go", "/a/*.go", True),
        ("\\*.go", "/a/x.go", False),
        ("b*r", PATH, True),
        ("*", "/a", True),
        ("a/*", "/a", False),
        ("/", "/", True),
        ("new?line", "/x/new\nline", True),
        ("*\udcff*", "/x/a\udcffb", True),  # undecodable bytes match as themselves
    ],
)
def test_pattern_matching(pattern, path, expected):
    assert matches_any(parse_patterns([pattern]), path) is expected


def test_negated_patterns_take_back_earlier_matches():
    patterns = parse_patterns(["*.go", "!main.go"])
    assert matches_any(patterns, "/x/test.go")
    assert not matches_any(patterns, "/x/main.go")
    assert not matches_any(patterns, "/x/readme")
    # a negation before any match changes nothing; a later positive pattern matches again
    assert matches_any(parse_patterns(["!a", "a"]), "/a")
    assert matches_any(parse_patterns(["*.go", "!main.go", "main.*"]), "/x/main.go")


@pytest.mark.parametrize("bad", ["[", "a[", "[]", "[a-]", "x\\", "!", "[^", "a[-b]"])
def test_malformed_patterns_are_refused(bad):
    with pytest.raises(UsageError, match="invalid exclude pattern"):
        parse_patterns([bad])


def test_empty_patterns_are_ignored():
    assert parse_patterns(["", "a"])[0].text == "a"
    assert not matches_any(parse_patterns([""]), "/a")


@pytest.mark.parametrize(
    ("path", "cleaned"),
    [("//a//b/", "/a/b"), ("///", "/"), ("a/../..", ".."), ("", "."), ("/..", "/"), ("./a", "a")],
)
def test_go_clean(path, cleaned):
    assert go_clean(path) == cleaned


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$HOME/x", "/home/u/x"),
        ("${HOME}/x", "/home/u/x"),
        ("$UNSET/x", "/x"),
        ("cost$$", "cost$"),
        ("a$", "a$"),
        ("a$/b", "a$/b"),
        ("${HOME", "HOME"),  # bad syntax: Go drops the "${"
        ("x${}y", "xy"),
        ("$HOME_DIR", ""),  # the longest name is taken
        ("${1}", ""),
    ],
)
def test_expand_env_like_go(text, expected):
    assert expand_env(text, {"HOME": "/home/u"}) == expected


def test_exclude_file(tmp_path, monkeypatch):
    monkeypatch.setenv("VAULT_TEST_DIR", "/data")
    f = tmp_path / "excludes"
    f.write_bytes(
        "\ufeff# a comment\n\n  *.tmp  \n$VAULT_TEST_DIR/cache\n\t# indented comment\n!keep.tmp\r\n".encode()
    )
    assert read_exclude_file(f) == ["*.tmp", "/data/cache", "!keep.tmp"]
    with pytest.raises(UsageError, match="cannot read exclude file"):
        read_exclude_file(tmp_path / "missing")


def test_excluder_combines_options_and_files(tmp_path):
    f = tmp_path / "excludes"
    f.write_text("*.log\n")
    ex = Excluder(["/srv/cache"], [f])
    assert ex.excluded_by_name("/srv/cache/x")
    assert ex.excluded_by_name("/srv/app/y.log")
    assert not ex.excluded_by_name("/srv/app/y.txt")
    assert not ex.excluded_by_device("/srv/app", 1, True)  # no --one-file-system


def _device_of(path: str) -> int:
    return os.lstat(path).st_dev


def test_device_rule_keeps_mount_points_empty():
    # /proc is its own file system on every Linux: a real mount point below "/".
    if _device_of("/proc") == _device_of("/"):
        pytest.skip("/proc is not a separate file system here")
    rule = DeviceRule(["/"])
    proc = _device_of("/proc")
    assert not rule.rejects("/etc/hostname", _device_of("/etc/hostname"), False)
    assert not rule.rejects("/proc", proc, True)  # the mount point itself stays
    assert rule.rejects("/proc/self", proc, True)  # a folder inside another file system
    assert rule.rejects("/proc/cpuinfo", proc, False)
    # below a target that is itself on the other file system, everything there is allowed
    rule = DeviceRule(["/proc"])
    assert not rule.rejects("/proc/cpuinfo", proc, False)
    # items outside every target are not the rule's business
    assert not rule.rejects("/etc", _device_of("/etc"), True)
