"""restic's exclude rules for backup: ``--exclude`` patterns, ``--exclude-file`` and ``--one-file-system``.

Patterns (restic's ``filter`` package)
--------------------------------------
A pattern is cleaned like Go's ``filepath.Clean`` and split at ``/``; each component is a Go
``filepath.Match`` glob (``*``, ``?``, ``[a-z]``, ``[^a-z]``, ``\\`` escapes) or ``**``, which stands for any
number of components. The absolute path of the item (``/`` plus its components) matches when the pattern's
components match a run of consecutive components of it:

- a pattern starting with ``/`` is anchored: it must match from the root on (``/home/*/.cache``);
- any other pattern may match anywhere, so ``*.tmp`` excludes every ``.tmp`` file and ``cache/tmp`` every
  ``tmp`` inside a folder named ``cache``; excluding a folder excludes everything in it;
- a pattern starting with ``!`` takes back what earlier patterns matched (``*.log`` then ``!keep.log``).

Malformed patterns (``[``, a trailing ``\\``) are refused up front with a UsageError, as restic 0.14 does.

Exclude files (``--exclude-file``) hold one pattern per line; surrounding white space is trimmed, empty
lines and lines starting with ``#`` are skipped, and ``$VAR``/``${VAR}`` are replaced by the environment
variable's value (``$$`` is a literal ``$``), as restic does. A UTF-8 byte order mark is ignored.

One file system (``--one-file-system``)
---------------------------------------
Every backup target allows the device it lives on. An item on another device than the target above it is
left out, except a folder whose parent is on an allowed device: that is a mount point, kept as an empty
folder so a restore recreates it.

Paths are ``str`` decoded from the file system bytes with surrogateescape, so any name can be matched.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterable, Mapping

from vaultfs.errors import UsageError

_GLOB_CHARS = frozenset("\\[]*?")


def _bad(pattern: str, why: str) -> UsageError:
    return UsageError(f"invalid exclude pattern {pattern!r}: {why}")


def _glob_to_regex(glob: str, pattern: str) -> re.Pattern[str]:
    """Go's filepath.Match syntax for one path component, as an anchored regex."""
    out: list[str] = []
    i, n = 0, len(glob)

    def class_char(j: int) -> tuple[str, int]:
        # One character of a class: '-' and ']' must be escaped, and a class must be closed.
        if j >= n or glob[j] in "-]":
            raise _bad(pattern, "malformed character class")
        if glob[j] == "\\":
            j += 1
            if j >= n:
                raise _bad(pattern, "malformed character class")
        if j + 1 >= n:
            raise _bad(pattern, "unclosed character class")
        return glob[j], j + 1

    while i < n:
        c = glob[i]
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "\\":
            i += 1
            if i >= n:
                raise _bad(pattern, "trailing backslash")
            out.append(re.escape(glob[i]))
        elif c == "[":
            i += 1
            negated = i < n and glob[i] == "^"
            if negated:
                i += 1
            ranges: list[tuple[str, str]] = []
            while not (i < n and glob[i] == "]" and ranges):
                lo, i = class_char(i)
                hi = lo
                if glob[i] == "-":
                    hi, i = class_char(i + 1)
                ranges.append((lo, hi))
            # A reversed range (z-a) matches nothing in Go; Python's re would refuse it.
            body = "".join(
                re.escape(lo) if lo == hi else f"{re.escape(lo)}-{re.escape(hi)}"
                for lo, hi in ranges
                if lo <= hi
            )
            if negated:
                out.append(f"[^{body}]" if body else ".")
            else:
                out.append(f"[{body}]" if body else "(?!)")
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def go_clean(path: str) -> str:
    """Go's ``filepath.Clean`` on Unix (``posixpath.normpath`` keeps a leading ``//``; Go does not)."""
    cleaned = posixpath.normpath(path)
    if cleaned.startswith("//"):
        cleaned = "/" + cleaned.lstrip("/")
    return cleaned


def split_path(path: str) -> list[str]:
    """restic's component list of a path: an absolute path starts with the root marker ``/``."""
    parts = path.split("/")
    if parts[0] == "":
        parts[0] = "/"
    return parts


class _Part:
    __slots__ = ("text", "regex", "double_star")

    def __init__(self, text: str, pattern: str) -> None:
        self.text = text
        self.double_star = text == "**"
        simple = self.double_star or not (_GLOB_CHARS & set(text))
        self.regex = None if simple else _glob_to_regex(text, pattern)

    def matches(self, component: str) -> bool:
        if self.regex is None:
            return self.text == component
        return self.regex.fullmatch(component) is not None


_ANY = _Part("*", "*")


