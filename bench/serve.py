"""Benchmark of the bucket server: `vault serve` against `rclone serve restic`, and vault backup and
restore through `vault serve` against a local folder. Prints a Markdown table (best of --runs wall-clock
times).

    .venv/bin/python bench/serve.py [--size-mb 300] [--runs 3] [--dataset DIR]

Rows:
* restic backup of the dataset to a fresh repository through each server (restic does the chunking,
  encryption and uploads; the server receives ~dataset-size of packs); the two servers take turns run by
  run (alternating which goes first) so a change in the machine's load hits both alike, and the server
  process's own CPU time (user+sys) is shown beside the wall time; restic backup to a local folder takes
  its turn too, as the floor (restic alone: how much of the time any server adds), and so does
  `vault serve` with verify_uploads = false: rclone's server does not check that an upload's SHA-256
  is its name, vault serve does by default, and that hash is most of its CPU time;
* the same backup with restic pinned to one half of the cores and the server to the other (taskset), as
  when client and server are separate machines: on a shared box every CPU-second a server spends is
  taken from restic, which is CPU-bound here;
* the same backup until its data is on disk: the backup's time plus that of a `sync` right after it.
  `vault serve` and restic's local backend fsync every file before they answer; `rclone serve restic`
  never calls fsync (strace shows none in a whole backup), so when restic returns its packs are only in
  the page cache, and a `sync` writes them out. This row compares servers that keep the same promise.
  Every timed command starts after a `sync`, so no run pays for the writeback of the one before.
* restic check --read-data through each server (downloads everything);
* restic backup and check --read-data over https (a self-signed certificate made with openssl, given
  to restic with --cacert), best of --runs, with the server's CPU time;
* raw HTTP, best of 3: a 64 MiB upload and download (the better of two reads: vault serve writes
  uploads past the page cache), and 1,000 small range reads (with the server's CPU time per read),
  with httpx;
* vault backup of the dataset through `vault serve` and to a local folder, and vault restore of it.

Everything runs on 127.0.0.1 with random ports; the dataset (half random, half compressible text) is made
in a temp folder unless --dataset is given.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
#: vault serve without the SHA-256 check of uploads: the same work as rclone's server, which has none.
NO_VERIFY = "vault serve, verify_uploads = false"


def make_dataset(folder: Path, size_mb: int) -> None:
    rng = random.Random(7)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randrange(2, 9)))
             for _ in range(5000)]  # fmt: skip
    left = size_mb << 20
    i = 0
    while left > 0:
        size = min(left, rng.choice([4 << 10, 64 << 10, 1 << 20, 8 << 20, 24 << 20]))
        sub = folder / f"d{i % 17}"
        sub.mkdir(parents=True, exist_ok=True)
        if i % 2:
            data = rng.randbytes(size)
        else:
            data = b" ".join(rng.choice(words) for _ in range(size // 5))[:size]
        (sub / f"f{i}").write_bytes(data)
        left -= size
        i += 1


def warm_up(dataset: Path) -> None:
    """Read the dataset once, so that no timed run reads it from the disk. Without this the first
    round's first server (vault serve) paid for a cold dataset: its ratio came out 1.11-1.35 in
    every run of this benchmark while the other rounds gave 0.95-1.06."""
    for path in dataset.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as f:
                while f.read(1 << 20):
                    pass


class Proc:
    def __init__(self, args: list[str], pattern: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            found = re.search(pattern, line)
            if found:
                self.url = found.group(1)
                return
        raise RuntimeError(f"{args[0]} did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def vault_serve(
    data: Path,
    verify: bool = True,
    prefix: tuple[str, ...] = (),
    tls: tuple[Path, Path] | None = None,
) -> tuple[Proc, str, str]:
    """Start `vault serve` with one bucket; (process, base URL of the bucket, PSK). ``verify``:
    the server's verify_uploads key; ``prefix``: a command that runs it (taskset); ``tls``:
    certificate and key for https."""
    out = subprocess.run(
        [PY, "-m", "vaultfs.tools.main", "server", "--data", str(data), "bucket", "create", "bench",
         "--json"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    psk = json.loads(out)["psk"]
    config = data / "serve.toml"
    lines = [f"verify_uploads = {str(verify).lower()}"]
    if tls is not None:
        lines += [f'tls_cert = "{tls[0]}"', f'tls_key = "{tls[1]}"']
    config.write_text("\n".join(lines) + "\n")
    proc = Proc(
        [*prefix, PY, "-m", "vaultfs.tools.main", "serve", "--config", str(config), "--data", str(data),
         "--listen", "127.0.0.1:0", "--access-log", ""],
        r"listening on (\S+)",
    )  # fmt: skip
    return proc, f"{proc.url}bench/", psk


def rclone_serve(
    data: Path, prefix: tuple[str, ...] = (), tls: tuple[Path, Path] | None = None
) -> tuple[Proc, str]:
    env = {**os.environ, "RCLONE_CONFIG": "/dev/null"}
    https = ["--cert", str(tls[0]), "--key", str(tls[1])] if tls is not None else []
    proc = Proc(
        [*prefix, "rclone", "serve", "restic", "--addr", "127.0.0.1:0", *https, str(data)],
        r"(https?://127\.0\.0\.1:\d+/)",
        env,
    )
    return proc, f"{proc.url}bench/"


def cpu_seconds(pid: int) -> float:
    """User+system CPU time of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)  # fmt: skip
    return time.perf_counter() - start


