"""vault snapshots: list the snapshots of a vault, oldest first, optionally filtered by host, tag and path."""

from __future__ import annotations

import argparse

from vaultfs.repo.repository import filter_snapshots
from vaultfs.tools.common import Output, add_snapshot_filters, open_repository, snapshot_json


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("snapshots", help="list snapshots", description=__doc__)
    add_snapshot_filters(p)
    p.add_argument(
        "--latest", type=int, metavar="N", help="only the N newest snapshots (after filtering)"
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace, out: Output) -> int:
    repo = open_repository(args)
    problems: list[str] = []
    snaps = repo.list_snapshots(on_error=lambda exc: problems.append(str(exc)))
    snaps = filter_snapshots(snaps, hosts=args.host, tags=args.tag, paths=args.path)
    if args.latest is not None:
        snaps = snaps[-args.latest :] if args.latest > 0 else []
    for problem in problems:
        out.warn(f"skipped an unreadable snapshot: {problem}")
    if out.json:
        out.emit([snapshot_json(sid, snap) for sid, snap in snaps])
    else:
        rows = [
            [
                sid[:8],
                snap.time.format()[:19].replace("T", " "),
                snap.hostname,
                ",".join(snap.tags),
                "\n".join(snap.paths) if out.console.is_terminal else ",".join(snap.paths),
            ]
            for sid, snap in snaps
        ]
        out.table(["ID", "Time", "Host", "Tags", "Paths"], rows)
        out.note(f"{len(snaps)} snapshot{'s' if len(snaps) != 1 else ''}")
    return 1 if problems else 0
