"""Lock files (FORMAT.md §8): unpacked JSON, ``uid``/``gid`` omitted when zero::

{"time":"2026-11-22T01:31:46.436Z","exclusive":false,"hostname":"vm","username":"root","pid":8019}
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from vaultfs.errors import FormatError
from vaultfs.format.gojson import GoTime, json_string


@dataclass(frozen=True)
class Lock:
    time: GoTime
    exclusive: bool
    hostname: str
    username: str
    pid: int
    uid: int = 0
    gid: int = 0

    def encode(self) -> bytes:
        text = (
            f'{{"time":"{self.time.format()}","exclusive":{"true" if self.exclusive else "false"},'
            f'"hostname":{json_string(self.hostname)},"username":{json_string(self.username)},'
            f'"pid":{self.pid}'
        )
        if self.uid:
            text += f',"uid":{self.uid}'
        if self.gid:
            text += f',"gid":{self.gid}'
        return (text + "}").encode("utf-8")

    @classmethod
    def decode(cls, raw: bytes, what: str = "lock file") -> Lock:
        try:
            doc = json.loads(raw)
            return cls(
                GoTime.parse(doc["time"]),
                bool(doc.get("exclusive", False)),
                str(doc.get("hostname", "")),
                str(doc.get("username", "")),
                int(doc.get("pid", 0)),
                int(doc.get("uid", 0)),
                int(doc.get("gid", 0)),
            )
        except FormatError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FormatError(f"{what} is invalid ({exc})") from None
