"""Run the bucket server: listeners (TLS optional), one task per connection, graceful shutdown.

``serve(config, task_status=...)`` is a trio function: it binds, reports the bound URLs through
``task_status.started(urls)`` (port 0 in the config becomes the real port), and serves until cancelled or,
with ``handle_signals``, until SIGTERM/SIGINT. Shutdown closes the listeners, lets requests in flight finish
for up to ``shutdown_grace`` seconds (idle keep-alive connections close at once), then cancels what is
left: an upload cut off that way removes its temp file, so it is never half-visible. The temp files of a
server that was killed (kill -9, power loss) are removed ``abandoned_upload_seconds`` after the start (by
then no upload of that run can be alive), and the sweep repeats daily.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import ssl

import trio

from vaultfs.errors import UsageError
from vaultfs.server.app import BucketServer
from vaultfs.server.config import ServerConfig
from vaultfs.server.protocol import HttpConnection, Lifecycle, linger
from vaultfs.server.state import BucketRegistry
from vaultfs.server.storage import Storage
from vaultfs.server.tls import TlsStream

log = logging.getLogger("vaultfs.server")
#: Seconds between sweeps for abandoned uploads after the first.
SWEEP_INTERVAL = 24 * 3600.0

_ACCEPT_RETRY = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION  # TlsStream relies on it: a write never waits for a read
    ctx.set_alpn_protocols(["http/1.1"])
    _check_pem_files(cert, key)
    try:
        # A passphrase callback, so that OpenSSL never prompts on a terminal (none under systemd).
        ctx.load_cert_chain(cert, key, password=lambda: b"")
    except (OSError, ssl.SSLError) as exc:
        if getattr(exc, "reason", None) in ("KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED"):
            detail = f"the key {key} does not belong to the certificate {cert}"
        else:
            detail = f"{cert}, {key}: {exc}"
        raise UsageError(f"cannot load the TLS certificate and key: {detail}") from None
    return ctx


def _check_pem_files(cert: str, key: str) -> None:
    """A one-line UsageError naming the file at fault, for what OpenSSL reports only as "PEM lib"."""
    texts = {}
    for path in (cert, key):
        try:
            with open(path, "rb") as f:
                texts[path] = f.read(1 << 20)
        except OSError as exc:
            raise UsageError(f"cannot read the TLS file {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN CERTIFICATE-----" not in texts[cert]:
        raise UsageError(f"the TLS certificate {cert} holds no PEM certificate")
    if b"PRIVATE KEY-----" not in texts[key]:
        raise UsageError(f"the TLS key {key} holds no PEM private key")
    if b"ENCRYPTED" in texts[key]:
        raise UsageError(
            f"the TLS key {key} is encrypted; vault serve needs it unencrypted "
            "(openssl pkey -in KEY -out PLAIN-KEY, then keep PLAIN-KEY readable by the server only)"
        )


def open_state(config: ServerConfig) -> tuple[BucketRegistry, Storage]:
    """The bucket registry and the volumes of ``config`` (folders are created if missing)."""
    storage = Storage(config.volume_paths)
    try:
        storage.make_volumes_sync()
    except Exception as exc:
        raise UsageError(f"cannot create the server folders: {exc}") from None
    return BucketRegistry(config.state_dir), storage


#: The answer to a plain-HTTP request on the TLS port, so the client says what is wrong instead of
#: "server disconnected". The reason phrase says it too: a HEAD's answer shows no body.
_PLAIN_ON_TLS_TEXT = b"this server speaks HTTPS: use an https:// URL for it"
_PLAIN_ON_TLS = (
    b"HTTP/1.1 400 Bad Request, " + _PLAIN_ON_TLS_TEXT + b"\r\nContent-Type: text/plain\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s\n"
    % (len(_PLAIN_ON_TLS_TEXT) + 1, _PLAIN_ON_TLS_TEXT)
)


async def _plain_http_on_tls(stream: trio.SocketStream) -> bool:
    """Whether the client opened with plain HTTP (a letter, where TLS starts with byte 0x16); if it
    did, it got a 400 that says so and the connection is closed."""
    first = await stream.socket.recv(1, socket.MSG_PEEK)
    if not first or not first.isalpha():
        return False
    try:
        await stream.send_all(_PLAIN_ON_TLS)
        await linger(stream, 2.0)  # a request with a body still reads the answer
    finally:
        await stream.aclose()
    return True


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.registry, self.storage = open_state(config)
        self.app = BucketServer(config, self.registry, self.storage)
        self.lifecycle = Lifecycle()
        self.tls = tls_context(config.tls_cert, config.tls_key) if config.tls_cert else None
        self.connections = trio.CapacityLimiter(config.max_connections)
        self.shutdown = trio.Event()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            token = object()
            await self.connections.acquire_on_behalf_of(token)
            try:
                stream = await listener.accept()
            except OSError as exc:
                self.connections.release_on_behalf_of(token)
                if exc.errno in _ACCEPT_RETRY:
                    log.warning("accept failed (%s); retrying", exc)
                    await trio.sleep(0.1)
                    continue
                raise
            except BaseException:
                self.connections.release_on_behalf_of(token)
                raise
            nursery.start_soon(self._connection, stream, token)

    async def _connection(self, stream: trio.SocketStream, token: object) -> None:
        self.app.metrics.connections += 1
        self.app.metrics.accepted += 1
        try:
            try:
                peer = stream.socket.getpeername()[0]
            except OSError:
                await stream.aclose()
                return
            wrapped: trio.abc.Stream = stream
            if self.tls is not None:
                wrapped = tls = TlsStream(stream, self.tls)
                with trio.move_on_after(self.config.read_timeout) as scope:
                    try:
                        if await _plain_http_on_tls(stream):
                            return
                        await tls.do_handshake()
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        await stream.aclose()
                        return
                if scope.cancelled_caught:
                    await stream.aclose()
                    return
            conn = HttpConnection(
                wrapped,
                peer,
                self.app.handle,
                self.app.record,
                self.lifecycle,
                read_timeout=self.config.read_timeout,
                keepalive_timeout=self.config.keepalive_timeout,
            )
            await conn.serve()
        finally:
            self.app.metrics.connections -= 1
            self.connections.release_on_behalf_of(token)

    async def run(
        self,
        *,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
        handle_signals: bool = False,
    ) -> None:
        host, port = self.config.host_port
        try:
            listeners = await _open_listeners(host, port)
        except OSError as exc:
            raise UsageError(f"cannot listen on {self.config.listen}: {exc.strerror}") from None
        scheme = "https" if self.tls else "http"
        urls = []
        for listener in listeners:
            addr = listener.socket.getsockname()
            shown = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
            urls.append(f"{scheme}://{shown}:{addr[1]}/")
        try:
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as acceptors:
                    for listener in listeners:
                        acceptors.start_soon(self._accept_loop, listener, connections)
                    if handle_signals:
                        acceptors.start_soon(self._signals)
                    acceptors.start_soon(self._sweep_abandoned_uploads)
                    task_status.started(urls)
                    await self.shutdown.wait()
                    acceptors.cancel_scope.cancel()
                # Refuse new connections now: left open, the listeners would take them into the
                # backlog, where they would wait out the grace period for nothing.
                await _close_all(listeners)
                log.info("shutting down: %d connections open", self.app.metrics.connections)
                self.lifecycle.drain()
                connections.cancel_scope.deadline = trio.current_time() + self.config.shutdown_grace
        finally:
            await _close_all(listeners)
            self.registry.close()
            self.app.close()

    async def _sweep_abandoned_uploads(self) -> None:
        age = self.config.abandoned_upload_seconds
        delay = age
        while True:
            await trio.sleep(delay)
            delay = SWEEP_INTERVAL
            try:
                # abandon_on_cancel: shutdown does not wait for a walk over a large volume; the
                # thread logs what it removed itself, so a walk that ends during shutdown still
                # says what it removed.
                await trio.to_thread.run_sync(self._sweep_and_log_sync, age, abandon_on_cancel=True)
            except Exception:
                log.exception("sweeping abandoned uploads failed; trying again in a day")

    def _sweep_and_log_sync(self, age: float) -> None:
        removed, freed = self.storage.sweep_temp_sync(age)
        if removed:
            log.warning(
                "removed %d abandoned upload temp file(s), %.1f MB, unwritten for %.0f s or more",
                removed,
                freed / 1e6,
                age,
            )

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                self.shutdown.set()
                return


async def _open_listeners(host: str | None, port: int) -> list[trio.SocketListener]:
    """Listeners on every address of ``host`` (None: all, IPv4 and IPv6). Port 0 picks a free
    port that is the same on every address, so one port number reaches the server whichever
    family a client uses (the system would pick one per address)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    attempts = 20
    while port == 0 and len({x.socket.getsockname()[1] for x in listeners}) > 1 and attempts:
        # Take the first address's port for all; another program may take it in between.
        chosen = listeners[0].socket.getsockname()[1]
        await _close_all(listeners)
        attempts -= 1
        try:
            listeners = await trio.open_tcp_listeners(chosen, host=host)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            listeners = await trio.open_tcp_listeners(0, host=host)
    return listeners


async def _close_all(listeners: list[trio.SocketListener]) -> None:
    with trio.CancelScope(shield=True):
        for listener in listeners:
            await listener.aclose()  # a second close does nothing


async def serve(
    config: ServerConfig,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    handle_signals: bool = False,
) -> None:
    """Serve ``config`` until cancelled (or a signal, with ``handle_signals``); see the module doc."""
    await Server(config).run(task_status=task_status, handle_signals=handle_signals)
