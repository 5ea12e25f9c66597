"""Generate the man pages in man/ from the real argument parsers (deterministic output).

    python -m vaultfs.tools.manpages man        # write man/vault.1 and man/vault-<command>.1
    python -m vaultfs.tools.manpages --check man   # exit 1 when a page is stale or missing

A test runs the check, so a parser change without regenerated pages fails the suite.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from vaultfs import __version__
from vaultfs.tools.main import EXIT_CODES, build_parser


def _esc(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = []
    for line in text.splitlines():
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def _header(name: str, summary: str) -> list[str]:
    return [
        f'.TH {name.upper()} 1 "" "vaultfs {__version__}" "vaultfs manual"',
        ".SH NAME",
        f"{_esc(name)} \\- {_esc(summary)}",
    ]


Entry = tuple[str, str]  # an option's label ("--data DIR") and help text


def _options(parser: argparse.ArgumentParser) -> tuple[list[Entry], list[Entry]]:
    """Positional arguments and options of ``parser``: (its own, the global ones)."""
    own: list[Entry] = []
    glob: list[Entry] = []
    for group in parser._action_groups:
        target = glob if group.title == "global options" else own
        for action in group._group_actions:
            if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
                continue
            if action.option_strings:
                metavar = ""
                if action.nargs != 0:
                    metavar = " " + (
                        action.metavar
                        or (
                            "{" + ",".join(map(str, action.choices)) + "}"
                            if action.choices
                            else None
                        )
                        or action.dest.upper()
                    )
                label = ", ".join(action.option_strings) + metavar
            else:
                label = action.metavar or action.dest
            help_text = (action.help or "").replace("%(default)s", str(action.default))
            target.append((label, help_text))
    return own, glob


def _roff(entries: list[Entry]) -> list[str]:
    lines: list[str] = []
    for label, help_text in entries:
        lines += [".TP", f".B {_esc(label)}", _esc(help_text)]
    return lines


def _exit_status(epilog: str) -> list[str]:
    """EXIT STATUS and, where the command's help has one, ENVIRONMENT, from its epilog."""
    codes, _, environment = epilog.partition("environment:")
    lines = [".SH EXIT STATUS"]
    for row in codes.split("\n", 1)[1].strip().splitlines():
        code, _, text = row.strip().partition(" ")
        lines += [".TP", f".B {code}", _esc(text.strip())]
    if environment.strip():
        lines += [".SH ENVIRONMENT", _esc(environment.strip())]
    return lines


def _usage(parser: argparse.ArgumentParser) -> str:
    return " ".join(parser.format_usage().replace("usage:", "").split())


def page_for(name: str, parser: argparse.ArgumentParser, summary: str) -> str:
    lines = _header(name, summary)
    lines += [".SH SYNOPSIS", f".B {_esc(_usage(parser))}"]
    lines += [".SH DESCRIPTION", _esc(parser.description or summary)]
    own, glob = _options(parser)
    if own:
        lines += [".SH OPTIONS", *_roff(own)]
    sub = _subparsers(parser)
    if sub is not None and name != "vault":
        lines += [".SH ACTIONS", *_actions(parser, "", set(own))]
    if glob:
        lines += [".SH GLOBAL OPTIONS", *_roff(glob)]
    if name == "vault" and sub is not None:
        lines.append(".SH COMMANDS")
        for c in sub._choices_actions:
            lines += [".TP", f".BR vault\\-{_esc(c.dest)} (1)", _esc(c.help or "")]
    lines += _exit_status(parser.epilog or EXIT_CODES)
    others = ["vault"] if name != "vault" else []
    lines += [
        ".SH SEE ALSO",
        ", ".join(f".BR {o} (1)" for o in others) or ".BR vaultfs\\-format (5)",
    ]
    return "\n".join(lines) + "\n"


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _actions(parser: argparse.ArgumentParser, prefix: str, shown: set[Entry]) -> list[str]:
    """roff for each action of ``parser`` and, depth first, for the actions of those (``vault server
    bucket create``): a subsection with its usage, description and own options, less those the page
    already shows (``shown``: the command's options that its actions take again, as --data)."""
    sub = _subparsers(parser)
    if sub is None:
        return []
    lines: list[str] = []
    helps = {c.dest: c.help or "" for c in sub._choices_actions}
    for action_name, action_parser in sub.choices.items():
        full = f"{prefix}{action_name}"
        lines += [".SS " + _esc(full), _esc(helps.get(action_name, ""))]
        lines += [".PP", f".B {_esc(_usage(action_parser))}"]
        if action_parser.description and action_parser.description != helps.get(action_name):
            lines += [".PP", _esc(action_parser.description)]
        a_own, _ = _options(action_parser)
        lines += _roff([entry for entry in a_own if entry not in shown])
        lines += _actions(action_parser, full + " ", shown)
    return lines


def render_all() -> dict[str, str]:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps usage lines by terminal width
    try:
        parser = build_parser()
        pages = {"vault.1": page_for("vault", parser, "encrypted, deduplicating backup vaults")}
        sub = _subparsers(parser)
        assert sub is not None
        helps = {c.dest: c.help or "" for c in sub._choices_actions}
        for name, cmd_parser in sub.choices.items():
            pages[f"vault-{name}.1"] = page_for(f"vault-{name}", cmd_parser, helps.get(name, ""))
        return pages
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vaultfs.tools.manpages")
    ap.add_argument("--check", action="store_true", help="report stale pages instead of writing")
    ap.add_argument("folder", type=Path)
    args = ap.parse_args(argv)
    pages = render_all()
    stale = []
    for name, text in pages.items():
        path = args.folder / name
        current = path.read_text() if path.exists() else None
        if current != text:
            stale.append(name)
            if not args.check:
                args.folder.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    generated = {p.name for p in args.folder.glob("vault*.1")}
    extra = sorted(generated - set(pages))
    if args.check:
        for name in stale:
            print(f"stale or missing: {args.folder / name}", file=sys.stderr)
        for name in extra:
            print(f"no longer generated: {args.folder / name}", file=sys.stderr)
        return 1 if stale or extra else 0
    for name in extra:
        (args.folder / name).unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
