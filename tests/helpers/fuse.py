"""FUSE availability for tests that mount: /dev/fuse usable and fusermount3 installed."""

from __future__ import annotations

import os
import shutil

from tests.helpers.ci import unavailable


def require_fuse() -> str:
    """Return the path of fusermount3; skip the calling test without FUSE (fail it under CI=true)."""
    if not os.path.exists("/dev/fuse"):
        unavailable("/dev/fuse does not exist (load the fuse module or run the container with it)")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        unavailable("/dev/fuse is not readable and writable by this user")
    path = shutil.which("fusermount3")
    if path is None:
        unavailable("fusermount3 is not installed (apt-get install fuse3)")
    return path
