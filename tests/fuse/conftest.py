"""Real mounts for the FUSE tests: `vault mount` runs in a subprocess, as a user would start it.

``mounter`` starts mounts and always tears them down: SIGTERM, then ``fusermount3 -uz`` for anything still
mounted, so a failing test never leaves a mount (or a process) behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.env import env_for
from tests.helpers.fuse import require_fuse

#: How long a mount may take to appear, or a process to exit (generous: CI machines are slow).
DEADLINE = 60.0


class MountProcess:
    """One `vault -r REPO mount MNT ...` process; its stderr goes to a file (``log()``)."""

    def __init__(self, repo: Path, password: str, mnt: Path, args: list[str], log: Path) -> None:
        self.repo = repo
        self.mnt = mnt
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vaultfs.tools.main", "-r", str(repo), "mount", str(mnt), *args],
            env=env_for(password),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_bytes().decode("utf-8", "replace")

    def wait_mounted(self) -> None:
        deadline = time.monotonic() + DEADLINE
        while not os.path.ismount(self.mnt):
            code = self.proc.poll()
            if code is not None:
                pytest.fail(f"vault mount exited with {code} before mounting:\n{self.log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"vault mount did not mount within {DEADLINE} s:\n{self.log()}")
            time.sleep(0.05)

    def wait_exit(self) -> int:
        try:
            return self.proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            pytest.fail(f"vault mount did not exit within {DEADLINE} s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if os.path.ismount(self.mnt) or _stale(self.mnt):
            subprocess.run(["fusermount3", "-uz", str(self.mnt)], check=False)
        self._log.close()


def _stale(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == 107  # ENOTCONN: a mount whose process is gone
    return False


class Mounter:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.mounts: list[MountProcess] = []

    def start(self, repo: Path, password: str, *args: str, mnt: Path | None = None) -> MountProcess:
        """Start `vault mount` without waiting (for tests of failures)."""
        n = len(self.mounts)
        if mnt is None:
            mnt = self.tmp_path / f"mnt{n}"
            mnt.mkdir()
        m = MountProcess(repo, password, mnt, list(args), self.tmp_path / f"mount{n}.log")
        self.mounts.append(m)
        return m

    def mount(self, repo: Path, password: str, *args: str, mnt: Path | None = None) -> MountProcess:
        """Start `vault mount` and wait until the mount point is mounted."""
        m = self.start(repo, password, *args, mnt=mnt)
        m.wait_mounted()
        return m

    def close(self) -> None:
        for m in reversed(self.mounts):
            m.stop()


@pytest.fixture
def mounter(tmp_path: Path) -> Iterator[Mounter]:
    """Starts `vault mount` processes; every one is stopped and unmounted after the test."""
    require_fuse()
    m = Mounter(tmp_path)
    try:
        yield m
    finally:
        m.close()
