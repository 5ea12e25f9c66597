"""Benchmark of the maintenance commands against restic and the usual shell pipeline (issue 5, item 6).

usage: python bench/maintenance.py DATASET [--work DIR] [--repeat 3] [--keep]

DATASET is a folder made by ``python ../shared/bench/make-dataset.py DEST``. Unless the work folder already
holds it, a restic repository (version 2) is made and the dataset backed up into it (not timed). Every
scenario then runs both tools on that same repository, alternating which goes first, ``--repeat`` times:

1. verify vs pipeline   ``vault verify`` against the pipeline Comet's documentation gives for checking a
                        vault without the password: ``find . ! -name config -type f -exec sha256sum '{}' \\;``
                        piped into awk, which compares each hash with the file name (target: 3x faster,
                        time ratio <= 0.33)
2. verify vs hashlib    ``vault verify`` against a plain Python script that hashes the same files with
                        hashlib in one thread per core: the floor (target: at least 85% of its
                        throughput, time ratio <= 1.18)
3. deep-verify          ``vault deep-verify`` against ``restic check`` (target: no slower, <= 1.0)
4. read-data            ``vault deep-verify --read-data`` against ``restic check --read-data``
                        (target: <= 0.65)

The files are in the page cache for every run (the first round warms it). Each scenario is a function
``scenario(bench) -> (vaultfs Measurement, other Measurement)`` as in bench/compare.py; ``SCENARIOS``
lists them with their targets so compare.py can run them after its own (they need only
``bench.restic_repo`` to hold a repository of the data).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import VAULT, Bench, Measurement  # noqa: E402

#: Comet's pipeline: hash every file but config and print those whose hash is not their name.
PIPELINE = (
    "find . ! -name config -type f -exec sha256sum '{}' \\; "
    '| awk \'{ sub("^.*/", "", $2); if ($1 != $2) print }\''
)

#: The floor: hashlib over the same files, one thread per core, 4 MiB reads into a reused buffer.
HASHLIB = r"""
import hashlib, os, sys
from concurrent.futures import ThreadPoolExecutor
root = sys.argv[1]
files = [os.path.join(d, f) for d, _s, fs in os.walk(root) for f in fs if f != "config"]
def digest(path):
    buf = bytearray(4 << 20); view = memoryview(buf); h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest() == os.path.basename(path)
with ThreadPoolExecutor(os.cpu_count()) as pool:
    bad = [p for p, ok in zip(files, pool.map(digest, files)) if not ok]
