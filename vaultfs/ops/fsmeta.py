"""Applying file-system metadata as restic records it: extended attributes, owners, modes, times.

(Reading it for a backup lives in ``vaultfs.ops.scan``.) Targets are ``bytes`` paths (``os.fsencode``:
names need not be UTF-8) or open file descriptors (cheaper: no path lookup; restore uses them for files it
has just written). Nothing here follows symlinks: a path call works on the link itself.

The order matters: extended attributes first (setting them needs
write permission, which a mode such as 0o444 or 000 takes away from a non-root user), then the owner
(``chown`` clears setuid/setgid, so it must come before the mode), then the mode, and the times last
(every earlier step may touch the ctime, and a folder's mtime must not change after it is set).
"""

from __future__ import annotations

import os
import stat

from vaultfs.format.gojson import GoTime
from vaultfs.format.tree import Node

# utimensat takes a signed 64-bit count of nanoseconds in Python's os.utime; Go's zero time (year 1) is
# far below that, so such a time cannot be set and is left alone.
_MIN_NS = -(2**63) + 1
_MAX_NS = 2**63 - 1


def is_root() -> bool:
    """True when this process may set owners and create device nodes (effective uid 0)."""
    return os.geteuid() == 0


# -- applying -------------------------------------------------------------------------------------


Target = bytes | int


def _nofollow(target: Target) -> dict[str, bool]:
    # follow_symlinks=False is an error together with a file descriptor.
    return {} if isinstance(target, int) else {"follow_symlinks": False}


def apply_xattrs(target: Target, attrs: list[tuple[str, bytes]]) -> list[str]:
    """Set each extended attribute; returns one warning per attribute that could not be set."""
    problems = []
    for name, value in attrs:
        try:
            os.setxattr(target, name, value, **_nofollow(target))
        except OSError as exc:
            problems.append(f"cannot set extended attribute {name}: {exc.strerror}")
    return problems


def apply_owner(target: Target, uid: int, gid: int) -> str | None:
    """lchown/fchown to the numeric ids (restic restores numbers, not names). Returns a warning or None."""
    try:
        if isinstance(target, int):
            os.fchown(target, uid, gid)
        else:
            os.lchown(target, uid, gid)
    except OSError as exc:
        return f"cannot set owner {uid}:{gid}: {exc.strerror}"
    return None


def apply_mode(target: Target, node: Node) -> str | None:
    """chmod to the node's permission and setuid/setgid/sticky bits (symlinks have no mode of their own)."""
    if node.type == "symlink":
        return None
    mode = stat.S_IMODE(node.unix_mode)
    try:
        # Linux has no lchmod, and the node is known not to be a symlink.
        os.chmod(target, mode)
    except OSError as exc:
        return f"cannot set mode {mode:04o}: {exc.strerror}"
    return None


def _settable(t: GoTime) -> bool:
    return _MIN_NS <= t.ns <= _MAX_NS


def apply_times(target: Target, atime: GoTime, mtime: GoTime) -> str | None:
    """Set access and modification time with nanoseconds, on the link itself for symlinks.

    A time outside what the kernel takes (Go's zero time) is replaced by the other one, or both are left
    alone when neither fits.
    """
    a_ok, m_ok = _settable(atime), _settable(mtime)
    if not (a_ok or m_ok):
        return None
    times = (atime.ns if a_ok else mtime.ns, mtime.ns if m_ok else atime.ns)
    try:
        os.utime(target, ns=times, **_nofollow(target))
    except (OSError, OverflowError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        return f"cannot set times: {reason}"
    return None


def apply_metadata(target: Target, node: Node, *, owners: bool) -> list[str]:
    """Apply xattrs, owner (when ``owners``), mode and times of ``node`` to ``target``, in that order.

    Returns warnings for what could not be applied; never raises for a metadata failure.
    """
    problems = apply_xattrs(target, node.extended_attributes) if node.extended_attributes else []
    steps = []
    if owners:
        steps.append(apply_owner(target, node.uid, node.gid))
    steps.append(apply_mode(target, node))
    steps.append(apply_times(target, node.atime, node.mtime))
    problems.extend(p for p in steps if p)
    return problems
