"""The storage role over real HTTP: restic's REST protocol, auth, quotas, append-only and the attacks of
the issue's security list (wrong PSK, another bucket's PSK, traversal, bad names, bad hashes, quotas)."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
from pathlib import Path

import bcrypt
import httpx
import pytest

from tests.server.harness import ServerThread, module_server, server_config
from vaultfs.backend.rest import RestBackend
from vaultfs.errors import BackendError
from vaultfs.server import auth as auth_module
from vaultfs.server.state import BucketRegistry

V2 = "application/vnd.x.restic.rest.v2"


server = module_server("srv")


@pytest.fixture
def bucket(server):
    return server.bucket()


@pytest.fixture
def client(bucket):
    with httpx.Client(base_url=bucket.url, auth=bucket.auth, timeout=30) as c:
        yield c


def blob(size: int = 1000) -> tuple[bytes, str]:
    data = os.urandom(size)
    return data, hashlib.sha256(data).hexdigest()


def bucket_dir(server: ServerThread, name: str) -> Path:
    return Path(server.config.volume_paths[0]) / name


def raw(url: str, head: str) -> bytes:
    """Send one request head as it is and read the answer up to the server's close (``head`` should
    ask for ``Connection: close``): by then the server has logged and counted the request."""
    host, port = url.split("//")[1].rstrip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head.encode("latin-1"))
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def count_bcrypt(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Record every PSK the server checks with bcrypt (the check itself runs unchanged)."""
    calls: list[bytes] = []
    real = auth_module.check_psk_sync

    def counted(psk: bytes, psk_hash: bytes) -> bool:
        calls.append(psk)
        return real(psk, psk_hash)

    monkeypatch.setattr(auth_module, "check_psk_sync", counted)
    return calls


#: An access log line: address, user, [time], "request", status, bytes, "-", "agent", seconds.
ACCESS_LINE = re.compile(
    r'[\x21-\x7e]+ - [\x21-\x7e]+ \[[^\]]+\] "[\x21-\x7e]+ [\x21-\x7e]+ HTTP/1\.1" \d+ \d+ "-" '
    r'"[\x20\x21\x23-\x7e]*" \d+\.\d{3}\Z'
)


def settled_descriptors(expected: int | None = None, seconds: float = 5.0) -> int:
    """Open descriptors of this process once the count stops changing (or reaches ``expected``).

    A download's descriptor is closed after its last byte is sent, which may be just after the
    client has read the body, so one count can catch the one before.
    """
    deadline = time.monotonic() + seconds
    count = len(os.listdir("/proc/self/fd"))
    while time.monotonic() < deadline:
        time.sleep(0.05)
        again = len(os.listdir("/proc/self/fd"))
        if again == count and (expected is None or again == expected):
            break
        count = again
    return count


