"""Side-by-side benchmark of vaultfs and restic on the same data (issue 3, item 7).

usage: python bench/compare.py DATASET [--work DIR] [--repeat 3] [--keep]

DATASET is a folder made by ``python ../shared/bench/make-dataset.py DEST``. It is copied into a work folder
first (the "1% changed" scenario modifies files), then, ``--repeat`` times:

1. first backup      fresh vault / repository (version 2, same password), back up the copy
2. second backup     the same again: nothing changed
3. 1% changed        every 100th file (in sorted order) gets its first 4 KiB overwritten, then back up

and then, after every round of those and ``--settle`` seconds (see below), ``--repeat`` times:

4. restore           restore the latest snapshot (of the last round's vault and repository) into an
                     empty folder

Why the restores wait: on ext4 without a journal (as here), a file created within a few minutes of an
inode being freed in the same inode group makes the kernel look past that inode (``recently_deleted``:
60 s after the deletion, 360 s while the inode table block is dirty, which the restore's own creations
make it). ``restic backup`` frees its temporary pack files (about 50 in a first backup, in ``$TMPDIR``,
on this file system here), so a restore run right after the backups paid for each of those inodes on
each of its 20,000 files: 1 to 3 CPU-seconds of kernel time for either tool, in amounts that
varied from round to round. Restoring after the window measures the tools instead of that.

Each step runs ``vault`` (this checkout's .venv) and ``restic`` (PATH) as child processes, alternating which
goes first, and records wall time, CPU time (user + system, from wait4) and peak RSS (ru_maxrss). The table
shows the best of the repeats for each number and the ratio vaultfs / restic next to the target ratio.
Best-of-N is used because the machine may be shared: the fastest run is the one least disturbed.

Scenarios are plain functions ``scenario(bench) -> (vault Measurement, restic Measurement)`` listed in
SCENARIOS; other benchmark modules (bench/mount.py) append their own and call ``main``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
VAULT = [str(HERE.parent / ".venv" / "bin" / "python"), "-m", "vaultfs.tools.main"]
PASSWORD = "benchmark password"


@dataclass(frozen=True)
class Measurement:
    wall: float  # seconds
    cpu: float  # user + system seconds of the child
    rss_kb: int  # peak resident set size
    sys: float = 0.0  # the kernel's part of ``cpu`` (file creation and page cache writes show here)


@dataclass
class Bench:
    """One benchmark run: the data copy, the vault, the restic repository and how to run both tools."""

    work: Path
    data: Path
    restic_binary: str = "restic"
    round: int = 0
    state: dict[str, object] = field(default_factory=dict)

    @property
    def vault_repo(self) -> Path:
        return self.work / "vault"

    @property
    def restic_repo(self) -> Path:
        return self.work / "restic"

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RESTIC_", "VAULT_")) and k != "XDG_CACHE_HOME"
        }
        env.update(
            VAULT_PASSWORD=PASSWORD,
            RESTIC_PASSWORD=PASSWORD,
            XDG_CACHE_HOME=str(self.work / "vault-cache"),
            RESTIC_CACHE_DIR=str(self.work / "restic-cache"),
        )
        return env

    def run(self, cmd: Sequence[str], ok: Sequence[int] = (0,)) -> Measurement:
        """Run one child process and measure it; raises when it exits with a code not in ``ok``."""
        started = time.monotonic()
        proc = subprocess.Popen(
            list(cmd), env=self.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        assert proc.stderr is not None
        err = proc.stderr.read()
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode not in ok:
            raise RuntimeError(
                f"{' '.join(cmd)} exited with {proc.returncode}:\n{err.decode(errors='replace')}"
            )
        return Measurement(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss, usage.ru_stime)

    def vault(self, *args: str) -> Measurement:
        return self.run([*VAULT, "-r", str(self.vault_repo), *args])

    def restic(self, *args: str) -> Measurement:
        return self.run([self.restic_binary, "-r", str(self.restic_repo), *args])

    def both(
        self,
        vault_args: Sequence[str],
        restic_args: Sequence[str],
        before_each: Callable[[], None] | None = None,
    ) -> tuple[Measurement, Measurement]:
        """Run the two commands, alternating which goes first from round to round, with
        ``before_each`` (untimed) before each of them."""
        jobs = [("vault", self.vault, vault_args), ("restic", self.restic, restic_args)]
        if self.round % 2:
            jobs.reverse()
        got: dict[str, Measurement] = {}
        for name, run, args in jobs:
            if before_each is not None:
                before_each()
            got[name] = run(*args)
        return got["vault"], got["restic"]


# -- scenarios ------------------------------------------------------------------------------------


def first_backup(b: Bench) -> tuple[Measurement, Measurement]:
    # The previous round's repositories are moved aside, not deleted (the work folder goes at the end):
    # freed inodes would make the restore of this round pay for them (see restore()).
    aside = b.work / "previous" / str(b.round)
    aside.mkdir(parents=True, exist_ok=True)
    for path in (b.vault_repo, b.restic_repo, b.work / "vault-cache", b.work / "restic-cache"):
        if path.exists():
            path.rename(aside / path.name)
    b.run([*VAULT, "-r", str(b.vault_repo), "init", "--repository-version", "2"])
    b.run([b.restic_binary, "-r", str(b.restic_repo), "init", "--repository-version", "2"])
    _sync()
    return b.both(["backup", "-q", str(b.data)], ["backup", "-q", str(b.data)])


def second_backup(b: Bench) -> tuple[Measurement, Measurement]:
    return b.both(["backup", "-q", str(b.data)], ["backup", "-q", str(b.data)])


def changed_backup(b: Bench) -> tuple[Measurement, Measurement]:
    change_one_percent(b.data)
    _sync()
    return b.both(["backup", "-q", str(b.data)], ["backup", "-q", str(b.data)])


def restore(b: Bench) -> tuple[Measurement, Measurement]:
    # Fresh target folders every round, removed only with the work folder: deleting them would free
    # 20,000 inodes for the next round to pay for (see the module docstring).
    # Each restore starts with nothing dirty in the page cache: otherwise the one that follows
    # restic's (which leaves ~1 GB to write back) shares the CPUs with that writeback.
    vt, rt = b.work / f"restore-vault-{b.round}", b.work / f"restore-restic-{b.round}"
    return b.both(
        ["restore", "latest", "--target", str(vt)],
        ["restore", "latest", "--target", str(rt)],
        before_each=_sync,
    )


#: (name, function, target ratio vaultfs/restic for wall time) in the order they run.
SCENARIOS: list[tuple[str, Callable[[Bench], tuple[Measurement, Measurement]], float]] = [
    ("first backup", first_backup, 0.6),
    ("second backup, no changes", second_backup, 0.8),
    ("backup after 1% changed", changed_backup, 0.8),
    ("restore", restore, 0.65),
]
#: Scenarios that run after every round of the others, once the file system has settled (--settle).
SETTLED = {"restore"}


def change_one_percent(root: Path) -> int:
    """Overwrite the first 4 KiB of every 100th file (sorted order); returns how many were changed."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    changed = 0
    for i, path in enumerate(files):
        if i % 100 != 0:
            continue
        with open(path, "r+b") as f:
            f.write(os.urandom(4096))
        changed += 1
    return changed


