"""What every command shares: global options, passwords, opening the vault, output and progress.

Commands are modules ``vaultfs.tools.cmd_<name>`` with ``register(subparsers)`` (adds the parser and sets
``func``) and a ``run(args, out) -> int`` function. ``out`` is an Output: ``out.json`` tells whether
``--json`` was given, ``out.emit(doc)`` prints one JSON document, ``out.line(text)`` prints human text,
``out.progress(...)`` gives a progress bar on a TTY (silent otherwise and with ``--json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from vaultfs.backend import is_local, open_backend
from vaultfs.errors import NoVault, UsageError, VaultError

if TYPE_CHECKING:
    # Imported where a vault is opened: the repository layer brings numpy and the crypto libraries,
    # which commands without the password (verify, help, version) never need.
    from vaultfs.repo.repository import Repository


def add_global_options(parser: argparse.ArgumentParser, *, vault: bool = True) -> None:
    """The options every command takes. ``vault``: with those that name and open a vault (location,
    password, CA, cache); commands that open none (serve, server, version) take only the output
    options."""
    g = parser.add_argument_group("global options")
    if vault:
        _add_vault_options(g)
    g.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print machine-readable JSON instead of text",
    )
    g.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print nothing but errors and requested output",
    )


def _add_vault_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "-r",
        "--repo",
        metavar="LOCATION",
        default=argparse.SUPPRESS,
        help="vault location: a folder or rest:http://host:port/path/ (env VAULT_REPOSITORY)",
    )
    g.add_argument(
        "--password-file",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="read the password from the first line of FILE (env VAULT_PASSWORD_FILE)",
    )
    g.add_argument(
        "--password-command",
        metavar="CMD",
        default=argparse.SUPPRESS,
        help="run CMD (through the shell) and use its first output line as password "
        "(env VAULT_PASSWORD_COMMAND)",
    )
    g.add_argument(
        "--cacert",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="trust the CA certificate(s) in FILE for rest:https:// vaults (env VAULT_CACERT)",
    )
    g.add_argument(
        "--no-cache",
        action="store_true",
        default=argparse.SUPPRESS,
        help="read everything from the vault: neither use nor fill the local cache of tree packs and "
        "pack headers ($XDG_CACHE_HOME/vaultfs/, used for remote vaults)",
    )


def option(args: argparse.Namespace, name: str, env: str | None = None) -> Any:
    value = getattr(args, name, None)
    if value is None and env:
        value = os.environ.get(env) or None
    return value


def location(args: argparse.Namespace) -> str:
    if getattr(args, "cacert", None):
        os.environ["VAULT_CACERT"] = args.cacert  # read by the REST backend
    loc = option(args, "repo", "VAULT_REPOSITORY")
    if not loc:
        raise UsageError("no vault given: use -r/--repo LOCATION or set VAULT_REPOSITORY")
    return loc


def read_password(
    args: argparse.Namespace, *, prompt: str = "enter password: ", confirm: bool = False
) -> bytes:
    """The vault password.

    Options given on the command line win (--password-file, --password-command), then the environment in
    ARCHITECTURE.md's order (VAULT_PASSWORD, VAULT_PASSWORD_FILE, VAULT_PASSWORD_COMMAND), then a prompt.
    """
    if getattr(args, "password_file", None):
        return _first_line(args.password_file)
    if getattr(args, "password_command", None):
        return _password_from_command(args.password_command)
    value = os.environ.get("VAULT_PASSWORD")
    if value:
        return value.encode()
    if os.environ.get("VAULT_PASSWORD_FILE"):
        return _first_line(os.environ["VAULT_PASSWORD_FILE"])
    if os.environ.get("VAULT_PASSWORD_COMMAND"):
        return _password_from_command(os.environ["VAULT_PASSWORD_COMMAND"])
    if sys.stdin.isatty():
        return _prompt(prompt, confirm)
    raise UsageError(
        "no password: set VAULT_PASSWORD, VAULT_PASSWORD_FILE or VAULT_PASSWORD_COMMAND, "
        "or use --password-file/--password-command"
    )


def _first_line(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            first = f.readline().rstrip(b"\r\n")
    except OSError as exc:
        raise UsageError(f"cannot read password file {path}: {exc.strerror}") from None
    if not first:
        raise UsageError(f"password file {path} is empty")
    return first


def _password_from_command(command: str) -> bytes:
    import subprocess

    try:
        proc = subprocess.run(command, shell=True, capture_output=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UsageError(f"password command failed: {exc}") from None
    if proc.returncode != 0:
        raise UsageError(f"password command exited with status {proc.returncode}")
    first = proc.stdout.split(b"\n", 1)[0].rstrip(b"\r")
    if not first:
        raise UsageError("password command printed no password")
    return first


def _prompt(prompt: str, confirm: bool) -> bytes:
    import getpass

    try:
        first = getpass.getpass(prompt)
        if confirm and getpass.getpass("enter the password again: ") != first:
            raise UsageError("the passwords do not match")
    except EOFError:
        raise UsageError("no password entered") from None
    if not first:
        raise UsageError("an empty password is not allowed")
    return first.encode()


def read_new_password(args: argparse.Namespace) -> bytes:
    """A new password (key add, key passwd): --new-password-file, VAULT_NEW_PASSWORD, or a prompt twice."""
    if getattr(args, "new_password_file", None):
        return _first_line(args.new_password_file)
    value = os.environ.get("VAULT_NEW_PASSWORD")
    if value:
        return value.encode()
    if sys.stdin.isatty():
        return _prompt("enter new password: ", True)
    raise UsageError("no new password: set VAULT_NEW_PASSWORD or use --new-password-file FILE")


def open_repository(args: argparse.Namespace) -> Repository:
    backend = open_backend(location(args))
    if not backend.exists("config", ""):  # say "no vault" before asking for a password
        raise NoVault(
            f"there is no vault at {backend} (no config file); create one with `vault init`"
        )
    from vaultfs.repo.repository import Repository

    repo = Repository.open(backend, read_password(args), key_hint=os.environ.get("VAULT_KEY_HINT"))
    if not getattr(args, "no_cache", False) and not is_local(backend):
        from vaultfs.repo.cache import VaultCache
        from vaultfs.repo.treepacks import TreePacks

        repo.tree_packs = TreePacks(backend, VaultCache.of(repo.id), lambda: repo.index.pack_ids())
    return repo


def tune_malloc(mmap_threshold: int = 512 * 1024) -> None:
    """Keep glibc from hoarding the memory that multi-MiB worker buffers pass through.

    By default glibc gives each thread an arena of its own, raises its mmap threshold to the largest
    block freed so far (up to 32 MiB) and keeps freed heap memory. With one arena and blocks of
    ``mmap_threshold`` and more mapped and unmapped directly, freed memory goes back at once. Call
    before the command starts threads. A no-op without glibc."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_mmap_threshold, m_arena_max = -3, -8  # from glibc's malloc.h
    mallopt(m_arena_max, 1)
    mallopt(m_mmap_threshold, mmap_threshold)


