"""Authenticated encryption of vault objects and key derivation (FORMAT.md §2).

Sealed object layout::

    offset 0      16 bytes   nonce (the initial AES-CTR counter block, and the Poly1305-AES nonce)
    offset 16     n bytes    AES-256-CTR ciphertext of the n plaintext bytes
    offset 16+n   16 bytes   Poly1305 tag over the ciphertext only, with key clamp(r) || AES-128_k(nonce)

The master key is 64 bytes: 32 for AES-256 (``encrypt``), 16 for ``mac.k`` and 16 for ``mac.r``. Everything here
is pure computation (no I/O) and thread-safe; the AES work releases the GIL.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vaultfs.errors import FormatError, IntegrityError

try:
    from vaultfs.chunker import _blob

    NATIVE = _blob.available()
except ImportError:  # the C extension is not built: the pure-Python path does the same
    NATIVE = False

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext

NONCE_SIZE = 16
TAG_SIZE = 16
OVERHEAD = NONCE_SIZE + TAG_SIZE


@dataclass(frozen=True)
class MasterKey:
    """A restic "crypto key": AES-256 key plus the Poly1305-AES MAC key (k, r)."""

    encrypt: bytes
    mac_k: bytes
    mac_r: bytes

    def __post_init__(self) -> None:
        if len(self.encrypt) != 32 or len(self.mac_k) != 16 or len(self.mac_r) != 16:
            raise FormatError("master key has wrong sizes (need 32 + 16 + 16 bytes)")

    @classmethod
    def generate(cls) -> MasterKey:
        return cls(os.urandom(32), os.urandom(16), os.urandom(16))

    @classmethod
    def from_bytes(cls, raw: bytes) -> MasterKey:
        """From 64 bytes laid out as scrypt output: AES key, then k, then r."""
        if len(raw) != 64:
            raise FormatError("derived key must be 64 bytes")
        return cls(raw[:32], raw[32:48], raw[48:64])

    def valid(self) -> bool:
        return any(self.encrypt) and any(self.mac_k) and any(self.mac_r)

    def to_json(self) -> bytes:
        """The master key JSON restic stores inside a key file (Go []byte -> padded base64)."""

        def b64(raw: bytes) -> str:
            return base64.b64encode(raw).decode("ascii")

        doc = {"mac": {"k": b64(self.mac_k), "r": b64(self.mac_r)}, "encrypt": b64(self.encrypt)}
        return json.dumps(doc, separators=(",", ":")).encode("ascii")

    @classmethod
    def from_json(cls, raw: bytes) -> MasterKey:
        try:
            doc = json.loads(raw)
            key = cls(
                base64.b64decode(doc["encrypt"], validate=True),
                base64.b64decode(doc["mac"]["k"], validate=True),
                base64.b64decode(doc["mac"]["r"], validate=True),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"master key JSON is invalid ({exc})") from None
        if not key.valid():
            raise FormatError("master key is all zero")
        return key

    # -- sealing -------------------------------------------------------------------------------

    def _tag(self, nonce: bytes, ciphertext: bytes | memoryview) -> bytes:
        from cryptography.hazmat.primitives.poly1305 import Poly1305

        enc = _aes(self.mac_k).encryptor()
        s = enc.update(nonce) + enc.finalize()
        # cryptography's Poly1305 clamps r itself, as restic's readers must.
        return Poly1305.generate_tag(self.mac_r + s, ciphertext)

    def seal(self, plaintext: bytes | bytearray | memoryview) -> bytes:
        """Encrypt and authenticate: nonce || ciphertext || tag."""
        if NATIVE:
            sealed = bytearray(len(plaintext) + OVERHEAD)
            _blob.seal_into(self.raw, sealed, plaintext)
            return bytes(sealed)
        nonce = os.urandom(NONCE_SIZE)
        while not any(nonce):  # restic rejects a zero nonce
            nonce = os.urandom(NONCE_SIZE)
        n = len(plaintext)
        out = bytearray(NONCE_SIZE + n + TAG_SIZE + 15)
        out[:NONCE_SIZE] = nonce
        view = memoryview(out)
        enc = _aes(self.encrypt, nonce).encryptor()
        # update_into a preallocated buffer releases the GIL; update() would allocate with it held.
        enc.update_into(plaintext, view[NONCE_SIZE : NONCE_SIZE + n + 15])
        tag = self._tag(nonce, view[NONCE_SIZE : NONCE_SIZE + n])
        view[NONCE_SIZE + n : NONCE_SIZE + n + TAG_SIZE] = tag
        sealed = bytes(view[: NONCE_SIZE + n + TAG_SIZE])
        view.release()
        return sealed

    @property
    def raw(self) -> bytes:
        """The 64 key bytes: encrypt || mac.k || mac.r."""
        return self.encrypt + self.mac_k + self.mac_r

    def seal_into(
        self, out: bytearray | memoryview, plaintext: bytes | bytearray | memoryview
    ) -> None:
        """``seal`` straight into ``out``, which must be exactly ``len(plaintext) + 32`` bytes and
        must not overlap ``plaintext``: no allocation, one GIL-free call when the C part is there."""
        if NATIVE:
            _blob.seal_into(self.raw, out, plaintext)
            return
        if len(out) != len(plaintext) + OVERHEAD:
            raise ValueError("out must be exactly len(plaintext) + 32 bytes")
        out[:] = self.seal(plaintext)

    def open_into(
        self,
        out: bytearray | memoryview,
        sealed: bytes | bytearray | memoryview,
        what: str = "object",
    ) -> None:
        """``open`` straight into ``out`` (exactly ``len(sealed) - 32`` bytes, not overlapping
        ``sealed``). Raises as ``open`` does; ``out`` is unspecified after a failure."""
        if len(sealed) < OVERHEAD:
            raise FormatError(f"{what} is too short to be encrypted data ({len(sealed)} bytes)")
        if not NATIVE:
            out[:] = self.open(sealed, what)
        elif not _blob.open_into(self.raw, out, sealed):
            raise IntegrityError(f"{what} failed authentication (corrupt data or wrong key)")

    def open(self, sealed: bytes | bytearray | memoryview, what: str = "object") -> bytes:
        """Check the tag, then decrypt. Raises IntegrityError on a bad tag, FormatError when too short."""
        n = len(sealed) - OVERHEAD
        if n < 0:
            raise FormatError(f"{what} is too short to be encrypted data ({len(sealed)} bytes)")
        if NATIVE:
            plain = bytearray(n)
            if not _blob.open_into(self.raw, plain, sealed):
                raise IntegrityError(f"{what} failed authentication (corrupt data or wrong key)")
            return bytes(plain)
        view = memoryview(sealed)
        nonce = bytes(view[:NONCE_SIZE])
        ciphertext = view[NONCE_SIZE : NONCE_SIZE + n]
        expected = self._tag(nonce, ciphertext)
        if not hmac.compare_digest(expected, bytes(view[NONCE_SIZE + n :])):
            raise IntegrityError(f"{what} failed authentication (corrupt data or wrong key)")
        out = bytearray(n + 15)
        dec = _aes(self.encrypt, nonce).decryptor()
        dec.update_into(ciphertext, out)
        del out[n:]
        return bytes(out)

    def open_parts(
        self, sealed: bytes | bytearray | memoryview, what: str = "object"
    ) -> tuple[memoryview, CipherContext]:
        """Check the tag of ``sealed``, then return its ciphertext (a view into ``sealed``) and the
        AES-CTR context that decrypts it: callers decrypt in pieces of their choice and never hold a
        second whole copy (the FUSE mount streams large blobs into zstd this way). Raises as ``open``.
        """
        if len(sealed) < OVERHEAD:
            raise FormatError(f"{what} is too short to be encrypted data ({len(sealed)} bytes)")
        view = memoryview(sealed)
        nonce, body, tag = bytes(view[:NONCE_SIZE]), view[NONCE_SIZE:-TAG_SIZE], view[-TAG_SIZE:]
        if not hmac.compare_digest(self._tag(nonce, body), bytes(tag)):
            raise IntegrityError(f"{what} failed authentication (corrupt data or wrong key)")
        return body, _aes(self.encrypt, nonce).decryptor()


def _aes(key: bytes, nonce: bytes | None = None) -> Cipher:
    """cryptography's AES, in CTR mode from ``nonce`` or else ECB. Imported on first use: with the C
    part, opening and sealing need no cryptography at all, and its import alone costs ~7 MB."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    return Cipher(algorithms.AES(key), modes.ECB() if nonce is None else modes.CTR(nonce))


