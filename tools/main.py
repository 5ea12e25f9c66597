"""Entry point of the ``vault`` command: builds the parser from the command modules and runs one.

Exit codes come from vaultfs.errors. A VaultError prints one line and no traceback; anything else is a bug
and prints its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

# numpy (the master index) would otherwise start idle-spinning BLAS threads that the CLI never uses.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from vaultfs import __version__
from vaultfs.errors import EXIT_INTERRUPTED, EXIT_USAGE, VaultError
from vaultfs.tools.common import Output, add_global_options

# One module per command: vaultfs.tools.cmd_<name> ("-" becomes "_"). Order is the order of `vault --help`.
# A name whose module does not exist yet is skipped.
COMMANDS = [
    "init",
    "backup",
    "snapshots",
    "ls",
    "restore",
    "mount",
    "cat",
    "verify",
    "deep-verify",
    "rebuild-indexes",
    "repair",
    "forget",
    "prune",
    "split",
    "merge",
    "migrate",
    "key",
    "unlock",
    "serve",
    "server",
    "version",
]

EXIT_CODES = """exit codes:
  0    success
  1    failure (including integrity problems found)
  2    wrong usage
  3    backup finished, but some source files could not be read
  10   no vault at that location
  11   the vault is locked by another process
  12   wrong password
  130  interrupted (Ctrl-C or SIGTERM)
"""
ENVIRONMENT = """environment:
  VAULT_REPOSITORY, VAULT_PASSWORD, VAULT_PASSWORD_FILE, VAULT_PASSWORD_COMMAND, VAULT_NEW_PASSWORD,
  VAULT_CACERT, VAULT_REST_USERNAME, VAULT_REST_PASSWORD, TMPDIR, XDG_CACHE_HOME;
  for rest: vaults HTTP_PROXY, HTTPS_PROXY, ALL_PROXY (an http://[user:password@]host:port proxy)
  and NO_PROXY
"""
#: For `vault` and every command that opens a vault; the others (serve, server, version) read none of
#: these variables and show only the exit codes.
EPILOG = EXIT_CODES + "\n" + ENVIRONMENT


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"vault: error: {message}\n")
        sys.exit(EXIT_USAGE)


def command_modules(only: str | None = None) -> list:
    mods = []
    for name in [only] if only else COMMANDS:
        module = f"vaultfs.tools.cmd_{name.replace('-', '_')}"
        try:
            mods.append(importlib.import_module(module))
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return mods


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``only``, just that command's (imports one command module, not all)."""
    parser = _Parser(
        prog="vault",
        description="vaultfs: encrypted, deduplicating backup vaults in the restic format.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vaultfs {__version__}")
    add_global_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for mod in command_modules(only):
        _finish(mod.register(sub), vault=getattr(mod, "OPENS_VAULT", True))
    return parser


def _finish(p: argparse.ArgumentParser, *, vault: bool) -> None:
    """Global options, exit codes and formatting for a command parser and its action parsers.
    ``vault``: whether the command opens a vault (a module says ``OPENS_VAULT = False`` if not)."""
    add_global_options(p, vault=vault)
    p.epilog = EPILOG if vault else EXIT_CODES
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _finish(child, vault=vault)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


_VALUED_GLOBALS = {"-r", "--repo", "--password-file", "--password-command"}


def _command_in(argv: list[str]) -> str | None:
    """The command named in argv, so only its module is imported (trio and pyfuse3 cost time to load)."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _VALUED_GLOBALS:
            skip = True
        elif not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    out = Output(args)
    try:
        code = args.func(args, out)
    except VaultError as exc:
        sys.stdout.flush()
        sys.stderr.write(f"vault: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("vault: interrupted; the vault is unchanged by the unfinished work\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        sys.stderr.close()
        return 0
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
