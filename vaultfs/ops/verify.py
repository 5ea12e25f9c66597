"""Verify a vault without its password: every file's SHA-256 must equal its name (FORMAT.md §1).

Works on anything in the vault layout: a vault folder, a copy on a USB disk, a bucket folder on a NAS,
or any backend (through ``Backend.read``). ``config`` is not content-addressed and is skipped; leftover
temp files (``-tmp-`` in the name, from interrupted writes, or rsync's ``.<name>.<random>``) are
listed apart, not as corruption. Files in
the vault's folders whose names are not object names, or that sit in the wrong ``data/`` sub-folder, are
reported as unexpected: restic and vaultfs never look at them.

Hashing runs in a thread pool (hashlib releases the GIL on large buffers, so it uses every core),
largest files first; each file is read through a buffer of its own of at most 4 MiB. A file whose hash does not match is read a second time
(local files after dropping them from the page cache) before it is reported, so a one-off read error is
told apart from damage at rest.

``state`` (a JSON or SQLite file) records when each file was last verified and with what outcome. A run
that was interrupted resumes where it stopped; ``max_age`` skips files verified successfully more
recently than that; ``subset`` (n, t) checks only the n-th of t stable slices of the files (by name), so
``--subset $(date +%u)/7`` spreads the work over a week. Files the state knows but the vault no longer
has are reported as gone since the last run (prune and forget remove files legitimately; a surprise here
is worth a look).

Thread safety: ``verify`` is a plain blocking function; call it from one thread per vault.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vaultfs.backend import Backend, LocalBackend
from vaultfs.backend.local import TEMP_MARK
from vaultfs.errors import NoVault, UsageError, VaultError

if TYPE_CHECKING:
    import sqlite3

#: Folders of a vault whose files are named by the SHA-256 of their bytes.
FOLDERS = ("keys", "data", "index", "snapshots", "locks", "packindex")

#: What a missing or damaged file in each folder means (ARCHITECTURE.md, "How a missing or damaged
#: file hurts"). Every report that names a bad file names this consequence with it.
CONSEQUENCES = {
    "keys": "the vault cannot be opened with this key's password (fatal if it is the only key)",
    "config": "the vault cannot be opened: fatal",
    "data": "blobs are lost: snapshots that reference them are damaged",
    "index": "dedup forgets blobs and re-uploads happen; rebuild-indexes fixes it from pack headers",
    "snapshots": "that snapshot is gone; its data becomes garbage for prune",
    "locks": "a running job is unprotected: prune may delete data it needs",
    "packindex": "retention is slower; rebuilt on demand",
}

READ_SIZE = 4 * 1024 * 1024
_NAME = re.compile(r"[0-9a-f]{64}\Z")
_SUBDIR = re.compile(r"[0-9a-f]{2}\Z")
# How often (seconds) the state file is saved while a run is going, so a killed run loses little; at
# least 20 times as long as a save takes, so a huge JSON state never costs more than 5% of the run.
STATE_SAVE_EVERY = 5.0

ProgressCallback = Callable[[int], None]


# -- report -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadFile:
    """One file that failed: ``path`` relative to the vault (``data/3f/3f…``), its folder, what is
    wrong, and what that means for the vault. ``kind`` is ``damaged`` (its hash is not its name),
    ``unreadable``, ``unexpected`` (not a vault object, or not where one belongs) or ``gone``."""

    path: str
    folder: str
    problem: str
    consequence: str
    size: int = 0
    kind: str = "damaged"


@dataclass
class VerifyReport:
    location: str
    files_checked: int = 0
    bytes_checked: int = 0
    #: files not hashed this run: verified recently (``max_age``), already done by the interrupted
    #: run being resumed, or outside ``subset``
    files_skipped: int = 0
    bad: list[BadFile] = field(default_factory=list)
    #: leftover temp files of interrupted writes (not corruption; safe to delete when nothing runs)
    temp_files: list[str] = field(default_factory=list)
    #: the first read gave a wrong hash but the second read was right: a flaky disk, cable or RAM
    flaky: list[str] = field(default_factory=list)
    #: listed, then gone before they could be read (a lock refresh or a prune running meanwhile)
    vanished: list[str] = field(default_factory=list)
    #: files the state file knew from an earlier run that are no longer in the vault
    gone_since_last_run: list[BadFile] = field(default_factory=list)
    #: problems that make the whole vault unusable (no config, no key file)
    fatal: list[str] = field(default_factory=list)
    resumed: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.bad and not self.fatal


# -- durations and subsets ---------------------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Seconds in ``30d``, ``12h``, ``90m``, ``45s``, ``2w`` (combinations like ``1d12h`` too)."""
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhdw])", text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != text.strip().lower():
        raise UsageError(f"invalid duration {text!r}: use a number with s, m, h, d or w, e.g. 30d")
    return sum(float(n) * _UNITS[u] for n, u in parts)


