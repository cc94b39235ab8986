"""``LeasedTable``: the broker primitives of every table-shaped broker (DESIGN §3.2).

SQL databases through SQLAlchemy, the Django ORM and MongoDB keep a queue as rows (documents) of
one shape, so the meaning of every primitive is written once here and a backend supplies only a
handful of storage operations (see :class:`LeasedTable`).

A row: ``id`` (increasing, never reused: it is the delivery token and orders equal priorities),
``priority``, ``visible_at`` (a UNIX time), ``owner`` (the process holding it, or none),
``attempts``, ``crashes`` and ``body``. Its state follows from ``owner`` and ``visible_at``:

* **waiting**: no owner; ready once ``visible_at <= now`` (a delay or a ``not_before`` is simply a
  ``visible_at`` in the future, so the take needs one index: ``(priority DESC, id, visible_at)``);
* **held**: an owner, and ``visible_at`` is its lease: ``now + lease``, pushed forward every
  ``lease / 3`` seconds by the base's maintenance thread (:meth:`LeasedTable._renew`);
* **abandoned**: an owner whose lease ran out (its process died, or stalled past the lease). The
  take treats it as ready, so no sweep is needed, and counts the death in ``crashes`` (the
  consumer's poison-message rule reads it).

The take (:meth:`LeasedTable._claim`) must be atomic against every other process: of two
concurrent takers, at most one gets a row (``SELECT ... FOR UPDATE SKIP LOCKED`` then ``UPDATE``,
an ``UPDATE ... RETURNING`` under a write lock, ``find_one_and_update``...). It sets ``owner``,
``visible_at = now + lease``, ``attempts + 1`` and, when the row had an owner, ``crashes + 1``
(:func:`claimed` computes the new counts for backends that read before they write).

Settling only touches rows this process still owns (``owner = self.owner``), so a late ack or nack
of a message whose lease ran out and that another consumer took is a no-op, never a second
settlement; and every settlement is idempotent, as the base requires. An ack deletes the row.

Times are wall-clock UNIX times of the processes, so hosts sharing a queue need synchronised clocks
(NTP); a skew only shifts leases and due times by that much.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

from funboost_like.brokers.base import Broker, DeadLetter, Delivery
from funboost_like.core.config import settings
from funboost_like.core.errors import ConfigurationError

logger = logging.getLogger("funboost_like.broker")


class Claimed(NamedTuple):
    """A row as a take returns it, counts already updated for this delivery."""

    id: Any
    body: bytes
    attempts: int
    priority: int
    crashes: int


def claimed(row_id: Any, body: bytes, attempts: int, priority: int, crashes: int, had_owner: bool) -> Claimed:
    """A row read before the take's update (``attempts``/``crashes`` as stored): its counts after it."""
    return Claimed(row_id, bytes(body), attempts + 1, priority, crashes + (1 if had_owner else 0))


def _deliveries(queue: str, rows: list[Claimed]) -> list[Delivery]:
    rows.sort(key=lambda row: (-row.priority, row.id))  # RETURNING order is not guaranteed
    return [Delivery(queue, row.body, row.id, row.attempts, row.priority, row.crashes) for row in rows]


def _by_queue(deliveries: Sequence[Delivery]) -> dict[str, list[Any]]:
    groups: dict[str, list[Any]] = {}
    for delivery in deliveries:
        groups.setdefault(delivery.queue, []).append(delivery.token)
    return groups


