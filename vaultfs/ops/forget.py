"""Retention: which snapshots a ``--keep-*`` policy keeps, with restic 0.14's exact rules, and forgetting
the others.

The rules (restic's ``ApplyPolicy``, applied to each group separately):

* Snapshots are grouped by host and paths unless told otherwise (``group_by``: any of ``host``, ``paths``,
  ``tags``, or nothing for one group). Paths and tags of a group key are sorted.
* Within a group, snapshots are visited newest first. A snapshot is kept when any rule wants it:

  - ``keep_tags``: it carries every tag of one of the tag lists (a list holding the empty tag matches
    snapshots without tags). Not counted.
  - ``within``: its time is after ``newest - within``, where ``newest`` is the newest snapshot of the
    group that is not in the future, and the duration (``1y2m3d4h``) is subtracted as calendar years, months and days (with Go's
    normalisation, so 31 March minus one month is 3 March) and then as hours.
  - ``last``/``hourly``/``daily``/``weekly``/``monthly``/``yearly`` N: each rule has a counter N and
    remembers the bucket (the hour, day, ISO week, month, year, or for ``last`` the snapshot itself) of
    the last snapshot it kept. A snapshot in a different bucket than that is kept and uses up one count.
    So "daily 7" keeps the newest snapshot of each of the 7 newest days that have snapshots.
  - ``within_hourly`` ... ``within_yearly`` D: like the bucket rules without a counter, for the
    snapshots within D of the newest.

  Buckets use the wall-clock time in the UTC offset the snapshot was written with.
* An empty policy keeps everything (restic prints "no policy was specified").

Forgetting only removes snapshot files. The data they alone used stays until ``prune``; their packindex
files stay too (prune reads them to know which packs may have become partly unused).
"""

from __future__ import annotations

import re
import time as _time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from vaultfs.errors import UsageError, VaultError
from vaultfs.format.gojson import GoTime
from vaultfs.format.snapshot import Snapshot
from vaultfs.repo.repository import Repository, filter_snapshots

SnapshotList = list[tuple[str, Snapshot]]

_DURATION = re.compile(r"(\d+)([ymdh])")
GROUP_OPTIONS = {"host": "host", "hosts": "host", "path": "paths", "paths": "paths"}
GROUP_OPTIONS |= {"tag": "tags", "tags": "tags"}


@dataclass(frozen=True)
class Duration:
    """restic's calendar duration: years, months, days and hours (``1y2m3d4h``)."""

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    @classmethod
    def parse(cls, text: str) -> Duration:
        """Parse ``1y2m3d4h`` (any subset, in any order, each unit once). Raises UsageError."""
        text = text.strip()
        pos, values, seen = 0, {"y": 0, "m": 0, "d": 0, "h": 0}, set()
        while pos < len(text):
            m = _DURATION.match(text, pos)
            if m is None or m.group(2) in seen:
                raise UsageError(
                    f"invalid duration {text!r}: use numbers with y, m, d and h, e.g. 1y6m or 7d12h"
                )
            seen.add(m.group(2))
            values[m.group(2)] = int(m.group(1))
            pos = m.end()
        if not text:
            raise UsageError("empty duration: use numbers with y, m, d and h, e.g. 7d")
        return cls(values["y"], values["m"], values["d"], values["h"])

    @property
    def zero(self) -> bool:
        return not (self.years or self.months or self.days or self.hours)

    def __str__(self) -> str:
        parts = [(self.years, "y"), (self.months, "m"), (self.days, "d"), (self.hours, "h")]
        return "".join(f"{n}{u}" for n, u in parts if n) or "0h"


