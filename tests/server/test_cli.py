"""`vault serve` and `vault server` as an administrator runs them: real processes, TLS, SIGTERM."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio

from tests.helpers.env import env_for
from tests.server.harness import make_cert
from tests.tools.cli import one_line_error, vault
from vaultfs.server.main import _open_listeners


class ServeProcess:
    """`vault serve ARGS` in a subprocess; ``url`` is what it printed."""

    def __init__(self, *args: str | os.PathLike[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vaultfs.tools.main", "serve", *map(os.fspath, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**env_for(None), **(env or {})},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        found = re.search(r"listening on (\S+)", line)
        if found is None:
            self.proc.kill()
            raise AssertionError(f"vault serve printed {line!r}; stderr: {self.proc.stderr.read()}")
        self.url = found.group(1)
        self.err_seen = ""

    def wait_for_stderr(self, text: str, timeout: float = 60) -> None:
        """Read the server's stderr until ``text`` appears in it (kept for ``terminate``)."""
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        deadline = time.monotonic() + timeout
        while text not in self.err_seen:
            left = deadline - time.monotonic()
            assert left > 0, f"vault serve never logged {text!r}; it logged {self.err_seen!r}"
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                assert chunk, f"vault serve closed stderr; it logged {self.err_seen!r}"
                self.err_seen += chunk.decode(errors="replace")

    def terminate(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        _out, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, self.err_seen + err


def _peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))


def admin(data: Path, *args: str, expect: int = 0):
    return vault("server", "--data", data, *args, password=None, expect=expect)


def test_bucket_administration(tmp_path):
    data = tmp_path / "data"
    created = json.loads(
        admin(data, "bucket", "create", "alpha", "--quota", "2G", "--append-only", "--json").out
    )
    assert created["name"] == "alpha" and re.fullmatch(r"[0-9a-f]{32}", created["psk"])
    assert created["quota"] == 2 << 30 and created["append_only"]
    # The state keeps a bcrypt hash, never the PSK.
    state = (data / ".vaultfs-server" / "state.sqlite3").read_bytes()
    assert created["psk"].encode() not in state and bytes.fromhex(created["psk"]) not in state
    text = admin(data, "bucket", "create").out
    assert re.search(r"psk:\s+[0-9a-f]{32}", text) and "location:    rest:http://" in text
    assert (data / "alpha" / "data" / "ff").is_dir()  # a vault layout, ready for rsync
    changed = json.loads(
        admin(data, "bucket", "set", "alpha", "--quota", "0", "--no-append-only", "--json").out
    )
    assert changed["quota"] == 0 and not changed["append_only"] and "psk" not in changed
    rotated = json.loads(admin(data, "bucket", "set", "alpha", "--new-psk", "--json").out)
    assert rotated["psk"] != created["psk"]
    assert "dup" not in one_line_error(admin(data, "bucket", "create", "alpha", expect=2))
    assert "invalid bucket name" in one_line_error(
        admin(data, "bucket", "create", "A/..", expect=2)
    )
    assert "no bucket" in one_line_error(admin(data, "bucket", "info", "nope", expect=1))
    (data / "alpha" / "keys" / ("ab" * 32)).write_bytes(b"someone's backup")
    refused = one_line_error(admin(data, "bucket", "delete", "alpha", expect=2))
    assert refused.endswith("bucket alpha holds 1 file(s), 16 B: add --force to delete them with "
                            "it, or --keep-files to keep its folders")  # fmt: skip
    assert (data / "alpha" / "keys").is_dir()
    admin(data, "bucket", "delete", "alpha", "--force")
    assert not (data / "alpha").exists()
    assert len(json.loads(admin(data, "bucket", "list", "--json").out)) == 1


def test_bad_config_is_a_usage_error(tmp_path):
    config = tmp_path / "server.toml"
    config.write_text('listen = "127.0.0.1:0"\nlisten_backlog = 5\n')
    err = one_line_error(vault("serve", "--config", config, password=None, expect=2))
    assert "unknown key 'listen_backlog'" in err
    (tmp_path / "file").write_text("")
    for data in (tmp_path / "file", tmp_path / "file" / "sub"):
        err = one_line_error(vault("serve", "--data", data, password=None, expect=2))
        assert err.endswith(f"{data}: a file stands where a folder should be")
    config.write_text("read_timeout = 'soon'\n")
    assert "read_timeout" in one_line_error(
        vault("serve", "--config", config, password=None, expect=2)
    )
    missing = tmp_path / "no-such-folder" / "access.log"
    err = one_line_error(
        vault("serve", "--data", tmp_path / "d", "--access-log", missing, password=None, expect=2)
    )
    assert err.startswith(f"vault: error: cannot open the access log {missing}: No such file")


