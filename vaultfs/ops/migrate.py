"""Migrate: copy every file of a vault to another location (any backend), keys unchanged.

Nothing is decrypted: every file but ``config`` is named by the SHA-256 of its bytes, so each file is
hash-checked as it is read from the source, before it is written to the target; a source file whose
hash does not match is not copied and is reported. Files go in the order data, index, snapshots,
packindex, keys, with ``config`` last: until the copy is complete the target holds no config, so nothing
mistakes a half-copied target for a vault. Lock files are not copied.

Resuming: a file already at the target with the right name and size is hash-checked there and skipped
when it matches (replaced when it does not), so running the same migrate again after a crash or a
kill -9 finishes the job. A target that holds another vault (another config, or key files the source
does not have) is refused.

``verify`` then re-reads every target file (hash against name, config byte for byte, nothing missing);
``delete_source`` removes the source's files only after that verification passed, snapshots first and
config last, so an interrupted deletion leaves a smaller but valid source.

Files are copied by ``workers`` threads, each streaming one file at a time in pieces of ``PIECE`` bytes
(``Backend.write_stream``): memory per worker is bounded by the piece size, not by the file size. The
hash is computed in flight and checked before the last piece is handed over, so a damaged source file
aborts its write: local folders and vault serve never show it; a server that writes under the final name
while receiving (rclone) may keep the part it got, which is then removed (and a re-run replaces any
leftover, whose size is wrong). Resume checks and ``verify`` hash
target files piece by piece too.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from vaultfs.backend import Backend
from vaultfs.backend.local import TEMP_MARK
from vaultfs.errors import IntegrityError, NoVault, ObjectNotFound, UsageError, VaultError

StageCallback = Callable[[str, "int | None", str], None]
AdvanceCallback = Callable[[int], None]

COPY_ORDER = ("data", "index", "snapshots", "packindex", "keys")
DELETE_ORDER = ("snapshots", "packindex", "index", "data", "keys")
DEFAULT_WORKERS = 4
PIECE = 1 << 20


@dataclass
class MigrateReport:
    source: str
    target: str
    dry_run: bool
    files: int = 0  # in the source (config included, locks not)
    bytes: int = 0
    copied: int = 0
    bytes_copied: int = 0
    skipped: int = 0  # already at the target and hash-checked
    replaced: int = 0  # at the target with the wrong size or hash, copied again
    #: source files whose content does not match their name (not copied)
    corrupt: list[str] = field(default_factory=list)
    verified: bool | None = None  # None: not asked
    problems: list[str] = field(default_factory=list)  # what verification found
    source_deleted: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.corrupt and not self.problems


def _where(kind: str, name: str) -> str:
    return "config" if kind == "config" else f"{kind}/{name}"


def _same_location(a: Backend, b: Backend) -> bool:
    root_a, root_b = getattr(a, "root", None), getattr(b, "root", None)
    if root_a and root_b:
        return os.path.realpath(root_a) == os.path.realpath(root_b)
    return str(a) == str(b)


def _listing(backend: Backend, kind: str) -> dict[str, int]:
    return dict(backend.list(kind))


def check_target(src: Backend, dst: Backend) -> bytes:
    """Refuse a target that holds another vault; returns the source config bytes."""
    if _same_location(src, dst):
        raise UsageError("the target is the source vault itself; give another location")
    try:
        config = src.read("config", "")
    except ObjectNotFound:
        raise NoVault(f"there is no vault at {src} (no config file)") from None
    try:
        theirs = dst.read("config", "")
    except ObjectNotFound:
        theirs = None
    if theirs is not None and theirs != config:
        raise VaultError(
            f"{dst} already holds another vault (its config differs); refusing to mix two vaults "
            "in one place: choose an empty location"
        )
    foreign = _listing(dst, "keys").keys() - _listing(src, "keys").keys()
    if foreign:
        raise VaultError(
            f"{dst} holds key files the source vault does not have (keys/{sorted(foreign)[0]}...): "
            "it belongs to another vault; choose an empty location"
        )
    return config


class _Mismatch(Exception):
    """A source file's bytes do not hash to its name (raised inside the target's write, aborting it)."""


def _pieces(backend: Backend, kind: str, name: str, size: int) -> Iterator[bytes]:
    """The object's bytes in pieces of at most PIECE."""
    for offset in range(0, size, PIECE):
        yield backend.read(kind, name, offset, min(PIECE, size - offset))