@dataclass
class Policy:
    """A ``--keep-*`` policy. Counts are snapshots (0 = rule off); ``keep_tags`` are tag lists."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: Duration = field(default_factory=Duration)
    within_hourly: Duration = field(default_factory=Duration)
    within_daily: Duration = field(default_factory=Duration)
    within_weekly: Duration = field(default_factory=Duration)
    within_monthly: Duration = field(default_factory=Duration)
    within_yearly: Duration = field(default_factory=Duration)
    keep_tags: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
            if getattr(self, name) < 0:
                raise UsageError(f"--keep-{name} must not be negative")

    def counts(self) -> list[tuple[int, Callable[[datetime, int], int], str]]:
        return [
            (self.last, _always, "last snapshot"),
            (self.hourly, _hour, "hourly snapshot"),
            (self.daily, _day, "daily snapshot"),
            (self.weekly, _week, "weekly snapshot"),
            (self.monthly, _month, "monthly snapshot"),
            (self.yearly, _year, "yearly snapshot"),
        ]

    def within_buckets(self) -> list[tuple[Duration, Callable[[datetime, int], int], str]]:
        return [
            (self.within_hourly, _hour, "hourly within"),
            (self.within_daily, _day, "daily within"),
            (self.within_weekly, _week, "weekly within"),
            (self.within_monthly, _month, "monthly within"),
            (self.within_yearly, _year, "yearly within"),
        ]

    def empty(self) -> bool:
        return (
            not self.keep_tags
            and not any(count for count, _b, _r in self.counts())
            and self.within.zero
            and all(d.zero for d, _b, _r in self.within_buckets())
        )

    def describe(self) -> str:
        """One line such as "keep 7 daily, 4 weekly snapshots and all snapshots within 2d"."""
        names = ["latest", "hourly", "daily", "weekly", "monthly", "yearly"]
        keeps = [f"{c} {n}" for (c, _b, _r), n in zip(self.counts(), names, strict=True) if c]
        parts = [f"{', '.join(keeps)} snapshots"] if keeps else []
        parts += [
            f"{r.split()[0]} snapshots within {d}"
            for d, _b, r in self.within_buckets()
            if not d.zero
        ]
        text = ", ".join(parts)
        if self.keep_tags:
            tags = " or ".join(",".join(t) or "(no tags)" for t in self.keep_tags)
            text += (" and " if text else "") + f"all snapshots with tags {tags}"
        if not self.within.zero:
            text += (" and " if text else "") + f"all snapshots within {self.within} of the newest"
        return "keep " + text if text else "keep everything (empty policy)"


def _wall(t: GoTime) -> datetime:
    """The wall-clock time in the offset the snapshot was written with (what Go's Year() etc. see)."""
    secs, _ns = divmod(t.ns, 1_000_000_000)
    return datetime(1970, 1, 1) + timedelta(seconds=secs + t.offset)


def _always(_d: datetime, nr: int) -> int:
    return nr


def _hour(d: datetime, _nr: int) -> int:
    return d.year * 1_000_000 + d.month * 10_000 + d.day * 100 + d.hour


def _day(d: datetime, _nr: int) -> int:
    return d.year * 10_000 + d.month * 100 + d.day


def _week(d: datetime, _nr: int) -> int:
    iso = d.isocalendar()
    return iso.year * 100 + iso.week


def _month(d: datetime, _nr: int) -> int:
    return d.year * 100 + d.month


def _year(d: datetime, _nr: int) -> int:
    return d.year


def subtract(t: GoTime, d: Duration) -> int:
    """``t`` minus the duration, in ns since the epoch, as restic computes it: Go's
    ``AddDate(-y, -m, -d)`` (calendar arithmetic with overflow normalised) then ``Add(-h hours)``."""
    wall = _wall(t)
    months = wall.year * 12 + (wall.month - 1) - d.years * 12 - d.months
    year, month0 = divmod(months, 12)
    # Go normalises an out-of-range day by rolling into the next month(s): count from day 1.
    day = date(year, month0 + 1, 1) + timedelta(days=wall.day - 1 - d.days)
    target = datetime(day.year, day.month, day.day, wall.hour, wall.minute, wall.second)
    sub_ns = t.ns % 1_000_000_000
    if t.offset == _local_offset(t.ns):
        # Go keeps a time whose offset matches the local zone in time.Local, and AddDate then
        # resolves the new wall clock with the local rules (daylight saving may change the offset).
        secs = int(_time.mktime((*target.timetuple()[:8], -1)))
    else:
        secs = int((target - datetime(1970, 1, 1)).total_seconds()) - t.offset
    return secs * 1_000_000_000 + sub_ns - d.hours * 3_600_000_000_000


def _local_offset(ns: int) -> int:
    return _time.localtime(ns // 1_000_000_000).tm_gmtoff


def has_tags(snap: Snapshot, tags: Sequence[str]) -> bool:
    """restic's HasTags: the snapshot carries every tag of the list; the empty tag matches a
    snapshot without tags."""
    for tag in tags:
        if tag == "" and not snap.tags:
            return True
        if tag not in snap.tags:
            return False
    return True


def split_tag_list(text: str) -> list[str]:
    """A ``--keep-tag``/``--tag`` value: comma separated, spaces around each tag stripped."""
    return [t.strip() for t in text.split(",")]


@dataclass
class Decision:
    """What the policy decided for one group: ``keep`` and ``remove`` newest first; ``reasons`` maps
    each kept snapshot to the rules that kept it, ``counters`` to the counts left after it."""

    keep: SnapshotList
    remove: SnapshotList
    reasons: dict[str, list[str]]
    counters: dict[str, dict[str, int]]


def apply_policy(snaps: SnapshotList, policy: Policy) -> Decision:
    """Split one group's snapshots into kept and removed (see the module docstring)."""
    ordered = sorted(snaps, key=lambda item: (-item[1].time.ns, item[0]))
    if policy.empty():
        return Decision(ordered, [], {sid: ["policy is empty"] for sid, _ in ordered}, {})
    if not ordered:
        return Decision([], [], {}, {})
    # restic measures durations from the newest snapshot that is not in the future; with none, from
    # Go's zero time (year 1), which makes every snapshot "within".
    now = _time.time_ns()
    past = [snap.time for _sid, snap in ordered if snap.time.ns < now]
    newest = max(past, key=lambda t: t.ns) if past else None

    def start(dur: Duration) -> int:
        return subtract(newest, dur) if newest is not None else -(1 << 80)

    counts = [[count, bucket, -1, reason] for count, bucket, reason in policy.counts()]
    withins = [
        [start(dur), bucket, -1, f"{reason} {dur}"]
        for dur, bucket, reason in policy.within_buckets()
        if not dur.zero
    ]
    within_start = None if policy.within.zero else start(policy.within)
    keep: SnapshotList = []
    remove: SnapshotList = []
    reasons: dict[str, list[str]] = {}
    counters: dict[str, dict[str, int]] = {}
    for nr, (sid, snap) in enumerate(ordered):
        why = []
        for tags in policy.keep_tags:
            if has_tags(snap, tags):
                why.append(f"has tags [{', '.join(tags)}]")
        if within_start is not None and snap.time.ns > within_start:
            why.append(f"within {policy.within}")
        wall = _wall(snap.time)
        for rule in counts:
            if rule[0] > 0:
                value = rule[1](wall, nr)
                if value != rule[2]:
                    rule[2] = value
                    rule[0] -= 1
                    why.append(rule[3])
        for w in withins:
            if snap.time.ns > w[0]:
                value = w[1](wall, nr)
                if value != w[2]:
                    w[2] = value
                    why.append(w[3])
        if why:
            keep.append((sid, snap))
            reasons[sid] = why
            names = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
            counters[sid] = {n: r[0] for n, r in zip(names, counts, strict=True) if r[0]}
        else:
            remove.append((sid, snap))
    return Decision(keep, remove, reasons, counters)


@dataclass(frozen=True)
class GroupKey:
    host: str
    paths: tuple[str, ...]
    tags: tuple[str, ...]


def parse_group_by(text: str) -> frozenset[str]:
    """``host,paths`` and the like (restic's ``--group-by``); "" groups everything together."""
    out = set()
    for part in text.split(","):
        if part == "":
            continue
        if part not in GROUP_OPTIONS:
            raise UsageError(
                f"unknown grouping option {part!r}: use host, paths and/or tags, comma separated"
            )
        out.add(GROUP_OPTIONS[part])
    return frozenset(out)


def group_snapshots(snaps: SnapshotList, group_by: frozenset[str]) -> dict[GroupKey, SnapshotList]:
    """Snapshots by group key, keys in the order their first snapshot appears."""
    groups: dict[GroupKey, SnapshotList] = {}
    for sid, snap in snaps:
        key = GroupKey(
            snap.hostname if "host" in group_by else "",
            tuple(sorted(snap.paths)) if "paths" in group_by else (),
            tuple(sorted(snap.tags)) if "tags" in group_by else (),
        )
        groups.setdefault(key, []).append((sid, snap))
    return groups


@dataclass
class ForgetGroup:
    key: GroupKey
    keep: SnapshotList
    remove: SnapshotList
    reasons: dict[str, list[str]]
    counters: dict[str, dict[str, int]]


@dataclass
class ForgetReport:
    policy: str
    dry_run: bool
    groups: list[ForgetGroup] = field(default_factory=list)
    #: IDs of the snapshots removed (or that would be, with dry_run), oldest first
    removed: list[str] = field(default_factory=list)
    #: snapshot files that could not be read (never removed: their group is unknown)
    unreadable: list[str] = field(default_factory=list)


def forget(
    repo: Repository,
    policy: Policy | None = None,
    *,
    snapshot_ids: Sequence[str] = (),
    group_by: str | frozenset[str] = "host,paths",
    hosts: Sequence[str] | None = None,
    tags: Sequence[str] | None = None,
    paths: Sequence[str] | None = None,
    dry_run: bool = False,
    on_removed: Callable[[str], None] | None = None,
) -> ForgetReport:
    """Remove the snapshots a policy does not keep, or the given ``snapshot_ids`` (IDs or unique
    prefixes; the policy and the filters are then not used). ``hosts``/``tags``/``paths`` restrict
    which snapshots the policy considers, as in ``vault snapshots``.

    The caller must hold the exclusive lock unless ``dry_run``. Raises NotFoundError for an unknown or
    ambiguous snapshot ID, UsageError for a bad ``group_by``. ``on_removed`` is called after each
    snapshot file is removed.
    """
    policy = policy or Policy()
    grouping = parse_group_by(group_by) if isinstance(group_by, str) else group_by
    report = ForgetReport(policy.describe(), dry_run)

    def unreadable(exc: VaultError) -> None:
        report.unreadable.append(str(exc))

    doomed: dict[str, Snapshot] = {}
    if snapshot_ids:
        # As restic does: named snapshots are removed whatever the filters say.
        for spec in snapshot_ids:
            sid, snap = repo.find_snapshot(spec)
            doomed[sid] = snap
    elif not policy.empty():
        snaps = repo.list_snapshots(on_error=unreadable)
        snaps = filter_snapshots(snaps, hosts=list(hosts or []), tags=list(tags or []), paths=paths)
        for key, members in group_snapshots(snaps, grouping).items():
            decision = apply_policy(members, policy)
            report.groups.append(
                ForgetGroup(
                    key, decision.keep, decision.remove, decision.reasons, decision.counters
                )
            )
            doomed.update(decision.remove)
    report.removed = [
        sid for sid, _snap in sorted(doomed.items(), key=lambda i: (i[1].time.ns, i[0]))
    ]
    if not dry_run:
        for sid in report.removed:
            repo.backend.remove("snapshots", sid)
            if on_removed is not None:
                on_removed(sid)
    return report


def group_json(group: ForgetGroup, snapshot_doc: Callable[[str, Snapshot], dict]) -> dict:
    """One group as restic's ``forget --json`` prints it (tags, host, paths, keep, remove, reasons)."""
    return {
        "tags": list(group.key.tags) or None,
        "host": group.key.host,
        "paths": list(group.key.paths) or None,
        # restic prints null, not [], for an empty list
        "keep": [snapshot_doc(sid, snap) for sid, snap in group.keep] or None,
        "remove": [snapshot_doc(sid, snap) for sid, snap in group.remove] or None,
        "reasons": [
            {
                "snapshot": snapshot_doc(sid, snap),
                "matches": group.reasons[sid],
                "counters": group.counters.get(sid, {}),
            }
            for sid, snap in group.keep
        ]
        or None,
    }


__all__ = [
    "Duration",
    "ForgetGroup",
    "ForgetReport",
    "GroupKey",
    "Policy",
    "apply_policy",
    "forget",
    "group_json",
    "group_snapshots",
    "has_tags",
    "parse_group_by",
    "split_tag_list",
    "subtract",
]