def scrypt(password: bytes, salt: bytes, n: int, r: int, p: int) -> MasterKey:
    """Derive the 64-byte user key of a key file (scrypt) and split it 32/16/16."""
    if n <= 1 or n & (n - 1) or r < 1 or p < 1 or r * p >= 1 << 30:
        raise FormatError(f"invalid scrypt parameters N={n} r={r} p={p}")
    # The C ROMix also for p = 1 (vaultfs's own key files): about 20% less CPU than OpenSSL's.
    if 128 * r * n <= SCRYPT_LANE_LIMIT and _have_romix():
        return MasterKey.from_bytes(scrypt_lanes(password, salt, n, r, p))
    maxmem = 128 * r * (n + p + 2) + (1 << 20)
    raw = hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=64)
    return MasterKey.from_bytes(raw)


def _have_romix() -> bool:
    try:
        import vaultfs._scrypt  # noqa: F401  (a C extension: absent when vaultfs was not built)
    except ImportError:
        return False
    return True


#: Memory one lane of scrypt_lanes may take (restic's key files: N=2^15, r=8 -> 32 MiB).
SCRYPT_LANE_LIMIT = 256 << 20


def scrypt_lanes(
    password: bytes, salt: bytes, n: int, r: int, p: int, threads: int | None = None
) -> bytes:
    """scrypt(password, salt, N=n, r, p, dkLen=64) with its p lanes spread over ``threads`` threads
    (default: one per CPU this process may use, at most p). The same bytes as hashlib.scrypt, which
    runs the lanes one after the other: restic's key files have p > 1 (p = 8 on a fast machine), so
    on two cores opening a vault takes about half the time. Each thread holds 128*r*n bytes.
    Parameters must be valid already (scrypt() checks them)."""
    from vaultfs._scrypt import romix

    lane = 128 * r
    expanded = bytearray(hashlib.pbkdf2_hmac("sha256", password, salt, 1, p * lane))
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    threads = max(1, min(p, threads))
    per = -(-p // threads)
    view = memoryview(expanded)
    parts = [view[i * lane : min(p, i + per) * lane] for i in range(0, p, per)]
    if len(parts) == 1:
        romix(parts[0], n, r)
    else:
        with ThreadPoolExecutor(len(parts) - 1) as pool:
            others = [pool.submit(romix, part, n, r) for part in parts[1:]]
            romix(parts[0], n, r)
            for job in others:
                job.result()
    for part in parts:
        part.release()
    view.release()
    return hashlib.pbkdf2_hmac("sha256", password, bytes(expanded), 1, 64)


def sha256(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(data).digest()
