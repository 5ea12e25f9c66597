"""vaultfs/_scrypt.c and crypto.scrypt_lanes: scrypt with its lanes in threads gives hashlib's bytes."""

from __future__ import annotations

import hashlib

import pytest

from vaultfs import crypto
from vaultfs._scrypt import romix


@pytest.mark.parametrize(
    ("n", "r", "p", "threads"),
    [
        (2, 1, 2, 2),
        (16, 1, 3, 2),
        (16, 8, 2, 1),
        (1024, 8, 3, 2),
        (1024, 2, 5, 3),
        (512, 8, 8, 2),
        (4096, 8, 4, 8),
    ],
)
def test_same_bytes_as_hashlib(n: int, r: int, p: int, threads: int) -> None:
    password, salt = b"pass\xc3\xa9 word", bytes(range(64))
    expected = hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=64, maxmem=1 << 30)
    assert crypto.scrypt_lanes(password, salt, n, r, p, threads) == expected


@pytest.mark.parametrize("p", [1, 4])
def test_restic_parameters(p: int) -> None:
    """N=2^15, r=8 and p=4 as restic writes, p=1 as vaultfs writes (the RFC's vectors use other
    sizes)."""
    salt = b"\x01" * 64
    expected = hashlib.scrypt(b"pw", salt=salt, n=32768, r=8, p=p, dklen=64, maxmem=1 << 30)
    assert crypto.scrypt(b"pw", salt, 32768, 8, p) == crypto.MasterKey.from_bytes(expected)


def test_rfc7914_vector() -> None:
    """RFC 7914 section 12, third vector (N=16384, r=8, p=1), through the lanes code."""
    got = crypto.scrypt_lanes(b"pleaseletmein", b"SodiumChloride", 16384, 8, 1)
    assert got.hex() == (
        "7023bdcb3afd7348461c06cd81fd38ebfda8fbba904f8e3ea9b543f6545da1f2"
        "d5432955613f0fcf62d49705242a9af9e61e85dc0d651e40dfcf017b45575887"
    )


@pytest.mark.parametrize(("size", "n", "r"), [(128, 3, 1), (128, 1, 1), (100, 4, 1), (0, 4, 1)])
def test_romix_refuses_bad_arguments(size: int, n: int, r: int) -> None:
    with pytest.raises(ValueError):
        romix(bytearray(size), n, r)


def test_romix_needs_a_writable_buffer() -> None:
    with pytest.raises(TypeError):
        romix(bytes(128), 4, 1)
