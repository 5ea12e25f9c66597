"""vaultfs/repo/locks.py: a lock whose second check runs while the job reads (acquire_unconfirmed)."""

from __future__ import annotations

import threading

import pytest

from vaultfs.backend import LocalBackend
from vaultfs.errors import VaultLocked
from vaultfs.format.gojson import GoTime
from vaultfs.format.lock import Lock
from vaultfs.repo import locks
from vaultfs.repo.repository import Repository


def make(tmp_path) -> Repository:
    return Repository.init(LocalBackend(str(tmp_path / "vault")), b"pw")


def lock_names(repo: Repository) -> list[str]:
    return [n for n, _ in repo.backend.list("locks")]


def other_host_lock(exclusive: bool) -> bytes:
    return Lock(GoTime.now(), exclusive, "elsewhere", "u", 1).encode()


def test_unconfirmed_lock_is_written_at_once_and_confirmed(tmp_path):
    repo = make(tmp_path)
    held = repo.locks.acquire_unconfirmed(exclusive=False)
    assert lock_names(repo) == [held.name]
    assert held.confirm()
    assert held.confirm(wait=False)  # asking again is fine
    with pytest.raises(VaultLocked):
        repo.lock(exclusive=True)
    held.release()
    assert lock_names(repo) == []


def test_a_lock_from_acquire_is_confirmed(tmp_path):
    repo = make(tmp_path)
    held = repo.lock(exclusive=True)
    assert held.confirm(wait=False)
    held.release()


def test_a_conflict_seen_at_once_raises_and_writes_nothing(tmp_path):
    repo = make(tmp_path)
    repo.save_unpacked("locks", other_host_lock(exclusive=True))
    with pytest.raises(VaultLocked, match="elsewhere"):
        repo.locks.acquire_unconfirmed(exclusive=False)
    assert len(lock_names(repo)) == 1


def test_a_conflict_written_meanwhile_makes_confirm_raise_and_release(tmp_path):
    """Another process writes an exclusive lock between our first and second check: confirm() raises
    and our lock file is gone. The second listing waits until the other lock is written, so the
    order does not depend on timing."""
    repo = make(tmp_path)
    written = threading.Event()
    listings = []

    def list_names() -> list[str]:
        listings.append(None)
        if len(listings) > 1:
            assert written.wait(30)
        return lock_names(repo)

    manager = locks.LockManager(
        save=lambda data: repo.save_unpacked("locks", data),
        load=lambda name: repo.load_unpacked("locks", name),
        list_names=list_names,
        remove=lambda name: repo.backend.remove("locks", name),
    )
    held = manager.acquire_unconfirmed(exclusive=False)
    other = repo.save_unpacked("locks", other_host_lock(exclusive=True))
    written.set()
    with pytest.raises(VaultLocked, match="exclusive lock held by PID 1 on elsewhere"):
        held.confirm()
    assert lock_names(repo) == [other]
    held.release()  # releasing again is harmless
