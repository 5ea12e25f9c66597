"""The sans-I/O HTTP/1.1 codec (``vaultfs.server.http1``): bytes go in, heads, body pieces, refusals
(with the status to answer) and response bytes come out. No socket, no server."""

from __future__ import annotations

import re
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vaultfs.server.http1 import (
    CONTINUE,
    MAX_CHUNK_LINE,
    MAX_HEAD,
    MAX_TRAILERS,
    ChunkedDecoder,
    ProtocolError,
    RequestHead,
    drop_empty_lines,
    head_end,
    parse_head,
    response_head,
)

GET = b"GET /bucket/data/ab12?x=1 HTTP/1.1\r\nHost: example.org\r\n\r\n"


def head(*lines: bytes, version: bytes = b"1.1", method: bytes = b"PUT") -> bytes:
    """A request head for ``/t`` with these header lines (and nothing added: no Host)."""
    request_line = method + b" /t HTTP/" + version + b"\r\n"
    return request_line + b"".join(line + b"\r\n" for line in lines) + b"\r\n"


def refusal(data: bytes) -> int:
    with pytest.raises(ProtocolError) as info:
        parse_head(data)
    return info.value.status


# -- finding the head ---------------------------------------------------------------------------


def test_head_end_is_just_past_the_blank_line():
    data = GET + b"PUT /next"
    assert head_end(data) == len(GET)


def test_head_end_is_minus_one_until_the_blank_line_arrives():
    for n in range(len(GET)):
        assert head_end(GET[:n]) == -1, n


def test_head_end_resumes_when_bytes_arrive_one_at_a_time():
    buffer = bytearray()
    searched = 0
    ends = []
    for byte in GET:
        buffer.append(byte)
        ends.append(head_end(buffer, searched))
        searched = len(buffer)
    # -1 until the last byte of the blank line arrives, though no search looks at a byte twice.
    assert ends == [-1] * (len(GET) - 1) + [len(GET)]


def test_head_end_resumes_when_the_blank_line_is_split_across_searches():
    for cut in range(len(GET) - 4, len(GET)):
        assert head_end(GET[:cut]) == -1
        assert head_end(GET + b"PUT", cut) == len(GET), cut


@pytest.mark.parametrize(
    ("data", "removed", "left"),
    [
        (b"\r\n\r\n" + GET, 4, GET),
        (b"\r\n" + GET, 2, GET),
        (GET, 0, GET),
        (b"\r\n\r", 2, b"\r"),
        (b"\r\n\n" + GET, 2, b"\n" + GET),
        (b"", 0, b""),
    ],
)
def test_drop_empty_lines_removes_only_the_leading_crlfs(data, removed, left):
    buffer = bytearray(data)
    assert drop_empty_lines(buffer) == removed
    assert buffer == left


def test_empty_lines_then_a_head_parse_once_dropped():
    buffer = bytearray(b"\r\n\r\n\r\n" + GET)
    drop_empty_lines(buffer)
    end = head_end(buffer)
    assert end == len(GET)
    assert parse_head(buffer[:end]).method == "GET"


# -- a well-formed head -------------------------------------------------------------------------


def test_get_head():
    parsed = parse_head(
        b"GET /bucket/keys/ HTTP/1.1\r\n"
        b"Host: example.org\r\n"
        b"Accept: application/json\r\n"
        b"X-Custom-Thing:a\r\n"
        b"ACCEPT: text/plain\r\n"
        b"\r\n"
    )
    assert isinstance(parsed, RequestHead)
    assert parsed.method == "GET"
    assert parsed.target == "/bucket/keys/"
    assert parsed.headers == {
        "host": "example.org",
        "accept": "application/json, text/plain",
        "x-custom-thing": "a",
    }
    assert parsed.keep_alive is True
    assert parsed.content_length is None
    assert parsed.chunked is False
    assert parsed.has_body is False
    assert parsed.expect_continue is False


def test_head_from_a_memoryview_as_the_connection_passes_it():
    buffer = bytearray(GET + b"next")
    parsed = parse_head(memoryview(buffer)[: head_end(buffer)])
    assert (parsed.method, parsed.target) == ("GET", "/bucket/data/ab12?x=1")


