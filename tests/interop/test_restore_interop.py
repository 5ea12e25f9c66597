"""vault restore against restic's own restore, on repositories restic made from the tricky tree.

Every comparison covers content and metadata: type, mode bits, owners (the tests run as root), nanosecond
mtimes of files, folders and symlinks, extended attributes, hardlink groups and device numbers.
"""

from __future__ import annotations

import pytest

from tests.helpers.restic import OTHER_HOST, OTHER_SUBDIR, OTHER_TAG, ResticRepo
from tests.helpers.trees import assert_same_tree
from tests.tools.cli import vault


@pytest.fixture(params=[1, 2], ids=["v1", "v2"])
def restic_repo(request) -> ResticRepo:
    return request.getfixturevalue(f"restic_repo_v{request.param}")


def _vault_restore(repo: ResticRepo, spec: str, target, *extra: str) -> None:
    vault("-r", repo.path, "restore", spec, "--target", target, *extra, password=repo.password)


def test_whole_snapshot_equals_restics_restore(restic_repo, tmp_path):
    target = tmp_path / "ours"
    _vault_restore(restic_repo, restic_repo.snapshot_id, target)
    assert_same_tree(restic_repo.restored, target, owners=True)


@pytest.mark.parametrize("sub", ["modes", "hardlinks", "deep/d/d"])
def test_sub_path_equals_that_folder_of_restics_restore(restic_repo, tmp_path, sub):
    # restic 0.14 has no SNAPSHOT:PATH, so the reference is the folder inside its full restore.
    target = tmp_path / "ours"
    _vault_restore(restic_repo, f"{restic_repo.snapshot_id[:10]}:{sub}", target)
    assert_same_tree(restic_repo.restored / sub, target, owners=True)


def test_latest_with_filters_picks_the_other_snapshot(restic_repo_v2, tmp_path):
    repo = restic_repo_v2
    target = tmp_path / "ours"
    _vault_restore(repo, "latest", target, "--host", OTHER_HOST, "--tag", OTHER_TAG)
    assert_same_tree(repo.restored / OTHER_SUBDIR, target, owners=True)


@pytest.mark.parametrize(
    ("include", "exclude"),
    [
        (["*.txt"], []),
        (["/modes", "/hardlinks/pair-?"], []),
        (["/deep/**/bottom", "names/*space*"], []),
        (["*", "!/wide", "!/sizes"], []),
        ([], ["/wide", "/sizes", "*.txt", "!hello*"]),
        ([], ["wide", "sizes", "deep", "[a-m]*", "!/links"]),
    ],
)
def test_include_exclude_equal_restics(restic_repo_v2, tmp_path, include, exclude):
    repo = restic_repo_v2
    patterns = [a for p in include for a in ("--include", p)]
    patterns += [a for p in exclude for a in ("--exclude", p)]
    theirs = tmp_path / "theirs"
    repo.restic().run("restore", repo.snapshot_id, "--target", theirs, *patterns)
    ours = tmp_path / "ours"
    _vault_restore(repo, repo.snapshot_id, ours, *patterns)
    assert any(ours.iterdir()), "the patterns selected nothing: the comparison would prove nothing"
    assert_same_tree(theirs, ours, owners=True)
