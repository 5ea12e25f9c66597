"""Go-compatible encodings that restic's JSON depends on, byte for byte.

- ``json_string``: Go ``encoding/json`` string encoding (HTML-safe escapes ``<`` ``>`` ``&``, U+2028/U+2029,
  invalid UTF-8 replaced by U+FFFD, control characters as ``\\n``, ``\\r``, ``\\t`` or ``\\u00XX``).
- ``go_quote`` / ``go_unquote``: ``strconv.Quote`` without the outer quotes, which restic applies to node names
  before JSON encoding them, and its inverse. Names are handled as bytes, since file names need not be UTF-8.
- ``GoTime``: an RFC 3339 time with nanoseconds and a UTC offset, formatted like Go's ``time.RFC3339Nano``.

Any change here changes tree blob IDs, so everything is covered by known-answer tests against restic.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache

from vaultfs.errors import FormatError

_JSON_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
for _c in range(0x20):
    _JSON_ESCAPES.setdefault(chr(_c), f"\\u{_c:04x}")
_JSON_NEEDS_ESCAPE = re.compile('["\\\\<>&\u2028\u2029\x00-\x1f]')


def json_string(value: str | bytes) -> str:
    """Encode a string as Go's encoding/json does (with the quotes)."""
    if isinstance(value, str) and value.isascii() and _JSON_NEEDS_ESCAPE.search(value) is None:
        return '"' + value + '"'  # the common case: nothing to replace or escape
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    else:
        # Lone surrogates (from surrogateescape) are invalid UTF-8 to Go: they become U+FFFD.
        value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return '"' + _JSON_NEEDS_ESCAPE.sub(lambda m: _JSON_ESCAPES[m.group()], value) + '"'


_QUOTE_SHORT = {7: "\\a", 8: "\\b", 12: "\\f", 10: "\\n", 13: "\\r", 9: "\\t", 11: "\\v"}


def _go_isprint(ch: str) -> bool:
    # Go's unicode.IsPrint: letters, marks, numbers, punctuation, symbols and the ASCII space. Python's
    # isprintable() excludes exactly the other categories (C*, Z*) but keeps the ASCII space: the same set.
    return ch.isprintable()


def go_quote(name: bytes) -> str:
    """strconv.Quote(name) without the surrounding quotes; the result is ASCII plus printable Unicode."""
    if name.isascii():
        text = name.decode("ascii")
        if text.isprintable() and '"' not in text and "\\" not in text:
            return text
    out: list[str] = []
    for ch in name.decode("utf-8", "surrogateescape"):
        cp = ord(ch)
        if 0xDC80 <= cp <= 0xDCFF:  # an undecodable byte
            out.append(f"\\x{cp - 0xDC00:02x}")
        elif ch == '"' or ch == "\\":
            out.append("\\" + ch)
        elif _go_isprint(ch):
            out.append(ch)
        elif cp in _QUOTE_SHORT:
            out.append(_QUOTE_SHORT[cp])
        elif cp < 0x20 or cp == 0x7F:
            out.append(f"\\x{cp:02x}")
        elif cp < 0x10000:
            out.append(f"\\u{cp:04x}")
        else:
            out.append(f"\\U{cp:08x}")
    return "".join(out)


_UNQUOTE_SIMPLE = {
    "a": b"\a",
    "b": b"\b",
    "f": b"\f",
    "n": b"\n",
    "r": b"\r",
    "t": b"\t",
    "v": b"\v",
    "\\": b"\\",
    '"': b'"',
    "'": b"'",
}


def go_unquote(quoted: str) -> bytes:
    """Inverse of go_quote. Raises FormatError on an invalid escape."""
    if "\\" not in quoted:
        return quoted.encode("utf-8", "surrogateescape")
    out = bytearray()
    i = 0
    n = len(quoted)
    while i < n:
        ch = quoted[i]
        if ch != "\\":
            out += ch.encode("utf-8", "surrogateescape")
            i += 1
            continue
        if i + 1 >= n:
            raise FormatError(f"invalid escape at end of name {quoted!r}")
        code = quoted[i + 1]
        try:
            if code in _UNQUOTE_SIMPLE:
                out += _UNQUOTE_SIMPLE[code]
                i += 2
            elif code == "x":
                out.append(int(quoted[i + 2 : i + 4], 16))
                i += 4
            elif code == "u":
                out += chr(int(quoted[i + 2 : i + 6], 16)).encode("utf-8", "surrogatepass")
                i += 6
            elif code == "U":
                out += chr(int(quoted[i + 2 : i + 10], 16)).encode("utf-8", "surrogatepass")
                i += 10
            elif code in "01234567":
                out.append(int(quoted[i + 1 : i + 4], 8) & 0xFF)
                i += 4
            else:
                raise ValueError(code)
        except ValueError:
            raise FormatError(f"invalid escape in name {quoted!r}") from None
    return bytes(out)


