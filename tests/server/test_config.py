"""Server configuration: defaults, the TOML file, validation, and the shipped deploy/server.toml."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from vaultfs.errors import UsageError
from vaultfs.server.admin import parse_size
from vaultfs.server.config import ServerConfig, load_config, parse_listen
from vaultfs.server.proxy import client_address

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_defaults_and_overrides(tmp_path):
    config = load_config(None, data=str(tmp_path))
    assert config.listen == "127.0.0.1:8000" and not config.trust_x_forwarded_for
    assert config.volume_paths == [str(tmp_path)] and config.verify_uploads
    path = tmp_path / "s.toml"
    path.write_text('listen = ":0"\nvolumes = ["/a", "/b"]\nread_timeout = 5\n')
    config = load_config(str(path), listen=None, data="/d")
    assert config.host_port == (None, 0) and config.volume_paths == ["/a", "/b"]
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
    assert parse_listen(":8000") == (None, 8000)  # every address, IPv4 and IPv6


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


# -- the shipped proxy snippets and systemd unit ---------------------------------------------------
#
# The server trusts the LEFT-most X-Forwarded-For entry (server/proxy.py), so a proxy in front must
# REPLACE the header with the address it saw; appending would leave a client's forged entry left-most.

LONG = 3600  # seconds: the proxies' read/send timeouts for slow links (the snippets use 1h)


def test_server_trusts_the_left_most_entry():
    """What the snippets are written for: with an appending proxy the client would choose."""
    assert client_address("10.0.0.1", "6.6.6.6, 192.0.2.7", trust=True) == "6.6.6.6"
    assert client_address("10.0.0.1", "192.0.2.7", trust=True) == "192.0.2.7"


@dataclass
class Directive:
    name: str
    args: list[str]
    block: list[Directive] | None  # None for a simple directive ``name args;``


_NGINX_TOKEN = re.compile(r"""#[^\n]*|"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[{};]|[^\s{};"'#]+""")


def parse_nginx(text: str) -> list[Directive]:
    """nginx's configuration syntax: directives, blocks, quoted strings and comments."""
    root: list[Directive] = []
    stack, words = [root], []
    for token in _NGINX_TOKEN.findall(text):
        if token.startswith("#"):
            continue
        if token == ";":
            stack[-1].append(Directive(words[0], words[1:], None))
            words = []
        elif token == "{":
            directive = Directive(words[0], words[1:], [])
            stack[-1].append(directive)
            stack.append(directive.block)
            words = []
        elif token == "}":
            assert not words and len(stack) > 1, "unbalanced } or a directive without ;"
            stack.pop()
        else:
            words.append(token[1:-1] if token[0] in "\"'" else token)
    assert len(stack) == 1 and not words, "unbalanced { or a directive without ;"
    return root


