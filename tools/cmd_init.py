"""vault init: create a new vault (restic repository format, version 2 unless told otherwise)."""

from __future__ import annotations

import argparse

from vaultfs.backend import open_backend
from vaultfs.repo.repository import Repository
from vaultfs.tools.common import Output, location, read_password


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("init", help="create a new vault", description=__doc__)
    p.add_argument(
        "--repository-version",
        type=int,
        choices=(1, 2),
        default=2,
        help="format version: 2 (compression, restic >= 0.14) or 1 (uncompressed, any restic); default 2",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace, out: Output) -> int:
    backend = open_backend(location(args))
    password = read_password(args, prompt="enter password for the new vault: ", confirm=True)
    repo = Repository.init(backend, password, version=args.repository_version)
    if out.json:
        out.emit(
            {
                "message_type": "initialized",
                "id": repo.id,
                "repository": str(backend),
                "version": repo.version,
            }
        )
    elif not out.quiet:
        out.line(f"created vault {repo.id[:10]} (version {repo.version}) at {backend}")
        out.note("keep the password safe: losing it means the data in the vault is lost")
    return 0
