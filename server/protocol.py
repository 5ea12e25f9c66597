"""HTTP/1.1 on one trio stream: keep-alive, streamed bodies, 100-continue, timeouts, lingering close.

The application sees a ``Request`` (head plus ``await request.receive()`` for body pieces) and returns a
``Response`` (bytes, or a producer that sends pieces of a known total length). Heads and chunked bodies
are parsed by ``http1`` (no I/O there); this module does the I/O around it:

* ``Expect: 100-continue``: the interim 100 is sent when the application first asks for the body, so an
  upload refused from its head (401, 403, 507) never makes the client send it.
* Timeouts: ``keepalive_timeout`` for an idle connection, ``read_timeout`` for every wait on a client that
  is in the middle of a request (head or body) and for every send (a client that stops reading). A request
  whose body times out raises ``ClientGone`` into the application, which cleans up, and the connection is
  dropped.
* A response sent before the request body was read either drains a small body (keep-alive survives) or
  says ``Connection: close`` and then closes *lingering* (half-close, discard what still arrives for a
  moment) so the client reads our answer instead of a connection reset.
* Malformed requests get the status ``http1`` names (400, 431 for an over-long head, 501, 505) and the
  connection ends.
* One buffer holds what was received and not used yet. A body framed by Content-Length (every upload
  restic, rclone and vaultfs send) is taken from that buffer and then straight from the socket into the
  application's buffer (``Request.receive_into``). On plain TCP such a body can also be *pumped*
  (``Request.pump``): a worker thread receives it into the application's own buffer
  (``BodySink.space``) and tells the sink at once, while the bytes are still in the CPU cache, with no
  trip through the event loop per piece; only when the socket stays empty does the wait go back to the
  event loop (and its timeout). Whatever follows a body in the buffer is the next request.
* A response head, a small body and nothing else leave in one write; a large body is sent as it is
  (on plain TCP a file range with sendfile(2)).

Shutdown: ``Lifecycle.draining`` makes every connection close after its current response, and idle
connections are cancelled at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import trio

from vaultfs.server.http1 import (
    CONTINUE,
    MAX_HEAD,
    ChunkedDecoder,
    ProtocolError,
    RequestHead,
    drop_empty_lines,
    head_end,
    parse_head,
    response_head,
)
from vaultfs.server.tls import TlsStream, read_socket_sync

log = logging.getLogger("vaultfs.server")

RECEIVE_SIZE = 1 << 20
#: Reads while waiting for a request head: enough for a head (MAX_HEAD) and a few pipelined small
#: requests, small enough that little of an upload body that follows its head lands in the
#: connection's buffer (from where it is copied once more) rather than in the application's own.
HEAD_RECEIVE = 64 * 1024
DRAIN_LIMIT = 1 << 20
SMALL_WRITE = 64 * 1024
#: A worker thread that pumps a body gives the wait back to the event loop when the socket stays empty
#: this long (milliseconds), and returns after this many bytes at most.
PUMP_WAIT_MS = 20
PUMP_LIMIT = 64 << 20
SERVER = "vaultfs"


class ClientGone(Exception):
    """The client closed the connection, broke the protocol or went silent in the middle of a request."""


class BodySink(Protocol):
    """Where a pumped body goes (``Request.pump``); used by one worker thread at a time."""

    def space(self) -> memoryview:
        """Where the next bytes go; never empty."""
        ...

    def filled_sync(self, n: int) -> None:
        """``n`` bytes were put at the start of the last ``space()``."""
        ...

    def write_one_sync(self, piece: memoryview) -> None:
        """Take bytes that arrived elsewhere (read before the body was pumped)."""
        ...


#: A streamed body: called with ``send(piece)``; it must send exactly ``Response.length`` bytes.
Producer = Callable[[Callable[[bytes | memoryview], Awaitable[None]]], Awaitable[None]]


@dataclass
class FileRange:
    """A response body that is a range of an open file (``offset``; the length is the response's).
    On plain TCP it is sent with sendfile(2) by worker threads started through ``run_sync(fn, *args)``:
    no copy through user space and no trip through the event loop per piece."""

    fd: int
    offset: int
    run_sync: Callable[..., Awaitable[Any]]


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | bytearray | Producer = b""
    #: Content-Length for a producer body (and for HEAD answers that describe a body).
    length: int | None = None
    #: Called once when the response was sent or abandoned (e.g. to close the producer's file).
    on_done: Callable[[], None] | None = None
    #: The same bytes as the producer ``body``, as a file range: used instead of it where the
    #: connection can sendfile (plain TCP).
    file: FileRange | None = None


class Lifecycle:
    """Shared by all connections of a server: shutdown state and the idle connections to cancel."""

    def __init__(self) -> None:
        self.draining = False
        self.idle: set[trio.CancelScope] = set()

    def drain(self) -> None:
        self.draining = True
        for scope in list(self.idle):
            scope.cancel()


class Request:
    """One request. ``headers`` has lower-case names; repeated headers are joined with ", "."""

    def __init__(self, conn: HttpConnection, head: RequestHead) -> None:
        self._conn = conn
        self.method = head.method
        self.target = head.target
        self.path, _, self.query = self.target.partition("?")
        self.headers = head.headers
        self.content_length = head.content_length
        self.chunked = head.chunked
        self.keep_alive = head.keep_alive
        self.peer = conn.peer
        self.address = conn.peer  # the application may replace it (proxy headers)
        self.bucket = "-"  # the authenticated bucket, for logs and metrics
        self.received = 0
        self.complete = not head.has_body
        #: The client waits for "100 Continue" before it sends the body, and has not had it yet.
        self.waiting_for_continue = head.expect_continue and head.has_body
        self._pending = memoryview(b"")

    async def receive(self) -> bytes | None:
        """The next piece of the body, None at its end. Raises ClientGone."""
        if self._pending:
            piece = bytes(self._pending)
            self._pending = memoryview(b"")
            return piece
        if self.complete:
            return None
        if self.chunked:
            piece = await self._conn.next_chunked_piece(self)
        else:
            size = min(RECEIVE_SIZE, self.content_length - self.received)  # type: ignore[operator]
            buffer = bytearray(size)
            n = await self._conn.read_body_into(self, memoryview(buffer))
            piece = bytes(buffer[:n])
        if not piece:
            self.complete = True
            return None
        self.received += len(piece)
        if not self.chunked and self.received == self.content_length:
            self.complete = True
        return piece

    async def receive_into(self, buffer: memoryview) -> int:
        """Put the next body bytes into ``buffer``; how many (at most its size), 0 at the end.

        A Content-Length body arrives straight from the socket; a chunked one is copied from the
        decoded pieces. Raises ClientGone.
        """
        if not self._pending and not self.complete and not self.chunked:
            want = min(len(buffer), self.content_length - self.received)  # type: ignore[operator]
            n = await self._conn.read_body_into(self, buffer[:want])
            self.received += n
            if self.received == self.content_length:
                self.complete = True
            return n
        if not self._pending:
            piece = await self.receive()
            if piece is None:
                return 0
            self._pending = memoryview(piece)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    @property
    def pumpable(self) -> bool:
        """True when ``pump`` can read this body in worker threads (Content-Length, plain TCP)."""
        return not self._pending and not self.complete and not self.chunked and self._conn.can_pump

    async def pump(self, sink: BodySink, run_sync: Callable[..., Awaitable[Any]]) -> None:
        """Feed the whole body to ``sink`` (only if ``pumpable``). Worker threads started through
        ``run_sync(fn, *args)`` receive the body into ``sink.space()`` and call ``sink.filled_sync``
        after each receive. Raises ClientGone, or what the sink raises."""
        await self._conn.pump_body(self, sink, run_sync)
        self.complete = True


Handler = Callable[[Request], Awaitable[Response]]


class Logged(Protocol):
    """What the access log and the metrics read of a request: a parsed one, or the stand-in for one
    that never parsed."""

    method: str
    target: str
    address: str
    bucket: str
    received: int
    headers: dict[str, str]


Recorder = Callable[[Logged, int, int, float], None]


class HttpConnection:
    """Serves requests on one stream until either side closes it."""

    def __init__(
        self,
        stream: trio.abc.HalfCloseableStream | trio.abc.Stream,
        peer: str,
        handler: Handler,
        recorder: Recorder,
        lifecycle: Lifecycle,
        *,
        read_timeout: float,
        keepalive_timeout: float,
    ) -> None:
        self.stream = stream
        self.peer = peer
        self.handler = handler
        self.recorder = recorder
        self.lifecycle = lifecycle
        self.read_timeout = read_timeout
        self.keepalive_timeout = keepalive_timeout
        #: Bytes received and not used yet: the next head, the start of a body, pipelined requests.
        self._buffer = bytearray()
        self._eof = False  # the client closed its side
        self._decoder: ChunkedDecoder | None = None  # the current request's chunked body
        sock = getattr(stream, "socket", None)
        self._recv_into = getattr(sock, "recv_into", None)  # plain TCP; TLS streams copy once
        self.socket_fd: int | None = None
        if sock is not None and self._recv_into is not None:
            self.socket_fd = sock.fileno()
        self._tls = stream if isinstance(stream, TlsStream) else None
        #: Whether a Content-Length body can be pumped by worker threads (``Request.pump``).
        self.can_pump = self.socket_fd is not None or self._tls is not None

    # -- I/O -------------------------------------------------------------------------------------

    async def _receive(self, timeout: float, size: int = RECEIVE_SIZE) -> bytes | bytearray:
        with trio.move_on_after(timeout):
            try:
                return await self.stream.receive_some(size)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return b""
        raise ClientGone("timed out waiting for the client")

    async def _write(self, data: bytes | bytearray | memoryview) -> None:
        if self.socket_fd is not None:
            # Plain TCP: hand the bytes to the socket at once; a response that fits (nearly every
            # one) needs no trip through the event loop. Each request cycle still yields to other
            # tasks while its next head is received.
            try:
                sent = os.write(self.socket_fd, data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise ClientGone(f"send failed: {exc}") from None
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        with trio.move_on_after(self.read_timeout):
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ClientGone(f"send failed: {exc}") from None
            return
        raise ClientGone("timed out sending to the client")

    async def _receive_into(self, buffer: memoryview) -> int:
        with trio.move_on_after(self.read_timeout):
            try:
                if self._recv_into is not None:
                    return await self._recv_into(buffer)
                data = await self.stream.receive_some(len(buffer))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return 0
            buffer[: len(data)] = data
            return len(data)
        raise ClientGone("timed out waiting for the client")

    async def _continue(self, request: Request) -> None:
        """Send the interim 100 if the client waits for it (the application asked for the body)."""
        if request.waiting_for_continue:
            request.waiting_for_continue = False
            await self._write(CONTINUE)

    # -- request bodies --------------------------------------------------------------------------

    def _take_buffered(self, buffer: memoryview) -> int:
        """Move already received bytes into ``buffer``; how many."""
        n = min(len(buffer), len(self._buffer))
        if n:
            buffer[:n] = self._buffer[:n]
            del self._buffer[:n]
        return n

    async def read_body_into(self, request: Request, buffer: memoryview) -> int:
        """Up to ``len(buffer)`` bytes of a Content-Length body into ``buffer`` (the caller never
        asks beyond the body's end). Raises ClientGone."""
        await self._continue(request)
        if not buffer:
            return 0
        n = self._take_buffered(buffer)
        if n:
            return n
        n = 0 if self._eof else await self._receive_into(buffer)
        if n == 0:
            self._eof = True
            raise ClientGone("the client closed the connection in the middle of a body")
        return n

    async def pump_body(
        self, request: Request, sink: BodySink, run_sync: Callable[..., Awaitable[Any]]
    ) -> None:
        """The rest of a Content-Length body into ``sink`` (see ``Request.pump``)."""
        assert request.content_length is not None
        fd = self.socket_fd if self._tls is None else self._tls.fd
        assert fd is not None
        await self._continue(request)
        if self._buffer and request.received < request.content_length:
            n = min(request.content_length - request.received, len(self._buffer))
            piece = memoryview(bytes(self._buffer[:n]))
            del self._buffer[:n]
            request.received += n
            await run_sync(sink.write_one_sync, piece)
        while request.received < request.content_length:
            if self._eof:
                raise ClientGone("the client closed the connection in the middle of a body")
            gone = await run_sync(self._pump_sync, request, sink)
            if gone:
                self._eof = True
                raise ClientGone("the client closed the connection in the middle of a body")
            if request.received < request.content_length:
                with trio.move_on_after(self.read_timeout):
                    await trio.lowlevel.wait_readable(fd)
                    continue
                raise ClientGone("timed out waiting for the client")

    def _pump_sync(self, request: Request, sink: BodySink) -> bool:
        """In a worker thread: receive body pieces into the sink (over TLS decrypted straight into
        it) until the body ends, PUMP_LIMIT bytes passed, or the socket stayed empty for
        PUMP_WAIT_MS. True when the client is gone. The counts are kept up to date piece by piece,
        so they are right even when the sink raises."""
        assert request.content_length is not None
        if self._tls is not None:
            receive = self._tls.read_into_sync
        else:
            assert self.socket_fd is not None
            receive = partial(read_socket_sync, self.socket_fd)
        passed = 0
        while (left := request.content_length - request.received) and passed < PUMP_LIMIT:
            try:
                n = receive(sink.space()[:left], PUMP_WAIT_MS)
            except trio.BrokenResourceError:
                return True
            if n < 0:
                return False  # let the event loop wait, under its timeout
            if n == 0:
                return True
            request.received += n
            passed += n
            sink.filled_sync(n)
        return False

    async def next_chunked_piece(self, request: Request) -> bytes:
        """The next decoded piece of a chunked body, b"" at its end. Raises ClientGone."""
        await self._continue(request)
        decoder = self._decoder
        if decoder is None:
            decoder = self._decoder = ChunkedDecoder()
            decoder.receive_data(self._buffer)
            self._buffer.clear()
        while True:
            try:
                piece = decoder.next_piece()
            except ProtocolError as exc:
                raise ClientGone(f"bad request body: {exc}") from None
            if piece is not None:
                if not piece:
                    self._buffer[:0] = decoder.unused
                    self._decoder = None
                return piece
            data = b"" if self._eof else await self._receive(self.read_timeout)
            if not data:
                self._eof = True
                raise ClientGone("the client closed the connection in the middle of a body")
            decoder.receive_data(data)

    # -- request heads ---------------------------------------------------------------------------

    async def _next_request(self) -> RequestHead | None:
        """The next request head; None when the client closed, sent a malformed head (answered
        here) or we are shutting down."""
        searched = 0
        skipped = 0
        while True:
            skipped += drop_empty_lines(self._buffer)
            end = head_end(self._buffer, searched)
            try:
                if end > 0:
                    head = parse_head(memoryview(self._buffer)[:end])
                    del self._buffer[:end]
                    return head
                if len(self._buffer) > MAX_HEAD:
                    raise ProtocolError("request head too long", 431)
                if skipped > MAX_HEAD:
                    raise ProtocolError("too many empty lines before a request")
            except ProtocolError as exc:
                await self._refuse(exc)
                return None
            searched = len(self._buffer)
            if self._eof:
                return None
            if not self._buffer:
                if self.lifecycle.draining:
                    return None
                # Idle between requests: shutdown may cancel this wait.
                with trio.CancelScope() as scope:
                    self.lifecycle.idle.add(scope)
                    try:
                        data = await self._receive(self.keepalive_timeout, HEAD_RECEIVE)
                    except ClientGone:
                        return None
                    finally:
                        self.lifecycle.idle.discard(scope)
                if scope.cancelled_caught:
                    return None
            else:
                try:
                    data = await self._receive(self.read_timeout, HEAD_RECEIVE)
                except ClientGone:
                    return None
            if not data:
                self._eof = True
            self._buffer += data

    async def _refuse(self, exc: ProtocolError) -> None:
        """Answer a malformed request with the status it calls for; the connection then ends."""
        self.recorder(_Placeholder(self.peer), exc.status, 0, 0.0)
        body = f"{exc.status} bad request\n".encode()
        headers = [
            ("content-type", "text/plain; charset=utf-8"),
            ("content-length", str(len(body))),
            ("connection", "close"),
            ("server", SERVER),
        ]
        with contextlib.suppress(ClientGone):
            await self._write(response_head(exc.status, headers) + body)

    # -- the request loop ------------------------------------------------------------------------

    async def serve(self) -> None:
        try:
            while True:
                head = await self._next_request()
                if head is None:
                    return
                request = Request(self, head)
                if not await self._exchange(request):
                    return
                if not request.complete or not request.keep_alive or self.lifecycle.draining:
                    await linger(self.stream, min(2.0, self.read_timeout))
                    return
        except ClientGone as exc:
            log.debug("connection from %s ended: %s", self.peer, exc)
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(1):
                    await self.stream.aclose()

    async def _exchange(self, request: Request) -> bool:
        """Run the handler and send its response; False when the connection must end at once."""
        started = time.monotonic()
        status = 500
        sent = 0
        response = None
        try:
            try:
                response = await self.handler(request)
            except ClientGone:
                status = 400
                raise
            status = response.status
            await self._settle_body(request)
            sent = await self._respond(request, response)
            return True
        finally:
            if response is not None and response.on_done is not None:
                response.on_done()
            self.recorder(request, status, sent, time.monotonic() - started)

    async def _settle_body(self, request: Request) -> None:
        """Before answering: read the rest of a small unread body (keep-alive survives), else the
        connection closes after the response (``request.keep_alive``)."""
        if request.complete:
            return
        left = None if request.content_length is None else request.content_length - request.received
        if left is not None and left <= DRAIN_LIMIT and not request.waiting_for_continue:
            while await request.receive() is not None:
                pass
            return
        request.keep_alive = False

    async def _respond(self, request: Request, response: Response) -> int:
        headers = [("server", SERVER), *response.headers]
        body = response.body
        length = response.length
        if length is None and isinstance(body, (bytes, bytearray)):
            length = len(body)
        no_body = response.status in (204, 304)
        if length is not None and not no_body:
            headers.append(("content-length", str(length)))
        if not request.keep_alive or self.lifecycle.draining:
            request.keep_alive = False
            headers.append(("connection", "close"))
        head = response_head(response.status, headers)
        if request.method == "HEAD" or no_body:
            await self._write(head)
            return 0
        if isinstance(body, (bytes, bytearray)):
            if len(body) < SMALL_WRITE:
                await self._write(head + body)  # one send: separate ones can meet delayed ACKs
            else:
                await self._write(head)
                await self._write(body)
            return len(body)
        await self._write(head)
        if response.file is not None and self.socket_fd is not None and length:
            return await self._send_file(response.file, length)
        sent = 0

        async def send(piece: bytes | memoryview) -> None:
            nonlocal sent
            if sent + len(piece) > (length or 0):
                raise ClientGone("response body longer than its Content-Length")  # a bug: end it
            await self._write(piece)
            sent += len(piece)

        await body(send)
        if sent != length:
            raise ClientGone("response body shorter than its Content-Length")
        return sent

    async def _send_file(self, source: FileRange, length: int) -> int:
        """Send ``length`` bytes of ``source`` with sendfile(2) in worker threads; waits for a full
        socket go back to the event loop under ``read_timeout``. Raises ClientGone."""
        sock = self.socket_fd
        assert sock is not None
        offset, end = source.offset, source.offset + length
        while offset < end:
            offset, trouble = await source.run_sync(self._sendfile_sync, source.fd, offset, end)
            if trouble:
                raise ClientGone(trouble)
            if offset < end:
                with trio.move_on_after(self.read_timeout):
                    await trio.lowlevel.wait_writable(sock)
                    continue
                raise ClientGone("timed out sending to the client")
        return length

    def _sendfile_sync(self, fd: int, offset: int, end: int) -> tuple[int, str]:
        """In a worker thread: sendfile from ``offset`` until ``end``, or until the socket stayed full
        for PUMP_WAIT_MS. (new offset, "" or why the connection must end)."""
        sock = self.socket_fd
        assert sock is not None
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        while offset < end:
            try:
                n = os.sendfile(sock, fd, offset, end - offset)
            except BlockingIOError:
                if not poller.poll(PUMP_WAIT_MS):
                    return offset, ""  # let the event loop wait, under its timeout
                continue
            except OSError as exc:
                return offset, f"send failed: {exc}"
            if n == 0:
                # Files are written once, so this is damage: end the connection rather than
                # send less than the Content-Length promised.
                return offset, "object changed while it was sent"
            offset += n
        return offset, ""


async def linger(stream: trio.abc.Stream, seconds: float) -> None:
    """Half-close and discard what the client still sends, for ``seconds`` at most, so that it reads
    our response instead of a connection reset (the caller closes the stream afterwards)."""
    send_eof = getattr(stream, "send_eof", None)
    with trio.move_on_after(seconds):
        try:
            if send_eof is not None:
                await send_eof()
            discarded = 0
            while discarded < 64 * DRAIN_LIMIT:
                data = await stream.receive_some(RECEIVE_SIZE)
                if not data:
                    break
                discarded += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


class _Placeholder:
    """Stands in for a request that never parsed, so the access log and metrics still count it."""

    def __init__(self, peer: str) -> None:
        self.method = "-"
        self.target = "-"
        self.path = "-"
        self.peer = peer
        self.address = peer
        self.bucket = "-"
        self.received = 0
        self.headers: dict[str, str] = {}
