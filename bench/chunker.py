"""Benchmark the restic-compatible chunker: MB/s on one thread and on two threads at once.

    .venv/bin/python bench/chunker.py [--mib 256] [--repeat 3]

Each figure is the best of ``--repeat`` runs of ``vaultfs.chunker.split`` over ``--mib`` MiB held in
memory (no I/O, no hashing). "two threads" runs two splits of two different buffers in parallel and
counts the bytes of both. Wall-clock MB/s is what a user sees; MB per CPU-second (summed over the
threads) is steadier on a shared machine, since time spent preempted does not count. Besides random data (the usual case: ~1.5 MiB chunks, 1/3 of each chunk
skipped unhashed) it measures data that never satisfies the cut condition, where every chunk is 8 MiB
and 15/16 of the bytes are hashed: the chunker's slowest input.
"""

from __future__ import annotations

import argparse
import os
import random
import threading
import time

from vaultfs.chunker import MAX_SIZE, poly, split

MB = 1e6


def timed_split(buf: bytes, pol: int) -> float:
    """Split ``buf``; return the CPU seconds this thread spent."""
    start = time.thread_time()
    split(buf, pol)
    return time.thread_time() - start


def _work(
    barrier: threading.Barrier, bufs: list[bytes], pol: int, cpu: list[float], i: int
) -> None:
    barrier.wait()
    cpu[i] = timed_split(bufs[i], pol)


def measure(bufs: list[bytes], pol: int, repeat: int) -> tuple[float, float]:
    """Split all ``bufs`` at once, one thread each; best (wall MB/s, MB per CPU-second) of ``repeat``."""
    total = sum(len(b) for b in bufs) / MB
    best_wall = best_cpu = float("inf")
    for _ in range(repeat):
        cpu = [0.0] * len(bufs)
        barrier = threading.Barrier(len(bufs) + 1)
        threads = [
            threading.Thread(target=_work, args=(barrier, bufs, pol, cpu, i))
            for i in range(len(bufs))
        ]
        for t in threads:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        best_wall = min(best_wall, time.perf_counter() - start)
        best_cpu = min(best_cpu, sum(cpu))
    return total / best_wall, total / best_cpu


def report(label: str, bufs: list[bytes], pol: int, repeat: int) -> None:
    wall, cpu = measure(bufs, pol, repeat)
    print(f"  {label}: {wall:6.0f} MB/s wall, {cpu:6.0f} MB per CPU-second")


def flat_byte(pol: int) -> int:
    """A byte whose runs never cut on content (only at max_size) under ``pol``."""
    for value in range(1, 256):
        if split(bytes([value]) * (MAX_SIZE + 1), pol) == [MAX_SIZE, 1]:
            return value
    raise RuntimeError("no flat byte found")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB per buffer (default 256)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure, best kept")
    args = parser.parse_args()

    pol = poly.random_polynomial(random.Random(1).randbytes)
    size = args.mib * 1024 * 1024
    bufs = [os.urandom(size), os.urandom(size)]
    chunks = split(bufs[0], pol)
    print(
        f"polynomial {poly.format_polynomial(pol)}, {args.mib} MiB per buffer, {os.cpu_count()} CPUs"
    )
    print(f"random data: {len(chunks)} chunks, {size / len(chunks) / 2**20:.2f} MiB on average")
    report("one thread ", bufs[:1], pol, args.repeat)
    report("two threads", bufs, pol, args.repeat)

    flat = [bytes([flat_byte(pol)]) * size] * 2
    print("no content cuts (8 MiB chunks, 15/16 of the bytes hashed: the worst case):")
    report("one thread ", flat[:1], pol, args.repeat)
    report("two threads", flat, pol, args.repeat)


if __name__ == "__main__":
    main()
