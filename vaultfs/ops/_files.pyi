"""Type stub for backup's batched small-file reads (see ``_files.c``); use vaultfs.ops.backup."""

from collections.abc import Sequence

from typing_extensions import Buffer

def read_files(paths: Sequence[bytes], buffer: Buffer, limit: int, /) -> list[tuple]: ...