def _digest(backend: Backend, kind: str, name: str, size: int) -> str:
    """SHA-256 (hex) of an object of ``size`` bytes, read piece by piece."""
    hasher = hashlib.sha256()
    for piece in _pieces(backend, kind, name, size):
        hasher.update(piece)
    return hasher.hexdigest()


def _checked_pieces(backend: Backend, kind: str, name: str, size: int) -> Iterator[bytes]:
    """The object's pieces, hashed in flight: _Mismatch is raised instead of yielding the last piece
    when the bytes do not hash to the name, so a write fed by this never completes."""
    hasher = hashlib.sha256()
    done = 0
    for piece in _pieces(backend, kind, name, size):
        hasher.update(piece)
        done += len(piece)
        if done == size and hasher.hexdigest() != name:
            raise _Mismatch
        yield piece
    if size == 0 and hasher.hexdigest() != name:
        raise _Mismatch


def migrate(
    src: Backend,
    dst: Backend,
    *,
    verify: bool = False,
    delete_source: bool = False,
    dry_run: bool = False,
    workers: int = DEFAULT_WORKERS,
    on_stage: StageCallback | None = None,
    on_advance: AdvanceCallback | None = None,
    confirm: Callable[[bool], object] | None = None,
) -> MigrateReport:
    """Copy the vault at ``src`` to ``dst`` (see the module docstring). ``delete_source`` implies
    ``verify`` and deletes only when the copy is complete and verified.

    ``confirm(wait)`` is for a source lock taken without waiting (``HeldLock.confirm``): it is
    called with ``wait=False`` after every file (so the lock's second check and refresh start while
    files are copied) and with ``wait=True`` before the target gets its config (and before a dry run
    reports). Whatever it raises stops the migrate with a config-less, resumable target.

    The caller holds a lock on the source (exclusive with ``delete_source``). Raises NoVault when
    ``src`` holds no vault, VaultError when ``dst`` holds another one, UsageError when they are the
    same place, IntegrityError before deleting anything when the copy is not complete and verified.
    Damaged source files are reported (``corrupt``), not raised. Thread-safe backends required."""
    started = time.monotonic()
    if workers < 1:
        raise UsageError("workers must be at least 1")
    verify = verify or delete_source
    report = MigrateReport(str(src), str(dst), dry_run)
    config = check_target(src, dst)
    listings = {kind: _listing(src, kind) for kind in COPY_ORDER}
    report.files = 1 + sum(len(v) for v in listings.values())
    report.bytes = len(config) + sum(sum(v.values()) for v in listings.values())
    if dry_run:
        for kind in COPY_ORDER:
            there = _listing(dst, kind)
            for name, size in listings[kind].items():
                if there.get(name) == size:
                    report.skipped += 1
                else:
                    report.copied += 1
                    report.bytes_copied += size
        if confirm is not None:
            confirm(True)
        report.seconds = time.monotonic() - started
        return report
    dst.create()
    if on_stage is not None:
        on_stage("copying", report.bytes, "bytes")

    tally = threading.Lock()

    def copy(kind: str, name: str, size: int, present: int | None) -> None:
        _copy(kind, name, size, present)
        if confirm is not None:
            with tally:
                confirm(False)

    def _copy(kind: str, name: str, size: int, present: int | None) -> None:
        if present == size and _digest(dst, kind, name, size) == name:
            with tally:
                report.skipped += 1
            _advance(on_advance, size)
            return
        if present is not None:
            dst.remove(kind, name)
            with tally:
                report.replaced += 1
        try:
            dst.write_stream(kind, name, lambda: _checked_pieces(src, kind, name, size), size)
        except _Mismatch:
            # Servers with atomic uploads stored nothing; some (rclone) keep what they received.
            dst.remove(kind, name)
            with tally:
                report.corrupt.append(_where(kind, name))
            return
        with tally:
            report.copied += 1
            report.bytes_copied += size
        _advance(on_advance, size)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for kind in COPY_ORDER:
            there = _listing(dst, kind)
            jobs = [
                pool.submit(copy, kind, name, size, there.get(name))
                for name, size in listings[kind].items()
            ]
            # One kind at a time, so the target always has packs before the index naming them.
            for job in jobs:
                job.result()
    if report.corrupt:
        report.seconds = time.monotonic() - started
        return report
    if confirm is not None:
        confirm(True)
    if dst.exists("config", ""):
        report.skipped += 1
    else:
        dst.write("config", "", config)
        report.copied += 1
        report.bytes_copied += len(config)
    _advance(on_advance, len(config))
    _remove_temp_files(dst)
    if verify:
        report.problems = verify_copy(src, dst, workers, on_stage, on_advance)
        report.verified = not report.problems
    if delete_source:
        if not report.verified:
            raise IntegrityError(
                f"the copy at {dst} did not verify ({len(report.problems)} problem(s), e.g. "
                f"{report.problems[0]}); the source was not deleted"
            )
        delete_vault(src, on_stage, on_advance)
        report.source_deleted = True
    report.seconds = time.monotonic() - started
    return report


