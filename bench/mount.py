"""Side-by-side benchmark of `vault mount` and `restic mount` on the same data (issue 4, item 6).

usage: python bench/mount.py DATASET [--work DIR] [--repeat 3] [--keep] [--cache-size MIB]

DATASET is a folder made by ``python ../shared/bench/make-dataset.py DEST``. Unless the work folder already
holds them (``--work`` of an earlier run with ``--keep``), a vault and a restic repository (version 2, same
password) are made and the dataset is backed up into each (not timed here; bench/compare.py times it).

Then, ``--repeat`` times, each of these runs against a fresh mount of the latest snapshot of each tool
(mounted just before, so no cache of an earlier step helps). Just before each mount, every file of that
tool's repository is read once, so both tools read their repository from the OS page cache: the kernel
may drop file pages that were not used for a while (this machine's DAMON pages out what was idle for a
minute), and a step that found its repository partly on disk measured the disk, not the tool.

1. find     ``find src -ls`` over the ~20,000 small files (every entry is stat'ed)
2. dd       ``dd if=media/disk.img of=/dev/null bs=1M`` (the 320 MiB file)
3. tar      ``tar -cf - src | cat > /dev/null`` (cat, because GNU tar skips reading files when its
            archive is /dev/null)

Each step's wall time is measured on the client command; CPU is the client's plus what the mount process
used meanwhile; peak RSS is the mount process's VmHWM at the end of the step. Also measured: ``vault
restore`` of media/disk.img alone, against which the dd through ``vault mount`` is compared.

The table shows the best of the repeats and the ratio vaultfs / restic against the issue's targets:
find <= 0.5x restic's time, dd >= 3x restic's speed (time <= 0.33x), tar >= 2x (time <= 0.5x), mount
process peak RSS <= 0.5x, and dd through the mount <= 1.5x the time of restoring that file.

Start-up is measured on a second, tiny vault holding ``--snapshots`` (1000) snapshots: the time to read
every snapshot file and build the folder layout once the index is loaded (target: under a second), and
the time from starting `vault mount` to a full listing of snapshots/.

``SCENARIOS`` holds the three steps in bench/compare.py's form, so compare.py can run them after its own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import PASSWORD, VAULT, Bench, Measurement  # noqa: E402

#: How long a mount may take to appear or to go away.
DEADLINE = 120.0
_TICK = os.sysconf("SC_CLK_TCK")


class MountedTool:
    """One `vault mount` or `restic mount` process serving ``mnt`` until ``close()``."""

    def __init__(self, bench: Bench, tool: str, extra: Sequence[str] = ()) -> None:
        self.tool = tool
        self.mnt = bench.work / f"mnt-{tool}"
        self.mnt.mkdir(exist_ok=True)
        if tool == "vault":
            cmd = [*VAULT, "-r", str(bench.vault_repo), "mount", str(self.mnt), *extra]
        else:
            cmd = [bench.restic_binary, "-r", str(bench.restic_repo), "mount", str(self.mnt)]
        self.log = open(bench.work / f"mount-{tool}.log", "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            cmd, env=bench.env(), stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log
        )
        deadline = time.monotonic() + DEADLINE
        while not (os.path.ismount(self.mnt) and "latest" in os.listdir(self.mnt / "snapshots")):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"{tool} mount did not come up; see {self.log.name}")
            time.sleep(0.05)

    def latest(self, data: Path) -> Path:
        """Where ``data`` (backed up by its absolute path) appears in the latest snapshot."""
        return self.mnt / "snapshots" / "latest" / str(data).lstrip("/")

    def cpu(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK

    def peak_rss_kb(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return 0

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-uz", str(self.mnt)], check=False)
        self.log.close()


def _client(bench: Bench, mount: MountedTool, cmd: Sequence[str]) -> Measurement:
    """Run a client command against a mount: wall time, client + mount CPU, mount peak RSS."""
    before = mount.cpu()
    m = bench.run(cmd)
    return Measurement(m.wall, m.cpu + mount.cpu() - before, mount.peak_rss_kb())


def warm(repo: Path) -> None:
    """Read every file of a repository once, so that it is in the OS page cache."""
    for path in sorted(repo.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(1 << 20):
                    pass


def _step(bench: Bench, command: Callable[[Path], list[str]]) -> tuple[Measurement, Measurement]:
    """Fresh mounts of both tools, the client command against each (alternating which goes first).

    ``bench.state["vault mount args"]`` (a list) is appended to the `vault mount` command line.
    """
    extra = list(bench.state.get("vault mount args", []))  # type: ignore[call-overload]
    results: dict[str, Measurement] = {}
    order = ("vault", "restic") if bench.round % 2 == 0 else ("restic", "vault")
    for tool in order:
        warm(bench.vault_repo if tool == "vault" else bench.restic_repo)
        mount = MountedTool(bench, tool, extra if tool == "vault" else ())
        try:
            results[tool] = _client(bench, mount, command(mount.latest(bench.data)))
        finally:
            mount.close()
    return results["vault"], results["restic"]


def find_step(bench: Bench) -> tuple[Measurement, Measurement]:
    return _step(bench, lambda root: ["sh", "-c", f"find '{root}/src' -ls > /dev/null"])


def dd_step(bench: Bench) -> tuple[Measurement, Measurement]:
    v, r = _step(
        bench,
        lambda root: ["dd", f"if={root}/media/disk.img", "of=/dev/null", "bs=1M", "status=none"],
    )
    bench.state.setdefault("dd", []).append(v)  # type: ignore[union-attr]
    return v, r


def tar_step(bench: Bench) -> tuple[Measurement, Measurement]:
    return _step(bench, lambda root: ["sh", "-c", f"tar -C '{root}' -cf - src | cat > /dev/null"])


#: bench/compare.py scenarios: (name, function, target ratio of wall time vaultfs / restic).
SCENARIOS = [
    ("mount: find -ls src/", find_step, 0.5),
    ("mount: dd 320 MiB file", dd_step, 1 / 3),
    ("mount: tar src/", tar_step, 0.5),
]


def restore_file(bench: Bench) -> Measurement:
    """`vault restore` of media/disk.img alone (what dd through the mount is held against)."""
    target = bench.work / "restore-file"
    shutil.rmtree(target, ignore_errors=True)
    spec = f"latest:{bench.data}/media/disk.img"
    m = bench.vault("restore", spec, "--target", str(target))
    shutil.rmtree(target, ignore_errors=True)
    return m


def prepare(bench: Bench) -> None:
    """Vault and restic repository holding a backup of the data, unless the work folder has them."""
    if not (bench.vault_repo / "config").exists():
        shutil.rmtree(bench.vault_repo, ignore_errors=True)
        bench.vault("init", "--repository-version", "2")
        bench.vault("backup", "-q", str(bench.data))
    if not (bench.restic_repo / "config").exists():
        shutil.rmtree(bench.restic_repo, ignore_errors=True)
        bench.restic("init", "--repository-version", "2")
        bench.restic("backup", "-q", str(bench.data))


def render(
    rows: dict[str, list[tuple[Measurement, Measurement]]], restores: list[Measurement]
) -> str:
    """The Markdown table: best of the rounds for each number, ratio, target, and whether it is met."""

    def best(name: str, which: int, attr: str) -> float:
        return min(getattr(pair[which], attr) for pair in rows[name])

    lines = [
        "| measurement | vaultfs | restic | vaultfs / restic | target | met |",
        "|---|---|---|---|---|---|",
    ]

    def row(label: str, v: float, r: float, unit: str, target: str, ok: bool | None) -> None:
        ratio = f"{v / r:.2f}" if r else "-"
        met = "-" if ok is None else ("yes" if ok else "NO")
        lines.append(f"| {label} | {v:.2f} {unit} | {r:.2f} {unit} | {ratio} | {target} | {met} |")

    for name, _func, target in SCENARIOS:
        v, r = best(name, 0, "wall"), best(name, 1, "wall")
        row(f"{name}, wall", v, r, "s", f"<= {target:.2f}", v <= target * r)
    dd_name = SCENARIOS[1][0]
    dd_v, dd_r = best(dd_name, 0, "wall"), best(dd_name, 1, "wall")
    mb = 320 * 1024 * 1024 / 1e6
    row("dd speed", mb / dd_v, mb / dd_r, "MB/s", ">= 3.00", dd_v * 3 <= dd_r)
    for name, _func, _target in SCENARIOS:
        row(
            f"{name}, CPU (client + mount)",
            best(name, 0, "cpu"),
            best(name, 1, "cpu"),
            "s",
            "-",
            None,
        )
    v_rss = max(pair[0].rss_kb for runs in rows.values() for pair in runs) / 1024
    r_rss = max(pair[1].rss_kb for runs in rows.values() for pair in runs) / 1024
    row("mount process peak RSS", v_rss, r_rss, "MB", "<= 0.50", v_rss <= 0.5 * r_rss)
    rest = min(m.wall for m in restores)
    lines.append(
        f"| dd through vault mount vs `vault restore` of the file | {dd_v:.2f} s | {rest:.2f} s "
        f"(vault restore) | {dd_v / rest:.2f} | <= 1.50 | {'yes' if dd_v <= 1.5 * rest else 'NO'} |"
    )
    return "\n".join(lines)


# Builds a vault with many snapshots of one small folder, then times what a mount does after the index
# is loaded: read every snapshot file and compute the folder layout. Runs in the venv's Python.
_MANY_SNAPSHOTS = r"""
import dataclasses, json, sys, time
from vaultfs.backend import open_backend
from vaultfs.format.gojson import GoTime
from vaultfs.fuse.catalog import Catalog
from vaultfs.fuse.layout import build_layout
from vaultfs.repo.repository import Repository

