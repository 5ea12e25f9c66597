"""Per-bucket quotas: bytes stored plus bytes promised to uploads in flight must stay within the quota.

A bucket's usage is tallied from disk the first time it is needed (only buckets with a quota need it) and
then kept up to date by the server's own writes and deletes. Uploads reserve their Content-Length before
the first byte is written, so concurrent uploads cannot overshoot together. Files copied into a bucket
folder behind the server's back are counted from the next start.

Lives in the server's trio thread; the tally runs in a worker thread.
"""

from __future__ import annotations

import trio

from vaultfs.server.storage import Storage


class Quotas:
    def __init__(self, storage: Storage, limiter: trio.CapacityLimiter) -> None:
        self.storage = storage
        self.limiter = limiter
        self._used: dict[str, int] = {}
        self._reserved: dict[str, int] = {}
        self._scans: dict[str, trio.Event] = {}

    async def used(self, bucket: str) -> int:
        if bucket not in self._used:
            scan = self._scans.get(bucket)
            if scan is not None:
                await scan.wait()
            else:
                scan = self._scans[bucket] = trio.Event()
                try:
                    total, _files = await trio.to_thread.run_sync(
                        self.storage.usage_sync, bucket, limiter=self.limiter
                    )
                    self._used[bucket] = total
                finally:
                    del self._scans[bucket]
                    scan.set()
        return self._used.get(bucket, 0)

    async def reserve(self, bucket: str, size: int, quota: int) -> bool:
        """Promise ``size`` bytes to an upload; False if the bucket's quota would be exceeded."""
        if quota <= 0:
            return True
        used = await self.used(bucket)
        if used + self._reserved.get(bucket, 0) + size > quota:
            return False
        self._reserved[bucket] = self._reserved.get(bucket, 0) + size
        return True

    def release(self, bucket: str, size: int, quota: int) -> None:
        if quota > 0:
            left = self._reserved.get(bucket, 0) - size
            if left > 0:
                self._reserved[bucket] = left
            else:
                self._reserved.pop(bucket, None)

    def stored(self, bucket: str, delta: int) -> None:
        """Account a committed upload (positive) or a delete (negative), if the bucket is tallied."""
        if bucket in self._used:
            self._used[bucket] = max(0, self._used[bucket] + delta)

    def forget(self, bucket: str) -> None:
        self._used.pop(bucket, None)
