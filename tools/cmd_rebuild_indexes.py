"""vault rebuild-indexes: write a fresh, complete index from the pack headers.

Takes the vault's exclusive lock, reads the header at the end of every pack in data/, writes new index
files that list every blob of every readable pack, and only then removes the old index files (a crash
leaves the vault usable; run the command again). Packs that no index named are added; index entries
whose pack is gone disappear. Packs whose header cannot be read are left out and listed (`vault repair`
salvages their readable blobs). With --read-all-packs whole packs are read and only blobs that decrypt
and hash right are indexed.

Exit status 0 when every pack was indexed, 1 when some packs or blobs had to be left out.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from vaultfs.tools.cmd_deep_verify import StagedProgress, open_vault
from vaultfs.tools.common import Output, locked, to_jsonable

if TYPE_CHECKING:
    from vaultfs.ops.rebuild import RebuildReport


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "rebuild-indexes",
        help="write a fresh index from the pack headers",
        description=__doc__,
    )
    p.add_argument(
        "--read-all-packs",
        action="store_true",
        help="read whole packs and index only blobs that decrypt and hash right (reads the whole "
        "vault)",
    )
    p.add_argument(
        "--packindex",
        action="store_true",
        help="also rewrite the packindex/ files (one per snapshot: the packs it needs); this walks "
        "every snapshot's trees",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace, out: Output) -> int:
    from vaultfs.ops.rebuild import rebuild_indexes  # here: every command imports this module

    repo = open_vault(args)
    with locked(repo, exclusive=True), StagedProgress(out) as bar:
        report = rebuild_indexes(
            repo,
            read_all_packs=args.read_all_packs,
            packindex=args.packindex,
            on_stage=bar.stage,
            on_advance=bar.advance,
        )
    ok = not report.packs_unreadable and not report.blobs_dropped
    if out.json:
        doc = {"message_type": "rebuild-indexes", "ok": ok}
        doc.update(to_jsonable(report))
        out.emit(doc)
    else:
        render(report, out)
    return 0 if ok else 1


def render(report: RebuildReport, out: Output) -> None:
    out.line(
        f"indexed {report.blobs} blob(s) in {report.packs} pack(s): wrote "
        f"{len(report.index_files_written)} index file(s), removed {len(report.index_files_removed)}"
        f" old one(s) in {report.seconds:.1f} s"
    )
    if report.packs_added:
        out.line(f"{len(report.packs_added)} pack(s) were in no index before:")
        for pack in report.packs_added:
            out.line(f"  {pack}")
    if report.packs_dropped:
        out.line(f"{len(report.packs_dropped)} pack(s) the old index named are gone from data/:")
        for pack in report.packs_dropped:
            out.line(f"  {pack}")
    if report.old_index_unreadable:
        out.line(f"{len(report.old_index_unreadable)} old index file(s) were unreadable (removed)")
    for bad in report.packs_unreadable:
        out.line(f"left out pack {bad.id}: {bad.reason}")
    for blob in report.blobs_dropped:
        out.line(f"left out blob {blob}: it does not decrypt or hash right")
    if report.packs_unreadable or report.blobs_dropped:
        out.line("`vault repair` salvages what is readable and deals with affected snapshots")
    if report.packindex_written or report.packindex_removed:
        out.line(
            f"packindex: wrote {len(report.packindex_written)}, removed "
            f"{len(report.packindex_removed)}"
            + (
                f", skipped {len(report.packindex_skipped)} damaged snapshot(s)"
                if report.packindex_skipped
                else ""
            )
        )
