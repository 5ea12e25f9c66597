"""Run the real bucket server on 127.0.0.1 and a free port, in a thread of the test process, for sync tests.

``ServerThread`` runs ``Server.run`` under ``trio.run`` in a daemon thread and stops it gracefully (the
same path as SIGTERM). ``shared_server()`` is one such server per test session, for tests (like the backend
conformance suite) that only need a fresh bucket each. Buckets are made through ``Admin`` as
`vault server bucket create` makes them, with cheap bcrypt rounds.
"""

from __future__ import annotations

import atexit
import datetime
import ipaddress
import queue
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from vaultfs.server.admin import Admin
from vaultfs.server.config import ServerConfig, load_config
from vaultfs.server.main import Server

#: Test defaults: bcrypt at its cheapest cost, short timeouts, no access log on stderr.
TEST_CONFIG: dict[str, Any] = {
    "listen": "127.0.0.1:0",
    "bcrypt_rounds": 4,
    "access_log": "",
    "shutdown_grace": 5.0,
}


def server_config(data: str, **overrides: Any) -> ServerConfig:
    return load_config(None, data=data, **{**TEST_CONFIG, **overrides})


@dataclass
class BucketCreds:
    name: str
    psk: str
    url: str  # http://host:port/name/ without credentials

    @property
    def location(self) -> str:
        return "rest:" + self.url.replace("://", f"://{self.name}:{self.psk}@", 1)

    @property
    def auth(self) -> tuple[str, str]:
        return (self.name, self.psk)


class ServerThread:
    """The bucket server in a background thread. ``url`` is its base URL (``http://127.0.0.1:P/``)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.server = Server(config)
        self._token: trio.lowlevel.TrioToken | None = None
        self._started: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="vaultfs-test-server", daemon=True)
        self._thread.start()
        got = self._started.get(timeout=30)
        if isinstance(got, BaseException):
            raise got
        self.url: str = got[0]

    def _main(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                urls = await nursery.start(self.server.run)
                self._started.put(urls)

        try:
            trio.run(main)
        except BaseException as exc:  # reported to the test through .error / start-up
            self.error = exc
            self._started.put(exc)

    def bucket(self, name: str | None = None, **options: Any) -> BucketCreds:
        with Admin(self.config) as admin:
            new = admin.create(name, **options)
        return BucketCreds(new.bucket.name, new.psk, f"{self.url}{new.bucket.name}/")

    def admin(self) -> Admin:
        return Admin(self.config)

    def stop(self, timeout: float = 30) -> None:
        """Graceful shutdown (as on SIGTERM); raises if the server thread failed."""
        if self._thread.is_alive() and self._token is not None:
            try:
                trio.from_thread.run_sync(self.server.shutdown.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError("the server did not stop")
        if self.error is not None:
            raise self.error


_shared: ServerThread | None = None
_shared_lock = threading.Lock()


def shared_server() -> ServerThread:
    """One server for the whole session (started on first use, stopped at exit).

    It does not check upload hashes (``verify_uploads = false``) so that suites written for any byte
    store, whose objects are not always named by their hash, run unchanged against it.
    """
    global _shared
    with _shared_lock:
        if _shared is None:
            data = tempfile.mkdtemp(prefix="vaultfs-test-server-")
            _shared = ServerThread(server_config(data, verify_uploads=False))
            atexit.register(_stop_shared, data)
        return _shared


def _stop_shared(data: str) -> None:
    if _shared is not None:
        try:
            _shared.stop()
        finally:
            shutil.rmtree(data, ignore_errors=True)


def module_server(folder: str) -> Any:
    """A module-scoped pytest fixture: one server in a temp folder named ``folder`` for the module's
    tests, stopped (and checked for a failed server thread) after the last one."""

    @pytest.fixture(scope="module")
    def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
        srv = ServerThread(server_config(str(tmp_path_factory.mktemp(folder))))
        yield srv
        srv.stop()

    return server


def make_cert(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and ::1 (it is its own CA) and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vaultfs test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "::1")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
