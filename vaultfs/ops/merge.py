"""Merge: the reverse of split. Copy every snapshot of another vault that shares this vault's master key
and chunker polynomial into this one, with everything the snapshots need.

Blobs the target already has are not copied again; packs whose every blob is missing from the target
are copied as files, the missing blobs of other packs into new packs; snapshot files are copied byte for
byte (so they keep their IDs, and a snapshot already in the target is skipped). Vaults with different
master keys cannot share a single stored byte and are refused with a clear message. The order of writes
is split's (packs, index, snapshots, packindex), so an interrupted merge leaves a valid vault and running
it again finishes it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from vaultfs.backend import Backend
from vaultfs.errors import VaultError, WrongPassword
from vaultfs.ops.prune import DEFAULT_WORKERS, AdvanceCallback, StageCallback
from vaultfs.ops.split import CopyReport, check_compatible, copy_snapshots
from vaultfs.repo.repository import Repository


def open_source(backend: Backend, password: bytes) -> Repository:
    """Open the vault to merge from; a password that opens none of its keys gets a message that
    says why that matters here."""
    try:
        return Repository.open(backend, password)
    except WrongPassword:
        raise WrongPassword(
            f"the password does not open the vault at {backend}: give its password with "
            "--from-password-file (merging needs both vaults to share one master key, as vaults made "
            "by `vault split` do)"
        ) from None


@dataclass
class MergeReport:
    source: str
    dry_run: bool
    snapshots: int  # in the source
    copy: CopyReport
    unreadable: list[str]  # source snapshot files that could not be read (not copied)
    seconds: float = 0.0


def merge(
    dst: Repository,
    src: Repository,
    *,
    dry_run: bool = False,
    workers: int = DEFAULT_WORKERS,
    on_stage: StageCallback | None = None,
    on_advance: AdvanceCallback | None = None,
) -> MergeReport:
    """Copy every snapshot of ``src`` into ``dst`` (see the module docstring).

    The caller holds a shared lock on both vaults. Raises VaultError when the vaults do not share
    master key, polynomial and version; MissingData when a source snapshot depends on a blob the
    source lacks (nothing is copied then)."""
    started = time.monotonic()
    check_compatible(dst, src, "cannot merge")
    unreadable: list[str] = []

    def skip(exc: VaultError) -> None:
        unreadable.append(str(exc))

    snapshots = src.list_snapshots(on_error=skip)
    copy = copy_snapshots(
        src,
        dst,
        snapshots,
        dry_run=dry_run,
        workers=workers,
        on_stage=on_stage,
        on_advance=on_advance,
    )
    return MergeReport(
        str(src.backend), dry_run, len(snapshots), copy, unreadable, time.monotonic() - started
    )


__all__ = ["MergeReport", "merge", "open_source"]
