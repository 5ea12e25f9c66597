"""Bucket storage on one or more volumes (spanning), in the vault layout, so rsync and `vault verify` work
on a bucket folder directly.

A bucket is the folder ``<volume>/<bucket>/`` holding ``config``, ``keys/``, ``data/XX/``, ``index/``,
``snapshots/``, ``locks/`` and ``packindex/``, exactly as a local vault. With several volumes a bucket's
files may be spread over all of them: reads look in every volume, listings merge them, new files go to the
volume with the most free space. An administrator may move files between volumes while the server runs as
long as each move makes the file appear complete under its final name (``mv`` within a file system,
``rsync --remove-source-files``, which renames a temp file into place): a reader that misses the file in
one volume looks again, and an open file stays readable after it moved.

Uploads are written to ``<name>-tmp-<random>`` beside their final place (the local backend's temp mark, so
listings and `vault verify` treat them alike), hashed while written, fsynced, made read-only and linked
into place only if no volume holds that name yet: the link is the no-overwrite guarantee, a folder fsync
makes it durable. An upload of at least one buffer (1 MiB) is written with O_DIRECT, a whole aligned
buffer at a time (by a writer thread, while the next buffer fills), its tail through the page cache: the bytes go from the buffer they were received into
straight to the disk, without a copy into fresh page-cache pages (the largest share of the server's CPU
per uploaded byte besides the hash) and without writeback work later; the fsync still makes it durable.

A server killed mid-upload (kill -9, power loss) leaves its temp file behind, with the space reserved for
the announced length. ``sweep_temp_sync`` removes temp files nobody wrote to for a while: a live upload is
written to at least every ``read_timeout`` (else it is dropped), a local vault client's temp file is written
without pause and renamed within seconds.

Every method that touches the disk ends in ``_sync``: trio code calls them through worker threads.
Paths are built only from validated kinds and names (see ``object_path``); nothing here trusts a request.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import re
import secrets
import shutil
import stat
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from vaultfs.backend.local import TEMP_MARK, preallocate, start_writeback

#: Uploads ask the kernel to start writing to disk after each this many bytes (start_writeback).
WRITEBACK_STEP = 1 << 20
#: Size of an upload's receive buffer (see ``upload_buffer``), and so of each O_DIRECT write.
UPLOAD_BUFFER = 1 << 20
OBJECT_KINDS = ("keys", "data", "index", "snapshots", "locks", "packindex")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")


class StorageError(Exception):
    """A disk problem while serving a request; ``status`` is the HTTP answer (507 full, else 500)."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


class ObjectExists(Exception):
    """The object is already stored (in some volume): objects are written once."""


def _oserror(action: str, exc: OSError) -> StorageError:
    # The message goes to the log only; clients see the status and a generic text.
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"{action}: disk full", 507)
    return StorageError(f"{action}: {exc}")


def object_path(kind: str, name: str) -> str:
    """Path of an object relative to its bucket folder. ``kind``/``name`` must be validated already."""
    if kind == "config":
        return "config"
    if kind not in OBJECT_KINDS or not _HEX64.match(name):
        raise ValueError(f"unvalidated object {kind}/{name}")
    if kind == "data":
        return os.path.join("data", name[:2], name)
    return os.path.join(kind, name)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class VolumeUsage:
    path: str
    total: int
    free: int
    stored: int  # bytes of bucket files in this volume
    files: int
    online: bool


def upload_buffer() -> mmap.mmap:
    """A receive buffer for ``Upload``: page-aligned (anonymous mmap), as O_DIRECT writes need."""
    return mmap.mmap(-1, UPLOAD_BUFFER)


#: Writes full O_DIRECT buffers while the upload's thread receives into its other buffer (a direct
#: write waits for the disk). Threads start on first use.
_WRITER = ThreadPoolExecutor(max_workers=8, thread_name_prefix="vault-upload-write")


