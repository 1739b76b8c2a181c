"""A per-client token bucket for new sessions: each client address may open `per_minute` offers, `burst` at once.

A few lines suffice here (no library): the limit is per media worker and in memory, which is what one server
needs against one stranger; a fleet limits clients at its proxy (nginx's limit_req, HAProxy's stick tables).
"""

from __future__ import annotations

import time

#: buckets kept at most; past it, the full ones (clients idle long enough to have every token back) are dropped
MAX_CLIENTS = 10_000


class OfferRateLimit:
    """Refills `per_minute` tokens a minute up to `burst`; an offer takes one or is refused with a wait."""

    def __init__(self, per_minute: float, burst: int) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # client → (tokens, when counted)

    def take(self, client: str, now: float | None = None) -> float:
        """0 when `client` may open an offer now (its token is taken), else the seconds until it may."""
        now = time.monotonic() if now is None else now
        tokens, counted = self._buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - counted) * self.rate)
        if tokens < 1.0:
            self._buckets[client] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens - 1.0, now)
        if len(self._buckets) > MAX_CLIENTS:
            self._forget_full(now)
        return 0.0

    def _forget_full(self, now: float) -> None:
        for client, (tokens, counted) in list(self._buckets.items()):
            if tokens + (now - counted) * self.rate >= self.burst:
                del self._buckets[client]
