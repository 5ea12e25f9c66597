"""HTTP/1.1 on one trio stream with h11: keep-alive, streamed bodies, 100-continue, timeouts, lingering close.

The application sees a ``Request`` (head plus ``await request.receive()`` for body pieces) and returns a
``Response`` (bytes, or a producer that sends pieces of a known total length). This module owns everything h11
leaves to its user:

* ``Expect: 100-continue``: the interim 100 is sent when the application first asks for the body, so an
  upload refused from its head (401, 403, 507) never makes the client send it.
* Timeouts: ``keepalive_timeout`` for an idle connection, ``read_timeout`` for every wait on a client that
  is in the middle of a request (head or body) and for every send (a client that stops reading). A request
  whose body times out raises ``ClientGone`` into the application, which cleans up, and the connection is
  dropped.
* A response sent before the request body was read either drains a small body (keep-alive survives) or
  says ``Connection: close`` and then closes *lingering* (half-close, discard what still arrives for a
  moment) so the client reads our answer instead of a connection reset.
* Malformed requests get h11's suggested status (400, 431 for an over-long head) and the connection ends.
* A body framed by Content-Length (every upload restic, rclone and vaultfs send) is read past h11,
  straight from the socket into the application's buffer (``Request.receive_into``): h11 would copy each
  piece three times (its buffer, the extracted slice, our bytes). h11 still parses every head and every
  chunked body; after such a request the connection continues with a fresh h11 state fed with whatever
  followed the body. On plain TCP such a body can also be *pumped* (``Request.pump``): a worker thread
  receives it into the application's own buffer (``BodySink.space``) and tells the sink at once, while
  the bytes are still in the CPU cache, with no trip through the event loop per piece; only when the
  socket stays empty does the wait go back to the event loop (and its timeout).

Shutdown: ``Lifecycle.draining`` makes every connection close after its current response, and idle
connections are cancelled at once.
"""

from __future__ import annotations

import logging
import os
import select
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol

import h11
import trio

log = logging.getLogger("vaultfs.server")

MAX_HEAD = 16 * 1024
RECEIVE_SIZE = 1 << 20
#: Reads while waiting for a request head: enough for a head (MAX_HEAD) and a few pipelined small
#: requests, small enough that little of an upload body that follows its head lands in h11's buffer
#: (from where it is copied twice more) rather than in the application's own buffer.
HEAD_RECEIVE = 64 * 1024
DRAIN_LIMIT = 1 << 20
SMALL_WRITE = 64 * 1024
#: A worker thread that pumps a body gives the wait back to the event loop when the socket stays empty
#: this long (milliseconds), and returns after this many bytes at most.
PUMP_WAIT_MS = 20
PUMP_LIMIT = 64 << 20
SERVER = "vaultfs"
#: Stands in for bytes sent with sendfile when h11 counts them (never read; calloc'd, so never touched).
_NOTHING = memoryview(bytes(1 << 20))


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

    def __init__(self, conn: HttpConnection, event: h11.Request) -> None:
        self._conn = conn
        self.method = event.method.decode("ascii", "replace")
        self.target = event.target.decode("ascii", "replace")
        self.path, _, self.query = self.target.partition("?")
        headers: dict[str, str] = {}
        for name, value in event.headers:
            key = name.decode("ascii", "replace").lower()
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        self.headers = headers
        self.peer = conn.peer
        self.address = conn.peer  # the application may replace it (proxy headers)
        self.bucket = "-"  # the authenticated bucket, for logs and metrics
        self.received = 0
        self.complete = False
        self._pending = memoryview(b"")
        try:
            self.content_length: int | None = int(headers["content-length"])
        except (KeyError, ValueError):
            self.content_length = None

    async def receive(self) -> bytes | None:
        """The next piece of the body, None at its end. Raises ClientGone."""
        if self._pending:
            piece = bytes(self._pending)
            self._pending = memoryview(b"")
            return piece
        if self.complete:
            return None
        piece = await self._conn.next_body_piece()
        if piece is None:
            self.complete = True
        else:
            self.received += len(piece)
        return piece

    async def receive_into(self, buffer: memoryview) -> int:
        """Put the next body bytes into ``buffer``; how many (at most its size), 0 at the end.

        A Content-Length body arrives straight from the socket; a chunked one is copied from h11's
        pieces. Raises ClientGone.
        """
        if not self._pending and not self.complete and self._conn.raw_body:
            n = await self._conn.read_body_into(buffer)
            self.received += n
            if n == 0:
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
        return (
            not self._pending
            and not self.complete
            and self._conn.raw_body
            and self._conn.socket_fd is not None
        )

    async def pump(self, sink: BodySink, run_sync: Callable[..., Awaitable[Any]]) -> None:
        """Feed the whole body to ``sink`` (only if ``pumpable``). Worker threads started through
        ``run_sync(fn, *args)`` receive the body into ``sink.space()`` and call ``sink.filled_sync``
        after each receive. Raises ClientGone, or what the sink raises."""
        await self._conn.pump_body(self, sink, run_sync)
        self.complete = True