def test_protocol_round_trip(client, server, bucket):
    assert client.post("?create=true").status_code == 200
    assert client.post("?create=false").status_code == 400
    assert client.get("").status_code == 405
    assert client.delete("").status_code == 405
    data, name = blob(300_000)
    assert client.head(f"data/{name}").status_code == 404
    assert client.post(f"data/{name}", content=data).status_code == 200
    # The server stores it in the vault layout, read-only, with no temp file left.
    path = bucket_dir(server, bucket.name) / "data" / name[:2] / name
    assert path.read_bytes() == data
    assert path.stat().st_mode & 0o777 == 0o400
    head = client.head(f"data/{name}")
    assert head.status_code == 200 and head.headers["content-length"] == str(len(data))
    assert client.get(f"data/{name}").content == data
    part = client.get(f"data/{name}", headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == data[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{len(data)}"
    assert client.get(f"data/{name}", headers={"Range": "bytes=299990-"}).content == data[-10:]
    assert client.get(f"data/{name}", headers={"Range": "bytes=-5"}).content == data[-5:]
    assert client.get(f"data/{name}", headers={"Range": "bytes=300000-"}).status_code == 416
    v2 = client.get("data/", headers={"Accept": V2})
    assert v2.headers["content-type"] == V2
    assert v2.json() == [{"name": name, "size": len(data)}]
    v1 = client.get("data/")
    assert v1.json() == [name] and v1.headers["content-type"].endswith("rest.v1")
    assert client.post(f"data/{name}", content=data).status_code == 403  # never overwritten
    assert client.delete(f"data/{name}").status_code == 200
    assert client.delete(f"data/{name}").status_code == 200
    assert client.get("data/", headers={"Accept": V2}).json() == []
    assert client.post("config", content=b"not hashed").status_code == 200
    assert client.post("config", content=b"other").status_code == 403
    assert client.get("config").content == b"not hashed"


def test_files_changed_behind_the_servers_back_are_not_served_from_open_files(
    client, server, bucket
):
    """Objects read recently stay open in the server; one deleted, replaced by a rename, or rewritten
    in place on the disk is looked up again, and a large download keeps its own descriptor while others
    come and go."""
    folder = bucket_dir(server, bucket.name)
    small, small_name = blob(5000)
    large, large_name = blob(3 << 20)
    for data, name in ((small, small_name), (large, large_name)):
        assert client.post(f"data/{name}", content=data).status_code == 200
    assert client.get(f"data/{small_name}", headers={"Range": "bytes=0-9"}).content == small[:10]
    (folder / "data" / small_name[:2] / small_name).unlink()
    assert client.get(f"data/{small_name}", headers={"Range": "bytes=0-9"}).status_code == 404
    assert client.head(f"data/{small_name}").status_code == 404
    assert client.post("config", content=b"first").status_code == 200
    assert client.get("config").content == b"first"
    (folder / "config.new").write_bytes(b"second")
    os.rename(folder / "config.new", folder / "config")
    assert client.get("config").content == b"second"
    (folder / "config").write_bytes(b"third, rewritten in place")  # same inode, another size
    assert client.get("config").content == b"third, rewritten in place"
    assert client.head("config").headers["content-length"] == str(len(b"third, rewritten in place"))
    assert client.get(f"data/{large_name}").content == large
    descriptors = settled_descriptors()  # the server runs in this process
    for _ in range(10):
        assert client.get(f"data/{large_name}", headers={"Range": "bytes=1-"}).content == large[1:]
    assert settled_descriptors(descriptors) == descriptors  # no descriptor left behind
    assert client.delete(f"data/{large_name}").status_code == 200
    assert client.get(f"data/{large_name}").status_code == 404


def test_v1_listing_is_understood_by_the_client(bucket):
    be = RestBackend(bucket.location)
    try:
        data, name = blob()
        be.write("index", name, data)
        be._headers["Accept"] = "application/vnd.x.restic.rest.v1"
        assert list(be.list("index")) == [(name, len(data))]
    finally:
        be.close()


@pytest.mark.parametrize(
    "auth",
    [None, ("wrong", "0" * 32), "other-bucket", "psk-of-other-bucket", "not-hex", "short-psk"],
)
def test_credentials(server, bucket, auth):
    other = server.bucket()
    if auth == "other-bucket":
        auth = other.auth  # valid credentials, but for another bucket than the URL's
    elif auth == "psk-of-other-bucket":
        auth = (bucket.name, other.psk)
    elif auth == "not-hex":
        auth = (bucket.name, "z" * 32)
    elif auth == "short-psk":
        auth = (bucket.name, bucket.psk[:30])
    resp = httpx.get(f"{bucket.url}keys/", auth=auth)
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"].startswith("Basic")
    assert httpx.get(f"{bucket.url}keys/", auth=bucket.auth).status_code == 200


def test_repeated_failures_slow_an_address_down(server, bucket):
    auth = server.server.app.auth
    before = auth.failures("127.0.0.1")
    for _ in range(3):
        assert httpx.get(f"{bucket.url}keys/", auth=(bucket.name, "1" * 32)).status_code == 401
    assert auth.failures("127.0.0.1") >= before + 3
    assert httpx.get(f"{bucket.url}keys/", auth=bucket.auth).status_code == 200
    assert auth.failures("127.0.0.1") == 0


@pytest.mark.parametrize(
    "address, key",
    [
        ("203.0.113.9", "203.0.113.9"),
        ("::ffff:203.0.113.9", "203.0.113.9"),
        ("2001:db8:1:2::a", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::a", "2001:db8:1:3::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("unix-socket", "unix-socket"),
    ],
)
def test_the_throttle_counts_an_ipv6_client_by_its_64(address, key):
    assert auth_module.throttle_key(address) == key


def test_failures_are_shared_by_a_64_and_survive_a_flood_of_fresh_addresses(tmp_path, monkeypatch):
    monkeypatch.setattr(auth_module.Authenticator, "max_tracked", 8)
    srv = ServerThread(server_config(str(tmp_path), trust_x_forwarded_for=True))
    try:
        creds = srv.bucket()
        auth = srv.server.app.auth
        wrong = (creds.name, "1" * 32)

        def fail_from(address: str) -> None:
            resp = httpx.get(
                f"{creds.url}keys/", auth=wrong, headers={"X-Forwarded-For": address}, timeout=60
            )
            assert resp.status_code == 401

        for host in ("2001:db8:1:2::a", "2001:db8:1:2::b", "2001:db8:1:2:ffff::9"):
            fail_from(host)  # one /64 changing its address each time
        assert auth.failures("2001:db8:1:2::77") == 3
        assert auth.failures("2001:db8:1:3::a") == 0
        fail_from("::ffff:203.0.113.9")
        assert auth.failures("203.0.113.9") == 1
        for i in range(20):  # more fresh /64s than the table holds
            fail_from(f"2001:db8:2:{i:x}::1")
        assert auth.failures("2001:db8:1:2::a") == 3  # the persistent guesser is still slowed
        assert len(auth._failures) <= auth.max_tracked
    finally:
        srv.stop()


def test_failures_delay_an_address_before_its_next_check(tmp_path, monkeypatch):
    """After failures an address waits before its next check (not after it), one check at a time:
    parallel guesses get 429. Other addresses, with a remembered login or a fresh one, go first."""
    checks = count_bcrypt(monkeypatch)
    srv = ServerThread(server_config(str(tmp_path), trust_x_forwarded_for=True))
    try:
        target, friends, newcomer = srv.bucket(), srv.bucket(), srv.bucket()
        auth = srv.server.app.auth
        url = f"{target.url}keys/"
        attacker = {"X-Forwarded-For": "203.0.113.9"}
        wrong = (target.name, "1" * 32)
        for _ in range(3):
            assert httpx.get(url, auth=wrong, headers=attacker).status_code == 401
        assert auth.failures("203.0.113.9") == 3

        barrier = threading.Barrier(8)
        answers: list[httpx.Response] = []

        def guess() -> None:
            barrier.wait()
            answers.append(httpx.get(url, auth=wrong, headers=attacker, timeout=60))

        started = time.monotonic()
        threads = [threading.Thread(target=guess) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        statuses = [a.status_code for a in answers]
        checked = statuses.count(401)
        assert set(statuses) == {401, 429}, statuses
        assert all(int(a.headers["retry-after"]) >= 1 for a in answers if a.status_code == 429)
        assert auth.failures("203.0.113.9") == 3 + checked
        assert elapsed >= sum(auth.delay(n) for n in range(3, 3 + checked))
        assert httpx.get(url, auth=wrong, headers=attacker).status_code == 401
        failures = auth.failures("203.0.113.9")

        friend = {"X-Forwarded-For": "198.51.100.7"}
        assert (
            httpx.get(f"{friends.url}keys/", auth=friends.auth, headers=friend).status_code == 200
        )
        before = len(checks)
        done: list[tuple[int, float]] = []

        def attack() -> None:
            begun = time.monotonic()
            status = httpx.get(url, auth=wrong, headers=attacker, timeout=60).status_code
            done.append((status, time.monotonic() - begun))

        attempt = threading.Thread(target=attack)
        attempt.start()
        time.sleep(0.1)  # let the attempt reach its delay
        resp = httpx.get(f"{friends.url}keys/", auth=friends.auth, headers=friend)
        assert resp.status_code == 200
        assert len(checks) == before  # remembered login; and the attacker's bcrypt has not run yet
        resp = httpx.get(
            f"{newcomer.url}keys/", auth=newcomer.auth, headers={"X-Forwarded-For": "198.51.100.8"}
        )
        assert resp.status_code == 200 and len(checks) == before + 1
        assert not done  # both answered while the attacker still waits
        attempt.join()
        [(status, took)] = done
        assert status == 401 and took >= auth.delay(failures)
        assert auth.failures("203.0.113.9") == failures + 1 and len(checks) == before + 2
    finally:
        srv.stop()


def test_successful_logins_are_remembered_until_expiry_or_a_new_psk(tmp_path, monkeypatch):
    monkeypatch.setattr(BucketRegistry, "ttl", 0.1)  # how soon the server sees an admin change
    checks = count_bcrypt(monkeypatch)
    srv = ServerThread(server_config(str(tmp_path), auth_cache_seconds=1.0))
    try:
        creds = srv.bucket()
        with srv.admin() as admin:
            stored = admin.registry.require(creds.name).psk_hash
        # The password is the PSK in hex; bcrypt hashes the raw SHA-512 of its 16 bytes.
        assert bcrypt.checkpw(hashlib.sha512(bytes.fromhex(creds.psk)).digest(), stored)
        with httpx.Client(base_url=creds.url, auth=creds.auth) as c:
            for _ in range(5):
                assert c.get("keys/").status_code == 200
            assert checks == [bytes.fromhex(creds.psk)]
            time.sleep(1.1)
            assert c.get("keys/").status_code == 200
            assert len(checks) == 2
            with srv.admin() as admin:
                _, psk = admin.set(creds.name, rotate_psk=True)
            assert psk is not None
            time.sleep(BucketRegistry.ttl + 0.1)
            assert c.get("keys/").status_code == 401  # remembered, but for the old hash
            assert len(checks) == 3
            for _ in range(3):
                assert c.get("keys/", auth=(creds.name, psk)).status_code == 200
            assert len(checks) == 4
    finally:
        srv.stop()


def test_odd_methods_cannot_grow_metrics_or_break_the_access_log(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="vaultfs.server.access")
    srv = ServerThread(server_config(str(tmp_path)))
    try:
        creds = srv.bucket()
        close = "Host: x\r\nConnection: close\r\n"
        for i in range(50):
            answer = raw(srv.url, f"M{i} /nothing HTTP/1.1\r\n{close}\r\n")
            assert answer.startswith(b"HTTP/1.1 404 ")
        for method in ("OPTIONS", "PATCH", "PROPFIND"):
            answer = raw(
                srv.url,
                f"{method} /{creds.name}/config HTTP/1.1\r\n{close}"
                f"Authorization: {basic(*creds.auth)}\r\n\r\n",
            )
            assert answer.startswith(b"HTTP/1.1 405 ")
        # A method that is not a token is refused, so no quote or space reaches the log.
        assert raw(srv.url, f'G"T /x HTTP/1.1\r\n{close}\r\n').startswith(b"HTTP/1.1 400 ")
        answer = raw(
            srv.url,
            f'GET /x"y\\z HTTP/1.1\r\n{close}User-Agent: a" "b\x1b[2J\xe9\r\n\r\n',
        )
        assert answer.startswith(b"HTTP/1.1 404 ")
        metrics = httpx.get(srv.url + "metrics").text
        labels = re.findall(r'vaultfs_requests_total\{bucket="([^"]*)",method="([^"]*)"', metrics)
        assert {m for _, m in labels} <= {"GET", "HEAD", "POST", "DELETE", "-", "other"}
        assert 'vaultfs_requests_total{bucket="-",method="other",status="404"} 50' in metrics
        assert f'{{bucket="{creds.name}",method="other",status="405"}} 3' in metrics
        lines = [r.getMessage() for r in caplog.records if r.name == "vaultfs.server.access"]
        assert len(lines) >= 55
        for line in lines:
            assert ACCESS_LINE.match(line), line
        assert any('"M7 /nothing HTTP/1.1" 404' in line for line in lines)
        assert any('"GET /x%22y\\x5cz HTTP/1.1" 404' in line for line in lines)
    finally:
        srv.stop()


TRAVERSALS = [
    "../etc/passwd",
    "data/../../etc/passwd",
    "data/%2e%2e/%2e%2e/config",
    "data%2f..%2f..%2fconfig",
    "%2e%2e/config",
    "data/..%2f..%2fconfig",
    "data/%252e%252e/config",
    "data/..\\..\\config",
    "data/" + "a" * 63 + "/",
    "data//" + "a" * 64,
    "data/" + "A" * 64,
    "data/" + "a" * 63,
    "data/" + "a" * 65,
    "data/" + "g" * 64,
    "tmp/" + "a" * 64,
    "data/aa/" + "a" * 64,
    "config/",
    "keys/." + "a" * 63,
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_paths_outside_the_grammar_are_404(client, path):
    for method in ("GET", "POST", "DELETE", "HEAD"):
        resp = client.request(method, path, content=b"x" if method == "POST" else None)
        assert resp.status_code == 404, (method, path, resp.status_code)


def test_raw_traversal_targets(server, bucket):
    for target in (f"/{bucket.name}/../{bucket.name}/config", "/../../etc/passwd", "*", "//etc"):
        answer = raw(server.url, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert answer.split(b" ")[1] in (b"404", b"400"), (target, answer[:80])
        assert b"/tmp" not in answer and str(server.config.data).encode() not in answer


def test_body_whose_hash_does_not_match_is_refused_and_not_stored(client, server, bucket):
    data, name = blob()
    resp = client.post(f"data/{name}", content=data + b"!")
    assert resp.status_code == 400
    assert client.head(f"data/{name}").status_code == 404
    leftovers = [p for p in bucket_dir(server, bucket.name).rglob("*") if p.is_file()]
    assert leftovers == []


def test_large_uploads_written_past_the_page_cache(client, server, bucket):
    """Bodies of a few MiB (written with O_DIRECT where the disk allows) round-trip byte for byte
    whatever their tail, and one whose hash is wrong leaves nothing behind."""
    for size in (3 * (1 << 20) + 4321, 2 << 20):
        data, name = blob(size)
        assert client.post(f"data/{name}", content=data).status_code == 200
        assert client.get(f"data/{name}").content == data
    data, name = blob(2 * (1 << 20) + 1)
    assert client.post(f"data/{name}", content=data[:-1] + bytes([data[-1] ^ 1])).status_code == 400
    assert client.head(f"data/{name}").status_code == 404
    assert list(bucket_dir(server, bucket.name).rglob(f"{name}*")) == []


def test_quota(server):
    creds = server.bucket(quota=10_000)
    with httpx.Client(base_url=creds.url, auth=creds.auth) as c:
        small, small_name = blob(6000)
        big, big_name = blob(6000)
        assert c.post(f"data/{small_name}", content=small).status_code == 200
        assert c.post(f"data/{big_name}", content=big).status_code == 507  # before writing
        assert c.head(f"data/{big_name}").status_code == 404

        def chunked():
            yield big

        assert c.post(f"data/{big_name}", content=chunked()).status_code == 411
        assert c.delete(f"data/{small_name}").status_code == 200
        assert c.post(f"data/{big_name}", content=big).status_code == 200
    with server.admin() as admin:
        assert admin.info(creds.name).stored == 6000


def test_a_bucket_made_again_under_its_name_starts_with_an_empty_quota(tmp_path, monkeypatch):
    """Deleted and created again while the server runs (the admin CLI works beside it), a bucket is
    not charged with what the old one held."""
    monkeypatch.setattr(BucketRegistry, "ttl", 0.1)  # how soon the server sees an admin change
    srv = ServerThread(server_config(str(tmp_path)))
    try:
        creds = srv.bucket("again", quota=10_000)
        data, name = blob(8000)
        with httpx.Client(base_url=creds.url, auth=creds.auth) as c:
            assert c.post(f"data/{name}", content=data).status_code == 200
        with srv.admin() as admin:
            admin.delete("again")
        creds = srv.bucket("again", quota=10_000)
        time.sleep(BucketRegistry.ttl + 0.1)
        with httpx.Client(base_url=creds.url, auth=creds.auth) as c:
            assert c.post(f"data/{name}", content=data).status_code == 200
            other, other_name = blob(8000)
            assert c.post(f"data/{other_name}", content=other).status_code == 507
    finally:
        srv.stop()


def test_quota_error_reaches_the_client_as_permanent(server):
    creds = server.bucket(quota=100)
    be = RestBackend(creds.location)
    try:
        data, name = blob(5000)
        with pytest.raises(BackendError, match="507") as info:
            be.write("data", name, data)
        assert not info.value.temporary
    finally:
        be.close()


def test_append_only_refuses_deletes_except_locks(server):
    creds = server.bucket(append_only=True)
    with httpx.Client(base_url=creds.url, auth=creds.auth) as c:
        data, name = blob()
        for kind in ("data", "keys", "snapshots", "index", "locks", "packindex"):
            assert c.post(f"{kind}/{name}", content=data).status_code == 200
        assert c.post("config", content=b"cfg").status_code == 200
        for kind in ("data", "keys", "snapshots", "index", "packindex"):
            assert c.delete(f"{kind}/{name}").status_code == 403
            assert c.head(f"{kind}/{name}").status_code == 200
        assert c.delete("config").status_code == 403
        assert c.delete(f"locks/{name}").status_code == 200
        assert c.head(f"locks/{name}").status_code == 404
        assert c.post(f"data/{name}", content=data).status_code == 403
    # What a vault client says when forget or prune meets the bucket.
    be = RestBackend(creds.location)
    try:
        with pytest.raises(BackendError, match="append-only") as info:
            be.remove("snapshots", name)
        assert "vault server bucket set NAME --no-append-only" in str(info.value)
        assert not info.value.temporary
    finally:
        be.close()


def test_two_clients_uploading_the_same_file_at_once(server, bucket):
    data, name = blob(4 << 20)
    results = []

    def upload():
        with httpx.Client(auth=bucket.auth, timeout=60) as c:
            results.append(c.post(f"{bucket.url}data/{name}", content=data).status_code)

    threads = [threading.Thread(target=upload) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results).count(200) == 1 and set(results) <= {200, 403}, results
    folder = bucket_dir(server, bucket.name) / "data" / name[:2]
    assert [p.name for p in folder.iterdir()] == [name]
    assert (folder / name).read_bytes() == data


def test_healthz_metrics_and_address_lists(tmp_path):
    srv = ServerThread(server_config(str(tmp_path / "d"), metrics_allow=["127.0.0.1/32"]))
    try:
        creds = srv.bucket("metered")
        data, name = blob(777)
        with httpx.Client(base_url=creds.url, auth=creds.auth) as c:
            assert c.post(f"data/{name}", content=data).status_code == 200
            assert c.get(f"data/{name}").status_code == 200
            assert c.get("data/" + "0" * 64).status_code == 404
        assert httpx.get(srv.url + "healthz").text == "ok\n"
        metrics = httpx.get(srv.url + "metrics").text
        assert 'vaultfs_requests_total{bucket="metered",method="POST",status="200"} 1' in metrics
        assert 'vaultfs_received_bytes_total{bucket="metered"} 777' in metrics
        # 777 of content plus the bodies "ok\n" (POST) and "not found\n" (404)
        assert 'vaultfs_sent_bytes_total{bucket="metered"} 790' in metrics
        assert 'vaultfs_errors_total{bucket="metered"} 1' in metrics
    finally:
        srv.stop()
    srv = ServerThread(server_config(str(tmp_path / "e"), allow=["10.0.0.0/8"]))
    try:
        assert httpx.get(srv.url + "healthz").status_code == 403
    finally:
        srv.stop()


def test_x_forwarded_for_only_when_trusted(tmp_path, caplog):
    """The left-most entry is the client when trusted: it is denied, not allowed /metrics, logged, and
    its failed logins are counted against it. Untrusted, the socket's address is used for all of it."""
    caplog.set_level(logging.INFO, logger="vaultfs.server.access")
    for trust, expected in ((False, 200), (True, 403)):
        srv = ServerThread(
            server_config(
                str(tmp_path / str(trust)), deny=["203.0.113.0/24"], trust_x_forwarded_for=trust
            )
        )
        try:
            resp = httpx.get(
                srv.url + "healthz", headers={"X-Forwarded-For": "203.0.113.9, 10.0.0.1"}
            )
            assert resp.status_code == expected
            assert httpx.get(srv.url + "healthz").status_code == 200
            resp = httpx.get(srv.url + "metrics", headers={"X-Forwarded-For": "198.51.100.1"})
            assert resp.status_code == expected
            creds = srv.bucket()
            caplog.clear()
            answer = raw(
                srv.url,
                f"GET /{creds.name}/keys/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                f"Authorization: {basic(creds.name, '1' * 32)}\r\n"
                "X-Forwarded-For: 198.51.100.23, 10.0.0.1\r\n\r\n",
            )
            assert answer.startswith(b"HTTP/1.1 401 ")
            client, bystander = ("198.51.100.23", "127.0.0.1")[:: 1 if trust else -1]
            assert srv.server.app.auth.failures(client) == 1
            assert srv.server.app.auth.failures(bystander) == 0
            [line] = [r.getMessage() for r in caplog.records if "/keys/" in r.getMessage()]
            assert line.startswith(f"{client} - - [") and " 401 " in line
        finally:
            srv.stop()


def test_error_bodies_never_show_server_paths(client, server):
    texts = [
        client.get("data/" + "0" * 64).text,
        client.post("data/" + "0" * 64, content=b"x").text,
        client.get("nothing").text,
    ]
    for t in texts:
        assert server.config.data not in t and "/" not in t.strip()
    assert json.loads(client.get("keys/", headers={"Accept": V2}).text) == []
