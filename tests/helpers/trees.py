"""Build, scan and compare file trees for backup/restore round-trip tests.

``make_tricky_tree`` builds the source tree the interop tests back up: every kind of file-system object and
metadata that a restic-format backup has to carry, at sizes around the chunker's limits. ``scan_tree``
turns a tree into a plain dict of ``Entry`` records, and ``compare_trees`` lists the differences between two
trees in words a failing test can show.

All paths are bytes (``os.fsencode``) because the tree holds names that are not valid UTF-8.

What restic 0.14's ``restore`` brings back on Linux, measured on this tree (the self-test
``test_restic_restore_equals_source`` compares with every check on, and passes): content, type,
permission and setuid/setgid/sticky bits, owners (as root), fifos, device numbers, extended attributes of
files and folders, hardlink groups, and modification times with nanoseconds for files, folders and
symlinks. Folder times survive because restic sets a folder's metadata only after everything inside it
has been restored; symlink times because on Linux it calls utimensat with AT_SYMLINK_NOFOLLOW (on macOS
and OpenBSD it skips symlink times). So ``compare_trees`` checks everything by default; its flags exist
for consumers that legitimately lose something: a FUSE mount shows no hardlink groups and may report its
own folder or symlink times, a restore without root cannot set owners. Access times are never compared:
restic stores atime = mtime unless ``--with-atime``, and reading a tree changes them.

Not in the tree, because restic 0.14 cannot carry them: symlink targets that are not valid UTF-8 (stored
as U+FFFD until ``linktarget_raw`` in 0.16) and sockets.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

KIB = 1024
MIB = 1024 * KIB

#: The file sizes around restic's chunker limits (512 KiB minimum chunk, 8 MiB maximum chunk).
EDGE_SIZES = (
    512 * KIB - 1,
    512 * KIB,
    512 * KIB + 1,
    8 * MIB - 1,
    8 * MIB,
    8 * MIB + 1,
)

#: Owner given to some entries when the builder runs as root.
OTHER_UID = 1234
OTHER_GID = 5678

#: Depth of the deeply nested folder chain.
DEEP_LEVELS = 200

#: Number of small files in the wide folder.
WIDE_ENTRIES = 10_000

#: First modification time handed out (2017-07-14, with a nanosecond part); later ones add STEP_NS.
BASE_MTIME_NS = 1_500_000_000_123_456_789
STEP_NS = 1_000_003_001

#: A time before the Unix epoch, to catch code that assumes non-negative timestamps.
BEFORE_EPOCH_NS = -86_400 * 365 * 10 - 123_456_789

#: The names the tree uses for tricky characters: one file of each name in ``names/``.
TRICKY_NAMES = (
    b"with space",
    b" leading and trailing spaces ",
    b"new\nline",
    b"carriage\rreturn",
    b"tab\tseparated",
    b'double"quote',
    b"single'quote",
    b"back\\slash",
    b"not-utf8-\xe9\xff\xfe",
    b"latin1-caf\xe9",
    "emoji-\U0001f600\U0001f4be".encode(),
    "caf\u00e9-composed".encode(),
    "cafe\u0301-decomposed".encode(),
    b"-starts-with-dash",
    b"glob*?[chars]",
    b"percent%20and%s",
    b"x" * 255,
)


@dataclass(frozen=True)
class Entry:
    """One file-system object as ``scan_tree`` saw it (``lstat``, never following symlinks).

    ``mode`` holds the permission and setuid/setgid/sticky bits only; the type is ``kind``. ``size`` and
    ``sha256`` are set for regular files, ``target`` for symlinks, ``rdev`` for devices. ``xattrs`` is the
    sorted tuple of (name, value). ``links`` is the sorted tuple of every path in the tree that shares this
    entry's inode, this one included, or () when no other path does.
    """

    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    sha256: str | None
    target: bytes | None
    xattrs: tuple[tuple[str, bytes], ...]
    rdev: int
    links: tuple[bytes, ...]


def _content(seed: int, size: int) -> bytes:
    """Deterministic incompressible bytes: the same (seed, size) gives the same content everywhere."""
    return random.Random(seed).randbytes(size)


def _is_root() -> bool:
    return os.geteuid() == 0


class _Builder:
    """Creates the tricky tree under one root and remembers the metadata to apply at the end."""

    def __init__(self, root: bytes) -> None:
        self.root = root
        self.chown: list[tuple[bytes, int, int]] = []
        self.chmod: list[tuple[bytes, int]] = []
        self.fixed_mtime: dict[bytes, int] = {}

    def path(self, rel: bytes) -> bytes:
        return os.path.join(self.root, rel)

    def dir(self, rel: bytes, mode: int | None = None) -> bytes:
        path = self.path(rel)
        os.makedirs(path, exist_ok=True)
        if mode is not None:
            self.chmod.append((path, mode))
        return path

    def file(self, rel: bytes, data: bytes = b"", mode: int | None = None) -> bytes:
        path = self.path(rel)
        with open(path, "xb") as f:
            f.write(data)
        if mode is not None:
            self.chmod.append((path, mode))
        return path

    def symlink(self, rel: bytes, target: bytes) -> bytes:
        path = self.path(rel)
        os.symlink(target, path)
        return path

    def build(self) -> None:
        self._empty()
        self._sizes()
        self._text()
        self._names()
        self._links()
        self._hardlinks()
        self._special()
        self._xattrs()
        self._modes()
        self._deep()
        self._wide()
        self._times()
        if _is_root():
            self._owners()
        # Order matters: chown clears setuid/setgid, so modes come after owners, and times come last
        # because every earlier step (even chmod of a child's content) may touch a folder's mtime.
        for path, uid, gid in self.chown:
            os.lchown(path, uid, gid)
        for path, mode in self.chmod:
            os.chmod(path, mode)
        self._apply_times()

    def _empty(self) -> None:
        self.file(b"empty-file")
        self.dir(b"empty-dir")
        self.dir(b"empty-dirs/nested/empty")

    def _sizes(self) -> None:
        # The three files around each limit share their prefix, so a backup deduplicates all but the
        # last chunk: that exercises both dedup and the short final chunk.
        self.dir(b"sizes")
        for limit, seed in ((512 * KIB, 512), (8 * MIB, 8192)):
            data = _content(seed, limit + 1)
            for size in (limit - 1, limit, limit + 1):
                self.file(b"sizes/%d" % size, data[:size])

    def _text(self) -> None:
        self.dir(b"text")
        hello = b"Hello, vault!\n"
        self.file(b"text/hello.txt", hello)
        self.file(b"text/hello-copy.txt", hello)
        self.file(b"text/no-trailing-newline.txt", b"no newline at the end")
        lines = b"".join(b"line %d of a small text file\n" % i for i in range(200))
        self.file(b"text/lines.txt", lines)
        self.file(b"text/crlf.txt", b"windows\r\nline endings\r\n")
        self.file(b"text/zeros.bin", bytes(64 * KIB))

    def _names(self) -> None:
        self.dir(b"names")
        for i, name in enumerate(TRICKY_NAMES):
            self.file(b"names/" + name, b"file %d: %s\n" % (i, name))
        odd_dir = self.dir(b"names/dir with space\nand newline \xff")
        self.file(os.path.join(odd_dir, b"inside"), b"inside an oddly named folder\n")

    def _links(self) -> None:
        self.dir(b"links")
        self.symlink(b"links/relative", b"../text/hello.txt")
        self.symlink(b"links/relative-dir", b"../text")
        self.symlink(b"links/absolute", b"/etc/passwd")
        self.symlink(b"links/dangling", b"does/not/exist")
        self.symlink(b"links/loop", b"loop")
        self.symlink(b"links/odd target", b"../names/with space")
        self.symlink(
            b"links/emoji-\xf0\x9f\x94\x97", "../names/emoji-\U0001f600\U0001f4be".encode()
        )

    def _hardlinks(self) -> None:
        self.dir(b"hardlinks")
        self.dir(b"hardlinks-elsewhere")
        first = self.file(b"hardlinks/first", b"one inode, three names\n")
        os.link(first, self.path(b"hardlinks/second"))
        os.link(first, self.path(b"hardlinks-elsewhere/third"))
        # A second, separate group of two, so group membership (not just "is linked") is checked.
        pair = self.file(b"hardlinks/pair-a", b"another inode, two names\n")
        os.link(pair, self.path(b"hardlinks/pair-b"))

    def _special(self) -> None:
        self.dir(b"special")
        os.mkfifo(self.path(b"special/fifo"), 0o640)
        if _is_root():
            try:
                os.mknod(self.path(b"special/chardev"), stat.S_IFCHR | 0o644, os.makedev(1, 3))
                os.mknod(self.path(b"special/blockdev"), stat.S_IFBLK | 0o600, os.makedev(7, 0))
            except PermissionError:
                pass  # root without CAP_MKNOD (a restricted container): the tree goes without devices

    def _xattrs(self) -> None:
        self.dir(b"xattrs")
        tagged = self.file(b"xattrs/tagged-file", b"a file with extended attributes\n")
        folder = self.dir(b"xattrs/tagged-dir")
        self.file(b"xattrs/tagged-dir/plain", b"no attributes here\n")
        attrs = {
            tagged: {
                "user.comment": b"plain text value",
                "user.binary": bytes(range(256)),
                "user.empty": b"",
            },
            folder: {"user.folder": b"\x00\x01\x02\xff\xfe folder value"},
        }
        for path, values in attrs.items():
            for name, value in values.items():
                os.setxattr(path, name, value, follow_symlinks=False)

    def _modes(self) -> None:
        self.dir(b"modes")
        # Without root a mode-000 file cannot be read back (not even by restic), so the tree would be
        # unusable for backups; owner-read-only is the strictest mode a normal user can round-trip.
        no_access = 0o000 if _is_root() else 0o400
        self.file(b"modes/no-access", b"mode 000\n", mode=no_access)
        self.file(b"modes/executable", b"#!/bin/sh\necho hi\n", mode=0o755)
        self.file(b"modes/setuid-exec", b"#!/bin/sh\n", mode=0o4755)
        self.file(b"modes/group-writable", b"g+w\n", mode=0o664)
        self.dir(b"modes/private-dir", mode=0o700)
        self.file(b"modes/private-dir/secret", b"inside a 0700 folder\n", mode=0o600)
        self.dir(b"modes/setgid-sticky-dir", mode=0o3775)
        self.file(b"modes/setgid-sticky-dir/shared", b"inside a setgid+sticky folder\n")

    def _deep(self) -> None:
        rel = os.path.join(b"deep", *([b"d"] * DEEP_LEVELS))
        self.dir(rel)
        self.file(os.path.join(rel, b"bottom"), b"%d levels down\n" % DEEP_LEVELS)

    def _wide(self) -> None:
        self.dir(b"wide")
        for i in range(WIDE_ENTRIES):
            self.file(b"wide/f%05d" % i, b"%d\n" % i)

    def _times(self) -> None:
        self.dir(b"times")
        self.fixed_mtime[self.file(b"times/before-epoch", b"1960s\n")] = BEFORE_EPOCH_NS
        self.fixed_mtime[self.file(b"times/whole-second", b"no ns part\n")] = 1_600_000_000 * 10**9

    def _owners(self) -> None:
        self.dir(b"owners")
        other = (OTHER_UID, OTHER_GID)
        self.chown += [
            (self.file(b"owners/other-owner", b"owned by 1234:5678\n"), *other),
            (self.file(b"owners/other-group-only", b"group 5678\n"), 0, OTHER_GID),
            (self.dir(b"owners/other-dir"), *other),
            (self.symlink(b"owners/other-symlink", b"other-owner"), *other),
        ]
        self.file(b"owners/other-dir/inside", b"owned by root, in a folder owned by 1234\n")

    def _apply_times(self) -> None:
        entries = sorted(_walk(self.root), key=lambda item: item[0])
        seen_inodes: set[tuple[int, int]] = set()
        folders = []
        for i, (rel, path, st) in enumerate(entries):
            mtime = self.fixed_mtime.get(path, BASE_MTIME_NS + i * STEP_NS)
            # atime differs from mtime, so code that writes one where the other belongs shows up as
            # a wrong mtime (when the backup recorded atime at all).
            times = (mtime - 7_000_000_011, mtime)
            if stat.S_ISDIR(st.st_mode):
                folders.append((rel.count(b"/"), path, times))
                continue
            inode = (st.st_dev, st.st_ino)
            if inode in seen_inodes:
                continue  # a later name of a hardlink group would overwrite the first name's time
            seen_inodes.add(inode)
            os.utime(path, ns=times, follow_symlinks=False)
        # Deepest folders first; a folder's own time is set after everything inside it is final.
        for _depth, path, times in sorted(folders, key=lambda f: -f[0]):
            os.utime(path, ns=times)
        os.utime(self.root, ns=(BASE_MTIME_NS - STEP_NS, BASE_MTIME_NS - STEP_NS))


def make_tricky_tree(dest: Path) -> Path:
    """Build the tricky source tree in ``dest`` (created; must not exist or be empty) and return it.

    The tree is deterministic except for inode numbers and, without root, owners. It holds about 26 MB of
    file content in about 10,300 entries (10,000 of them in ``wide/``) and builds in under two seconds on an idle
    machine.
    Devices and foreign owners are only created when running as root.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise FileExistsError(errno.EEXIST, "make_tricky_tree needs an empty folder", str(dest))
    _Builder(os.fsencode(dest)).build()
    return dest


