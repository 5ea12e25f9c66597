"""vault serve: run the bucket server, which serves vaults as buckets over restic's REST protocol.

restic (rest:), rclone and vault clients use it alike. Buckets are made with `vault server bucket create`;
each is a folder in the vault layout under the data folder (or spread over the configured volumes), so
rsync and `vault verify` work on it directly. Uploads are checked against their SHA-256 name, nothing is
overwritten, quotas and append-only buckets are enforced. Every key of the TOML config file has a default:
`vault serve --data DIR` alone works. SIGTERM or Ctrl-C stop the server gracefully: uploads in flight finish
within shutdown_grace seconds or are discarded, never left half-visible.

config file keys (TOML; command-line options win):
  data = "/var/lib/vaultfs"        state (DATA/.vaultfs-server/) and, without volumes, the buckets
  volumes = ["/d1", "/d2"]         spread buckets over several folders (reads look in all; new files
                                   go to the one with most free space; files may be moved while running)
  listen = "127.0.0.1:8000"        HOST:PORT (:PORT = every address); port 0 picks a free port
  tls_cert = "", tls_key = ""      PEM files: serve HTTPS
  trust_x_forwarded_for = false    behind a proxy that replaces X-Forwarded-For: its left-most entry is
                                   the client address (logs, rate limits, allow/deny)
  allow = [], deny = []            client networks (CIDR); deny wins; empty allow = everyone
  metrics_allow = ["127.0.0.1/32", "::1/128"]   who may read /metrics (Prometheus)
  access_log = "-"                 "-" = stderr, "" = off, else a file (reopened within a second when
                                   it was moved or removed: logrotate needs no copytruncate and no
                                   signal)
  verify_uploads = true            refuse uploads whose SHA-256 is not their name (HTTP 400); the
                                   hash is the server's largest CPU cost (about 0.8 CPU-second per
                                   GB), so false (no hash at all) suits slow CPUs that trust their
                                   clients
  read_timeout = 60                seconds a client may stall mid-request before it is dropped
  keepalive_timeout = 75           seconds an idle connection stays open
  shutdown_grace = 30              seconds requests in flight get after SIGTERM
  abandoned_upload_seconds = 600   the temp file of an upload nobody wrote to this long is removed:
                                   debris of a server killed mid-upload (swept this long after the
                                   start, then daily; at least twice read_timeout)
  max_connections = 512, io_threads = 16
  bcrypt_rounds = 12               cost of new PSK hashes
  auth_cache_seconds = 60          a successful PSK check is remembered this long

endpoints: /BUCKET/ (restic REST protocol v1 and v2, HTTP Basic auth with user BUCKET and the PSK
as password), /healthz, /metrics.

Failed logins: after N failures an address (an IPv6 one counts as its /64) waits 0.05 s, doubling per
failure up to 5 s, before its next check; while it waits, further attempts from it get HTTP 429 with
Retry-After. A right PSK clears the count. Behind a proxy, set trust_x_forwarded_for so the throttle applies per client, not per proxy.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import time
from typing import TextIO

from vaultfs.errors import UsageError
from vaultfs.tools.common import Output

#: Takes no vault location, password or cache options (see common.add_global_options).
OPENS_VAULT = False


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve", help="run the bucket server (restic REST protocol)", description=__doc__
    )
    add_server_options(p)
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="address to listen on (default 127.0.0.1:8000; :PORT is every address, IPv4 and IPv6; "
        "port 0 picks a free port, the same on every address, and prints it)",
    )
    p.add_argument("--tls-cert", metavar="FILE", help="PEM certificate chain: serve HTTPS")
    p.add_argument("--tls-key", metavar="FILE", help="PEM private key for --tls-cert")
    p.add_argument(
        "--volume",
        action="append",
        metavar="DIR",
        help="store buckets on DIR (repeatable: spans volumes; default: the data folder)",
    )
    p.add_argument(
        "--access-log",
        metavar="FILE",
        help='access log: a file, "-" for stderr (default) or "" for none',
    )
    p.set_defaults(func=run)
    return p


def add_server_options(p: argparse.ArgumentParser) -> None:
    """--config and --data, shared with `vault server`."""
    p.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="TOML config file (see vault-serve(1)); every key has a default",
    )
    p.add_argument(
        "--data",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="data folder: server state and, without volumes, the buckets (default /var/lib/vaultfs)",
    )


def load(args: argparse.Namespace, **overrides):  # noqa: ANN003, ANN201 - returns ServerConfig
    from vaultfs.server.config import load_config

    return load_config(getattr(args, "config", None), data=getattr(args, "data", None), **overrides)


def _setup_logging(access_log: str) -> None:
    root = logging.getLogger("vaultfs.server")
    root.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vault serve: %(levelname)s: %(message)s"))
    handler.setLevel(logging.WARNING)
    root.addHandler(handler)
    access = logging.getLogger("vaultfs.server.access")
    access.propagate = False
    if not access_log:
        access.setLevel(logging.CRITICAL)
        return
    access.setLevel(logging.INFO)
    if access_log == "-":
        target: logging.Handler = logging.StreamHandler(sys.stderr)
    else:
        target = AccessLogFile(access_log)
    target.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(target)


class AccessLogFile(logging.StreamHandler):
    """The access log in a file that log rotation may move or remove at any time: the file is reopened
    (created again) when its name no longer leads to the open file, so logrotate needs neither
    copytruncate nor a signal. The name is looked up at most once a ``check_seconds`` (a stat per line
    cost 3.7 µs, 2-3% of a small request): lines of the moment after a rotation end the rotated file.
    A line that cannot be written is dropped; the first of a run of failures is reported on stderr,
    once, and requests go on being served."""

    check_seconds = 1.0

    def __init__(self, path: str) -> None:
        try:
            stream = open(path, "a", encoding="utf-8")  # noqa: SIM115 - the handler owns it
        except OSError as exc:
            raise UsageError(
                f"cannot open the access log {path}: {exc.strerror or exc}; "
                'fix --access-log or access_log in the config ("-" = stderr, "" = off)'
            ) from None
        super().__init__(stream)
        self.path = path
        self._identity = self._identify(stream)
        self._failing = False
        self._next_check = time.monotonic() + self.check_seconds

    @staticmethod
    def _identify(stream: TextIO) -> tuple[int, int]:
        st = os.fstat(stream.fileno())
        return st.st_dev, st.st_ino

    def _reopen_if_moved(self) -> None:
        now = time.monotonic()
        if now < self._next_check and not self._failing:
            return
        self._next_check = now + self.check_seconds
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                return
        except FileNotFoundError:
            pass
        fresh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - the handler owns it
        old, self.stream = self.stream, fresh
        self._identity = self._identify(fresh)
        old.close()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._reopen_if_moved()
        except OSError as exc:
            self._report(exc)
            return
        self._write_error: BaseException | None = None
        super().emit(record)  # a failed write calls handleError
        if self._write_error is not None:
            self._report(self._write_error)
        elif self._failing:
            self._failing = False
            logging.getLogger("vaultfs.server").warning(
                "the access log %s is written again", self.path
            )

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        self._write_error = sys.exc_info()[1] or OSError("write failed")

    def _report(self, exc: BaseException | None) -> None:
        if not self._failing:
            reason = getattr(exc, "strerror", None) or exc
            logging.getLogger("vaultfs.server").warning(
                "cannot write the access log %s: %s; requests are served but not logged until "
                "it can be written",
                self.path,
                reason,
            )
        self._failing = True


def run(args: argparse.Namespace, out: Output) -> int:
    import trio

    from vaultfs.server.app import one_error
    from vaultfs.server.main import Server

    config = load(
        args,
        listen=args.listen,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        volumes=args.volume,
        access_log=args.access_log,
    )
    _setup_logging(config.access_log)
    server = Server(config)

    async def main() -> None:
        # one_error: a failure to start (the address is in use, ...) leaves the nursery as itself, so
        # it is the one-line error of its kind rather than a traceback of an exception group.
        async with one_error(), trio.open_nursery() as nursery:
            urls = await nursery.start(functools.partial(server.run, handle_signals=True))
            if out.json:
                out.emit_line({"message_type": "listening", "urls": urls})
            else:
                for url in urls:
                    out.line(f"vault serve: listening on {url}")
            sys.stdout.flush()

    trio.run(main)
    out.note("vault serve: stopped")
    return 0
