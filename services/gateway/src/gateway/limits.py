"""Per-device uplink rate limiting: a token bucket per device id, in bounded memory.

A device that floods (firmware bug, hostile unit) must not hold up the others nor grow the
gateway's memory: each device gets `rate_per_s` messages a second with bursts up to `burst`;
the excess is dropped (acknowledged to the broker, counted, never forwarded). Buckets of
devices that went quiet are swept; if more than `max_devices` are active at once the table is
reset (everyone starts again with a full bucket) rather than grow without bound.
"""

import time
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    at: float


class DeviceRateLimiter:
    """`allow(device_id)` answers whether this message fits the device's budget."""

    def __init__(self, *, rate_per_s: float, burst: float, max_devices: int = 200_000) -> None:
        self.rate_per_s = rate_per_s
        self.burst = max(burst, 1.0)
        self.max_devices = max_devices
        self._buckets: dict[str, _Bucket] = {}
        self._swept_at = time.monotonic()
        # A bucket idle this long is full again: forgetting it changes nothing.
        self._idle_s = self.burst / rate_per_s if rate_per_s > 0 else 0.0

    @property
    def enabled(self) -> bool:
        """A rate of 0 turns limiting off."""
        return self.rate_per_s > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, device_id: str, now: float | None = None) -> bool:
        """Take one token from the device's bucket; False when it is empty."""
        if self.rate_per_s <= 0:
            return True
        now = time.monotonic() if now is None else now
        bucket = self._buckets.get(device_id)
        if bucket is None:
            if len(self._buckets) >= self.max_devices:
                self._sweep(now)
            self._buckets[device_id] = _Bucket(self.burst - 1.0, now)
            return True
        tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate_per_s)
        bucket.at = now
        if tokens < 1.0:
            bucket.tokens = tokens
            return False
        bucket.tokens = tokens - 1.0
        if now - self._swept_at > max(self._idle_s, 10.0):
            self._sweep(now)
        return True

    def _sweep(self, now: float) -> None:
        self._swept_at = now
        self._buckets = {k: b for k, b in self._buckets.items() if now - b.at < self._idle_s}
        if len(self._buckets) >= self.max_devices:
            self._buckets.clear()  # a flood of distinct ids: bounded memory over fairness