@dataclass(frozen=True)
class Subset:
    """A stable slice n of t of a set of objects (by name), or a random fraction of them."""

    n: int = 1
    t: int = 1
    fraction: float | None = None

    @classmethod
    def parse(cls, text: str, *, allow_percent: bool = True) -> Subset:
        """``n/t`` (1 <= n <= t) or, when allowed, ``x%`` (0 < x <= 100)."""
        text = text.strip()
        m = re.fullmatch(r"(\d+)/(\d+)", text)
        if m:
            n, t = int(m.group(1)), int(m.group(2))
            if t < 1 or not 1 <= n <= t:
                raise UsageError(f"invalid subset {text!r}: need n/t with 1 <= n <= t")
            return cls(n, t)
        m = re.fullmatch(r"(\d+(?:\.\d+)?)%", text)
        if m and allow_percent:
            pct = float(m.group(1))
            if not 0 < pct <= 100:
                raise UsageError(f"invalid subset {text!r}: the percentage must be in (0, 100]")
            return cls(fraction=pct / 100)
        forms = "n/t or x%" if allow_percent else "n/t"
        raise UsageError(f"invalid subset {text!r}: use {forms}, e.g. 1/7")

    def selects(self, name: str) -> bool:
        if self.fraction is not None:
            import random  # only random fractions need it

            return random.random() < self.fraction
        if self.t == 1:
            return True
        key = name if _NAME.match(name) else hashlib.sha256(name.encode()).hexdigest()
        return int(key[:16], 16) % self.t == self.n - 1

    def __str__(self) -> str:
        return f"{self.fraction * 100:g}%" if self.fraction is not None else f"{self.n}/{self.t}"


# -- the files of a vault -------------------------------------------------------------------------


@dataclass(frozen=True)
class VaultFile:
    """A file to hash: ``path`` relative to the vault, ``name`` the object name it must hash to."""

    path: str
    folder: str
    name: str
    size: int
    local: str | None = None  # absolute path for files of a local folder


def object_path(kind: str, name: str) -> str:
    """The vault-relative path of an object (``data/3f/3f…`` or ``index/…``)."""
    return f"data/{name[:2]}/{name}" if kind == "data" else f"{kind}/{name}"


def _local_backend(backend: Backend) -> LocalBackend | None:
    inner = getattr(backend, "inner", backend)
    return inner if isinstance(inner, LocalBackend) else None


