"""The reverse-proxy snippets in deploy/ (nginx and HAProxy), run for real in front of the bucket server.

Each snippet is used as shipped, with only its example addresses, ports and certificate paths replaced
(every replacement must find its text, so a snippet that drifts from this test fails it). Through each
proxy, over TLS: restic backs up and checks with --read-data; an upload reaches the server while the client
is still sending it (no request buffering, no body-size limit); a large download arrives whole; the client's
own X-Forwarded-For is replaced by the address the proxy saw; /metrics is refused to an address other than
127.0.0.1 (127.0.0.2 is loopback too, so this stays on the loopback interface).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.ci import unavailable
from tests.helpers.restic import Restic
from tests.server.harness import ServerThread, make_cert, server_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replaced(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in text, f"the snippet no longer contains {old!r}: update this test with it"
        text = text.replace(old, new)
    return text


def wait_for_port(proc: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the proxy exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"the proxy never listened on {port}: {log.read_text()[-2000:]}")


def start_nginx(folder: Path, upstream: int, port: int, cert: Path, key: Path) -> subprocess.Popen:
    binary = shutil.which("nginx", path=SBIN_PATH)
    if binary is None:
        unavailable("nginx is not installed (apt-get install nginx)")
    snippet = replaced(
        (DEPLOY / "nginx.conf").read_text(),
        {
            "server 127.0.0.1:8000;": f"server 127.0.0.1:{upstream};",
            "listen 443 ssl http2;": f"listen 127.0.0.1:{port} ssl http2;",
            "/etc/letsencrypt/live/backup.example.com/fullchain.pem": str(cert),
            "/etc/letsencrypt/live/backup.example.com/privkey.pem": str(key),
        },
    )
    (folder / "vaultfs.conf").write_text(snippet)
    log = folder / "error.log"
    # The snippet goes into the http block of a main file of the test's own: its pid, logs and temp
    # folders stay in the test's folder. As root, nginx's workers would run as "nobody", which cannot
    # enter pytest's private temp folders.
    (folder / "nginx.conf").write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"daemon off;\nworker_processes 1;\npid {folder}/nginx.pid;\nerror_log {log} warn;\n"
        "events { worker_connections 256; }\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {folder}/body;\n"
        f"  proxy_temp_path {folder}/proxy;\n  include {folder}/vaultfs.conf;\n}}\n"
    )
    with open(log, "ab") as out:  # the child keeps its own copy
        proc = subprocess.Popen(
            [binary, "-p", str(folder), "-c", str(folder / "nginx.conf"), "-e", str(log)],
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
    wait_for_port(proc, port, log)
    return proc


def start_haproxy(
    folder: Path, upstream: int, port: int, cert: Path, key: Path
) -> subprocess.Popen:
    binary = shutil.which("haproxy", path=SBIN_PATH)
    if binary is None:
        unavailable("haproxy is not installed (apt-get install haproxy)")
    pem = folder / "site.pem"
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    config = replaced(
        (DEPLOY / "haproxy.cfg").read_text(),
        {
            "bind :443 ssl crt /etc/haproxy/certs/backup.example.com.pem": (
                f"bind 127.0.0.1:{port} ssl crt {pem}"
            ),
            "server vault1 127.0.0.1:8000": f"server vault1 127.0.0.1:{upstream}",
        },
    )
    (folder / "haproxy.cfg").write_text(config)
    log = folder / "haproxy.log"
    with open(log, "ab") as out:  # the child keeps its own copy
        proc = subprocess.Popen(
            [binary, "-db", "-f", str(folder / "haproxy.cfg")], stdout=out, stderr=subprocess.STDOUT
        )
    wait_for_port(proc, port, log)
    return proc


STARTERS = {"nginx": start_nginx, "haproxy": start_haproxy}


@pytest.fixture(params=sorted(STARTERS))
def proxied(request, tmp_path) -> Iterator[tuple[ServerThread, str, Path]]:
    """(server, the proxy's https base URL, the CA certificate) for each proxy in deploy/."""
    cert, key = make_cert(tmp_path)
    # The server's own /metrics list admits all of 127/8, so only the proxy's rule refuses 127.0.0.2.
    config = server_config(
        str(tmp_path / "srv"), trust_x_forwarded_for=True, metrics_allow=["127.0.0.0/8"]
    )
    server = ServerThread(config)
    folder = tmp_path / request.param
    folder.mkdir()
    port = free_port()
    upstream = int(server.url.rstrip("/").rsplit(":", 1)[1])
    proc = None
    try:
        proc = STARTERS[request.param](folder, upstream, port, cert, key)
        yield server, f"https://127.0.0.1:{port}/", cert
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        server.stop()


def tls_connection(port: int, cert: Path, source: str = "127.0.0.1") -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(cert))
    context.set_alpn_protocols(["http/1.1"])
    sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    return context.wrap_socket(sock, server_hostname="127.0.0.1")


