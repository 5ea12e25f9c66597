"""vault merge: copy every snapshot of another vault with the same master key into this one.

The reverse of `vault split`: the vault at --from must share this vault's master key and chunker
polynomial (vaults made from one another by split do); vaults with different keys are refused with a
message saying so, since no stored byte could be shared. Blobs this vault already has are not copied;
packs whose every blob is new here are copied as files, the new blobs of other packs into new packs;
snapshot files are copied byte for byte (same IDs; snapshots already here are skipped). The other vault
is only read.

The other vault is opened with this vault's password unless --from-password-file is given. Both vaults
get a shared lock. Writes go packs, index, snapshots, so an interrupted merge leaves a valid vault and
running it again finishes the job.

Exit status 0 on success, 1 on failure (different keys, missing data in the other vault), 12 when the
password does not open the other vault.
"""

from __future__ import annotations

import argparse
from typing import Any

from vaultfs.backend import open_backend
from vaultfs.ops.merge import MergeReport, merge, open_source
from vaultfs.tools.cmd_deep_verify import StagedProgress, open_vault
from vaultfs.tools.cmd_split import add_copy_options, check_workers, other_password, render_copy
from vaultfs.tools.common import Output, locked, read_password, to_jsonable


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "merge",
        help="copy the snapshots of a vault with the same master key into this one",
        description=__doc__,
    )
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="LOCATION",
        help="the vault to copy from: a folder or rest:http://host:port/path/",
    )
    p.add_argument(
        "--from-password-file",
        metavar="FILE",
        help="password of the vault at --from (default: this vault's password)",
    )
    add_copy_options(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace, out: Output) -> int:
    check_workers(args)
    repo = open_vault(args)
    backend = open_backend(args.source)
    try:
        src = open_source(backend, other_password(args.from_password_file, read_password(args)))
        with locked(repo), locked(src), StagedProgress(out) as bar:
            report = merge(
                repo,
                src,
                dry_run=args.dry_run,
                workers=args.workers,
                on_stage=bar.stage,
                on_advance=bar.advance,
            )
    finally:
        backend.close()
    for problem in report.unreadable:
        out.warn(f"skipped an unreadable snapshot of {report.source}: {problem}")
    if out.json:
        doc: dict[str, Any] = {"message_type": "merge"}
        doc.update(to_jsonable(report))
        out.emit(doc)
    else:
        render_merge(report, out)
    return 1 if report.unreadable else 0


def render_merge(report: MergeReport, out: Output) -> None:
    out.line(f"{report.snapshots} snapshot(s) in {report.source}")
    render_copy(report.copy, out, report.dry_run)
