"""What a test does when something it needs is missing: skip on a developer machine, fail under CI.

CI (``CI=true``, set by .ci/run) promises restic and FUSE, so a missing tool there is a broken runner and
must not pass silently as a skip.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    """True when running under CI (the environment variable CI is exactly "true")."""
    return os.environ.get("CI") == "true"


def unavailable(reason: str) -> NoReturn:
    """Fail the calling test under CI, skip it elsewhere."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)
