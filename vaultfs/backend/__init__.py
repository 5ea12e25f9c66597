"""Byte stores addressed by (kind, name), and the location parser (restic syntax)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vaultfs.backend.base import KINDS, Backend
from vaultfs.backend.local import LocalBackend
from vaultfs.backend.retry import RetryBackend
from vaultfs.errors import UsageError

if TYPE_CHECKING:
    from vaultfs.backend.rest import RestBackend

__all__ = [
    "KINDS",
    "Backend",
    "LocalBackend",
    "RestBackend",
    "RetryBackend",
    "is_local",
    "open_backend",
]


def __getattr__(name: str) -> Any:
    # The REST backend (ssl, sockets) is imported when first used: most runs open a local folder.
    if name == "RestBackend":
        from vaultfs.backend.rest import RestBackend

        return RestBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_local(backend: Backend) -> bool:
    """Whether the backend is a folder on this machine (reads cost no round trip), retry wrapper or not."""
    return isinstance(getattr(backend, "inner", backend), LocalBackend)


def open_backend(location: str) -> Backend:
    """Backend for a restic-style location: a plain path, ``local:PATH`` or
    ``rest:http(s)://user:pass@host:port/path/`` (others arrive with their issues)."""
    if not location:
        raise UsageError("no vault location given: use -r/--repo or set VAULT_REPOSITORY")
    if location.startswith("local:"):
        return RetryBackend(LocalBackend(location[len("local:") :]))
    if location.startswith("rest:"):
        from vaultfs.backend.rest import RestBackend

        return RetryBackend(RestBackend(location))
    for scheme in ("sftp:", "s3:", "rclone:", "b2:", "azure:", "gs:", "swift:"):
        if location.startswith(scheme):
            raise UsageError(f"backend {scheme[:-1]!r} is not supported yet; use a local folder")
    return RetryBackend(LocalBackend(location))