@pytest.mark.parametrize(
    ("line", "value"),
    [
        (b"X: a", "a"),
        (b"X:a", "a"),
        (b"X: \t a b\t c \t ", "a b\t c"),
        (b"X:", ""),
        (b"X:   ", ""),
        (b"X: caf\xe9", "caf\xe9"),
        (b"X: a\x01b", "a\x01b"),
    ],
)
def test_header_value_loses_surrounding_white_space_only(line, value):
    assert parse_head(head(b"Host: h", line)).headers["x"] == value


@pytest.mark.parametrize(
    ("lines", "length", "has_body"),
    [
        ([b"Content-Length: 5"], 5, True),
        ([b"Content-Length: 0"], 0, False),
        ([b"Content-Length: 5, 5"], 5, True),
        ([b"Content-Length: 5,5 ,\t5"], 5, True),
        ([b"Content-Length: 5", b"Content-Length: 5"], 5, True),
        ([b"Content-Length: 007"], 7, True),
        ([b"Content-Length: " + b"9" * 18], 10**18 - 1, True),
    ],
)
def test_content_length_accepted(lines, length, has_body):
    parsed = parse_head(head(b"Host: h", *lines))
    assert parsed.content_length == length
    assert parsed.chunked is False
    assert parsed.has_body is has_body


@pytest.mark.parametrize("value", [b"chunked", b"Chunked", b"CHUNKED ", b"\tchunked"])
def test_chunked_transfer_encoding(value):
    parsed = parse_head(head(b"Host: h", b"Transfer-Encoding: " + value))
    assert parsed.chunked is True
    assert parsed.content_length is None
    assert parsed.has_body is True


def test_http10_needs_no_host():
    parsed = parse_head(b"GET / HTTP/1.0\r\n\r\n")
    assert parsed.target == "/"
    assert parsed.headers == {}


def test_head_of_exactly_max_head_bytes_is_accepted():
    base = head(b"Host: h", b"X: ")
    data = base[:-4] + b"a" * (MAX_HEAD - len(base)) + b"\r\n\r\n"
    assert len(data) == MAX_HEAD
    assert parse_head(data).headers["x"] == "a" * (MAX_HEAD - len(base))


# -- connection, expect -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "lines", "keep_alive"),
    [
        (b"1.1", [], True),
        (b"1.1", [b"Connection: keep-alive"], True),
        (b"1.1", [b"Connection: close"], False),
        (b"1.1", [b"Connection: Close"], False),
        (b"1.1", [b"Connection: upgrade, close"], False),
        (b"1.1", [b"Connection: te", b"Connection: close"], False),
        (b"1.1", [b"Connection: closed"], True),
        (b"1.0", [], False),
        (b"1.0", [b"Connection: keep-alive"], False),
    ],
)
def test_keep_alive(version, lines, keep_alive):
    assert parse_head(head(b"Host: h", *lines, version=version)).keep_alive is keep_alive


@pytest.mark.parametrize(
    ("version", "value", "expected"),
    [
        (b"1.1", b"100-continue", True),
        (b"1.1", b"100-Continue", True),
        (b"1.1", b"100-CONTINUE ", True),
        (b"1.1", b"200-ok", False),
        (b"1.0", b"100-continue", False),
    ],
)
def test_expect_continue(version, value, expected):
    parsed = parse_head(head(b"Host: h", b"Expect: " + value, version=version))
    assert parsed.expect_continue is expected


def test_no_expect_header_means_no_continue():
    assert parse_head(head(b"Host: h")).expect_continue is False