def _walk(root: bytes) -> Iterator[tuple[bytes, bytes, os.stat_result]]:
    """Yield (relpath, path, lstat) for every entry below ``root`` (not ``root`` itself), no symlinks."""
    stack = [b""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(os.path.join(root, rel_dir) if rel_dir else root) as it:
            for de in it:
                rel = os.path.join(rel_dir, de.name) if rel_dir else de.name
                st = de.stat(follow_symlinks=False)
                yield rel, de.path, st
                if stat.S_ISDIR(st.st_mode):
                    stack.append(rel)


_KINDS = (
    (stat.S_ISREG, "file"),
    (stat.S_ISDIR, "dir"),
    (stat.S_ISLNK, "symlink"),
    (stat.S_ISFIFO, "fifo"),
    (stat.S_ISCHR, "chardev"),
    (stat.S_ISBLK, "blockdev"),
    (stat.S_ISSOCK, "socket"),
)


def _kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    raise ValueError(f"unknown file type in mode {mode:o}")


def _sha256(path: bytes) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(MIB):
                h.update(chunk)
    except PermissionError:
        return "<unreadable>"
    return h.hexdigest()


def _xattrs(path: bytes) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return ()
        raise
    return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in names))


def scan_tree(root: Path | str | bytes) -> dict[bytes, Entry]:
    """Return {relative path: Entry} for everything below ``root``, without following symlinks.

    ``root`` itself is not an entry: a snapshot of a folder's contents does not carry the folder's own
    metadata, and a restore target's metadata belongs to whoever created it.
    """
    root_b = os.fsencode(root)
    raw = list(_walk(root_b))
    groups: dict[tuple[int, int], list[bytes]] = {}
    for rel, _path, st in raw:
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            groups.setdefault((st.st_dev, st.st_ino), []).append(rel)
    entries = {}
    for rel, path, st in raw:
        kind = _kind(st.st_mode)
        group = groups.get((st.st_dev, st.st_ino), []) if kind != "dir" else []
        entries[rel] = Entry(
            kind=kind,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size if kind == "file" else 0,
            mtime_ns=st.st_mtime_ns,
            sha256=_sha256(path) if kind == "file" else None,
            target=os.readlink(path) if kind == "symlink" else None,
            xattrs=_xattrs(path),
            rdev=st.st_rdev if kind in ("chardev", "blockdev") else 0,
            links=tuple(sorted(group)) if len(group) > 1 else (),
        )
    return entries


