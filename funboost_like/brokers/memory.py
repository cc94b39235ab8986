"""LOCAL_PYTHON_QUEUE: queues in the memory of the current process.

Guarantee: at-least-once within the process (a nacked or released message comes back), nothing
survives the process, and other processes cannot see these queues. Capabilities: native
redelivery (within the process), native delay, priority, dead letters, key-value records. No
connection settings.

:meth:`MemoryBroker.join` waits until a queue is empty and idle and re-raises the exception of a
task that failed for good, which makes this broker the one most behaviour tests run on.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Sequence

from funboost_like.brokers.base import Broker, Capabilities, DeadLetter, Delivery
from funboost_like.brokers.routing import Binding, added_bindings
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.stores import MemoryKeyValueStore, check_namespace


class _MemoryQueue:
    __slots__ = ("ready", "levels", "delayed", "dead", "failures", "lock", "cond", "waiters", "seq", "taken")

    def __init__(self) -> None:
        self.ready: dict[int, deque[tuple[bytes, int]]] = {0: deque()}  # priority -> (body, attempts so far)
        self.levels = [0]  # priorities present in ``ready``, highest first
        self.delayed: list[tuple[float, int, int, bytes, int]] = []  # (due, seq, priority, body, attempts)
        self.dead: deque[DeadLetter] = deque(maxlen=10_000)
        self.failures: list[BaseException] = []
        self.lock = threading.Lock()  # taken directly on hot paths; ``cond`` wraps it for waiting
        self.cond = threading.Condition(self.lock)
        self.waiters = 0
        self.seq = itertools.count()
        self.taken = 0  # fetched and not settled (join() waits for 0; counted under the lock)

    def level(self, priority: int) -> deque[tuple[bytes, int]]:
        level = self.ready.get(priority)
        if level is None:
            level = self.ready[priority] = deque()
            self.levels = sorted(self.ready, reverse=True)
        return level

    def promote_due(self) -> None:
        now = time.time()
        delayed = self.delayed
        while delayed and delayed[0][0] <= now:
            _, _, priority, body, attempts = heapq.heappop(delayed)
            self.level(priority).append((body, attempts))

    def waiting(self) -> int:
        return sum(len(d) for d in self.ready.values()) + len(self.delayed)

    def wake(self) -> None:
        if self.waiters:
            self.cond.notify_all()


class MemoryBroker(Broker):
    kind = BrokerEnum.LOCAL_PYTHON_QUEUE
    capabilities = Capabilities(redelivery="native", delay="native", max_priority=2**31, dead_letters=True,
                                key_value=True, routing="emulated")
    idle_fetch_seconds = 0.1  # an empty take is a lock and a look: a stop waits 0.1 s at most

    def __init__(self) -> None:
        super().__init__()
        self._queues: dict[str, _MemoryQueue] = {}
        self._lock = threading.Lock()
        self._tokens = itertools.count(1)
        self._exchanges: dict[str, list[Binding]] = {}

    def _queue(self, name: str) -> _MemoryQueue:
        q = self._queues.get(name)
        if q is None:
            with self._lock:
                q = self._queues.setdefault(name, _MemoryQueue())
        return q

    # -- primitives ------------------------------------------------------------------------------
    def _put(self, queue: str, bodies: Sequence[bytes], *, priority: int, not_before: float | None) -> None:
        q = self._queues.get(queue) or self._queue(queue)
        with q.lock:
            self._put_locked(q, bodies, priority, not_before)

    @staticmethod
    def _put_locked(q: _MemoryQueue, bodies: Sequence[bytes], priority: int, not_before: float | None) -> None:
        if not_before is not None and not_before > time.time():
            for body in bodies:
                heapq.heappush(q.delayed, (not_before, next(q.seq), priority, body, 0))
        elif len(bodies) == 1:
            (q.ready[0] if priority == 0 else q.level(priority)).append((bodies[0], 0))
        else:
            (q.ready[0] if priority == 0 else q.level(priority)).extend([(body, 0) for body in bodies])
        if q.waiters:
            q.cond.notify_all()

    def _bind(self, bindings: Sequence[Binding]) -> None:
        with self._lock:
            existing = self._exchanges.setdefault(bindings[0].exchange, [])
            existing.extend(added_bindings(existing, bindings))

    def _bindings(self, exchange: str) -> list[Binding]:
        return list(self._exchanges.get(exchange, ()))

    def _put_many(self, queues: Sequence[str], bodies: Sequence[bytes], *, priority: int,
                  not_before: float | None) -> None:
        """All queues locked at once (in name order), so no fetch sees the message in some and not others."""
        locks = [self._queue(name).lock for name in sorted(queues)]
        for lock in locks:
            lock.acquire()
        try:
            for name in queues:
                self._put_locked(self._queues[name], bodies, priority, not_before)
        finally:
            for lock in reversed(locks):
                lock.release()

    def _get(self, queue: str, max_n: int) -> list[Delivery]:
        q = self._queues.get(queue) or self._queue(queue)
        taken: list[Delivery] = []
        tokens = self._tokens
        with q.lock:
            if q.delayed:
                q.promote_due()
            for priority in q.levels:
                level = q.ready[priority]
                while level and len(taken) < max_n:
                    body, attempts = level.popleft()
                    taken.append(Delivery(queue, body, next(tokens), attempts + 1, priority))
                if len(taken) >= max_n:
                    break
            q.taken += len(taken)
        return taken

    def _wait(self, queue: str, timeout: float) -> None:
        q = self._queue(queue)
        with q.cond:
            if q.delayed:
                q.promote_due()
                timeout = min(timeout, max(0.0, q.delayed[0][0] - time.time())) if q.delayed else timeout
            if any(q.ready.values()):
                return
            q.waiters += 1
            try:
                q.cond.wait(timeout)
            finally:
                q.waiters -= 1

    def _ack(self, deliveries: Sequence[Delivery]) -> None:
        q = self._queue(deliveries[0].queue)
        with q.lock:
            q.taken -= len(deliveries)
            q.wake()  # join() watches the in-flight count

    def _requeue(self, deliveries: Sequence[Delivery], *, delay: float, front: bool, count_attempt: bool) -> None:
        q = self._queue(deliveries[0].queue)
        with q.lock:
            q.taken -= len(deliveries)
            for delivery in reversed(deliveries) if front else deliveries:
                attempts = delivery.attempts if count_attempt else delivery.attempts - 1
                if delay > 0:
                    due = time.time() + delay
                    heapq.heappush(q.delayed, (due, next(q.seq), delivery.priority, delivery.body, attempts))
                elif front:
                    q.level(delivery.priority).appendleft((delivery.body, attempts))
                else:
                    q.level(delivery.priority).append((delivery.body, attempts))
            q.wake()

    def _dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        q = self._queue(delivery.queue)
        with q.lock:
            q.taken -= 1
            q.dead.appendleft(letter)
            if letter.error is not None:
                q.failures.append(letter.error)
            q.wake()

    def _purge(self, queue: str) -> int:
        q = self._queue(queue)
        with q.lock:
            n = q.waiting()
            for level in q.ready.values():
                level.clear()
            q.delayed.clear()
            return n

    def _size(self, queue: str) -> int:
        q = self._queue(queue)
        with q.lock:
            return q.waiting()

    # -- dead letters and records ------------------------------------------------------------------
    def list_dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        q = self._queue(queue)
        with q.lock:
            return list(itertools.islice(q.dead, limit))

    def _heads(self, queue: str) -> list[bytes]:
        q = self._queue(queue)
        with q.lock:
            return [level[0][0] for level in q.ready.values() if level]

    def list_delayed(self, queue: str, limit: int = 100) -> list[tuple[float, bytes]]:
        q = self._queue(queue)
        with q.lock:
            return [(due, body) for due, _, _, body, _ in heapq.nsmallest(max(0, limit), q.delayed)]

    def remove_dead_letter(self, queue: str, letter: DeadLetter) -> bool:
        q = self._queue(queue)
        with q.lock:
            try:
                q.dead.remove(letter)
            except ValueError:
                return False
            return True

    def purge_dead_letters(self, queue: str) -> int:
        q = self._queue(queue)
        with q.lock:
            n = len(q.dead)
            q.dead.clear()
            q.failures.clear()
            return n

    def key_value_store(self, queue: str, namespace: str) -> MemoryKeyValueStore:
        """A process-local store per (queue, namespace), living as long as this broker."""
        return self._kv_store((queue, check_namespace(namespace)), MemoryKeyValueStore)

    def in_flight(self, queue: str) -> int:
        return self._queue(queue).taken

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
                in_flight = q.taken
                if waiting == 0 and not in_flight:
                    return
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"queue {queue!r} still has {waiting} waiting and {in_flight} in flight")
                q.waiters += 1
                try:
                    q.cond.wait(0.05 if remaining is None else min(remaining, 0.05))
                finally:
                    q.waiters -= 1
