"""Bucket credentials: PSK generation and hashing, and the request-time check with cache and throttling.

A bucket is opened by HTTP Basic auth with user = bucket name and password = the bucket's 128-bit PSK in
hex (ARCHITECTURE.md, "Bucket credentials"). The server stores only bcrypt(sha512(PSK)), PSK being the 16
raw bytes the hex password spells: the raw 64-byte digest is bcrypt's input (bcrypt 5 refuses more than
72 bytes; 64 raw bytes, NULs included, are accepted).

bcrypt is slow on purpose (~0.2 s at cost 12), so:

* a successful check is remembered for ``cache_seconds`` under SHA-256(bucket, password, stored hash), so
  a changed PSK or a deleted bucket invalidates it as soon as the registry re-reads the row (at most
  ``BucketRegistry.ttl`` later) and the cache never holds a password. A remembered login is answered
  at once: no other check, no address's failures, delay it;
* bcrypt runs in worker threads behind a small CapacityLimiter, so a flood of wrong passwords cannot take
  the server's threads;
* any other check (bcrypt, or a refusal without it: unknown bucket, malformed PSK) runs one at a time per
  client address, an IPv6 address counting as its /64 (see ``throttle_key``). After ``n`` failures an
  address waits ``delay(n)`` (0.05 s doubling per failure,
  capped at ``max_delay``) *before* its next check, so guessing is slowed however many connections it
  opens, and a waiting guesser holds no bcrypt thread. While an address has failures, a check that
  arrives (or was queued) while another of its checks runs is refused at once with TooManyAttempts (HTTP
  429, Retry-After), so it cannot pile up connections either. A check with the right PSK clears the
  address's failures; they are forgotten after ``forget_after`` seconds anyway. The table of failures is
  bounded: when it fills, the forgotten entries go first, then those with the fewest failures, so a
  flood of fresh addresses cannot wipe a persistent guesser's count. Parallel first requests
  of one client with the right PSK queue behind the first and are then answered from the cache.

Without a header at all the answer is an immediate 401: that is a client asking what to send, not a guess.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import ipaddress
import math
import secrets
import time

import bcrypt
import trio

from vaultfs.server.state import Bucket, BucketRegistry

PSK_BYTES = 16


def new_psk() -> bytes:
    return secrets.token_bytes(PSK_BYTES)


def hash_psk(psk: bytes, rounds: int = 12) -> bytes:
    return bcrypt.hashpw(hashlib.sha512(psk).digest(), bcrypt.gensalt(rounds))


def check_psk_sync(psk: bytes, psk_hash: bytes) -> bool:
    try:
        return bcrypt.checkpw(hashlib.sha512(psk).digest(), psk_hash)
    except ValueError:
        return False  # a damaged hash in the state opens nothing


def parse_basic(header: str | None) -> tuple[str, str] | None:
    """(user, password) of an ``Authorization: Basic`` header; None if absent or malformed."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep:
        return None
    return user, password


def throttle_key(address: str) -> str:
    """The unit the login throttle counts failures for: an IPv4 address itself (also when written as
    IPv4-mapped IPv6), an IPv6 address's /64, since one host or home is usually given a whole /64 and
    could otherwise make every guess from a fresh address. Anything else (not an IP address) as is."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class TooManyAttempts(Exception):
    """An address with recent failures sent a check while another of its checks was running."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many attempts: retry after {retry_after} s")
        self.retry_after = retry_after


