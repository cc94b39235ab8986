"""Start-rate control: ``qps`` starts per second whatever each call's duration.

Starts are scheduled on a fixed grid ``t0 + k / qps``, so sleeping a little too long never lowers
the rate. Falling behind by more than one interval (at most 50 ms) (an empty queue, a full pool)
builds up no credit: the grid restarts at the current time, so a backlog never produces a burst.
"""

from __future__ import annotations

import threading
import time


class RateLimiter:
    def __init__(self, qps: float) -> None:
        if qps <= 0:
            raise ValueError("qps must be > 0")
        self.interval = 1.0 / qps
        # Lateness forgiven without moving the grid: waking up a little late (sleep granularity,
        # a busy fetcher) must not lower the rate, but a real gap must not produce a burst.
        self.tolerance = min(self.interval, 0.05)
        self._next = 0.0

    def wait(self, stop: threading.Event) -> bool:
        """Block until the next start slot; return False if ``stop`` was set while waiting."""
        now = time.monotonic()
        slot = self._next
        if now - slot > self.tolerance:
            slot = now  # idle or stalled for longer than the tolerance: no credit, restart the grid
        self._next = slot + self.interval
        delay = slot - now
        if delay > 0:
            if delay > 0.05:
                return not stop.wait(delay)
            time.sleep(delay)
        return not stop.is_set()