# -- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "status"),
    [
        pytest.param(b"GET /\r\nHost: h\r\n\r\n", 400, id="no-version"),
        pytest.param(b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n", 400, id="two-spaces"),
        pytest.param(b"GET / HTTP/1.1 \r\nHost: h\r\n\r\n", 400, id="trailing-space"),
        pytest.param(b"GET / http/1.1\r\nHost: h\r\n\r\n", 400, id="lower-case-http"),
        pytest.param(b"GET / HTTP/1\r\nHost: h\r\n\r\n", 400, id="no-minor"),
        pytest.param(b"/ HTTP/1.1\r\nHost: h\r\n\r\n", 400, id="no-method"),
        pytest.param(b'G"T / HTTP/1.1\r\nHost: h\r\n\r\n', 400, id="non-token-method"),
        pytest.param(b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n", 400, id="paren-in-method"),
        pytest.param(b"GET /a b HTTP/1.1\r\nHost: h\r\n\r\n", 400, id="space-in-target"),
        pytest.param(b"GET /a\x7fb HTTP/1.1\r\nHost: h\r\n\r\n", 400, id="del-in-target"),
        pytest.param(b"GET /caf\xe9 HTTP/1.1\r\nHost: h\r\n\r\n", 400, id="non-ascii-target"),
        pytest.param(b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505, id="http2"),
        pytest.param(b"GET / HTTP/0.9\r\nHost: h\r\n\r\n", 505, id="http09"),
        pytest.param(head(), 400, id="no-host"),
        pytest.param(head(b"Host: a", b"Host: a"), 400, id="two-hosts"),
        pytest.param(head(b"Host : h"), 400, id="space-before-colon"),
        pytest.param(head(b"Host\t: h"), 400, id="tab-before-colon"),
        pytest.param(head(b"Host: h", b"X: a", b" folded"), 400, id="obs-fold-space"),
        pytest.param(head(b"Host: h", b"X: a", b"\tfolded"), 400, id="obs-fold-tab"),
        pytest.param(head(b"Host: h", b"X a"), 400, id="no-colon"),
        pytest.param(head(b"Host: h", b": a"), 400, id="empty-name"),
        pytest.param(head(b"Host: h", b"X-\xe9: a"), 400, id="non-token-name"),
        pytest.param(head(b"Host: h", b"X: a\x00b"), 400, id="nul-in-value"),
        pytest.param(head(b"Host: h", b"X: a\rb"), 400, id="bare-cr-in-value"),
        pytest.param(head(b"Host: h", b"X: a\nb"), 400, id="bare-lf-in-value"),
        pytest.param(head(b"Host: h", b"X: a\r"), 400, id="bare-cr-ends-value"),
        pytest.param(b"GET / HTTP/1.1\nHost: h\r\n\r\n", 400, id="bare-lf-line-end"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: h\n\r\n", 400, id="bare-lf-before-blank"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: h\r\n", 400, id="no-blank-line"),
        pytest.param(b"\r\n\r\n", 400, id="only-empty-lines"),
        pytest.param(head(b"Host: h", b"Content-Length: -1"), 400, id="cl-negative"),
        pytest.param(head(b"Host: h", b"Content-Length: +5"), 400, id="cl-plus"),
        pytest.param(head(b"Host: h", b"Content-Length: five"), 400, id="cl-word"),
        pytest.param(head(b"Host: h", b"Content-Length: 0x10"), 400, id="cl-hex"),
        pytest.param(head(b"Host: h", b"Content-Length: 1 2"), 400, id="cl-inner-space"),
        pytest.param(head(b"Host: h", b"Content-Length:"), 400, id="cl-empty"),
        pytest.param(head(b"Host: h", b"Content-Length: 5,"), 400, id="cl-trailing-comma"),
        pytest.param(head(b"Host: h", b"Content-Length: 5, 6"), 400, id="cl-list-conflict"),
        pytest.param(
            head(b"Host: h", b"Content-Length: 5", b"Content-Length: 6"), 400, id="cl-two-conflict"
        ),
        pytest.param(head(b"Host: h", b"Content-Length: " + b"9" * 19), 400, id="cl-too-long"),
        pytest.param(head(b"Host: h", b"Transfer-Encoding: gzip"), 501, id="te-gzip"),
        pytest.param(head(b"Host: h", b"Transfer-Encoding: gzip, chunked"), 501, id="te-list"),
        pytest.param(
            head(b"Host: h", b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"),
            501,
            id="te-twice",
        ),
        pytest.param(head(b"Host: h", b"Transfer-Encoding:"), 501, id="te-empty"),
        pytest.param(
            head(b"Host: h", b"Transfer-Encoding: chunked", b"Content-Length: 5"),
            400,
            id="te-and-cl",
        ),
        pytest.param(
            head(b"Content-Length: 5", b"Host: h", b"Transfer-Encoding: chunked"),
            400,
            id="cl-and-te",
        ),
        pytest.param(head(b"Transfer-Encoding: chunked", version=b"1.0"), 400, id="te-in-http10"),
    ],
)
def test_refused_head(data, status):
    assert refusal(data) == status


def test_head_longer_than_max_head_is_431():
    base = head(b"Host: h", b"X: ")
    data = base[:-4] + b"a" * (MAX_HEAD - len(base) + 1) + b"\r\n\r\n"
    assert len(data) == MAX_HEAD + 1
    assert refusal(data) == 431


def test_protocol_error_defaults_to_400():
    assert ProtocolError("x").status == 400
    assert ProtocolError("x", 505).status == 505


def test_a_long_run_of_spaces_before_a_bad_or_good_byte():
    """A head-sized run of spaces inside a value, then a NUL: refused; then a letter: the value.
    (The line's grammar and the value's characters are checked apart: one pattern for both
    backtracked quadratically here, about 0.7 s of CPU per 16 KiB head.)"""
    base = head(b"Host: h", b"X:")
    data = base[:-4] + b" " * (MAX_HEAD - len(base) - 1) + b"\x00\r\n\r\n"
    assert len(data) == MAX_HEAD
    assert refusal(data) == 400
    good = base[:-4] + b" " * (MAX_HEAD - len(base) - 1) + b"v\r\n\r\n"
    assert parse_head(good).headers["x"] == "v"


HTTP_PIECES = [
    b"GET",
    b"PUT",
    b'G"T',
    b" ",
    b"\t",
    b"/",
    b"/a?b",
    b"HTTP/1.1",
    b"HTTP/1.0",
    b"HTTP/2.0",
    b"\r\n",
    b"\r",
    b"\n",
    b"\x00",
    b":",
    b",",
    b"Host",
    b"Content-Length",
    b"Transfer-Encoding",
    b"Connection",
    b"Expect",
    b"chunked",
    b"close",
    b"100-continue",
    b"5",
    b"-1",
    b"\xe9",
]


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.binary(max_size=200).map(lambda b: b + b"\r\n\r\n"),
        st.lists(st.sampled_from(HTTP_PIECES), max_size=40).map(b"".join),
        st.lists(st.sampled_from(HTTP_PIECES), max_size=40).map(
            lambda p: b"".join(p) + b"\r\n\r\n"
        ),
    )
)
def test_parse_head_returns_a_head_or_raises_protocol_error(data):
    try:
        parsed = parse_head(data)
    except ProtocolError as exc:
        assert exc.status in {400, 431, 501, 505}
    else:
        assert isinstance(parsed, RequestHead)
        assert data.endswith(b"\r\n\r\n")