@contextmanager
def locked(repo: Repository, exclusive: bool = False) -> Iterator[None]:
    lock = repo.lock(exclusive)
    try:
        yield
    finally:
        lock.release()


class Output:
    """Text on a TTY (rich), JSON with --json. Progress and notes go to stderr; results to stdout."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.json = bool(getattr(args, "json", False))
        self.quiet = bool(getattr(args, "quiet", False))
        self._console = None
        self._err_console = None

    @property
    def console(self):  # noqa: ANN201 - rich is imported lazily to keep start-up fast
        if self._console is None:
            from rich.console import Console

            self._console = Console(highlight=False, soft_wrap=True)
        return self._console

    @property
    def err(self):  # noqa: ANN201
        if self._err_console is None:
            from rich.console import Console

            self._err_console = Console(stderr=True, highlight=False, soft_wrap=True)
        return self._err_console

    def emit(self, doc: Any) -> None:
        """One JSON document on stdout."""
        import json  # here, like the other imports only some runs need: start-up time counts

        sys.stdout.write(json.dumps(to_jsonable(doc), ensure_ascii=False) + "\n")
        sys.stdout.flush()

    def emit_line(self, doc: Any) -> None:
        """One JSON line (for streams such as progress)."""
        import json

        sys.stdout.write(
            json.dumps(to_jsonable(doc), ensure_ascii=False, separators=(",", ":")) + "\n"
        )
        sys.stdout.flush()

    def line(self, text: str = "") -> None:
        """Plain result text on stdout (no markup interpretation)."""
        sys.stdout.write(text + "\n")

    def note(self, text: str) -> None:
        """Informational text on stderr, suppressed by --quiet and --json."""
        if not self.quiet and not self.json:
            sys.stderr.write(text + "\n")

    def warn(self, text: str) -> None:
        sys.stderr.write(f"warning: {text}\n")

    def table(self, columns: list[str], rows: list[list[str]], title: str | None = None) -> None:
        if not sys.stdout.isatty():
            widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
            self.line("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
            self.line("-" * (sum(widths) + 2 * (len(widths) - 1)))
            for r in rows:
                self.line("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
            return
        from rich.table import Table

        t = Table(title=title, box=None, header_style="bold")
        for c in columns:
            t.add_column(c)
        for r in rows:
            t.add_row(*r)
        self.console.print(t)

    @contextmanager
    def progress(
        self, description: str, total: int | None = None, unit: str = "bytes"
    ) -> Iterator[Progress]:
        """A progress bar on an interactive stderr; a no-op otherwise."""
        if self.json or self.quiet or not sys.stderr.isatty():
            yield Progress(None, None)
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RichProgress

        cols: list[Any] = [TextColumn("{task.description}"), BarColumn()]
        if unit == "bytes":
            cols += [DownloadColumn(), TransferSpeedColumn()]
        else:
            cols += [MofNCompleteColumn()]
        cols.append(TimeRemainingColumn())
        with RichProgress(*cols, console=self.err, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield Progress(bar, task)


class Progress:
    def __init__(self, bar: Any, task: Any) -> None:
        self._bar = bar
        self._task = task

    def advance(self, amount: int = 1) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, amount)

    def update(self, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.update(self._task, **kwargs)


def to_jsonable(doc: Any) -> Any:
    if dataclasses.is_dataclass(doc) and not isinstance(doc, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(doc).items()}
    if isinstance(doc, dict):
        return {str(k): to_jsonable(v) for k, v in doc.items()}
    if isinstance(doc, list | tuple | set):
        return [to_jsonable(v) for v in doc]
    if isinstance(doc, bytes):
        return doc.hex()
    if isinstance(doc, str):
        # Names that are not UTF-8 print as restic prints them: bad bytes become U+FFFD.
        return doc.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if hasattr(doc, "format") and doc.__class__.__name__ == "GoTime":
        return doc.format()
    return doc


def snapshot_json(snap_id: str, snap: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": snap_id,
        "short_id": snap_id[:8],
        "time": snap.time.format(),
        "tree": snap.tree.hex(),
        "paths": snap.paths,
        "hostname": snap.hostname,
        "username": snap.username,
    }
    if snap.parent:
        doc["parent"] = snap.parent.hex()
    if snap.tags:
        doc["tags"] = snap.tags
    if snap.uid:
        doc["uid"] = snap.uid
    if snap.gid:
        doc["gid"] = snap.gid
    if snap.excludes:
        doc["excludes"] = snap.excludes
    if snap.original:
        doc["original"] = snap.original.hex()
    if snap.program_version:
        doc["program_version"] = snap.program_version
    return doc


def add_snapshot_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", action="append", metavar="HOST", help="only snapshots of HOST (repeatable)"
    )
    parser.add_argument(
        "--tag",
        action="append",
        metavar="TAG[,TAG]",
        help="only snapshots with all of these tags (repeatable: any of the groups)",
    )
    parser.add_argument(
        "--path",
        action="append",
        metavar="PATH",
        help="only snapshots that include PATH (repeatable)",
    )


def fail(message: str) -> VaultError:
    return VaultError(message)