sys.exit(1 if bad else 0)
"""


def prepare(b: Bench) -> None:
    """Make the restic repository of the data, unless the work folder already has it, and compile
    vaultfs's modules once: with PYTHONDONTWRITEBYTECODE set (as in the build environment) every
    ``vault`` run would otherwise compile them again, which an installed vaultfs never does."""
    if "compiled" not in b.state:
        root = Path(__file__).resolve().parent.parent
        folders = [str(root / d) for d in ("vaultfs", "tools", "server") if (root / d).is_dir()]
        b.run([sys.executable, "-m", "compileall", "-q", *folders])
        b.state["compiled"] = True
    if (b.restic_repo / "config").exists():
        return
    b.run([b.restic_binary, "-r", str(b.restic_repo), "init", "--repository-version", "2"])
    b.run([b.restic_binary, "-r", str(b.restic_repo), "backup", "-q", str(b.data)])
    _warm(b.restic_repo)


def _warm(root: Path) -> None:
    for folder, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                while f.read(1 << 22):
                    pass


def _pair(
    b: Bench, vault_cmd: Sequence[str], other_cmd: Sequence[str]
) -> tuple[Measurement, Measurement]:
    """Run both commands, alternating which goes first from round to round."""
    if b.round % 2 == 0:
        v = b.run(vault_cmd)
        o = b.run(other_cmd)
    else:
        o = b.run(other_cmd)
        v = b.run(vault_cmd)
    return v, o


def _vault(b: Bench, *args: str) -> list[str]:
    return [*VAULT, "-r", str(b.restic_repo), *args]


def _restic(b: Bench, *args: str) -> list[str]:
    return [b.restic_binary, "-r", str(b.restic_repo), *args]


# -- scenarios ------------------------------------------------------------------------------------


def verify_vs_pipeline(b: Bench) -> tuple[Measurement, Measurement]:
    prepare(b)
    return _pair(
        b,
        _vault(b, "verify"),
        ["bash", "-c", f"cd {shlex.quote(str(b.restic_repo))} && {PIPELINE}"],
    )


def verify_vs_hashlib(b: Bench) -> tuple[Measurement, Measurement]:
    prepare(b)
    return _pair(b, _vault(b, "verify"), [sys.executable, "-c", HASHLIB, str(b.restic_repo)])


def deep_verify_vs_check(b: Bench) -> tuple[Measurement, Measurement]:
    prepare(b)
    return _pair(b, _vault(b, "deep-verify"), _restic(b, "check"))


def read_data_vs_check(b: Bench) -> tuple[Measurement, Measurement]:
    prepare(b)
    return _pair(b, _vault(b, "deep-verify", "--read-data"), _restic(b, "check", "--read-data"))


#: (name, function, target ratio vaultfs/other for wall time), in compare.py's form.
SCENARIOS: list[tuple[str, Callable[[Bench], tuple[Measurement, Measurement]], float]] = [
    ("verify vs find -exec sha256sum", verify_vs_pipeline, 0.33),
    ("verify vs hashlib on all cores", verify_vs_hashlib, 1 / 0.85),
    ("deep-verify vs restic check", deep_verify_vs_check, 1.0),
    ("deep-verify --read-data vs restic check --read-data", read_data_vs_check, 0.65),
]


def render(results: dict[str, list[tuple[Measurement, Measurement]]], size: int) -> str:
    lines = [
        "| scenario | vaultfs wall s | other wall s | ratio (target) | vaultfs MB/s | other MB/s "
        "| vaultfs CPU s | other CPU s | vaultfs peak RSS MB | other peak RSS MB |",
        "|" + "---|" * 10,
    ]
    targets = {n: t for n, _f, t in SCENARIOS}
    for name, runs in results.items():
        vw = min(v.wall for v, _ in runs)
        ow = min(o.wall for _, o in runs)
        vc = min(v.cpu for v, _ in runs)
        oc = min(o.cpu for _, o in runs)
        vm = min(v.rss_kb for v, _ in runs) / 1024
        om = min(o.rss_kb for _, o in runs) / 1024
        lines.append(
            f"| {name} | {vw:.2f} | {ow:.2f} | {vw / ow:.2f} (<= {targets[name]:.2f}) | "
            f"{size / vw / 1e6:.0f} | {size / ow / 1e6:.0f} | {vc:.2f} | {oc:.2f} | {vm:.0f} | "
            f"{om:.0f} |"
        )
    return "\n".join(lines)


def repo_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name != "config")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("dataset", type=Path, help="folder made by make-dataset.py")
    ap.add_argument("--work", type=Path, help="work folder (default: a new temp folder)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; the best of them is shown")
    ap.add_argument("--restic", default=shutil.which("restic") or "restic", help="restic binary")
    ap.add_argument("--only", action="append", help="run only scenarios whose name starts so")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="vaultfs-bench-maintenance-"))
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(work=work, data=args.dataset.resolve(), restic_binary=args.restic)
    chosen = [s for s in SCENARIOS if not args.only or any(s[0].startswith(o) for o in args.only)]
    results: dict[str, list[tuple[Measurement, Measurement]]] = {n: [] for n, _f, _t in chosen}
    try:
        prepare(bench)
        for rnd in range(args.repeat):
            bench.round = rnd
            for name, func, _target in chosen:
                v, o = func(bench)
                print(
                    f"round {rnd + 1} {name}: vaultfs {v.wall:.2f}s cpu {v.cpu:.2f}s | "
                    f"other {o.wall:.2f}s cpu {o.cpu:.2f}s | load {os.getloadavg()[0]:.1f}",
                    file=sys.stderr,
                    flush=True,
                )
                results[name].append((v, o))
        size = repo_size(bench.restic_repo)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"dataset {args.dataset}, repository {size / 1e6:.0f} MB, best of {args.repeat}, "
        f"{os.cpu_count()} CPUs"
    )
    print(render(results, size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
