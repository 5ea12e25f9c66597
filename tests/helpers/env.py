"""Environments for running the vault CLI in tests without touching the user's settings or home."""

from __future__ import annotations

import os

#: Variables that would make the CLI pick a password, repository or cache other than the test's own.
_SCRUBBED = ("VAULT_PASSWORD_FILE", "VAULT_PASSWORD_COMMAND", "VAULT_REPOSITORY")


def env_for(
    password: str | None, *, cache_dir: str | os.PathLike[str] | None = None
) -> dict[str, str]:
    """A copy of os.environ with VAULT_PASSWORD set (removed when None) and no other password source.

    VAULT_PASSWORD_FILE, VAULT_PASSWORD_COMMAND and VAULT_REPOSITORY are removed. With ``cache_dir``,
    XDG_CACHE_HOME points there so the vault cache lands in the test's temp folder.
    """
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env.pop("VAULT_PASSWORD", None)
    if password is not None:
        env["VAULT_PASSWORD"] = password
    if cache_dir is not None:
        env["XDG_CACHE_HOME"] = os.fspath(cache_dir)
    return env