class Upload:
    """One upload in progress: a temp file that is hashed while written. One owner thread at a time.

    The body arrives either as pieces (``write_one_sync``) or straight into the upload's buffer
    (``space``, then ``filled_sync``: no copy between the socket and the disk). With O_DIRECT
    (``direct``) a full buffer is written by a writer thread while the body goes on into the other
    buffer (at most one write in flight, so the file grows in order), the rest by ``finish_sync``;
    otherwise each piece is written as it comes.
    """

    #: False once a file system refused O_DIRECT: later uploads write through the page cache.
    direct_ok = True

    def __init__(
        self,
        bucket_dir: str,
        kind: str,
        name: str,
        size: int = 0,
        buffers: tuple[mmap.mmap, mmap.mmap] | None = None,
        *,
        hashed: bool = True,
    ) -> None:
        """``size``: the announced length, preallocated when known (0: unknown). ``buffers``: two
        from ``upload_buffer`` (the caller keeps them until the upload is finished or aborted);
        O_DIRECT is used when they are given and the announced body fills one at least once.
        ``hashed``: whether to compute ``hash`` (SHA-256 of the body; None when not hashed)."""
        self.final = os.path.join(bucket_dir, object_path(kind, name))
        self.folder = os.path.dirname(self.final)
        self.tmp = f"{self.final}{TEMP_MARK}{secrets.token_hex(8)}"
        self.size = 0
        self._written_back = 0
        self.hash = hashlib.sha256() if hashed else None
        self._buffers = [memoryview(b) for b in buffers or (bytearray(64 << 10),)]
        self._buffer = self._buffers[0]
        self._filled = 0  # bytes of the buffer waiting for an O_DIRECT write
        self._pending: Future[None] | None = None  # the write of the other buffer
        self.direct = buffers is not None and size >= len(self._buffer) and Upload.direct_ok
        self._fd_direct = self.direct  # whether the descriptor still has O_DIRECT
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            try:
                self.fd = self._create(flags)
            except FileNotFoundError:
                os.makedirs(self.folder, mode=0o700, exist_ok=True)
                self.fd = self._create(flags)
        except OSError as exc:
            raise _oserror("create upload file", exc) from None
        self.open = True
        try:
            preallocate(self.fd, size)
        except OSError as exc:
            self.abort_sync()
            raise _oserror("reserve space for the upload", exc) from None

    def _create(self, flags: int) -> int:
        if self.direct:
            try:
                return os.open(self.tmp, flags | os.O_DIRECT, 0o600)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # This file system has no O_DIRECT.
                Upload.direct_ok = self.direct = self._fd_direct = False
        return os.open(self.tmp, flags, 0o600)

    def write_sync(self, pieces: list[bytes | memoryview]) -> None:
        for piece in pieces:
            self.write_one_sync(piece)

    def write_one_sync(self, piece: bytes | memoryview) -> None:
        """Hash and append one piece (copied into the buffer first with O_DIRECT)."""
        if not self.direct:
            if self.hash is not None:
                self.hash.update(piece)
            self._write_sync(piece)
            return
        view = memoryview(piece)
        while view:
            space = self.space()
            n = min(len(space), len(view))
            space[:n] = view[:n]
            self.filled_sync(n)
            view = view[n:]

    def space(self) -> memoryview:
        """Where the next body bytes go (never empty); report them with ``filled_sync``."""
        return self._buffer[self._filled :]

    def filled_sync(self, n: int) -> None:
        """``n`` bytes were put at the start of the last ``space()``: hash them (while they are in
        the CPU cache) and write them, or with O_DIRECT hand the buffer to a writer once it is full."""
        piece = self._buffer[self._filled : self._filled + n]
        if self.hash is not None:
            self.hash.update(piece)
        if not self.direct:
            self._write_sync(piece)
            return
        self._filled += n
        if self._filled == len(self._buffer):
            self._wait_sync()  # the other buffer is free again
            self._pending = _WRITER.submit(self._write_sync, self._buffer)
            self._buffers.reverse()
            self._buffer, self._filled = self._buffers[0], 0

    def _wait_sync(self) -> None:
        """Wait for the write in flight; raises what it raised."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _write_sync(self, piece: bytes | memoryview) -> None:
        """Append ``piece``; writeback starts for each WRITEBACK_STEP written through the cache."""
        view = memoryview(piece)
        try:
            while view:
                try:
                    n = os.write(self.fd, view)
                except OSError as exc:
                    if exc.errno != errno.EINVAL or not self._fd_direct:
                        raise
                    # The file system took O_DIRECT at open but refuses the write: carry on (and
                    # go on later) through the page cache.
                    Upload.direct_ok = False
                    self._leave_direct()
                    continue
                view = view[n:]
            self.size += len(piece)
            if not self._fd_direct and self.size - self._written_back >= WRITEBACK_STEP:
                start_writeback(self.fd, self._written_back, self.size - self._written_back)
                self._written_back = self.size
        except OSError as exc:
            raise _oserror("write upload", exc) from None

    def _leave_direct(self) -> None:
        """Drop O_DIRECT from the descriptor: later writes go through the page cache."""
        if self._fd_direct:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            self._fd_direct = False
            self._written_back = self.size

    def finish_sync(self) -> None:
        """Write what the buffers still hold, fsync and close the temp file and make it read-only
        (before the commit)."""
        self._wait_sync()
        try:
            if self.direct:
                tail, self._filled = self._buffer[: self._filled], 0
                self._leave_direct()  # a tail shorter than a block cannot be written directly
                if tail:
                    self._write_sync(tail)
            os.fsync(self.fd)
            os.close(self.fd)
            self.open = False
            os.chmod(self.tmp, 0o400)
        except OSError as exc:
            raise _oserror("finish upload", exc) from None

    def abort_sync(self) -> None:
        """Remove the temp file; safe to call more than once and after a commit."""
        try:
            self._wait_sync()  # never close the descriptor under a write in flight
        except Exception:  # noqa: BLE001 - the upload is being dropped; its failure was answered
            pass
        if self.open:
            self.open = False
            try:
                os.close(self.fd)
            except OSError:
                pass
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass
        except OSError:
            pass  # nothing more to do; list_temp/verify report leftovers


class OpenObjects:
    """Objects read recently, kept open so that a small range read needs neither a path lookup nor a
    worker thread: objects are written once, so an open descriptor keeps serving the right bytes.

    Validity: an entry whose file has no name left (``st_nlink == 0``: deleted, or replaced through a
    rename by an administrator), or whose size changed (rewritten in place), is dropped on its next use
    and the caller opens the object again, so nothing deleted behind the server's back is served and
    no answer is cut short. A file moved to another volume keeps its inode and stays valid. The server
    drops an entry when it deletes the object itself.

    Descriptors never leave the trio thread that owns this cache: work handed to a worker thread uses
    ``os.dup`` of one, so an eviction cannot close a descriptor in use. Not thread-safe.
    """

    def __init__(self, capacity: int = 128) -> None:
        self.capacity = capacity
        self._open: OrderedDict[tuple[str, str, str], tuple[int, int]] = OrderedDict()

    def get(self, key: tuple[str, str, str]) -> tuple[int, int] | None:
        """(fd, size) of a still valid entry, else None."""
        found = self._open.get(key)
        if found is None:
            return None
        try:
            st = os.fstat(found[0])
            valid = st.st_nlink > 0 and st.st_size == found[1]
        except OSError:
            valid = False
        if not valid:
            self.drop(key)
            return None
        self._open.move_to_end(key)
        return found

    def put(self, key: tuple[str, str, str], fd: int, size: int) -> None:
        self.drop(key)
        self._open[key] = (fd, size)
        while len(self._open) > self.capacity:
            _key, (old, _size) = self._open.popitem(last=False)
            os.close(old)

    def drop(self, key: tuple[str, str, str]) -> None:
        found = self._open.pop(key, None)
        if found is not None:
            os.close(found[0])

    def close(self) -> None:
        while self._open:
            _key, (fd, _size) = self._open.popitem()
            os.close(fd)


_nowait = hasattr(os, "RWF_NOWAIT")


def read_cached(fd: int, offset: int, length: int) -> bytearray | None:
    """The bytes if the page cache holds all of them (so the event loop never waits for a disk),
    else None: the caller reads in a worker thread instead."""
    global _nowait
    if not _nowait:
        return None
    buffer = bytearray(length)
    try:
        n = os.preadv(fd, [buffer], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            _nowait = False  # this kernel or file system cannot tell: always use workers
            return None
        raise _oserror("read", exc) from None
    return buffer if n == length else None


def read_close_sync(fd: int, offset: int, length: int) -> bytes:
    """pread, then close ``fd`` (a duplicate handed to a worker thread)."""
    try:
        return Storage.read_sync(fd, offset, length)
    finally:
        os.close(fd)


class Storage:
    """The volumes of one server. Thread-safe (it holds no mutable state besides the file system)."""

    def __init__(self, volumes: list[str]) -> None:
        if not volumes:
            raise ValueError("at least one volume")
        self.volumes = volumes

    def make_volumes_sync(self) -> None:
        for volume in self.volumes:
            try:
                os.makedirs(volume, mode=0o700, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise StorageError(f"{volume}: a file stands where a folder should be") from None
            except OSError as exc:
                raise _oserror("create volume", exc) from None

    def bucket_dirs(self, bucket: str) -> list[str]:
        return [os.path.join(v, bucket) for v in self.volumes]

    # -- reading -------------------------------------------------------------------------------

    def open_sync(self, bucket: str, kind: str, name: str) -> tuple[int, int] | None:
        """(fd, size) of the object from the first volume holding it; None when no volume does.

        Two passes: a file moved from a later to an earlier volume between our looks is found the
        second time. The caller closes the fd.
        """
        rel = object_path(kind, name)
        for _ in range(2):
            for folder in self.bucket_dirs(bucket):
                try:
                    fd = os.open(os.path.join(folder, rel), os.O_RDONLY)
                except FileNotFoundError:
                    continue
                except NotADirectoryError:
                    continue
                except OSError as exc:
                    raise _oserror("open", exc) from None
                try:
                    st = os.fstat(fd)
                except OSError as exc:
                    os.close(fd)
                    raise _oserror("stat", exc) from None
                if not stat.S_ISREG(st.st_mode):
                    os.close(fd)
                    continue
                return fd, st.st_size
        return None

    def stat_sync(self, bucket: str, kind: str, name: str) -> int | None:
        found = self.open_sync(bucket, kind, name)
        if found is None:
            return None
        os.close(found[0])
        return found[1]

    @staticmethod
    def read_sync(fd: int, offset: int, length: int) -> bytes:
        try:
            return os.pread(fd, length, offset)
        except OSError as exc:
            raise _oserror("read", exc) from None

    @staticmethod
    def read_into_sync(fd: int, offset: int, buffer: memoryview) -> int:
        try:
            return os.preadv(fd, [buffer], offset)
        except OSError as exc:
            raise _oserror("read", exc) from None

    def list_sync(self, bucket: str, kind: str) -> list[tuple[str, int]] | None:
        """(name, size) of every object of ``kind`` in every volume; None when no volume has the
        kind's folder (a bucket that was never initialised).

        With several volumes each folder (``data/XX`` one at a time) is scanned in every volume and
        then again in all but the last: a file moved once while we scanned that folder is found by
        one of the looks, and the time in which a second move could hide it is the scan of one
        folder, not of the whole listing.
        """
        seen: dict[str, int] = {}
        tops = [os.path.join(folder, kind) for folder in self.bucket_dirs(bucket)]
        if kind == "data":
            subs: set[str] = set()
            found = False
            for top in tops:
                try:
                    subs.update(e.name for e in os.scandir(top) if e.is_dir(follow_symlinks=False))
                except (FileNotFoundError, NotADirectoryError):
                    continue
                except OSError as exc:
                    raise _oserror("list", exc) from None
                found = True
            groups = [[os.path.join(top, sub) for top in tops] for sub in sorted(subs)]
        else:
            found = False
            groups = [tops]
        for dirs in groups:
            for folder in dirs + dirs[:-1]:
                found = self._scan_sync(folder, seen) or found
        return sorted(seen.items()) if found else None

    @staticmethod
    def _scan_sync(folder: str, seen: dict[str, int]) -> bool:
        """Add the objects in one folder to ``seen``; False if the folder is missing."""
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            raise _oserror("list", exc) from None
        for entry in entries:
            if not _HEX64.match(entry.name) or entry.name in seen:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # moved or removed while we listed
            if stat.S_ISREG(st.st_mode):
                seen[entry.name] = st.st_size
        return True

    # -- writing -------------------------------------------------------------------------------

    def create_layout_sync(self, bucket: str) -> None:
        """The vault folders (data/00..ff included) in the bucket's home volume; idempotent."""
        home = self.home_sync(bucket)
        try:
            for kind in OBJECT_KINDS:
                os.makedirs(os.path.join(home, kind), mode=0o700, exist_ok=True)
            for i in range(256):
                os.makedirs(os.path.join(home, "data", f"{i:02x}"), mode=0o700, exist_ok=True)
        except OSError as exc:
            raise _oserror("create bucket folders", exc) from None

    def home_sync(self, bucket: str) -> str:
        """The bucket's folder in the first volume that has one, else in the emptiest volume."""
        for folder in self.bucket_dirs(bucket):
            if os.path.isdir(folder):
                return folder
        return os.path.join(self.pick_volume_sync(0), bucket)

    def free_sync(self, volume: str) -> int:
        try:
            st = os.statvfs(volume)
        except OSError:
            return -1
        return st.f_bavail * st.f_frsize

    def pick_volume_sync(self, size: int) -> str:
        """The volume with the most free space; StorageError(507) if even it lacks ``size`` bytes."""
        best, best_free = None, -1
        for volume in self.volumes:
            free = self.free_sync(volume)
            if free > best_free:
                best, best_free = volume, free
        if best is None or best_free < 0:
            raise StorageError("no volume is available", 503)
        if best_free < size:
            raise StorageError("not enough free space on any volume", 507)
        return best

    def begin_upload_sync(
        self,
        bucket: str,
        kind: str,
        name: str,
        size: int,
        buffers: tuple[mmap.mmap, mmap.mmap] | None = None,
        *,
        hashed: bool = True,
    ) -> Upload:
        """A new upload (``buffers``, ``hashed``: see ``Upload``); ObjectExists if some volume holds
        the object already (an early answer only: the commit checks again)."""
        if self.stat_sync(bucket, kind, name) is not None:
            raise ObjectExists(object_path(kind, name))
        volume = self.pick_volume_sync(size)
        return Upload(os.path.join(volume, bucket), kind, name, size, buffers, hashed=hashed)

    def finish_commit_sync(self, bucket: str, kind: str, name: str, upload: Upload) -> None:
        """``upload.finish_sync`` then ``commit_sync`` in one worker-thread call (one hand-off less
        between the last body byte and the response); the caller holds the commit lock."""
        upload.finish_sync()
        self.commit_sync(bucket, kind, name, upload)

    def commit_sync(self, bucket: str, kind: str, name: str, upload: Upload) -> None:
        """Make a finished upload visible under its name unless some volume has that name already.

        Raises ObjectExists (and removes the temp file) in that case. The caller serialises commits
        of one server (see app.py), so the check of the other volumes and the link are one step.
        """
        rel = object_path(kind, name)
        try:
            for folder in self.bucket_dirs(bucket):
                if os.path.lexists(os.path.join(folder, rel)):
                    raise ObjectExists(rel)
            try:
                os.link(upload.tmp, upload.final)
            except FileExistsError:
                raise ObjectExists(rel) from None
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                # No hard links on this file system: the existence check above, made under the
                # commit lock, stands in for the link's atomic no-replace.
                os.rename(upload.tmp, upload.final)
            _fsync_dir(upload.folder)
        except ObjectExists:
            upload.abort_sync()
            raise
        except OSError as exc:
            upload.abort_sync()
            raise _oserror("commit upload", exc) from None
        upload.abort_sync()  # drops the temp name; the data lives on under the final name

    def remove_sync(self, bucket: str, kind: str, name: str) -> int:
        """Remove the object from every volume; the number of bytes freed (0 if it did not exist)."""
        rel = object_path(kind, name)
        freed = 0
        for folder in self.bucket_dirs(bucket):
            path = os.path.join(folder, rel)
            try:
                size = os.lstat(path).st_size
                os.unlink(path)
                freed += size
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _oserror("remove", exc) from None
        return freed

    # -- administration ------------------------------------------------------------------------

    def usage_sync(self, bucket: str) -> tuple[int, int]:
        """(bytes, files) of a bucket's objects over all volumes (temp files not counted)."""
        total = files = 0
        for folder in self.bucket_dirs(bucket):
            t, f = _tally(folder)
            total += t
            files += f
        return total, files

    def sweep_temp_sync(self, older_than: float) -> tuple[int, int]:
        """Remove the temp files of every bucket and volume not written to for ``older_than`` seconds
        (see the module doc): (files removed, bytes of disk freed)."""
        cutoff = time.time() - older_than
        removed = freed = 0
        for volume in self.volumes:
            for folder in _bucket_folders(volume):
                for root, _dirs, names in os.walk(folder):
                    for n in names:
                        if TEMP_MARK not in n:
                            continue
                        path = os.path.join(root, n)
                        try:
                            st = os.lstat(path)
                            if st.st_mtime >= cutoff or not stat.S_ISREG(st.st_mode):
                                continue
                            os.unlink(path)
                        except OSError:
                            continue  # gone meanwhile, or not ours to remove: the next sweep
                        removed += 1
                        freed += st.st_blocks * 512
        return removed, freed

    def delete_bucket_sync(self, bucket: str) -> None:
        for folder in self.bucket_dirs(bucket):
            if os.path.isdir(folder):
                # Files are read-only; rmtree removes them anyway (the folders are writable).
                shutil.rmtree(folder)

    def volume_report_sync(self) -> list[VolumeUsage]:
        report = []
        for volume in self.volumes:
            try:
                st = os.statvfs(volume)
            except OSError:
                report.append(VolumeUsage(volume, 0, 0, 0, 0, False))
                continue
            stored = files = 0
            for folder in _bucket_folders(volume):
                t, f = _tally(folder)
                stored += t
                files += f
            report.append(
                VolumeUsage(
                    volume,
                    st.f_blocks * st.f_frsize,
                    st.f_bavail * st.f_frsize,
                    stored,
                    files,
                    True,
                )
            )
        return report


def _bucket_folders(volume: str) -> list[str]:
    """The bucket folders of a volume (not the server's own state folder, which starts with a dot)."""
    try:
        entries = list(os.scandir(volume))
    except OSError:
        return []
    return [
        e.path for e in entries if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")
    ]


def _tally(folder: str) -> tuple[int, int]:
    total = files = 0
    for root, _dirs, names in os.walk(folder):
        for n in names:
            if TEMP_MARK in n:
                continue
            try:
                total += os.lstat(os.path.join(root, n)).st_size
                files += 1
            except FileNotFoundError:
                continue
    return total, files
