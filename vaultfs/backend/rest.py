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
* Uploads carry an exact Content-Length (servers want it up front for quota checks; no chunking).
  ``write_stream`` sends its source's pieces as they come; a source that fails (or gives the wrong
  number of bytes) cuts the body short, which no server stores.
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

Thread-safe: one connection pool (httpclient.ConnectionPool) is shared by all threads.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from vaultfs.backend.base import Backend, Source, check_name, check_streamed_size
from vaultfs.backend.httpclient import (
    TRANSPORT_ERRORS,
    Buffer,
    ConnectionPool,
    SourceError,
    TunnelRefused,
    basic_authorization,
)
from vaultfs.errors import BackendError, FormatError, ObjectNotFound, UsageError

V2 = "application/vnd.x.restic.rest.v2"
_TEMPORARY_STATUS = {408, 425, 429, 500, 502, 503, 504}
#: After a broken upload: how long the next upload of that name waits at most for the server to drop
#: the part it kept, and how long after the break it looks first (a server may not have noticed yet).
_PARTIAL_WAIT = 10.0
_PARTIAL_SETTLE = 0.25
#: The longest Retry-After honoured (seconds); a server asking for more gets retried after this.
RETRY_AFTER_MAX = 30.0
_PROXY_AUTH = (
    "; the proxy wants a user and password: give them in its URL in HTTP_PROXY / HTTPS_PROXY "
    "(http://user:password@proxy:port)"
)
#: Pieces in which an answer that ignored Range is read up to the wanted offset.
_SKIP_PIECE = 1024 * 1024


Body = Buffer | Iterator[Buffer]


@dataclass(frozen=True)
class _Answer:
    """A whole answer (everything but range reads, whose bodies are read as they come)."""

    status: int
    reason: str
    headers: Message
    body: bytes


def parse_rest_location(location: str) -> tuple[str, str | None, str | None]:
    """Split ``rest:URL`` into (base URL ending in "/" without credentials, user, password).

    Raises UsageError for anything that is not an http(s) URL.
    """
    url = location[len("rest:") :] if location.startswith("rest:") else location
    usage = (
        f"bad REST location {redact(location)!r}: use rest:http(s)://[user:pass@]host:port/path/"
    )
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port that is not a number from 0 to 65535
    except ValueError:
        raise UsageError(usage) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(usage)
    if parts.query or parts.fragment:
        raise UsageError(f"bad REST location {redact(location)!r}: no query or fragment allowed")
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    path = parts.path or "/"
    if not path.endswith("/"):
        path += "/"
    return urlunsplit((parts.scheme, netloc, path, "", "")), user, password


