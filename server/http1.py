"""HTTP/1.1 for the bucket server, without I/O: request heads, chunked request bodies, response heads.

The connection code (``protocol.py``) finds where a head ends (``head_end``), hands the head's bytes to
``parse_head`` and gets a ``RequestHead`` or a ``ProtocolError`` that carries the status to answer. A
chunked body goes through a ``ChunkedDecoder`` fed with received bytes. ``response_head`` writes the
bytes of a response head. Nothing here reads or writes a socket, so every rule is tested by pushing
bytes in.

It replaces h11, which did the same and more. h11 validated every head twice (once as bytes, again
when building its event objects) and ran a state machine per message; on a 4 KiB range read that was
about 40% of the server's CPU time. The rules kept from RFC 9112, all of them checks that stop
request smuggling or a head the server would misread:

* the request line is ``METHOD SP TARGET SP HTTP/1.x`` with a token method and a target of visible
  ASCII; other versions get 505, anything else 400;
* a header line is ``token ":" OWS value OWS``, with no space before the colon, no line folding and
  no NUL, CR, LF, vertical tab or form feed in the value;
* bare LF line endings are refused; empty lines before the request line are skipped;
* Content-Length is digits only, repeated only with the same value; Transfer-Encoding is "chunked"
  alone (anything else 501), not with Content-Length, not in HTTP/1.0;
* an HTTP/1.1 request has exactly one Host header;
* a head is at most ``MAX_HEAD`` bytes (431).

A chunked body's size lines and trailers are bounded too; chunk extensions and trailer fields are
read and dropped (nothing in the restic protocol uses them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from http import HTTPStatus

#: Largest request head accepted (431 beyond).
MAX_HEAD = 16 * 1024
#: Largest chunk-size line (size, extensions) and largest trailer section of a chunked body.
MAX_CHUNK_LINE = 4096
MAX_TRAILERS = MAX_HEAD

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/(\d)\.(\d)")
#: name, then the rest of the line (the value with the optional white space around it).
_HEADER_LINE = re.compile(rb"(" + _TOKEN + rb"):(.*)", re.DOTALL)
#: What a value may not hold. Like h11, other control characters than these are let through
#: (RFC 9110 allows that for robustness); they are never echoed unescaped. Checked apart from
#: the line's grammar: one pattern for both backtracks quadratically on long runs of spaces.
_BAD_VALUE = re.compile(rb"[\x00\n\r\x0b\x0c]")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?")


class ProtocolError(Exception):
    """The client broke HTTP/1.1; ``status`` is what to answer (the connection then ends)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class RequestHead:
    method: str
    target: str
    #: Lower-case names; a header given more than once has its values joined with ", ".
    headers: dict[str, str]
    #: None when the head announces no Content-Length.
    content_length: int | None
    chunked: bool
    #: Whether the client lets the connection serve another request after this one.
    keep_alive: bool
    #: The client waits for "100 Continue" before it sends the body.
    expect_continue: bool

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


def head_end(buffer: bytes | bytearray, start: int = 0) -> int:
    """Index just past the blank line that ends the head at the start of ``buffer`` (``start``: how
    far an earlier search got), or -1 when it has not all arrived. Empty lines before the request
    line must be dropped first (``drop_empty_lines``)."""
    at = buffer.find(b"\r\n\r\n", max(0, start - 3))
    return -1 if at < 0 else at + 4


def drop_empty_lines(buffer: bytearray) -> int:
    """Remove the empty lines (CRLF) at the start of ``buffer``, which a client may send before a
    request line; how many bytes went."""
    n = 0
    while buffer.startswith(b"\r\n", n):
        n += 2
    del buffer[:n]
    return n


def parse_head(data: bytes | bytearray) -> RequestHead:
    """Parse a request head: the bytes up to and including the blank line that ends it. Raises
    ProtocolError."""
    if len(data) > MAX_HEAD:
        raise ProtocolError("request head too long", 431)
    text = bytes(data)
    while text.startswith(b"\r\n"):
        text = text[2:]
    if not text.endswith(b"\r\n\r\n"):
        raise ProtocolError("request head does not end with an empty line")
    # The patterns below admit no CR or LF, so a bare one anywhere makes its line malformed.
    lines = text[:-4].split(b"\r\n")
    match = _REQUEST_LINE.fullmatch(lines[0])
    if match is None:
        raise ProtocolError("malformed request line")
    method, target, major, minor = match.groups()
    if major != b"1":
        raise ProtocolError("HTTP version not supported", 505)
    http10 = minor == b"0"
    headers: dict[str, str] = {}
    lengths: set[bytes] = set()
    hosts = 0
    for line in lines[1:]:
        raw_name, raw_value = _header(line)
        name = raw_name.decode("ascii").lower()
        value = raw_value.decode("latin-1")
        if name == "content-length":
            lengths.update(part.strip(b" \t") for part in raw_value.split(b","))
        elif name == "host":
            hosts += 1
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    content_length = _content_length(lengths) if lengths else None
    encoding = headers.get("transfer-encoding")
    chunked = encoding is not None
    if encoding is not None:
        if encoding.strip(" \t").lower() != "chunked":
            raise ProtocolError("transfer encoding not supported", 501)
        if content_length is not None or http10:
            raise ProtocolError("Transfer-Encoding with Content-Length or in HTTP/1.0")
    if not http10 and hosts != 1:
        raise ProtocolError("an HTTP/1.1 request needs exactly one Host header")
    connection = {t.strip(" \t").lower() for t in headers.get("connection", "").split(",")}
    return RequestHead(
        method=method.decode("ascii"),
        target=target.decode("ascii"),
        headers=headers,
        content_length=content_length,
        chunked=chunked,
        keep_alive=not http10 and "close" not in connection,
        expect_continue=not http10
        and headers.get("expect", "").strip(" \t").lower() == "100-continue",
    )