class Pattern:
    """One parsed pattern. ``match(components)`` takes ``split_path`` of an absolute path."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.negated = text.startswith("!")
        body = text[1:] if self.negated else text
        if not body:
            raise _bad(text, "nothing after '!'")
        self.parts = [_Part(p, text) for p in split_path(go_clean(body))]

    def match(self, components: list[str]) -> bool:
        return _match(self.parts, components)

    def __repr__(self) -> str:
        return f"Pattern({self.text!r})"


def _match(parts: list[_Part], strs: list[str]) -> bool:
    star = next((i for i, p in enumerate(parts) if p.double_star), -1)
    if star >= 0:
        # "**" is zero or more components: try it as 0, 1, 2 ... single-component wildcards.
        for k in range(len(strs) - len(parts) + 2):
            if _match(parts[:star] + [_ANY] * k + parts[star + 1 :], strs):
                return True
        return False
    if not parts:
        return not strs
    if len(parts) > len(strs):
        return False
    lowest, highest = 0, len(strs) - len(parts)
    if parts[0].text == "/":
        highest = 0  # anchored at the root
    elif strs[0] == "/":
        lowest = 1  # a relative pattern never matches the root marker itself
    for offset in range(highest, lowest - 1, -1):
        if all(parts[i].matches(strs[offset + i]) for i in range(len(parts) - 1, -1, -1)):
            return True
    return False


def parse_patterns(patterns: Iterable[str]) -> list[Pattern]:
    """Parse patterns in order (empty ones are ignored). Raises UsageError for a malformed one."""
    return [Pattern(p) for p in patterns if p]


def matches_any(patterns: list[Pattern], path: str) -> bool:
    """restic's ``filter.List``: whether the patterns, applied in order with ``!`` taking back earlier
    matches, match the absolute ``path``."""
    if not patterns:
        return False
    strs = split_path(path)
    negations = any(p.negated for p in patterns)
    matched = False
    for pattern in patterns:
        if pattern.negated:
            if matched and pattern.match(strs):
                matched = False
        elif not matched and pattern.match(strs):
            matched = True
            if not negations:
                break
    return matched


def expand_env(text: str, env: Mapping[str, str] | None = None) -> str:
    """Go's ``os.Expand`` with the environment as restic's exclude files use it: ``$VAR`` and ``${VAR}``
    become the value (unset: empty), ``$$`` a single ``$``, a lone ``$`` at the end stays."""
    env = os.environ if env is None else env
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] == "$" and i + 1 < n:
            name, width = _shell_name(text[i + 1 :])
            if name == "$":
                out.append("$")
            elif name:
                out.append(env.get(name, ""))
            elif width == 0:
                out.append("$")  # not a variable reference: keep the dollar
            i += 1 + width
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


_SPECIAL = frozenset("*#$@!?-0123456789")


def _shell_name(s: str) -> tuple[str, int]:
    if s[0] == "{":
        if len(s) > 2 and s[1] in _SPECIAL and s[2] == "}":
            return s[1], 3
        end = s.find("}", 1)
        if end == 1:
            return "", 2  # "${}": bad syntax, eaten
        if end < 0:
            return "", 1  # no closing brace: bad syntax, the brace is eaten
        return s[1:end], end + 1
    if s[0] in _SPECIAL:
        return s[0], 1
    i = 0
    while i < len(s) and (s[i].isascii() and (s[i].isalnum() or s[i] == "_")):
        i += 1
    return s[:i], i


def read_exclude_file(path: str | os.PathLike[str]) -> list[str]:
    """The patterns of one exclude file (see the module docstring). Raises UsageError if unreadable."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise UsageError(f"cannot read exclude file {os.fspath(path)}: {exc.strerror}") from None
    text = raw.decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        out.append(expand_env(line))
    return out


class DeviceRule:
    """``--one-file-system``: which items live on a device one of the targets allows.

    ``targets`` are absolute, clean paths. Raises OSError when a target cannot be examined.
    """

    def __init__(self, targets: Iterable[str]) -> None:
        self.allowed: dict[str, int] = {}
        for target in targets:
            self.allowed[target] = os.lstat(os.fsencode(target)).st_dev

    def _allowed(self, path: str, device: int) -> bool | None:
        folder = path
        while True:
            dev = self.allowed.get(folder)
            if dev is not None:
                return dev == device
            parent = posixpath.dirname(folder)
            if parent == folder:
                return None  # not below any target: not ours to judge
            folder = parent

    def rejects(self, path: str, device: int, is_dir: bool) -> bool:
        """True when the item at absolute ``path`` on ``device`` is to be left out."""
        allowed = self._allowed(path, device)
        if allowed is None or allowed:
            return False
        if not is_dir:
            return True
        # A folder on another device whose parent is on an allowed one is a mount point: kept, empty.
        parent = posixpath.dirname(path)
        try:
            parent_dev = os.lstat(os.fsencode(parent)).st_dev
        except OSError:
            return True
        return not self._allowed(parent, parent_dev)


class Excluder:
    """All exclude rules of one backup. ``excluded_by_name`` needs only the path (checked before
    ``lstat``, as restic does); ``excluded_by_device`` needs the item's device."""

    def __init__(
        self,
        patterns: Iterable[str] = (),
        exclude_files: Iterable[str | os.PathLike[str]] = (),
        *,
        one_file_system_targets: Iterable[str] | None = None,
    ) -> None:
        texts = list(patterns)
        for path in exclude_files:
            texts += read_exclude_file(path)
        self.patterns = parse_patterns(texts)
        self.devices = (
            DeviceRule(one_file_system_targets) if one_file_system_targets is not None else None
        )

    def excluded_by_name(self, path: str) -> bool:
        return matches_any(self.patterns, path)

    def excluded_by_device(self, path: str, device: int, is_dir: bool) -> bool:
        return self.devices is not None and self.devices.rejects(path, device, is_dir)


__all__ = [
    "DeviceRule",
    "Excluder",
    "Pattern",
    "expand_env",
    "go_clean",
    "matches_any",
    "parse_patterns",
    "read_exclude_file",
    "split_path",
]