_OWS = st.text(" \t", max_size=3).map(str.encode)
_FIELD_BYTE = st.integers(0x21, 0xFF).filter(lambda b: b != 0x7F).map(lambda b: bytes([b]))
_FIELD_VALUE = st.lists(st.one_of(_FIELD_BYTE, st.sampled_from([b" ", b"\t"])), max_size=20).map(
    lambda parts: b"".join(parts).strip(b" \t")
)


@settings(deadline=None)
@given(before=_OWS, value=_FIELD_VALUE, after=_OWS)
def test_any_field_value_comes_back_without_its_ows(before, value, after):
    parsed = parse_head(head(b"Host: h", b"X-Value:" + before + value + after))
    assert parsed.headers["x-value"] == value.decode("latin-1")


# -- chunked bodies -----------------------------------------------------------------------------


def encode_chunked(pieces: list[bytes], *, trailers: bytes = b"") -> bytes:
    out = [b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces if piece]
    return b"".join(out) + b"0\r\n" + trailers + b"\r\n"


def decode(feeds: list[bytes]) -> tuple[bytes, ChunkedDecoder]:
    """Feed these bytes in turn, taking every piece after each feed until the end of the body; the
    body and the decoder (later feeds only go in, as a pipelined request would)."""
    decoder = ChunkedDecoder()
    body = bytearray()
    ended = False
    for feed in feeds:
        decoder.receive_data(feed)
        while not ended and (piece := decoder.next_piece()) is not None:
            if piece:
                body += piece
            else:
                ended = True
    return bytes(body), decoder


def decode_error(data: bytes) -> ProtocolError:
    decoder = ChunkedDecoder()
    decoder.receive_data(data)
    with pytest.raises(ProtocolError) as info:
        while decoder.next_piece():
            pass
    return info.value


