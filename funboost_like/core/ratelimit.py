"""Start-rate control: ``qps`` starts per second whatever each call's duration.

Starts are scheduled on a fixed grid ``t0 + k / qps``. Falling behind (an empty queue, a full pool)
does not build up credit: after a gap the grid restarts at the current time, so a backlog never
produces a burst above the rate.
"""

from __future__ import annotations

import threading
import time


class RateLimiter:
    def __init__(self, qps: float) -> None:
        if qps <= 0:
            raise ValueError("qps must be > 0")
        self.interval = 1.0 / qps
        self._next = 0.0

    def wait(self, stop: threading.Event) -> bool:
        """Block until the next start slot; return False if ``stop`` was set while waiting."""
        now = time.monotonic()
        slot = self._next
        if slot < now:
            slot = now  # no credit for idle time
        self._next = slot + self.interval
        delay = slot - now
        if delay > 0:
            if delay > 0.05:
                return not stop.wait(delay)
            time.sleep(delay)
        return not stop.is_set()
