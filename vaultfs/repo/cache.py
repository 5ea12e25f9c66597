"""The local cache of a vault: pack headers and whole tree packs, so repeated runs do not download them again.

Layout, under ``$XDG_CACHE_HOME/vaultfs/<vault id>/`` (``~/.cache`` when XDG_CACHE_HOME is unset)::

    data/<id[0:2]>/<pack id>      a whole pack file as stored in the vault (tree packs)
    headers/<id[0:2]>/<pack id>   msgpack {"size": pack size, "tail": sealed header + length field,
                                  "sha256": SHA-256 of tail}

Everything is validated when it is read: a cached pack must hash to its name (the same check as in the
vault), a cached header must match its recorded checksum and the pack size the caller sees in the vault
(and it stays sealed, so decrypting it checks its MAC as well). Anything that fails is deleted and
reported as a miss. The cache is an accelerator only: deleting it at any time is safe, and a cache that
cannot be written (read-only home, full disk) just stays cold. Writes are atomic (temp file, rename).

The parent folder carries a CACHEDIR.TAG so backup tools skip it. Thread-safe: every call works on its
own file.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Iterable

import msgpack

_NAME = re.compile(r"[0-9a-f]{64}\Z")
_TAG = (
    b"Signature: 8a477f597d28d172789f06886806bc55\n"
    b"# This file marks the vaultfs cache; backup tools skip this folder.\n"
)


def cache_home() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vaultfs")


class VaultCache:
    """The cache folder of one vault (by its config id)."""

    def __init__(self, vault_id: str, root: str | None = None) -> None:
        if not _NAME.match(vault_id):
            raise ValueError("a vault id is 64 hex characters")
        self.top = root or cache_home()
        self.root = os.path.join(self.top, vault_id)

    @classmethod
    def of(cls, vault_id: str) -> VaultCache | None:
        """The cache of a vault, or None when its config id cannot name a folder (restic writes 64 hex
        digits, but the config format takes any string): such a vault is read without a cache."""
        return cls(vault_id) if _NAME.match(vault_id) else None

    # -- files ----------------------------------------------------------------------------------

    def _path(self, kind: str, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError(f"invalid object name {name!r}")
        return os.path.join(self.root, kind, name[:2], name)

    def _read(self, path: str) -> bytes | None:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError:
            return None

    def _write(self, path: str, data: bytes) -> bool:
        folder = os.path.dirname(path)
        tmp = f"{path}-tmp-{secrets.token_hex(6)}"
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            self._tag()
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            return True
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return False

    def _tag(self) -> None:
        tag = os.path.join(self.top, "CACHEDIR.TAG")
        if not os.path.exists(tag):
            with open(tag, "wb") as f:
                f.write(_TAG)

    def _drop(self, path: str) -> None:
        try:
            os.unlink(path)
        except OSError:
            pass

    # -- whole objects --------------------------------------------------------------------------

    def load_pack(self, pack_id: str) -> bytes | None:
        """The cached pack file, or None when absent or damaged (a damaged one is deleted)."""
        path = self._path("data", pack_id)
        data = self._read(path)
        if data is None:
            return None
        if hashlib.sha256(data).hexdigest() != pack_id:
            self._drop(path)
            return None
        return data

    def save_pack(self, pack_id: str, data: bytes, checked: bool = False) -> bool:
        """Store a pack; refuses (False) bytes that do not hash to ``pack_id`` (``checked``: the
        caller has just made sure they do)."""
        if not checked and hashlib.sha256(data).hexdigest() != pack_id:
            return False
        return self._write(self._path("data", pack_id), data)

    def drop_pack(self, pack_id: str) -> None:
        self._drop(self._path("data", pack_id))

    # -- pack headers ---------------------------------------------------------------------------

    def load_header(self, pack_id: str, size: int) -> bytes | None:
        """The cached tail (sealed header + 4-byte length) of a pack of ``size`` bytes, or None."""
        path = self._path("headers", pack_id)
        raw = self._read(path)
        if raw is None:
            return None
        try:
            doc = msgpack.unpackb(raw, raw=False)
            tail = doc["tail"]
            ok = (
                isinstance(tail, bytes)
                and doc["size"] == size
                and doc["sha256"] == hashlib.sha256(tail).digest()
            )
        except (ValueError, KeyError, TypeError, msgpack.UnpackException):
            ok = False
        if not ok:
            self._drop(path)
            return None
        return tail

    def save_header(self, pack_id: str, size: int, tail: bytes) -> bool:
        doc = {"size": size, "tail": bytes(tail), "sha256": hashlib.sha256(tail).digest()}
        return self._write(self._path("headers", pack_id), msgpack.packb(doc))

    # -- housekeeping ---------------------------------------------------------------------------

    def forget_except(self, pack_ids: Iterable[str]) -> int:
        """Delete cached packs and headers of packs not in ``pack_ids`` (gone from the vault).
        Returns how many files were deleted."""
        keep = set(pack_ids)
        removed = 0
        for kind in ("data", "headers"):
            top = os.path.join(self.root, kind)
            for folder, _dirs, files in os.walk(top):
                for name in files:
                    if name not in keep:
                        self._drop(os.path.join(folder, name))
                        removed += 1
        return removed
