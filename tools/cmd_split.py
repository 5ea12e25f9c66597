"""vault split: copy some snapshots into a new vault that shares this vault's master key.

The new vault at --to gets the same master key and chunker polynomial (and format version), so the two
keep deduplicating against each other: they can be merged again (`vault merge`) or split further, and
nothing is re-encrypted. Only what the selected snapshots need is copied: packs they use completely are
copied as files, the blobs they need from other packs are copied into new packs (each blob decrypted and
hash-checked on the way), and the snapshot files are copied byte for byte, so the snapshots keep their
IDs. The new vault gets a key file for the same password (or the one of --to-password-file).

Select snapshots with --snapshot (IDs or prefixes) and/or --host, --tag, --path (as for `vault
snapshots`); with --snapshot the filters narrow those down. Selected snapshots that depend on missing data
make split refuse before copying anything.

With --move the selected snapshots are then forgotten in this vault and it is pruned (prune options
apply); that happens only after the new vault is complete. Locks: shared, exclusive with --move.

Writes go packs, index, snapshots, so a kill -9 leaves both vaults valid; running the same split again
continues into the vault it started (same key) and finishes the job.

Exit status 0 on success, 1 on failure (nothing is deleted from this vault then), 2 for bad options.
"""

from __future__ import annotations

import argparse
from typing import Any

from vaultfs.backend import open_backend
from vaultfs.errors import UsageError
from vaultfs.ops.prune import DEFAULT_WORKERS
from vaultfs.ops.split import CopyReport, SplitReport, split
from vaultfs.repo.repository import filter_snapshots
from vaultfs.tools.cmd_deep_verify import StagedProgress, open_vault, size_text
from vaultfs.tools.cmd_prune import add_prune_options, prune_json, prune_options, render_prune
from vaultfs.tools.common import (
    Output,
    _first_line,
    add_snapshot_filters,
    locked,
    read_password,
    to_jsonable,
)


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "split",
        help="copy (or move) some snapshots into a new vault with the same master key",
        description=__doc__,
    )
    p.add_argument(
        "--to",
        required=True,
        metavar="LOCATION",
        help="where the new vault goes: a folder or rest:http://host:port/path/",
    )
    p.add_argument(
        "--snapshot",
        action="extend",
        nargs="+",
        default=[],
        metavar="ID",
        help="split off these snapshots (IDs or unique prefixes; repeatable)",
    )
    add_snapshot_filters(p)
    p.add_argument(
        "--move",
        action="store_true",
        help="then forget the selected snapshots here and prune this vault",
    )
    p.add_argument(
        "--to-password-file",
        metavar="FILE",
        help="password for the new vault's key file (default: this vault's password)",
    )
    add_copy_options(p)
    add_prune_options(p)
    p.set_defaults(func=run)
    return p


def add_copy_options(p: argparse.ArgumentParser) -> None:
    """--dry-run and --workers, as split and merge take them."""
    p.add_argument("-n", "--dry-run", action="store_true", help="only print what would be copied")
    p.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        metavar="N",
        help="packs copied at the same time (default: %(default)s)",
    )


def check_workers(args: argparse.Namespace) -> None:
    if args.workers < 1:
        raise UsageError("--workers must be at least 1")


def other_password(path: str | None, fallback: bytes) -> bytes:
    """The password of a second vault: the first line of ``path``, or ``fallback`` without one."""
    return _first_line(path) if path else fallback


def run(args: argparse.Namespace, out: Output) -> int:
    if not (args.snapshot or args.host or args.tag or args.path):
        raise UsageError(
            "select the snapshots to split off with --snapshot, --host, --tag and/or --path"
        )
    check_workers(args)
    options = prune_options(args)
    repo = open_vault(args)
    password = other_password(args.to_password_file, read_password(args))
    target = open_backend(args.to)
    try:
        with locked(repo, exclusive=args.move and not args.dry_run), StagedProgress(out) as bar:
            snaps = repo.list_snapshots()
            if args.snapshot:
                wanted = {repo.find_snapshot(spec)[0] for spec in args.snapshot}
                snaps = [(sid, snap) for sid, snap in snaps if sid in wanted]
            snaps = filter_snapshots(snaps, hosts=args.host, tags=args.tag, paths=args.path)
            report = split(
                repo,
                target,
                password,
                snaps,
                move=args.move,
                dry_run=args.dry_run,
                prune_options=options,
                workers=args.workers,
                on_stage=bar.stage,
                on_advance=bar.advance,
            )
    finally:
        target.close()
    if out.json:
        doc: dict[str, Any] = {"message_type": "split"}
        doc.update(to_jsonable(report))
        if report.prune is not None:
            doc["prune"] = prune_json(report.prune)
        out.emit(doc)
    else:
        render_split(report, out)
    return 0


def render_copy(copy: CopyReport, out: Output, dry_run: bool) -> None:
    would = "would " if dry_run else ""
    out.line(
        f"{would}copy {len(copy.snapshots_copied)} snapshot(s)"
        + (f" ({len(copy.snapshots_present)} already there)" if copy.snapshots_present else "")
    )
    out.line(
        f"{would}copy {copy.blobs_copied} blob(s), {size_text(copy.bytes_copied)}: "
        f"{len(copy.packs_copied)} whole pack(s) and {len(copy.packs_written)} new pack(s); "
        f"{copy.blobs_present} blob(s) were there already"
    )


def render_split(report: SplitReport, out: Output) -> None:
    if report.created:
        out.line(f"{'would create' if report.dry_run else 'created'} vault {report.target}")
    else:
        out.line(f"continuing into the vault at {report.target} (same master key)")
    render_copy(report.copy, out, report.dry_run)
    if report.forget is not None:
        verb = "would forget" if report.dry_run else "forgot"
        out.line(f"{verb} {len(report.forget.removed)} snapshot(s) here")
    if report.prune is not None:
        render_prune(report.prune, out)