class LeasedTable(Broker):
    """Broker primitives on a table of leased rows; subclasses implement the storage operations.

    A backend sets ``lease_setting`` (the name of its lease setting, in seconds) and implements:

    * ``_insert(queue, priority, visible_at, bodies)``: one row per body, ids in order, at once;
    * ``_claim(queue, now, lease_until, max_n)``: the atomic take above, highest priority first,
      then lowest id, of rows with ``visible_at <= now``;
    * ``_delete(queue, ids)``: delete the rows this process owns (and optionally
      ``_delete_and_claim``, both in one transaction: the consumer's ack-and-fetch);
    * ``_update_owned(queue, ids, *, visible_at, disown, attempts_delta)``: on rows this process
      owns, set ``visible_at`` (and drop the owner when ``disown``), adding ``attempts_delta`` to
      ``attempts`` without going below 0;
    * ``_bury(queue, row_id, letter)``: insert the dead letter and delete the owned row, atomically;
    * ``_delete_waiting(queue, now)`` / ``_count_waiting(queue, now)``: the rows without owner or
      with an expired lease;
    * ``list_dead_letters`` and ``purge_dead_letters``.

    Every operation must be safe to call from several threads at once.
    """

    lease_setting: ClassVar[str]
    inline_batch: ClassVar[int] = 200  # a take and an ack-and-take are each a transaction (commit, fsync)

    def __init__(self) -> None:
        super().__init__()
        self._owner = self._new_owner()

    @staticmethod
    def _new_owner() -> str:
        return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"

    @property
    def owner(self) -> str:
        """The id this process writes into the ``owner`` column of the rows it holds."""
        return self._owner

    def lease_seconds(self) -> float:
        lease = float(settings.get(self.lease_setting))
        if lease <= 0:
            raise ConfigurationError(f"{self.lease_setting} must be positive, not {lease!r}")
        return lease

    def maintenance_interval(self) -> float:
        return self.lease_seconds() / 3

    def _after_fork(self) -> None:
        """A forked child is another consumer: a new owner id (the parent's rows stay the parent's)."""
        self._owner = self._new_owner()

    # -- storage operations (the backend) -------------------------------------------------------
    def _insert(self, queue: str, priority: int, visible_at: float, bodies: Sequence[bytes]) -> None:
        raise NotImplementedError

    def _claim(self, queue: str, now: float, lease_until: float, max_n: int) -> list[Claimed]:
        raise NotImplementedError

    def _delete(self, queue: str, ids: Sequence[Any]) -> None:
        raise NotImplementedError

    def _delete_and_claim(self, queue: str, ids: Sequence[Any], now: float, lease_until: float,
                          max_n: int) -> list[Claimed]:
        """Optional: :meth:`_delete` then :meth:`_claim` in one round trip or transaction."""
        self._delete(queue, ids)
        return self._claim(queue, now, lease_until, max_n)

    def _update_owned(self, queue: str, ids: Sequence[Any], *, visible_at: float, disown: bool,
                      attempts_delta: int) -> None:
        raise NotImplementedError

    def _move_back(self, queue: str, ids: Sequence[Any], visible_at: float) -> None:
        """The owned rows ``ids`` written anew at the back (new ids; priority, attempts, crashes and body
        kept), disowned and ready at ``visible_at``; the old rows deleted. Nothing for a row no longer owned."""
        raise NotImplementedError

    def _bury(self, queue: str, row_id: Any, letter: DeadLetter) -> None:
        raise NotImplementedError

    def _delete_waiting(self, queue: str, now: float) -> int:
        raise NotImplementedError

    def _count_waiting(self, queue: str, now: float) -> int:
        raise NotImplementedError

    # -- broker primitives ------------------------------------------------------------------------
    def _put(self, queue: str, bodies: Sequence[bytes], *, priority: int, not_before: float | None) -> None:
        now = time.time()
        visible_at = float(not_before) if not_before is not None and float(not_before) > now else now
        self._insert(queue, int(priority), visible_at, bodies)

    def _get(self, queue: str, max_n: int) -> list[Delivery]:
        """Take up to ``max_n`` ready or abandoned rows, highest priority first, then oldest."""
        now = time.time()
        return _deliveries(queue, self._claim(queue, now, now + self.lease_seconds(), max_n))

    def _ack(self, deliveries: Sequence[Delivery]) -> None:
        for queue, ids in _by_queue(deliveries).items():
            self._delete(queue, sorted(ids))

    def _ack_and_get(self, deliveries: Sequence[Delivery], queue: str, max_n: int) -> list[Delivery]:
        """Delete and take in one transaction (the base gives acks of ``queue`` only); should that fail, the
        acks are sent alone before raising."""
        now = time.time()
        try:
            rows = self._delete_and_claim(queue, sorted(d.token for d in deliveries), now, now + self.lease_seconds(),
                                          max_n)
        except Exception:
            try:
                self._ack(deliveries)
            except Exception:
                logger.warning("acknowledging %d message(s) failed", len(deliveries), exc_info=True)
            raise
        return _deliveries(queue, rows)

    def _requeue(self, deliveries: Sequence[Delivery], *, delay: float, front: bool, count_attempt: bool) -> None:
        """Visible again after ``delay``: a released row keeps its id, so its place at the front among
        equal priorities, and gives back the attempt its take counted; a nacked one moves to the back."""
        visible_at = time.time() + max(0.0, delay)
        for queue, ids in _by_queue(deliveries).items():
            if front:
                self._update_owned(queue, sorted(ids), visible_at=visible_at, disown=True,
                                   attempts_delta=0 if count_attempt else -1)
            else:
                self._move_back(queue, sorted(ids), visible_at)

    def _renew(self, deliveries: Sequence[Delivery]) -> None:
        """Push the lease of every row this process holds to now + lease (the heartbeat)."""
        until = time.time() + self.lease_seconds()
        for queue, ids in _by_queue(deliveries).items():
            self._update_owned(queue, sorted(ids), visible_at=until, disown=False, attempts_delta=0)

    def _dead_letter(self, delivery: Delivery, letter: DeadLetter) -> None:
        self._bury(delivery.queue, delivery.token, letter)

    def _purge(self, queue: str) -> int:
        """Delete the waiting rows (ready, delayed, or abandoned by a dead consumer); held ones stay."""
        return self._delete_waiting(queue, time.time())

    def _size(self, queue: str) -> int:
        return self._count_waiting(queue, time.time())
