"""REST backend: location parsing, and real round trips against `rclone serve restic` with vault and restic.

The vaultfs bucket server is exercised by tests/server/ and by the conformance suite in test_local.py.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.helpers.ci import unavailable
from tests.helpers.restic import Restic
from tests.helpers.trees import assert_same_tree
from tests.tools.cli import vault
from vaultfs.backend import open_backend
from vaultfs.backend.rest import RestBackend, parse_rest_location, redact
from vaultfs.backend.retry import RetryBackend
from vaultfs.errors import BackendError, ObjectNotFound, UsageError


class Rclone:
    """`rclone serve restic` on 127.0.0.1 and a free port, serving ``root``. A thread keeps reading
    its log (so the pipe never fills), and ``wait_for_log`` waits for a line."""

    def __init__(self, root: Path, *extra: str) -> None:
        binary = shutil.which("rclone")
        if binary is None:
            unavailable("rclone is not installed (apt-get install rclone)")
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.proc = subprocess.Popen(
            [binary, "serve", "restic", "--addr", "127.0.0.1:0", *extra, str(root)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "RCLONE_CONFIG": "/dev/null"},
        )
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._pumping = threading.Thread(target=self._pump, daemon=True)
        self._pumping.start()
        self.url = ""
        found = self.wait_for_log(r"http://127\.0\.0\.1:\d+/", timeout=30)
        if found is None:
            self.stop()
            raise AssertionError("rclone serve restic did not report its address")
        self.url = found.group(0)

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._lines.append("")  # end of the log
            self._changed.notify_all()

    def wait_for_log(self, pattern: str, timeout: float) -> re.Match[str] | None:
        """The first match of ``pattern`` in the log so far or within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self._lines[seen:]:
                    found = re.search(pattern, line)
                    if found:
                        return found
                seen = len(self._lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self._lines and self._lines[-1] == ""):
                    return None
                self._changed.wait(left)

    def location(self, path: str, creds: str = "") -> str:
        return "rest:" + self.url.replace("http://", f"http://{creds}") + path.lstrip("/")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self._pumping.join(timeout=10)  # the log ends when rclone exits
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def rclone(tmp_path):
    server = Rclone(tmp_path / "rclone")
    yield server
    server.stop()


def test_location_parsing():
    assert parse_rest_location("rest:http://u:p%40ss@host:8000/b/") == (
        "http://host:8000/b/",
        "u",
        "p@ss",
    )
    assert parse_rest_location("rest:https://host") == ("https://host/", None, None)
    assert parse_rest_location("rest:http://[::1]:80/a/b") == ("http://[::1]:80/a/b/", None, None)
    assert redact("rest:http://u:secret@h:1/b/") == "rest:http://u:***@h:1/b/"
    assert "secret" not in str(open_backend("rest:http://u:secret@127.0.0.1:1/b/"))
    bad_urls = ("rest:ftp://h/", "rest:http:///x", "rest:http://h/?a=1", "rest:http://h:abc/x/",
                "rest:http://h:99999/", "rest:http://[::1/x/")  # fmt: skip
    for bad in bad_urls:
        with pytest.raises(UsageError):
            parse_rest_location(bad)
    with pytest.raises(UsageError, match="bad host name"):
        RestBackend("rest:http://a..b:1/x/")
    # A name in another script goes into the Host header in its ASCII (IDNA) form.
    assert RestBackend("rest:http://例え.jp:1/x/")._pool._host_header == "xn--r8jz45g.jp:1"


def test_credentials_and_ca_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VAULT_REST_USERNAME", "bucket")
    monkeypatch.setenv("VAULT_REST_PASSWORD", "psk")
    be = RestBackend("rest:http://127.0.0.1:1/bucket/")
    assert be._headers["Authorization"] == "Basic " + base64.b64encode(b"bucket:psk").decode()
    be.close()
    monkeypatch.setenv("VAULT_CACERT", str(tmp_path / "missing.pem"))
    with pytest.raises(UsageError, match="CA certificates"):
        RestBackend("rest:https://127.0.0.1:1/bucket/")


