"""Per-bucket quotas: bytes stored plus bytes promised to uploads in flight must stay within the quota.

A bucket's usage is tallied from disk the first time it is needed (only buckets with a quota need it) and
then kept up to date by the server's own writes and deletes. Uploads reserve their Content-Length before
the first byte is written, so concurrent uploads cannot overshoot together. Files copied into a bucket
folder behind the server's back are counted from the next start.

A tally belongs to one incarnation of a bucket, told by its creation time and PSK hash: a bucket deleted
and created again under the same name while the server runs (`vault server bucket` works beside it) is
tallied afresh, not charged with what the old one held.

Lives in the server's trio thread; the tally runs in a worker thread.
"""

from __future__ import annotations

import trio

from vaultfs.server.state import Bucket
from vaultfs.server.storage import Storage


class Quotas:
    def __init__(self, storage: Storage, limiter: trio.CapacityLimiter) -> None:
        self.storage = storage
        self.limiter = limiter
        self._used: dict[str, int] = {}
        self._reserved: dict[str, int] = {}
        self._scans: dict[str, trio.Event] = {}
        self._incarnations: dict[str, tuple[str, bytes]] = {}

    def _current(self, bucket: Bucket) -> str:
        """``bucket.name``, its tally dropped if it was made for an earlier bucket of that name."""
        incarnation = (bucket.created, bucket.psk_hash)
        if self._incarnations.get(bucket.name) != incarnation:
            self._incarnations[bucket.name] = incarnation
            self._used.pop(bucket.name, None)
        return bucket.name

    async def used(self, of: Bucket) -> int:
        bucket = self._current(of)
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

    async def reserve(self, bucket: Bucket, size: int) -> bool:
        """Promise ``size`` bytes to an upload; False if the bucket's quota would be exceeded."""
        if bucket.quota <= 0:
            return True
        used = await self.used(bucket)
        name = bucket.name
        if used + self._reserved.get(name, 0) + size > bucket.quota:
            return False
        self._reserved[name] = self._reserved.get(name, 0) + size
        return True

    def release(self, bucket: Bucket, size: int) -> None:
        if bucket.quota > 0:
            left = self._reserved.get(bucket.name, 0) - size
            if left > 0:
                self._reserved[bucket.name] = left
            else:
                self._reserved.pop(bucket.name, None)

    def stored(self, of: Bucket, delta: int) -> None:
        """Account a committed upload (positive) or a delete (negative), if the bucket is tallied."""
        bucket = self._current(of)
        if bucket in self._used:
            self._used[bucket] = max(0, self._used[bucket] + delta)