@settings(max_examples=200, deadline=None)
@given(
    pieces=st.lists(st.binary(max_size=40), max_size=8),
    after=st.sampled_from([b"", b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", b"\r\n", b"0\r\n\r\n"]),
    data=st.data(),
)
def test_chunked_round_trip_whatever_the_split(pieces, after, data):
    stream = encode_chunked(pieces) + after
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    feeds = [stream[a:b] for a, b in pairwise([0, *cuts, len(stream)])]
    body, decoder = decode(feeds)
    assert body == b"".join(pieces)
    assert decoder.done
    assert decoder.unused == after


def test_unused_holds_the_pipelined_request():
    after = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
    body, decoder = decode([encode_chunked([b"hello", b" world"]) + after])
    assert body == b"hello world"
    assert decoder.done
    assert decoder.unused == after
    assert decoder.next_piece() == b""


def test_bytes_received_after_the_end_are_unused_too():
    body, decoder = decode([encode_chunked([b"abc"])])
    assert (body, decoder.unused) == (b"abc", b"")
    decoder.receive_data(b"PUT")
    assert decoder.unused == b"PUT"
    assert decoder.next_piece() == b""


def test_unused_is_empty_before_the_end():
    decoder = ChunkedDecoder()
    decoder.receive_data(b"5\r\nhel")
    assert decoder.next_piece() == b"hel"
    assert decoder.next_piece() is None
    assert not decoder.done
    assert decoder.unused == b""


def test_next_piece_is_none_while_more_bytes_are_needed():
    decoder = ChunkedDecoder()
    got = []
    for byte in b"3\r\nabc\r\n0\r\n\r\n":
        decoder.receive_data(bytes([byte]))
        got.append(decoder.next_piece())
    assert got == [None, None, None, b"a", b"b", b"c"] + [None] * 6 + [b""]
    assert decoder.done


def test_decoder_takes_memoryviews():
    decoder = ChunkedDecoder()
    decoder.receive_data(memoryview(b"2\r\nok\r\n0\r\n\r\n"))
    assert decoder.next_piece() == b"ok"
    assert decoder.next_piece() == b""


@pytest.mark.parametrize(
    "stream",
    [
        b"5\r\nhello\r\n0\r\n\r\n",
        b"5;name=value\r\nhello\r\n0\r\n\r\n",
        b'5 ;a;b="c d"\r\nhello\r\n0;last\r\n\r\n',
        b"5\t\r\nhello\r\n0\r\n\r\n",
        b"0005\r\nhello\r\n000\r\n\r\n",
        b"2\r\nhe\r\n3\r\nllo\r\n0\r\nX-Checksum: abc\r\n\r\n",
        b"5\r\nhello\r\n0\r\nA: 1\r\nB:2\r\nC:\r\n\r\n",
    ],
)
def test_extensions_and_trailers_are_dropped(stream):
    after = b"NEXT"
    body, decoder = decode([stream + after])
    assert body == b"hello"
    assert decoder.unused == after


@pytest.mark.parametrize(("size", "length"), [(b"a", 10), (b"A", 10), (b"1f", 31), (b"FF", 255)])
def test_chunk_size_is_hex(size, length):
    data = bytes(range(length))
    body, decoder = decode([size + b"\r\n" + data + b"\r\n0\r\n\r\n"])
    assert body == data
    assert decoder.done


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param(b"x\r\n", id="not-hex"),
        pytest.param(b"\r\n", id="empty-size"),
        pytest.param(b"-5\r\nhello\r\n", id="negative"),
        pytest.param(b" 5\r\nhello\r\n", id="leading-space"),
        pytest.param(b"0x5\r\nhello\r\n", id="0x-prefix"),
        pytest.param(b"5\nhello\r\n", id="bare-lf"),
        pytest.param(b"1" * 17 + b"\r\n", id="seventeen-digits"),
        pytest.param(b"5\r\nhello!\r\n", id="data-longer-than-size"),
        pytest.param(b"5\r\nhello\n0\r\n\r\n", id="bare-lf-after-data"),
        pytest.param(b"0\r\nX : 1\r\n\r\n", id="trailer-space-before-colon"),
        pytest.param(b"0\r\nno colon\r\n\r\n", id="trailer-without-colon"),
        pytest.param(b"0\r\nX: a\x00b\r\n\r\n", id="trailer-nul"),
    ],
)
def test_malformed_chunked_body(stream):
    assert decode_error(stream).status == 400


