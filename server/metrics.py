"""Counters for ``/metrics`` (Prometheus text format 0.0.4) and the access log.

No client can grow the label set. Counters are labelled by bucket only after the request authenticated,
so unauthenticated traffic (which chooses its own bucket names) is counted under ``bucket="-"``; a method
the server does not serve (any token the client sends) is counted as ``method="other"`` and a request
that never parsed as ``method="-"``. Updated and rendered in the server's trio thread only, so no locking.

The access log keeps the real method. Every field a client chooses is escaped (``"``, ``\\``, control
and non-ASCII characters as ``\\xHH``; spaces too in the unquoted address), so one request is always
one well-formed line.
"""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict

access_log = logging.getLogger("vaultfs.server.access")

#: Values of the method label: the methods app.py serves, and "-" for a request that never parsed. Any
#: other method (answered 405, or 401/404 first) is counted as "other".
METHOD_LABELS = frozenset({"GET", "HEAD", "POST", "DELETE", "-"})
_QUOTED_UNSAFE = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")
_BARE_UNSAFE = re.compile(r"[^\x21\x23-\x5b\x5d-\x7e]")


class Metrics:
    def __init__(self) -> None:
        self.started = time.time()
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self.received: dict[str, int] = defaultdict(int)
        self.sent: dict[str, int] = defaultdict(int)
        self.errors: dict[str, int] = defaultdict(int)
        self.connections = 0
        self.accepted = 0
        self.uploads = 0

    def record(self, bucket: str, method: str, status: int, received: int, sent: int) -> None:
        if method not in METHOD_LABELS:
            method = "other"
        self.requests[(bucket, method, str(status))] += 1
        self.received[bucket] += received
        self.sent[bucket] += sent
        if status >= 400:
            self.errors[bucket] += 1

    def render(self) -> str:
        out = [
            "# HELP vaultfs_requests_total HTTP requests by bucket, method and status.",
            "# TYPE vaultfs_requests_total counter",
        ]
        for (bucket, method, status), n in sorted(self.requests.items()):
            out.append(
                f'vaultfs_requests_total{{bucket="{bucket}",method="{method}",status="{status}"}} {n}'
            )
        for name, table, text in (
            ("vaultfs_received_bytes_total", self.received, "Request body bytes received."),
            ("vaultfs_sent_bytes_total", self.sent, "Response body bytes sent."),
            ("vaultfs_errors_total", self.errors, "Requests answered with status 400 or above."),
        ):
            out += [f"# HELP {name} {text} by bucket.", f"# TYPE {name} counter"]
            out += [f'{name}{{bucket="{b}"}} {n}' for b, n in sorted(table.items())]
        out += [
            "# HELP vaultfs_open_connections Client connections open now.",
            "# TYPE vaultfs_open_connections gauge",
            f"vaultfs_open_connections {self.connections}",
            "# HELP vaultfs_connections_total Client connections accepted.",
            "# TYPE vaultfs_connections_total counter",
            f"vaultfs_connections_total {self.accepted}",
            "# HELP vaultfs_uploads_in_progress Uploads being received now.",
            "# TYPE vaultfs_uploads_in_progress gauge",
            f"vaultfs_uploads_in_progress {self.uploads}",
            "# HELP vaultfs_start_time_seconds When the server started (Unix time).",
            "# TYPE vaultfs_start_time_seconds gauge",
            f"vaultfs_start_time_seconds {self.started:.3f}",
        ]
        return "\n".join(out) + "\n"


def log_access(
    address: str,
    user: str,
    method: str,
    target: str,
    status: int,
    sent: int,
    seconds: float,
    agent: str,
) -> None:
    """One line per request, close to the combined log format (plus the duration)."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    when = time.strftime("%d/%b/%Y:%H:%M:%S %z")
    access_log.info(
        '%s - %s [%s] "%s %s HTTP/1.1" %d %d "-" "%s" %.3f',
        _escape(address, _BARE_UNSAFE),
        _escape(user, _BARE_UNSAFE) or "-",
        when,
        _escape(method, _BARE_UNSAFE),
        _escape(target.replace('"', "%22"), _BARE_UNSAFE),
        status,
        sent,
        _escape(agent, _QUOTED_UNSAFE),
        seconds,
    )


def _escape(value: str, unsafe: re.Pattern[str]) -> str:
    return unsafe.sub(_hex, value)


def _hex(match: re.Match[str]) -> str:
    char = match[0]  # header values were decoded as latin-1: show their original byte
    data = char.encode("latin-1") if ord(char) < 256 else char.encode()
    return "".join(f"\\x{b:02x}" for b in data)