def test_unreachable_server_is_a_temporary_error():
    be = RestBackend("rest:http://127.0.0.1:1/x/", timeout=5)
    with pytest.raises(BackendError) as info:
        be.stat("config", "")
    be.close()
    assert info.value.temporary
    assert "reachable" in str(info.value)


def test_backend_against_rclone(rclone):
    be = RestBackend(rclone.location("/v/"))
    be.create()
    data = os.urandom(3 * (1 << 20) + 17)  # several upload pieces
    name = hashlib.sha256(data).hexdigest()
    for kind in ("data", "index", "packindex"):
        be.write(kind, name, data)
        assert list(be.list(kind)) == [(name, len(data))]
        assert be.stat(kind, name) == len(data)
        assert be.read(kind, name) == data
        assert be.read(kind, name, 1 << 20, 5) == data[1 << 20 : (1 << 20) + 5]
        assert be.read(kind, name, len(data) - 3) == data[-3:]
        with pytest.raises(BackendError, match="short read"):
            be.read(kind, name, len(data) - 3, 10)
        be.remove(kind, name)
        be.remove(kind, name)
        assert not be.exists(kind, name)
    with pytest.raises(ObjectNotFound):
        be.read("snapshots", "a" * 64)
    assert list(be.list("config")) == []
    be.write("config", "", b"cfg")
    assert list(be.list("config")) == [("", 3)]
    # The files sit in the restic layout on the server's disk.
    assert (rclone.root / "v" / "config").read_bytes() == b"cfg"
    be.close()


def test_streamed_write_against_rclone(rclone):
    """write_stream uploads piece by piece; a source that fails before its last piece cuts the body
    short and its exception comes through, and a complete write of the same object afterwards stores
    it. rclone writes under the final name while it receives and removes the partial file only once
    its handler notices the broken body; a write of the same name that completed before that clean-up
    was deleted by it (4 runs in 20 before the backend waited). So the backend's next upload of a
    name whose upload broke waits for the partial file to go, and the object is still there after
    rclone's clean-up. vault serve never shows a partial file (tests/backend/test_local.py)."""
    be = RestBackend(rclone.location("/v/"))
    be.create()
    data = os.urandom(3 * (1 << 20) + 17)
    name = hashlib.sha256(data).hexdigest()
    pieces = [data[i : i + (1 << 20)] for i in range(0, len(data), 1 << 20)]

    def failing():
        yield from pieces[:-1]
        raise OSError("the source file went away")  # not to be taken for a broken connection

    with pytest.raises(OSError, match="source file went away"):
        be.write_stream("data", name, failing, len(data))
    # The retry wrapper sends the whole body from a fresh pass over the source.
    retried = RetryBackend(be, first_delay=0.05)
    retried.write_stream("data", name, lambda: iter(pieces), len(data))
    assert rclone.wait_for_log(f"{name}: Removing partially written file", timeout=30)
    time.sleep(0.2)  # rclone logs just before it removes the file
    assert be.read("data", name) == data
    be.close()


def test_wrong_credentials_are_a_permanent_error(tmp_path):
    server = Rclone(tmp_path / "auth", "--user", "alice", "--pass", "right")
    right = RestBackend(server.location("/v/", "alice:right@"))
    wrong = RestBackend(server.location("/v/", "alice:wrong@"))
    try:
        right.create()
        with pytest.raises(BackendError, match="401") as info:
            wrong.stat("config", "")
        assert not info.value.temporary
        assert "wrong" not in str(info.value)
    finally:
        right.close()
        wrong.close()
        server.stop()


def test_vault_reads_a_restic_repository_through_rclone(restic_repo_v2, rclone, tmp_path):
    shutil.copytree(restic_repo_v2.path, rclone.root / "repo")
    loc = rclone.location("/repo/")
    target = tmp_path / "restored"
    vault("-r", loc, "restore", f"{restic_repo_v2.snapshot_id}:text", "--target", target,
          password=restic_repo_v2.password)  # fmt: skip
    assert_same_tree(restic_repo_v2.restored / "text", target, owners=True)