def test_tls_files_at_fault_are_named_and_an_encrypted_key_never_prompts(tmp_path):
    from cryptography.hazmat.primitives import serialization

    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    cert, key = make_cert(tmp_path / "one")
    _, other_key = make_cert(tmp_path / "two")
    locked = tmp_path / "locked.pem"
    locked.write_bytes(
        serialization.load_pem_private_key(key.read_bytes(), None).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    cases = [
        (tmp_path / "none.pem", key, f"cannot read the TLS file {tmp_path / 'none.pem'}: No such"),
        (key, cert, f"the TLS certificate {key} holds no PEM certificate"),
        (cert, cert, f"the TLS key {cert} holds no PEM private key"),
        (cert, other_key, f"the key {other_key} does not belong to the certificate {cert}"),
        (cert, locked, f"the TLS key {locked} is encrypted; vault serve needs it unencrypted"),
    ]
    for tls_cert, tls_key, expected in cases:
        result = vault(
            "serve", "--data", tmp_path / "d", "--listen", "127.0.0.1:0",
            "--tls-cert", tls_cert, "--tls-key", tls_key, password=None, expect=2,
        )  # fmt: skip
        assert expected in one_line_error(result)


def test_the_access_log_follows_log_rotation_and_survives_a_vanished_folder(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "access.log"
    server = ServeProcess(
        "--data", tmp_path / "data", "--listen", "127.0.0.1:0", "--access-log", log
    )
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:

            def logged_after_a_while(tag: str) -> bool:
                """Request until a line with ``tag`` is in ``log``: the server looks at the log's
                name at most once a second."""
                deadline = time.monotonic() + 30
                n = 0
                while time.monotonic() < deadline:
                    assert client.get(f"healthz?{tag}{n}").status_code == 200
                    if log.exists() and f"/healthz?{tag}" in log.read_text():
                        return True
                    n += 1
                    time.sleep(0.1)
                return False

            assert logged_after_a_while("first")
            os.rename(log, logs / "access.log.1")  # what logrotate does, then no signal
            assert logged_after_a_while("second")
            assert "first" not in log.read_text()  # a new file, the old lines stay in .1
            assert "/healthz?first" in (logs / "access.log.1").read_text()
            os.rename(logs, tmp_path / "gone")  # the log's folder vanishes: serving goes on
            for n in range(20):  # two seconds: past the next look at the name
                assert client.get(f"healthz?lost{n}").status_code == 200
                time.sleep(0.1)
            server.wait_for_stderr("cannot write the access log")
            logs.mkdir()
            assert logged_after_a_while("back")
            server.wait_for_stderr("is written again")
    finally:
        code, err = server.terminate()
    assert code == 0, err
    assert err.count("cannot write the access log") == 1, err  # once, not once per request
    assert "Traceback" not in err


def test_address_in_use_is_a_usage_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = one_line_error(
            vault("serve", "--data", tmp_path / "data", "--listen", f"127.0.0.1:{port}",
                  password=None, expect=2)
        )  # fmt: skip
    assert err == f"vault: error: cannot listen on 127.0.0.1:{port}: Address already in use"


def test_tls_serve_with_private_ca_and_sigterm(tmp_path):
    cert, key = make_cert(tmp_path)
    data = tmp_path / "data"
    creds = json.loads(admin(data, "bucket", "create", "tls", "--json").out)
    server = ServeProcess(
        "--data", data, "--listen", "127.0.0.1:0", "--tls-cert", cert, "--tls-key", key,
        "--access-log", tmp_path / "access.log",
    )  # fmt: skip
    try:
        assert server.url.startswith("https://127.0.0.1:")
        loc = "rest:" + server.url.replace("https://", f"https://tls:{creds['psk']}@") + "tls/"
        ca = {"VAULT_CACERT": str(cert)}
        vault("-r", loc, "init", env=ca)
        assert json.loads(vault("-r", loc, "snapshots", "--json", env=ca).out) == []
        assert json.loads(vault("--cacert", cert, "-r", loc, "snapshots", "--json").out) == []
        failed = vault("-r", loc, "snapshots", expect=1)  # the system CAs do not know ours
        assert "certificate verify failed" in one_line_error(failed)
        assert "pass that CA's certificate with --cacert" in one_line_error(failed)
        plain = loc.replace("https://", "http://")
        started = time.monotonic()
        failed = vault("-r", plain, "snapshots", expect=1, env=ca)
        assert "use an https:// URL" in one_line_error(failed)
        assert time.monotonic() - started < 5, "a plain-HTTP answer is not a temporary error"
        # An upload sent in plain HTTP, body and all, still gets the answer, not a reset.
        host, port = re.match(r"https://([\d.]+):(\d+)/", server.url).groups()
        with socket.create_connection((host, int(port)), timeout=30) as client:
            body = os.urandom(4 << 20)
            client.sendall(
                f"POST /tls/data/{'ab' * 32} HTTP/1.1\r\nHost: x\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            answer = b""
            while chunk := client.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400 Bad Request, this server speaks HTTPS"), answer[:80]
        ctx = ssl.create_default_context(cafile=str(cert))
        assert httpx.get(server.url + "healthz", verify=ctx).text == "ok\n"
        # Over TLS a download cannot use sendfile: it goes through the server in pieces, and a
        # reader slower than the server must not make it buffer the file.
        piece, count = os.urandom(1 << 20), 256
        name = hashlib.sha256(piece * count).hexdigest()
        stored = data / "tls" / "data" / name[:2] / name
        stored.parent.mkdir(parents=True, exist_ok=True)
        with open(stored, "wb") as f:
            for _ in range(count):
                f.write(piece)
        got, n = hashlib.sha256(), 0
        url = f"{server.url}tls/data/{name}"
        with httpx.stream("GET", url, auth=("tls", creds["psk"]), verify=ctx, timeout=120) as r:
            assert r.status_code == 200
            for part in r.iter_bytes(1 << 20):
                got.update(part)
                n += len(part)
                if n < 64 << 20:
                    time.sleep(0.002)
        assert (n, got.hexdigest()) == (count << 20, name)
        peak_kib = _peak_rss_kib(server.proc.pid)
        assert peak_kib < 150 * 1024, f"server peak RSS {peak_kib} KiB after a TLS download"
    finally:
        code, err = server.terminate()
    assert code == 0, err
    assert "stopped" in err
    log = (tmp_path / "access.log").read_text()
    assert re.search(r'127\.0\.0\.1 - tls \[.*\] "POST /tls/keys/[0-9a-f]{64} HTTP/1.1" 200', log)


def test_sigterm_finishes_uploads_in_flight_and_discards_unfinished_ones(tmp_path):
    """SIGTERM in the middle of two uploads: the one whose client goes on sending is stored whole
    within shutdown_grace; the other is cut off at the end of it and leaves nothing behind."""
    data = tmp_path / "data"
    creds = json.loads(admin(data, "bucket", "create", "term", "--json").out)
    config = tmp_path / "server.toml"
    config.write_text("shutdown_grace = 3\n")
    server = ServeProcess("--config", config, "--data", data, "--listen", "127.0.0.1:0")
    host, port = re.match(r"http://([\d.]+):(\d+)/", server.url).groups()
    auth = base64.b64encode(f"term:{creds['psk']}".encode()).decode()
    bodies = [os.urandom(8 << 20), os.urandom(8 << 20)]
    names = [hashlib.sha256(body).hexdigest() for body in bodies]
    clients = []
    try:
        for name, body in zip(names, bodies, strict=True):
            client = socket.create_connection((host, int(port)), timeout=60)
            clients.append(client)
            client.sendall(
                f"POST /term/data/{name} HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body[: 1 << 20]
            )
        # both uploads have begun (their temp files hold data) before the signal
        deadline = time.monotonic() + 30
        while sum(1 for f in (data / "term").rglob("*") if f.is_file() and f.stat().st_size) < 2:
            assert time.monotonic() < deadline, "the uploads never reached the disk"
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        while True:  # the listener closes when the shutdown begins
            assert time.monotonic() < deadline, "the server kept accepting after SIGTERM"
            try:
                socket.create_connection((host, int(port)), timeout=5).close()
            except ConnectionRefusedError:
                break
            time.sleep(0.05)
        clients[0].sendall(bodies[0][1 << 20 :])
        answer = clients[0].recv(65536)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:80]
        assert server.proc.wait(timeout=60) == 0
    finally:
        for client in clients:
            client.close()
        if server.proc.poll() is None:
            server.proc.kill()
        server.proc.communicate(timeout=30)
    stored = [f for f in (data / "term").rglob("*") if f.is_file()]
    assert [f.name for f in stored if f.parent.parent.name == "data"] == [names[0]]
    assert (data / "term" / "data" / names[0][:2] / names[0]).read_bytes() == bodies[0]
    assert all(f.name == "config" or f.parent.parent.name == "data" for f in stored), stored


def test_upload_debris_of_a_killed_server_is_swept_after_a_restart(tmp_path):
    """kill -9 in the middle of an upload leaves its temp file (with the announced length reserved);
    the next server removes it once abandoned_upload_seconds passed."""
    data = tmp_path / "data"
    creds = json.loads(admin(data, "bucket", "create", "crash", "--json").out)
    config = tmp_path / "server.toml"
    config.write_text("read_timeout = 1\nabandoned_upload_seconds = 2\naccess_log = ''\n")
    args = ("--config", config, "--data", data, "--listen", "127.0.0.1:0")
    server = ServeProcess(*args)
    name = "ab" * 32
    folder = data / "crash" / "data" / "ab"
    try:
        host, port = re.match(r"http://([\d.]+):(\d+)/", server.url).groups()
        with socket.create_connection((host, int(port))) as client:
            auth = base64.b64encode(f"crash:{creds['psk']}".encode()).decode()
            client.sendall(
                f"POST /crash/data/{name} HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\n"
                f"Content-Length: {50 << 20}\r\n\r\n".encode()
                + os.urandom(3 << 20)
            )
            deadline = time.monotonic() + 30
            while not (folder.exists() and any(folder.iterdir())):
                assert time.monotonic() < deadline, "the upload never reached the disk"
                time.sleep(0.05)
            server.proc.kill()
            server.proc.communicate(timeout=30)  # reaps it, closes its pipes
        debris = list(folder.iterdir())
        assert len(debris) == 1 and "-tmp-" in debris[0].name
        server = ServeProcess(*args)
        server.wait_for_stderr("removed 1 abandoned upload temp file(s)")
        assert not debris[0].exists()
    finally:
        code, err = server.terminate()
    assert code == 0, err
    assert "removed 1 abandoned upload temp file(s)" in err
    assert list(folder.iterdir()) == []


@pytest.mark.slow
def test_500_mb_upload_and_download_stream_with_flat_memory(tmp_path):
    """The server's peak RSS after a 500 MB upload, and after downloading it whole and in a 400 MB
    range with a reader slower than the server, stays far below the file's size."""
    data = tmp_path / "data"
    creds = json.loads(admin(data, "bucket", "create", "big", "--json").out)
    server = ServeProcess("--data", data, "--listen", "127.0.0.1:0", "--access-log", "")
    try:
        piece = os.urandom(1 << 20)
        h = hashlib.sha256()
        count = 500
        for _ in range(count):
            h.update(piece)

        def body():
            for _ in range(count):
                yield piece

        resp = httpx.post(
            f"{server.url}big/data/{h.hexdigest()}",
            content=body(),
            headers={"Content-Length": str(count << 20)},
            auth=("big", creds["psk"]),
            timeout=120,
        )
        assert resp.status_code == 200
        peak_kib = _peak_rss_kib(server.proc.pid)
        assert peak_kib < 150 * 1024, f"server peak RSS {peak_kib} KiB after the upload"
        stored = data / "big" / "data" / h.hexdigest()[:2] / h.hexdigest()
        assert stored.stat().st_size == count << 20

        url = f"{server.url}big/data/{h.hexdigest()}"
        for headers, start, size in (
            ({}, 0, count << 20),
            ({"Range": "bytes=50-400000049"}, 50, 400_000_000),
        ):
            got = hashlib.sha256()
            n = 0
            with httpx.stream(
                "GET", url, headers=headers, auth=("big", creds["psk"]), timeout=120
            ) as r:
                assert r.status_code == (206 if headers else 200)
                for part in r.iter_bytes(1 << 20):
                    got.update(part)
                    n += len(part)
                    if n < 64 << 20:
                        time.sleep(0.002)  # a slow start: the server must wait, not buffer
            assert n == size
            want = hashlib.sha256()
            with open(stored, "rb") as f:
                f.seek(start)
                want.update(f.read(size))
            assert got.hexdigest() == want.hexdigest()
        peak_kib = _peak_rss_kib(server.proc.pid)
        assert peak_kib < 150 * 1024, f"server peak RSS {peak_kib} KiB after the downloads"
    finally:
        server.terminate()


class _TwoLoopbacks(trio.abc.HostnameResolver):
    """Resolves every name to two loopback addresses, as a name with an IPv4 and an IPv6 address."""

    async def getaddrinfo(self, host, port, family=0, type=0, proto=0, flags=0):  # noqa: ANN001, ANN201
        return [
            (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (addr, port))
            for addr in ("127.0.0.1", "127.0.0.2")
        ]

    async def getnameinfo(self, sockaddr, flags):  # noqa: ANN001, ANN201
        raise NotImplementedError


async def test_port_zero_is_one_port_on_every_address():
    # `--listen :0` listens on IPv4 and IPv6; the system picks a free port per socket, so the
    # two printed URLs had different ports. Now every address gets the same one.
    trio.socket.set_custom_hostname_resolver(_TwoLoopbacks())
    listeners = await _open_listeners("two-addresses.test", 0)
    try:
        names = [listener.socket.getsockname() for listener in listeners]
        assert {host for host, _port in names} == {"127.0.0.1", "127.0.0.2"}
        assert len({port for _host, port in names}) == 1
        for host, port in names:
            with socket.create_connection((host, port), timeout=5):
                pass
    finally:
        for listener in listeners:
            await listener.aclose()