def read_status(sock: ssl.SSLSocket) -> int:
    head = b""
    while b"\r\n" not in head:
        piece = sock.recv(4096)
        assert piece, "the proxy closed the connection without an answer"
        head += piece
    return int(head.split(b" ", 2)[1])


def test_restic_backs_up_and_checks_through_the_proxy(proxied, tricky_tree):
    server, url, cert = proxied
    creds = server.bucket()
    location = "rest:" + url.replace("://", f"://{creds.name}:{creds.psk}@") + f"{creds.name}/"
    restic = Restic(location, "restic pw")
    restic.run("--cacert", cert, "init", "--repository-version", "2")
    restic.run("--cacert", cert, "backup", ".", cwd=tricky_tree)
    restic.run("--cacert", cert, "check", "--read-data")
    counts = server.server.app.metrics.requests
    assert counts[(creds.name, "POST", "200")] > 2  # the uploads did go through the proxy


def test_uploads_stream_through_and_downloads_arrive_whole(proxied):
    server, url, cert = proxied
    creds = server.bucket()
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    data = os.urandom(24 << 20)  # far above nginx's default body limit (1 MiB) and buffers
    name = hashlib.sha256(data).hexdigest()
    auth = httpx.BasicAuth(creds.name, creds.psk)._auth_header
    head = (
        f"POST /{creds.name}/data/{name} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: {auth}\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode()
    with tls_connection(port, cert) as sock:
        sock.sendall(head + data[: 4 << 20])
        # A proxy that buffered the request would not reach the server before the whole body came.
        deadline = time.monotonic() + 30
        while server.server.app.metrics.uploads < 1:
            assert time.monotonic() < deadline, "the upload did not reach the server mid-body"
            time.sleep(0.02)
        sock.sendall(data[4 << 20 :])
        assert read_status(sock) == 200
    with httpx.Client(
        verify=ssl.create_default_context(cafile=str(cert)), auth=creds.auth, timeout=60
    ) as client:
        got = hashlib.sha256()
        with client.stream("GET", f"{url}{creds.name}/data/{name}") as resp:
            assert resp.status_code == 200
            for piece in resp.iter_bytes():
                got.update(piece)
        assert got.hexdigest() == name


def test_the_client_cannot_choose_its_address_and_metrics_stay_local(proxied):
    server, url, cert = proxied
    creds = server.bucket()
    auth = server.server.app.auth
    forged = "203.0.113.66"
    with httpx.Client(verify=ssl.create_default_context(cafile=str(cert)), timeout=60) as client:
        resp = client.get(
            f"{url}{creds.name}/keys/",
            auth=(creds.name, "1" * 32),
            headers={"X-Forwarded-For": forged},
        )
        assert resp.status_code == 401
        assert auth.failures("127.0.0.1") == 1  # the address the proxy saw
        assert auth.failures(forged) == 0
        assert client.get(f"{url}metrics").status_code == 200
        assert "vaultfs_requests_total" in client.get(f"{url}metrics").text
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    with tls_connection(port, cert, source="127.0.0.2") as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert read_status(sock) == 403
    with tls_connection(port, cert, source="127.0.0.2") as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert read_status(sock) == 200
