"""Server configuration: a TOML file in which every key has a default, overridable from the command line.

```toml
data = "/var/lib/vaultfs"          # state (SQLite) lives in DATA/.vaultfs-server/; default volume
volumes = ["/srv/disk1", "/srv/disk2"]   # bucket storage; default [data]
listen = "127.0.0.1:8000"          # HOST:PORT (":PORT" = every address); port 0 picks a free port
tls_cert = ""                      # PEM files; both set = HTTPS
tls_key = ""
trust_x_forwarded_for = false      # true only behind a proxy that sets the header itself
allow = []                         # client networks allowed (empty = all), e.g. ["10.0.0.0/8"]
deny = []                          # client networks refused (checked first)
metrics_allow = ["127.0.0.1/32", "::1/128"]   # who may read /metrics
access_log = "-"                   # "-" = stderr, "" = off, else a file
verify_uploads = true              # refuse uploads whose SHA-256 is not their name (false: no hash)
read_timeout = 60                  # seconds a client may send nothing while we wait for it
keepalive_timeout = 75             # seconds an idle connection is kept open
shutdown_grace = 30                # seconds in-flight requests get after SIGTERM
abandoned_upload_seconds = 600     # an upload temp file unwritten this long is removed (crash debris)
max_connections = 512
io_threads = 16                    # worker threads for disk I/O
bcrypt_rounds = 12                 # cost of new PSK hashes
auth_cache_seconds = 60            # how long a successful PSK check is remembered
```
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from vaultfs.errors import UsageError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class ServerConfig:
    data: str = "/var/lib/vaultfs"
    volumes: list[str] = field(default_factory=list)
    listen: str = "127.0.0.1:8000"
    tls_cert: str = ""
    tls_key: str = ""
    trust_x_forwarded_for: bool = False
    allow: list[str] = field(default_factory=list)
    deny: list[str] = field(default_factory=list)
    metrics_allow: list[str] = field(default_factory=lambda: ["127.0.0.1/32", "::1/128"])
    access_log: str = "-"
    verify_uploads: bool = True
    read_timeout: float = 60.0
    keepalive_timeout: float = 75.0
    shutdown_grace: float = 30.0
    abandoned_upload_seconds: float = 600.0
    max_connections: int = 512
    io_threads: int = 16
    bcrypt_rounds: int = 12
    auth_cache_seconds: float = 60.0

    # -- derived -------------------------------------------------------------------------------

    @property
    def state_dir(self) -> str:
        return os.path.join(self.data, ".vaultfs-server")

    @property
    def volume_paths(self) -> list[str]:
        return [os.path.abspath(v) for v in (self.volumes or [self.data])]

    @property
    def host_port(self) -> tuple[str | None, int]:
        return parse_listen(self.listen)

    def networks(self, name: str) -> list[Network]:
        return [ipaddress.ip_network(n, strict=False) for n in getattr(self, name)]

    def validate(self) -> ServerConfig:
        """Check values; raise UsageError naming the bad key."""
        self.host_port  # noqa: B018 - parses and raises
        for name in ("allow", "deny", "metrics_allow"):
            for net in getattr(self, name):
                try:
                    ipaddress.ip_network(net, strict=False)
                except ValueError:
                    raise UsageError(
                        f"config: {name}: {net!r} is not an address or network"
                    ) from None
        if bool(self.tls_cert) != bool(self.tls_key):
            raise UsageError("config: tls_cert and tls_key must be given together")
        for name in ("read_timeout", "keepalive_timeout", "auth_cache_seconds"):
            if getattr(self, name) <= 0:
                raise UsageError(f"config: {name} must be positive")
        if self.abandoned_upload_seconds < 2 * self.read_timeout:
            raise UsageError(
                "config: abandoned_upload_seconds must be at least twice read_timeout (a live upload "
                "may go that long without a write)"
            )
        if self.shutdown_grace < 0:
            raise UsageError("config: shutdown_grace must not be negative")
        for name in ("max_connections", "io_threads"):
            if getattr(self, name) < 1:
                raise UsageError(f"config: {name} must be at least 1")
        if not 4 <= self.bcrypt_rounds <= 20:
            raise UsageError("config: bcrypt_rounds must be between 4 and 20")
        if not self.data:
            raise UsageError("config: data must name a folder")
        return self


def parse_listen(listen: str) -> tuple[str | None, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port); ``:PORT`` -> (None, port): every
    address of every family (IPv4 and IPv6), as trio.open_tcp_listeners takes ``host=None``."""
    host, sep, port = listen.rpartition(":")
    if not sep:
        raise UsageError(f"listen address {listen!r} needs a port: HOST:PORT")
    name = host.strip("[]") or None
    try:
        number = int(port)
    except ValueError:
        raise UsageError(f"listen address {listen!r}: port {port!r} is not a number") from None
    if not 0 <= number <= 65535:
        raise UsageError(f"listen address {listen!r}: port out of range")
    return name, number


def load_config(path: str | None = None, **overrides: Any) -> ServerConfig:
    """Read the TOML file at ``path`` (none: defaults), apply non-None ``overrides``, validate."""
    values: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except OSError as exc:
            raise UsageError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"config file {path}: {exc}") from None
    known = {f.name: f for f in dataclasses.fields(ServerConfig)}
    for key in values:
        if key not in known:
            raise UsageError(f"config file {path}: unknown key {key!r}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = ServerConfig()
    for key, value in values.items():
        default = getattr(config, key)
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, list):
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        else:
            ok = isinstance(value, str)
        if not ok:
            raise UsageError(f"config: {key} must be {type(default).__name__}, not {value!r}")
        setattr(config, key, value)
    return config.validate()
