"""TLS for one server connection: an ``ssl.SSLObject`` over memory buffers on a trio socket stream.

``trio.SSLStream`` does the same for any use, concurrent sends and receives included, and pays for it
on every TLS record (16 KiB at most): a trip through its retry loop and its locks per record. The bucket
server's connections are used by one task at a time, so this stream keeps only what that needs, and
adds ``read_into_sync``: a worker thread that receives an upload decrypts straight into the upload's
buffer (``ssl`` releases the GIL while it decrypts), many records per thread call, as the plain-TCP
path receives with ``readv``. A restic backup over TLS cost the server 2.8 s of CPU with
``trio.SSLStream`` against 1.4 s for rclone's server.

``read_socket_sync`` is the same receive for a plain TCP socket (both pumps use it).

Semantics are those of ``trio.SSLStream(..., https_compatible=True)``: an EOF without close_notify is
an ordinary end of stream, and closing sends close_notify without waiting for the peer's.
Renegotiation is refused by the context (``tls_context``), so a write never has to wait for a read.
"""

from __future__ import annotations

import os
import select
import ssl
from collections.abc import Awaitable

import trio

#: Largest read from the socket at a time (ciphertext).
RECEIVE_SIZE = 256 * 1024


class TlsStream(trio.abc.Stream):
    """Server side of a TLS connection on ``transport``. Not safe for concurrent use by two tasks;
    ``read_into_sync`` runs in one worker thread while no task uses the stream."""

    def __init__(self, transport: trio.SocketStream, context: ssl.SSLContext) -> None:
        self.transport = transport
        #: The socket's descriptor, for waiting until ciphertext arrives (``read_into_sync``).
        self.fd = transport.socket.fileno()
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._cipher: memoryview | None = None  # read_into_sync's receive buffer

    async def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            await self.transport.send_all(data)

    async def _fill(self) -> None:
        data = await self.transport.receive_some(RECEIVE_SIZE)
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    async def do_handshake(self) -> None:
        """Raises trio.BrokenResourceError when the handshake fails."""
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
                continue
            except ssl.SSLError as exc:
                await _quietly(self._flush())  # the alert tells the client why
                raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc
            await self._flush()  # the last handshake message (and TLS 1.3 session tickets)
            return

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        yielded = False
        while True:
            try:
                data = self._tls.read(max_bytes or RECEIVE_SIZE)
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
                yielded = True
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                data = b""
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
            if not yielded:
                await trio.lowlevel.checkpoint()
            return data

    def read_into_sync(self, buffer: memoryview, wait_ms: int) -> int:
        """In a worker thread: decrypt into ``buffer`` (at most its length); how many bytes. Reads
        ciphertext from the socket as needed; returns -1 when the socket stayed empty for
        ``wait_ms`` (the caller waits in the event loop), 0 when the client closed. Raises
        trio.BrokenResourceError on a TLS or socket error."""
        if self._cipher is None:
            self._cipher = memoryview(bytearray(RECEIVE_SIZE))
        while True:
            try:
                return self._tls.read(len(buffer), buffer)  # type: ignore[return-value]  # a count
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return 0
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
            n = read_socket_sync(self.fd, self._cipher, wait_ms)
            if n < 0:
                return -1
            if n:
                self._incoming.write(self._cipher[:n])
            else:
                self._incoming.write_eof()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self._tls.write(data)
        except ssl.SSLError as exc:
            raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
        await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Send close_notify (without waiting for the client's) and close the socket."""
        try:
            try:
                self._tls.unwrap()
            except ssl.SSLError:
                pass  # SSLWantReadError: the client's close_notify is not awaited
            await _quietly(self._flush())
        finally:
            await self.transport.aclose()


def read_socket_sync(fd: int, buffer: memoryview, wait_ms: int) -> int:
    """In a worker thread: receive into ``buffer`` from a non-blocking socket; how many bytes, -1
    when it stayed empty for ``wait_ms``, 0 when the client closed. Raises trio.BrokenResourceError
    (the plain-TCP counterpart of ``TlsStream.read_into_sync``)."""
    poller: select.poll | None = None
    while True:
        try:
            return os.readv(fd, [buffer])
        except BlockingIOError:
            pass
        except OSError as exc:
            raise trio.BrokenResourceError(f"receive failed: {exc}") from exc
        if poller is None:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
        if not poller.poll(wait_ms):
            return -1


async def _quietly(send: Awaitable[None]) -> None:
    """Await a best-effort send; a connection that is already gone is no error here."""
    try:
        await send
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