def redact(location: str) -> str:
    """The location with its password replaced by ``***`` (for messages and ``str(backend)``)."""
    prefix = "rest:" if location.startswith("rest:") else ""
    url = location[len(prefix) :]
    try:
        parts = urlsplit(url)
    except ValueError:
        return prefix + "(unreadable URL)"
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
        base, user, password = parse_rest_location(location)
        user = user if user is not None else os.environ.get("VAULT_REST_USERNAME") or None
        if password is None:
            password = os.environ.get("VAULT_REST_PASSWORD") or None
        self.base = base
        self.location = redact(location if location.startswith("rest:") else "rest:" + location)
        cacert = cacert or os.environ.get("VAULT_CACERT") or None
        parts = urlsplit(base)
        context = None
        if parts.scheme == "https":
            # Only here: loading the system's CA certificates costs ~40 ms a command.
            context = ssl.create_default_context()
            if cacert:
                try:
                    context.load_verify_locations(cafile=cacert)
                except (OSError, ssl.SSLError) as exc:
                    raise UsageError(f"cannot load CA certificates from {cacert}: {exc}") from None
        assert parts.hostname is not None  # parse_rest_location checked
        # The vault's path on the server, ending in "/"; escapes the user wrote stay as they are.
        self._prefix = quote(parts.path, safe="/%:@!$&'()*+,;=-._~")
        self._headers = {"Accept": V2, "User-Agent": "vaultfs"}
        if user is not None:
            self._headers["Authorization"] = basic_authorization(user, password or "")
        self._pool = ConnectionPool(
            parts.scheme,
            parts.hostname,
            parts.port or (443 if parts.scheme == "https" else 80),
            context=context,
            timeout=timeout,
            connect_timeout=min(timeout, 30.0),
            size=connections,
        )
        # (kind, name) of uploads cut short -> when; dict operations are atomic under the GIL.
        self._broken: dict[tuple[str, str], float] = {}

    # -- plumbing ------------------------------------------------------------------------------

    def _path(self, kind: str, name: str) -> str:
        if kind == "config":
            return self._prefix + "config"
        return f"{self._prefix}{kind}/{name}"

    @staticmethod
    def _what(kind: str, name: str) -> str:
        return "config" if kind == "config" else f"{kind}/{name}"

    def _send(
        self,
        method: str,
        path: str,
        what: str,
        headers: dict[str, str] | None = None,
        body: Body | None = None,
        length: int = 0,
    ) -> _Answer:
        """One request, its answer read whole."""
        try:
            with self._pool.request(
                method, path, {**self._headers, **(headers or {})}, body, length
            ) as resp:
                return _Answer(resp.status, resp.reason, resp.headers, resp.read())
        except SourceError as exc:
            raise exc.error from None  # the caller's own exception, as it was raised
        except TRANSPORT_ERRORS as exc:
            raise self._transport_error(method, what, exc) from None

    def _transport_error(self, method: str, what: str, exc: Exception) -> BackendError:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, ssl.SSLCertVerificationError):
            # Permanent: retrying cannot make the server's certificate trusted.
            return BackendError(
                f"{method} {what} at {self.location} failed: {reason}; if the server's certificate "
                "comes from a private CA, pass that CA's certificate with --cacert (or VAULT_CACERT)"
            )
        if isinstance(exc, TunnelRefused) and exc.status == 407:
            return BackendError(f"{method} {what} at {self.location} failed: {reason}{_PROXY_AUTH}")
        if isinstance(exc, TunnelRefused) and exc.status < 500:
            # Permanent: the proxy's rules refuse this server (403) or the request; a 5xx (the proxy
            # could not reach the server, or is overloaded) may pass.
            return BackendError(
                f"{method} {what} at {self.location} failed: {reason}; check the proxy in "
                "HTTPS_PROXY (or set NO_PROXY for this server)"
            )
        return BackendError(
            f"{method} {what} at {self.location} failed: {reason}; check that the server is reachable",
            temporary=True,
        )

    def _status_error(self, answer: _Answer, method: str, what: str) -> BackendError:
        code = answer.status
        text = answer.body.decode("utf-8", "replace").strip()
        detail = text.splitlines()[0][:200] if text else answer.reason
        if code == 401:
            hint = "; check the user name and password (PSK) in the location"
        elif code == 407:
            hint = _PROXY_AUTH
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
            retry_after=_retry_after(answer.headers.get("Retry-After")),
        )

    # -- contract ------------------------------------------------------------------------------

    def create(self) -> None:
        # restic sends create without the v2 Accept header; servers do not need it here.
        answer = self._send(
            "POST",
            self._prefix + "?create=true",
            "the vault folders",
            headers={"Accept": "*/*", "Content-Type": "binary/octet-stream"},
            body=b"",
        )
        if answer.status != 200:
            raise self._status_error(answer, "POST", "?create=true")

    def list(self, kind: str) -> Iterator[tuple[str, int]]:
        check_name(kind, "" if kind == "config" else "0" * 64)
        if kind == "config":
            try:
                yield "", self.stat("config", "")
            except ObjectNotFound:
                pass
            return
        answer = self._send("GET", f"{self._prefix}{kind}/", f"{kind}/")
        if answer.status == 404:
            return
        if answer.status != 200:
            raise self._status_error(answer, "GET", f"{kind}/")
        try:
            doc = json.loads(answer.body)
        except ValueError:
            raise BackendError(f"listing {kind}/ at {self.location}: not JSON") from None
        if answer.headers.get("content-type", "").split(";")[0].strip() == V2:
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
        answer = self._send("HEAD", self._path(kind, name), what)
        if answer.status == 404:
            raise ObjectNotFound(f"{what} does not exist at {self.location}")
        if answer.status != 200:
            raise self._status_error(answer, "HEAD", what)
        try:
            return int(answer.headers["content-length"])
        except (KeyError, TypeError, ValueError):
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
        headers = {**self._headers, "Range": rng}
        try:
            with self._pool.request("GET", self._path(kind, name), headers) as resp:
                if resp.status in (200, 206):
                    body = self._receive(resp, offset, length, what)
                else:
                    answer = _Answer(resp.status, resp.reason, resp.headers, resp.read())
        except TRANSPORT_ERRORS as exc:
            raise self._transport_error("GET", what, exc) from None
        if resp.status == 404:
            raise ObjectNotFound(f"{what} does not exist at {self.location}")
        if resp.status == 416:
            raise BackendError(
                f"short read of {what}: wanted {length} bytes at offset {offset}, "
                "the object is smaller"
            )
        if resp.status not in (200, 206):
            raise self._status_error(answer, "GET", what)
        if length is not None and len(body) != length:
            raise BackendError(
                f"short read of {what}: wanted {length} bytes at offset {offset}, got {len(body)}"
            )
        return body

    def _receive(
        self, resp: http.client.HTTPResponse, offset: int, length: int | None, what: str
    ) -> bytes:
        """The requested bytes of a 200/206 answer.

        A 206 is read to its end in one call, which reads straight into the bytes returned and keeps
        the connection for the next request. A 200 (a server that ignored Range) is read up to the
        offset and then only as far as wanted; the pool closes the connection of an answer not read to
        its end."""
        if resp.status == 206:
            start = (resp.getheader("content-range") or "").removeprefix("bytes ").split("-")[0]
            if start != str(offset):
                raise BackendError(f"GET {what}: server sent a different range ({start})")
            return resp.read()
        skip = offset
        while skip:
            piece = resp.read(min(skip, _SKIP_PIECE))
            if not piece:
                return b""
            skip -= len(piece)
        return resp.read() if length is None else resp.read(length)

    def write(self, kind: str, name: str, data: bytes | bytearray | memoryview) -> None:
        self._post(kind, name, data, memoryview(data).nbytes)

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

    def _post(self, kind: str, name: str, body: Body, size: int) -> None:
        """Upload ``size`` bytes (one buffer, or an iterator of pieces) with an exact Content-Length.
        An exception raised by the iterator aborts the request (the connection is dropped mid-body)
        and propagates."""
        check_name(kind, name)
        what = self._what(kind, name)
        key = (kind, name)
        broken = self._broken.get(key)
        if broken is not None:
            self._wait_for_partial(kind, name, size, broken)
        try:
            answer = self._send(
                "POST",
                self._path(kind, name),
                what,
                headers={"Content-Type": "application/octet-stream"},
                body=body,
                length=size,
            )
        except BaseException:
            self._broken[key] = time.monotonic()
            raise
        if answer.status == 200:
            self._broken.pop(key, None)
            return
        if answer.status == 403 and self.exists(kind, name):
            self._broken.pop(key, None)
            return  # written once already (perhaps by our own earlier, retried attempt)
        if answer.status in _TEMPORARY_STATUS:
            self._broken[key] = time.monotonic()
        raise self._status_error(answer, "POST", what)

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
        answer = self._send("DELETE", self._path(kind, name), what)
        if answer.status in (200, 204, 404):
            return
        raise self._status_error(answer, "DELETE", what)

    def close(self) -> None:
        self._pool.close()


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
