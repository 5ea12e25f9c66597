"""Side-by-side benchmark of `vault prune` and `vault migrate` (issue 6, item 6).

usage: python bench/retention.py DATASET [--work DIR] [--repeat 3] [--keep] [--only NAME]

DATASET is a folder made by ``python ../shared/bench/make-dataset.py DEST``; it is copied into the work
folder first. Once per run (not timed) a vault with a history is made: the copy is backed up, then five
times 1% of its files are changed (bench/compare.py's change_one_percent) and it is backed up again; then
`vault forget --keep-last 3` forgets half of the six snapshots.

Scenarios, each ``--repeat`` times (best of the repeats is shown), alternating which tool goes first:

1. prune after forgetting half   two copies of that vault: `vault prune` on one, `restic prune` on the
                                 other (the very same vault: restic reads vaultfs vaults); both with
                                 their default 5% unused limit and with empty caches
2. migrate vs rsync -a           the vault folder copied to a new folder by `vault migrate --to DIR`
                                 and by `rsync -a SRC/ DIR/`
3. migrate vs rclone copy        the same with `rclone copy SRC DIR`

In the table the "restic" columns hold the other tool of the row. Scenarios are plain functions in
bench/compare.py's form, listed in SCENARIOS, so compare.py can run them after its own.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import VAULT, Bench, Measurement, _sync, change_one_percent  # noqa: E402
from compare import main as compare_main  # noqa: E402

SNAPSHOTS = 6


def history_vault(b: Bench) -> Path:
    """The vault with six snapshots, three of them forgotten (made once per benchmark run)."""
    path = b.work / "history-vault"
    done = b.work / "history-vault.done"  # a kept work folder (--keep) reuses it
    if done.exists() and (path / "config").exists():
        return path
    shutil.rmtree(path, ignore_errors=True)
    b.run([*VAULT, "-r", str(path), "init", "--repository-version", "2"])
    for n in range(SNAPSHOTS):
        if n:
            change_one_percent(b.data)
        b.run([*VAULT, "-r", str(path), "backup", "-q", str(b.data)])
    b.run([*VAULT, "-r", str(path), "forget", "-q", "--keep-last", str(SNAPSHOTS // 2)])
    done.touch()
    return path


def _fresh(b: Bench, *paths: Path) -> None:
    for path in (*paths, b.work / "vault-cache", b.work / "restic-cache"):
        shutil.rmtree(path, ignore_errors=True)


def _first(b: Bench, vault_cmd: list[str], other_cmd: list[str]) -> tuple[Measurement, Measurement]:
    """Run both commands, alternating which goes first from round to round."""
    if b.round % 2 == 0:
        v = b.run(vault_cmd)
        o = b.run(other_cmd)
    else:
        o = b.run(other_cmd)
        v = b.run(vault_cmd)
    return v, o


def prune_half(b: Bench) -> tuple[Measurement, Measurement]:
    source = history_vault(b)
    mine, theirs = b.work / "prune-vault", b.work / "prune-restic"
    _fresh(b, mine, theirs)
    shutil.copytree(source, mine)
    shutil.copytree(source, theirs)
    _sync()
    return _first(
        b,
        [*VAULT, "-r", str(mine), "prune", "-q"],
        [b.restic_binary, "-r", str(theirs), "prune", "-q"],
    )


def _migrate_against(b: Bench, other: list[str], name: str) -> tuple[Measurement, Measurement]:
    source = history_vault(b)
    mine, theirs = b.work / "migrate-vault", b.work / f"migrate-{name}"
    _fresh(b, mine, theirs)
    _sync()
    return _first(
        b,
        [*VAULT, "-r", str(source), "migrate", "-q", "--to", str(mine)],
        [*other, str(theirs)],
    )


def migrate_rsync(b: Bench) -> tuple[Measurement, Measurement]:
    return _migrate_against(b, ["rsync", "-a", f"{history_vault(b)}/"], "rsync")


def migrate_rclone(b: Bench) -> tuple[Measurement, Measurement]:
    return _migrate_against(
        b, ["rclone", "--config", "/dev/null", "copy", str(history_vault(b))], "rclone"
    )


#: (name, function, target ratio vaultfs/other for wall time), in bench/compare.py's form.
SCENARIOS = [
    ("prune after forgetting half", prune_half, 1.0),
    ("migrate vs rsync -a", migrate_rsync, 1.5),
    ("migrate vs rclone copy", migrate_rclone, 1.0),
]


if __name__ == "__main__":
    sys.exit(compare_main(scenarios=SCENARIOS))