def _nginx_level(
    block: list[Directive], outer: dict[str, list[str]], outer_headers: dict[str, str]
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """The settings in effect in ``block``: simple directives override the outer level one by one, but
    proxy_set_header is an array directive, inherited only by a level that sets none itself."""
    settings, headers = dict(outer), {}
    for d in block:
        if d.block is not None:
            continue
        if d.name == "proxy_set_header":
            headers[d.args[0].lower()] = d.args[1]
        else:
            settings[d.name] = d.args
    return settings, headers or outer_headers


def nginx_proxying_locations(
    tree: list[Directive],
) -> list[tuple[list[str], dict[str, list[str]], dict[str, str]]]:
    """(location arguments, settings in effect, headers sent upstream) of every location of every server
    that has its own proxy_pass (proxy_pass is not inherited)."""
    found = []

    def walk(block: list[Directive], settings: dict[str, list[str]], headers: dict[str, str]):
        for d in block:
            if d.name == "location" and d.block is not None:
                inner, inner_headers = _nginx_level(d.block, settings, headers)
                if any(x.name == "proxy_pass" for x in d.block):
                    found.append((d.args, inner, inner_headers))
                walk(d.block, inner, inner_headers)

    for server in (d for d in tree if d.name == "server" and d.block is not None):
        walk(server.block, *_nginx_level(server.block, {}, {}))
    return found


def nginx_seconds(value: str) -> float:
    units = {"ms": 0.001, "": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    assert re.fullmatch(r"(?:\d+(?:ms|[smhdw])?\s*)+", value), value
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)(ms|[smhdw]?)", value))


def check_nginx_location(args: list[str], settings: dict[str, list[str]], headers: dict[str, str]):
    where = f"location {' '.join(args)}"
    assert headers.get("connection") == "", f'{where}: no Connection "" (upstream keep-alive lost)'
    assert headers.get("x-forwarded-for") == "$remote_addr", (
        f"{where}: X-Forwarded-For not replaced"
    )
    assert headers.get("host") == "$host", f"{where}: Host not passed on"
    assert settings.get("proxy_http_version") == ["1.1"], (
        f"{where}: HTTP/1.0 upstream, no keep-alive"
    )
    assert settings.get("proxy_request_buffering") == ["off"], f"{where}: uploads are buffered"
    assert settings.get("proxy_buffering") == ["off"], f"{where}: downloads are buffered"
    assert re.fullmatch(r"0+[kKmMgG]?", settings.get("client_max_body_size", ["1m"])[0]), where
    for timeout in ("proxy_read_timeout", "proxy_send_timeout"):
        assert nginx_seconds(settings.get(timeout, ["60s"])[0]) >= LONG, f"{where}: {timeout}"


def nginx_location_block(tree: list[Directive], args: list[str]) -> list[Directive]:
    for server in (d for d in tree if d.name == "server" and d.block is not None):
        for d in server.block:
            if d.name == "location" and d.args == args and d.block is not None:
                return d.block
    raise AssertionError(f"no location {args}")


def test_nginx_snippet():
    tree = parse_nginx((DEPLOY / "nginx.conf").read_text())
    upstreams = {d.args[0]: d.block for d in tree if d.name == "upstream"}
    locations = nginx_proxying_locations(tree)
    assert {" ".join(args) for args, _, _ in locations} >= {"/", "= /metrics"}
    for args, settings, headers in locations:
        check_nginx_location(args, settings, headers)
        target = settings["proxy_pass"][0].removeprefix("http://").removeprefix("https://")
        assert target in upstreams, f"proxy_pass {target}: not the upstream block"
        assert any(d.name == "keepalive" for d in upstreams[target]), "upstream without keepalive"
        if args == ["=", "/metrics"]:
            assert ["all"] in (d.args for d in nginx_location_block(tree, args) if d.name == "deny")


def test_nginx_check_sees_lost_header_inheritance():
    """The bug the check exists for: a location with its own proxy_set_header lines inherits none of
    the server's, so a server-level Connection "" does not reach it."""
    tree = parse_nginx(
        """
        server {
            proxy_set_header Connection "";
            location / { proxy_pass http://u; proxy_set_header Host $host; }
            location /a { proxy_pass http://u; }
        }
        """
    )
    (_, _, slash), (_, _, a) = nginx_proxying_locations(tree)
    assert "connection" not in slash and slash["host"] == "$host"
    assert a == {"connection": ""}


def haproxy_sections(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """(section header words, directives as word lists); a section starts at column 0."""
    sections: list[tuple[list[str], list[list[str]]]] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            sections.append((line.split(), []))
        else:
            assert sections, f"directive outside a section: {raw!r}"
            sections[-1][1].append(line.split())
    return sections


def haproxy_seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(us|ms|s|m|h|d)?", value)
    assert match, value
    units = {"us": 1e-6, "ms": 0.001, None: 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return int(match[1]) * units[match[2]]


def test_haproxy_snippet():
    sections = haproxy_sections((DEPLOY / "haproxy.cfg").read_text())
    defaults: list[list[str]] = []
    kinds = set()
    for header, lines in sections:
        kind = header[0]
        if kind == "defaults":
            defaults = lines
            continue
        if kind not in ("frontend", "backend", "listen"):
            continue
        kinds.add(kind)
        effective = defaults + lines  # a proxy's own line wins over the defaults' (it comes later)
        timeouts = {w[1]: haproxy_seconds(w[2]) for w in effective if w[0] == "timeout"}
        options = {" ".join(w[1:]) for w in effective if w[0] == "option"}
        modes = [w[1] for w in effective if w[0] == "mode"]
        where = " ".join(header)
        assert modes and modes[-1] == "http", f"{where}: not mode http"
        assert "http-buffer-request" not in options, f"{where}: buffers requests"
        assert not {"httpclose", "http-server-close"} & options, f"{where}: no keep-alive"
        if kind in ("frontend", "listen"):
            assert timeouts.get("client", 0) >= LONG, f"{where}: timeout client"
            xff = [
                w[1:]
                for w in lines
                if w[0] == "http-request" and len(w) > 2 and w[2].lower() == "x-forwarded-for"
            ]
            replaced = len(xff) == 1 and xff[0][0] == "set-header" and xff[0][2:] == ["%[src]"]
            forwardfor = any(o.split()[0] == "forwardfor" for o in options)
            deleted = (
                len(xff) == 1 and xff[0][0] == "del-header" and len(xff[0]) == 2 and forwardfor
            )
            assert replaced or deleted, (
                f"{where}: X-Forwarded-For not replaced by the source: {xff}"
            )
        if kind in ("backend", "listen"):
            assert timeouts.get("server", 0) >= LONG, f"{where}: timeout server"
    assert kinds >= {"frontend", "backend"}


def systemd_seconds(value: str) -> float:
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "hr": 3600, "ms": 0.001}
    parts = re.findall(r"(\d+)\s*([a-z]*)", value)
    assert parts and "".join(n + u for n, u in parts) == value.replace(" ", ""), value
    return sum(int(n) * units[u] for n, u in parts)


def test_systemd_unit():
    sections: dict[str, dict[str, list[str]]] = {}
    section = None
    for line in (DEPLOY / "vaultfs-server.service").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = sections.setdefault(line.strip("[]"), {})
            continue
        assert section is not None, line
        key, _, value = line.partition("=")
        section.setdefault(key, []).append(value)
    service = {key: values[-1] for key, values in sections["Service"].items()}
    config = load_config(str(DEPLOY / "server.toml"))
    assert service["ExecStart"] == "/usr/local/bin/vault serve --config /etc/vaultfs/server.toml"
    assert service["KillSignal"] == "SIGTERM" and service["Restart"] == "on-failure"
    stop = systemd_seconds(service["TimeoutStopSec"])
    grace = max(ServerConfig().shutdown_grace, config.shutdown_grace)
    assert stop > grace, (
        f"TimeoutStopSec={stop:g}s: systemd kills before shutdown_grace={grace:g}s ends"
    )
    assert service["User"] not in ("", "root") and service["Group"] not in ("", "root")
    assert service["NoNewPrivileges"] == "yes" and service["PrivateTmp"] == "yes"
    assert service["ProtectSystem"] == "strict"
    writable = " ".join(sections["Service"]["ReadWritePaths"]).split()
    assert all(path in writable for path in [config.data, *config.volume_paths])
