"""Drive the real restic binary from tests: the reference implementation vaultfs must interoperate with.

``require_restic()`` finds the binary (a test that needs it skips without it, and fails under CI=true).
``Restic`` runs ``restic -r REPO ...`` with a password and a private cache folder and an environment
scrubbed of the user's RESTIC_* settings, so tests never read or write the user's home or repositories.
``make_restic_repo`` builds the two-snapshot repository behind the ``restic_repo_v1``/``restic_repo_v2``
session fixtures (tests/conftest.py) and describes it as a ``ResticRepo``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers.ci import unavailable


def require_restic() -> str:
    """Return the path of the restic binary; skip the calling test without it (fail it under CI=true)."""
    path = shutil.which("restic")
    if path is None:
        unavailable("restic is not installed (apt-get install restic)")
    return path


class ResticError(AssertionError):
    """restic exited with an unexpected status; the message holds the command line and its stderr.

    An AssertionError so that pytest shows it as a test failure with the message, not as a crash.
    """

    def __init__(self, command: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.command = list(command)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"restic exited with {returncode}: {shlex.join(command)}\n--- stderr ---\n{stderr.strip()}"
        )


class Restic:
    """One restic repository, driven through the restic CLI.

    ``repo`` is a local path or any restic location (``rest:http://...``). The password goes through
    RESTIC_PASSWORD, or through ``--password-file`` when ``password_file`` is given. Every command runs
    with RESTIC_CACHE_DIR set to ``cache_dir`` (a private temp folder, removed with this object, when not
    given) and with every other RESTIC_* variable removed from the environment.

    Output is decoded as UTF-8 with surrogateescape, so ``os.fsencode`` turns a printed file name back into
    its exact bytes.
    """

    def __init__(
        self,
        repo: str | os.PathLike[str],
        password: str = "",
        *,
        password_file: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.binary = require_restic()
        self.repo = os.fspath(repo)
        self.password = password
        self.password_file = os.fspath(password_file) if password_file is not None else None
        if cache_dir is None:
            cache_dir = tempfile.mkdtemp(prefix="vaultfs-test-restic-cache-")
            self._cleanup = weakref.finalize(self, shutil.rmtree, cache_dir, ignore_errors=True)
        self.cache_dir = os.fspath(cache_dir)

    def env(self) -> dict[str, str]:
        """The environment restic runs with."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RESTIC_")}
        env["RESTIC_CACHE_DIR"] = self.cache_dir
        if self.password_file is None:
            env["RESTIC_PASSWORD"] = self.password
        return env

    def command(self, *args: str | os.PathLike[str]) -> list[str]:
        """The full argument list for ``restic -r REPO [--password-file F] ARGS``."""
        cmd = [self.binary, "-r", self.repo]
        if self.password_file is not None:
            cmd += ["--password-file", self.password_file]
        return cmd + [os.fspath(a) for a in args]

    def run(
        self,
        *args: str | os.PathLike[str],
        check: bool = True,
        cwd: str | os.PathLike[str] | None = None,
        input: str | None = None,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        """Run one restic command; raise ResticError on a non-zero exit status when ``check``."""
        cmd = self.command(*args)
        proc = subprocess.run(
            cmd,
            env=self.env(),
            cwd=cwd,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="surrogateescape",
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise ResticError(cmd, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def json(self, *args: str | os.PathLike[str], cwd: str | os.PathLike[str] | None = None) -> Any:
        """Run ``restic --json ARGS`` and parse its output.

        A single JSON document comes back as is; JSON lines (backup, restore and other streaming commands)
        come back as a list of the parsed lines. Empty output gives None.
        """
        out = self.run("--json", *args, cwd=cwd).stdout
        text = out.strip()
        if not text:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return [json.loads(line) for line in text.splitlines() if line.strip()]

    def init(self, version: int = 2) -> str:
        """Create the repository with ``--repository-version`` 1 or 2; return its id as restic prints it."""
        out = self.run("init", "--repository-version", str(version)).stdout
        match = re.search(r"created restic repository ([0-9a-f]+)", out)
        if match is None:
            raise AssertionError(f"unexpected output from restic init: {out!r}")
        return match.group(1)

    def backup(
        self,
        paths: Iterable[str | os.PathLike[str]],
        *,
        tags: Iterable[str] = (),
        host: str | None = None,
        time: str | None = None,
        cwd: str | os.PathLike[str] | None = None,
        extra: Sequence[str] = (),
        full_id: bool = True,
    ) -> str:
        """Back up ``paths`` and return the new snapshot's full id (restic's short id if not ``full_id``,
        which saves the extra restic run, and its key derivation, that resolving the id costs).

        Relative paths are resolved against ``cwd``: ``backup(["."], cwd=src)`` stores the contents of src
        at the snapshot's root, so a restore puts them directly into the target. ``time`` is restic's
        ``--time`` ("2006-01-02 15:04:05"). Exit status 3 (some files unreadable) counts as an error.
        """
        args: list[str | os.PathLike[str]] = ["backup"]
        for tag in tags:
            args += ["--tag", tag]
        if host is not None:
            args += ["--host", host]
        if time is not None:
            args += ["--time", time]
        args += [*extra, *paths]
        lines = self.json(*args, cwd=cwd)
        lines = lines if isinstance(lines, list) else [lines]
        summaries = [m for m in lines if m.get("message_type") == "summary"]
        if len(summaries) != 1:
            raise AssertionError(f"restic backup printed no single summary: {lines!r}")
        snapshot_id: str = summaries[0]["snapshot_id"]
        return self.full_ids(snapshot_id)[0] if full_id else snapshot_id

    def full_ids(self, *snapshots: str) -> list[str]:
        """Turn short snapshot ids (restic 0.14's backup summary prints one) into full ids, in order,
        with one restic run."""
        known = [s["id"] for s in self.snapshots()]
        full = []
        for short in snapshots:
            found = [i for i in known if i.startswith(short)]
            if len(found) != 1:
                raise AssertionError(f"snapshot id {short!r} matches {len(found)} snapshots")
            full.append(found[0])
        return full

    def restore(
        self,
        snapshot: str,
        target: str | os.PathLike[str],
        *,
        include: Iterable[str] = (),
        exclude: Iterable[str] = (),
        extra: Sequence[str] = (),
    ) -> Path:
        """``restic restore SNAPSHOT --target TARGET`` (with --include/--exclude); return the target."""
        args: list[str | os.PathLike[str]] = ["restore", snapshot, "--target", target]
        for pattern in include:
            args += ["--include", pattern]
        for pattern in exclude:
            args += ["--exclude", pattern]
        self.run(*args, *extra)
        return Path(target)

    def snapshots(self, *args: str) -> list[dict[str, Any]]:
        """``restic snapshots --json [ARGS]``: the snapshot list (restic prints [] for none)."""
        return self.json("snapshots", *args) or []

    def check(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``restic check [ARGS]``; raises ResticError when restic finds a problem."""
        return self.run("check", *args)

    def cat(self, *args: str) -> str:
        """``restic cat ARGS`` (config, masterkey, snapshot ID, blob ...), as text."""
        return self.run("cat", *args).stdout


#: Password of the fixture repositories (not ASCII: restic hands the UTF-8 bytes to scrypt).
RESTIC_PASSWORD = "vaultfs interop pässwörd"

#: Host of the first snapshot (the whole tricky tree).
MAIN_HOST = "vaultfs-main-host"
#: Host, tag, folder and time of the second snapshot. Its time is earlier than the first snapshot's, so
#: "latest" still names the whole tricky tree.
OTHER_HOST = "vaultfs-other-host"
OTHER_TAG = "filter-tag"
OTHER_SUBDIR = "text"
MAIN_TIME = "2024-02-03 04:05:06"
OTHER_TIME = "2023-01-02 03:04:05"


@dataclass(frozen=True)
class ResticRepo:
    """A restic-made repository holding two snapshots, plus restic's own restore of the first one.

    * ``snapshot_id``: full id of the first snapshot: the whole tricky tree (``source``) backed up as
      ``.`` from inside it (so its contents sit at the snapshot root), host MAIN_HOST, no tags, time
      MAIN_TIME. The snapshot's ``paths`` is ``[str(source)]``.
    * ``tagged_snapshot_id``: the second snapshot: only ``source/text`` (again as ``.``), tag OTHER_TAG,
      host OTHER_HOST, time OTHER_TIME (earlier).
    * ``restored``: ``restic restore <snapshot_id> --target restored``: what vaultfs's restore of the
      first snapshot must equal (``compare_trees(repo.restored, mine, owners=True)``).
    """

    path: Path
    password: str
    version: int
    source: Path
    snapshot_id: str
    tagged_snapshot_id: str
    restored: Path

    @property
    def snapshot_ids(self) -> tuple[str, str]:
        """Both snapshot ids, first snapshot first."""
        return (self.snapshot_id, self.tagged_snapshot_id)

    def restic(self, cache_dir: str | os.PathLike[str] | None = None) -> Restic:
        """A Restic driver for this repository (with a private cache unless ``cache_dir`` is given)."""
        return Restic(self.path, self.password, cache_dir=cache_dir)


def make_restic_repo(base: Path, source: Path, version: int) -> ResticRepo:
    """Build the ResticRepo layout in the empty folder ``base`` from ``source`` (see ResticRepo)."""
    restic = Restic(base / "repo", RESTIC_PASSWORD, cache_dir=base / "cache")
    restic.init(version=version)
    first = restic.backup(["."], cwd=source, host=MAIN_HOST, time=MAIN_TIME, full_id=False)
    second = restic.backup(
        ["."],
        cwd=source / OTHER_SUBDIR,
        host=OTHER_HOST,
        tags=[OTHER_TAG],
        time=OTHER_TIME,
        full_id=False,
    )
    first, second = restic.full_ids(first, second)
    restored = restic.restore(first, base / "restored")
    return ResticRepo(
        path=base / "repo",
        password=RESTIC_PASSWORD,
        version=version,
        source=source,
        snapshot_id=first,
        tagged_snapshot_id=second,
        restored=restored,
    )
