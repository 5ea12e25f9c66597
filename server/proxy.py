"""Who is the client: the peer address, or behind a trusted reverse proxy the left-most X-Forwarded-For
entry; and whether that address may talk to us (``allow``/``deny`` networks).

Trusting X-Forwarded-For is off by default: any client can send the header, so it is only meaningful
when a proxy in front *replaces* it with the address it saw (nginx ``$remote_addr``, HAProxy
``http-request set-header X-Forwarded-For %[src]``; not nginx ``$proxy_add_x_forwarded_for`` or HAProxy
``option forwardfor``, which append to what the client sent; see deploy/). A header that does not parse
as an address is ignored.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from vaultfs.server.config import Network


def client_address(peer: str, forwarded_for: str | None, trust: bool) -> str:
    """The address used for logs, rate limits and address lists."""
    if trust and forwarded_for:
        first = forwarded_for.split(",")[0].strip()
        if first.startswith("[") and "]" in first:
            first = first[1 : first.index("]")]
        try:
            return str(ipaddress.ip_address(first))
        except ValueError:
            pass
    return peer


class AddressFilter:
    """``deny`` wins over ``allow``; an empty ``allow`` allows every address not denied."""

    def __init__(self, allow: Sequence[Network], deny: Sequence[Network]) -> None:
        self.allow = list(allow)
        self.deny = list(deny)

    def permits(self, address: str) -> bool:
        if not self.allow and not self.deny:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return not self.allow
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in self.deny):
            return False
        return not self.allow or any(ip in net for net in self.allow)