def with_creds(url: str, user: str, psk: str) -> str:
    return url.replace("http://", f"http://{user}:{psk}@")


def restic_rows(
    dataset: Path, work: Path, runs: int
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, list[float]]]]:
    """Best wall time and best server CPU time of restic backup and check through each server, and
    every run's wall times (for ratios of the runs taken in the same round)."""
    servers = ["vault serve", "rclone serve restic", "local folder", NO_VERIFY]
    keys = ("backup", "durable", "check", "backup cpu", "check cpu")
    results = {s: dict.fromkeys(keys, float("inf")) for s in servers}
    every: dict[str, dict[str, list[float]]] = {s: {"backup": [], "durable": []} for s in servers}
    for run in range(runs):
        for server in servers if run % 2 == 0 else servers[::-1]:
            data = work / f"{re.sub(r'[^a-z]+', '-', server)}-{run}"
            proc: Proc | None = None
            if server.startswith("vault serve"):
                proc, url, psk = vault_serve(data, verify=server != NO_VERIFY)
                repo = "rest:" + with_creds(url, "bench", psk)
            elif server == "rclone serve restic":
                proc, url = rclone_serve(data)
                repo = "rest:" + url
            else:
                repo = str(data)
            cache = work / "restic-cache"
            env = {**os.environ, "RESTIC_PASSWORD": "bench", "RESTIC_CACHE_DIR": str(cache)}
            best = results[server]
            try:
                subprocess.run(["restic", "-r", repo, "init"], check=True, env=env,
                               capture_output=True)  # fmt: skip
                for job, cmd, cwd in (
                    ("backup", ["restic", "-r", repo, "backup", "-q", "."], dataset),
                    ("check", ["restic", "-r", repo, "check", "--read-data"], None),
                ):
                    if job == "check" and proc is None:
                        continue  # the local folder is the floor of the backup row only
                    if job == "check":
                        shutil.rmtree(cache, ignore_errors=True)
                    subprocess.run(["sync"], check=True)
                    before = cpu_seconds(proc.proc.pid) if proc is not None else 0.0
                    took = timed(cmd, env, cwd=cwd)
                    after = cpu_seconds(proc.proc.pid) if proc is not None else 0.0
                    best[job] = min(best[job], took)
                    best[f"{job} cpu"] = min(best[f"{job} cpu"], after - before)
                    if job == "backup":
                        durable = took + timed(["sync"], env)
                        best["durable"] = min(best["durable"], durable)
                        every[server]["backup"].append(took)
                        every[server]["durable"].append(durable)
            finally:
                if proc is not None:
                    proc.stop()
                shutil.rmtree(cache, ignore_errors=True)
                shutil.rmtree(data, ignore_errors=True)
    return results, every


