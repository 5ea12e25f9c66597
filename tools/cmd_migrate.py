"""vault migrate: copy every file of this vault to another location, keys unchanged.

Copies data, index, snapshots, packindex and key files and the config to --to (a folder, or
rest:http://host:port/path/), several files at a time, checking each file's SHA-256 against its name as
it is read, before it is written. Nothing is decrypted or re-encrypted: the copy opens with the same
passwords. The config is written last, so the target becomes a vault only when everything is there.

Resuming: run the same command again after an interruption (even kill -9): files already at the target
with the right name and size are hash-checked there and skipped. A target that holds another vault is
refused. Use it for a "seed load": migrate to a USB disk, carry it to the server, migrate from it.

--verify re-reads the whole target afterwards (every file against its hash, nothing missing).
--delete-source verifies and then, only when the copy is complete and correct, deletes the files of
this vault (snapshots first, config last). Locks: shared, exclusive with --delete-source. Files a
backup adds while migrate runs are copied by the next run.

Exit status 0 when the copy is complete (and verified, when asked), 1 when source files were damaged or
the verification failed (the source is then never deleted), 2 for bad options.
"""

from __future__ import annotations

import argparse
from typing import Any

from vaultfs.backend import open_backend
from vaultfs.errors import UsageError
from vaultfs.ops.migrate import DEFAULT_WORKERS, MigrateReport, migrate
from vaultfs.tools.cmd_deep_verify import StagedProgress, open_vault, size_text
from vaultfs.tools.common import Output, to_jsonable

SHOW_PROBLEMS = 20


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "migrate",
        help="copy every file of the vault to another location (hash-checked, resumable)",
        description=__doc__,
    )
    p.add_argument(
        "--to",
        required=True,
        metavar="LOCATION",
        help="where the copy goes: a folder or rest:http://host:port/path/ (empty, or an "
        "unfinished copy of this vault)",
    )
    p.add_argument(
        "--verify", action="store_true", help="afterwards re-read every file of the copy"
    )
    p.add_argument(
        "--delete-source",
        action="store_true",
        help="after the copy verified, delete this vault's files (implies --verify)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        metavar="N",
        help="files copied at the same time (default: %(default)s)",
    )
    p.add_argument("-n", "--dry-run", action="store_true", help="only print what would be copied")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace, out: Output) -> int:
    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    if args.delete_source and args.dry_run:
        raise UsageError("--delete-source and --dry-run do not go together")
    repo = open_vault(args)
    target = open_backend(args.to)
    if args.delete_source:
        lock = repo.lock(exclusive=True)
    else:
        # Only reads this vault: the lock's second check runs while the first files are copied
        # and must pass before the copy gets its config (migrate's confirm), not as a wait first.
        lock = repo.locks.acquire_unconfirmed(exclusive=False)
    try:
        with StagedProgress(out) as bar:
            report = migrate(
                repo.backend,
                target,
                verify=args.verify,
                delete_source=args.delete_source,
                dry_run=args.dry_run,
                workers=args.workers,
                on_stage=bar.stage,
                on_advance=bar.advance,
                confirm=lock.confirm,
            )
    finally:
        lock.release()
        target.close()
    if out.json:
        doc: dict[str, Any] = {"message_type": "migrate", "ok": report.ok}
        doc.update(to_jsonable(report))
        out.emit(doc)
    else:
        render(report, out)
    return 0 if report.ok else 1


def render(report: MigrateReport, out: Output) -> None:
    would = "would " if report.dry_run else ""
    out.line(
        f"{report.files} file(s), {size_text(report.bytes)}: {would}copy {report.copied} "
        f"({size_text(report.bytes_copied)}), {report.skipped} already at the target"
        + (f", {report.replaced} replaced" if report.replaced else "")
    )
    if report.corrupt:
        out.line(
            f"{len(report.corrupt)} file(s) of this vault are damaged and were not copied; the "
            "copy got no config. Run `vault deep-verify` and `vault repair` here, then migrate again:"
        )
        for path in report.corrupt[:SHOW_PROBLEMS]:
            out.line(f"  {path}")
    if report.verified is not None:
        if report.verified:
            out.line(f"verified the copy at {report.target}")
        else:
            out.line(f"the copy at {report.target} did not verify:")
            for problem in report.problems[:SHOW_PROBLEMS]:
                out.line(f"  {problem}")
    if report.source_deleted:
        out.line(f"deleted the vault at {report.source}")
    out.note(f"{report.seconds:.1f} s")
