"""vault forget: the retention policy must keep exactly what `restic forget` (0.14) keeps.

The table test builds one vault of snapshot files only (no data is needed to decide retention) with times
chosen to hit the edges of restic's buckets: several snapshots in one hour and one day, day boundaries in
other UTC offsets, ISO weeks that straddle a new year, month ends and a leap day, and a snapshot in the
future. For each policy row it runs `restic forget --dry-run --json` on that vault and compares groups,
kept and removed snapshots, and the reasons, with vaultfs's decision.
"""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.helpers.restic import Restic, require_restic
from tests.tools.cli import one_line_error, vault
from vaultfs.backend import LocalBackend
from vaultfs.errors import UsageError
from vaultfs.format.gojson import GoTime
from vaultfs.format.snapshot import Snapshot
from vaultfs.ops.forget import Duration, Policy, apply_policy, forget, has_tags, subtract
from vaultfs.repo.repository import Repository

PASSWORD = "pw"


def _time(text: str, offset_hours: float = 0) -> GoTime:
    """GoTime of a wall-clock time "YYYY-MM-DD HH:MM" in the given UTC offset."""
    offset = int(offset_hours * 3600)
    wall = datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=timezone(timedelta(0)))
    return GoTime((int(wall.timestamp()) - offset) * 1_000_000_000 + 123_456_789, offset)


EDGES = [
    # same hour, same day, and the day boundary seen from other offsets
    ("2023-06-10 10:05", 0),
    ("2023-06-10 10:40", 0),
    ("2023-06-10 23:30", 0),
    ("2023-06-11 00:10", 2),  # 2023-06-10 22:10 UTC, but the 11th in its own offset
    ("2023-06-10 20:00", -5),  # the 11th in UTC, the 10th in its own offset
    ("2023-06-11 05:30", 5.5),
    # ISO weeks around new year: 2020-12-31 and 2021-01-03 are week 53 of 2020
    ("2020-12-31 12:00", 0),
    ("2021-01-03 12:00", 0),
    ("2021-01-04 12:00", 0),
    ("2019-12-30 08:00", 0),  # week 1 of 2020
    # month ends and a leap day (keep-within subtracts months with Go's normalisation)
    ("2022-03-31 09:00", 0),
    ("2022-02-28 09:00", 0),
    ("2020-02-29 09:00", 0),
    ("2022-12-31 23:59", 0),
    ("2023-01-01 00:01", 0),
]


def _snapshots(tree: bytes) -> list[Snapshot]:
    rng = random.Random(20240601)
    snaps = []
    hosts, paths = ["alpha", "beta"], [["/srv"], ["/home", "/etc"]]
    tag_sets = [[], ["x"], ["y"], ["x", "y"]]
    for i, (text, off) in enumerate(EDGES):
        snaps.append(
            Snapshot(_time(text, off), tree, paths[i % 2], hostname="alpha", tags=tag_sets[i % 4])
        )
    start = datetime(2021, 6, 1)
    for _ in range(45):
        when = start + timedelta(minutes=rng.randrange(0, 2 * 365 * 24 * 60))
        snaps.append(
            Snapshot(
                _time(when.strftime("%Y-%m-%d %H:%M"), rng.choice([0, 1, -7, 9.5])),
                tree,
                rng.choice(paths),
                hostname=rng.choice(hosts),
                tags=rng.choice(tag_sets),
            )
        )
    # A dense run: every 5 hours for 12 days, one group of its own
    for i in range(58):
        when = datetime(2023, 7, 1, 1) + timedelta(hours=5 * i)
        snaps.append(Snapshot(_time(when.strftime("%Y-%m-%d %H:%M")), tree, ["/db"], "gamma"))
    # In the future: restic 0.14 counts --keep-within from it
    snaps.append(Snapshot(_time("2099-01-01 00:00"), tree, ["/db"], hostname="gamma"))
    return snaps


