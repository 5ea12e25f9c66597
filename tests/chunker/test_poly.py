"""Tests for vaultfs.chunker.poly: restic's own polynomials, reducible ones, parsing and drawing."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers.restic import Restic
from vaultfs.chunker import poly
from vaultfs.errors import FormatError

# Irreducible polynomials of small degree, from the standard tables (x^8+x^4+x^3+x+1 is AES's).
SMALL_IRREDUCIBLE = [0b111, 0b1011, 0b1101, 0b10011, 0x11B, 0x11D]
RESTIC_TEST_POL = 0x3DA3358B4DC173


def slow_is_irreducible(p: int) -> bool:
    """Trial division by every polynomial of degree 1 .. deg(p) // 2 (tiny degrees only)."""
    k = poly.degree(p)
    if k < 1:
        return True
    return all(poly.mod(p, q) != 0 for q in range(2, 1 << (k // 2 + 1)))


@pytest.mark.restic
@pytest.mark.slow
def test_restic_config_polynomials_are_irreducible(tmp_path) -> None:
    def init(i: int) -> str:
        restic = Restic(tmp_path / f"repo{i}", "x")
        restic.init()
        return json.loads(restic.cat("config"))["chunker_polynomial"]

    # each init is ~2 s of key derivation: run them side by side
    with ThreadPoolExecutor(3) as pool:
        texts = list(pool.map(init, range(3)))
    assert len(set(texts)) == 3
    for text in texts:
        p = poly.parse_polynomial(text)
        assert poly.degree(p) == 53
        assert poly.is_irreducible(p)
        assert poly.format_polynomial(p) == text


def test_known_irreducible() -> None:
    assert poly.check_polynomial(RESTIC_TEST_POL) == RESTIC_TEST_POL
    for p in SMALL_IRREDUCIBLE:
        assert poly.is_irreducible(p), bin(p)


def test_matches_trial_division_for_small_degrees() -> None:
    for p in range(2, 1 << 11):
        assert poly.is_irreducible(p) == slow_is_irreducible(p), bin(p)


@settings(max_examples=200, deadline=None)
@given(a=st.integers(2, 2**27 - 1), b=st.integers(2, 2**27 - 1))
def test_products_are_reducible(a, b) -> None:
    product = poly._clmul(a, b)
    assert poly.degree(product) == poly.degree(a) + poly.degree(b)
    assert not poly.is_irreducible(product)
    if poly.MIN_DEGREE <= poly.degree(product) <= poly.MAX_DEGREE:
        with pytest.raises(FormatError, match="not irreducible"):
            poly.check_polynomial(product)


def _irreducible_of_degree(k: int, seed: int) -> int:
    rng = random.Random(seed)
    while True:
        p = rng.getrandbits(k) | 1 << k | 1
        if poly.is_irreducible(p):
            return p


@pytest.mark.parametrize(
    "p",
    [
        1 << 53 | 1,  # an even number of terms: divisible by x + 1
        1 << 53 | 1 << 7,  # no constant term: divisible by x
        RESTIC_TEST_POL ^ 1,
        poly._clmul(0b111, _irreducible_of_degree(51, 1)),  # one small factor
        poly._clmul(_irreducible_of_degree(26, 2), _irreducible_of_degree(27, 3)),  # two large ones
        poly._clmul(_irreducible_of_degree(13, 4), _irreducible_of_degree(40, 5)),
    ],
)
def test_reducible_degree_53(p) -> None:
    assert poly.degree(p) == 53
    assert not poly.is_irreducible(p)
    with pytest.raises(FormatError, match="not irreducible"):
        poly.check_polynomial(p)


def test_gcd_and_mulmod() -> None:
    a, b = 0b1011, 0b111
    assert poly.gcd(poly._clmul(a, b), poly._clmul(a, 0b11)) == a
    assert poly.mulmod(0b10, 0b10, 0b111) == 0b11  # x*x = x + 1 mod x^2+x+1
    with pytest.raises(ZeroDivisionError):
        poly.mod(5, 0)


def test_random_polynomial() -> None:
    rng = random.Random(1)
    seen = set()
    for _ in range(20):
        p = poly.random_polynomial(rng.randbytes)
        assert poly.degree(p) == 53
        assert p & 1
        assert poly.is_irreducible(p)
        assert poly.check_polynomial(p) == p
        seen.add(p)
    assert len(seen) == 20
    p = poly.random_polynomial()  # the OS CSPRNG
    assert poly.degree(p) == 53 and poly.is_irreducible(p)


def test_random_polynomial_is_deterministic_given_the_source() -> None:
    assert poly.random_polynomial(random.Random(7).randbytes) == poly.random_polynomial(
        random.Random(7).randbytes
    )


def test_random_polynomial_uses_the_bytes_as_restic_does() -> None:
    """The first draw is 8 little-endian bytes masked to bits 0..52 plus bits 53 and 0."""
    draws = iter([bytes(8), RESTIC_TEST_POL.to_bytes(8, "little")])
    # the all-zero draw becomes x^53 + 1, reducible, so the second draw is used as is
    assert poly.random_polynomial(lambda n: next(draws)) == RESTIC_TEST_POL
    high = (RESTIC_TEST_POL | 0xFFC0 << 48).to_bytes(8, "little")
    assert poly.random_polynomial(lambda n: high) == RESTIC_TEST_POL


@pytest.mark.parametrize(
    ("text", "value"),
    [("3da3358b4dc173", RESTIC_TEST_POL), ("3DA3358B4DC173", RESTIC_TEST_POL), ("0011b", 0x11B)],
)
def test_parse(text, value) -> None:
    assert poly.parse_polynomial(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0x3da3358b4dc173",
        "+3da3358b4dc173",
        "3da3_358b4dc173",
        " 3da3358b4dc173",
        "3da3358b4dc17g",
        "1" + "0" * 16,  # 17 digits: more than 64 bits
        "0",
        "1",
        "7",  # irreducible but degree 2
        "20000000000001",  # degree 53, reducible
        "60000000000001",  # degree 54
        "٣",  # a non-ASCII digit that int() would take
    ],
)
def test_parse_rejects(text) -> None:
    with pytest.raises(FormatError):
        poly.parse_polynomial(text)


def test_parse_rejects_non_strings() -> None:
    with pytest.raises(FormatError):
        poly.parse_polynomial(RESTIC_TEST_POL)  # type: ignore[arg-type]


def test_format() -> None:
    assert poly.format_polynomial(RESTIC_TEST_POL) == "3da3358b4dc173"
    assert poly.format_polynomial(0x11B) == "11b"
    for bad in (-1, 1 << 64):
        with pytest.raises(ValueError):
            poly.format_polynomial(bad)
