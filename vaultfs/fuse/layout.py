"""The virtual folders above the snapshots, computed from the snapshot list.

::

    /snapshots/<time>/          one folder per snapshot, oldest first, plus latest -> <newest time>
    /hosts/<host>/<time>/       the same, per host, plus latest
    /tags/<tag>/<time>/         the same, per tag (a snapshot with two tags shows up twice), plus latest
    /ids/<short id>/            one folder per snapshot, named by the first 8 hex digits of its ID,
                                plus latest -> <short id of the newest>

``<time>`` is the snapshot time in the zone it was recorded in, ``2024-02-03T04:05:06+01:00`` (``Z`` for
UTC), as ``restic mount`` names them. Names that collide inside one folder get ``-1``, ``-2`` ... in the
order of the snapshots (oldest first), so a name keeps its meaning while newer snapshots arrive. Host and
tag names that cannot be file names (empty, ``.``, ``..``, ``latest``, or holding ``/``) are made safe.

Pure data: no FUSE and no I/O, so the layout is tested without mounting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from vaultfs.format.gojson import GoTime
from vaultfs.format.snapshot import Snapshot

#: Name of the symlink to the newest entry of every snapshot listing.
LATEST = b"latest"
#: The folders of the root, in listing order.
TOP = (b"snapshots", b"hosts", b"tags", b"ids")
SHORT_ID = 8

_EPOCH = datetime(1970, 1, 1)

Path = tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class VDir:
    """A virtual folder; ``path`` is its key in ``Layout.dirs``."""

    path: Path


@dataclass(frozen=True, slots=True)
class SnapRoot:
    """The root folder of one snapshot."""

    snap_id: str


@dataclass(frozen=True, slots=True)
class VLink:
    """The ``latest`` symlink: ``target`` is a sibling name; ``snap_id`` the snapshot it points to."""

    target: bytes
    snap_id: str


Child = VDir | SnapRoot | VLink


@dataclass
class Layout:
    """``dirs`` maps every virtual folder (root = ``()``) to its children in listing order;
    ``mtime_ns`` gives each folder a time: that of the newest snapshot below it."""

    dirs: dict[Path, dict[bytes, Child]] = field(default_factory=dict)
    mtime_ns: dict[Path, int] = field(default_factory=dict)

    def child(self, path: Path, name: bytes) -> Child | None:
        children = self.dirs.get(path)
        return None if children is None else children.get(name)


def time_name(t: GoTime) -> str:
    """``2006-01-02T15:04:05Z07:00`` in the snapshot's own zone (whole seconds)."""
    local = _EPOCH + timedelta(seconds=t.ns // 1_000_000_000 + t.offset)
    text = local.strftime("%Y-%m-%dT%H:%M:%S")
    if t.offset == 0:
        return text + "Z"
    sign = "+" if t.offset > 0 else "-"
    hours, rest = divmod(abs(t.offset), 3600)
    return f"{text}{sign}{hours:02d}:{rest // 60:02d}"


def safe_name(label: str) -> bytes:
    """A host or tag as one file name: ``/`` becomes ``_``; names the listing itself uses get a ``_``."""
    raw = label.replace("/", "_").encode("utf-8", "surrogateescape").replace(b"\0", b"_")
    if raw in (b"", b".", b"..", LATEST):
        raw = b"_" + raw
    return raw


class _Listing:
    """One snapshot listing under construction: unique names in arrival order, and the newest one."""

    def __init__(self) -> None:
        self.children: dict[bytes, Child] = {}
        self.newest: tuple[int, bytes, str] | None = None

    def add(self, base: bytes, snap_id: str, time_ns: int) -> None:
        name, n = base, 0
        while name in self.children or name == LATEST:
            n += 1
            name = b"%s-%d" % (base, n)
        self.children[name] = SnapRoot(snap_id)
        if self.newest is None or time_ns >= self.newest[0]:
            self.newest = (time_ns, name, snap_id)

    def finish(self) -> dict[bytes, Child]:
        if self.newest is not None:
            self.children[LATEST] = VLink(self.newest[1], self.newest[2])
        return self.children


def build_layout(snapshots: list[tuple[str, Snapshot]], empty_time_ns: int = 0) -> Layout:
    """The layout for ``snapshots`` (any order; they are sorted oldest first, ties by ID).

    ``empty_time_ns`` is the time of folders that hold no snapshot (an empty vault).
    """
    ordered = sorted(snapshots, key=lambda item: (item[1].time.ns, item[0]))
    by_time = _Listing()
    by_id = _Listing()
    hosts: dict[bytes, _Listing] = {}
    tags: dict[bytes, _Listing] = {}
    newest_in: dict[Path, int] = {}

    def seen(path: Path, ns: int) -> None:
        newest_in[path] = max(newest_in.get(path, ns), ns)

    for snap_id, snap in ordered:
        ns = snap.time.ns
        name = time_name(snap.time).encode()
        by_time.add(name, snap_id, ns)
        by_id.add(snap_id[:SHORT_ID].encode(), snap_id, ns)
        seen((), ns)
        seen((b"snapshots",), ns)
        seen((b"ids",), ns)
        if snap.hostname:
            host = safe_name(snap.hostname)
            hosts.setdefault(host, _Listing()).add(name, snap_id, ns)
            seen((b"hosts",), ns)
            seen((b"hosts", host), ns)
        for tag in dict.fromkeys(snap.tags):
            label = safe_name(tag)
            tags.setdefault(label, _Listing()).add(name, snap_id, ns)
            seen((b"tags",), ns)
            seen((b"tags", label), ns)

    layout = Layout()
    layout.dirs[()] = {top: VDir((top,)) for top in TOP}
    layout.dirs[(b"snapshots",)] = by_time.finish()
    layout.dirs[(b"ids",)] = by_id.finish()
    for top, groups in ((b"hosts", hosts), (b"tags", tags)):
        layout.dirs[(top,)] = {label: VDir((top, label)) for label in sorted(groups)}
        for label, listing in groups.items():
            layout.dirs[(top, label)] = listing.finish()
    layout.mtime_ns = {path: newest_in.get(path, empty_time_ns) for path in layout.dirs}
    return layout