@pytest.fixture(scope="module")
def policy_vault(tmp_path_factory) -> tuple[Path, Repository, Restic]:
    require_restic()
    path = tmp_path_factory.mktemp("forget") / "vault"
    repo = Repository.init(LocalBackend(str(path)), PASSWORD.encode())
    repo.load_index()
    tree = repo.save_tree([])
    repo.flush()
    for snap in _snapshots(tree):
        repo.save_snapshot(snap)
    return path, repo, Restic(path, PASSWORD)


def _restic_groups(restic: Restic, args: list[str]) -> dict:
    out = restic.run("--json", "forget", "--dry-run", *args).stdout.strip()
    groups = json.loads(out) if out else []
    return {
        (g["host"], tuple(g["paths"] or ()), tuple(g["tags"] or ())): (
            [s["id"] for s in g["keep"] or []],
            sorted(s["id"] for s in g["remove"] or []),
            [r["matches"] for r in g["reasons"] or []],
        )
        for g in groups
    }


def _our_groups(repo: Repository, policy: Policy, **kwargs) -> dict:
    report = forget(repo, policy, dry_run=True, **kwargs)
    return {
        (g.key.host, g.key.paths, g.key.tags): (
            [sid for sid, _ in g.keep],
            sorted(sid for sid, _ in g.remove),
            [g.reasons[sid] for sid, _ in g.keep],
        )
        for g in report.groups
    }


D = Duration.parse
CASES = [
    (["--keep-last", "3"], Policy(last=3), {}),
    (["--keep-hourly", "6"], Policy(hourly=6), {}),
    (["--keep-daily", "7"], Policy(daily=7), {}),
    (["--keep-weekly", "6"], Policy(weekly=6), {}),
    (["--keep-monthly", "8"], Policy(monthly=8), {}),
    (["--keep-yearly", "3"], Policy(yearly=3), {}),
    (
        ["--keep-last", "2", "--keep-daily", "3", "--keep-weekly", "2", "--keep-monthly", "4"],
        Policy(last=2, daily=3, weekly=2, monthly=4),
        {},
    ),
    (["--keep-within", "2m10d"], Policy(within=D("2m10d")), {}),
    (["--keep-within", "1y1m"], Policy(within=D("1y1m")), {}),
    (["--keep-within", "3d12h"], Policy(within=D("3d12h")), {}),
    (["--keep-within-hourly", "2d"], Policy(within_hourly=D("2d")), {}),
    (
        ["--keep-within-daily", "1m", "--keep-yearly", "1"],
        Policy(within_daily=D("1m"), yearly=1),
        {},
    ),
    (["--keep-within-weekly", "4m"], Policy(within_weekly=D("4m")), {}),
    (["--keep-within-monthly", "1y"], Policy(within_monthly=D("1y")), {}),
    (["--keep-within-yearly", "5y"], Policy(within_yearly=D("5y")), {}),
    (["--keep-tag", "x", "--keep-last", "1"], Policy(keep_tags=[["x"]], last=1), {}),
    (
        ["--keep-tag", "x,y", "--keep-tag", "", "--keep-weekly", "1"],
        Policy(keep_tags=[["x", "y"], [""]], weekly=1),
        {},
    ),
    (
        ["--keep-daily", "4", "--group-by", ""],
        Policy(daily=4),
        {"group_by": ""},
    ),
    (
        ["--keep-weekly", "3", "--group-by", "host,tags"],
        Policy(weekly=3),
        {"group_by": "host,tags"},
    ),
    (
        ["--keep-monthly", "2", "--group-by", "paths", "--host", "alpha", "--tag", "x"],
        Policy(monthly=2),
        {"group_by": "paths", "hosts": ["alpha"], "tags": ["x"]},
    ),
    (
        ["--keep-last", "1", "--path", "/srv"],
        Policy(last=1),
        {"paths": ["/srv"]},
    ),
]


