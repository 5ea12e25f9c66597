"""vaultfs/fuse/layout.py: the virtual folders computed from a snapshot list (no FUSE needed)."""

from __future__ import annotations

from vaultfs.format.gojson import GoTime
from vaultfs.format.snapshot import Snapshot
from vaultfs.fuse.layout import LATEST, SnapRoot, VDir, VLink, build_layout, safe_name, time_name


def snap(time: str, host: str = "h", tags: tuple[str, ...] = ()) -> Snapshot:
    return Snapshot(
        time=GoTime.parse(time), tree=bytes(32), paths=["/src"], hostname=host, tags=list(tags)
    )


def test_time_names_keep_the_recorded_zone() -> None:
    assert time_name(GoTime.parse("2024-02-03T04:05:06.123456789Z")) == "2024-02-03T04:05:06Z"
    assert time_name(GoTime.parse("2024-02-03T04:05:06+01:30")) == "2024-02-03T04:05:06+01:30"
    assert time_name(GoTime.parse("1960-01-01T00:00:00-05:00")) == "1960-01-01T00:00:00-05:00"


def test_root_and_listings() -> None:
    a = "a" * 64
    b = "b" * 64
    layout = build_layout(
        [
            (b, snap("2024-01-02T00:00:00Z", host="web", tags=("daily", "db"))),
            (a, snap("2023-01-02T00:00:00Z", host="db", tags=("daily",))),
        ]
    )
    assert list(layout.dirs[()]) == [b"snapshots", b"hosts", b"tags", b"ids"]
    assert layout.dirs[(b"snapshots",)] == {
        b"2023-01-02T00:00:00Z": SnapRoot(a),
        b"2024-01-02T00:00:00Z": SnapRoot(b),
        LATEST: VLink(b"2024-01-02T00:00:00Z", b),
    }
    assert layout.dirs[(b"ids",)] == {
        b"aaaaaaaa": SnapRoot(a),
        b"bbbbbbbb": SnapRoot(b),
        LATEST: VLink(b"bbbbbbbb", b),
    }
    assert layout.dirs[(b"hosts",)] == {
        b"db": VDir((b"hosts", b"db")),
        b"web": VDir((b"hosts", b"web")),
    }
    assert layout.dirs[(b"hosts", b"db")][LATEST] == VLink(b"2023-01-02T00:00:00Z", a)
    assert set(layout.dirs[(b"tags", b"daily")]) == {
        b"2023-01-02T00:00:00Z",
        b"2024-01-02T00:00:00Z",
        LATEST,
    }
    assert layout.dirs[(b"tags", b"db")] == {
        b"2024-01-02T00:00:00Z": SnapRoot(b),
        LATEST: VLink(b"2024-01-02T00:00:00Z", b),
    }
    newest = GoTime.parse("2024-01-02T00:00:00Z").ns
    assert layout.mtime_ns[()] == newest
    assert layout.mtime_ns[(b"hosts", b"db")] == GoTime.parse("2023-01-02T00:00:00Z").ns
    assert layout.child((b"tags", b"nope"), b"x") is None


def test_collisions_get_suffixes_in_time_order() -> None:
    ids = [c * 64 for c in "123"]
    same = "2024-05-05T05:05:05Z"
    layout = build_layout([(ids[2], snap(same)), (ids[0], snap(same)), (ids[1], snap(same))])
    listing = layout.dirs[(b"snapshots",)]
    # equal times are ordered by ID, so the names are stable across refreshes
    assert listing[same.encode()] == SnapRoot(ids[0])
    assert listing[same.encode() + b"-1"] == SnapRoot(ids[1])
    assert listing[same.encode() + b"-2"] == SnapRoot(ids[2])
    assert listing[LATEST] == VLink(same.encode() + b"-2", ids[2])


def test_short_id_collisions_and_odd_labels() -> None:
    first = "abcdef01" + "0" * 56
    second = "abcdef01" + "1" * 56
    layout = build_layout(
        [
            (first, snap("2024-01-01T00:00:00Z", host="", tags=("a/b", "latest", ".."))),
            (second, snap("2024-01-02T00:00:00Z", host="x")),
        ]
    )
    assert set(layout.dirs[(b"ids",)]) == {b"abcdef01", b"abcdef01-1", LATEST}
    assert set(layout.dirs[(b"tags",)]) == {b"a_b", b"_latest", b"_.."}
    assert set(layout.dirs[(b"hosts",)]) == {b"x"}  # no folder for an empty host name
    assert safe_name("") == b"_"


def test_empty_vault() -> None:
    layout = build_layout([], empty_time_ns=42)
    assert layout.dirs[(b"snapshots",)] == {}
    assert layout.dirs[(b"hosts",)] == {}
    assert layout.mtime_ns[()] == 42
