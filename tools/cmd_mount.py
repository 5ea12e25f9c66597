"""vault mount: browse the vault's snapshots as a read-only folder (FUSE).

The mount point must be an existing, empty folder. Its root holds:

  snapshots/<time>/        every snapshot, named by its time (2024-02-03T04:05:06+01:00)
  hosts/<host>/<time>/     the snapshots of each host
  tags/<tag>/<time>/       the snapshots carrying each tag
  ids/<short id>/          every snapshot, named by the first 8 characters of its ID

and each of these listings has a 'latest' symlink to its newest snapshot. Names that collide get a
suffix (-1, -2, ...). Snapshots that a backup adds while the vault is mounted appear within a few
seconds, without remounting. With --snapshot ID[:PATH] the root shows that one snapshot (or the folder
PATH inside it) instead. --host, --tag and --path limit which snapshots are listed.

Files show the size, mode, owner, times, symlink target, hardlinks (one inode number, the recorded link
count) and extended attributes that the backup recorded. Data is read on demand, only the blocks a read
needs, each checked against its hash; a damaged or missing pack makes the reads that need it fail with
an I/O error (reported once per file on stderr) while everything else stays readable. Reads of a part
that could not be read fail at once for 5 seconds; after that it is tried again, so a pack put back
(copied from another copy of the vault) is read without remounting.

Programs that read whole folders (tar, cp -r, rsync) open files in listing order, so the small files
that follow an opened one are fetched ahead, a few MiB at a time. For a remote vault (rest:) that goes
on into the folders that follow, in the order those programs visit them, so that a folder of small
files does not cost a request, and a round trip, of its own.

The command runs in the foreground until the folder is unmounted: with `fusermount3 -u MOUNTPOINT`
(or `umount`), Ctrl-C or SIGTERM, after which it exits with status 0. It holds a shared lock on the
vault while mounted, so prune cannot delete data the mount may still read (--no-lock skips that).
"""

from __future__ import annotations

import argparse
import logging
import sys

from vaultfs.errors import UsageError
from vaultfs.fuse.mount import (
    DEFAULT_CACHE_MIB,
    MIB,
    MountOptions,
    check_mountpoint,
    mount,
    one_malloc_arena,
)
from vaultfs.tools.common import Output, add_snapshot_filters, locked, open_repository


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "mount",
        help="mount the vault's snapshots as a read-only folder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing, empty folder")
    p.add_argument(
        "--snapshot",
        metavar="ID[:PATH]",
        help="show only this snapshot (ID, unique ID prefix or 'latest'), or only the folder PATH "
        "inside it, at the root of the mount",
    )
    p.add_argument(
        "--allow-other",
        action="store_true",
        help="let other users access the mount (for non-root users this needs user_allow_other "
        "in /etc/fuse.conf); permissions recorded in the snapshot are enforced",
    )
    p.add_argument(
        "--cache-size",
        type=int,
        default=DEFAULT_CACHE_MIB,
        metavar="MIB",
        help=f"MiB of decrypted data kept in memory for reads (default {DEFAULT_CACHE_MIB}, "
        "minimum 8); the kernel's page cache comes on top",
    )
    p.add_argument(
        "--foreground",
        action="store_true",
        help="stay in the foreground until unmounted (the default and only mode; accepted for "
        "scripts written for other FUSE tools)",
    )
    p.add_argument(
        "--no-lock",
        action="store_true",
        help="do not hold a shared lock on the vault while mounted (for read-only media; prune "
        "may then delete data the mount is reading)",
    )
    add_snapshot_filters(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace, out: Output) -> int:
    if args.cache_size < 0:
        raise UsageError("--cache-size must be a positive number of MiB")
    # Checked before asking for the password and reading the index, so a wrong folder fails fast.
    mountpoint = check_mountpoint(args.mountpoint)
    one_malloc_arena()  # before any thread (the lock's refresher) allocates
    _log_to_stderr()
    options = MountOptions(
        allow_other=args.allow_other,
        cache_bytes=args.cache_size * MIB,
        snapshot=args.snapshot,
        hosts=args.host or [],
        tags=args.tag or [],
        paths=args.path or [],
    )
    repo = open_repository(args)

    def ready(mnt: str) -> None:
        if out.json:
            out.emit_line({"message_type": "mounted", "mountpoint": mnt})
        else:
            out.note(f"vault mounted at {mnt}; unmount with `fusermount3 -u {mnt}` or Ctrl-C")

    if args.no_lock:
        mount(repo, mountpoint, options, ready=ready)
    else:
        with locked(repo):
            mount(repo, mountpoint, options, ready=ready)
    if out.json:
        out.emit_line({"message_type": "unmounted", "mountpoint": mountpoint})
    else:
        out.note(f"unmounted {mountpoint}")
    return 0


def _log_to_stderr() -> None:
    """Read errors (damaged packs) and skipped snapshots are logged by vaultfs.fuse; show them."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vault mount: %(levelname)s: %(message)s"))
    logger = logging.getLogger("vaultfs.fuse")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
