"""Session-wide fixtures: the tricky source tree and restic repositories (v1 and v2) made by real restic.

Everything here is built once per test session, lazily (a session that uses no restic fixture never
runs restic), in pytest's temp folders. Session fixtures are shared by every test: treat them as read-only
and copy them (``shutil.copytree(..., symlinks=True)``) before changing anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers.restic import ResticRepo, make_restic_repo, require_restic
from tests.helpers.trees import make_tricky_tree

_RESTIC_FIXTURES = frozenset({"restic_repo_v1", "restic_repo_v2"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a restic repository fixture with ``restic``, so ``-m 'not restic'``
    deselects them without each module having to remember the marker."""
    for item in items:
        if _RESTIC_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.restic)


@pytest.fixture(scope="session", autouse=True)
def _private_cache_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Point XDG_CACHE_HOME at a session temp folder so no test writes a cache into the user's home."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session")
def tricky_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tricky source tree (tests/helpers/trees.py), built once per session. Do not modify it."""
    return make_tricky_tree(tmp_path_factory.mktemp("tricky") / "src")


@pytest.fixture(scope="session")
def _restic_repo_builds(
    tmp_path_factory: pytest.TempPathFactory, tricky_tree: Path
) -> Iterator[dict[int, Future[ResticRepo]]]:
    """Start building both repositories as soon as either is wanted.

    Each build is a chain of restic runs dominated by scrypt key derivation (one per run), so building
    v1 and v2 side by side roughly halves the wait of a session that uses both, and costs a session that
    uses one little wall time on a machine with two cores.
    """
    require_restic()
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="restic-fixture") as pool:
        yield {
            version: pool.submit(
                make_restic_repo,
                tmp_path_factory.mktemp(f"restic-v{version}"),
                tricky_tree,
                version,
            )
            for version in (1, 2)
        }


@pytest.fixture(scope="session")
def restic_repo_v1(_restic_repo_builds: dict[int, Future[ResticRepo]]) -> ResticRepo:
    """A repository made by ``restic init --repository-version 1`` (see ResticRepo). Do not modify it."""
    return _restic_repo_builds[1].result()


@pytest.fixture(scope="session")
def restic_repo_v2(_restic_repo_builds: dict[int, Future[ResticRepo]]) -> ResticRepo:
    """A repository made by ``restic init --repository-version 2`` (see ResticRepo). Do not modify it."""
    return _restic_repo_builds[2].result()
