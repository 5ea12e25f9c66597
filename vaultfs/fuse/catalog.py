"""The snapshots a mount shows, kept current while it runs.

A backup that runs while the vault is mounted writes packs, then an index file, then the snapshot file
(FORMAT.md §5). ``refresh_sync`` therefore lists ``snapshots/`` first and ``index/`` second: every
snapshot it sees has its index file in the second listing, so the new snapshot's blobs are in the master
index before its folder appears. Only files not seen before are read; a snapshot file that disappeared
(forget) drops out of the listing.

Unreadable snapshot or index files are logged once and skipped: the rest of the vault stays browsable.

Thread safety: ``load_sync`` and ``refresh_sync`` run in a worker thread, one at a time (the caller
serialises them); ``snapshots`` is replaced, never mutated, so the trio thread may read it at any time.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from vaultfs.errors import VaultError
from vaultfs.format.index import IndexFile
from vaultfs.format.snapshot import Snapshot
from vaultfs.repo.repository import Repository, filter_snapshots

log = logging.getLogger("vaultfs.fuse")

_LOAD_THREADS = 8


class Catalog:
    """The vault's snapshots (those matching the host/tag/path filters) and the index files loaded."""

    def __init__(
        self,
        repo: Repository,
        *,
        hosts: list[str] | None = None,
        tags: list[str] | None = None,
        paths: list[str] | None = None,
    ) -> None:
        self.repo = repo
        self.filters = {"hosts": hosts, "tags": tags, "paths": paths}
        self.snapshots: dict[str, Snapshot] = {}
        self._index_names: set[str] = set()
        self._unreadable: set[str] = set()

    def load_sync(self) -> None:
        """First load: the whole index, then every snapshot."""
        # Listed before loading, so an index file written meanwhile is read again later, never missed.
        names = {name for name, _ in self.repo.backend.list("index")}
        self.repo.load_index(on_error=self._index_error)
        self._index_names = names
        self.refresh_sync()

    def refresh_sync(self) -> bool:
        """Pick up snapshots added or removed since the last call; True when the list changed."""
        names = {name for name, _ in self.repo.backend.list("snapshots")}
        self._load_new_index_files()
        added = sorted(names - self.snapshots.keys() - self._unreadable)
        removed = self.snapshots.keys() - names
        if not added and not removed:
            return False
        current = {sid: snap for sid, snap in self.snapshots.items() if sid not in removed}
        loaded = self._map(self._load_snapshot, added)
        for sid, snap in zip(added, loaded, strict=True):
            if snap is not None:
                current[sid] = snap
        self.snapshots = current
        return True

    def listing(self) -> list[tuple[str, Snapshot]]:
        """The snapshots to show, oldest first."""
        snaps = sorted(self.snapshots.items(), key=lambda item: (item[1].time.ns, item[0]))
        return filter_snapshots(snaps, **self.filters)

    def _load_new_index_files(self) -> None:
        new = sorted({name for name, _ in self.repo.backend.list("index")} - self._index_names)
        for name, index in zip(new, self._map(self._load_index, new), strict=True):
            self._index_names.add(name)
            if index is None:
                continue
            for pack_id, blobs in index.packs.items():
                self.repo.index.add_pack(
                    pack_id,
                    [(b.id, b.blob_type, b.offset, b.length, b.uncompressed_length) for b in blobs],
                )

    def _load_index(self, name: str) -> IndexFile | None:
        try:
            return IndexFile.decode(self.repo.load_unpacked("index", name), f"index/{name}")
        except VaultError as exc:
            self._index_error(exc)
            return None

    def _load_snapshot(self, name: str) -> Snapshot | None:
        try:
            return self.repo.load_snapshot(name)
        except VaultError as exc:
            self._unreadable.add(name)
            log.warning("snapshot %s is not shown: %s", name, exc)
            return None

    @staticmethod
    def _index_error(exc: VaultError) -> None:
        log.warning("%s; blobs listed only there cannot be read", exc)

    @staticmethod
    def _map(fn, items: list[str]) -> list:  # noqa: ANN001 - a plain helper
        if len(items) <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=_LOAD_THREADS) as pool:
            return list(pool.map(fn, items))
