"""Server configuration: defaults, the TOML file, validation, and the shipped deploy/server.toml."""

from __future__ import annotations

from pathlib import Path

import pytest

from vaultfs.errors import UsageError
from vaultfs.server.admin import parse_size
from vaultfs.server.config import ServerConfig, load_config, parse_listen

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_defaults_and_overrides(tmp_path):
    config = load_config(None, data=str(tmp_path))
    assert config.listen == "127.0.0.1:8000" and not config.trust_x_forwarded_for
    assert config.volume_paths == [str(tmp_path)] and config.verify_uploads
    path = tmp_path / "s.toml"
    path.write_text('listen = ":0"\nvolumes = ["/a", "/b"]\nread_timeout = 5\n')
    config = load_config(str(path), listen=None, data="/d")
    assert config.host_port == ("0.0.0.0", 0) and config.volume_paths == ["/a", "/b"]
    assert config.read_timeout == 5.0 and config.data == "/d"


@pytest.mark.parametrize(
    "text",
    [
        "nope = 1",
        "read_timeout = 'x'",
        "verify_uploads = 1",
        "allow = ['not a net']",
        "tls_cert = 'c.pem'",
        "listen = '127.0.0.1'",
        "listen = '127.0.0.1:70000'",
        "bcrypt_rounds = 2",
        "max_connections = 0",
        "read_timeout = 60\nabandoned_upload_seconds = 100",
        "= broken",
    ],
)
def test_bad_files_are_usage_errors(tmp_path, text):
    path = tmp_path / "s.toml"
    path.write_text(text + "\n")
    with pytest.raises(UsageError):
        load_config(str(path))


def test_listen_syntax():
    assert parse_listen("[::1]:8000") == ("::1", 8000)
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)


def test_sizes():
    assert parse_size("1024") == 1024
    assert parse_size("1.5K") == 1536
    assert parse_size("10GiB") == 10 << 30
    assert parse_size("2t") == 2 << 40
    with pytest.raises(UsageError):
        parse_size("ten")


def test_shipped_config_loads():
    config = load_config(str(DEPLOY / "server.toml"))
    assert isinstance(config, ServerConfig) and config.trust_x_forwarded_for
    unit = (DEPLOY / "vaultfs-server.service").read_text()
    assert "ExecStart=/usr/local/bin/vault serve --config /etc/vaultfs/server.toml" in unit
    nginx = (DEPLOY / "nginx.conf").read_text()
    for directive in (
        "client_max_body_size 0",
        "proxy_request_buffering off",
        "proxy_buffering off",
    ):
        assert directive in nginx
