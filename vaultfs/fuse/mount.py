"""Mount a vault read-only with pyfuse3 and trio, and serve it until it is unmounted.

Lifecycle (as s3ql does it): check the mount point, read the index and the snapshot list, then
``pyfuse3.init`` (the mount appears) -> ``trio.run``: one nursery holding the signal watcher, the
read-ahead tasks and ``pyfuse3.main()`` -> ``pyfuse3.close()``. ``fusermount3 -u`` ends ``main()`` by
closing the FUSE session; SIGINT and SIGTERM call ``pyfuse3.terminate()``, after which ``close``
unmounts. Either way ``mount()`` returns normally. ``close`` runs even when serving fails, so the
process never leaves a dead mount behind.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import gc
import logging
import os
import re
import shutil
import signal
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

import pyfuse3
import trio

from vaultfs.errors import NotFoundError, UsageError, VaultError
from vaultfs.fuse.catalog import Catalog
from vaultfs.fuse.fs import VaultOperations
from vaultfs.repo.repository import Repository

MIB = 1024 * 1024
#: The kernel's page cache keeps what was read; this cache only has to bridge the kernel's requests
#: inside one blob and hold the read-ahead, so it stays small.
DEFAULT_CACHE_MIB = 8
#: Kernel read-ahead for the mount, in KiB. The kernel's default of 128 KiB splits a sequential read
#: into 128 KiB requests; 1 MiB requests cost an eighth of the round trips through pyfuse3.
READ_AHEAD_KB = 4096

#: Blocks up to this size come from the heap (restic's largest chunk, 8 MiB, and its stored form).
MALLOC_KEEP = 16 * MIB

#: Allocations between collections of the youngest generation (Python's default is 700).
GC_THRESHOLD = 20_000

log = logging.getLogger("vaultfs.fuse")


class MountError(VaultError):
    """The mount point cannot be used, or the kernel refused the mount."""


@dataclass
class MountOptions:
    """How to mount: see ``vault mount --help`` for each option's meaning.

    ``snapshot`` is ``ID[:PATH]`` (ID may be a unique prefix or ``latest``) to show one folder of one
    snapshot at the root instead of the snapshot listings; ``hosts``/``tags``/``paths`` filter the
    snapshots listed (restic's semantics). ``threads`` bounds the worker threads that read and decrypt.
    """

    allow_other: bool = False
    cache_bytes: int = DEFAULT_CACHE_MIB * MIB
    snapshot: str | None = None
    hosts: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    threads: int = 0
    refresh_interval: float = 3.0
    push_pages: bool = True

    def worker_threads(self) -> int:
        # Reads are CPU-bound (SHA-256, AES, zstd release the GIL): one thread per core keeps every core
        # busy without more threads fighting over memory and the GIL.
        return self.threads or min(8, max(2, os.cpu_count() or 2))


def check_mountpoint(path: str) -> str:
    """The absolute mount point if a vault can be mounted there; MountError (one line) if not."""
    mnt = os.path.abspath(path)
    try:
        st = os.stat(mnt)
        # statvfs always reaches the file system (stat may be answered from the kernel's cache), so
        # a FUSE mount whose process died shows here as ENOTCONN.
        os.statvfs(mnt)
    except FileNotFoundError:
        raise MountError(f"mount point {mnt} does not exist; create the folder first") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise MountError(
                f"{mnt} is a stale FUSE mount (its process is gone); clear it with "
                f"`fusermount3 -uz {mnt}` and mount again"
            ) from None
        raise MountError(f"cannot use mount point {mnt}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mount point {mnt} is not a folder")
    if os.path.ismount(mnt):
        raise MountError(
            f"{mnt} is busy: something is already mounted there; unmount it "
            f"(`fusermount3 -u {mnt}`) or choose another folder"
        )
    try:
        entries = os.listdir(mnt)
    except OSError as exc:
        raise MountError(f"cannot list mount point {mnt}: {exc.strerror}") from None
    if entries:
        raise MountError(f"mount point {mnt} is not empty; mount on an empty folder")
    if not os.path.exists("/dev/fuse"):
        raise MountError(
            "/dev/fuse does not exist: load the fuse kernel module (`modprobe fuse`) or, in a "
            "container, pass the device in (--device /dev/fuse)"
        )
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise MountError("/dev/fuse is not readable and writable for this user; check its mode")
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        raise MountError("fusermount3 is not installed; install fuse3 (apt-get install fuse3)")
    return mnt


def build_operations(repo: Repository, mountpoint: str, options: MountOptions) -> VaultOperations:
    """The Operations for ``options``, with index and snapshots loaded (blocking)."""
    common = {
        "mountpoint": mountpoint,
        "cache_bytes": options.cache_bytes,
        "threads": options.worker_threads(),
        "refresh_interval": options.refresh_interval,
        "push_pages": options.push_pages,
    }
    if options.snapshot is None:
        catalog = Catalog(
            repo,
            hosts=options.hosts or None,
            tags=options.tags or None,
            paths=options.paths or None,
        )
        ops = VaultOperations(repo, catalog=catalog, **common)  # type: ignore[arg-type]
        ops.load_sync()
        return ops
    spec, _, path = options.snapshot.partition(":")
    repo.load_index()
    snap_id, snap = repo.find_snapshot(
        spec or "latest",
        hosts=options.hosts or None,
        tags=options.tags or None,
        paths=options.paths or None,
    )
    node = repo.find_path(snap.tree, path) if path.strip("/") else None
    if node is not None and node.type != "dir":
        raise UsageError(f"{path} in snapshot {snap_id[:8]} is a {node.type}, not a folder")
    if node is not None and node.subtree is None:
        raise NotFoundError(f"folder {path} in snapshot {snap_id[:8]} has no tree recorded")
    return VaultOperations(
        repo,
        root_tree=node.subtree if node is not None else snap.tree,
        root_node=node,
        root_snap=snap,
        **common,  # type: ignore[arg-type]
    )


def mount(
    repo: Repository,
    mountpoint: str,
    options: MountOptions | None = None,
    *,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Mount the vault at ``mountpoint`` and serve it until it is unmounted (blocking).

    ``ready(mountpoint)`` is called once the mount is in place. Tunes the process's garbage collector
    (``gc.freeze``, a higher threshold) for the long run. Returns when ``fusermount3 -u`` (or
    ``umount``) unmounted it, or after SIGINT/SIGTERM unmounted it. Raises MountError for an unusable
    mount point, and any VaultError of reading the index or the snapshots.
    """
    options = options or MountOptions()
    mnt = check_mountpoint(mountpoint)
    one_malloc_arena()
    ops = build_operations(repo, mnt, options)
    _fewer_collections()
    _return_free_memory()
    fuse_options = {"fsname=vaultfs", "subtype=vaultfs", "ro", "default_permissions"}
    if options.allow_other:
        fuse_options.add("allow_other")
    try:
        pyfuse3.init(ops, mnt, fuse_options)
    except RuntimeError as exc:
        raise MountError(
            f"the kernel refused to mount at {mnt} ({exc}); the lines above from libfuse say why"
        ) from None
    try:
        trio.run(_serve, ops, mnt, ready)
    finally:
        pyfuse3.close(unmount=True)
        ops.reader.close()


def one_malloc_arena() -> None:
    """Have glibc serve every thread from one arena, and blob-sized blocks from the heap (a no-op
    without glibc). ``mount`` calls it; a program that starts threads before (the lock refresher of
    ``vault mount``) calls it first, since threads that have allocated already keep their own arena
    and later threads share those.

    By default each worker thread gets an arena of its own, and each keeps the multi-MiB blocks that
    blob decoding passes through: measured on dd of a 320 MiB file, one arena cut the peak RSS from
    about 127 to 111 MB and the CPU time from about 1.0 to 0.85 s. Freed blocks are still reused
    instead of being unmapped, because fresh pages cost more here than the copies themselves.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_arena_max = -8  # from glibc's malloc.h
    mallopt(m_arena_max, 1)
    # Blob-sized blocks (up to MALLOC_KEEP) from the heap, whose freed memory is kept for the next
    # blob, instead of fresh mappings that fault in every page again: dd of a 320 MiB file took
    # 38,000-44,000 page faults instead of 10,000, and about 5-10% more CPU, at the same peak RSS.
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, MALLOC_KEEP)
    mallopt(m_trim_threshold, 2 * MALLOC_KEEP)
    # Measured: with the lock refresher's arena made before this call, the peak RSS of tar over
    # 20,000 files was 104 MB instead of 95 MB.


def _fewer_collections() -> None:
    """Move what loading created (index, snapshots, modules) out of the garbage collector's sight and
    let more objects pile up between collections: a walk over a big snapshot allocates many
    long-lived objects (tree entries, inodes), and each collection of the older generations went
    through all of them again."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)


def _return_free_memory() -> None:
    """Give the memory freed after loading (key derivation, index files) back to the system: the
    mount runs for a long time, and glibc keeps freed heap memory otherwise."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


def _tune_read_ahead(mountpoint: str) -> None:
    """Raise the kernel read-ahead of this mount's backing device (best effort: needs root).

    Only after the kernel has the reply to its INIT request: that reply sets the read-ahead to at most
    what the kernel offered (128 KiB), overwriting anything written before. With 4 MiB the kernel asks
    for 1 MiB per read request (libfuse allows 256 pages), an eighth of the round trips.
    """
    device = _mount_device(mountpoint)
    if device is None:
        return
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as f:
            f.write(str(READ_AHEAD_KB))
    except OSError as exc:
        log.debug("cannot raise the read-ahead of %s: %s", mountpoint, exc)


def _mount_device(mountpoint: str) -> str | None:
    """``major:minor`` of the file system mounted at ``mountpoint``, from /proc/self/mountinfo."""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    wanted = os.fsencode(mountpoint)
    device = None
    for line in lines:
        fields = line.split()
        if len(fields) < 5:
            continue
        # mountinfo writes space, tab, newline and backslash in paths as octal escapes (\040 ...)
        path = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4])
        if path == wanted:
            device = fields[2].decode()  # the last match is the mount on top
    return device


async def _serve(
    ops: VaultOperations, mountpoint: str, ready: Callable[[str], None] | None
) -> None:
    async with trio.open_nursery() as nursery:
        ops.reader.nursery = nursery
        if ops.pusher is not None:
            ops.pusher.nursery = nursery
        nursery.start_soon(_unmount_on_signal, ops)
        # init() runs while libfuse handles INIT; the task runs once the reply has been written.
        ops.on_init = functools.partial(nursery.start_soon, _tune_after_init, mountpoint)
        if ready is not None:
            ready(mountpoint)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _tune_after_init(mountpoint: str) -> None:
    _tune_read_ahead(mountpoint)


async def _unmount_on_signal(ops: VaultOperations) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            if ops.pusher is not None:
                # A page store may wait for a read request to be answered: finish them while
                # requests are still being served.
                await ops.pusher.close()
            # main() returns; close() in mount() then unmounts.
            pyfuse3.terminate()
            return
