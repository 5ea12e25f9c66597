"""vault restore: extract a snapshot, or a folder inside it, into a target folder.

SNAPSHOT is a full snapshot ID, a unique prefix of one, or 'latest' (the newest snapshot matching --host,
--tag and --path). SNAPSHOT:PATH restores the contents of the folder PATH inside the snapshot into the
target (a file named by PATH is restored as TARGET/NAME).

Content, mode (with setuid, setgid and sticky bits), modification and access times (with nanoseconds, for
folders and symlinks too), extended attributes, hardlinks, empty files and folders, symlinks and fifos are
restored; owners (numeric uid/gid) and device nodes only when running as root. Sockets are skipped. Every
block of data is checked against its hash; a damaged or missing block is reported with the file it belongs
to, and the rest is still restored.

Existing files in the target are never overwritten unless --overwrite is given: each one is reported as an
error and skipped. Existing folders are merged into.

--include and --exclude take restic's patterns, matched against the path inside the restored tree
("/" plus the path below the snapshot or below SNAPSHOT:PATH): a pattern starting with "/" is anchored at the
root, other patterns match anywhere; *, ?, [a-z], [^a-z] and ** (any number of folders) work as in restic;
a pattern starting with "!" un-matches what the patterns before it matched. --include restores matching
items and the folders leading to them; --exclude restores everything else. They cannot be combined.

With --json, one summary document is printed: files_restored, dirs_restored, symlinks_restored,
special_restored, hardlinks_restored, bytes_restored, skipped, errors and warnings (each a list of
{"path", "message"}, paths inside the restored tree), dry_run and seconds.

Exit status is 0 when everything was restored, 1 when anything was skipped or could not be restored.
"""

from __future__ import annotations

import argparse
import sys
import threading

from vaultfs.errors import UsageError, VaultError
from vaultfs.ops.restore import (
    DEFAULT_WORKERS,
    RestoreReport,
    Selector,
    display_path,
    prepare_target,
    restore,
)
from vaultfs.repo.locks import HeldLock
from vaultfs.tools.common import (
    Output,
    add_snapshot_filters,
    open_repository,
)


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "restore",
        help="restore a snapshot into a folder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "snapshot",
        metavar="SNAPSHOT[:PATH]",
        help="snapshot ID, unique ID prefix or 'latest', optionally followed by :PATH, a folder "
        "inside the snapshot whose contents are restored",
    )
    p.add_argument(
        "-t",
        "--target",
        metavar="DIR",
        required=True,
        help="folder to restore into (created if missing)",
    )
    p.add_argument(
        "-i",
        "--include",
        action="append",
        default=[],
        metavar="PATTERN",
        help="restore only items matching PATTERN and the folders leading to them (repeatable)",
    )
    p.add_argument(
        "-e",
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="do not restore items matching PATTERN (repeatable)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing files, symlinks and other entries in the target (folders are "
        "merged, never removed); without it existing entries are reported and skipped",
    )
    p.add_argument(
        "-n",
        "--dry-run",
        action="store_true",
        help="change nothing: only report what would be restored and what is in the way",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        metavar="N",
        help=f"threads reading and writing file content (default {DEFAULT_WORKERS})",
    )
    add_snapshot_filters(p)
    p.set_defaults(func=run)
    return p


def _split_spec(spec: str) -> tuple[str, str]:
    snapshot, _sep, path = spec.partition(":")
    return snapshot, path


def run(args: argparse.Namespace, out: Output) -> int:
    spec, subpath = _split_spec(args.snapshot)
    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    Selector(args.include, args.exclude)  # bad patterns are usage errors before any work
    repo = open_repository(args)

    # restore only reads the vault, and every block it writes is checked against its ID, so it does
    # not wait for the lock's second check (restic's protocol: 200 ms, for a racing process to become
    # visible): the index loads and the restore starts meanwhile, and a conflict that check finds stops
    # the restore at its next progress report with the usual message. A prune that started at the same
    # time sees this lock at its own second check and stops before deleting anything.
    lock = repo.locks.acquire_unconfirmed(exclusive=False)
    with lock:
        repo.load_index()
        snap_id, snap = repo.find_snapshot(spec, hosts=args.host, tags=args.tag, paths=args.path)
        repo.find_path(snap.tree, subpath)  # a missing PATH fails before anything is written
        prepare_target(args.target, args.dry_run)
        what = f"snapshot {snap_id[:8]}" + (f":{subpath}" if subpath else "")
        verb = "would restore" if args.dry_run else "restoring"
        out.note(f"{verb} {what} of {', '.join(snap.paths)} at {snap.time} to {args.target}")
        confirm = _Confirm(lock)
        with out.progress("restoring", None, unit="bytes") as bar:

            def progress(done: int, total: int) -> None:
                confirm(wait=False)
                bar.update(completed=done, total=total)

            report = restore(
                repo,
                snap_id,
                args.target,
                subpath=subpath,
                include=args.include,
                exclude=args.exclude,
                overwrite=args.overwrite,
                dry_run=args.dry_run,
                progress=progress,
                workers=args.workers,
            )
        confirm(wait=True)
    _render(report, out)
    return 0 if report.ok else 1


class _Confirm:
    """``HeldLock.confirm`` for the restore's threads: the second check's outcome is asked for once it
    is known (a conflict raises VaultLocked, in every thread that asks from then on)."""

    def __init__(self, lock: HeldLock) -> None:
        self._lock = lock
        self._mutex = threading.Lock()
        self._done = False
        self._error: VaultError | None = None

    def __call__(self, wait: bool) -> None:
        if self._done:
            return
        with self._mutex:
            if self._error is not None:
                raise self._error
            if self._done:
                return
            try:
                self._done = self._lock.confirm(wait=wait)
            except VaultError as exc:
                self._error = exc
                raise


def _render(report: RestoreReport, out: Output) -> None:
    if out.json:
        out.emit(report.to_json())
        return
    for problem in report.warnings:
        if not out.quiet:
            out.warn(f"{display_path(problem.path)}: {problem.message}")
    for problem in report.errors:
        sys.stderr.write(f"error: {display_path(problem.path)}: {problem.message}\n")
    if out.quiet:
        return
    verb = "would restore" if report.dry_run else "restored"
    files = f"{report.files} files"
    if report.hardlinks:
        files += f" ({report.hardlinks} of them hardlinks)"
    parts = [files, f"{report.dirs} folders"]
    if report.symlinks:
        parts.append(f"{report.symlinks} symlinks")
    if report.special:
        parts.append(f"{report.special} special files")
    line = f"{verb} {', '.join(parts)}, {_size(report.bytes)}"
    if not report.dry_run:
        line += f" in {report.seconds:.2f}s"
    if report.errors:
        line += f"; {len(report.errors)} errors"
        if report.skipped:
            line += f" ({report.skipped} existing entries skipped)"
    out.line(line)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{n} B"
