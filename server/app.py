"""The storage role: restic's REST protocol v1/v2 (FORMAT.md §10) over buckets, plus /healthz and /metrics.

URLs are ``/<bucket>/`` (create), ``/<bucket>/config``, ``/<bucket>/<kind>/`` (list) and
``/<bucket>/<kind>/<name>``; ``<kind>`` is one of keys, data, index, snapshots, locks, packindex and
``<name>`` 64 lower-case hex characters. The path is matched *undecoded* against that grammar, so no
encoding of ``..`` or ``/`` can reach the file system: anything else is 404 before it touches a disk.

Order of checks for a request: address lists (403), route (404), credentials (401, or 429 while the
address is throttled: see auth.py), method (405), then the operation. Uploads: refuse an existing name
(403), check the quota against Content-Length (507, or 411 without a length), stream to a temp file while
hashing, 400 if the SHA-256 is not the name (config excepted), then commit without overwriting.
Append-only buckets refuse every DELETE but locks (403).

Errors are plain text without server paths; details go to the server log (``exception_response``).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial

import trio

from vaultfs.server.auth import Authenticator, TooManyAttempts
from vaultfs.server.config import ServerConfig
from vaultfs.server.metrics import Metrics, log_access
from vaultfs.server.protocol import ClientGone, FileRange, Logged, Producer, Request, Response
from vaultfs.server.proxy import AddressFilter, client_address
from vaultfs.server.quota import Quotas
from vaultfs.server.state import Bucket, BucketRegistry
from vaultfs.server.storage import (
    ObjectExists,
    OpenObjects,
    Storage,
    StorageError,
    Upload,
    read_cached,
    read_close_sync,
)

log = logging.getLogger("vaultfs.server")

V1 = "application/vnd.x.restic.rest.v1"
V2 = "application/vnd.x.restic.rest.v2"
_ROUTE = re.compile(
    r"/([a-z0-9][a-z0-9_-]{0,62})/"
    r"(?:(config)|(keys|data|index|snapshots|locks|packindex)/([0-9a-f]{64})?)?\Z"
)
_RANGE = re.compile(r"bytes=(\d*)-(\d*)\Z")
#: Bodies are written to disk in batches of this size: one worker-thread hop per batch, not per piece.
WRITE_BATCH = 1 << 20
READ_PIECE = 1 << 20


def text(status: int, message: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(
        status,
        [("content-type", "text/plain; charset=utf-8"), *(headers or [])],
        (message + "\n").encode(),
    )


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """(start, length) for a single ``bytes=`` range; None = send everything; "bad" = 416."""
    if not header or size == 0:
        return None
    match = _RANGE.match(header.strip())
    if match is None:
        return None  # several ranges or another unit: ignoring Range is always allowed
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix: the last N bytes
        n = int(last)
        if n == 0:
            return "bad"
        start = max(0, size - n)
        return start, size - start
    start = int(first)
    if start >= size:
        return "bad"
    end = size - 1 if not last else min(int(last), size - 1)
    if end < start:
        return "bad"
    return start, end - start + 1


class BufferPool:
    """Reused transfer buffers of one size: a fresh megabyte costs page faults on every touch, a
    reused one none. Buffers are page-aligned (anonymous mmap), as uploads written with O_DIRECT need.
    Keeps at most ``keep`` idle buffers. Lives in the server's trio thread; a buffer handed to a worker
    thread is given back only after that thread returned."""

    def __init__(self, size: int, keep: int = 16) -> None:
        self.size = size
        self.keep = keep
        self._free: list[mmap.mmap] = []

    def take(self) -> mmap.mmap:
        return self._free.pop() if self._free else mmap.mmap(-1, self.size)

    def give(self, buffer: mmap.mmap) -> None:
        if len(self._free) < self.keep and len(buffer) == self.size:
            self._free.append(buffer)


class BucketServer:
    """Request handler shared by all connections of one server (lives in its trio thread)."""

    def __init__(self, config: ServerConfig, registry: BucketRegistry, storage: Storage) -> None:
        self.config = config
        self.registry = registry
        self.storage = storage
        self.limiter = trio.CapacityLimiter(config.io_threads)
        self.auth = Authenticator(registry, config.auth_cache_seconds)
        self.quotas = Quotas(storage, self.limiter)
        self.metrics = Metrics()
        self.filter = AddressFilter(config.networks("allow"), config.networks("deny"))
        self.metrics_filter = AddressFilter(config.networks("metrics_allow"), [])
        self._commit_locks: dict[tuple[str, str, str], trio.Lock] = {}
        self.open_objects = OpenObjects()
        self.buffers = BufferPool(WRITE_BATCH)

    def close(self) -> None:
        self.open_objects.close()

    async def _thread(self, fn, *args):  # noqa: ANN001, ANN202 - thin wrapper over to_thread
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    # -- entry -----------------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        try:
            return await self._route(request)
        except ClientGone:
            raise
        except StorageError as exc:
            return exception_response(request, exc)
        except Exception as exc:  # a bug: log it, answer 500, keep serving
            return exception_response(request, exc)

    def record(self, request: Logged, status: int, sent: int, seconds: float) -> None:
        self.metrics.record(request.bucket, request.method, status, request.received, sent)
        log_access(
            request.address,
            request.bucket if request.bucket != "-" else "",
            request.method,
            request.target,
            status,
            sent,
            seconds,
            request.headers.get("user-agent", "-"),
        )

    async def _route(self, request: Request) -> Response:
        request.address = client_address(
            request.peer,
            request.headers.get("x-forwarded-for"),
            self.config.trust_x_forwarded_for,
        )
        if not self.filter.permits(request.address):
            return text(403, "forbidden")
        if request.path == "/healthz":
            return await self._healthz(request)
        if request.path == "/metrics":
            if not self.metrics_filter.permits(request.address):
                return text(403, "forbidden")
            return Response(
                200,
                [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
                self.metrics.render().encode(),
            )
        match = _ROUTE.match(request.path)
        if match is None:
            return text(404, "not found")
        name, config, kind, obj = match.groups()
        try:
            bucket = await self.auth.check(
                name, request.headers.get("authorization"), request.address
            )
        except TooManyAttempts as exc:
            return text(
                429,
                f"too many failed logins from this address: retry in {exc.retry_after} s",
                [("retry-after", str(exc.retry_after))],
            )
        if bucket is None:
            return text(401, "unauthorized", [("www-authenticate", 'Basic realm="vaultfs"')])
        request.bucket = bucket.name
        method = request.method
        if config:
            kind, obj = "config", ""
        elif kind is None:
            return await self._bucket_root(request, bucket)
        elif obj is None:
            if method != "GET":
                return text(405, "method not allowed", [("allow", "GET")])
            return await self._list(request, bucket, kind)
        if method in ("GET", "HEAD"):
            return await self._get(request, bucket, kind, obj)
        if method == "POST":
            return await self._upload(request, bucket, kind, obj)
        if method == "DELETE":
            return await self._delete(bucket, kind, obj)
        return text(405, "method not allowed", [("allow", "GET, HEAD, POST, DELETE")])

    # -- operations ------------------------------------------------------------------------------

    async def _healthz(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return text(405, "method not allowed", [("allow", "GET, HEAD")])
        free = await self._thread(lambda: [self.storage.free_sync(v) for v in self.storage.volumes])
        if all(f < 0 for f in free):
            return text(503, "no volume is available")
        return text(200, "ok")

    async def _bucket_root(self, request: Request, bucket: Bucket) -> Response:
        if request.method != "POST":
            return text(405, "method not allowed", [("allow", "POST")])
        if request.query != "create=true":
            return text(400, "bad request: only ?create=true is supported")
        await self._thread(self.storage.create_layout_sync, bucket.name)
        return text(200, "created")

    async def _list(self, request: Request, bucket: Bucket, kind: str) -> Response:
        items = await self._thread(self.storage.list_sync, bucket.name, kind)
        if items is None:
            return text(404, "not found")
        if V2 in request.headers.get("accept", ""):
            doc: list = [{"name": n, "size": s} for n, s in items]
            ctype = V2
        else:
            doc = [n for n, _ in items]
            ctype = V1
        return Response(200, [("content-type", ctype)], json.dumps(doc).encode())

    async def _get(self, request: Request, bucket: Bucket, kind: str, name: str) -> Response:
        key = (bucket.name, kind, name)
        found = self.open_objects.get(key)
        if found is None:
            found = await self._thread(self.storage.open_sync, bucket.name, kind, name)
            if found is None:
                return text(404, "not found")
            self.open_objects.put(key, *found)
        fd, size = found
        span = parse_range(request.headers.get("range"), size)
        headers = [("content-type", "application/octet-stream"), ("accept-ranges", "bytes")]
        if span == "bad":
            return text(416, "range not satisfiable", [("content-range", f"bytes */{size}")])
        if request.method == "HEAD":
            return Response(200, headers, b"", length=size)
        status, start, length = 200, 0, size
        if isinstance(span, tuple):
            status, (start, length) = 206, span
            headers.append(("content-range", f"bytes {start}-{start + length - 1}/{size}"))
        if length > READ_PIECE:
            own = os.dup(fd)  # the cache may close its descriptor while this one streams
            return Response(
                status,
                headers,
                self._producer(own, start, length),
                length=length,
                on_done=lambda: os.close(own),
                file=FileRange(own, start, self._thread),
            )
        # Small answers: straight from the page cache when it holds them, else one worker hop.
        data = read_cached(fd, start, length)
        if data is None:
            data = await self._thread(read_close_sync, os.dup(fd), start, length)
        if len(data) != length:
            raise StorageError("object shorter than its size")
        return Response(status, headers, data)

    def _producer(self, fd: int, start: int, length: int) -> Producer:
        """Sends the object's bytes in pieces; the next piece is read from disk (into a pooled
        buffer) while one is sent. The caller closes ``fd`` (Response.on_done)."""
        end = start + length

        async def produce(send: Callable[[memoryview], Awaitable[None]]) -> None:
            tx, rx = trio.open_memory_channel[tuple[mmap.mmap, memoryview]](1)

            async def reader() -> None:
                async with tx:
                    offset = start
                    while offset < end:
                        want = min(READ_PIECE, end - offset)
                        buffer = self.buffers.take()
                        view = memoryview(buffer)[:want]
                        got = await self._thread(Storage.read_into_sync, fd, offset, view)
                        if got != want:
                            # Files are written once, so this is damage: end the connection
                            # rather than send less than the Content-Length promised.
                            raise ClientGone("object changed while it was sent")
                        offset += want
                        await tx.send((buffer, view))

            async with one_error(), trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                async with rx:
                    async for buffer, view in rx:
                        await send(view)  # returns once the kernel holds the bytes
                        self.buffers.give(buffer)

        return produce

    async def _upload(self, request: Request, bucket: Bucket, kind: str, name: str) -> Response:
        length = request.content_length
        quota = bucket.quota
        # Without a quota the existence check is part of begin_upload_sync (one thread call less).
        if quota > 0 and (
            await self._thread(self.storage.stat_sync, bucket.name, kind, name) is not None
        ):
            return text(403, "forbidden: the object exists already")
        if quota > 0 and length is None:
            return text(411, "length required: the bucket has a quota")
        size = length or 0
        if not await self.quotas.reserve(bucket, size):
            return text(507, "insufficient storage: the bucket's quota is exhausted")
        upload: Upload | None = None
        committed = False
        buffers = (self.buffers.take(), self.buffers.take())
        # The hash is the server's largest CPU cost per byte: computed only to be checked.
        verify = self.config.verify_uploads and kind != "config"
        self.metrics.uploads += 1
        try:
            try:
                upload = await self._thread(
                    partial(self.storage.begin_upload_sync, hashed=verify),
                    bucket.name,
                    kind,
                    name,
                    size,
                    buffers,
                )
            except ObjectExists:
                return text(403, "forbidden: the object exists already")
            await self._receive_into(request, upload)
            if upload.hash is not None and upload.hash.hexdigest() != name:
                return text(400, "bad request: the SHA-256 of the body is not the object's name")
            key = (bucket.name, kind, name)
            lock = self._commit_locks.setdefault(key, trio.Lock())
            try:
                async with lock:
                    await self._thread(
                        self.storage.finish_commit_sync, bucket.name, kind, name, upload
                    )
            except ObjectExists:
                return text(403, "forbidden: the object exists already")
            finally:
                if not lock.statistics().tasks_waiting and not lock.locked():
                    self._commit_locks.pop(key, None)
            committed = True
            self.quotas.stored(bucket, upload.size)
            return text(200, "ok")
        finally:
            self.quotas.release(bucket, size)
            if upload is not None and not committed:
                with trio.CancelScope(shield=True):
                    await self._thread(upload.abort_sync)
            for buffer in buffers:  # every write into them has returned by now
                self.buffers.give(buffer)
            self.metrics.uploads -= 1  # last: "no uploads" must mean no temp files either

    async def _receive_into(self, request: Request, upload: Upload) -> None:
        """Receive the body into ``upload``: pumped by worker threads that receive, hash and write
        each piece in one go when the protocol allows it (plain TCP, Content-Length), else pipelined."""
        if request.pumpable:
            await request.pump(upload, self._thread)
            return
        await self._receive_pipelined(request, upload)

    async def _receive_pipelined(self, request: Request, upload: Upload) -> None:
        """Receive the body into one buffer while a second task hashes and writes the previous one:
        the socket and the disk (and SHA-256, which releases the GIL) work at the same time. Three
        buffers of WRITE_BATCH circulate (one filling, one queued, one being written), so memory per
        upload stays flat and no piece is copied on its way from the socket to the file."""
        size = min(WRITE_BATCH, request.content_length or WRITE_BATCH)
        give_back, take = trio.open_memory_channel[memoryview](3)
        for _ in range(3):
            fresh = self.buffers.take() if size == WRITE_BATCH else bytearray(size)
            give_back.send_nowait(memoryview(fresh))
        send, receive = trio.open_memory_channel[tuple[memoryview, int]](1)

        async def writer() -> None:
            async with receive:
                async for buffer, filled in receive:
                    await self._thread(upload.write_sync, [buffer[:filled]])
                    give_back.send_nowait(buffer)

        async with one_error(), trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            async with send:
                while True:
                    buffer = await take.receive()
                    filled = 0
                    while filled < size:
                        n = await request.receive_into(buffer[filled:])
                        if n == 0:
                            break
                        filled += n
                    if filled:
                        await send.send((buffer, filled))
                    if filled < size:
                        break
        if size == WRITE_BATCH:  # all three are back once the writer finished
            while True:
                try:
                    self.buffers.give(take.receive_nowait().obj)  # type: ignore[arg-type]
                except trio.WouldBlock:
                    break

    async def _delete(self, bucket: Bucket, kind: str, name: str) -> Response:
        if bucket.append_only and kind != "locks":
            return text(403, "forbidden: the bucket is append-only")
        self.open_objects.drop((bucket.name, kind, name))
        freed = await self._thread(self.storage.remove_sync, bucket.name, kind, name)
        self.quotas.stored(bucket, -freed)
        return text(200, "ok")


@asynccontextmanager
async def one_error() -> AsyncIterator[None]:
    """Unwrap a nursery's ExceptionGroup that holds a single error, so callers can catch ClientGone
    or StorageError as they are (a helper task fails alone; its siblings are just cancelled)."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def exception_response(request: Request, exc: Exception) -> Response:
    """The one place that turns a failure into an HTTP answer; server paths stay in the log."""
    if isinstance(exc, StorageError):
        log.error("%s %s: %s", request.method, request.path, exc)
        if exc.status == 507:
            return text(507, "insufficient storage")
        if exc.status == 503:
            return text(503, "service unavailable")
        return text(500, "internal server error")
    log.error("%s %s failed", request.method, request.path, exc_info=exc)
    return text(500, "internal server error")
