"""The dashboard's record of failed logins: per client address, the times of its recent failures.

Bounded in time and in size: an address is forgotten once its last failure is older than the window, and
at most ``max_addresses`` are remembered (beyond, those whose last failure is oldest go first), so logins
sent from ever more addresses cannot grow the server's memory without end.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque


class LoginFailures:
    """Failed logins per client address over the last ``window`` seconds; thread-safe."""

    def __init__(self, allowed: int, window: float, max_addresses: int) -> None:
        self.allowed, self.window, self.max_addresses = allowed, window, max_addresses
        self._times: OrderedDict[str, deque[float]] = OrderedDict()  # the oldest last failure first
        self._lock = threading.Lock()

    def refused(self, client: str, now: float) -> bool:
        """Whether ``client`` failed ``allowed`` times within the window before ``now``."""
        with self._lock:
            self._forget_before(now)
            times = self._times.get(client)
            return times is not None and sum(now - t < self.window for t in times) >= self.allowed

    def failed(self, client: str, now: float) -> None:
        """One more failure of ``client`` at ``now`` (a monotonic time)."""
        with self._lock:
            self._forget_before(now)
            times = self._times.pop(client, None) or deque(maxlen=self.allowed)
            times.append(now)
            self._times[client] = times  # last: its failure is the newest
            while len(self._times) > self.max_addresses:
                self._times.popitem(last=False)

    def __len__(self) -> int:
        return len(self._times)

    def _forget_before(self, now: float) -> None:
        """Forget the addresses whose last failure left the window (they are first in the order)."""
        times = self._times
        while times:
            first = next(iter(times.values()))
            if now - first[-1] < self.window:
                return
            times.popitem(last=False)