def _header(line: bytes) -> tuple[bytes, bytes]:
    """(name, value) of a header line, the value without the white space around it."""
    field = _HEADER_LINE.fullmatch(line)
    if field is None:
        raise ProtocolError("malformed header line")
    name, value = field.groups()
    value = value.strip(b" \t")
    if _BAD_VALUE.search(value) is not None:
        raise ProtocolError("control character in a header value")
    return name, value


def _content_length(values: set[bytes]) -> int:
    if len(values) != 1:
        raise ProtocolError("conflicting Content-Length values")
    (value,) = values
    if not value.isdigit() or not value.isascii() or len(value) > 18:
        raise ProtocolError("malformed Content-Length")
    return int(value)


class ChunkedDecoder:
    """Decodes one chunked body. Feed received bytes with ``receive_data``; ``next_piece`` returns
    the next piece of the body (bytes), ``None`` when more bytes are needed, or ``b""`` at the end of
    the body, after which ``unused`` holds what followed it (a pipelined request). Raises
    ProtocolError."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._left = 0  # data bytes of the current chunk still to come
        self._state = "size"  # size, data, data-end, trailers, done

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer += data

    @property
    def done(self) -> bool:
        return self._state == "done"

    @property
    def unused(self) -> bytes:
        return bytes(self._buffer) if self._state == "done" else b""

    def next_piece(self) -> bytes | None:
        while True:
            buffer = self._buffer
            if self._state == "size":
                end = buffer.find(b"\r\n", 0, MAX_CHUNK_LINE + 2)
                if end < 0:
                    if _past_limit(buffer, MAX_CHUNK_LINE, b"\r\n"):
                        raise ProtocolError("chunk size line too long")
                    return None
                match = _CHUNK_SIZE.fullmatch(buffer, 0, end)
                if match is None:
                    raise ProtocolError("malformed chunk size")
                self._left = int(match.group(1), 16)
                del buffer[: end + 2]
                self._state = "data" if self._left else "trailers"
            elif self._state == "data":
                if not buffer:
                    return None
                piece = bytes(buffer[: self._left])
                del buffer[: len(piece)]
                self._left -= len(piece)
                if not self._left:
                    self._state = "data-end"
                return piece
            elif self._state == "data-end":
                if len(buffer) < 2:
                    return None
                if buffer[:2] != b"\r\n":
                    raise ProtocolError("chunk data longer than its size")
                del buffer[:2]
                self._state = "size"
            elif self._state == "trailers":
                if buffer[:2] == b"\r\n":
                    del buffer[:2]
                    self._state = "done"
                    return b""
                end = buffer.find(b"\r\n\r\n", 0, MAX_TRAILERS + 4)
                if end < 0:
                    if _past_limit(buffer, MAX_TRAILERS, b"\r\n\r\n"):
                        raise ProtocolError("chunked body trailers too long", 431)
                    return None
                for line in bytes(buffer[:end]).split(b"\r\n"):
                    _header(line)
                del buffer[: end + 4]
                self._state = "done"
                return b""
            else:
                return b""


def _past_limit(buffer: bytearray, limit: int, end: bytes) -> bool:
    """For a ``buffer`` without ``end`` in its first ``limit + len(end)`` bytes: whether it shows
    already that ``end`` cannot start at or before ``limit`` (rather than having arrived in part)."""
    first = max(0, len(buffer) - len(end) + 1)
    return len(buffer) > limit and not any(
        end.startswith(buffer[at:]) for at in range(first, limit + 1)
    )


_STATUS_LINES = {int(s): f"HTTP/1.1 {s.value} {s.phrase}\r\n" for s in HTTPStatus}
_SAFE_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


def response_head(status: int, headers: list[tuple[str, str]]) -> bytes:
    """The bytes of a response head. ``headers`` are the server's own (names are tokens); a value with
    a line break or another control character is a bug and raises ValueError."""
    line = _STATUS_LINES.get(status) or f"HTTP/1.1 {status} \r\n"
    parts = [line]
    for name, value in headers:
        if _SAFE_VALUE.fullmatch(value) is None:
            raise ValueError(f"response header {name} has a control character")
        parts.append(f"{name}: {value}\r\n")
    parts.append("\r\n")
    return "".join(parts).encode("latin-1")


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
