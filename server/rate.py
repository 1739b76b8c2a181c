"""Token buckets: per client address for new sessions, per session and per client address for PATCH.

A few lines suffice here (no library): the limits are per media worker and in memory, which is what one server
needs against one stranger; a fleet limits clients at its proxy (nginx's limit_req, HAProxy's stick tables).
"""

from __future__ import annotations

import time

#: buckets kept at most; past it, the full ones (clients idle long enough to have every token back) are dropped
MAX_CLIENTS = 10_000


class TokenBuckets:
    """One bucket a key: refills `per_second` tokens a second up to `burst`; a request takes one or is refused
    with the seconds until it may."""

    def __init__(self, per_second: float, burst: int) -> None:
        if per_second <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs a rate > 0 and a burst >= 1, not {per_second} and {burst}")
        self.rate = per_second
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # key → (tokens, when counted)

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, now: float | None = None) -> float:
        """0 when `key` may go ahead now (its token is taken), else the seconds until it may."""
        now = time.monotonic() if now is None else now
        tokens, counted = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - counted) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > MAX_CLIENTS:
            self._forget_full(now)
        return 0.0

    def forget(self, key: str) -> None:
        """Drop a key's bucket (a closed session's), so buckets do not grow with churn."""
        self._buckets.pop(key, None)

    def _forget_full(self, now: float) -> None:
        for key, (tokens, counted) in list(self._buckets.items()):
            if tokens + (now - counted) * self.rate >= self.burst:
                del self._buckets[key]


class OfferRateLimit(TokenBuckets):
    """New sessions per client address: `per_minute` offers a minute, `burst` at once."""

    def __init__(self, per_minute: float, burst: int) -> None:
        super().__init__(per_minute / 60.0, burst)
