"""vault verify: check every file of a vault against its name (SHA-256), without the password.

Works on any folder in the vault layout (a vault, a copy on a USB disk, a bucket folder on a NAS) and on
any backend. The config file is skipped (it is not named by its hash); leftover temp files of interrupted
writes are listed apart, not as damage. A file whose hash does not match is read a second time before it
is reported. Each damaged file is shown with its folder and what its damage means for the vault.

Exit status 0 when every file checked is intact, 1 when a file is damaged, unreadable or out of place,
or when config or every key file is missing.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from vaultfs.backend import open_backend
from vaultfs.errors import UsageError
from vaultfs.tools.common import Output, option, to_jsonable

if TYPE_CHECKING:
    from vaultfs.ops.verify import VerifyReport


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "verify", help="check every vault file against its hash (no password)", description=__doc__
    )
    p.add_argument(
        "location",
        nargs="?",
        metavar="LOCATION",
        help="the vault: a folder or any backend location (default: -r/--repo or VAULT_REPOSITORY)",
    )
    p.add_argument(
        "--state",
        metavar="FILE",
        help="record what was verified and when in FILE (JSON, or SQLite when FILE ends in .db, "
        ".sqlite or .sqlite3); an interrupted run resumes where it stopped",
    )
    p.add_argument(
        "--max-age",
        metavar="AGE",
        help="with --state: skip files verified successfully less than AGE ago (e.g. 30d, 12h, 2w)",
    )
    p.add_argument(
        "--subset",
        metavar="N/T",
        help="check only slice N of T (a stable split by file name); with N the day of the week "
        "and T 7, each file is checked once a week",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="files hashed at the same time (default: the number of cores plus one)",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace, out: Output) -> int:
    # Imported here: every `vault` command imports this module to build its parser.
    from vaultfs.ops.verify import Subset, parse_duration, verify

    loc = args.location or option(args, "repo", "VAULT_REPOSITORY")
    if not loc:
        raise UsageError("no vault given: name a LOCATION, use -r/--repo or set VAULT_REPOSITORY")
    if args.max_age and not args.state:
        raise UsageError("--max-age needs --state FILE (it is where verification times are kept)")
    if args.workers is not None and args.workers < 1:
        raise UsageError("--workers must be at least 1")
    max_age = parse_duration(args.max_age) if args.max_age else None
    subset = Subset.parse(args.subset, allow_percent=False) if args.subset else None
    backend = open_backend(loc)
    with out.progress("verifying", None, unit="bytes") as bar:
        report = verify(
            backend,
            state_path=args.state,
            max_age=max_age,
            subset=subset,
            workers=args.workers,
            progress=bar.advance,
            on_total=lambda _files, total: bar.update(total=total),
        )
    if out.json:
        doc = {"message_type": "verify", "ok": report.ok}
        doc.update(to_jsonable(report))
        out.emit(doc)
    else:
        render(report, out)
    return 0 if report.ok else 1


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render(report: VerifyReport, out: Output) -> None:
    speed = report.bytes_checked / report.seconds if report.seconds else 0
    line = (
        f"checked {report.files_checked} files ({_size(report.bytes_checked)}) in "
        f"{report.seconds:.1f} s ({_size(speed)}/s)"
    )
    if report.files_skipped:
        line += f", skipped {report.files_skipped} (recently verified or outside the subset)"
    if report.resumed:
        line += ", resumed an interrupted run"
    out.line(line)
    for text in report.fatal:
        out.line(f"FATAL: {text}")
    if report.bad:
        out.line(f"{len(report.bad)} damaged or unexpected file(s):")
        out.table(
            ["file", "problem", "consequence"],
            [[b.path, b.problem, b.consequence] for b in report.bad],
        )
    if report.gone_since_last_run:
        out.line(f"{len(report.gone_since_last_run)} file(s) gone since the last run:")
        out.table(
            ["file", "consequence"], [[g.path, g.consequence] for g in report.gone_since_last_run]
        )
    if report.flaky:
        out.line(
            f"{len(report.flaky)} file(s) read wrong once and right the second time "
            "(check the disk, its cable and the RAM):"
        )
        for path in report.flaky:
            out.line(f"  {path}")
    if report.temp_files:
        out.line(
            f"{len(report.temp_files)} leftover temp file(s) of interrupted writes "
            "(not damage; `vault repair` removes them):"
        )
        for path in report.temp_files:
            out.line(f"  {path}")
    if report.ok:
        out.line("no damage found")
