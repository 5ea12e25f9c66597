"""vault prune: delete the data no snapshot needs any more and repack partly used packs.

Takes the vault's exclusive lock. Reads the index and every snapshot, walks the trees of the snapshots
that need it and checks that everything the snapshots need is there: if a snapshot depends on a blob that
is missing, prune refuses and deletes nothing, naming each such snapshot and blob (run `vault
deep-verify` and `vault repair`, or forget the damaged snapshots). Then it deletes packs nothing uses,
copies the used blobs of packs whose unused share is above --max-unused into new packs (every copied blob
is decrypted and hash-checked) and deletes the old ones, and deletes leftover packs that no index names.

New packs and index files are written before anything is deleted, and packs are deleted last, so a crash
or kill -9 at any point leaves a valid vault; run prune again to finish. The vault stays readable by
restic (`restic check --read-data` passes).

packindex files (one per snapshot, listing the packs it needs) are written for the snapshots prune
walked; later runs trust them for snapshots whose packs cannot have changed and walk only the others.
--full ignores them and walks every snapshot (it also repacks packs that became partly unused without a
snapshot being forgotten, e.g. after a crash).

Exit status 0 on success, 1 when prune refused or failed (the vault is then unchanged or still valid),
11 when the vault is locked.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from vaultfs.errors import UsageError
from vaultfs.ops.prune import DEFAULT_MAX_UNUSED, PruneReport, prune
from vaultfs.tools.cmd_deep_verify import StagedProgress, open_vault, size_text
from vaultfs.tools.common import Output, to_jsonable

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_max_unused(text: str) -> float | None:
    """``5%`` (a percentage of each pack) or ``unlimited`` (None: never repack)."""
    text = text.strip().lower()
    if text == "unlimited":
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", text)
    if m is None or float(m.group(1)) > 100:
        raise UsageError(f"--max-unused {text!r}: give a percentage from 0% to 100%, or unlimited")
    return float(m.group(1))


def parse_size(text: str) -> int:
    """A byte count with an optional k/m/g/t suffix (powers of 1024), e.g. 500M or 2g."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise UsageError(
            f"invalid size {text!r}: use a number with an optional k, m, g or t suffix"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def add_prune_options(p: argparse.ArgumentParser) -> None:
    """The options of prune that forget --prune and split --move share."""
    g = p.add_argument_group("prune options")
    g.add_argument(
        "--max-unused",
        metavar="LIMIT",
        default=f"{DEFAULT_MAX_UNUSED:g}%",
        help="repack a pack when the unused share of its bytes is above LIMIT, a percentage with "
        "its percent sign; 'unlimited' never repacks and only deletes packs nothing uses "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--max-repack-size",
        metavar="SIZE",
        help="copy at most SIZE bytes of blobs when repacking (k, m, g, t suffixes); the packs with "
        "the largest unused share go first",
    )
    g.add_argument(
        "--full",
        action="store_true",
        help="walk every snapshot instead of trusting valid packindex files",
    )


def prune_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_unused": parse_max_unused(args.max_unused),
        "max_repack_bytes": parse_size(args.max_repack_size) if args.max_repack_size else None,
        "use_packindex": not args.full,
    }


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "prune",
        help="delete data no snapshot needs; repack partly used packs",
        description=__doc__,
    )
    p.add_argument(
        "-n", "--dry-run", action="store_true", help="only print what would be deleted and copied"
    )
    add_prune_options(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace, out: Output) -> int:
    options = prune_options(args)
    repo = open_vault(args)
    # Prune reads and plans while the lock's second check runs, and confirms it before writing.
    with (
        repo.locks.acquire_unconfirmed(exclusive=not args.dry_run) as lock,
        StagedProgress(out) as bar,
    ):
        report = prune(
            repo,
            dry_run=args.dry_run,
            on_stage=bar.stage,
            on_advance=bar.advance,
            confirm_lock=lock.confirm,
            **options,
        )
    if out.json:
        out.emit(prune_json(report))
    else:
        render_prune(report, out)
    return 0


def prune_json(report: PruneReport) -> dict[str, Any]:
    doc: dict[str, Any] = {"message_type": "prune"}
    doc.update(to_jsonable(report))
    return doc


def render_prune(report: PruneReport, out: Output) -> None:
    would = "would " if report.dry_run else ""
    out.line(
        f"{report.snapshots} snapshot(s): walked {report.snapshots_walked}, "
        f"{report.snapshots_trusted} trusted to their packindex files"
    )
    out.line(
        f"used data: {size_text(report.used_bytes)}; unused: "
        f"{size_text(report.unused_bytes_before)} before, {size_text(report.unused_bytes_after)} "
        "after"
    )
    out.line(
        f"{would}delete {len(report.packs_deleted)} unused pack(s) and "
        f"{len(report.packs_unindexed_deleted)} pack(s) no index names; {would}repack "
        f"{len(report.packs_repacked)} pack(s) ({report.blobs_repacked} blobs)"
    )
    if report.index_entries_dropped:
        out.line(
            f"{would}drop index entries of {len(report.index_entries_dropped)} pack(s) missing "
            "from data/"
        )
    out.line(
        f"{would}free {size_text(report.bytes_deleted)} and write "
        f"{size_text(report.bytes_written)}: {size_text(report.bytes_before)} -> "
        f"{size_text(report.bytes_before - report.bytes_deleted + report.bytes_written)}"
    )
    if not report.dry_run:
        out.note(
            f"index: wrote {len(report.index_files_written)} file(s), removed "
            f"{len(report.index_files_removed)}; packindex: wrote {len(report.packindex_written)}, "
            f"removed {len(report.packindex_removed)}; {report.seconds:.1f} s"
        )
