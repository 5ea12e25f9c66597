"""Memory and speed of the master index (vaultfs/repo/masterindex.py) at a million blobs.

Builds an index of synthetic blobs in packs of 100-1000 blobs (as backup and index loading do), then
prints: nbytes() per blob, RSS growth per blob (VmRSS from /proc/self/status before and after),
build time, and lookups per second for hits and misses. ARCHITECTURE.md "Memory" sets the target: at
most 64 bytes per blob.

    .venv/bin/python bench/index_memory.py [--blobs N] [--bulk]

``--bulk`` loads everything with one ``add_arrays`` call instead of one ``add_pack`` per pack.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import random
import time

import numpy as np

from vaultfs.repo.masterindex import MasterIndex


def rss_bytes() -> int:
    """Resident set size of this process (VmRSS)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def trim_heap() -> bool:
    """Ask glibc to return free heap memory to the OS (malloc_trim); False if it cannot."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        return False
    return True


def pack_sizes(blobs: int, rng: random.Random) -> list[int]:
    sizes = []
    while blobs > 0:
        sizes.append(min(rng.randint(100, 1000), blobs))
        blobs -= sizes[-1]
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blobs", type=int, default=1_000_000)
    parser.add_argument(
        "--bulk", action="store_true", help="one add_arrays call instead of add_pack"
    )
    parser.add_argument("--lookups", type=int, default=200_000)
    args = parser.parse_args()
    rng = random.Random(1)
    n = args.blobs
    # All ids come from one buffer made up front, so the RSS baseline already holds the input and
    # the growth measured is the index (plus whatever the allocator keeps).
    ids = rng.randbytes(32 * n)
    sizes = pack_sizes(n, rng)
    packs = [rng.randbytes(32) for _ in sizes]
    hits = [ids[i * 32 : i * 32 + 32] for i in rng.sample(range(n), min(args.lookups, n))]
    misses = [rng.randbytes(32) for _ in range(args.lookups)]

    index = MasterIndex()
    rss_before = rss_bytes()
    started = time.perf_counter()
    cpu_started = time.process_time()
    if args.bulk:
        index.add_arrays(
            packs,
            np.repeat(np.arange(len(sizes)), sizes),
            ids,
            np.zeros(n, np.uint8),
            np.concatenate([np.arange(s) * 4096 for s in sizes]),
            np.full(n, 4096),
            np.full(n, 8000),
        )
    else:
        first = 0
        for pack, size in zip(packs, sizes, strict=True):
            index.add_pack(
                pack,
                [
                    (ids[(first + i) * 32 : (first + i + 1) * 32], 0, i * 4096, 4096, 8000)
                    for i in range(size)
                ],
            )
            first += size
    build = time.perf_counter() - started
    build_cpu = time.process_time() - cpu_started
    rss_growth = rss_bytes() - rss_before
    assert len(index) == n

    how = "add_arrays" if args.bulk else "add_pack"
    print(f"blobs                {n:,} in {len(sizes):,} packs ({how})")
    print(f"build time           {build:.2f} s wall, {build_cpu:.2f} s cpu")
    print(f"nbytes per blob      {index.nbytes() / n:.1f}")
    print(f"RSS growth per blob  {rss_growth / n:.1f}")
    # The difference is free memory glibc keeps in its heap (its mmap threshold rises up to 32 MiB
    # after large temporaries are freed), not memory the index holds.
    if trim_heap():
        print(f"  after malloc_trim  {(rss_bytes() - rss_before) / n:.1f}")
    for name, method, probes in (
        ("lookup hit", index.lookup, hits),
        ("lookup miss", index.lookup, misses),
        ("has hit", index.has, hits),
        ("has miss", index.has, misses),
    ):
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for blob_id in probes:
                method(blob_id)
            best = min(best, time.perf_counter() - started)
        print(f"{name:<20} {len(probes) / best:,.0f}/s ({best / len(probes) * 1e6:.2f} us each)")
    assert all(index.has(b) for b in hits[:1000]) and not any(index.has(b) for b in misses[:1000])


if __name__ == "__main__":
    main()