def verify_copy(
    src: Backend,
    dst: Backend,
    workers: int = DEFAULT_WORKERS,
    on_stage: StageCallback | None = None,
    on_advance: AdvanceCallback | None = None,
) -> list[str]:
    """Every source file must be at the target with its hash; returns what is not (empty: all
    good). Reads every target file."""
    problems: list[str] = []
    jobs: list[tuple[str, str, int]] = []
    for kind in COPY_ORDER:
        there = _listing(dst, kind)
        for name, size in _listing(src, kind).items():
            if name not in there:
                problems.append(f"{_where(kind, name)} is missing at the target")
            elif there[name] != size:
                problems.append(f"{_where(kind, name)} has {there[name]} bytes, not {size}")
            else:
                jobs.append((kind, name, size))
    if on_stage is not None:
        on_stage("verifying", sum(size for _k, _n, size in jobs), "bytes")

    def check(job: tuple[str, str, int]) -> str | None:
        kind, name, size = job
        try:
            digest = _digest(dst, kind, name, size)
        except VaultError as exc:
            return f"{_where(kind, name)} cannot be read at the target: {exc}"
        _advance(on_advance, size)
        if digest != name:
            return f"{_where(kind, name)} at the target does not match its hash"
        return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        problems += [p for p in pool.map(check, jobs) if p]
    try:
        if dst.read("config", "") != src.read("config", ""):
            problems.append("config at the target differs from the source")
    except ObjectNotFound:
        problems.append("config is missing at the target")
    return problems


def delete_vault(
    backend: Backend,
    on_stage: StageCallback | None = None,
    on_advance: AdvanceCallback | None = None,
) -> None:
    """Remove every file of a vault but its locks, snapshots first and config last."""
    names = {kind: list(_listing(backend, kind)) for kind in DELETE_ORDER}
    if on_stage is not None:
        on_stage("deleting the source", 1 + sum(len(v) for v in names.values()), "files")
    for kind in DELETE_ORDER:
        for name in names[kind]:
            backend.remove(kind, name)
            _advance(on_advance, 1)
    backend.remove("config", "")
    _advance(on_advance, 1)


def _remove_temp_files(backend: Backend) -> None:
    """Leftovers of writes a kill -9 interrupted in an earlier run (local folders only: other
    backends never show half-written objects)."""
    list_temp = getattr(backend, "list_temp", None)
    root = getattr(backend, "root", None)
    if list_temp is None or root is None:
        return
    leftovers = [rel for kind in COPY_ORDER for rel in list_temp(kind)]
    leftovers += [e.name for e in os.scandir(root) if e.name.startswith(f"config{TEMP_MARK}")]
    for rel in leftovers:
        try:
            os.unlink(os.path.join(root, rel))
        except OSError:
            continue


def _advance(on_advance: AdvanceCallback | None, n: int) -> None:
    if on_advance is not None:
        on_advance(n)


__all__ = ["MigrateReport", "check_target", "delete_vault", "migrate", "verify_copy"]
