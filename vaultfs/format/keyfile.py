"""Key files (FORMAT.md §2.3): ``keys/<id>``, plain JSON; only ``data`` is encrypted, with the scrypt user key.

    {"created":"<RFC3339Nano>","username":"u","hostname":"h","kdf":"scrypt","N":32768,"r":8,"p":1,
     "salt":"<base64 of 64 bytes>","data":"<base64 of nonce || AES-CTR(master key JSON) || tag>"}

The key file ID is the SHA-256 of the file bytes. Writing uses Go json.Marshal's field order, no newline.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass

from vaultfs.crypto import MasterKey, scrypt
from vaultfs.errors import FormatError, IntegrityError, WrongPassword
from vaultfs.format.gojson import GoTime, json_string

# restic calibrates p by timing; N=2^15, r=8 are what it always lands on here. p=1 keeps opening fast.
DEFAULT_N = 32768
DEFAULT_R = 8
DEFAULT_P = 1


@dataclass(frozen=True)
class KeyFile:
    created: str
    username: str
    hostname: str
    n: int
    r: int
    p: int
    salt: bytes
    data: bytes

    @classmethod
    def create(
        cls,
        master: MasterKey,
        password: bytes,
        *,
        username: str,
        hostname: str,
        n: int = DEFAULT_N,
        r: int = DEFAULT_R,
        p: int = DEFAULT_P,
    ) -> KeyFile:
        salt = os.urandom(64)
        user_key = scrypt(password, salt, n, r, p)
        return cls(
            GoTime.now().format(),
            username,
            hostname,
            n,
            r,
            p,
            salt,
            user_key.seal(master.to_json()),
        )

    def encode(self) -> bytes:
        b64 = base64.b64encode
        return (
            f'{{"created":{json_string(self.created)},"username":{json_string(self.username)},'
            f'"hostname":{json_string(self.hostname)},"kdf":"scrypt","N":{self.n},"r":{self.r},'
            f'"p":{self.p},"salt":"{b64(self.salt).decode()}","data":"{b64(self.data).decode()}"}}'
        ).encode()

    @classmethod
    def decode(cls, raw: bytes, name: str = "key file") -> KeyFile:
        try:
            doc = json.loads(raw)
            if doc.get("kdf") != "scrypt":
                raise FormatError(f"{name} uses unsupported KDF {doc.get('kdf')!r}")
            key = cls(
                str(doc.get("created", "")),
                str(doc.get("username", "")),
                str(doc.get("hostname", "")),
                int(doc["N"]),
                int(doc["r"]),
                int(doc["p"]),
                base64.b64decode(doc["salt"], validate=True),
                base64.b64decode(doc["data"], validate=True),
            )
        except FormatError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FormatError(f"{name} is not a valid key file ({exc})") from None
        if len(key.salt) != 64:
            raise FormatError(f"{name} has a salt of {len(key.salt)} bytes (need 64)")
        return key

    def open(self, password: bytes, name: str = "key file") -> MasterKey:
        """Unlock the master key. Raises WrongPassword when the password does not fit this key file."""
        user_key = scrypt(password, self.salt, self.n, self.r, self.p)
        try:
            plain = user_key.open(self.data, what=name)
        except IntegrityError:
            raise WrongPassword(f"wrong password for {name}") from None
        return MasterKey.from_json(plain)
