"""The broker contract: the one place a broker plugs in.

A broker moves opaque ``bytes`` bodies between publishers and consumers of named queues. The
framework owns every loop: a broker never runs its own ``while True`` for consumption, it only
answers :meth:`Broker.fetch` within the given timeout.

Thread safety: one broker instance serves every publisher and consumer of its kind in a process,
so every method must be safe to call from several threads at once.

Delivery guarantee: on a broker whose ``capabilities.ack`` is true, a fetched message stays owned
by the consumer until :meth:`ack`, :meth:`nack`, :meth:`release` or :meth:`dead_letter`; if the
consumer dies first, the broker makes it visible again by itself (lease expiry, heartbeat sweep or
native requeue).
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from funboost_like.core.stores import KeyValueStore

logger = logging.getLogger("funboost_like.broker")


@dataclass(frozen=True)
class Capabilities:
    """What a broker can honour; parameter validation reads these, never the broker's name."""

    ack: bool = False  # at-least-once: unacked messages come back after a consumer dies
    persistent: bool = False  # messages survive a broker/process restart
    delay: bool = False  # publish(not_before=...) holds a message invisible until due
    priority: bool = False  # publish(priority=...) orders delivery, higher first
    cross_process: bool = False  # publishers and consumers may live in different processes
    cross_host: bool = False  # ... or on different hosts
    dead_letters: bool = False  # list_dead_letters() works
    max_priority: int = 0


class Delivery:
    """One fetched message: the body plus the broker's handle on it (never part of the payload)."""

    __slots__ = ("queue", "body", "token", "attempts", "priority")

    def __init__(self, queue: str, body: bytes, token: Any, attempts: int = 1, priority: int = 0) -> None:
        self.queue = queue
        self.body = body
        self.token = token  # row id, stream id, delivery tag, ...
        self.attempts = attempts  # 1 on first delivery
        self.priority = priority

    def __repr__(self) -> str:
        return f"Delivery(queue={self.queue!r}, token={self.token!r}, attempts={self.attempts})"


@dataclass(frozen=True)
class DeadLetter:
    """A message the framework gave up on, with the reason."""

    queue: str
    body: bytes
    reason: str
    failed_at: float
    attempts: int = 0


class Broker(ABC):
    """Base class of every broker. Subclasses implement the abstract methods; the rest have defaults."""

    kind: ClassVar[int]
    capabilities: ClassVar[Capabilities] = Capabilities()

    @abstractmethod
    def publish(self, queue: str, body: bytes, *, priority: int = 0, not_before: float | None = None) -> None:
        """Append one message. ``not_before`` is a UNIX time before which it must not be fetched."""

    def publish_many(self, queue: str, bodies: Sequence[bytes], *, priority: int = 0) -> None:
        """Append many messages; fast brokers override this with one round trip or one transaction."""
        for body in bodies:
            self.publish(queue, body, priority=priority)

    @abstractmethod
    def fetch(self, queue: str, max_n: int, timeout: float) -> list[Delivery]:
        """Take up to ``max_n`` ready messages; block at most ``timeout`` seconds; return [] when idle."""

    @abstractmethod
    def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Remove finished messages for good. Batched; must be idempotent per delivery on the broker side."""

    def ack_and_fetch(self, deliveries: Sequence[Delivery], queue: str, max_n: int,
                      timeout: float) -> list[Delivery]:
        """:meth:`ack` ``deliveries``, then :meth:`fetch`: the consumer's call when it has acks to send
        and is about to fetch. A broker that can send both in one round trip overrides this.

        A failed ack never stops the fetch: it is logged (the broker delivers those messages again),
        and only a fetch failure is raised.
        """
        try:
            self.ack(deliveries)
        except Exception:
            logger.exception("acknowledging %d message(s) failed; the broker will deliver them again",
                             len(deliveries))
        return self.fetch(queue, max_n, timeout)

    @abstractmethod
    def nack(self, delivery: Delivery, *, requeue: bool = True, delay: float = 0.0) -> None:
        """Give a message back (visible again after ``delay`` seconds) or, with requeue=False, drop it."""

    def release(self, deliveries: Iterable[Delivery]) -> None:
        """Hand back messages that were fetched but never started (graceful shutdown)."""
        for delivery in deliveries:
            self.nack(delivery, requeue=True)

    def dead_letter(self, delivery: Delivery, reason: str, exc: BaseException | None = None) -> None:
        """Keep a message the framework gave up on, with the reason, and remove it from the queue.

        The default publishes a JSON envelope to the queue ``<queue>.dlq`` and acks the original;
        brokers with a native place override this and :meth:`list_dead_letters`.
        """
        from funboost_like.core import codec

        envelope = codec.dumps(
            {"reason": reason, "failed_at": time.time(), "attempts": delivery.attempts,
             "body": delivery.body.decode("utf-8", "replace")}
        )
        self.publish(dead_letter_queue_name(delivery.queue), envelope)
        self.ack([delivery])

    def list_dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        """The most recent dead letters of ``queue``, newest first."""
        raise NotImplementedError(f"{type(self).__name__} cannot list dead letters")

    def purge_dead_letters(self, queue: str) -> int:
        raise NotImplementedError(f"{type(self).__name__} cannot purge dead letters")

    @abstractmethod
    def purge(self, queue: str) -> int:
        """Delete every waiting message of ``queue``; return how many were deleted."""

    @abstractmethod
    def count(self, queue: str) -> int:
        """How many messages wait in ``queue`` (ready or delayed; not those held by a consumer)."""

    def key_value_store(self, queue: str, namespace: str) -> KeyValueStore:
        """The store of small expiring records kept beside ``queue`` (RPC results, task filters, ...).

        ``namespace`` (``[A-Za-z0-9_-]{1,64}``) separates features. The same (queue, namespace)
        returns the same store; see :mod:`funboost_like.core.stores` for the contract.
        """
        raise NotImplementedError(f"broker {type(self).__name__} keeps no key-value records (needed by RPC "
                                  "results and task filtering)")

    def close(self) -> None:  # noqa: B027 - optional hook, brokers without connections keep it
        """Release connections. The broker may be used again afterwards (it reconnects lazily)."""


def dead_letter_queue_name(queue: str) -> str:
    return f"{queue}.dlq"