_TIME_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})$"
)


_EPOCH = datetime(1970, 1, 1)


@lru_cache(maxsize=4096)
def _day_number(date: str) -> int:
    """Days since 1970-01-01 of "YYYY-MM-DD" (cached: a tree's times share few dates)."""
    if not (date[:4].isdigit() and date[5:7].isdigit() and date[8:10].isdigit()):
        raise ValueError(date)
    return (datetime(int(date[:4]), int(date[5:7]), int(date[8:10])) - _EPOCH).days


@dataclass(frozen=True, slots=True)
class GoTime:
    """A point in time with nanosecond precision and the UTC offset it was written with."""

    ns: int  # nanoseconds since the Unix epoch (UTC)
    offset: int = 0  # seconds east of UTC

    @classmethod
    def local(cls, ns: int) -> GoTime:
        """The time in this machine's local zone, as Go's time.Unix() would show it."""
        return cls(ns, time.localtime(ns // 1_000_000_000).tm_gmtoff)

    @classmethod
    def now(cls) -> GoTime:
        return cls.local(time.time_ns())

    @classmethod
    def parse(cls, text: str) -> GoTime:
        # Fast path for the common shape "YYYY-MM-DDTHH:MM:SS[.frac](Z|+hh:mm)": tree walks parse three
        # times per node, so this is hot. Anything unusual goes through the regular expression.
        if isinstance(text, str) and len(text) >= 20 and text[4] == "-" and text[10] == "T":
            try:
                day = _day_number(text[:10])
                secs = int(text[11:13]) * 3600 + int(text[14:16]) * 60 + int(text[17:19])
                rest = text[19:]
                nanos = 0
                if rest[0] == ".":
                    end = 1
                    while end < len(rest) and rest[end].isdigit():
                        end += 1
                    frac = rest[1:end]
                    if not 1 <= len(frac) <= 9:
                        raise ValueError(text)
                    nanos = int(frac.ljust(9, "0"))
                    rest = rest[end:]
                if rest == "Z":
                    offset = 0
                elif len(rest) == 6 and rest[0] in "+-" and rest[3] == ":":
                    offset = (int(rest[1:3]) * 3600 + int(rest[4:6]) * 60) * (
                        1 if rest[0] == "+" else -1
                    )
                else:
                    raise ValueError(text)
                if text[13] == ":" == text[16] and secs < 86400 and text[7] == "-":
                    return cls((day * 86400 + secs - offset) * 1_000_000_000 + nanos, offset)
            except (ValueError, IndexError):
                pass
        m = _TIME_RE.match(text) if isinstance(text, str) else None
        if not m:
            raise FormatError(f"invalid time {text!r}")
        y, mo, d, h, mi, s = (int(m.group(i)) for i in range(1, 7))
        frac = m.group(7) or ""
        nanos = int(frac.ljust(9, "0")) if frac else 0
        tz = m.group(8)
        offset = (
            0
            if tz == "Z"
            else (1 if tz[0] == "+" else -1) * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
        )
        try:
            secs = (datetime(y, mo, d, h, mi, s) - _EPOCH) // timedelta(seconds=1) - offset
        except (ValueError, OverflowError):
            raise FormatError(f"invalid time {text!r}") from None
        return cls(secs * 1_000_000_000 + nanos, offset)

    def format(self) -> str:
        """Go's RFC3339Nano: fraction without trailing zeros (none if zero), "Z" for a zero offset."""
        secs, nanos = divmod(self.ns, 1_000_000_000)
        try:
            t = _EPOCH + timedelta(seconds=secs + self.offset)
        except OverflowError:
            raise FormatError(f"time out of range ({self.ns} ns)") from None
        text = f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}"
        if nanos:
            text += "." + f"{nanos:09d}".rstrip("0")
        if self.offset == 0:
            return text + "Z"
        sign = "+" if self.offset > 0 else "-"
        hours, rest = divmod(abs(self.offset), 3600)
        return f"{text}{sign}{hours:02d}:{rest // 60:02d}"

    @property
    def seconds(self) -> float:
        return self.ns / 1e9

    def __str__(self) -> str:
        return self.format()