class _Scan:
    """Lists the files of a vault, sorting out temp files and files that are not objects."""

    def __init__(self, backend: Backend, report: VerifyReport) -> None:
        self.backend = backend
        self.report = report
        self.local = _local_backend(backend)

    def _unexpected(self, path: str, folder: str, problem: str, size: int = 0) -> None:
        self.report.bad.append(
            BadFile(
                path,
                folder,
                problem,
                "none for the vault (restic and vaultfs ignore it); repair moves it away",
                size,
                "unexpected",
            )
        )

    def files(self) -> Iterator[VaultFile]:
        if self.local is not None:
            yield from self._local_files(self.local.root)
        else:
            for kind in FOLDERS:
                for name, size in self.backend.list(kind):
                    if not _NAME.match(name):
                        self._unexpected(object_path(kind, name), kind, "not a vault object name")
                        continue
                    yield VaultFile(object_path(kind, name), kind, name, size)

    def check_structure(self) -> None:
        """Fatal problems: no config or no key file means nobody can open the vault."""
        if not self.backend.exists("config", ""):
            self.report.fatal.append(
                "config is missing: " + CONSEQUENCES["config"] + "; restore it from a copy"
            )
        if not any(_NAME.match(n) for n, _ in self.backend.list("keys")):
            self.report.fatal.append(
                "keys/ holds no key file: the vault cannot be opened with any password; "
                "restore a key file from a copy"
            )

    def _local_files(self, root: str) -> Iterator[VaultFile]:
        for folder in FOLDERS:
            top = os.path.join(root, folder)
            if folder != "data":
                yield from self._local_dir(root, top, folder, None)
                continue
            try:
                subs = sorted(os.scandir(top), key=lambda e: e.name)
            except FileNotFoundError:
                continue
            except OSError as exc:
                self.report.fatal.append(f"cannot list data/: {exc.strerror}")
                continue
            for entry in subs:
                rel = f"data/{entry.name}"
                if entry.is_dir():
                    if _SUBDIR.match(entry.name):
                        yield from self._local_dir(root, entry.path, folder, entry.name)
                    else:
                        self._unexpected(rel + "/", folder, "unexpected folder")
                elif _is_temp(entry.name):
                    self.report.temp_files.append(rel)
                else:
                    self._unexpected(rel, folder, "a file directly in data/ (not in a sub-folder)")

    def _local_dir(self, root: str, path: str, folder: str, sub: str | None) -> Iterator[VaultFile]:
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except FileNotFoundError:
            return
        except OSError as exc:
            rel = os.path.relpath(path, root)
            self.report.bad.append(
                BadFile(
                    rel + "/",
                    folder,
                    f"cannot list: {exc.strerror}",
                    CONSEQUENCES[folder],
                    kind="unreadable",
                )
            )
            return
        for entry in entries:
            rel = os.path.relpath(entry.path, root)
            if _is_temp(entry.name):
                self.report.temp_files.append(rel)
                continue
            try:
                if not entry.is_file():
                    self._unexpected(rel + ("/" if entry.is_dir() else ""), folder, "not a file")
                    continue
                size = entry.stat().st_size
            except FileNotFoundError:
                continue
            if not _NAME.match(entry.name):
                self._unexpected(rel, folder, "not a vault object name", size)
            elif sub is not None and entry.name[:2] != sub:
                self._unexpected(
                    rel, folder, f"in the wrong folder (belongs in data/{entry.name[:2]}/)", size
                )
            else:
                yield VaultFile(rel, folder, entry.name, size, entry.path)


def _is_temp(name: str) -> bool:
    """Temp files of interrupted writes: ours and the bucket server's (``<name>-tmp-<random>``), and
    rsync's (``.<name>.<random>``, while a copy to the NAS is running)."""
    return TEMP_MARK in name or name.startswith(".")


# -- hashing ------------------------------------------------------------------------------------


