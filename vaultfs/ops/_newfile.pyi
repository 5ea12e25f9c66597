"""Type stub for restore's one-call file write (see ``_newfile.c``); use vaultfs.ops.restore."""

from typing_extensions import Buffer

def write_file(
    path: bytes,
    data: Buffer,
    offset: int,
    create: bool,
    uid: int,
    gid: int,
    mode: int,
    atime_ns: int | None,
    mtime_ns: int,
    /,
) -> tuple[int, int, int, int]: ...
