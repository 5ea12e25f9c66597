"""REST backend: a vault behind a restic REST server (FORMAT.md §10), e.g. ``vault serve`` or rclone.

Location syntax is restic's: ``rest:http(s)://[user:password@]host[:port][/path/]``. User and password may
also come from VAULT_REST_USERNAME / VAULT_REST_PASSWORD (so a PSK need not appear on a command line), a
private CA bundle from VAULT_CACERT; HTTP_PROXY/HTTPS_PROXY/NO_PROXY are honoured.

Protocol notes that shape this module:

* Every request but ``create`` asks for protocol v2 (``Accept: application/vnd.x.restic.rest.v2``), so a
  listing carries sizes; a server that answers with anything but the v2 content type is treated as v1 and
  every listed object is HEADed for its size.
* Reads always send ``Range`` and accept 200 (a server that ignores Range) or 206; fewer bytes than asked
  for is a short read and an error, as in every backend.
* Uploads send the body as an iterator of pieces of at most _SEND_PIECE with an exact Content-Length:
  httpx copies a single large ``bytes`` body quadratically, and servers want the length up front (quota
  checks, no chunking). ``write_stream`` sends its source's bytes as they come; a source that fails (or
  gives the wrong number of bytes) cuts the body short, which no server stores.
* ``403`` on an upload means the object already exists (servers never overwrite), which for a write-once,
  content-addressed store is success; we confirm with a HEAD so an append-only refusal is not hidden.
* After an upload of a name was cut short (or answered with a temporary error), the next upload of that
  name first waits until the server holds nothing of it, or all of it. rclone writes under the final name
  while it receives and deletes the partial file only when its handler notices the broken body; a
  re-upload that completed before that was deleted with it (4 runs in 20 of the test without the
  wait). ``vault serve`` never shows a partial upload, so there the wait is one HEAD.

Errors: connection failures, timeouts and 408/429/500/502/503/504 are temporary (the retry wrapper retries
them), not sooner than a Retry-After header asks (up to ``RETRY_AFTER_MAX``); 401, 403, 404, 416, 507 and
other answers are permanent. Messages never contain the password.

Thread-safe: one httpx.Client (its connection pool is shared by all threads).
"""

from __future__ import annotations

import email.utils
import json
import os
import ssl
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from vaultfs.backend.base import Backend, Source, check_name, check_streamed_size
from vaultfs.errors import BackendError, FormatError, ObjectNotFound, UsageError

if TYPE_CHECKING:
    import httpx

V2 = "application/vnd.x.restic.rest.v2"
#: h11 joins each piece of an upload body into a new ``bytes``. backup and deep-verify have glibc map
#: every block of 512 KiB or more afresh (tools/common.tune_malloc), so 1 MiB pieces cost a mmap, 256 page
#: faults and a munmap each; smaller pieces reuse heap memory. vault backup of the 1.1 GB benchmark set
#: through vault serve, 4 paired rounds: 1 MiB pieces 6.62 s median, 256 KiB 5.74 s; client minor faults
#: 300,000 -> 100,000.
_SEND_PIECE = 256 * 1024
_TEMPORARY_STATUS = {408, 425, 429, 500, 502, 503, 504}
#: After a broken upload: how long the next upload of that name waits at most for the server to drop
#: the part it kept, and how long after the break it looks first (a server may not have noticed yet).
_PARTIAL_WAIT = 10.0
#: The longest Retry-After honoured (seconds); a server asking for more gets retried after this.
RETRY_AFTER_MAX = 30.0
_PARTIAL_SETTLE = 0.25


#: Bytes per socket read of an answer (httpcore's default is 64 KiB). Below the 512 KiB from which
#: tools/common.tune_malloc has each receive buffer mapped afresh.
_READ_SIZE = 256 * 1024


def _larger_reads() -> None:
    """Have httpcore read answers _READ_SIZE bytes at a time instead of 64 KiB.

    Each read goes through h11's event machinery and is copied three times on its way to us, so the
    number of reads is most of the client's CPU time for a download: 784 MB of packs through vault
    serve, 3 paired rounds, whole-pack reads 0.85-1.16 -> 0.64-0.81 CPU-s, 1 MiB ranges 1.13-1.62 ->
    1.04-1.30. httpcore has no option for it; its class attribute is changed only while it still holds
    the default this was measured against (it is process-wide, for every httpcore user alike).
    """
    from httpcore._sync.http11 import HTTP11Connection

    if getattr(HTTP11Connection, "READ_NUM_BYTES", None) == 64 * 1024:
        HTTP11Connection.READ_NUM_BYTES = _READ_SIZE