class _Hasher:
    """Hashes files in worker threads."""

    def __init__(self, backend: Backend, progress: ProgressCallback | None) -> None:
        self.backend = backend
        self.progress = progress

    def digest(self, f: VaultFile, *, again: bool = False) -> tuple[str, int]:
        """(hex SHA-256, bytes read). Raises OSError or VaultError."""
        h = hashlib.sha256()
        done = 0
        if f.local is not None:
            # A new (zeroed) buffer per file, not one reused per thread: measured on 2 cores, the
            # kernel's copies into a freshly written buffer cost ~30 ms less system time per 750 MB
            # than into one last read by the hash (which may have run on the other core), more than
            # the zeroing costs. Small files get a small buffer.
            buf = bytearray(min(READ_SIZE, max(f.size, 64 * 1024)))
            view = memoryview(buf)
            fd = os.open(f.local, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if again:
                    # The second read must come from the disk, not from pages cached by the first.
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                while True:
                    n = os.readv(fd, [buf])
                    if not n:
                        break
                    h.update(view[:n])
                    done += n
                    if self.progress is not None and not again:
                        self.progress(n)
            finally:
                os.close(fd)
            return h.hexdigest(), done
        kind = f.folder
        # The listing gave the size (a request per file less); the second read, after a mismatch,
        # asks again in case the file changed since.
        size = self.backend.stat(kind, f.name) if again else f.size
        while done < size:
            piece = self.backend.read(kind, f.name, done, min(READ_SIZE, size - done))
            h.update(piece)
            done += len(piece)
            if self.progress is not None and not again:
                self.progress(len(piece))
        return h.hexdigest(), done

    def check(self, f: VaultFile) -> tuple[str, int, str]:
        """(outcome, bytes, detail): outcome is ok, flaky, bad, unreadable or vanished."""
        try:
            digest, size = self.digest(f)
        except FileNotFoundError:
            return "vanished", 0, ""
        except VaultError as exc:
            if not self._exists(f):
                return "vanished", 0, ""
            return "unreadable", 0, str(exc)
        except OSError as exc:
            return "unreadable", 0, exc.strerror or str(exc)
        if digest == f.name:
            return "ok", size, ""
        try:
            second, size = self.digest(f, again=True)
        except (OSError, VaultError) as exc:
            return "unreadable", size, f"hash mismatch, then unreadable: {exc}"
        if second == f.name:
            return "flaky", size, ""
        return "bad", size, f"hash mismatch (content hashes to {second[:16]}…)"

    def _exists(self, f: VaultFile) -> bool:
        if f.local is not None:
            return os.path.exists(f.local)
        try:
            return self.backend.exists(f.folder, f.name)
        except VaultError:
            return True


# -- state ----------------------------------------------------------------------------------------


@dataclass
class _Record:
    size: int
    verified_at: float
    ok: bool


class VerifyState:
    """What earlier runs verified, kept in a JSON or SQLite file (chosen by extension: ``.db``,
    ``.sqlite`` and ``.sqlite3`` are SQLite, anything else JSON; an existing file by its content).

    Holds the vault location, when the current run started, whether it finished, and for each file
    its size, when it was last verified and whether it was good. Used from one thread.
    """

    FORMAT = "vaultfs-verify-state"

    def __init__(self, path: str, location: str) -> None:
        self.path = path
        self.location = location
        self.records: dict[str, _Record] = {}
        self.run_started: float | None = None
        self.run_finished: float | None = None
        self.sqlite = _is_sqlite(path)
        self._db: sqlite3.Connection | None = None
        self._dirty: dict[str, _Record | None] = {}
        self._load()

    def _load(self) -> None:
        if self.sqlite:
            self._load_sqlite()
            return
        import json  # state files only: not loaded by every verify run

        try:
            with open(self.path, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read state file {self.path}: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != self.FORMAT:
            raise UsageError(f"{self.path} is not a vault verify state file")
        self._check_location(doc.get("location"))
        run = doc.get("run") or {}
        self.run_started = run.get("started")
        self.run_finished = run.get("finished")
        for path, (size, at, ok) in (doc.get("files") or {}).items():
            self.records[path] = _Record(int(size), float(at), bool(ok))

    def _load_sqlite(self) -> None:
        import sqlite3  # only state files use it: not imported by every verify run

        try:
            db = self._db = sqlite3.connect(self.path)
            db.executescript(
                "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);"
                "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, "
                "verified_at REAL, ok INTEGER);"
            )
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("format", self.FORMAT) != self.FORMAT:
                raise UsageError(f"{self.path} is not a vault verify state file")
            self._check_location(meta.get("location"))
            self.run_started = float(meta["started"]) if meta.get("started") else None
            self.run_finished = float(meta["finished"]) if meta.get("finished") else None
            for path, size, at, ok in db.execute("SELECT path, size, verified_at, ok FROM files"):
                self.records[path] = _Record(size, at, bool(ok))
        except sqlite3.Error as exc:
            raise UsageError(f"cannot use state file {self.path}: {exc}") from None

    def _check_location(self, recorded: str | None) -> None:
        if recorded and recorded != self.location:
            raise UsageError(
                f"state file {self.path} belongs to the vault at {recorded}, not {self.location}; "
                "use one state file per vault copy"
            )

    def begin(self, now: float) -> bool:
        """Start a run; returns True when it resumes an interrupted one."""
        resume = self.run_started is not None and self.run_finished is None
        if not resume:
            self.run_started = now
        self.run_finished = None
        self.save()
        return resume

    def record(self, path: str, size: int, at: float, ok: bool) -> None:
        rec = _Record(size, at, ok)
        self.records[path] = rec
        self._dirty[path] = rec

    def forget(self, path: str) -> None:
        if self.records.pop(path, None) is not None:
            self._dirty[path] = None

    def finish(self, now: float) -> None:
        self.run_finished = now
        self.save()

    def save(self) -> None:
        import sqlite3

        try:
            if self.sqlite:
                self._save_sqlite()
            else:
                self._save_json()
        except (OSError, sqlite3.Error) as exc:
            raise VaultError(f"cannot write state file {self.path}: {exc}") from None
        self._dirty.clear()

    def _save_json(self) -> None:
        import json

        doc = {
            "format": self.FORMAT,
            "version": 1,
            "location": self.location,
            "run": {"started": self.run_started, "finished": self.run_finished},
            "files": {p: [r.size, r.verified_at, r.ok] for p, r in sorted(self.records.items())},
        }
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _save_sqlite(self) -> None:
        db = self._db
        assert db is not None
        with db:
            meta = {
                "format": self.FORMAT,
                "location": self.location,
                "started": "" if self.run_started is None else repr(self.run_started),
                "finished": "" if self.run_finished is None else repr(self.run_finished),
            }
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", meta.items())
            gone = [(p,) for p, r in self._dirty.items() if r is None]
            db.executemany("DELETE FROM files WHERE path = ?", gone)
            db.executemany(
                "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)",
                [(p, r.size, r.verified_at, int(r.ok)) for p, r in self._dirty.items() if r],
            )

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _is_sqlite(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except FileNotFoundError:
        return path.lower().endswith((".db", ".sqlite", ".sqlite3"))
    except OSError:
        return False


def forget_verified(backend: Backend, state_path: str, paths: Iterable[str]) -> None:
    """Drop ``paths`` (vault paths) from the state file of the vault at ``backend``: files a repair
    moved away on purpose, which the next verify should not report as gone."""
    state = VerifyState(state_path, _state_location(backend))
    try:
        for path in paths:
            state.forget(path)
        state.save()
    finally:
        state.close()


def _state_location(backend: Backend) -> str:
    """The location a state file records: the real path of a local vault, else the backend's."""
    local = _local_backend(backend)
    return os.path.realpath(local.root) if local is not None else backend.location


# -- the job -------------------------------------------------------------------------------------


def default_workers() -> int:
    # One thread per core hashes; one more keeps the disk busy while the others hash.
    return (os.cpu_count() or 1) + 1


def verify(
    backend: Backend,
    *,
    state_path: str | None = None,
    max_age: float | None = None,
    subset: Subset | None = None,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
    on_total: Callable[[int, int], None] | None = None,
    clock: Callable[[], float] = time.time,
) -> VerifyReport:
    """Hash every file of the vault at ``backend`` against its name; see the module docstring.

    ``progress(n)`` is called from worker threads with each piece of bytes hashed; ``on_total(files,
    bytes)`` once the work is known. Raises NoVault when the location holds nothing of a vault,
    UsageError for a state file that cannot be used. Interrupting (KeyboardInterrupt) saves the state
    first, so the next run resumes.
    """
    started = time.monotonic()
    location = _state_location(backend)
    local = _local_backend(backend)
    if local is not None and not os.path.isdir(local.root):
        raise NoVault(f"there is no vault at {backend.location} (no such folder)")
    report = VerifyReport(location=location)
    scan = _Scan(backend, report)
    scan.check_structure()
    files = list(scan.files())
    if local is not None:
        report.temp_files.sort()
    else:
        for kind in FOLDERS:
            report.temp_files += sorted(getattr(backend, "list_temp", lambda _k: [])(kind))
    if not files and len(report.fatal) == 2:
        raise NoVault(f"there is no vault at {backend.location} (no config, no vault files)")

    state = VerifyState(state_path, location) if state_path else None
    now = clock()
    todo: list[VaultFile] = []
    try:
        if state is not None:
            report.resumed = state.begin(now)
            present = {f.path for f in files}
            for path in sorted(set(state.records) - present):
                folder = path.split("/", 1)[0]
                if folder in CONSEQUENCES and folder != "locks":
                    report.gone_since_last_run.append(
                        BadFile(
                            path,
                            folder,
                            "gone since the last run",
                            CONSEQUENCES[folder],
                            kind="gone",
                        )
                    )
                state.forget(path)
        threshold = None
        if state is not None and report.resumed and state.run_started is not None:
            threshold = state.run_started
        if max_age is not None:
            threshold = max(threshold or 0.0, now - max_age)
        for f in files:
            if subset is not None and not subset.selects(f.name):
                report.files_skipped += 1
                continue
            rec = state.records.get(f.path) if state is not None else None
            if (
                rec is not None
                and threshold is not None
                and rec.ok
                and rec.size == f.size
                and rec.verified_at >= threshold
            ):
                report.files_skipped += 1
                continue
            todo.append(f)
        if on_total is not None:
            on_total(len(todo), sum(f.size for f in todo))
        # Largest files first: the small ones then fill the cores at the end, so no core sits idle
        # while another hashes one last big pack.
        todo.sort(key=lambda f: f.size, reverse=True)
        _hash_all(backend, todo, report, state, workers or default_workers(), progress, clock)
        if state is not None:
            state.finish(clock())
    except BaseException:
        if state is not None:
            try:
                state.save()
            except VaultError:
                pass
        raise
    finally:
        if state is not None:
            state.close()
    report.bad.sort(key=lambda b: b.path)
    report.seconds = time.monotonic() - started
    return report


def _hash_all(
    backend: Backend,
    todo: list[VaultFile],
    report: VerifyReport,
    state: VerifyState | None,
    workers: int,
    progress: ProgressCallback | None,
    clock: Callable[[], float],
) -> None:
    hasher = _Hasher(backend, progress)
    window = workers * 4
    last_save = time.monotonic()
    save_every = STATE_SAVE_EVERY

    def handle(fut: Future, f: VaultFile) -> None:
        outcome, size, detail = fut.result()
        if outcome == "vanished":
            report.vanished.append(f.path)
            if state is not None:
                state.forget(f.path)
            return
        report.files_checked += 1
        report.bytes_checked += size
        good = outcome in ("ok", "flaky")
        if outcome == "flaky":
            report.flaky.append(f.path)
        if not good:
            problem = detail if outcome == "bad" else f"unreadable: {detail}"
            kind = "damaged" if outcome == "bad" else "unreadable"
            report.bad.append(
                BadFile(f.path, f.folder, problem, CONSEQUENCES[f.folder], f.size, kind)
            )
        if state is not None:
            state.record(f.path, f.size, clock(), good)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify") as pool:
        pending: dict[Future, VaultFile] = {}
        try:
            for f in todo:
                if len(pending) >= window:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        handle(fut, pending.pop(fut))
                    if state is not None and time.monotonic() - last_save > save_every:
                        began = time.monotonic()
                        state.save()
                        last_save = time.monotonic()
                        save_every = max(STATE_SAVE_EVERY, 20 * (last_save - began))
                pending[pool.submit(hasher.check, f)] = f
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    handle(fut, pending.pop(fut))
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
