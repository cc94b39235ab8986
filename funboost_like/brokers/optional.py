"""The optional part of the broker contract: what a broker may let operators see and manage.

Each method here refuses (NotImplementedError naming the broker) or does nothing; a broker that has
the feature overrides it. :class:`~funboost_like.brokers.base.Broker` inherits them.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from funboost_like.brokers.dead_letters import DeadLetter

if TYPE_CHECKING:
    from funboost_like.core.stores import KeyValueStore


class OptionalOperations:
    """Dead letters, delayed messages, a queue's head, per-queue options, key-value records, and the
    waking of a queue's waiting fetches (:meth:`interrupt_fetch`)."""

    _interrupts: Mapping[str, int] = MappingProxyType({})  # queue -> interrupt_fetch() calls (copied on write)

    def interrupt_fetch(self, queue: str) -> None:
        """Make the fetches of ``queue`` that wait in this process return soon, with what they took
        (a consumer stops: its idle fetch need not wait out its timeout). A broker whose native wait
        can be woken from another thread does it in :meth:`_interrupt`; a polled wait ends at its next
        poll (at most 50 ms); a wait on the server at its end. A fetch that begins after this call
        waits as usual."""
        interrupts = dict(self._interrupts)
        interrupts[queue] = interrupts.get(queue, 0) + 1
        self._interrupts = interrupts
        self._interrupt(queue)

    def _interrupt(self, queue: str) -> None:
        """Optional: wake the native waits (``_wait``) of ``queue`` in this process, from any thread; never
        raises (the wait then ends by its timeout)."""

    def _interrupt_mark(self, queue: str) -> int:
        return self._interrupts.get(queue, 0)

    def list_dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        """The most recent dead letters of ``queue``, newest first."""
        raise NotImplementedError(f"{type(self).__name__} cannot list dead letters")

    def purge_dead_letters(self, queue: str) -> int:
        raise NotImplementedError(f"{type(self).__name__} cannot purge dead letters")

    def configure_queue(self, queue: str, options: Mapping[str, object]) -> None:
        """Apply the ``broker_exclusive_config`` keys of ``capabilities.queue_options`` to ``queue``."""

    def list_delayed(self, queue: str, limit: int = 100) -> list[tuple[float, bytes]]:
        """(due time, body) of messages of ``queue`` not due yet (countdowns, delayed retries), soonest first."""
        raise NotImplementedError(f"{type(self).__name__} cannot list its delayed messages")

    def remove_dead_letter(self, queue: str, letter: DeadLetter) -> bool:
        """Delete one letter :meth:`list_dead_letters` returned; False when it is gone already."""
        raise NotImplementedError(f"{type(self).__name__} cannot remove a single dead letter")

    def _heads(self, queue: str) -> list[bytes]:
        raise NotImplementedError(f"{type(self).__name__} cannot read the head of a queue without taking it")

    def key_value_store(self, queue: str, namespace: str) -> KeyValueStore:
        """The store of small expiring records kept beside ``queue`` (RPC results, task filters, ...).

        ``namespace`` (``[A-Za-z0-9_-]{1,64}``) separates features. The same (queue, namespace)
        returns the same store; see :mod:`funboost_like.core.stores` for the contract. Brokers whose
        ``capabilities.key_value`` is true override this.
        """
        raise NotImplementedError(f"broker {type(self).__name__} keeps no key-value records (needed by RPC "
                                  "results and task filtering)")
