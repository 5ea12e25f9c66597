"""HTTP/1.1 edge cases on raw sockets: malformed requests, 100-continue, keep-alive, early answers to
uploads, clients that stop or vanish mid-body, and graceful shutdown with uploads in flight."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import ssl
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server.harness import ServerThread, make_cert, server_config


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerThread(
        server_config(
            str(tmp_path_factory.mktemp("proto")), read_timeout=1.0, keepalive_timeout=5.0
        )
    )
    yield srv
    srv.stop()


def connect(server: ServerThread) -> socket.socket:
    host, port = server.url.split("//")[1].rstrip("/").split(":")
    return socket.create_connection((host, int(port)), timeout=20)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response (head and Content-Length body) from ``sock``."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed after {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, headers, rest[:length]


def closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, TimeoutError):
        return True


def auth_header(creds) -> str:
    return "Basic " + base64.b64encode(f"{creds.name}:{creds.psk}".encode()).decode()


def request_head(method: str, path: str, creds, **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", f"Authorization: {auth_header(creds)}"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n", 431),
    ],
)
def test_malformed_requests_get_an_answer_and_a_closed_connection(server, raw, status):
    with connect(server) as sock:
        sock.sendall(raw)
        got, headers, _ = read_response(sock)
        assert got == status
        assert headers.get("connection") == "close"
        assert closed(sock)
    assert httpx.get(server.url + "healthz").status_code == 200  # still serving


def test_keep_alive_serves_several_requests_on_one_connection(server):
    creds = server.bucket()
    with connect(server) as sock:
        for _ in range(3):
            sock.sendall(request_head("GET", f"/{creds.name}/keys/", creds))
            status, headers, body = read_response(sock)
            assert status == 200 and body == b"[]"
            assert headers.get("connection") != "close"


def test_expect_100_continue(server):
    creds = server.bucket()
    data = os.urandom(5000)
    name = hashlib.sha256(data).hexdigest()
    with connect(server) as sock:
        head = request_head(
            "POST", f"/{creds.name}/data/{name}", creds, Content_Length=str(len(data)),
            Expect="100-continue",
        )  # fmt: skip
        sock.sendall(head)
        status, _, _ = read_response(sock)
        assert status == 100
        sock.sendall(data)
        status, _, _ = read_response(sock)
        assert status == 200
        # Refused from its head (the object exists): no 100, the answer comes at once.
        sock.sendall(head)
        status, headers, _ = read_response(sock)
        assert status == 403 and headers.get("connection") == "close"


def read_responses(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """``count`` pipelined responses (status, body), however the bytes were split between reads."""
    buf = b""
    answers: list[tuple[int, bytes]] = []
    while len(answers) < count:
        head, sep, rest = buf.partition(b"\r\n\r\n")
        if sep:
            lines = head.decode("latin-1").split("\r\n")
            fields = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
            length = int(fields.get("content-length", "0"))
            if len(rest) >= length:
                answers.append((int(lines[0].split()[1]), rest[:length]))
                buf = rest[length:]
                continue
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed after {len(answers)} answers")
        buf += chunk
    return answers


@pytest.mark.parametrize("split", ["one send", "body in pieces"])
def test_requests_pipelined_behind_an_upload_body(server, split):
    """An upload's body is read past the head parser (straight into the server's buffer); whatever
    follows it on the connection is still parsed as the next requests."""
    creds = server.bucket()
    # Small enough for the server's first read to take the head, the body and what follows at once.
    data = os.urandom(2000 if split == "one send" else 300_000)
    name = hashlib.sha256(data).hexdigest()
    upload = (
        request_head("POST", f"/{creds.name}/data/{name}", creds, Content_Length=str(len(data)))
        + data
    )
    follow = request_head("GET", f"/{creds.name}/data/{name}", creds, Range="bytes=5-9")
    follow += request_head("GET", f"/{creds.name}/data/{name}", creds, Range="bytes=-3")
    with connect(server) as sock:
        if split == "one send":
            sock.sendall(upload + follow)
        else:
            for i in range(0, len(upload), 7777):
                sock.sendall(upload[i : i + 7777])
            sock.sendall(follow)
        answers = read_responses(sock, 3)
        assert [status for status, _ in answers] == [200, 206, 206]
        assert answers[1][1] == data[5:10] and answers[2][1] == data[-3:]
        sock.sendall(request_head("GET", f"/{creds.name}/keys/", creds))  # still keep-alive
        assert read_responses(sock, 1) == [(200, b"[]")]
    assert httpx.get(f"{creds.url}data/{name}", auth=creds.auth).content == data


def test_upload_body_with_pauses_is_received_whole(server):
    """A body read by worker threads (Request.pump) that stops arriving for a while, shorter than
    read_timeout (1 s), hands the wait back to the event loop and carries on; the connection then
    serves the request pipelined behind the body."""
    creds = server.bucket()
    data = os.urandom(3 << 20)
    name = hashlib.sha256(data).hexdigest()
    with connect(server) as sock:
        sock.sendall(
            request_head("POST", f"/{creds.name}/data/{name}", creds, Content_Length=str(len(data)))
        )
        for i in range(0, len(data), 1 << 20):
            sock.sendall(data[i : i + (1 << 20)])
            time.sleep(0.3)
        sock.sendall(request_head("GET", f"/{creds.name}/data/{name}", creds, Range="bytes=-4"))
        assert read_responses(sock, 2) == [(200, b"ok\n"), (206, data[-4:])]
    assert httpx.get(f"{creds.url}data/{name}", auth=creds.auth).content == data


def test_large_download_to_a_slow_reader_then_keep_alive(server):
    """A large range answer (sent with sendfile by worker threads) to a client that reads slowly
    through a small receive buffer arrives whole, and the connection then serves the next request."""
    creds = server.bucket()
    data = os.urandom(6 << 20)
    name = hashlib.sha256(data).hexdigest()
    assert httpx.post(f"{creds.url}data/{name}", content=data, auth=creds.auth).status_code == 200
    with connect(server) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        sock.sendall(request_head("GET", f"/{creds.name}/data/{name}", creds, Range="bytes=3-"))
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += sock.recv(65536)
        head, _, body = buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 206")
        pauses = 0
        while len(body) < len(data) - 3:
            if pauses < 3 and len(body) > pauses * (2 << 20):
                time.sleep(0.3)  # shorter than read_timeout: the server waits
                pauses += 1
            chunk = sock.recv(1 << 20)
            assert chunk, "connection closed in the middle of the body"
            body += chunk
        assert body == data[3:]
        sock.sendall(request_head("GET", f"/{creds.name}/data/{name}", creds, Range="bytes=0-1"))
        assert read_responses(sock, 1) == [(206, data[:2])]


def test_early_answer_to_a_large_upload_is_read_not_reset(server):
    """403 for an existing object arrives while the client still sends 8 MiB it will not need."""
    creds = server.bucket()
    data = os.urandom(8 << 20)
    name = hashlib.sha256(data).hexdigest()
    assert httpx.post(f"{creds.url}data/{name}", content=data, auth=creds.auth).status_code == 200
    with connect(server) as sock:
        sock.sendall(
            request_head("POST", f"/{creds.name}/data/{name}", creds, Content_Length=str(len(data)))
        )
        sender = threading.Thread(target=lambda: _send_quietly(sock, data))
        sender.start()
        status, _, _ = read_response(sock)
        sender.join()
    assert status == 403


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass


@pytest.mark.parametrize(
    ("transport", "how"),
    [("tcp", "stops"), ("tcp", "vanishes"), ("tls", "stops"), ("tls", "closes")],
)
def test_client_that_stops_mid_body_leaves_nothing_behind(request, transport, how):
    """A client that stops sending (the server gives up after read_timeout, 1 s), or vanishes, or
    over TLS closes properly (close_notify), in the middle of an upload: the request is recorded as
    400 only after its handler cleaned up, nothing is left behind and the object does not exist."""
    server = request.getfixturevalue("server" if transport == "tcp" else "tls_server")
    open_connection = connect if transport == "tcp" else connect_tls
    creds = server.bucket()
    data = os.urandom(3 << 20)
    name = hashlib.sha256(data).hexdigest()
    folder = Path(server.config.volume_paths[0]) / creds.name
    before = files_under(folder)
    with open_connection(server) as sock:
        sock.sendall(
            request_head("POST", f"/{creds.name}/data/{name}", creds, Content_Length=str(len(data)))
        )
        sock.sendall(data[: 2 << 20])
        if how == "stops":
            assert closed(sock)
        elif how == "vanishes":
            sock.shutdown(socket.SHUT_RDWR)
        else:
            sock.unwrap().close()
    metrics = server.server.app.metrics
    deadline = time.monotonic() + 30
    while not metrics.requests.get((creds.name, "POST", "400")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metrics.requests.get((creds.name, "POST", "400")) == 1
    assert files_under(folder) == before
    with open_connection(server) as sock:
        sock.sendall(request_head("GET", f"/{creds.name}/data/{name}", creds))
        assert read_response(sock)[0] == 404


def test_chunked_upload(server):
    creds = server.bucket()
    data = os.urandom(100_000)
    name = hashlib.sha256(data).hexdigest()

    def pieces():
        for i in range(0, len(data), 30_000):
            yield data[i : i + 30_000]

    resp = httpx.post(f"{creds.url}index/{name}", content=pieces(), auth=creds.auth)
    assert resp.status_code == 200
    assert httpx.get(f"{creds.url}index/{name}", auth=creds.auth).content == data


def test_chunked_upload_then_pipelined_requests_on_one_connection(server):
    """A chunked body (with an extension and a trailer) and the two requests sent right behind it,
    split at every 1,000 bytes: the body is stored whole and the requests behind it are answered;
    empty lines before a request line are skipped."""
    creds = server.bucket()
    data = os.urandom(5000)
    name = hashlib.sha256(data).hexdigest()
    chunks = b"".join(
        b"%x;ext=1\r\n%s\r\n" % (len(piece), piece)
        for piece in (data[:1234], data[1234:4000], data[4000:])
    )
    stream = (
        request_head("POST", f"/{creds.name}/data/{name}", creds, Transfer_Encoding="chunked")
        + chunks
        + b"0\r\nX-Trailer: t\r\n\r\n"
        + request_head("GET", f"/{creds.name}/data/{name}", creds, Range="bytes=10-19")
        + b"\r\n\r\n"
        + request_head("GET", f"/{creds.name}/data/{name}", creds, Range="bytes=-3")
    )
    with connect(server) as sock:
        for i in range(0, len(stream), 1000):
            sock.sendall(stream[i : i + 1000])
        answers = read_responses(sock, 3)
        assert answers == [(200, b"ok\n"), (206, data[10:20]), (206, data[-3:])]
    assert httpx.get(f"{creds.url}data/{name}", auth=creds.auth).content == data


def test_http_1_0_request_is_answered_then_closed(server):
    creds = server.bucket()
    with connect(server) as sock:
        sock.sendall(
            f"GET /{creds.name}/keys/ HTTP/1.0\r\n"
            f"Authorization: {auth_header(creds)}\r\n\r\n".encode()
        )
        status, headers, body = read_response(sock)
        assert (status, body) == (200, b"[]")
        assert headers.get("connection") == "close"
        assert closed(sock)


def test_graceful_shutdown_finishes_or_discards_uploads(tmp_path):
    srv = ServerThread(server_config(str(tmp_path / "d"), shutdown_grace=2.0, read_timeout=30.0))
    creds = srv.bucket()
    folder = Path(srv.config.volume_paths[0]) / creds.name
    finishing, finishing_name = os.urandom(2 << 20), ""
    finishing_name = hashlib.sha256(finishing).hexdigest()
    stalled = os.urandom(2 << 20)
    stalled_name = hashlib.sha256(stalled).hexdigest()
    a, b, idle = connect(srv), connect(srv), connect(srv)
    try:
        idle.sendall(request_head("GET", f"/{creds.name}/keys/", creds))
        assert read_response(idle)[0] == 200  # now idle in keep-alive
        for sock, data, name in ((a, finishing, finishing_name), (b, stalled, stalled_name)):
            sock.sendall(
                request_head(
                    "POST", f"/{creds.name}/data/{name}", creds, Content_Length=str(len(data))
                )
            )
            sock.sendall(data[:1000])
        deadline = time.monotonic() + 10
        while srv.server.app.metrics.uploads < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        stopper = threading.Thread(target=srv.stop)
        stopper.start()
        assert closed(idle)  # idle keep-alive connections close at once
        a.sendall(finishing[1000:])
        status, headers, _ = read_response(a)
        assert status == 200 and headers.get("connection") == "close"
        stopper.join(30)  # b never finishes: cancelled after the grace period
        assert not stopper.is_alive()
    finally:
        for s in (a, b, idle):
            s.close()
    names = sorted(p.name for p in files_under(folder))
    assert names == [finishing_name]


# -- over TLS (server/tls.py: bodies decrypted by worker threads straight into the upload) --------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("proto-tls")
    cert, key = make_cert(folder)
    srv = ServerThread(
        server_config(str(folder / "data"), read_timeout=1.0, tls_cert=str(cert), tls_key=str(key))
    )
    srv.cert = cert
    yield srv
    srv.stop()


def connect_tls(server: ServerThread) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(server.cert))
    return context.wrap_socket(connect(server), server_hostname="127.0.0.1")


def test_tls_uploads_small_and_in_pauses_with_requests_pipelined_behind(tls_server):
    """Over TLS: a small upload sent in one piece with two requests behind it (the body and the
    requests arrive decrypted together), then a 3 MiB upload whose body stops for a while between
    pieces (the worker thread hands the wait back to the event loop); all answered in order on one
    connection, and both objects stored whole."""
    creds = tls_server.bucket()
    small, large = os.urandom(2000), os.urandom(3 << 20)
    small_name, large_name = (hashlib.sha256(d).hexdigest() for d in (small, large))
    with connect_tls(tls_server) as sock:
        head = request_head(
            "POST", f"/{creds.name}/data/{small_name}", creds, Content_Length=str(len(small))
        )
        follow = request_head("GET", f"/{creds.name}/data/{small_name}", creds, Range="bytes=5-9")
        sock.sendall(head + small + follow + follow)
        assert read_responses(sock, 3) == [(200, b"ok\n"), (206, small[5:10]), (206, small[5:10])]
        sock.sendall(
            request_head(
                "POST", f"/{creds.name}/data/{large_name}", creds, Content_Length=str(len(large))
            )
        )
        for i in range(0, len(large), 1 << 20):
            sock.sendall(large[i : i + (1 << 20)])
            time.sleep(0.3)
        sock.sendall(request_head("GET", f"/{creds.name}/data/{large_name}", creds))
        answers = read_responses(sock, 2)
        assert answers[0] == (200, b"ok\n")
        assert answers[1] == (200, large)
