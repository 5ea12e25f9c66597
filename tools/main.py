"""Entry point of the ``vault`` command: builds the parser from the command modules and runs one.

Exit codes come from vaultfs.errors. A VaultError prints one line and no traceback; anything else is a bug
and prints its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

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

EPILOG = """exit codes:
  0    success
  1    failure (including integrity problems found)
  2    wrong usage
  3    backup finished, but some source files could not be read
  10   no vault at that location
  11   the vault is locked by another process
  12   wrong password
  130  interrupted (Ctrl-C or SIGTERM)

environment:
  VAULT_REPOSITORY, VAULT_PASSWORD, VAULT_PASSWORD_FILE, VAULT_PASSWORD_COMMAND, TMPDIR, XDG_CACHE_HOME
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"vault: error: {message}\n")
        sys.exit(EXIT_USAGE)


def command_modules() -> list:
    mods = []
    for name in COMMANDS:
        module = f"vaultfs.tools.cmd_{name.replace('-', '_')}"
        try:
            mods.append(importlib.import_module(module))
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return mods


def build_parser() -> argparse.ArgumentParser:
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
    for mod in command_modules():
        _finish(mod.register(sub))
    return parser


def _finish(p: argparse.ArgumentParser) -> None:
    """Global options, exit codes and formatting for a command parser and its action parsers."""
    add_global_options(p)
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _finish(child)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    parser = build_parser()
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
