"""vault repair: bring a damaged vault back to a clean state, losing as little as possible.

Steps, each only when needed: remove locks left by dead processes on this host; with --rollback-to,
move away every data, index, snapshot and packindex file written after TIME; find corrupt files by
their hash; copy the intact blobs out of damaged packs into new packs; move damaged files, files that
are not vault objects and leftover temp files to a quarantine folder outside the vault's folders
(--delete removes them instead); rebuild the index from the pack headers; then deal with the snapshots
that need data that is gone: drop them, or with --salvage write a new snapshot without the damaged
files (tagged "repaired", the old snapshot's ID kept in its "original" field) and drop the old one.
Checks again and repeats until the vault deep-verifies clean.

Prints exactly which snapshots and which files in them were lost. --dry-run changes nothing and prints
the plan. Running repair again is always safe: on a clean vault it changes nothing, and after a crash
(even kill -9) a second run finishes the job.

The default quarantine folder is next to the vault: <vault>/../<vault name>.quarantine-<time>/; each
file keeps its vault path there, and MANIFEST.jsonl says why it was moved.

Exit status 0 when the vault is clean at the end (for --dry-run: when nothing needs repair), 1 when
problems remain (for --dry-run: when a repair would change something).
"""

from __future__ import annotations

import argparse
from datetime import datetime
from typing import TYPE_CHECKING

from vaultfs.errors import UsageError
from vaultfs.tools.cmd_deep_verify import StagedProgress, open_vault, render_files
from vaultfs.tools.common import Output, locked, to_jsonable

if TYPE_CHECKING:
    from vaultfs.ops.repair import RepairReport


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "repair",
        help="fix a damaged vault (quarantine damaged files, rebuild the index, fix snapshots)",
        description=__doc__,
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--quarantine",
        metavar="DIR",
        help="move damaged files to DIR (outside the vault; default: next to a local vault)",
    )
    where.add_argument(
        "--delete", action="store_true", help="delete damaged files instead of moving them"
    )
    p.add_argument(
        "--salvage",
        action="store_true",
        help="rewrite damaged snapshots without the damaged files instead of dropping them",
    )
    p.add_argument("--dry-run", action="store_true", help="change nothing; print the plan")
    p.add_argument(
        "--rollback-to",
        metavar="TIME",
        help="first move away every data, index, snapshot and packindex file written after TIME "
        '(e.g. "2024-05-06 07:00" local time, or ISO 8601 with a zone), then repair',
    )
    p.add_argument(
        "--read-data",
        action="store_true",
        help="read every pack and check every blob, to find blobs damaged inside packs whose files "
        "hash right (damage done when they were written)",
    )
    p.add_argument(
        "--read-data-subset",
        metavar="N/T|X%",
        help="with --read-data implied: read only slice N of T of the packs, or a random X percent",
    )
    p.add_argument(
        "--state",
        metavar="FILE",
        help="the state file of `vault verify --state FILE`: repair records what it hashes there, "
        "and with --max-age skips files verify found intact recently",
    )
    p.add_argument(
        "--max-age",
        metavar="AGE",
        help="with --state: do not hash again files verified intact less than AGE ago (e.g. 1d, "
        "12h); they are trusted as `vault verify --max-age` trusts them",
    )
    p.add_argument(
        "--tag",
        metavar="TAG",
        help="tag added to snapshots rewritten by --salvage (default: repaired)",
    )
    p.set_defaults(func=run)
    return p


def parse_time(text: str) -> int:
    """Nanoseconds since the epoch of an ISO 8601 date/time (local time when no zone is given)."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(
            f'invalid time {text!r}: use e.g. "2024-05-06 07:00" or 2024-05-06T07:00:00Z'
        ) from None
    return round(when.timestamp() * 1_000_000) * 1000


def run(args: argparse.Namespace, out: Output) -> int:
    # Imported here: every `vault` command imports this module to build its parser.
    from vaultfs.ops.repair import DEFAULT_TAG, repair
    from vaultfs.ops.verify import Subset, parse_duration

    rollback = parse_time(args.rollback_to) if args.rollback_to else None
    subset = Subset.parse(args.read_data_subset) if args.read_data_subset else None
    tag = DEFAULT_TAG if args.tag is None else args.tag
    if not tag:
        raise UsageError("--tag must not be empty")
    if args.max_age and not args.state:
        raise UsageError("--max-age needs --state FILE (it is where verification times are kept)")
    max_age = parse_duration(args.max_age) if args.max_age else None
    repo = open_vault(args)
    with locked(repo, exclusive=not args.dry_run), StagedProgress(out) as bar:
        report = repair(
            repo,
            quarantine=args.quarantine,
            delete=args.delete,
            salvage=args.salvage,
            dry_run=args.dry_run,
            rollback_to=rollback,
            read_data=args.read_data or subset is not None,
            subset=subset,
            tag=tag,
            verify_state=args.state,
            verify_max_age=max_age,
            on_stage=bar.stage,
            on_advance=bar.advance,
        )
    if out.json:
        doc = {"message_type": "repair", "ok": report.clean}
        doc.update(to_jsonable(report))
        out.emit(doc)
    else:
        render(report, out)
    return 0 if report.clean else 1


def render(report: RepairReport, out: Output) -> None:
    if not report.actions:
        out.line("nothing to repair: the vault is clean")
        return
    title = "repair plan (dry run, nothing was changed):" if report.dry_run else "repair:"
    out.line(title)
    out.table(
        ["action", "object", "detail"], [[a.kind, a.object, a.detail] for a in report.actions]
    )
    if report.blobs_salvaged:
        verb = "would be" if report.dry_run else "were"
        out.line(f"{report.blobs_salvaged} intact blob(s) of damaged packs {verb} salvaged")
    for loss in report.snapshots:
        head = f"snapshot {loss.id[:8]}"
        if loss.time:
            head += f" ({loss.time}, {loss.hostname}, {', '.join(loss.paths)})"
        if loss.replaced_by:
            out.line(f"{head} was replaced by {loss.replaced_by[:8]}, which lacks:")
        elif loss.lost:
            out.line(f"{head} is lost entirely")
            continue
        else:
            verb = "would be" if report.dry_run else "was"
            out.line(f"{head} {verb} dropped; files that were lost with it:")
        render_files(out, loss.files)
    if not report.snapshots:
        out.line("no snapshot lost any file")
    if report.quarantine and not report.dry_run:
        out.line(f"damaged files were moved to {report.quarantine}")
    if report.dry_run:
        out.line("run without --dry-run to repair")
    elif report.clean:
        out.line(f"the vault is clean now ({report.rounds} round(s), {report.seconds:.1f} s)")
    else:
        out.line("problems remain that repair cannot fix:")
        for p in report.remaining:
            out.line(f"  {p.object}: {p.message} ({p.consequence})")
