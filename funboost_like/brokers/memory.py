"""LOCAL_PYTHON_QUEUE: queues in the memory of the current process.

Guarantee: at-least-once within the process (a nacked or released message comes back), nothing
survives the process, and other processes cannot see these queues. Capabilities: ack, delay,
priority, dead letters. No connection settings.

:meth:`MemoryBroker.join` waits until a queue is empty and idle and re-raises the exception of a
task that failed for good, which makes this broker the one most behaviour tests run on.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence

from funboost_like.brokers.base import Broker, Capabilities, DeadLetter, Delivery
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.errors import DoubleAckError
from funboost_like.core.stores import MemoryKeyValueStore, check_namespace


class _MemoryQueue:
    __slots__ = ("ready", "levels", "delayed", "unacked", "dead", "failures", "lock", "cond", "waiters", "seq")

    def __init__(self) -> None:
        self.ready: dict[int, deque[tuple[bytes, int]]] = {0: deque()}  # priority -> (body, attempts)
        self.levels = [0]  # priorities present in ``ready``, highest first
        self.delayed: list[tuple[float, int, int, bytes, int]] = []  # (due, seq, priority, body, attempts)
        self.unacked: dict[int, Delivery] = {}
        self.dead: deque[DeadLetter] = deque(maxlen=10_000)
        self.failures: list[BaseException] = []
        self.lock = threading.Lock()  # taken directly on hot paths; ``cond`` wraps it for waiting
        self.cond = threading.Condition(self.lock)
        self.waiters = 0
        self.seq = itertools.count()

    def put(self, body: bytes, priority: int, attempts: int = 0) -> None:
        level = self.ready.get(priority)
        if level is None:
            level = self.ready[priority] = deque()
            self.levels = sorted(self.ready, reverse=True)
        level.append((body, attempts))

    def waiting(self) -> int:
        return sum(len(d) for d in self.ready.values()) + len(self.delayed)


class MemoryBroker(Broker):
    kind = BrokerEnum.LOCAL_PYTHON_QUEUE
    capabilities = Capabilities(ack=True, delay=True, priority=True, dead_letters=True, max_priority=2**31)

    def __init__(self) -> None:
        self._queues: dict[str, _MemoryQueue] = {}
        self._lock = threading.Lock()
        self._tokens = itertools.count(1)
        self._stores: dict[tuple[str, str], MemoryKeyValueStore] = {}

    def _queue(self, name: str) -> _MemoryQueue:
        q = self._queues.get(name)
        if q is None:
            with self._lock:
                q = self._queues.setdefault(name, _MemoryQueue())
        return q

    def publish(self, queue: str, body: bytes, *, priority: int = 0, not_before: float | None = None) -> None:
        q = self._queues.get(queue) or self._queue(queue)
        with q.lock:
            if not_before is not None and not_before > time.time():
                heapq.heappush(q.delayed, (not_before, next(q.seq), priority, body, 0))
            elif priority == 0:
                q.ready[0].append((body, 0))
            else:
                q.put(body, priority)
            if q.waiters:
                q.cond.notify_all()

    def publish_many(self, queue: str, bodies: Sequence[bytes], *, priority: int = 0) -> None:
        q = self._queue(queue)
        with q.cond:
            if priority == 0:
                q.ready[0].extend((body, 0) for body in bodies)
            else:
                for body in bodies:
                    q.put(body, priority)
            if q.waiters:
                q.cond.notify_all()

    def fetch(self, queue: str, max_n: int, timeout: float) -> list[Delivery]:
        q = self._queue(queue)
        deadline = None
        with q.cond:
            while True:
                if q.delayed:
                    self._promote_due(q)
                taken = self._take(queue, q, max_n)
                if taken:
                    return taken
                now = time.monotonic()
                if deadline is None:
                    deadline = now + timeout
                remaining = deadline - now
                if remaining <= 0:
                    return []
                if q.delayed:
                    remaining = min(remaining, max(0.0, q.delayed[0][0] - time.time()))
                q.waiters += 1
                try:
                    q.cond.wait(remaining)
                finally:
                    q.waiters -= 1

    def _take(self, queue: str, q: _MemoryQueue, max_n: int) -> list[Delivery]:
        taken: list[Delivery] = []
        unacked = q.unacked
        tokens = self._tokens
        for priority in q.levels:
            level = q.ready[priority]
            while level and len(taken) < max_n:
                body, attempts = level.popleft()
                token = next(tokens)
                delivery = Delivery(queue, body, token, attempts + 1, priority)
                unacked[token] = delivery
                taken.append(delivery)
            if len(taken) >= max_n:
                break
        return taken

    @staticmethod
    def _promote_due(q: _MemoryQueue) -> None:
        now = time.time()
        delayed = q.delayed
        while delayed and delayed[0][0] <= now:
            _, _, priority, body, attempts = heapq.heappop(delayed)
            q.put(body, priority, attempts)

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        q = self._queue(deliveries[0].queue)
        with q.cond:
            unacked = q.unacked
            for delivery in deliveries:
                if unacked.pop(delivery.token, None) is None:
                    raise DoubleAckError(f"{delivery!r} was already acknowledged or rejected")
            if not unacked and q.waiters:
                q.cond.notify_all()

    def nack(self, delivery: Delivery, *, requeue: bool = True, delay: float = 0.0) -> None:
        self._give_back(delivery, requeue=requeue, delay=delay, count_attempt=True)

    def release(self, deliveries: Iterable[Delivery]) -> None:
        for delivery in deliveries:
            self._give_back(delivery, requeue=True, delay=0.0, count_attempt=False)

    def _give_back(self, delivery: Delivery, *, requeue: bool, delay: float, count_attempt: bool) -> None:
        q = self._queue(delivery.queue)
        with q.cond:
            if q.unacked.pop(delivery.token, None) is None:
                raise DoubleAckError(f"{delivery!r} was already acknowledged or rejected")
            if requeue:
                attempts = delivery.attempts if count_attempt else delivery.attempts - 1
                if delay > 0:
                    due = time.time() + delay
                    heapq.heappush(q.delayed, (due, next(q.seq), delivery.priority, delivery.body, attempts))
                else:
                    q.put(delivery.body, delivery.priority, attempts)
            q.cond.notify_all()

    def dead_letter(self, delivery: Delivery, reason: str, exc: BaseException | None = None) -> None:
        q = self._queue(delivery.queue)
        with q.cond:
            if q.unacked.pop(delivery.token, None) is None:
                raise DoubleAckError(f"{delivery!r} was already acknowledged or rejected")
            q.dead.appendleft(DeadLetter(delivery.queue, delivery.body, reason, time.time(), delivery.attempts))
            if exc is not None:
                q.failures.append(exc)
            q.cond.notify_all()

    def list_dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        q = self._queue(queue)
        with q.cond:
            return list(itertools.islice(q.dead, limit))

    def purge_dead_letters(self, queue: str) -> int:
        q = self._queue(queue)
        with q.cond:
            n = len(q.dead)
            q.dead.clear()
            q.failures.clear()
            return n

    def purge(self, queue: str) -> int:
        q = self._queue(queue)
        with q.cond:
            n = q.waiting()
            for level in q.ready.values():
                level.clear()
            q.delayed.clear()
            return n

    def count(self, queue: str) -> int:
        q = self._queue(queue)
        with q.cond:
            return q.waiting()

    def key_value_store(self, queue: str, namespace: str) -> MemoryKeyValueStore:
        """A process-local store per (queue, namespace), living as long as this broker."""
        key = (queue, check_namespace(namespace))
        store = self._stores.get(key)
        if store is None:
            with self._lock:
                store = self._stores.setdefault(key, MemoryKeyValueStore())
        return store

    def in_flight(self, queue: str) -> int:
        """Messages fetched and not yet acked, nacked or dead-lettered."""
        return len(self._queue(queue).unacked)

    def join(self, queue: str, timeout: float | None = None, *, fail_fast: bool = True,
             include_delayed: bool = True) -> None:
        """Block until ``queue`` has nothing waiting and nothing in flight.

        With ``fail_fast``, re-raise the first exception of a task that failed for good (the newest
        failures are kept until :meth:`purge_dead_letters`). Raises TimeoutError after ``timeout``.
        """
        q = self._queue(queue)
        deadline = None if timeout is None else time.monotonic() + timeout
        with q.cond:
            while True:
                if fail_fast and q.failures:
                    raise q.failures.pop(0)
                waiting = q.waiting() if include_delayed else sum(len(d) for d in q.ready.values())
                if waiting == 0 and not q.unacked:
                    return
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"queue {queue!r} still has {waiting} waiting and {len(q.unacked)} in flight")
                q.waiters += 1
                try:
                    q.cond.wait(0.05 if remaining is None else min(remaining, 0.05))
                finally:
                    q.waiters -= 1
