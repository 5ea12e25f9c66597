"""Reading file-system entries into nodes (vaultfs/ops/scan.py): times, modes, types, xattr order, and
the shortcut encoding ``file_doc`` checked against ``Node.encode``.

That the nodes are byte-identical to restic's is checked against real restic backups in
tests/interop/test_backup_interop.py.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vaultfs.format.gojson import GoTime, go_quote
from vaultfs.format.tree import GO_DIR, GO_NAMED_PIPE, GO_SETUID, GO_STICKY, GO_SYMLINK
from vaultfs.ops import scan
from vaultfs.ops.scan import LocalTime, OwnerNames, file_doc, node_from_stat, read_xattrs

ROOT = os.geteuid() == 0
ZONES = ["UTC", "Europe/Berlin", "America/St_Johns", "Asia/Kolkata", "Pacific/Chatham"]


@pytest.fixture(params=ZONES)
def zone(request) -> Iterator[str]:
    old = os.environ.get("TZ")
    os.environ["TZ"] = request.param
    time.tzset()
    scan._SECONDS.clear()  # the per-second cache assumes the zone does not change under it
    yield request.param
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()
    scan._SECONDS.clear()


# Go's RFC 3339 range, years 1 to 9999, less a day for the zone offset.
NS = st.integers(min_value=-62135510400 * 10**9, max_value=253402214399 * 10**9 + 999_999_999)


def test_local_time_formats_like_gotime(zone):
    @settings(max_examples=300, deadline=None)
    @given(NS)
    def check(ns: int) -> None:
        ours = LocalTime(ns)
        ref = GoTime.local(ns)
        assert ours.format() == ref.format()
        assert ours == ref and ref == ours and hash(ours) == hash(GoTime(ns, ref.offset))

    check()
    # whole seconds, DST changes, the epoch and the limits
    for ns in (0, -1, 1_711_846_800 * 10**9, 1_729_990_800 * 10**9 - 1, -62135510400 * 10**9):
        assert LocalTime(ns).format() == GoTime.local(ns).format()


def test_local_time_out_of_range_raises_like_gotime():
    with pytest.raises(Exception) as ours:
        LocalTime(253402300800 * 10**9).format()
    with pytest.raises(Exception) as ref:
        GoTime.local(253402300800 * 10**9).format()
    assert type(ours.value) is type(ref.value)


def _node(path, name=None):
    p = os.fsencode(path)
    return node_from_stat(name or os.path.basename(str(path)), p, os.lstat(p), OwnerNames())


def test_file_node(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"hello")
    os.chmod(f, 0o4751)
    os.utime(f, ns=(1, 1_500_000_000_123_456_789))
    n = _node(f)
    st_ = os.lstat(f)
    assert n.type == "file" and n.mode == 0o751 | GO_SETUID
    assert n.size == 5 and n.links == 1 and n.content == []
    assert n.mtime.ns == 1_500_000_000_123_456_789 and n.atime is n.mtime
    assert n.ctime.ns == st_.st_ctime_ns
    assert (n.inode, n.device_id, n.uid, n.gid) == (
        st_.st_ino,
        st_.st_dev,
        st_.st_uid,
        st_.st_gid,
    )
    assert n.user == OwnerNames().user(st_.st_uid)


def test_dir_symlink_fifo_nodes(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    os.chmod(d, 0o1755)
    os.symlink(b"target/\xff", os.fsencode(tmp_path / "l"))
    os.mkfifo(tmp_path / "p", 0o640)
    dn, ln, pn = _node(d), _node(tmp_path / "l"), _node(tmp_path / "p")
    assert dn.type == "dir" and dn.mode == 0o755 | GO_DIR | GO_STICKY
    assert dn.links == 0 and dn.size == 0 and dn.content is None
    assert ln.type == "symlink" and ln.mode == 0o777 | GO_SYMLINK and ln.links == 1
    assert ln.linktarget == "target/\udcff"
    assert pn.type == "fifo" and pn.mode == 0o640 | GO_NAMED_PIPE and pn.links == 0


@pytest.mark.skipif(not ROOT, reason="device nodes need root")
def test_device_nodes(tmp_path):
    try:
        os.mknod(tmp_path / "c", stat.S_IFCHR | 0o644, os.makedev(1, 3))
        os.mknod(tmp_path / "b", stat.S_IFBLK | 0o644, os.makedev(7, 200))
    except PermissionError:
        pytest.skip("no CAP_MKNOD")
    c, b = _node(tmp_path / "c"), _node(tmp_path / "b")
    assert (c.type, c.device, c.mode, c.links) == ("chardev", 259, 69206436, 1)
    assert (b.type, b.device, b.mode) == ("dev", 1992, 67109284)


def test_socket_has_its_type(tmp_path):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(tmp_path / "s"))
        assert scan.node_type(os.lstat(tmp_path / "s").st_mode) == "socket"
    finally:
        s.close()


def test_xattrs_keep_the_kernels_order(tmp_path):
    # restic 0.14 records extended attributes in listxattr order, not sorted (measured: zeta, alpha,
    # mid stays zeta, alpha, mid on ext4); the order is part of the tree ID.
    f = tmp_path / "f"
    f.write_bytes(b"")
    try:
        for name, value in (("user.zeta", b"1"), ("user.alpha", b"2"), ("user.mid", b"")):
            os.setxattr(f, name, value)
    except OSError:
        pytest.skip("no user xattrs on this file system")
    listed = os.listxattr(f)
    assert [n for n, _ in read_xattrs(os.fsencode(f))] == listed
    with open(f, "rb") as fh:
        assert read_xattrs(fh.fileno()) == read_xattrs(os.fsencode(f))
    assert dict(_node(f).extended_attributes) == {
        "user.zeta": b"1",
        "user.alpha": b"2",
        "user.mid": b"",
    }


def _files(tmp_path) -> list:
    out = []
    plain = tmp_path / "plain"
    plain.write_bytes(b"x" * 100)
    out.append(plain)
    empty = tmp_path / 'empty "quoted" \\ name\n'
    empty.write_bytes(b"")
    os.chmod(empty, 0)
    out.append(empty)
    odd = tmp_path / os.fsdecode(b"caf\xe9 <&>")
    odd.write_bytes(b"y")
    os.chmod(odd, 0o6777)
    out.append(odd)
    linked = tmp_path / "linked"
    linked.write_bytes(b"z")
    os.link(linked, tmp_path / "linked2")
    out.append(linked)
    tagged = tmp_path / "tagged"
    tagged.write_bytes(b"t")
    try:
        os.setxattr(tagged, "user.b", bytes(range(256)))
        os.setxattr(tagged, "user.a", b"")
    except OSError:
        pass
    out.append(tagged)
    old = tmp_path / "old"
    old.write_bytes(b"o")
    os.utime(old, ns=(0, -123_456_789_000))
    out.append(old)
    if ROOT:
        owned = tmp_path / "owned"
        owned.write_bytes(b"u")
        os.chown(owned, 4321, 8765)  # ids without names: user/group are left out
        out.append(owned)
    return out


def test_file_doc_equals_the_decoded_encoding(tmp_path):
    owners = OwnerNames()
    content = ["ab" * 32, "cd" * 32]
    for path in _files(tmp_path):
        raw = os.fsencode(path)
        st_ = os.lstat(raw)
        node = node_from_stat(os.fsdecode(raw).rsplit("/", 1)[1], raw, st_, owners)
        node.content = [bytes.fromhex(c) for c in content]
        doc = file_doc(
            go_quote(os.path.basename(raw)),
            st_,
            owners,
            node.mtime,
            node.ctime,
            node.extended_attributes,
            content,
        )
        assert doc == json.loads(node.encode()), path
        # and with content [] (empty file) the same holds
        node.content = []
        assert {**doc, "content": []} == json.loads(node.encode())
