"""Snapshots (FORMAT.md §6): unpacked JSON written with Go json.Marshal (no newline), keys in this order::

    time parent tree paths hostname username uid gid excludes tags original program_version summary

Everything but ``time``, ``tree`` and ``paths`` is omitted when empty. Fields a newer restic adds are kept in
``extra`` and written back after the known ones, so rewriting a snapshot loses nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from vaultfs.errors import FormatError
from vaultfs.format.gojson import GoTime, json_string

_KNOWN = (
    "time",
    "parent",
    "tree",
    "paths",
    "hostname",
    "username",
    "uid",
    "gid",
    "excludes",
    "tags",
    "original",
    "program_version",
    "summary",
)


@dataclass
class Snapshot:
    time: GoTime
    tree: bytes
    paths: list[str]
    hostname: str = ""
    username: str = ""
    uid: int = 0
    gid: int = 0
    excludes: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    parent: bytes | None = None
    original: bytes | None = None
    program_version: str = ""
    summary: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        def strings(values: list[str]) -> str:
            return "[" + ",".join(json_string(v) for v in values) + "]"

        parts = [f'{{"time":"{self.time.format()}"']
        if self.parent:
            parts.append(f',"parent":"{self.parent.hex()}"')
        parts.append(f',"tree":"{self.tree.hex()}","paths":{strings(self.paths)}')
        if self.hostname:
            parts.append(f',"hostname":{json_string(self.hostname)}')
        if self.username:
            parts.append(f',"username":{json_string(self.username)}')
        if self.uid:
            parts.append(f',"uid":{self.uid}')
        if self.gid:
            parts.append(f',"gid":{self.gid}')
        if self.excludes:
            parts.append(f',"excludes":{strings(self.excludes)}')
        if self.tags:
            parts.append(f',"tags":{strings(self.tags)}')
        if self.original:
            parts.append(f',"original":"{self.original.hex()}"')
        if self.program_version:
            parts.append(f',"program_version":{json_string(self.program_version)}')
        if self.summary:
            parts.append(',"summary":' + json.dumps(self.summary, separators=(",", ":")))
        for key, value in self.extra.items():
            parts.append(f",{json_string(key)}:" + json.dumps(value, separators=(",", ":")))
        parts.append("}")
        return "".join(parts).encode("utf-8")

    @classmethod
    def decode(cls, raw: bytes, what: str = "snapshot") -> Snapshot:
        try:
            doc = json.loads(raw)
            snap = cls(
                time=GoTime.parse(doc["time"]),
                tree=_id(doc["tree"]),
                paths=[str(p) for p in doc.get("paths") or []],
                hostname=doc.get("hostname") or "",
                username=doc.get("username") or "",
                uid=int(doc.get("uid") or 0),
                gid=int(doc.get("gid") or 0),
                excludes=list(doc.get("excludes") or []),
                tags=list(doc.get("tags") or []),
                parent=_id(doc["parent"]) if doc.get("parent") else None,
                original=_id(doc["original"]) if doc.get("original") else None,
                program_version=doc.get("program_version") or "",
                summary=doc.get("summary") or None,
                extra={k: v for k, v in doc.items() if k not in _KNOWN},
            )
        except FormatError as exc:
            raise FormatError(f"{what}: {exc}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FormatError(f"{what} is not a valid snapshot ({exc})") from None
        return snap


def _id(text: str) -> bytes:
    raw = bytes.fromhex(text)
    if len(raw) != 32:
        raise ValueError(f"ID {text!r} has the wrong length")
    return raw
