"""vault verify: hashing every vault file against its name, without the password.

Most tests use a folder in the vault layout filled with random files named by their hash (verify does
not need real vault content), so they need neither restic nor a password.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tools.cli import vault
from vaultfs.backend import Backend, LocalBackend, open_backend
from vaultfs.errors import NoVault, ObjectNotFound, UsageError
from vaultfs.ops.verify import (
    CONSEQUENCES,
    FOLDERS,
    Subset,
    VerifyState,
    parse_duration,
    verify,
)
from vaultfs.tools.main import main


def _put(root: Path, folder: str, data: bytes) -> str:
    name = hashlib.sha256(data).hexdigest()
    where = root / folder / name[:2] if folder == "data" else root / folder
    where.mkdir(parents=True, exist_ok=True)
    (where / name).write_bytes(data)
    return f"{folder}/{name[:2]}/{name}" if folder == "data" else f"{folder}/{name}"


def fake_vault(root: Path, packs: int = 30) -> list[str]:
    """A folder in the vault layout: random files named by their hash. Returns their vault paths."""
    for folder in FOLDERS:
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "config").write_bytes(os.urandom(155))
    paths = [_put(root, "keys", os.urandom(400))]
    paths += [_put(root, "data", os.urandom(1000 + 997 * i)) for i in range(packs)]
    paths += [_put(root, "index", os.urandom(300)) for _ in range(3)]
    paths += [_put(root, "snapshots", os.urandom(200)) for _ in range(4)]
    return sorted(paths)


def flip(path: Path, offset: int = 10) -> None:
    os.chmod(path, 0o600)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_clean_vault_every_file_checked(tmp_path):
    paths = fake_vault(tmp_path / "v")
    report = verify(open_backend(str(tmp_path / "v")))
    assert report.ok
    assert report.files_checked == len(paths)  # config is not content-addressed: skipped
    assert report.bytes_checked == sum((tmp_path / "v" / p).stat().st_size for p in paths)
    assert report.bad == [] and report.temp_files == [] and report.fatal == []


def test_damage_temp_and_stray_files_reported_by_folder(tmp_path):
    root = tmp_path / "v"
    paths = fake_vault(root)
    pack = next(p for p in paths if p.startswith("data/"))
    index = next(p for p in paths if p.startswith("index/"))
    flip(root / pack)
    flip(root / index)
    (root / f"{pack}-tmp-0123abcd").write_bytes(b"half a pack")
    rsync_temp = f"index/.{index.rsplit('/', 1)[1]}.Ab12Cd"
    (root / rsync_temp).write_bytes(b"half an index")
    (root / "data" / "00").mkdir(exist_ok=True)
    (root / "data" / "00" / "garbage.txt").write_bytes(b"nothing")
    name = hashlib.sha256(b"misplaced").hexdigest()
    wrong = "00" if not name.startswith("00") else "01"
    (root / "data" / wrong).mkdir(exist_ok=True)
    (root / "data" / wrong / name).write_bytes(b"misplaced")

    report = verify(LocalBackend(str(root)))
    assert not report.ok
    bad = {b.path: b for b in report.bad}
    assert set(bad) == {pack, index, "data/00/garbage.txt", f"data/{wrong}/{name}"}
    assert bad[pack].folder == "data" and bad[pack].consequence == CONSEQUENCES["data"]
    assert "hash mismatch" in bad[pack].problem and bad[pack].kind == "damaged"
    assert bad["data/00/garbage.txt"].kind == "unexpected"
    assert bad[index].folder == "index" and bad[index].consequence == CONSEQUENCES["index"]
    assert "not a vault object name" in bad["data/00/garbage.txt"].problem
    assert "wrong folder" in bad[f"data/{wrong}/{name}"].problem
    assert report.temp_files == [f"{pack}-tmp-0123abcd", rsync_temp]
    assert report.files_checked == len(paths)


class FlakyBackend(Backend):
    """A memory backend whose reads of some objects come back wrong, once or always."""

    def __init__(self, objects: dict[tuple[str, str], bytes], bad_once: set[str], bad: set[str]):
        self.location = "memory:"
        self.objects = objects
        self.bad_once = set(bad_once)
        self.bad = bad
        self.reads: dict[str, int] = {}
        self.stats: list[str] = []

    def list(self, kind: str) -> Iterator[tuple[str, int]]:
        for (k, name), data in sorted(self.objects.items()):
            if k == kind:
                yield name, len(data)

    def stat(self, kind: str, name: str) -> int:
        self.stats.append(name)
        if (kind, name) not in self.objects:
            raise ObjectNotFound(f"{kind}/{name} does not exist")
        return len(self.objects[kind, name])

    def read(self, kind: str, name: str, offset: int = 0, length: int | None = None) -> bytes:
        data = self.objects[kind, name]
        data = data[offset:] if length is None else data[offset : offset + length]
        self.reads[name] = self.reads.get(name, 0) + 1
        if name in self.bad or name in self.bad_once:
            self.bad_once.discard(name)
            data = bytes([data[0] ^ 1]) + data[1:]  # never the byte it was
        return data

    def write(self, kind: str, name: str, data: bytes | bytearray | memoryview) -> None:
        self.objects[kind, name] = bytes(data)

    def remove(self, kind: str, name: str) -> None:
        self.objects.pop((kind, name), None)

    def exists(self, kind: str, name: str) -> bool:
        return (kind, name) in self.objects


def test_mismatch_is_read_twice_before_it_is_reported():
    objects = {}
    for i in range(6):
        data = os.urandom(5000 + i)
        objects["data", hashlib.sha256(data).hexdigest()] = data
    objects["config", ""] = b"x"
    key = os.urandom(100)
    objects["keys", hashlib.sha256(key).hexdigest()] = key
    names = sorted(n for k, n in objects if k == "data")
    backend = FlakyBackend(objects, bad_once={names[0]}, bad={names[1]})
    report = verify(backend)
    assert report.flaky == [f"data/{names[0][:2]}/{names[0]}"]
    assert [b.path for b in report.bad] == [f"data/{names[1][:2]}/{names[1]}"]
    assert backend.reads[names[0]] == 2 and backend.reads[names[1]] == 2
    assert backend.reads[names[2]] == 1
    assert report.files_checked == 7
    # The listing gives the sizes: only the re-read after a mismatch asks again (a request each).
    assert sorted(backend.stats) == sorted(names[:2])


@pytest.mark.parametrize("state_name", ["state.json", "state.sqlite"])
def test_state_resume_max_age_and_gone_files(tmp_path, state_name):
    root = tmp_path / "v"
    paths = fake_vault(root, packs=40)
    state = str(tmp_path / state_name)
    backend = LocalBackend(str(root))
    total = sum((root / p).stat().st_size for p in paths)
    hashed = 0

    def stop_halfway(n: int) -> None:
        nonlocal hashed
        hashed += n
        if hashed > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        verify(backend, state_path=state, progress=stop_halfway, workers=1)
    saved = VerifyState(state, os.path.realpath(root))
    assert saved.run_finished is None and 0 < len(saved.records) < len(paths)
    done_before = len(saved.records)
    saved.close()

    resumed = verify(backend, state_path=state)
    assert resumed.resumed and resumed.ok
    assert resumed.files_skipped == done_before
    assert resumed.files_checked == len(paths) - done_before

    # A finished run: without --max-age the next run checks everything again ...
    again = verify(backend, state_path=state)
    assert not again.resumed and again.files_checked == len(paths)
    # ... with it, only what is older than that (the clock moves on by 2 hours here).
    fresh = verify(backend, state_path=state, max_age=3600)
    assert fresh.files_checked == 0 and fresh.files_skipped == len(paths)
    later = verify(backend, state_path=state, max_age=3600, clock=lambda: _now() + 7200)
    assert later.files_checked == len(paths)

    # A file found damaged is checked by every run until it is fixed; a removed one is reported once.
    flip(root / paths[5])
    bad = verify(backend, state_path=state, max_age=3600, clock=lambda: _now() + 4 * 3600)
    assert [b.path for b in bad.bad] == [paths[5]] and bad.files_checked == len(paths)
    still_bad = verify(backend, state_path=state, max_age=3600, clock=lambda: _now() + 4 * 3600)
    assert [b.path for b in still_bad.bad] == [paths[5]] and still_bad.files_checked == 1
    snap = next(p for p in paths if p.startswith("snapshots/"))
    os.chmod(root / snap, 0o600)
    (root / snap).unlink()
    gone = verify(backend, state_path=state, max_age=3600, clock=lambda: _now() + 4 * 3600)
    assert [(g.path, g.consequence) for g in gone.gone_since_last_run] == [
        (snap, CONSEQUENCES["snapshots"])
    ]
    assert verify(backend, state_path=state).gone_since_last_run == []
    if state_name.endswith(".sqlite"):
        with sqlite3.connect(state) as db:
            assert db.execute("SELECT count(*) FROM files").fetchone()[0] == len(paths) - 1
    else:
        doc = json.loads(Path(state).read_text())
        assert doc["format"] == "vaultfs-verify-state" and len(doc["files"]) == len(paths) - 1


def _now() -> float:
    return time.time()


def test_state_of_another_vault_is_refused(tmp_path):
    fake_vault(tmp_path / "a", packs=2)
    fake_vault(tmp_path / "b", packs=2)
    state = str(tmp_path / "s.json")
    verify(LocalBackend(str(tmp_path / "a")), state_path=state)
    with pytest.raises(UsageError, match="belongs to the vault"):
        verify(LocalBackend(str(tmp_path / "b")), state_path=state)


def test_subsets_split_the_vault_into_disjoint_slices(tmp_path):
    paths = fake_vault(tmp_path / "v", packs=60)
    backend = LocalBackend(str(tmp_path / "v"))
    seen: list[str] = []
    for n in range(1, 8):
        report = verify(backend, subset=Subset(n, 7))
        assert report.files_checked + report.files_skipped == len(paths)
        chosen = {p for p in paths if Subset(n, 7).selects(p.rsplit("/", 1)[1])}
        assert report.files_checked == len(chosen)
        seen += sorted(chosen)
    assert sorted(seen) == paths  # every file in exactly one slice


def test_missing_config_and_keys_are_fatal(tmp_path):
    root = tmp_path / "v"
    paths = fake_vault(root, packs=2)
    (root / "config").unlink()
    for p in paths:
        if p.startswith("keys/"):
            (root / p).unlink()
    report = verify(LocalBackend(str(root)))
    assert not report.ok and len(report.fatal) == 2
    assert "config is missing" in report.fatal[0] and "no key file" in report.fatal[1]
    with pytest.raises(NoVault):
        verify(LocalBackend(str(tmp_path / "nothing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoVault):
        verify(LocalBackend(str(tmp_path / "empty")))


def test_parsers():
    assert parse_duration("30d") == 30 * 86400
    assert parse_duration("1d12h") == 36 * 3600
    assert parse_duration("2w") == 14 * 86400
    for bad in ("", "30", "d", "3x", "1d x"):
        with pytest.raises(UsageError):
            parse_duration(bad)
    assert Subset.parse("2/7") == Subset(2, 7)
    assert Subset.parse("10%").fraction == pytest.approx(0.1)
    for bad in ("0/7", "8/7", "1/0", "abc", "0%", "101%"):
        with pytest.raises(UsageError):
            Subset.parse(bad)
    with pytest.raises(UsageError):
        Subset.parse("5%", allow_percent=False)


def test_cli_exit_codes_json_and_text(tmp_path):
    root = tmp_path / "v"
    paths = fake_vault(root, packs=5)
    ok = vault("verify", root, password=None)
    assert "no damage found" in ok.out
    doc = json.loads(vault("verify", "-r", root, "--json", password=None).out)
    assert doc["ok"] is True and doc["files_checked"] == len(paths)
    pack = next(p for p in paths if p.startswith("data/"))
    flip(root / pack)
    bad = vault("verify", root, "--state", tmp_path / "st.db", password=None, expect=1)
    assert pack in bad.out and CONSEQUENCES["data"] in bad.out


def test_cli_usage_errors(tmp_path, capsys):
    root = tmp_path / "v"
    fake_vault(root, packs=1)
    previous = signal.getsignal(signal.SIGTERM)  # main() installs its own handler
    try:
        assert main(["verify", str(root), "--subset", "9/7"]) == 2
        assert main(["verify", str(root), "--max-age", "30d"]) == 2  # --max-age needs --state
        assert main(["verify", str(root), "--state", str(tmp_path / "s"), "--max-age", "3x"]) == 2
        assert main(["verify", str(tmp_path / "none")]) == 10
    finally:
        signal.signal(signal.SIGTERM, previous)
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 4 and all(e.startswith("vault: error: ") for e in errors)


def test_verify_command_loads_no_crypto_numpy_or_zstd(tmp_path):
    """`vault verify` needs no password, so start-up must not pay for the repository layer: the
    heavy modules stay unloaded (in a fresh interpreter, as the command runs)."""
    import subprocess
    import sys

    fake_vault(tmp_path / "v", packs=3)
    probe = (
        "import sys\n"
        "from vaultfs.tools.main import main\n"
        f"code = main(['verify', {str(tmp_path / 'v')!r}])\n"
        "heavy = ('numpy', 'cryptography', 'zstandard', 'ssl', 'sqlite3', 'rich', 'ctypes')\n"
        "print(code, sorted(m for m in heavy if m in sys.modules), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert proc.stderr.strip().splitlines()[-1] == "0 []"