def pinned_rows(dataset: Path, work: Path, runs: int) -> dict[str, float]:
    """Best wall time of restic backup through each server with restic on the first half of the
    cores and the server on the other half (taskset), as when they run on separate machines: the
    server's CPU time then costs the client nothing unless the server falls behind."""
    cores = os.cpu_count() or 1
    if cores < 2:
        return {}
    half = cores // 2
    client = ("taskset", "-c", f"0-{half - 1}")
    server_cpus = ("taskset", "-c", f"{half}-{cores - 1}")
    servers = ["vault serve", "rclone serve restic"]
    results = dict.fromkeys(servers, float("inf"))
    for run in range(runs):
        for server in servers if run % 2 == 0 else servers[::-1]:
            data = work / f"pinned-{server.split()[0]}-{run}"
            if server == "vault serve":
                proc, url, psk = vault_serve(data, prefix=server_cpus)
                repo = "rest:" + with_creds(url, "bench", psk)
            else:
                proc, url = rclone_serve(data, prefix=server_cpus)
                repo = "rest:" + url
            cache = work / "restic-cache"
            env = {**os.environ, "RESTIC_PASSWORD": "bench", "RESTIC_CACHE_DIR": str(cache)}
            try:
                subprocess.run(["restic", "-r", repo, "init"], check=True, env=env,
                               capture_output=True)  # fmt: skip
                subprocess.run(["sync"], check=True)
                took = timed([*client, "restic", "-r", repo, "backup", "-q", "."], env, cwd=dataset)
                results[server] = min(results[server], took)
            finally:
                proc.stop()
                shutil.rmtree(cache, ignore_errors=True)
                shutil.rmtree(data, ignore_errors=True)
    return results


