"""Vault locks with restic's rules (FORMAT.md §8).

An exclusive lock conflicts with every other lock, a shared lock only with exclusive ones. Acquiring lists and
loads all locks, fails on a conflict, writes its own, waits 200 ms and checks again (a racing process that
wrote at the same moment is seen then). A held lock is refreshed every 5 minutes: a new lock file is written
and the old one removed.

A lock is stale when it is older than 30 minutes, or when it was written on this host by a process that no
longer exists. Unlike restic, acquisition ignores the second kind (a dead process on this very host cannot be
working on the vault), so a job killed with kill -9 does not block the next run; an old lock from another
host still blocks until ``vault unlock``. Such dead-process locks are removed when seen, so that restic,
which does not skip them, is not blocked by them either.
"""

from __future__ import annotations

import getpass
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from vaultfs.errors import VaultError, VaultLocked
from vaultfs.format.gojson import GoTime
from vaultfs.format.lock import Lock

STALE_AFTER = 30 * 60
REFRESH_EVERY = 5 * 60
RECHECK_DELAY = 0.2


def hostname() -> str:
    return socket.gethostname()


def username() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def process_exists(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class LockInfo:
    name: str
    lock: Lock

    def stale(self, now_ns: int | None = None) -> bool:
        now_ns = time.time_ns() if now_ns is None else now_ns
        if now_ns - self.lock.time.ns > STALE_AFTER * 1_000_000_000:
            return True
        return self.dead_here()

    def dead_here(self) -> bool:
        return self.lock.hostname == hostname() and not process_exists(self.lock.pid)

    def describe(self) -> str:
        kind = "an exclusive" if self.lock.exclusive else "a shared"
        return (
            f"{kind} lock held by PID {self.lock.pid} on {self.lock.hostname} "
            f"(user {self.lock.username}) since {self.lock.time.format()}"
        )


class LockManager:
    """Locks of one vault; ``save``/``load``/``list``/``remove`` are the repository's unpacked-file calls."""

    def __init__(
        self,
        save: Callable[[bytes], str],
        load: Callable[[str], bytes],
        list_names: Callable[[], list[str]],
        remove: Callable[[str], None],
    ) -> None:
        self._save = save
        self._load = load
        self._list = list_names
        self._remove = remove

    def list_locks(self) -> list[LockInfo]:
        """Every readable lock; unreadable or vanished lock files are skipped, as restic 0.14 does."""
        out = []
        for name in self._list():
            try:
                out.append(LockInfo(name, Lock.decode(self._load(name), f"locks/{name}")))
            except VaultError:
                continue
        return out

    def _conflict(self, exclusive: bool, ignore: str | None) -> LockInfo | None:
        for info in self.list_locks():
            if info.name == ignore:
                continue
            if info.dead_here():
                # Left by a killed process on this host: remove it, so restic is not blocked by it either.
                try:
                    self._remove(info.name)
                except VaultError:
                    pass
                continue
            if exclusive or info.lock.exclusive:
                return info
        return None

    def acquire(self, exclusive: bool) -> HeldLock:
        conflict = self._conflict(exclusive, None)
        if conflict is None:
            held = HeldLock(self, exclusive)
            time.sleep(RECHECK_DELAY)
            conflict = self._conflict(exclusive, held.name)
            if conflict is None:
                held.start_refresh()
                return held
            held.release()
        raise VaultLocked(
            f"the vault is locked: {conflict.describe()}; if no other vault process is running, "
            "run `vault unlock`"
        )

    def acquire_unconfirmed(self, exclusive: bool) -> HeldLock:
        """acquire() without waiting: the first check and the lock file happen now, the second check
        (RECHECK_DELAY later) in a thread, so a job spends the wait reading. For jobs that only read
        until HeldLock.confirm() returns: what they read before may come from a vault that another
        job holds, so it must be discarded when confirm() raises. Jobs that write use acquire()."""
        conflict = self._conflict(exclusive, None)
        if conflict is not None:
            raise _locked(conflict)
        held = HeldLock(self, exclusive)
        held.recheck_later()
        return held

    def remove_stale(self, remove_all: bool = False) -> list[str]:
        removed = []
        for info in self.list_locks():
            if remove_all or info.stale():
                self._remove(info.name)
                removed.append(info.name)
        return removed

    def new_lock(self, exclusive: bool) -> Lock:
        uid, gid = os.getuid(), os.getgid()
        return Lock(GoTime.now(), exclusive, hostname(), username(), os.getpid(), uid, gid)


def _locked(conflict: LockInfo) -> VaultLocked:
    return VaultLocked(
        f"the vault is locked: {conflict.describe()}; if no other vault process is running, "
        "run `vault unlock`"
    )


class HeldLock:
    """A lock this process holds; refreshed in a daemon thread until released. Context manager."""

    def __init__(self, manager: LockManager, exclusive: bool) -> None:
        self.manager = manager
        self.exclusive = exclusive
        self.name = manager._save(manager.new_lock(exclusive).encode())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    def recheck_later(self) -> None:
        """Run acquire()'s second check in a thread; confirm() reports its outcome."""
        self._checked = threading.Event()
        self._check_result: LockInfo | BaseException | None = None

        def check() -> None:
            try:
                time.sleep(RECHECK_DELAY)
                self._check_result = self.manager._conflict(self.exclusive, self.name)
            except BaseException as exc:  # confirm() raises it in the job's thread
                self._check_result = exc
            finally:
                self._checked.set()

        threading.Thread(target=check, name="vault-lock-check", daemon=True).start()

    def confirm(self, wait: bool = True) -> bool:
        """For a lock from acquire_unconfirmed(): True once the second check found no conflict (and
        starts the refresh), False while it runs (``wait`` False). On a conflict or an error of the
        check the lock is released and VaultLocked (or the error) raised."""
        checked = getattr(self, "_checked", None)
        if checked is None:
            return True  # from acquire()
        if not checked.wait(None if wait else 0):
            return False
        with self._mutex:
            result = self._check_result
            if result is None:
                if self._thread is None:
                    self.start_refresh()
                return True
        self.release()
        raise result if isinstance(result, BaseException) else _locked(result)

    def start_refresh(self, every: float = REFRESH_EVERY) -> None:
        self._thread = threading.Thread(
            target=self._refresh_loop, args=(every,), name="vault-lock-refresh", daemon=True
        )
        self._thread.start()

    def _refresh_loop(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.refresh()
            except VaultError:
                continue  # try again at the next tick; the lock stays valid for 30 minutes

    def refresh(self) -> None:
        with self._mutex:
            if self._stop.is_set():
                return
            new = self.manager._save(self.manager.new_lock(self.exclusive).encode())
            old, self.name = self.name, new
            self.manager._remove(old)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        with self._mutex:
            self.manager._remove(self.name)

    def __enter__(self) -> HeldLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
