"""vault forget: remove snapshots by ID or by a retention policy, with restic's rules.

With snapshot IDs, those snapshots are removed. With --keep-* options, the snapshots (after --host,
--tag and --path filtering) are divided into groups (--group-by, by default host and paths) and in each
group every snapshot that no rule keeps is removed. The rules are restic's: --keep-last N keeps the N
newest; --keep-hourly/daily/weekly/monthly/yearly N keep the newest snapshot of each of the N newest
hours/days/ISO weeks/months/years that have snapshots (in the time zone each snapshot was made in);
--keep-within D keeps all snapshots newer than D (e.g. 1y6m, 7d12h) before the group's newest snapshot;
--keep-within-hourly ... --keep-within-yearly D keep one snapshot per hour ... year within D of the newest;
--keep-tag T keeps snapshots carrying all tags of T. A snapshot is kept when any rule keeps it. Given the
same policy and snapshots, vault forget keeps exactly the snapshots `restic forget` keeps.

Only snapshot files are removed; the data they used is freed by `vault prune` (or --prune here).
Takes the vault's exclusive lock (a shared one with --dry-run).

--json prints restic's format: one line with a list of groups, each {tags, host, paths, keep, remove,
reasons}; with --prune a second line holds prune's report. Exit status 0 on success, 1 when prune
refused or failed, 2 for bad options, 11 when the vault is locked.
"""

from __future__ import annotations

import argparse

from vaultfs.errors import UsageError
from vaultfs.ops.forget import Duration, Policy, forget, group_json, split_tag_list
from vaultfs.ops.prune import prune
from vaultfs.tools.cmd_deep_verify import StagedProgress, open_vault
from vaultfs.tools.cmd_prune import add_prune_options, prune_json, prune_options, render_prune
from vaultfs.tools.common import Output, add_snapshot_filters, locked, snapshot_json

_COUNTS = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
_SHORT = {
    "last": "-l",
    "hourly": "-H",
    "daily": "-d",
    "weekly": "-w",
    "monthly": "-m",
    "yearly": "-y",
}
_WHAT = {
    "last": "the N newest snapshots",
    "hourly": "the newest snapshot of each of the N newest hours with snapshots",
    "daily": "the newest snapshot of each of the N newest days with snapshots",
    "weekly": "the newest snapshot of each of the N newest ISO weeks with snapshots",
    "monthly": "the newest snapshot of each of the N newest months with snapshots",
    "yearly": "the newest snapshot of each of the N newest years with snapshots",
}


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError("negative counts are not allowed")
    return value


def _duration(text: str) -> Duration:
    try:
        return Duration.parse(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "forget",
        help="remove snapshots by ID or by a retention policy (restic's --keep-* rules)",
        description=__doc__,
    )
    p.add_argument(
        "snapshots", nargs="*", metavar="ID", help="snapshots to remove (IDs or unique prefixes)"
    )
    g = p.add_argument_group("policy")
    for name in _COUNTS:
        g.add_argument(
            _SHORT[name],
            f"--keep-{name}",
            type=_count,
            default=0,
            metavar="N",
            help=f"keep {_WHAT[name]}",
        )
    g.add_argument(
        "--keep-within",
        type=_duration,
        default=Duration(),
        metavar="DURATION",
        help="keep every snapshot newer than DURATION (years, months, days, hours: e.g. 1y6m, "
        "7d12h) before the newest snapshot of its group",
    )
    for unit in ("hourly", "daily", "weekly", "monthly", "yearly"):
        g.add_argument(
            f"--keep-within-{unit}",
            type=_duration,
            default=Duration(),
            metavar="DURATION",
            help=f"keep the newest snapshot of each {unit[:-2] if unit != 'daily' else 'day'} "
            "among those newer than DURATION before the newest snapshot of their group",
        )
    g.add_argument(
        "--keep-tag",
        action="append",
        default=[],
        metavar="TAG[,TAG]",
        help="keep snapshots that carry all of these tags (repeatable: any of the lists; an empty "
        "list keeps snapshots without tags)",
    )
    add_snapshot_filters(p)
    p.add_argument(
        "-g",
        "--group-by",
        default="host,paths",
        metavar="GROUP",
        help="apply the policy to each group of snapshots with the same host, paths and/or tags "
        "(comma separated; '' for one group of all; default: %(default)s)",
    )
    p.add_argument(
        "-n",
        "--dry-run",
        action="store_true",
        help="only print which snapshots would be kept and removed",
    )
    p.add_argument(
        "--prune",
        action="store_true",
        help="run `vault prune` afterwards when snapshots were removed (same lock)",
    )
    add_prune_options(p)
    p.set_defaults(func=run)
    return p


