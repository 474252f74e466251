"""Request rate per API key: a token bucket per key id, in memory, answered 429 with Retry-After.

Each key may make ``burst`` requests at once and ``requests_per_s`` on average; the tenant's own
values (``ledger tenants rate``) win over the settings' defaults (LEDGER_RATE_PER_KEY_PER_S,
LEDGER_RATE_BURST). The buckets live in the API process: N API processes allow N times the rate
(say so in a deployment's own quota). Unauthenticated requests never reach a bucket.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# Buckets kept; the least recently used beyond this is forgotten (it comes back full: the lenient way).
BUCKETS_MAX = 100_000


@dataclass
class _Bucket:
    tokens: float
    at: float


class TokenBuckets:
    def __init__(self, clock: Callable[[], float] = time.monotonic, buckets_max: int = BUCKETS_MAX) -> None:
        self.clock = clock
        self.buckets_max = buckets_max
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, key: str, requests_per_s: int, burst: int) -> int | None:
        """Spend one request of ``key``'s bucket: None if allowed, else the whole seconds to wait."""
        now = self.clock()
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = _Bucket(float(burst), now)
        else:
            bucket.tokens = min(float(burst), bucket.tokens + (now - bucket.at) * requests_per_s)
            bucket.at = now
        self._buckets[key] = bucket  # most recently used last
        while len(self._buckets) > self.buckets_max:
            self._buckets.popitem(last=False)
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return None
        return max(1, math.ceil((1 - bucket.tokens) / requests_per_s))