@pytest.mark.restic
@pytest.mark.parametrize(("args", "policy", "kwargs"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_policy_keeps_what_restic_keeps(policy_vault, args, policy, kwargs):
    _path, repo, restic = policy_vault
    theirs = _restic_groups(restic, args)
    ours = _our_groups(repo, policy, **kwargs)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key] == theirs[key], key
    # The table must exercise both outcomes somewhere, or it could pass without testing anything.
    assert any(keep for keep, _r, _m in ours.values())


def test_every_case_removes_something(policy_vault):
    """Each row of the table removes at least one snapshot (a row that keeps all proves little)."""
    _path, repo, _restic = policy_vault
    for args, policy, kwargs in CASES:
        report = forget(repo, policy, dry_run=True, **kwargs)
        assert report.removed, args


def test_duration_parsing_and_go_date_arithmetic():
    assert Duration.parse("1y2m3d4h") == Duration(1, 2, 3, 4)
    assert Duration.parse("36h") == Duration(hours=36)
    assert str(Duration.parse("4h1y")) == "1y4h"
    for bad in ("", "1w", "y", "1y1y", "-1d", "1.5d"):
        with pytest.raises(UsageError):
            Duration.parse(bad)
    # Go: 31 March minus one month is "31 February", normalised to 3 March (2022 is no leap year)
    t = _time("2022-03-31 09:00")
    assert subtract(t, D("1m")) == _time("2022-03-03 09:00").ns
    assert subtract(_time("2020-02-29 00:00"), D("1y")) == _time("2019-03-01 00:00").ns
    assert subtract(t, D("1d2h")) == _time("2022-03-30 07:00").ns


def test_tag_rules():
    snap = Snapshot(_time("2023-01-01 00:00"), b"\0" * 32, ["/"], tags=["a", "b"])
    bare = Snapshot(_time("2023-01-01 00:00"), b"\0" * 32, ["/"])
    assert has_tags(snap, ["a"]) and has_tags(snap, ["a", "b"]) and not has_tags(snap, ["a", "c"])
    assert has_tags(bare, [""]) and not has_tags(snap, [""])
    assert has_tags(snap, [])


def test_empty_policy_keeps_everything():
    snaps = [
        (f"{i:064x}", Snapshot(_time(f"2023-01-0{i + 1} 00:00"), b"\0" * 32, ["/"]))
        for i in range(3)
    ]
    decision = apply_policy(snaps, Policy())
    assert [sid for sid, _ in decision.keep] == [sid for sid, _ in reversed(snaps)]
    assert not decision.remove


def test_forget_cli_removes_snapshots_and_prints_restics_json(tmp_path):
    path = tmp_path / "v"
    repo = Repository.init(LocalBackend(str(path)), PASSWORD.encode())
    repo.load_index()
    tree = repo.save_tree([])
    repo.flush()
    ids = [
        repo.save_snapshot(Snapshot(_time(f"2023-05-0{d} 12:00"), tree, ["/x"], "h"))
        for d in range(1, 6)
    ]
    result = vault("-r", path, "--json", "forget", "--keep-last", "2", "--prune", password=PASSWORD)
    forgot, pruned = result.out.splitlines()
    (group,) = json.loads(forgot)
    assert json.loads(pruned)["message_type"] == "prune"
    assert group["host"] == "h" and group["paths"] == ["/x"] and group["tags"] is None
    assert [s["id"] for s in group["keep"]] == [ids[4], ids[3]]
    assert sorted(s["id"] for s in group["remove"]) == sorted(ids[:3])
    assert group["reasons"][0]["matches"] == ["last snapshot"]
    assert sorted(n for n, _ in repo.backend.list("snapshots")) == sorted(ids[3:])
    # by ID (a prefix); IDs and a policy together are a usage error
    vault("-r", path, "forget", ids[3][:10], password=PASSWORD)
    assert [n for n, _ in repo.backend.list("snapshots")] == [ids[4]]
    both = vault("-r", path, "forget", ids[4], "--keep-last", "1", password=PASSWORD, expect=2)
    assert "not both" in one_line_error(both)