def _show(rel: bytes) -> str:
    # repr of the surrogate-escaped str shows newlines, quotes and undecodable bytes unambiguously.
    return repr(os.fsdecode(rel))


def _ns(value: int) -> str:
    return f"{value // 10**9}.{value % 10**9:09d}"


def compare_trees(
    a: Path | str | bytes | Mapping[bytes, Entry],
    b: Path | str | bytes | Mapping[bytes, Entry],
    *,
    owners: bool,
    times: bool = True,
    dir_times: bool = True,
    symlink_times: bool = True,
    xattrs: bool = True,
    hardlinks: bool = True,
) -> list[str]:
    """List the differences between trees ``a`` and ``b`` (paths or ``scan_tree`` results); [] if equal.

    Type, permission and special mode bits, size, content, symlink target and device numbers are always
    compared. The flags switch off what a given consumer cannot reproduce:

    * ``owners``: uid/gid; required, because only a restore running as root can set them.
    * ``times``: all modification times; ``dir_times`` and ``symlink_times`` narrow it to folders and
      symlinks. restic 0.14 restores both (folders after their contents, symlinks with
      ``AT_SYMLINK_NOFOLLOW``), so restore comparisons keep them on; a live FUSE mount may not.
    * ``xattrs``: extended attributes.
    * ``hardlinks``: which paths share an inode (a FUSE mount shows every name as its own inode).

    Access times are never compared: reading a tree changes them.
    """
    ea = a if isinstance(a, Mapping) else scan_tree(a)
    eb = b if isinstance(b, Mapping) else scan_tree(b)
    diffs = []
    for rel in sorted(ea.keys() - eb.keys()):
        diffs.append(f"{_show(rel)}: only in the first tree ({ea[rel].kind})")
    for rel in sorted(eb.keys() - ea.keys()):
        diffs.append(f"{_show(rel)}: only in the second tree ({eb[rel].kind})")
    for rel in sorted(ea.keys() & eb.keys()):
        x, y = ea[rel], eb[rel]
        if x.kind != y.kind:
            diffs.append(f"{_show(rel)}: type {x.kind} != {y.kind}")
            continue
        checks: list[tuple[str, object, object]] = [
            ("mode", oct(x.mode), oct(y.mode)),
            ("size", x.size, y.size),
            ("content sha256", x.sha256, y.sha256),
            ("symlink target", x.target, y.target),
            ("rdev", x.rdev, y.rdev),
        ]
        if owners:
            checks.append(("owner uid:gid", f"{x.uid}:{x.gid}", f"{y.uid}:{y.gid}"))
        wants_time = times and {"dir": dir_times, "symlink": symlink_times}.get(x.kind, True)
        if wants_time:
            checks.append(("mtime", _ns(x.mtime_ns), _ns(y.mtime_ns)))
        if xattrs:
            checks.append(("xattrs", dict(x.xattrs), dict(y.xattrs)))
        if hardlinks:
            checks.append(("hardlink group", _group(x.links), _group(y.links)))
        for what, va, vb in checks:
            if va != vb:
                diffs.append(f"{_show(rel)}: {what} {va!r} != {vb!r}")
    return diffs


def _group(links: tuple[bytes, ...]) -> list[str]:
    return [os.fsdecode(p) for p in links]


def assert_same_tree(
    a: Path | str | bytes | Mapping[bytes, Entry],
    b: Path | str | bytes | Mapping[bytes, Entry],
    *,
    owners: bool,
    limit: int = 40,
    **options: bool,
) -> None:
    """``compare_trees`` as an assertion whose message shows the first ``limit`` differences."""
    diffs = compare_trees(a, b, owners=owners, **options)
    if diffs:
        shown = "\n  ".join(diffs[:limit])
        more = f"\n  ... and {len(diffs) - limit} more" if len(diffs) > limit else ""
        raise AssertionError(
            f"{len(diffs)} differences between {_label(a)} and {_label(b)}:\n  {shown}{more}"
        )


def _label(tree: object) -> str:
    return "a scanned tree" if isinstance(tree, Mapping) else str(tree)