class Authenticator:
    """Decides whether a request may use a bucket. Lives in the server's trio thread (not thread-safe)."""

    first_delay = 0.05
    max_delay = 5.0
    forget_after = 900.0  # seconds after which an address's failures are forgotten
    max_tracked = 100_000  # addresses with failures kept at most (see _make_room)

    def __init__(self, registry: BucketRegistry, cache_seconds: float = 60.0) -> None:
        self.registry = registry
        self.cache_seconds = cache_seconds
        self._ok: dict[bytes, float] = {}
        self._failures: dict[str, tuple[int, float]] = {}
        self._gates: dict[str, trio.Lock] = {}  # one uncached check at a time per address
        self._limiter = trio.CapacityLimiter(2)

    @classmethod
    def delay(cls, failures: int) -> float:
        """Seconds an address with ``failures`` recent failures waits before its next check."""
        if failures <= 0:
            return 0.0
        return min(cls.max_delay, cls.first_delay * 2 ** min(failures - 1, 32))

    def failures(self, address: str) -> int:
        """Recent failed checks from ``address`` (0 once forgotten or after a successful check); for
        IPv6, from its /64."""
        count, last = self._failures.get(throttle_key(address), (0, 0.0))
        return 0 if time.monotonic() - last > self.forget_after else count

    async def check(self, bucket_name: str, header: str | None, address: str) -> Bucket | None:
        """The bucket if ``header`` carries its name and PSK, else None.

        Raises TooManyAttempts when ``address`` has failures and another of its checks is running.
        """
        creds = parse_basic(header)
        if creds is None:
            return None
        user, password = creds
        bucket = None
        if hmac.compare_digest(user.encode(), bucket_name.encode()):
            bucket = self.registry.get(bucket_name)
        if bucket is not None and self._cached(bucket, password):
            return bucket
        address = throttle_key(address)
        gate = self._gates.setdefault(address, trio.Lock())
        try:
            queued = gate.locked()
            if queued and self.failures(address):
                raise self._too_many(address)
            async with gate:
                if bucket is not None and self._cached(bucket, password):
                    return bucket  # a parallel request of the same client has just checked it
                failures = self.failures(address)
                if failures and queued:
                    raise self._too_many(address)
                if failures:
                    await trio.sleep(self.delay(failures))
                if bucket is not None and await self._verify(bucket, password):
                    self._failures.pop(address, None)
                    return bucket
                if address not in self._failures and len(self._failures) >= self.max_tracked:
                    self._make_room()
                self._failures[address] = (failures + 1, time.monotonic())
                return None
        finally:
            if not gate.locked() and not gate.statistics().tasks_waiting:
                self._gates.pop(address, None)

    def _make_room(self) -> None:
        """Shrink the full table of failures to at most half: the forgotten entries go, then those
        with the fewest failures (the oldest first among equals)."""
        now = time.monotonic()
        live = {a: f for a, f in self._failures.items() if now - f[1] <= self.forget_after}
        if len(live) > self.max_tracked // 2:
            kept = heapq.nlargest(self.max_tracked // 2, live.items(), key=lambda item: item[1])
            live = dict(kept)
        self._failures = live

    def _too_many(self, address: str) -> TooManyAttempts:
        return TooManyAttempts(max(1, math.ceil(self.delay(self.failures(address)))))

    def _cache_key(self, bucket: Bucket, password: str) -> bytes:
        return hashlib.sha256(
            b"\0".join([bucket.name.encode(), password.encode(), bucket.psk_hash])
        ).digest()

    def _cached(self, bucket: Bucket, password: str) -> bool:
        expiry = self._ok.get(self._cache_key(bucket, password))
        return expiry is not None and expiry > time.monotonic()

    async def _verify(self, bucket: Bucket, password: str) -> bool:
        """Whether ``password`` is the hex PSK of ``bucket`` (bcrypt in a worker thread); remembered."""
        try:
            psk = bytes.fromhex(password)
        except ValueError:
            return False
        if len(psk) != PSK_BYTES:
            return False
        ok = await trio.to_thread.run_sync(
            check_psk_sync, psk, bucket.psk_hash, limiter=self._limiter
        )
        if ok:
            now = time.monotonic()
            if len(self._ok) > 10_000:
                self._ok = {k: v for k, v in self._ok.items() if v > now}
            self._ok[self._cache_key(bucket, password)] = now + self.cache_seconds
        return ok