def _sync() -> None:
    os.sync()


# -- table ------------------------------------------------------------------------------------------


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def render(
    results: dict[str, list[tuple[Measurement, Measurement]]], targets: dict[str, float]
) -> str:
    head = (
        "| scenario | vaultfs wall s | restic wall s | wall ratio (target) | vaultfs CPU s | "
        "restic CPU s | CPU ratio | vaultfs peak RSS MB | restic peak RSS MB | RSS ratio |"
    )
    lines = [head, "|" + "---|" * 10]
    for name, runs in results.items():
        vw = min(v.wall for v, _ in runs)
        rw = min(r.wall for _, r in runs)
        vc = min(v.cpu for v, _ in runs)
        rc = min(r.cpu for _, r in runs)
        vm = min(v.rss_kb for v, _ in runs) / 1024
        rm = min(r.rss_kb for _, r in runs) / 1024
        lines.append(
            f"| {name} | {vw:.2f} | {rw:.2f} | {_ratio(vw, rw)} (<= {targets[name]}) | {vc:.2f} | "
            f"{rc:.2f} | {_ratio(vc, rc)} | {vm:.0f} | {rm:.0f} | {_ratio(vm, rm)} |"
        )
    return "\n".join(lines)


def compile_bytecode() -> None:
    """Bring the checkout's bytecode up to date, as an installed package has it: an editable install
    run with PYTHONDONTWRITEBYTECODE set would otherwise compile every module it imports in every
    timed run (~0.1 s a command), a cost no installed vaultfs pays."""
    root = HERE.parent
    subprocess.run(
        [VAULT[0], "-m", "compileall", "-q", "-j", "0", "vaultfs", "tools", "server"],
        cwd=root,
        check=True,
        stdout=subprocess.DEVNULL,
    )


