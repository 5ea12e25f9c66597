"""Bucket credentials: PSK generation and hashing, and the request-time check with cache and throttling.

A bucket is opened by HTTP Basic auth with user = bucket name and password = the bucket's 128-bit PSK in
hex (ARCHITECTURE.md, "Bucket credentials"). The server stores only bcrypt(sha512(PSK)): the raw 64-byte
digest is bcrypt's input (bcrypt 5 refuses more than 72 bytes; 64 raw bytes, NULs included, are accepted).

bcrypt is slow on purpose (~0.2 s at cost 12), so:

* a successful check is remembered for ``cache_seconds`` under SHA-256(bucket, password, stored hash), so
  a changed PSK or a deleted bucket invalidates it at once and the cache never holds a password;
* bcrypt runs in worker threads behind a small CapacityLimiter, so a flood of wrong passwords cannot take
  the server's threads;
* every wrong answer from one client address makes that address wait longer before its next 401
  (exponential, capped), which slows guessing without locking out a bucket's owner elsewhere.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
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


class Authenticator:
    """Decides whether a request may use a bucket. Lives in the server's trio thread."""

    max_delay = 5.0
    forget_after = 900.0  # seconds after which an address's failures are forgotten

    def __init__(self, registry: BucketRegistry, cache_seconds: float = 60.0) -> None:
        self.registry = registry
        self.cache_seconds = cache_seconds
        self._ok: dict[bytes, float] = {}
        self._failures: dict[str, tuple[int, float]] = {}
        self._limiter = trio.CapacityLimiter(2)

    def _cache_key(self, bucket: Bucket, password: str) -> bytes:
        return hashlib.sha256(
            b"\0".join([bucket.name.encode(), password.encode(), bucket.psk_hash])
        ).digest()

    async def check(self, bucket_name: str, header: str | None, address: str) -> Bucket | None:
        """The bucket if ``header`` carries its name and PSK; else None (after the address's delay)."""
        creds = parse_basic(header)
        bucket = None
        ok = False
        if creds is not None and hmac.compare_digest(creds[0], bucket_name):
            bucket = self.registry.get(bucket_name)
            if bucket is not None:
                ok = await self._verify(bucket, creds[1])
        if ok:
            self._failures.pop(address, None)
            return bucket
        if creds is not None:  # no header at all is a client asking what to send, not a guess
            await self._penalise(address)
        return None

    async def _verify(self, bucket: Bucket, password: str) -> bool:
        key = self._cache_key(bucket, password)
        now = time.monotonic()
        expiry = self._ok.get(key)
        if expiry is not None and expiry > now:
            return True
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
            if len(self._ok) > 10_000:
                self._ok = {k: v for k, v in self._ok.items() if v > now}
            self._ok[key] = now + self.cache_seconds
        return ok

    def failures(self, address: str) -> int:
        count, last = self._failures.get(address, (0, 0.0))
        return 0 if time.monotonic() - last > self.forget_after else count

    async def _penalise(self, address: str) -> None:
        count = self.failures(address) + 1
        if len(self._failures) > 100_000:
            self._failures.clear()
        self._failures[address] = (count, time.monotonic())
        if count > 1:
            await trio.sleep(min(self.max_delay, 0.05 * 2 ** (count - 2)))