def test_vault_backs_up_to_and_restores_from_rclone(rclone, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "big").write_bytes(os.urandom(3 << 20))
    (src / "small.txt").write_text("hello\n" * 500)
    os.symlink("small.txt", src / "link")
    loc = rclone.location("/mine/")
    vault("-r", loc, "init")
    vault("-r", loc, "backup", src)
    target = tmp_path / "restored"
    vault("-r", loc, "restore", "latest", "--target", target)
    assert_same_tree(src, Path(f"{target}{src}"), owners=True)
    Restic(loc, "pw").check("--read-data")


def test_a_server_that_ignores_range_still_gives_the_asked_bytes() -> None:
    """Some HTTP servers answer a Range request with 200 and the whole object: the backend skips to
    the offset itself, across the many pieces a large answer arrives in."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    body = os.urandom(300 * 1024)

    class WholeObject(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), WholeObject)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        backend = RestBackend(f"rest:http://127.0.0.1:{server.server_address[1]}/")
        name = "ab" * 32
        offset, length = 100 * 1024 + 3, 150 * 1024
        assert backend.read("data", name, offset, length) == body[offset : offset + length]
        assert backend.read("data", name, len(body) - 5, 5) == body[-5:]
        assert backend.read("data", name, 0, 1) == body[:1]
        backend.close()
    finally:
        server.shutdown()
        server.server_close()


def test_reads_keep_their_connection(tmp_path):
    """Range reads, whole reads, stats and writes all go over one kept-alive connection: a range
    read that stopped at its last byte used to close the connection, so every read of a mount or a
    restore paid a new connection on both sides (counted by the server's /metrics)."""
    import httpx

    from tests.server.harness import ServerThread, server_config

    server = ServerThread(server_config(str(tmp_path / "srv")))

    def accepted() -> int:
        text = httpx.get(f"{server.url}metrics", timeout=30).text
        found = re.search(r"^vaultfs_connections_total (\d+)$", text, re.M)
        assert found is not None
        return int(found.group(1))

    try:
        creds = server.bucket()
        backend = RestBackend(creds.location)
        before = accepted()
        backend.create()
        data = os.urandom(200 * 1024)
        name = hashlib.sha256(data).hexdigest()
        backend.write("data", name, data)
        for i in range(20):
            offset = i * 9000
            assert backend.read("data", name, offset, 5000 + i) == data[offset : offset + 5000 + i]
        assert backend.read("data", name) == data
        assert backend.read("data", name, 150_000) == data[150_000:]
        assert backend.stat("data", name) == len(data)
        # one for the client, one for the second look at /metrics
        assert accepted() - before == 2
        backend.close()
    finally:
        server.stop()


class ForwardProxy:
    """An HTTP proxy on 127.0.0.1: absolute-form requests (as HTTP_PROXY makes clients send them) and
    CONNECT tunnels (HTTPS_PROXY). It records each request's method and path (the tunnel's host:port for
    CONNECT), asks for ``credentials`` ("user:password", 407 without them) when given, and answers the
    first ``fail_first`` requests whose path contains ``fail_on`` with ``fail_status`` itself instead of
    forwarding them."""

    def __init__(
        self,
        fail_on: str = "",
        fail_first: int = 0,
        fail_status: int = 503,
        fail_headers: dict[str, str] | None = None,
        credentials: str | None = None,
    ) -> None:
        import http.client
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        self.seen: list[tuple[str, str]] = []
        self.times: list[float] = []  # when each request in ``seen`` arrived (time.monotonic)
        self.fail_on, self.fail_first, self.fail_status = fail_on, fail_first, fail_status
        self.fail_headers = fail_headers or {}
        self.failed = 0
        self.credentials = credentials
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _authorized(self) -> bool:
                if proxy.credentials is None:
                    return True
                token = base64.b64encode(proxy.credentials.encode()).decode()
                if self.headers.get("Proxy-Authorization") == f"Basic {token}":
                    return True
                self.send_response(407)
                self.send_header("Proxy-Authenticate", 'Basic realm="test"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return False

            def do_CONNECT(self) -> None:  # noqa: N802 - http.server's name
                proxy.seen.append(("CONNECT", self.path))
                proxy.times.append(time.monotonic())
                if not self._authorized():
                    self.close_connection = True
                    return
                # The target is an authority, host:port, an IPv6 address in brackets (RFC 9110).
                try:
                    target = urlsplit("//" + self.path)
                    host, port = target.hostname, target.port
                except ValueError:
                    host = port = None
                if not host or not port:
                    self.send_error(400, "bad CONNECT target")
                    return
                try:
                    upstream = socket.create_connection((host, port), timeout=60)
                except OSError:
                    self.send_error(502, "cannot reach the server")
                    return
                self.send_response(200, "Connection established")
                self.end_headers()
                self.close_connection = True

                def pipe(src: socket.socket, dst: socket.socket) -> None:
                    try:
                        while data := src.recv(1 << 16):
                            dst.sendall(data)
                    except OSError:
                        pass
                    finally:
                        with contextlib.suppress(OSError):
                            dst.shutdown(socket.SHUT_WR)

                back = threading.Thread(target=pipe, args=(upstream, self.connection), daemon=True)
                back.start()
                pipe(self.connection, upstream)
                back.join(60)
                upstream.close()

            def _forward(self) -> None:
                url = urlsplit(self.path)
                proxy.seen.append((self.command, url.path))
                proxy.times.append(time.monotonic())
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if not self._authorized():
                    return
                if proxy.fail_on in url.path and proxy.failed < proxy.fail_first:
                    proxy.failed += 1
                    self.send_response(proxy.fail_status)
                    for key, value in proxy.fail_headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                upstream = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("proxy-connection", "proxy-authorization")
                }
                target = url.path + (f"?{url.query}" if url.query else "")
                upstream.request(self.command, target, body=body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                upstream.close()

            do_GET = do_HEAD = do_POST = do_DELETE = _forward  # noqa: N815 - http.server's names

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def env(self, scheme: str = "http", credentials: str | None = None) -> dict[str, str]:
        """Environment that sends a client's ``scheme`` requests through this proxy."""
        url = self.url.replace("://", f"://{credentials}@") if credentials else self.url
        name = f"{scheme}_proxy"
        return {name.upper(): url, name: url, "NO_PROXY": "", "no_proxy": ""}

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_http_proxy_is_honoured_and_temporary_errors_are_retried(tmp_path):
    """HTTP_PROXY routes every request through the proxy; a 503 on the way is retried (the command
    succeeds), a 403 is not (it is the server's answer)."""
    from tests.server.harness import ServerThread, server_config

    server = ServerThread(server_config(str(tmp_path / "srv")))
    proxy = ForwardProxy(fail_on="/snapshots/", fail_first=2)
    env = proxy.env()
    try:
        creds = server.bucket()
        src = tmp_path / "src"
        src.mkdir()
        (src / "a.txt").write_text("through the proxy\n")
        vault("-r", creds.location, "init", env=env)
        vault("-r", creds.location, "backup", src, env=env)
        bucket = f"/{creds.name}/"
        assert ("POST", f"{bucket}config") in proxy.seen
        assert any(m == "POST" and p.startswith(f"{bucket}data/") for m, p in proxy.seen)
        listed = json.loads(vault("-r", creds.location, "snapshots", "--json", env=env).out)
        assert len(listed) == 1
        assert proxy.failed == 2  # both 503s were answered, and the listing still came through
        gets = [p for m, p in proxy.seen if m == "GET" and p == f"{bucket}snapshots/"]
        assert len(gets) >= 3
        proxy.fail_status, proxy.failed, proxy.fail_first = 403, 0, 1
        before = len(proxy.seen)
        refused = vault("-r", creds.location, "snapshots", env=env, expect=1)
        assert "HTTP 403" in refused.err
        assert [p for m, p in proxy.seen[before:] if p == f"{bucket}snapshots/"] == [
            f"{bucket}snapshots/"
        ]
    finally:
        proxy.stop()
        server.stop()


def test_retry_after_is_honoured(tmp_path):
    """A 429 (or 503) with Retry-After is retried no sooner than it asks, not after the usual 0.5 s:
    the server's login throttle answers so, and a client that comes back early only gets another 429."""
    from tests.server.harness import ServerThread, server_config

    server = ServerThread(server_config(str(tmp_path / "srv")))
    proxy = ForwardProxy(fail_on="/snapshots/", fail_first=1, fail_status=429,
                         fail_headers={"Retry-After": "2"})  # fmt: skip
    env = proxy.env()
    try:
        creds = server.bucket()
        vault("-r", creds.location, "init", env=env)
        assert json.loads(vault("-r", creds.location, "snapshots", "--json", env=env).out) == []
        listings = [
            t for (m, p), t in zip(proxy.seen, proxy.times, strict=True)
            if m == "GET" and p == f"/{creds.name}/snapshots/"
        ]  # fmt: skip
        assert proxy.failed == 1 and len(listings) == 2
        assert listings[1] - listings[0] >= 1.9
    finally:
        proxy.stop()
        server.stop()


def test_retry_after_values():
    from vaultfs.backend.rest import RETRY_AFTER_MAX, _retry_after

    assert _retry_after("3") == 3.0
    assert _retry_after("100000") == RETRY_AFTER_MAX
    assert _retry_after(None) is None and _retry_after("soon") is None
    past = "Wed, 21 Oct 2015 07:28:00 GMT"
    assert _retry_after(past) == 0.0
    future = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert 8.0 <= _retry_after(future) <= 10.0


def _set_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def _write_and_read_back(backend: RestBackend, size: int) -> tuple[str, bytes]:
    """Create the vault, upload a random object of ``size`` bytes and read a range of it back."""
    backend.create()
    data = os.urandom(size)
    name = hashlib.sha256(data).hexdigest()
    backend.write("data", name, data)
    assert backend.read("data", name, 1000, 5000) == data[1000:6000]
    return name, data


def test_https_through_a_connect_proxy_that_wants_credentials(tmp_path, monkeypatch):
    """HTTPS_PROXY: requests to an https server go through one kept-alive CONNECT tunnel, with the
    proxy's credentials from the proxy URL, and the server's certificate is still checked (the tunnel's
    far end). Wrong proxy credentials are a permanent error that says so."""
    from tests.server.harness import ServerThread, make_cert, server_config

    cert, key = make_cert(tmp_path)
    config = server_config(str(tmp_path / "srv"), tls_cert=str(cert), tls_key=str(key))
    server = ServerThread(config)
    proxy = ForwardProxy(credentials="proxy:s3cret")
    try:
        creds = server.bucket()
        assert creds.url.startswith("https://")
        _set_env(monkeypatch, proxy.env("https", "proxy:s3cret"))
        backend = RestBackend(creds.location, cacert=str(cert))
        name, data = _write_and_read_back(backend, 300_000)
        assert list(backend.list("data")) == [(name, len(data))]
        backend.close()
        assert proxy.seen == [("CONNECT", urlsplit(server.url).netloc)]

        backend = RestBackend(creds.location)  # the proxy does not make the server trusted
        with pytest.raises(BackendError, match="certificate verify failed") as info:
            backend.stat("config", "")
        assert not info.value.temporary
        backend.close()

        _set_env(monkeypatch, proxy.env("https", "proxy:wrong"))
        backend = RestBackend(creds.location, cacert=str(cert))
        with pytest.raises(BackendError, match="407") as info:
            backend.stat("config", "")
        assert not info.value.temporary
        assert "proxy" in str(info.value) and "wrong" not in str(info.value)
        backend.close()
    finally:
        proxy.stop()
        server.stop()


def test_https_to_an_ipv6_address_through_a_connect_proxy(tmp_path, monkeypatch):
    """The CONNECT target keeps an IPv6 address's brackets ([::1]:port), which Python 3.11's own
    tunnel drops; a proxy's refusal is a permanent error that names the proxy."""
    from tests.server.harness import ServerThread, make_cert, server_config

    cert, key = make_cert(tmp_path)
    config = server_config(
        str(tmp_path / "srv"), listen="[::1]:0", tls_cert=str(cert), tls_key=str(key)
    )
    server = ServerThread(config)
    proxy = ForwardProxy()
    try:
        creds = server.bucket()
        assert creds.url.startswith("https://[::1]:")
        _set_env(monkeypatch, proxy.env("https"))
        backend = RestBackend(creds.location, cacert=str(cert))
        _write_and_read_back(backend, 100_000)
        backend.close()
        assert proxy.seen == [("CONNECT", urlsplit(server.url).netloc)]
        assert urlsplit(server.url).netloc.startswith("[::1]:")
    finally:
        proxy.stop()
        server.stop()
    # The server is gone: the proxy answers the CONNECT with an error, not a tunnel.
    proxy = ForwardProxy()
    try:
        _set_env(monkeypatch, proxy.env("https"))
        backend = RestBackend("rest:https://b:p@[::1]:9/b/", cacert=str(cert))
        with pytest.raises(BackendError, match="the proxy refused the tunnel: 502") as info:
            backend.stat("config", "")
        assert info.value.temporary
        backend.close()
    finally:
        proxy.stop()


def test_http_proxy_credentials(tmp_path, monkeypatch):
    """Through an HTTP_PROXY that wants credentials: sent from the proxy URL on every request (and not
    passed on to the server); without them, a permanent error that names the proxy."""
    from tests.server.harness import ServerThread, server_config

    server = ServerThread(server_config(str(tmp_path / "srv")))
    proxy = ForwardProxy(credentials="proxy:s3cret")
    try:
        creds = server.bucket()
        _set_env(monkeypatch, proxy.env("http", "proxy:s3cret"))
        backend = RestBackend(creds.location)
        backend.create()
        data = b"through an authenticating proxy"
        name = hashlib.sha256(data).hexdigest()
        backend.write("data", name, data)
        assert backend.read("data", name) == data
        backend.close()
        assert ("POST", f"/{creds.name}/data/{name}") in proxy.seen

        _set_env(monkeypatch, proxy.env("http"))
        backend = RestBackend(creds.location)
        with pytest.raises(BackendError, match="HTTP 407") as info:
            backend.stat("data", name)
        assert not info.value.temporary and "HTTP_PROXY" in str(info.value)
        backend.close()
    finally:
        proxy.stop()
        server.stop()


def test_a_proxy_that_is_not_http_is_a_usage_error(monkeypatch):
    for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "socks5://user:secret@127.0.0.1:1080")
    monkeypatch.setenv("https_proxy", "socks5://user:secret@127.0.0.1:1080")
    with pytest.raises(UsageError, match="only http://host:port proxies") as info:
        RestBackend("rest:https://127.0.0.1:1/bucket/")
    assert "secret" not in str(info.value)


def test_a_connection_the_server_closed_while_idle_is_not_used(tmp_path):
    """The server closes connections idle for keepalive_timeout. The next request, an upload (which is
    never sent twice by the backend itself), goes over a new connection instead of failing on the
    closed one. No retry wrapper here: the backend alone must get it right."""
    from tests.server.harness import ServerThread, server_config

    server = ServerThread(server_config(str(tmp_path / "srv"), keepalive_timeout=0.3))
    try:
        creds = server.bucket()
        backend = RestBackend(creds.location)
        backend.create()
        for i in range(3):
            time.sleep(0.8)
            data = os.urandom(1000 + i)
            name = hashlib.sha256(data).hexdigest()
            backend.write("data", name, data)
            assert backend.read("data", name) == data
        backend.close()
    finally:
        server.stop()


def test_an_upload_refused_from_its_head_reports_the_answer(tmp_path):
    """A 512 MiB upload over a quota of 100 bytes: the server answers 507 at once, discards the next
    64 MiB and closes. The client, still sending, reports that answer (permanent), not the broken pipe
    it ran into."""
    from tests.server.harness import ServerThread, server_config

    server = ServerThread(server_config(str(tmp_path / "srv")))
    try:
        creds = server.bucket(quota=100)
        backend = RestBackend(creds.location)
        piece = os.urandom(1 << 20)
        with pytest.raises(BackendError, match="HTTP 507") as info:
            backend.write_stream("data", "ab" * 32, lambda: iter([piece] * 512), 512 << 20)
        assert not info.value.temporary
        backend.close()
    finally:
        server.stop()