def _cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of ``kind`` in ``exc``'s chain of causes (httpx wraps the ssl error)."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None or isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def parse_rest_location(location: str) -> tuple[str, str | None, str | None]:
    """Split ``rest:URL`` into (base URL ending in "/" without credentials, user, password).

    Raises UsageError for anything that is not an http(s) URL.
    """
    url = location[len("rest:") :] if location.startswith("rest:") else location
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(
            f"bad REST location {redact(location)!r}: use rest:http(s)://[user:pass@]host:port/path/"
        )
    if parts.query or parts.fragment:
        raise UsageError(f"bad REST location {redact(location)!r}: no query or fragment allowed")
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    path = parts.path or "/"
    if not path.endswith("/"):
        path += "/"
    return urlunsplit((parts.scheme, netloc, path, "", "")), user, password


def redact(location: str) -> str:
    """The location with its password replaced by ``***`` (for messages and ``str(backend)``)."""
    prefix = "rest:" if location.startswith("rest:") else ""
    url = location[len(prefix) :]
    parts = urlsplit(url)
    if parts.password is None:
        return location
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return prefix + urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


class RestBackend(Backend):
    """Backend over HTTP(S) against a restic REST server.

    ``connections`` bounds the pool (parallel requests beyond it wait for a free connection); ``cacert``
    is a PEM file of extra CA certificates to trust (in addition to the system ones).
    """

    def __init__(
        self,
        location: str,
        *,
        cacert: str | None = None,
        connections: int = 16,
        timeout: float = 120.0,
    ) -> None:
        # httpx is imported here, not at module level: it costs ~50 ms that local-only runs need not pay.
        import httpx

        _larger_reads()
        self._transport_errors = (httpx.TransportError,)
        self._invalid_url = httpx.InvalidURL
        base, user, password = parse_rest_location(location)
        user = user if user is not None else os.environ.get("VAULT_REST_USERNAME") or None
        if password is None:
            password = os.environ.get("VAULT_REST_PASSWORD") or None
        self.base = base
        self.location = redact(location if location.startswith("rest:") else "rest:" + location)
        cacert = cacert or os.environ.get("VAULT_CACERT") or None
        verify: ssl.SSLContext | bool = True
        if cacert:
            try:
                verify = ssl.create_default_context()
                verify.load_verify_locations(cafile=cacert)
            except (OSError, ssl.SSLError) as exc:
                raise UsageError(f"cannot load CA certificates from {cacert}: {exc}") from None
        auth = httpx.BasicAuth(user, password or "") if user is not None else None
        self._client = httpx.Client(
            auth=auth,
            verify=verify,
            trust_env=True,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            headers={"Accept": V2},
            follow_redirects=False,
        )
        # (kind, name) of uploads cut short -> when; dict operations are atomic under the GIL.
        self._broken: dict[tuple[str, str], float] = {}

    # -- plumbing ------------------------------------------------------------------------------

    def _url(self, kind: str, name: str) -> str:
        if kind == "config":
            return self.base + "config"
        return f"{self.base}{kind}/{name}"

    @staticmethod
    def _what(kind: str, name: str) -> str:
        return "config" if kind == "config" else f"{kind}/{name}"

    def _send(self, method: str, url: str, what: str, **kwargs) -> httpx.Response:  # noqa: ANN003
        try:
            return self._client.request(method, url, **kwargs)
        except self._transport_errors as exc:
            raise self._transport_error(method, what, exc) from None
        except self._invalid_url as exc:
            raise UsageError(f"bad REST location {self.location}: {exc}") from None

    def _transport_error(self, method: str, what: str, exc: Exception) -> BackendError:
        reason = str(exc) or type(exc).__name__
        if _cause(exc, ssl.SSLCertVerificationError) is not None:
            # Permanent: retrying cannot make the server's certificate trusted.
            return BackendError(
                f"{method} {what} at {self.location} failed: {reason}; if the server's certificate "
                "comes from a private CA, pass that CA's certificate with --cacert (or VAULT_CACERT)"
            )
        return BackendError(
            f"{method} {what} at {self.location} failed: {reason}; check that the server is reachable",
            temporary=True,
        )

    def _status_error(self, resp: httpx.Response, method: str, what: str) -> BackendError:
        code = resp.status_code
        detail = (
            resp.text.strip().splitlines()[0][:200] if resp.text.strip() else resp.reason_phrase
        )
        if code == 401:
            hint = "; check the user name and password (PSK) in the location"
        elif code == 507:
            hint = "; the bucket's quota or the server's disk is full"
        elif code == 403 and "append-only" in detail:
            hint = (
                "; deleting (forget, prune) needs the server's administrator to lift it "
                "(vault server bucket set NAME --no-append-only)"
            )
        elif code == 403:
            hint = "; the server refused (append-only bucket, or the object exists)"
        else:
            hint = ""
        return BackendError(
            f"{method} {what} at {self.location}: HTTP {code} {detail}{hint}",
            temporary=code in _TEMPORARY_STATUS,
            retry_after=_retry_after(resp.headers.get("Retry-After")),
        )

    # -- contract ------------------------------------------------------------------------------

    def create(self) -> None:
        # restic sends create without the v2 Accept header; servers do not need it here.
        resp = self._send(
            "POST",
            self.base + "?create=true",
            "the vault folders",
            headers={"Accept": "*/*", "Content-Type": "binary/octet-stream"},
            content=b"",
        )
        if resp.status_code != 200:
            raise self._status_error(resp, "POST", "?create=true")

    def list(self, kind: str) -> Iterator[tuple[str, int]]:
        check_name(kind, "" if kind == "config" else "0" * 64)
        if kind == "config":
            try:
                yield "", self.stat("config", "")
            except ObjectNotFound:
                pass
            return
        url = f"{self.base}{kind}/"
        resp = self._send("GET", url, f"{kind}/")
        if resp.status_code == 404:
            return
        if resp.status_code != 200:
            raise self._status_error(resp, "GET", f"{kind}/")
        try:
            doc = json.loads(resp.content)
        except ValueError:
            raise BackendError(f"listing {kind}/ at {self.location}: not JSON") from None
        if resp.headers.get("content-type", "").split(";")[0].strip() == V2:
            items = [(str(e["name"]), int(e["size"])) for e in doc if isinstance(e, dict)]
        else:
            items = [(str(n), self.stat(kind, str(n))) for n in doc if isinstance(n, str)]
        for name, size in items:
            # A foreign server may list odd files (temp files, other tools' debris): skip them.
            try:
                check_name(kind, name)
            except FormatError:
                continue
            yield name, size

    def stat(self, kind: str, name: str) -> int:
        check_name(kind, name)
        what = self._what(kind, name)
        resp = self._send("HEAD", self._url(kind, name), what)
        if resp.status_code == 404:
            raise ObjectNotFound(f"{what} does not exist at {self.location}")
        if resp.status_code != 200:
            raise self._status_error(resp, "HEAD", what)
        try:
            return int(resp.headers["content-length"])
        except (KeyError, ValueError):
            raise BackendError(f"HEAD {what} at {self.location}: no Content-Length") from None

    def exists(self, kind: str, name: str) -> bool:
        try:
            self.stat(kind, name)
        except ObjectNotFound:
            return False
        return True

    def read(self, kind: str, name: str, offset: int = 0, length: int | None = None) -> bytes:
        check_name(kind, name)
        what = self._what(kind, name)
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must not be negative")
        if length == 0:
            self.stat(kind, name)
            return b""
        rng = f"bytes={offset}-" if length is None else f"bytes={offset}-{offset + length - 1}"
        request = self._client.build_request("GET", self._url(kind, name), headers={"Range": rng})
        try:
            resp = self._client.send(request, stream=True)
            try:
                if resp.status_code in (200, 206):
                    body = self._receive(resp, offset, length, what)
                else:
                    resp.read()
            finally:
                resp.close()
        except self._transport_errors as exc:
            raise self._transport_error("GET", what, exc) from None
        if resp.status_code == 404:
            raise ObjectNotFound(f"{what} does not exist at {self.location}")
        if resp.status_code == 416:
            raise BackendError(
                f"short read of {what}: wanted {length} bytes at offset {offset}, "
                "the object is smaller"
            )
        if resp.status_code not in (200, 206):
            raise self._status_error(resp, "GET", what)
        if length is not None and len(body) != length:
            raise BackendError(
                f"short read of {what}: wanted {length} bytes at offset {offset}, got {len(body)}"
            )
        return body

    def _receive(self, resp: httpx.Response, offset: int, length: int | None, what: str) -> bytes:
        """The requested bytes of a 200/206 answer, read in pieces."""
        skip = 0
        if resp.status_code == 200:
            skip = offset  # the server ignored Range and sent the whole object
        else:
            start = resp.headers.get("content-range", "").removeprefix("bytes ").split("-")[0]
            if start != str(offset):
                raise BackendError(f"GET {what}: server sent a different range ({start})")
        want = None if length is None else length
        pieces = []
        got = 0
        # The pieces as they arrive: iter_raw(size) would first join them into pieces of that size,
        # one more copy of every byte (whole-pack reads: 24% less CPU without it).
        for piece in resp.iter_raw():
            if skip:
                cut = min(skip, len(piece))
                piece = piece[cut:]
                skip -= cut
            if want is not None and got + len(piece) > want:
                piece = piece[: want - got]
            if piece:
                pieces.append(piece)
                got += len(piece)
            if want is not None and got >= want and resp.status_code == 200:
                # The rest of the object is not wanted: closing the unfinished answer closes the
                # connection. A 206 is read to its end instead, which keeps the connection for the
                # next request (stopping at the last wanted byte closed one per read).
                break
        return b"".join(pieces)

    def write(self, kind: str, name: str, data: bytes | bytearray | memoryview) -> None:
        self._post(kind, name, iter((data,)), memoryview(data).nbytes)

    def write_stream(self, kind: str, name: str, source: Source, size: int) -> None:
        def pieces() -> Iterator[bytes | bytearray | memoryview]:
            sent = 0
            for piece in source():
                sent += len(piece)
                if sent > size:
                    break
                yield piece
            # Raised inside the upload, this cuts the body short: the server never stores it.
            check_streamed_size(kind, name, sent, size)

        self._post(kind, name, pieces(), size)

    def _post(
        self, kind: str, name: str, pieces: Iterator[bytes | bytearray | memoryview], size: int
    ) -> None:
        """Upload ``size`` bytes with an exact Content-Length. An exception raised by ``pieces``
        aborts the request (the connection is dropped mid-body) and propagates."""
        check_name(kind, name)
        what = self._what(kind, name)
        key = (kind, name)
        broken = self._broken.get(key)
        if broken is not None:
            self._wait_for_partial(kind, name, size, broken)
        try:
            resp = self._send(
                "POST",
                self._url(kind, name),
                what,
                content=_slices(pieces),
                headers={
                    "Content-Length": str(size),
                    "Content-Type": "application/octet-stream",
                },
            )
        except BaseException:
            self._broken[key] = time.monotonic()
            raise
        if resp.status_code == 200:
            self._broken.pop(key, None)
            return
        if resp.status_code == 403 and self.exists(kind, name):
            self._broken.pop(key, None)
            return  # written once already (perhaps by our own earlier, retried attempt)
        if resp.status_code in _TEMPORARY_STATUS:
            self._broken[key] = time.monotonic()
        raise self._status_error(resp, "POST", what)

    def _wait_for_partial(self, kind: str, name: str, size: int, broken: float) -> None:
        """Before uploading ``kind/name`` again after the upload that broke at ``broken``: wait until
        the server holds none of it or all ``size`` bytes, ``_PARTIAL_WAIT`` seconds at most."""
        time.sleep(max(0.0, broken + _PARTIAL_SETTLE - time.monotonic()))
        deadline = time.monotonic() + _PARTIAL_WAIT
        delay = 0.02
        while True:
            try:
                held = self.stat(kind, name)
            except ObjectNotFound:
                return
            except BackendError:
                return  # the upload meets the same trouble and reports it
            if held == size or time.monotonic() >= deadline:
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def remove(self, kind: str, name: str) -> None:
        check_name(kind, name)
        what = self._what(kind, name)
        resp = self._send("DELETE", self._url(kind, name), what)
        if resp.status_code in (200, 204, 404):
            return
        raise self._status_error(resp, "DELETE", what)

    def close(self) -> None:
        self._client.close()


def _slices(pieces: Iterator[bytes | bytearray | memoryview]) -> Iterator[memoryview]:
    """The pieces cut into views of at most _SEND_PIECE bytes (slices, not copies: h11 copies each
    piece into the bytes it sends anyway)."""
    for piece in pieces:
        view = memoryview(piece).cast("B")
        for start in range(0, len(view), _SEND_PIECE):
            yield view[start : start + _SEND_PIECE]


def quote_credentials(user: str, password: str) -> str:
    """``user:password`` escaped for the userinfo part of a location URL."""
    return f"{quote(user, safe='')}:{quote(password, safe='')}"


__all__ = ["RestBackend", "V2", "parse_rest_location", "quote_credentials", "redact"]


def _retry_after(value: str | None) -> float | None:
    """Seconds a Retry-After header asks to wait (delta-seconds or an HTTP date), at most
    RETRY_AFTER_MAX; None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(int(value.strip()))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), RETRY_AFTER_MAX)
