"""Index files (FORMAT.md §5): which blobs live in which pack, at which offset.

JSON written with Go's json.Encoder (so with a trailing newline)::

    {"supersedes":[...],"packs":[{"id":"<pack>","blobs":[{"id":"<blob>","type":"data","offset":0,
      "length":47,"uncompressed_length":6}]}]}

``supersedes`` is omitted when empty; ``uncompressed_length`` only for compressed blobs. The legacy format
(a bare array of pack objects) is read too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import NamedTuple

from vaultfs.errors import FormatError
from vaultfs.format.pack import TYPE_BY_NAME, TYPE_NAMES, PackedBlob


@dataclass
class IndexFile:
    packs: dict[bytes, list[PackedBlob]] = field(default_factory=dict)
    supersedes: list[str] = field(default_factory=list)

    def blob_count(self) -> int:
        return sum(len(b) for b in self.packs.values())

    def encode(self) -> bytes:
        out = ["{"]
        if self.supersedes:
            out.append('"supersedes":[' + ",".join(f'"{s}"' for s in self.supersedes) + "],")
        out.append('"packs":[')
        packs = []
        for pack_id, blobs in self.packs.items():
            items = []
            for b in blobs:
                ulen = (
                    f',"uncompressed_length":{b.uncompressed_length}'
                    if b.uncompressed_length
                    else ""
                )
                items.append(
                    f'{{"id":"{b.id.hex()}","type":"{TYPE_NAMES[b.blob_type]}",'
                    f'"offset":{b.offset},"length":{b.length}{ulen}}}'
                )
            packs.append(f'{{"id":"{pack_id.hex()}","blobs":[' + ",".join(items) + "]}")
        out.append(",".join(packs))
        out.append("]}\n")
        return "".join(out).encode("ascii")

    @classmethod
    def decode(cls, raw: bytes, what: str = "index file") -> IndexFile:
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise FormatError(f"{what} is not valid JSON ({exc})") from None
        index = cls()
        try:
            if isinstance(doc, list):  # legacy format
                pack_docs = doc
            else:
                pack_docs = doc.get("packs") or []
                index.supersedes = list(doc.get("supersedes") or [])
            for p in pack_docs:
                pack_id = bytes.fromhex(p["id"])
                blobs = index.packs.setdefault(pack_id, [])
                for b in p.get("blobs") or []:
                    blobs.append(
                        PackedBlob(
                            TYPE_BY_NAME[b["type"]],
                            int(b["offset"]),
                            int(b["length"]),
                            int(b.get("uncompressed_length") or 0),
                            bytes.fromhex(b["id"]),
                        )
                    )
                if len(pack_id) != 32 or any(len(b.id) != 32 for b in blobs):
                    raise ValueError("ID of wrong length")
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise FormatError(f"{what} has an invalid structure ({exc})") from None
        return index


class IndexColumns(NamedTuple):
    """An index file as columns, the shape MasterIndex.add_arrays takes (no object per blob)."""

    pack_ids: list[bytes]
    pack_of_blob: list[int]
    blob_ids: bytes
    blob_types: list[int]
    offsets: list[int]
    lengths: list[int]
    uncompressed_lengths: list[int]


def decode_columns(raw: bytes, what: str = "index file") -> IndexColumns:
    """Decode an index file straight into columns; same validation as IndexFile.decode."""
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise FormatError(f"{what} is not valid JSON ({exc})") from None
    cols = IndexColumns([], [], b"", [], [], [], [])
    ids: list[str] = []
    try:
        pack_docs = doc if isinstance(doc, list) else (doc.get("packs") or [])
        for number, p in enumerate(pack_docs):
            pack_id = bytes.fromhex(p["id"])
            if len(pack_id) != 32:
                raise ValueError("pack ID of wrong length")
            cols.pack_ids.append(pack_id)
            blobs = p.get("blobs") or []
            cols.pack_of_blob.extend([number] * len(blobs))
            for b in blobs:
                ids.append(b["id"])
                cols.blob_types.append(TYPE_BY_NAME[b["type"]])
                cols.offsets.append(int(b["offset"]))
                cols.lengths.append(int(b["length"]))
                cols.uncompressed_lengths.append(int(b.get("uncompressed_length") or 0))
        blob_ids = bytes.fromhex("".join(ids))
        if len(blob_ids) != 32 * len(ids):
            raise ValueError("blob ID of wrong length")
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise FormatError(f"{what} has an invalid structure ({exc})") from None
    return cols._replace(blob_ids=blob_ids)
