"""Local folder backend: the restic layout on a file system (FORMAT.md §1).

Writes go to ``<name>-tmp-<random>`` in the target folder, are fsynced, renamed into place, the folder is
fsynced, and the file is made read-only, so a crash leaves either nothing or the whole file. Listings skip
temp files. ``data`` objects live in ``data/<first two hex>/<name>``.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from vaultfs.backend.base import KINDS, Backend, Source, check_name, check_streamed_size
from vaultfs.errors import BackendError, ObjectNotFound

if TYPE_CHECKING:
    import ctypes

TEMP_MARK = "-tmp-"
_TEMPORARY_ERRNOS = {errno.EINTR, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT}


_FALLOC_FL_KEEP_SIZE = 1
_SYNC_FILE_RANGE_WRITE = 2
PREALLOCATE_FROM = 64 * 1024  # smaller files gain nothing worth a system call
#: ``write`` hands the file system pieces of this size: one 16 MiB write() of a pack cost 2-4 times the
#: system CPU of sixteen 1 MiB writes with writeback started after each (measured: 50 packs, 0.55-1.95
#: against 0.21-0.27 s), and the final fsync then has little left to do.
WRITE_PIECE = 1024 * 1024
#: Objects of at least this size held in a page-aligned buffer (the pack writer's anonymous mappings) are
#: written with O_DIRECT, DIRECT_PIECE bytes per write, the unaligned tail through the page cache: the
#: copy into freshly allocated page-cache pages was the largest single cost of a first backup here
#: (perf: ``copy_folio_from_iter_atomic`` 26% of the CPU samples of backing up the benchmark's large
#: files). The data is still fsynced before the rename.
DIRECT_FROM = 1024 * 1024
DIRECT_ALIGN = 4096
DIRECT_PIECE = 4 * 1024 * 1024


@functools.cache
def _libc_call(name: str, *argtypes: type) -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """A Linux system call wrapper from the C library, or None where it does not exist."""
    import ctypes  # here, not at the top: commands that only read (verify) never load it

    try:
        call = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    call.argtypes = list(argtypes)
    call.restype = ctypes.c_int
    return call


def preallocate(fd: int, size: int) -> None:
    """Reserve the blocks of a file that will hold ``size`` bytes: the file system allocates them in
    one go instead of page by page as the writes come (measured on ext4: about 40% less system CPU
    for writing and fsyncing a 17 MiB file), and a full disk shows before the bytes are written. Raises
    OSError(ENOSPC/EDQUOT); where the file system cannot preallocate, nothing happens (glibc's
    posix_fallocate would emulate it by writing every block, so the system call is used directly)."""
    import ctypes

    call = _libc_call("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    if call is None or size < PREALLOCATE_FROM:
        return
    # FALLOC_FL_KEEP_SIZE: the file still grows only as bytes are written, so a short write could
    # never leave a tail of zeros that looks like data.
    if call(fd, _FALLOC_FL_KEEP_SIZE, 0, size) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(err, os.strerror(err))


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing [offset, offset+length) to disk now, without waiting
    (sync_file_range, SYNC_FILE_RANGE_WRITE): a file written piece by piece then reaches its fsync
    with little left to write (measured: fsync of a 17 MiB file 7-9 ms -> 2-3.5 ms). Durability
    still comes from the fsync; where the call is missing, nothing happens."""
    import ctypes

    call = _libc_call(
        "sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint
    )
    if call is not None:
        call(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _page_aligned(view: memoryview) -> bool:
    """Whether ``view`` is long enough for O_DIRECT and starts on a page (writable buffers only:
    ctypes finds the address of those alone)."""
    if view.readonly or len(view) < DIRECT_FROM:
        return False
    import ctypes

    try:
        first = ctypes.c_char.from_buffer(view)
    except (TypeError, ValueError):
        return False
    address = ctypes.addressof(first)
    del first  # lets go of the buffer export at once
    return address % DIRECT_ALIGN == 0


def _create(tmp: str, folder: str, direct: bool) -> tuple[int, bool]:
    """Create the temp file (and its folder when missing); with O_DIRECT when ``direct`` and the file
    system takes it. Returns the descriptor and whether it has O_DIRECT."""
    try:
        return _open_new(tmp, direct)
    except FileNotFoundError:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        return _open_new(tmp, direct)


def _open_new(tmp: str, direct: bool) -> tuple[int, bool]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    if direct:
        try:
            return os.open(tmp, flags | os.O_DIRECT, 0o600), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            LocalBackend.direct_ok = False  # this file system has no O_DIRECT
    return os.open(tmp, flags, 0o600), False


def _leave_direct(fd: int) -> bool:
    """Clear O_DIRECT on ``fd`` (later writes go through the page cache); returns False."""
    import fcntl

    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
    return False


def _fail(action: str, where: str, exc: OSError) -> BackendError:
    reason = exc.strerror or str(exc)
    hint = ""
    if exc.errno == errno.ENOSPC:
        hint = "; free some space and run the command again"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "; check the permissions of the vault folder"
    return BackendError(
        f"cannot {action} {where}: {reason}{hint}", temporary=exc.errno in _TEMPORARY_ERRNOS
    )


class LocalBackend(Backend):
    def __init__(self, path: str) -> None:
        self.root = os.path.abspath(path)
        self.location = path

    # -- paths ---------------------------------------------------------------------------------

    def _dir(self, kind: str, name: str) -> str:
        if kind == "data":
            return os.path.join(self.root, "data", name[:2])
        if kind == "config":
            return self.root
        return os.path.join(self.root, kind)

    def path(self, kind: str, name: str) -> str:
        check_name(kind, name)
        return os.path.join(self._dir(kind, name), name or "config")

    def _where(self, kind: str, name: str) -> str:
        return "config" if kind == "config" else f"{kind}/{name}"

    # -- contract ------------------------------------------------------------------------------

    def create(self) -> None:
        try:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            for kind in KINDS:
                if kind != "config":
                    os.makedirs(os.path.join(self.root, kind), mode=0o700, exist_ok=True)
            for i in range(256):
                os.makedirs(os.path.join(self.root, "data", f"{i:02x}"), mode=0o700, exist_ok=True)
        except OSError as exc:
            raise _fail("create the vault folders in", self.root, exc) from None

    def list(self, kind: str) -> Iterator[tuple[str, int]]:
        check_name(kind, "" if kind == "config" else "0" * 64)
        if kind == "config":
            try:
                yield "", os.stat(self.path("config", "")).st_size
            except FileNotFoundError:
                pass
            return
        top = os.path.join(self.root, kind)
        if kind == "data":
            try:
                subdirs = sorted(e.path for e in os.scandir(top) if e.is_dir(follow_symlinks=False))
            except FileNotFoundError:
                return
            except OSError as exc:
                raise _fail("list", top, exc) from None
        else:
            subdirs = [top]
        for folder in subdirs:
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _fail("list", folder, exc) from None
            for entry in entries:
                if TEMP_MARK in entry.name or not entry.is_file(follow_symlinks=False):
                    continue
                try:
                    yield entry.name, entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue

    def list_temp(self, kind: str) -> Iterator[str]:
        """Relative paths of leftover temp files (for verify and cleanup)."""
        top = os.path.join(self.root, kind)
        for folder, _dirs, files in os.walk(top):
            for f in files:
                if TEMP_MARK in f:
                    yield os.path.relpath(os.path.join(folder, f), self.root)

    def stat(self, kind: str, name: str) -> int:
        path = self.path(kind, name)
        try:
            return os.stat(path).st_size
        except FileNotFoundError:
            raise ObjectNotFound(f"{self._where(kind, name)} does not exist") from None
        except OSError as exc:
            raise _fail("stat", self._where(kind, name), exc) from None

    def exists(self, kind: str, name: str) -> bool:
        return os.path.exists(self.path(kind, name))

    def read(self, kind: str, name: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self.path(kind, name)
        where = self._where(kind, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ObjectNotFound(f"{where} does not exist") from None
        except OSError as exc:
            raise _fail("open", where, exc) from None
        try:
            if length is None:
                size = os.fstat(fd).st_size
                length = max(0, size - offset)
            data = os.pread(fd, length, offset)  # one syscall, no zero-fill, no extra copy
            if len(data) == length:
                return data
            parts = [data]
            got = len(data)
            while got < length:
                more = os.pread(fd, length - got, offset + got)
                if not more:
                    raise BackendError(
                        f"short read of {where}: wanted {length} bytes at offset {offset}, got {got}"
                    )
                parts.append(more)
                got += len(more)
            return b"".join(parts)
        except OSError as exc:
            raise _fail("read", where, exc) from None
        finally:
            os.close(fd)

    #: False once this process met a file system that refuses O_DIRECT (e.g. some FUSE and network
    #: file systems): from then on every write goes through the page cache.
    direct_ok = True

    def write(self, kind: str, name: str, data: bytes | bytearray | memoryview) -> None:
        with memoryview(data) as whole, whole.cast("B") as view:
            if LocalBackend.direct_ok and _page_aligned(view):
                aligned = len(view) - len(view) % DIRECT_ALIGN
                pieces = [
                    view[at : min(at + DIRECT_PIECE, aligned)]
                    for at in range(0, aligned, DIRECT_PIECE)
                ]
                if aligned < len(view):
                    pieces.append(view[aligned:])
                self._store(kind, name, pieces, len(view), direct=True)
                return
            buffered = (view[at : at + WRITE_PIECE] for at in range(0, len(view), WRITE_PIECE))
            self._store(kind, name, buffered, len(view))

    def write_stream(self, kind: str, name: str, source: Source, size: int) -> None:
        path = self.path(kind, name)
        if not os.path.exists(path):
            self._store(kind, name, source(), size)

    def _store(
        self,
        kind: str,
        name: str,
        pieces: Iterable[bytes | bytearray | memoryview],
        size: int,
        direct: bool = False,
    ) -> None:
        """Write ``pieces`` to a temp file, fsync, rename into place, fsync the folder. Anything
        raised (by the file system or by the pieces' iterator) removes the temp file. ``direct``:
        the pieces are page-aligned multiples of DIRECT_ALIGN but the last, written with O_DIRECT
        (the last, if unaligned, through the page cache)."""
        path = self.path(kind, name)
        folder = os.path.dirname(path)
        where = self._where(kind, name)
        if os.path.exists(path):
            return
        tmp = f"{path}{TEMP_MARK}{os.urandom(8).hex()}"
        try:
            fd, direct = _create(tmp, folder, direct)
            try:
                preallocate(fd, size)
                written = 0
                for piece in pieces:
                    view = memoryview(piece).cast("B")
                    start = written
                    written += len(view)
                    if direct and len(view) % DIRECT_ALIGN:
                        direct = _leave_direct(fd)  # the unaligned tail
                    while view:
                        try:
                            n = os.write(fd, view)
                        except OSError as exc:
                            if not (direct and exc.errno == errno.EINVAL):
                                raise
                            # took O_DIRECT at open but refuses the write: no more O_DIRECT
                            LocalBackend.direct_ok = direct = _leave_direct(fd)
                            continue
                        view = view[n:]
                    if written < size and not direct:  # more to come: let the disk work meanwhile
                        start_writeback(fd, start, written - start)
                check_streamed_size(kind, name, written, size)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.chmod(tmp, 0o400)
            os.rename(tmp, path)
            dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except BaseException as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(exc, OSError):
                raise _fail("write", where, exc) from None
            raise

    def remove(self, kind: str, name: str) -> None:
        path = self.path(kind, name)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _fail("remove", self._where(kind, name), exc) from None
