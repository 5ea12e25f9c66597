"""The C half of Node.from_json (vaultfs/format/_tree.c) against the Python definition.

decode_nodes takes the usual nodes itself and hands every other one to its fallback. For any input, the
result must be what Node.from_json gives, value for value (repr tells 1 from True), or the same error.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers.ci import unavailable
from vaultfs.format.gojson import GoTime
from vaultfs.format.tree import _ZERO_TIME, NODE_TYPES, Node, decode_tree

try:
    from vaultfs.format._tree import decode_nodes
except ImportError:  # pragma: no cover - the build makes it
    decode_nodes = None


@pytest.fixture(autouse=True)
def _native():
    if decode_nodes is None:
        unavailable("vaultfs.format._tree is not built (pip install -e . builds it)")


def _outcome(make):
    try:
        return "ok", make()
    except Exception as exc:  # noqa: BLE001 - compared, not handled
        return "error", (type(exc), str(exc))


def _both(docs):
    """(C result, Python result) for a list of decoded JSON objects."""
    c = _outcome(lambda: decode_nodes(docs, Node, GoTime, _ZERO_TIME, Node.from_json))
    py = _outcome(lambda: [Node.from_json(d) for d in docs])
    return c, py


def _assert_same(docs):
    c, py = _both(docs)
    assert c[0] == py[0], (docs, c, py)
    if c[0] == "ok":
        assert c[1] == py[1]
        assert [repr(n) for n in c[1]] == [repr(n) for n in py[1]]
        for a, b in zip(c[1], py[1], strict=True):
            for name in ("mtime", "atime", "ctime"):
                assert type(getattr(a, name)) is GoTime
            # the three times are shared exactly when from_json shares them
            assert (a.atime is a.mtime) == (b.atime is b.mtime)
            assert (a.ctime is a.mtime) == (b.ctime is b.mtime)
    else:
        assert c[1] == py[1]


ID = "0123456789abcdef" * 4
PLAIN = {
    "name": "report.txt",
    "type": "file",
    "mode": 420,
    "mtime": "2024-05-06T07:08:09.123456789+02:00",
    "atime": "2024-05-06T07:08:09.123456789+02:00",
    "ctime": "2024-05-07T01:02:03Z",
    "uid": 1000,
    "gid": 1000,
    "user": "alice",
    "group": "staff",
    "inode": 123456,
    "device_id": 2049,
    "size": 5,
    "links": 1,
    "content": [ID, ID.upper()],
}


def test_plain_nodes_take_the_fast_path():
    docs = [
        PLAIN,
        {
            "name": "d",
            "type": "dir",
            "mode": 2147484141,
            "mtime": "2024-01-01T00:00:00Z",
            "atime": "2024-01-01T00:00:00Z",
            "ctime": "2024-01-01T00:00:00Z",
            "uid": 0,
            "gid": 0,
            "content": None,
            "subtree": ID,
        },
        {"name": "l", "type": "symlink", "linktarget": "../x", "mtime": "", "uid": 0, "gid": 0},
        {"name": "e", "type": "file", "content": [], "extended_attributes": None},
    ]

    def refuse(doc):
        raise AssertionError(f"the fallback got a plain node: {doc}")

    fast = decode_nodes(docs, Node, GoTime, _ZERO_TIME, refuse)
    assert fast == [Node.from_json(d) for d in docs]
    assert fast[0].content == [bytes.fromhex(ID)] * 2
    assert fast[0].mtime == GoTime(1714972089123456789, 7200)
    assert fast[0].atime is fast[0].mtime and fast[0].ctime is not fast[0].mtime
    assert fast[2].mtime is _ZERO_TIME and fast[2].content is None


EDGES = [
    # times: shapes, dates and ranges the fast path refuses or must get exactly right
    *(
        {"name": "t", "type": "file", "mtime": t}
        for t in [
            "2024-02-29T23:59:59Z",
            "2023-02-29T00:00:00Z",
            "2000-02-29T12:00:00.5Z",
            "1900-02-29T12:00:00Z",
            "0000-01-01T00:00:00Z",
            "0001-01-01T00:00:00Z",
            "1677-09-21T00:12:44Z",
            "1677-09-21T00:12:43.145224192Z",
            "2262-04-11T23:47:16.854775807Z",
            "2262-04-11T23:47:17Z",
            "9999-12-31T23:59:59.999999999Z",
            "1969-12-31T23:59:59.999999999-00:30",
            "2024-05-06T24:00:00Z",
            "2024-05-06T10:99:00Z",
            "2024-05-06T10:00:60Z",
            "2024-13-06T10:00:00Z",
            "2024-05-06T10:00:00.Z",
            "2024-05-06T10:00:00.1234567890Z",
            "2024-05-06T10:00:00+25:00",
            "2024-05-06T10:00:00+05:99",
            "2024-05-06T10:00:00+0530",
            "2024-05-06t10:00:00Z",
            "2024-05-06T10:00:00z",
            "2024-05-06T10:00:00",
            "2024-05-06 10:00:00Z",
            "+024-05-06T10:00:00Z",
            "2024-05-06T1 :00:00Z",
            "２０２４-05-06T10:00:00Z",
            "2024-05-06T10:00:00.١Z",
            "2024-05-06T10:00:00Z ",
            "garbage",
            5,
            0,
            True,
            [],
            None,
            "",
        ]
    ),
    {"name": "t", "type": "file", "mtime": "2024-05-06T10:00:00Z", "atime": None, "ctime": ""},
    {"name": "t", "type": "file", "mtime": None, "atime": "", "ctime": "2024-05-06T10:00:00Z"},
    {"name": "t", "type": "file", "atime": "2024-05-06T10:00:00Z", "ctime": "2024-05-06T10:00:00Z"},
    # names
    *(
        {"name": n, "type": "file"}
        for n in [
            "",
            'a\\"b\\\\c',
            "tab\\t",
            "\\x80raw",
            "\udc80",
            "\udcc3\udca9",
            "\ud800",
            "ünï©ødé",
            "😀",
            ".",
            "..",
            5,
            None,
        ]
    ),
    # ints: only exact ints are the fast path's
    *(
        {"name": "n", "type": "file", "mode": v}
        for v in [True, False, 1.0, 1.5, "12", "", [], -3, 2**70]
    ),
    *({"name": "n", "type": "file", "size": v} for v in [None, 0, 2**64 - 1, False, "7"]),
    # strings
    *({"name": "n", "type": "file", "user": v} for v in [None, "", "bob", 5, 0, [], ["x"]]),
    *({"name": "n", "type": "symlink", "linktarget": v} for v in [None, "", "t", 1]),
    {"name": "n", "type": "symlink", "linktarget": "x", "linktarget_raw": "eHl6"},
    {"name": "n", "type": "symlink", "linktarget": "x", "linktarget_raw": ""},
    {"name": "n", "type": "symlink", "linktarget": "x", "linktarget_raw": None},
    {"name": "n", "type": "symlink", "linktarget_raw": "not base64!"},
    # types
    *({"name": "n", "type": t} for t in [*NODE_TYPES, "File", "", None, 1]),
    {"name": "n"},
    {"type": "file"},
    # content and subtree
    *(
        {"name": "n", "type": "file", "content": c}
        for c in [
            None,
            [],
            [ID],
            [ID.upper()],
            [ID[:-1]],
            [ID + "0"],
            [" " + ID[1:]],
            ["00 " + ID[3:] + "0"],
            [ID[:-1] + "g"],
            [5],
            "ab",
            {"a": 1},
            [ID, None],
        ]
    ),
    *({"name": "n", "type": "dir", "subtree": s} for s in [None, ID, ID[:10], 5, "", [ID]]),
    # what only from_json handles
    {"name": "n", "type": "file", "extended_attributes": [{"name": "user.a", "value": "YQ=="}]},
    {"name": "n", "type": "file", "extended_attributes": []},
    {"name": "n", "type": "file", "extended_attributes": {}},
    {"name": "n", "type": "file", "generic_attributes": {"windows.x": "1"}},
    {"name": "n", "type": "file", "generic_attributes": {}},
    {"name": "n", "type": "file", "error": "lstat failed"},
    {"name": "n", "type": "file", "error": 3},
    {"name": "n", "type": "file", "unknown_key": [1, 2]},
    # not objects at all
    "a string",
    5,
    None,
    ["name", "n"],
]


@pytest.mark.parametrize("doc", EDGES, ids=range(len(EDGES)))
def test_edge_cases_agree(doc):
    _assert_same([doc])
    _assert_same([PLAIN, doc, PLAIN])  # and an error stops the list as it does in Python


def test_decode_tree_uses_it_and_reports_errors_the_same_way():
    raw = json.dumps({"nodes": [PLAIN, {"name": "x", "type": "bogus"}]}).encode()
    with pytest.raises(
        Exception, match=r"tree t is not a valid tree \(unknown node type 'bogus'\)"
    ):
        decode_tree(raw, "tree t")
    assert decode_tree(json.dumps({"nodes": [PLAIN]}).encode()) == [Node.from_json(PLAIN)]


values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.sampled_from(["", ID, ID.upper(), "2024-05-06T07:08:09Z", "2024-05-06T07:08:09.5-03:30"]),
    st.lists(st.sampled_from([ID, "ab", 3]), max_size=3),
)
times = st.one_of(
    st.none(),
    st.just(""),
    st.integers(-(2**63), 2**63).map(lambda ns: GoTime(ns).format()),
    st.builds(
        lambda y, mo, d, h, mi, s, frac, tz: (
            f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}{frac}{tz}"
        ),
        st.integers(0, 9999),
        st.integers(0, 13),
        st.integers(0, 32),
        st.integers(0, 25),
        st.integers(0, 61),
        st.integers(0, 61),
        st.sampled_from(["", ".", ".1", ".123456789", ".1234567890", ".000000001"]),
        st.sampled_from(["Z", "+00:00", "-00:00", "+05:30", "-11:59", "+24:00", "+01:60", "", "Y"]),
    ),
)
docs = st.dictionaries(
    st.sampled_from(
        [
            "name",
            "type",
            "mode",
            "uid",
            "gid",
            "user",
            "group",
            "inode",
            "device_id",
            "size",
            "links",
            "linktarget",
            "device",
            "content",
            "subtree",
            "error",
        ]
    ),
    values,
).flatmap(
    lambda d: st.fixed_dictionaries(
        {
            "name": st.sampled_from(["f", "a\\\\b", "\udc80", "é"]),
            "type": st.sampled_from([*NODE_TYPES, "nope"]),
            "mtime": times,
            "atime": st.one_of(times, st.just(None)),
            "ctime": times,
        }
    ).map(lambda base: {**base, **{k: v for k, v in d.items() if k not in ("name", "type")}})
)


@settings(max_examples=400, deadline=None)
@given(st.lists(docs, max_size=4))
def test_random_nodes_agree(doc_list):
    _assert_same(doc_list)