def policy_from(args: argparse.Namespace) -> Policy:
    return Policy(
        **{name: getattr(args, f"keep_{name}") for name in _COUNTS},
        within=args.keep_within,
        within_hourly=args.keep_within_hourly,
        within_daily=args.keep_within_daily,
        within_weekly=args.keep_within_weekly,
        within_monthly=args.keep_within_monthly,
        within_yearly=args.keep_within_yearly,
        keep_tags=[split_tag_list(t) for t in args.keep_tag],
    )


def run(args: argparse.Namespace, out: Output) -> int:
    policy = policy_from(args)
    if args.snapshots and not policy.empty():
        raise UsageError("give snapshot IDs or a --keep-* policy, not both")
    options = prune_options(args) if args.prune else {}
    repo = open_vault(args)
    with locked(repo, exclusive=not args.dry_run), StagedProgress(out) as bar:
        report = forget(
            repo,
            policy,
            snapshot_ids=args.snapshots,
            group_by=args.group_by,
            hosts=args.host,
            tags=args.tag,
            paths=args.path,
            dry_run=args.dry_run,
        )
        pruned = None
        if args.prune and report.removed:
            pruned = prune(
                repo,
                dry_run=args.dry_run,
                forgotten=report.removed if args.dry_run else (),
                on_stage=bar.stage,
                on_advance=bar.advance,
                **options,
            )
    for problem in report.unreadable:
        out.warn(f"skipped an unreadable snapshot: {problem}")
    if out.json:
        out.emit_line([group_json(g, snapshot_json) for g in report.groups])
        if pruned is not None:
            out.emit_line(prune_json(pruned))
        return 0
    if not args.snapshots:
        if policy.empty():
            out.note("no policy given (--keep-*): no snapshots are removed")
        else:
            out.note(f"applying policy: {report.policy}")
    for group in report.groups:
        key = group.key
        title = ", ".join(
            part
            for part in (
                f"host {key.host}" if key.host else "",
                f"paths {', '.join(key.paths)}" if key.paths else "",
                f"tags {', '.join(key.tags)}" if key.tags else "",
            )
            if part
        )
        out.line(f"snapshots{' of ' + title if title else ''}:")
        rows = [
            [sid[:8], snap.time.format()[:19].replace("T", " "), snap.hostname, ",".join(snap.tags)]
            + [", ".join(group.reasons.get(sid, [])) or "-"]
            for sid, snap in group.keep
        ]
        out.line(f"keep {len(group.keep)} snapshot(s):")
        out.table(["ID", "Time", "Host", "Tags", "Reasons"], rows)
        if group.remove:
            out.line(f"remove {len(group.remove)} snapshot(s):")
            out.table(
                ["ID", "Time", "Host", "Tags"],
                [
                    [sid[:8], s.time.format()[:19].replace("T", " "), s.hostname, ",".join(s.tags)]
                    for sid, s in group.remove
                ],
            )
        out.line()
    verb = "would remove" if args.dry_run else "removed"
    out.line(f"{verb} {len(report.removed)} snapshot(s)")
    if pruned is not None:
        render_prune(pruned, out)
    return 0