def make_cert(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (openssl)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def tls_rows(dataset: Path, work: Path, runs: int) -> dict[str, dict[str, float]]:
    """Best wall time and server CPU of restic backup and check --read-data through each server
    over https (--cacert): the same jobs as the first rows, with TLS in the server's hands. Empty
    without the openssl command (it makes the certificate)."""
    if shutil.which("openssl") is None:
        return {}
    cert, key = make_cert(work)
    servers = ["vault serve", "rclone serve restic"]
    keys = ("backup", "check", "backup cpu", "check cpu")
    results = {s: dict.fromkeys(keys, float("inf")) for s in servers}
    for run in range(runs):
        for server in servers if run % 2 == 0 else servers[::-1]:
            data = work / f"tls-{server.split()[0]}-{run}"
            if server == "vault serve":
                proc, url, psk = vault_serve(data, tls=(cert, key))
                repo = "rest:" + url.replace("https://", f"https://bench:{psk}@")
            else:
                proc, url = rclone_serve(data, tls=(cert, key))
                repo = "rest:" + url
            cache = work / "restic-cache"
            env = {**os.environ, "RESTIC_PASSWORD": "bench", "RESTIC_CACHE_DIR": str(cache)}
            restic = ["restic", "--cacert", str(cert), "-r", repo]
            best = results[server]
            try:
                subprocess.run([*restic, "init"], check=True, env=env, capture_output=True)
                for job, args, cwd in (
                    ("backup", ["backup", "-q", "."], dataset),
                    ("check", ["check", "--read-data"], None),
                ):
                    if job == "check":
                        shutil.rmtree(cache, ignore_errors=True)
                    subprocess.run(["sync"], check=True)
                    before = cpu_seconds(proc.proc.pid)
                    best[job] = min(best[job], timed([*restic, *args], env, cwd=cwd))
                    best[f"{job} cpu"] = min(
                        best[f"{job} cpu"], cpu_seconds(proc.proc.pid) - before
                    )
            finally:
                proc.stop()
                shutil.rmtree(cache, ignore_errors=True)
                shutil.rmtree(data, ignore_errors=True)
    return results


def http_rows(work: Path, rounds: int = 3) -> dict[str, dict[str, float]]:
    """Raw HTTP, best of ``rounds``: MB/s for a 64 MiB upload and download, small range reads per
    second, and the server's CPU time per small read."""
    results = {}
    for server in ("vault serve", "rclone serve restic"):
        data = work / f"http-{server.split()[0]}"
        if server == "vault serve":
            proc, url, psk = vault_serve(data)
            auth: tuple[str, str] | None = ("bench", psk)
        else:
            proc, url = rclone_serve(data)
            auth = None
        best = {"upload": 0.0, "download": 0.0, "small": 0.0, "small cpu": float("inf")}
        try:
            with httpx.Client(base_url=url, auth=auth, timeout=300) as c:
                c.post("?create=true")
                for _ in range(rounds):
                    body = os.urandom(64 << 20)  # a new object each round: none is overwritten
                    name = hashlib.sha256(body).hexdigest()

                    def pieces(body: bytes = body) -> Iterator[bytes]:
                        for i in range(0, len(body), 1 << 20):
                            yield body[i : i + (1 << 20)]

                    start = time.perf_counter()
                    c.post(f"data/{name}", content=pieces(),
                           headers={"Content-Length": str(len(body))}).raise_for_status()  # fmt: skip
                    up = len(body) / (time.perf_counter() - start) / 1e6
                    # Read twice, the better one counts: vault serve writes uploads past the page
                    # cache, so its first read comes from the disk, rclone's from memory. Streamed
                    # into a buffer: ``.content`` would time httpx joining 64 MiB.
                    down = 0.0
                    for _ in range(2):
                        got, at = bytearray(len(body)), 0
                        start = time.perf_counter()
                        with c.stream("GET", f"data/{name}", headers={"Range": "bytes=0-"}) as r:
                            for piece in r.iter_raw():
                                got[at : at + len(piece)] = piece
                                at += len(piece)
                        down = max(down, len(got) / (time.perf_counter() - start) / 1e6)
                        assert got == body
                    cpu = cpu_seconds(proc.proc.pid)
                    start = time.perf_counter()
                    for i in range(1000):
                        off = (i * 7919 * 4096) % (len(body) - 5000)
                        c.get(f"data/{name}", headers={"Range": f"bytes={off}-{off + 4095}"})
                    small = 1000 / (time.perf_counter() - start)
                    small_cpu = (cpu_seconds(proc.proc.pid) - cpu) / 1000 * 1e6
                    for key, value in (("upload", up), ("download", down), ("small", small)):
                        best[key] = max(best[key], value)
                    best["small cpu"] = min(best["small cpu"], small_cpu)
        finally:
            proc.stop()
            shutil.rmtree(data, ignore_errors=True)
        results[server] = best
    return results


def vault_rows(dataset: Path, work: Path, runs: int) -> dict[str, dict[str, float]]:
    """Best times of vault backup, and of vault restore of that backup right after it (the first
    restore: no tree pack cached yet), through vault serve and to a local folder."""
    targets = ["vault serve", "local folder"]
    results = {t: {"backup": float("inf"), "restore": float("inf")} for t in targets}
    env = {**os.environ, "VAULT_PASSWORD": "bench", "XDG_CACHE_HOME": str(work / "xdg")}
    restored = work / "restored"
    for run in range(runs):
        for target in targets if run % 2 == 0 else targets[::-1]:
            data = work / f"vb-{target.split()[0]}-{run}"
            proc = None
            if target == "vault serve":
                proc, url, psk = vault_serve(data)
                repo = "rest:" + with_creds(url, "bench", psk)
            else:
                repo = str(data / "repo")
            try:
                subprocess.run([PY, "-m", "vaultfs.tools.main", "-r", repo, "init"], check=True,
                               env=env, capture_output=True)  # fmt: skip
                subprocess.run(["sync"], check=True)
                took = timed([PY, "-m", "vaultfs.tools.main", "-r", repo, "backup", "-q", "."], env,
                             cwd=dataset)  # fmt: skip
                results[target]["backup"] = min(results[target]["backup"], took)
                # Restored trees stay until the end: on ext4, creating files soon after deleting
                # many costs the next restore CPU time (see bench/compare.py).
                target_dir = restored / f"{target.split()[0]}-{run}"
                subprocess.run(["sync"], check=True)
                took = timed([PY, "-m", "vaultfs.tools.main", "-r", repo, "restore", "latest",
                              "--target", str(target_dir), "-q"], env)  # fmt: skip
                results[target]["restore"] = min(results[target]["restore"], took)
            finally:
                if proc is not None:
                    proc.stop()
                shutil.rmtree(data, ignore_errors=True)
                shutil.rmtree(work / "xdg", ignore_errors=True)
    shutil.rmtree(restored, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dataset", type=Path)
    args = parser.parse_args()
    # Bytecode as an installed package has it (see compare.compile_bytecode).
    subprocess.run(
        [PY, "-m", "compileall", "-q", "-j", "0", "vaultfs", "tools", "server"],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    work = Path(tempfile.mkdtemp(prefix="vaultfs-bench-serve-"))
    try:
        dataset = args.dataset
        if dataset is None:
            dataset = work / "dataset"
            make_dataset(dataset, args.size_mb)
        size = sum(p.stat().st_size for p in dataset.rglob("*") if p.is_file()) / 1e6
        warm_up(dataset)
        restic, every = restic_rows(dataset, work, args.runs)
        pinned = pinned_rows(dataset, work, args.runs)
        tls = tls_rows(dataset, work, args.runs)
        raw = http_rows(work)
        mine = vault_rows(dataset, work, args.runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"dataset: {size:.0f} MB; best of {args.runs}; {os.cpu_count()} cores; "
          f"load average at the end {os.getloadavg()[0]:.1f}\n")  # fmt: skip
    print("| client and job | vault serve | rclone serve restic |")
    print("|---|---|---|")
    for job, label in (
        ("backup", "restic backup"),
        ("durable", "restic backup, then sync (data on disk)"),
        ("check", "restic check --read-data"),
    ):
        a, b = restic["vault serve"][job], restic["rclone serve restic"][job]
        print(f"| {label} | {a:.1f} s ({size / a:.0f} MB/s) | {b:.1f} s ({size / b:.0f} MB/s) |")
        if job == "durable":
            continue
        a, b = restic["vault serve"][f"{job} cpu"], restic["rclone serve restic"][f"{job} cpu"]
        print(f"| server CPU during {label} | {a:.2f} s | {b:.2f} s |")
        if job == "backup" and pinned:
            a, b = pinned["vault serve"], pinned["rclone serve restic"]
            print(f"| restic backup, client and server on separate cores | {a:.1f} s "
                  f"({size / a:.0f} MB/s) | {b:.1f} s ({size / b:.0f} MB/s) |")  # fmt: skip
    for job, label in (
        ("backup", "restic backup over TLS"),
        ("check", "restic check --read-data over TLS"),
    ):
        a, b = tls["vault serve"][job], tls["rclone serve restic"][job]
        print(f"| {label} | {a:.1f} s ({size / a:.0f} MB/s) | {b:.1f} s ({size / b:.0f} MB/s) |")
        a, b = tls["vault serve"][f"{job} cpu"], tls["rclone serve restic"][f"{job} cpu"]
        print(f"| server CPU during {label} | {a:.2f} s | {b:.2f} s |")
    for key, label, unit in (
        ("upload", "httpx 64 MiB upload", "MB/s"),
        ("download", "httpx 64 MiB download", "MB/s"),
        ("small", "httpx 4 KiB range reads, one connection", "req/s"),
        ("small cpu", "server CPU per 4 KiB range read", "µs"),
    ):
        a, b = raw["vault serve"][key], raw["rclone serve restic"][key]
        print(f"| {label} | {a:.0f} {unit} | {b:.0f} {unit} |")
    print("\nvault serve / rclone serve restic, run by run (the two ran in the same round):")
    for job, label in (("backup", "restic backup"), ("durable", "until on disk")):
        ours, theirs = every["vault serve"][job], every["rclone serve restic"][job]
        ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
        print(f"  {label}: median {statistics.median(ratios):.3f}; runs "
              + ", ".join(f"{a:.1f}/{b:.1f} s {a / b:.2f}" for a, b in zip(ours, theirs, strict=True)))  # fmt: skip
    same = restic[NO_VERIFY]
    print(f"\n{NO_VERIFY} (no upload hash check, like rclone's server): restic backup "
          f"{same['backup']:.1f} s, then sync {same['durable']:.1f} s; server CPU "
          f"{same['backup cpu']:.2f} s; check --read-data {same['check']:.1f} s")  # fmt: skip
    floor, durable = restic["local folder"]["backup"], restic["local folder"]["durable"]
    print(f"\nrestic backup to a local folder (no server): {floor:.1f} s ({size / floor:.0f} MB/s); "
          f"then sync: {durable:.1f} s")  # fmt: skip
    print("\n| vault to / from | backup | restore |")
    print("|---|---|---|")
    for target, times in mine.items():
        print(f"| {target} | {times['backup']:.1f} s ({size / times['backup']:.0f} MB/s) "
              f"| {times['restore']:.1f} s ({size / times['restore']:.0f} MB/s) |")  # fmt: skip


if __name__ == "__main__":
    main()
