"""What the lost channels of this process held, for telling a redelivery from a death (push adapter).

A push-style server (RabbitMQ) delivers again, marked ``redelivered``, every message a closed channel
held unacked: those of a consumer that died, and those of a live process whose connection or channel
dropped (running, finished with the ack unsent, or buffered). Only the first are deaths. The push
adapter notes the bodies its lost channels held; a redelivered message this process takes back whose
body was noted is not counted as a crash (each noted body matches once). Delivered to another process
first, it is counted there: the server does not say who held it.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Collection

KEPT = 10_000  # bodies noted per queue at most (the oldest go: delivered to other consumers meanwhile)


class GivenBack:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._noted: dict[str, Counter[bytes]] = {}

    def note(self, queue: str, bodies: Collection[bytes]) -> None:
        """The server takes back what a channel of this process held unacked (it is gone)."""
        if bodies:
            with self._lock:
                noted = self._noted.setdefault(queue, Counter())
                noted.update(bodies)
                while len(noted) > KEPT:
                    del noted[next(iter(noted))]

    def forget(self, queue: str) -> None:
        """Count them after all (the server closed the channel because of a call: consumer_timeout)."""
        with self._lock:
            self._noted.pop(queue, None)

    def take(self, queue: str, body: bytes) -> bool:
        """Whether a redelivered message of ``queue`` is one a lost channel of this live process held."""
        with self._lock:
            noted = self._noted.get(queue)
            if not noted or not noted[body]:
                return False
            noted[body] -= 1
            if not noted[body]:
                del noted[body]
            return True