def test_data_longer_than_its_size_is_caught_once_two_bytes_follow():
    decoder = ChunkedDecoder()
    decoder.receive_data(b"3\r\nabc")
    assert decoder.next_piece() == b"abc"
    decoder.receive_data(b"d")
    assert decoder.next_piece() is None
    decoder.receive_data(b"\r")
    with pytest.raises(ProtocolError):
        decoder.next_piece()


def test_size_line_just_under_the_limit_waits():
    decoder = ChunkedDecoder()
    decoder.receive_data(b"5;" + b"x" * (MAX_CHUNK_LINE - 2))
    assert decoder.next_piece() is None


def test_size_line_of_max_length_is_accepted():
    line = b"5;" + b"x" * (MAX_CHUNK_LINE - 2)
    body, decoder = decode([line + b"\r\nhello\r\n0\r\n\r\n"])
    assert body == b"hello"
    assert decoder.done


@pytest.mark.parametrize("end", [b"", b"\r\nhello\r\n0\r\n\r\n"])
def test_over_long_size_line(end):
    assert decode_error(b"5;" + b"x" * (MAX_CHUNK_LINE - 1) + end).status == 400


def test_over_long_trailers_are_431():
    error = decode_error(b"5\r\nhello\r\n0\r\nX: " + b"y" * MAX_TRAILERS)
    assert error.status == 431


def test_trailers_of_max_length_are_accepted():
    trailers = b"X: " + b"y" * (MAX_TRAILERS - 3)
    body, decoder = decode([b"5\r\nhello\r\n0\r\n" + trailers + b"\r\n\r\nNEXT"])
    assert body == b"hello"
    assert decoder.unused == b"NEXT"


def test_size_line_of_max_length_is_accepted_when_split_inside_crlf():
    line = b"5;" + b"x" * (MAX_CHUNK_LINE - 2)
    body, decoder = decode([line + b"\r", b"\nhello\r\n0\r\n\r\n"])
    assert body == b"hello"
    assert decoder.done


def test_trailers_of_max_length_are_accepted_when_split_inside_the_end():
    trailers = b"X: " + b"y" * (MAX_TRAILERS - 3)
    body, decoder = decode([b"5\r\nhello\r\n0\r\n" + trailers + b"\r\n\r", b"\nNEXT"])
    assert body == b"hello"
    assert decoder.unused == b"NEXT"


# -- response heads -----------------------------------------------------------------------------

_STATUS_LINE = re.compile(rb"HTTP/1\.1 [1-9][0-9]{2} [\t \x21-\x7e\x80-\xff]*\r\n")


def test_partial_content_response_head():
    assert response_head(206, [("Content-Range", "bytes 0-3/10"), ("Content-Length", "4")]) == (
        b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-3/10\r\nContent-Length: 4\r\n\r\n"
    )


def test_response_head_without_headers():
    assert response_head(404, []) == b"HTTP/1.1 404 Not Found\r\n\r\n"


@pytest.mark.parametrize("status", [299, 599, 103, 200, 431, 505])
def test_any_status_gives_a_valid_status_line(status):
    data = response_head(status, [("X", "y")])
    line, rest = data.split(b"\r\n", 1)
    assert _STATUS_LINE.fullmatch(line + b"\r\n")
    assert line.startswith(b"HTTP/1.1 %d " % status)
    assert rest == b"X: y\r\n\r\n"


def test_unknown_status_has_an_empty_reason():
    assert response_head(599, []) == b"HTTP/1.1 599 \r\n\r\n"


def test_response_header_value_in_latin_1():
    assert response_head(200, [("X", "caf\xe9\tau lait")]) == (
        b"HTTP/1.1 200 OK\r\nX: caf\xe9\tau lait\r\n\r\n"
    )


@pytest.mark.parametrize(
    "value", ["a\r\nSet-Cookie: x", "a\nb", "a\rb", "a\x00b", "a\x7fb", "\x1b[31m", "\u20ac"]
)
def test_response_header_value_with_control_character_raises(value):
    with pytest.raises(ValueError):
        response_head(200, [("X", value)])


def test_continue_bytes():
    assert CONTINUE == b"HTTP/1.1 100 Continue\r\n\r\n"