Handler = Callable[[Request], Awaitable[Response]]
Recorder = Callable[[Request, int, int, float], None]


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
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._out: list[bytes] = []
        # The current request's Content-Length body, read past h11 (see the module docstring):
        # ``raw_body`` says it applies, ``_raw_left`` is what the client still owes, ``_spill`` the
        # bytes h11 had buffered beyond the head (body first, then perhaps a pipelined request).
        self.raw_body = False
        self._raw_started = False
        self._raw_left = 0
        self._spill = memoryview(b"")
        self._spill_closed = False
        sock = getattr(stream, "socket", None)
        self._recv_into = getattr(sock, "recv_into", None)  # plain TCP; TLS streams copy once
        self.socket_fd: int | None = sock.fileno() if self._recv_into is not None else None

    # -- I/O -------------------------------------------------------------------------------------

    async def _receive(self, timeout: float, size: int = RECEIVE_SIZE) -> bytes:
        with trio.move_on_after(timeout):
            try:
                return await self.stream.receive_some(size)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return b""
        raise ClientGone("timed out waiting for the client")

    async def _send(self, event: h11._events.Event, *, flush: bool = True) -> None:
        """Queue an event's bytes and, with ``flush``, write everything queued.

        A response head, a small body and the end of the message leave in one write: separate small
        writes cost a system call each and can meet delayed ACKs. Large body pieces are passed
        through as they are (h11's passthrough), not copied into a joined buffer.
        """
        for data in self.h11.send_with_data_passthrough(event) or ():
            if not data:
                continue
            if len(data) >= SMALL_WRITE:
                await self._flush()
                await self._write(data)
            else:
                self._out.append(bytes(data))
        if flush:
            await self._flush()

    async def _flush(self) -> None:
        if self._out:
            data = b"".join(self._out)
            self._out.clear()
            await self._write(data)

    async def _write(self, data: bytes | memoryview) -> None:
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

    def _begin_raw(self, request: Request) -> None:
        """Read this request's body past h11 if it is framed by a plain Content-Length."""
        self.raw_body = (
            request.content_length is not None
            and request.content_length > 0
            and "transfer-encoding" not in request.headers
            and self.h11.their_state is h11.SEND_BODY
        )
        self._raw_started = False
        self._raw_left = request.content_length or 0

    async def _start_raw(self) -> None:
        if self.h11.they_are_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        data, self._spill_closed = self.h11.trailing_data
        self._spill = memoryview(data)
        self._raw_started = True

    async def read_body_into(self, buffer: memoryview) -> int:
        """Up to ``len(buffer)`` bytes of a Content-Length body into ``buffer``; 0 at its end."""
        if not self._raw_started:
            await self._start_raw()
        want = min(len(buffer), self._raw_left)
        if want == 0:
            return 0
        if self._spill:
            n = min(want, len(self._spill))
            buffer[:n] = self._spill[:n]
            self._spill = self._spill[n:]
        else:
            n = 0 if self._spill_closed else await self._receive_into(buffer[:want])
            if n == 0:
                raise ClientGone("the client closed the connection in the middle of a body")
        self._raw_left -= n
        return n

    async def pump_body(
        self, request: Request, sink: BodySink, run_sync: Callable[..., Awaitable[Any]]
    ) -> None:
        """The rest of a Content-Length body into ``sink`` (see ``Request.pump``)."""
        fd = self.socket_fd
        assert fd is not None
        if not self._raw_started:
            await self._start_raw()
        if self._spill and self._raw_left:
            n = min(self._raw_left, len(self._spill))
            piece, self._spill = self._spill[:n], self._spill[n:]
            self._raw_left -= n
            request.received += n
            await run_sync(sink.write_one_sync, piece)
        while self._raw_left:
            if self._spill_closed:
                raise ClientGone("the client closed the connection in the middle of a body")
            gone = await run_sync(self._pump_sync, request, sink)
            if gone:
                raise ClientGone("the client closed the connection in the middle of a body")
            if self._raw_left:
                with trio.move_on_after(self.read_timeout):
                    await trio.lowlevel.wait_readable(fd)
                    continue
                raise ClientGone("timed out waiting for the client")

    def _pump_sync(self, request: Request, sink: BodySink) -> bool:
        """In a worker thread: receive body pieces into the sink until the body ends, PUMP_LIMIT
        bytes passed, or the socket stayed empty for PUMP_WAIT_MS. True when the client is gone. The
        counts are kept up to date piece by piece, so they are right even when the sink raises."""
        fd = self.socket_fd
        assert fd is not None
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        passed = 0
        while self._raw_left and passed < PUMP_LIMIT:
            space = sink.space()
            try:
                n = os.readv(fd, [space[: self._raw_left]])
            except BlockingIOError:
                if not poller.poll(PUMP_WAIT_MS):
                    return False  # let the event loop wait, under its timeout
                continue
            except OSError:
                return True
            if n == 0:
                return True
            self._raw_left -= n
            request.received += n
            passed += n
            sink.filled_sync(n)
        return False

    def _next_cycle_after_raw(self) -> bool:
        """After a request whose body was read past h11: a fresh h11 state for the next request, fed
        with what followed the body. False when the connection cannot go on."""
        if self._raw_left or self.h11.our_state is not h11.DONE:
            return False
        spill = bytes(self._spill) if self._raw_started else self.h11.trailing_data[0]
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        if spill:
            self.h11.receive_data(spill)
        if self._spill_closed:
            self.h11.receive_data(b"")
        self.raw_body = False
        self._spill = memoryview(b"")
        return True

    async def next_body_piece(self) -> bytes | None:
        if self.raw_body:
            size = min(RECEIVE_SIZE, self._raw_left)
            if size == 0:
                return None
            buffer = bytearray(size)
            n = await self.read_body_into(memoryview(buffer))
            return bytes(buffer[:n])
        if self.h11.they_are_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise ClientGone(f"bad request body: {exc}") from None
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self._receive(self.read_timeout))
                continue
            if isinstance(event, h11.Data):
                return bytes(event.data)
            if isinstance(event, h11.EndOfMessage):
                return None
            raise ClientGone(f"unexpected {type(event).__name__} in a request body")

    async def _next_request(self) -> h11.Request | None:
        """The next request head; None when the client closed or we are shutting down."""
        first = True
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                await self._refuse(exc)
                return None
            if isinstance(event, h11.Request):
                # h11 bounds only heads that arrive in pieces; a whole over-long head is refused here.
                size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
                if size > MAX_HEAD:
                    await self._refuse(h11.RemoteProtocolError("head too long", 431))
                    return None
                return event
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None
            if event is not h11.NEED_DATA:
                return None
            if first and self.lifecycle.draining:
                return None
            if first:
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
            first = False
            self.h11.receive_data(data)

    async def _refuse(self, exc: h11.RemoteProtocolError) -> None:
        """Answer a malformed request with h11's suggested status, if we still may answer."""
        status = exc.error_status_hint or 400
        self.recorder(_Placeholder(self.peer), status, 0, 0.0)
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = f"{status} bad request\n".encode()
        try:
            await self._send(
                h11.Response(
                    status_code=status,
                    reason=_reason(status),
                    headers=[
                        ("content-type", "text/plain; charset=utf-8"),
                        ("content-length", str(len(body))),
                        ("connection", "close"),
                        ("server", SERVER),
                    ],
                )
            )
            await self._send(h11.Data(data=body))
            await self._send(h11.EndOfMessage())
        except (ClientGone, h11.LocalProtocolError):
            pass

    # -- the request loop ------------------------------------------------------------------------

    async def serve(self) -> None:
        try:
            while True:
                event = await self._next_request()
                if event is None:
                    return
                request = Request(self, event)
                self._begin_raw(request)
                if not await self._exchange(request):
                    return
                if self.raw_body:
                    if self._next_cycle_after_raw():
                        continue
                    await linger(self.stream, min(2.0, self.read_timeout))
                    return
                if self.h11.our_state is h11.MUST_CLOSE or self.h11.their_state is not h11.DONE:
                    await linger(self.stream, min(2.0, self.read_timeout))
                    return
                self.h11.start_next_cycle()
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
            await self._settle_body(request, response)
            sent = await self._respond(request, response)
            return True
        finally:
            if response is not None and response.on_done is not None:
                response.on_done()
            self.recorder(request, status, sent, time.monotonic() - started)

    async def _settle_body(self, request: Request, response: Response) -> None:
        """Before answering: read the rest of a small unread body, else plan to close."""
        if self.h11.their_state is not h11.SEND_BODY:
            return
        waiting = self.h11.they_are_waiting_for_100_continue
        if request.content_length is not None:
            left: int | None = request.content_length - request.received
        elif "transfer-encoding" in request.headers:
            left = None  # chunked: unknown
        else:
            left = 0  # no body framing at all means an empty body
        if not waiting and left is not None and left <= DRAIN_LIMIT:
            while await request.receive() is not None:
                pass
            return
        response.headers.append(("connection", "close"))

    async def _respond(self, request: Request, response: Response) -> int:
        headers = [("server", SERVER), *response.headers]
        body = response.body
        if isinstance(body, (bytes, bytearray)):
            length = len(body) if response.length is None else response.length
        else:
            length = response.length
        if length is not None:
            headers.append(("content-length", str(length)))
        if self.lifecycle.draining:
            headers.append(("connection", "close"))
        await self._send(
            h11.Response(
                status_code=response.status, headers=headers, reason=_reason(response.status)
            ),
            flush=False,
        )
        sent = 0
        head_only = request.method == "HEAD" or response.status in (204, 304)
        if isinstance(body, (bytes, bytearray)):
            if body and not head_only:
                await self._send(h11.Data(data=body), flush=False)
                sent = len(body)
        elif not head_only and response.file is not None and self.socket_fd is not None and length:
            await self._flush()
            sent = await self._send_file(response.file, length)
        elif not head_only:

            async def send(piece: bytes | memoryview) -> None:
                nonlocal sent
                await self._send(h11.Data(data=piece))
                sent += len(piece)

            await body(send)
        await self._send(h11.EndOfMessage())
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
        # h11 counts a body's bytes against its Content-Length: account them without copying any.
        for at in range(0, length, len(_NOTHING)):
            self.h11.send_with_data_passthrough(
                h11.Data(data=_NOTHING[: min(length - at, len(_NOTHING))])
            )
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


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


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
