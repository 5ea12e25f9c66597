"""Polynomials over GF(2) for the Rabin chunker: parse, check, draw and format (FORMAT.md §9).

A polynomial is a Python ``int`` whose bit ``i`` is the coefficient of ``x**i``; restic stores it in the
vault config as ``"chunker_polynomial"``, lowercase hex without ``0x`` or padding, e.g. ``"3da3358b4dc173"``.

Every vault restic creates uses a random *irreducible* polynomial of degree 53: 64 random bits, masked to
bits 0..53, with bits 53 and 0 forced on, redrawn until irreducible. Irreducibility is checked with Ben-Or's
test: ``P`` of degree ``k`` is irreducible iff ``gcd(P, x**(2**i) - x mod P) == 1`` for ``i = 1 .. k // 2``.

The chunker needs ``8 <= degree <= 53``: the top byte of a digest indexes the reduction table, and
``mod[b] = (b * x**k mod P) | b * x**k`` must fit in 64 bits. restic's own chunker refuses degrees above 53.

All functions are pure and thread-safe.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from vaultfs.errors import FormatError

__all__ = [
    "MAX_DEGREE",
    "MIN_DEGREE",
    "RANDOM_DEGREE",
    "check_polynomial",
    "degree",
    "format_polynomial",
    "gcd",
    "is_irreducible",
    "mod",
    "mulmod",
    "parse_polynomial",
    "random_polynomial",
]

RANDOM_DEGREE = 53
MIN_DEGREE = 8
MAX_DEGREE = 53

_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
# restic gives up after this many draws; the chance of getting here is about (52/53) ** 1e6.
_MAX_TRIES = 1_000_000


def degree(p: int) -> int:
    """Degree of ``p`` (index of its highest set bit); -1 for the zero polynomial."""
    return p.bit_length() - 1


def mod(a: int, p: int) -> int:
    """``a mod p`` over GF(2). ``p`` must not be zero."""
    if p == 0:
        raise ZeroDivisionError("polynomial modulo zero")
    dp = p.bit_length()
    while (da := a.bit_length()) >= dp:
        a ^= p << (da - dp)
    return a


def _clmul(a: int, b: int) -> int:
    """Carry-less product of ``a`` and ``b`` (polynomial multiplication over GF(2))."""
    result = 0
    while b:
        low = b & -b
        result ^= a << (low.bit_length() - 1)
        b ^= low
    return result


def mulmod(a: int, b: int, p: int) -> int:
    """``a * b mod p`` over GF(2)."""
    return mod(_clmul(a, b), p)


def gcd(a: int, b: int) -> int:
    """Greatest common divisor over GF(2)."""
    while b:
        a, b = b, mod(a, b)
    return a


def is_irreducible(p: int) -> bool:
    """Whether ``p`` has no factor of lower positive degree (Ben-Or's test, as restic runs it).

    Degree 0 and -1 count as irreducible here, as in restic; :func:`check_polynomial` rejects them by
    degree.
    """
    k = degree(p)
    x_pow = 2  # x ** (2 ** i) mod p, squared once per step so the whole test costs k/2 squarings
    for _ in range(k // 2):
        x_pow = mulmod(x_pow, x_pow, p)
        if gcd(p, mod(x_pow ^ 2, p)) != 1:
            return False
    return True


def check_polynomial(p: int) -> int:
    """Return ``p`` if the chunker can use it, else raise :class:`FormatError` saying why."""
    k = degree(p)
    if not MIN_DEGREE <= k <= MAX_DEGREE:
        raise FormatError(
            f"chunker polynomial {p:x} has degree {k}, expected {MIN_DEGREE}..{MAX_DEGREE} "
            f"(restic uses {RANDOM_DEGREE}); the vault config is damaged"
        )
    if not is_irreducible(p):
        raise FormatError(
            f"chunker polynomial {p:x} is not irreducible; the vault config is damaged"
        )
    return p


def parse_polynomial(text: str) -> int:
    """Parse the config's hex ``chunker_polynomial`` and check it (:func:`check_polynomial`).

    Accepts what restic's JSON decoder accepts: 1 to 16 hex digits in either case, no prefix, sign or
    underscores. Raises :class:`FormatError` for anything else.
    """
    if not isinstance(text, str):
        raise FormatError(f"chunker polynomial must be a hex string, got {type(text).__name__}")
    if not text or len(text) > 16 or not _HEX_DIGITS.issuperset(text):
        raise FormatError(f"chunker polynomial {text!r} is not 1 to 16 hex digits")
    return check_polynomial(int(text, 16))


def format_polynomial(p: int) -> str:
    """restic's JSON form of ``p``: lowercase hex, no prefix, no padding."""
    if p < 0 or p >= 1 << 64:
        raise ValueError(f"polynomial out of range: {p}")
    return f"{p:x}"


def random_polynomial(randbytes: Callable[[int], bytes] = os.urandom) -> int:
    """Draw a random irreducible polynomial of degree 53 the way restic does.

    Each try reads 8 bytes from ``randbytes`` as a little-endian integer, keeps bits 0..52, sets bits 53
    and 0, and keeps the first irreducible result. About 1 in 27 tries succeeds (bit 0 set already
    removes the factor x). ``randbytes`` defaults to the OS CSPRNG; pass a seeded source in tests.
    """
    low_bits = (1 << RANDOM_DEGREE) - 1
    for _ in range(_MAX_TRIES):
        p = int.from_bytes(randbytes(8), "little")
        p = (p & low_bits) | (1 << RANDOM_DEGREE) | 1
        if is_irreducible(p):
            return p
    raise RuntimeError("no irreducible polynomial found; the random source is broken")