def main(argv: Sequence[str] | None = None, scenarios: list | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("dataset", type=Path, help="folder made by make-dataset.py")
    ap.add_argument("--work", type=Path, help="work folder (default: a new temp folder)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; the best of them is shown")
    ap.add_argument("--restic", default=shutil.which("restic") or "restic", help="restic binary")
    ap.add_argument(
        "--only",
        action="append",
        help="show only scenarios whose name starts so (the ones before them still run)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument(
        "--settle",
        type=float,
        default=400.0,
        help="seconds between the last backup and the first restore (default 400: ext4 skips "
        "inodes freed in the last 360 s when it creates files; 0 restores at once)",
    )
    args = ap.parse_args(argv)
    scenarios = SCENARIOS if scenarios is None else scenarios
    if args.only:
        # A later scenario needs the ones before it; --only just hides rows.
        shown = [n for n, _f, _t in scenarios if any(n.startswith(o) for o in args.only)]
    else:
        shown = [n for n, _f, _t in scenarios]
    compile_bytecode()
    work = args.work or Path(tempfile.mkdtemp(prefix="vaultfs-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not data.exists():
        print(f"copying {args.dataset} to {data}", file=sys.stderr)
        shutil.copytree(args.dataset, data, symlinks=True)
    bench = Bench(work=work, data=data.resolve(), restic_binary=args.restic)
    results: dict[str, list[tuple[Measurement, Measurement]]] = {n: [] for n in shown}
    targets = {n: t for n, _f, t in scenarios}
    first = [s for s in scenarios if s[0] not in SETTLED]
    settled = [s for s in scenarios if s[0] in SETTLED]
    try:
        for group in (first, settled):
            if group is settled and settled:
                _sync()
                print(
                    f"waiting {args.settle:.0f} s before the restores", file=sys.stderr, flush=True
                )
                time.sleep(args.settle)
            for rnd in range(args.repeat):
                bench.round = rnd
                for name, func, _target in group:
                    v, r = func(bench)
                    print(
                        f"round {rnd + 1} {name}: vaultfs {v.wall:.2f}s cpu {v.cpu:.2f}s "
                        f"(sys {v.sys:.2f}s) {v.rss_kb // 1024}MB | restic {r.wall:.2f}s "
                        f"cpu {r.cpu:.2f}s (sys {r.sys:.2f}s) {r.rss_kb // 1024}MB | "
                        f"load {os.getloadavg()[0]:.1f}",
                        file=sys.stderr,
                        flush=True,
                    )
                    if name in results:
                        results[name].append((v, r))
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"dataset {args.dataset}, best of {args.repeat}, {os.cpu_count()} CPUs"
        + (f", restores {args.settle:.0f} s after the last backup" if settled else "")
    )
    print(render(results, targets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
