"""The VaultError tree: every error a user can cause, with its exit code and a one-line message.

This module is the only place exit codes are defined. The CLI prints ``str(error)`` (one line that says what
went wrong, on which file or object, and what to do next) and exits with ``error.exit_code``. Any exception
that is not a VaultError is a bug and is shown with its traceback.

Exit codes follow restic's, so scripts carry over:

    0 ok, 1 failure (integrity problems included), 2 usage, 3 backup finished with unreadable source files,
    10 no vault at that location, 11 could not lock, 12 wrong password, 130 interrupted.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_NO_VAULT = 10
EXIT_LOCKED = 11
EXIT_WRONG_PASSWORD = 12
EXIT_INTERRUPTED = 130


class VaultError(Exception):
    """Base of every error a user can cause. ``str()`` is the one line shown to the user."""

    exit_code = EXIT_FAILURE


class UsageError(VaultError):
    """Bad arguments or options."""

    exit_code = EXIT_USAGE


class NoVault(VaultError):
    """There is no vault at the given location (no config file)."""

    exit_code = EXIT_NO_VAULT


class WrongPassword(VaultError):
    """No key file of the vault opens with the given password."""

    exit_code = EXIT_WRONG_PASSWORD


class VaultLocked(VaultError):
    """Another process holds a conflicting lock."""

    exit_code = EXIT_LOCKED


class Interrupted(VaultError):
    """The user pressed Ctrl-C or the process got SIGTERM."""

    exit_code = EXIT_INTERRUPTED


class FormatError(VaultError):
    """Bytes that do not decode: a corrupt or truncated file, bad JSON, a bad header."""


class IntegrityError(VaultError):
    """Data that decodes but fails an integrity check: a MAC or hash mismatch."""


class ObjectNotFound(VaultError):
    """A file the vault refers to does not exist in the backend."""


class BackendError(VaultError):
    """The storage failed (I/O error, full disk, network). ``temporary`` errors are worth a retry,
    not sooner than ``retry_after`` seconds when the storage said so (HTTP Retry-After)."""

    def __init__(
        self, message: str, *, temporary: bool = False, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.temporary = temporary
        self.retry_after = retry_after


class NotFoundError(VaultError):
    """A user-named thing (snapshot, key, path inside a snapshot) does not exist."""
