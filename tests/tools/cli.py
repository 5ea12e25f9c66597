"""Run the real `vault` CLI in a subprocess, as a user or a script would."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from tests.helpers.env import env_for


@dataclass
class Result:
    code: int
    out: str
    err: str


def vault(
    *args: str | os.PathLike[str],
    password: str | None = "pw",
    expect: int | None = 0,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    timeout: float = 300,
) -> Result:
    """Run ``vault ARGS``; assert the exit code when ``expect`` is not None. Never a traceback."""
    full_env = env_for(password)
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "vaultfs.tools.main", *map(os.fspath, args)],
        capture_output=True,
        text=True,
        errors="surrogateescape",
        env=full_env,
        input=stdin,
        timeout=timeout,
    )
    result = Result(proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    if expect is not None:
        assert proc.returncode == expect, (
            f"vault {' '.join(map(str, args))} exited {proc.returncode}, expected {expect}\n{proc.stderr}"
        )
    return result


def one_line_error(result: Result) -> str:
    """The error line of a failed command; asserts it is exactly one line starting with 'vault: error:'."""
    lines = [ln for ln in result.err.splitlines() if ln.strip()]
    assert len(lines) == 1, result.err
    assert lines[0].startswith("vault: error: "), result.err
    return lines[0]
