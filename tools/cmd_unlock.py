"""vault unlock: remove stale locks (older than 30 minutes, or left by a dead process on this host)."""

from __future__ import annotations

import argparse

from vaultfs.tools.common import Output, open_repository


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("unlock", help="remove stale locks", description=__doc__)
    p.add_argument(
        "--remove-all",
        action="store_true",
        help="remove every lock, also those of running processes (only when you are sure none runs)",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace, out: Output) -> int:
    repo = open_repository(args)
    removed = repo.locks.remove_stale(remove_all=args.remove_all)
    if out.json:
        out.emit({"removed": removed})
    else:
        out.line(f"removed {len(removed)} lock{'s' if len(removed) != 1 else ''}")
    return 0