path, password, count = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3])
repo = Repository.open(open_backend(path), password)
snaps = repo.list_snapshots()
sid, snap = snaps[0]
for i in range(len(snaps), count):
    repo.save_snapshot(dataclasses.replace(
        snap, time=GoTime(snap.time.ns - i * 3_600_000_000_000, 0), hostname=f"host{i % 7}",
        tags=[f"tag{i % 13}"] if i % 2 else []))
catalog = Catalog(repo)
t0 = time.perf_counter()
# the steps of Catalog.load_sync, timed apart
names = {n for n, _ in repo.backend.list("index")}
repo.load_index()
catalog._index_names = names
t1 = time.perf_counter()
catalog.refresh_sync()
layout = build_layout(catalog.listing())
t2 = time.perf_counter()
print(json.dumps({"index": t1 - t0, "after_index": t2 - t1, "snapshots": len(catalog.snapshots)}))
"""


def many_snapshots(bench: Bench, count: int = 1000) -> dict[str, float]:
    """Time the start of a mount of a vault with ``count`` snapshots (best of 3 each)."""
    vault = bench.work / f"vault-{count}"
    src = bench.work / "tiny"
    if not (vault / "config").exists():
        shutil.rmtree(vault, ignore_errors=True)
        src.mkdir(exist_ok=True)
        (src / "file").write_text("one small file\n")
        bench.run([*VAULT, "-r", str(vault), "init"])
        bench.run([*VAULT, "-r", str(vault), "backup", "-q", str(src)])
    python = VAULT[0]
    best: dict[str, float] = {}
    for _ in range(3):
        out = subprocess.run(
            [python, "-c", _MANY_SNAPSHOTS, str(vault), PASSWORD, str(count)],
            env=bench.env(),
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        doc = json.loads(out)
        assert doc["snapshots"] == count, doc
        mnt = bench.work / "mnt-many"
        mnt.mkdir(exist_ok=True)
        started = time.monotonic()
        proc = subprocess.Popen(
            [*VAULT, "-r", str(vault), "mount", str(mnt)],
            env=bench.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            while not (os.path.ismount(mnt) and len(os.listdir(mnt / "snapshots")) == count + 1):
                if proc.poll() is not None or time.monotonic() - started > DEADLINE:
                    raise RuntimeError("vault mount of the many-snapshot vault did not come up")
                time.sleep(0.01)
            doc["listed"] = time.monotonic() - started
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait()
        for key in ("index", "after_index", "listed"):
            best[key] = min(best.get(key, float("inf")), doc[key])
    return best


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("dataset", type=Path, help="folder made by make-dataset.py")
    ap.add_argument("--work", type=Path, help="work folder (default: a new temp folder)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; the best of them is shown")
    ap.add_argument("--restic", default=shutil.which("restic") or "restic", help="restic binary")
    ap.add_argument("--cache-size", type=int, help="vault mount --cache-size (MiB)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument(
        "--snapshots", type=int, default=1000, help="snapshots in the start-up test vault"
    )
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="vaultfs-bench-mount-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not data.exists():
        print(f"copying {args.dataset} to {data}", file=sys.stderr)
        shutil.copytree(args.dataset, data, symlinks=True)
    bench = Bench(work=work, data=data.resolve(), restic_binary=args.restic)
    if args.cache_size:
        bench.state["vault mount args"] = ["--cache-size", str(args.cache_size)]
    rows: dict[str, list[tuple[Measurement, Measurement]]] = {n: [] for n, _f, _t in SCENARIOS}
    restores: list[Measurement] = []
    start: dict[str, float] = {}
    try:
        print(f"start-up with {args.snapshots} snapshots", file=sys.stderr, flush=True)
        start = many_snapshots(bench, args.snapshots)
        print("backing up (not timed)", file=sys.stderr, flush=True)
        prepare(bench)
        for rnd in range(args.repeat):
            bench.round = rnd
            for name, func, _target in SCENARIOS:
                v, r = func(bench)
                rows[name].append((v, r))
                print(
                    f"round {rnd + 1} {name}: vaultfs {v.wall:.2f}s cpu {v.cpu:.2f}s "
                    f"{v.rss_kb // 1024}MB | restic {r.wall:.2f}s cpu {r.cpu:.2f}s "
                    f"{r.rss_kb // 1024}MB",
                    file=sys.stderr,
                    flush=True,
                )
            restores.append(restore_file(bench))
            print(
                f"round {rnd + 1} vault restore of the file: {restores[-1].wall:.2f}s",
                file=sys.stderr,
                flush=True,
            )
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"dataset {args.dataset}, best of {args.repeat}, {os.cpu_count()} CPUs")
    print(render(rows, restores))
    print()
    print(f"| start of `vault mount` with {args.snapshots} snapshots (best of 3) | s | target |")
    print("|---|---|---|")
    print(
        f"| read every snapshot file and build the folders, after the index is loaded | "
        f"{start['after_index']:.2f} | < 1 |"
    )
    print(f"| load the index | {start['index']:.2f} | - |")
    print(
        f"| process start to a full listing of snapshots/ (imports, key derivation, index) | "
        f"{start['listed']:.2f} | - |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
