"""Key-value records on RabbitMQ itself (RPC results, task filters), for every RabbitMQ kind.

RabbitMQ keeps messages, not records, so a record is a queue of at most one message:
``fl.kv.<queue>.<namespace>.<key>`` (a SHA1 of the key when the name would pass AMQP's 255 bytes),
durable, declared with ``x-max-length`` 1 and ``x-overflow: reject-publish``, holding one persistent
message whose ``expiration`` is the record's ttl. The queue itself has ``x-expires`` (ttl plus a
minute), so RabbitMQ deletes records nobody reads any more. A read is a ``basic.get`` whose message
goes straight back (its channel is closed).

:meth:`~AmqpRecords.add_if_absent` cannot rely on that queue's length limit: RabbitMQ counts only
*ready* messages, a reader's ``basic.get`` makes the message unacked for a moment, and its return to
the queue is asynchronous even after the channel's ``close-ok``, so a publish in that window is
accepted and the record would be added twice. Each record therefore has a second one-message queue,
its claim, ``fl.kv.<queue>.<namespace>:<key>``, which nothing ever reads: taking the claim is one
confirmed publish that a full queue refuses, atomic across processes and hosts. The claim expires
with the value and is written by :meth:`~AmqpRecords.put` too.

Records live where the messages live, on the same server, with the same durability, and need
nothing else. Costs: a write is two round trips per queue (declare, confirmed publish), about
2-4 ms; :meth:`~AmqpRecords.wait` polls (5 ms backing off to 50 ms), so an RPC result reaches a
waiting publisher within about 50 ms.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from funboost_like.core.stores import KeyValueStore, check_namespace, check_ttl

if TYPE_CHECKING:
    from funboost_like.brokers.amqp import AmqpBroker, Session

_MAX_NAME = 255
_GRACE_MS = 60_000  # a record's queue outlives its message by this much, then RabbitMQ deletes it


class AmqpRecords(KeyValueStore):
    """Records of one (queue, namespace), each a one-message queue; see the module docstring."""

    def __init__(self, broker: AmqpBroker, queue: str, namespace: str) -> None:
        self._broker = broker
        self._prefix = f"fl.kv.{queue}.{check_namespace(namespace)}"

    def _name(self, key: str, separator: str = ".") -> str:
        """The value's queue (``.``) or the claim's (``:``); see the module docstring."""
        name = f"{self._prefix}{separator}{key}"
        if len(name.encode()) > _MAX_NAME:
            name = f"{self._prefix}{separator}{hashlib.sha1(key.encode()).hexdigest()}"
        return name

    def _run(self, action: Any, what: str) -> Any:
        return self._broker._run(action, what)

    def _declare(self, session: Session, name: str, ttl: float | None) -> None:
        arguments: dict[str, Any] = {"x-max-length": 1, "x-overflow": "reject-publish"}
        if ttl is not None:
            arguments["x-expires"] = int(ttl * 1000) + _GRACE_MS
        if not session.declare_queue(name, arguments):  # declared before with another ttl: start afresh
            session.delete_queue(name)
            session.declare_queue(name, arguments)

    def _offer(self, session: Session, name: str, value: bytes, ttl: float | None) -> bool:
        return session.offer(name, value, None if ttl is None else max(1, int(ttl * 1000)))

    def _replace(self, session: Session, name: str, value: bytes, ttl: float | None) -> None:
        self._declare(session, name, ttl)
        session.purge(name)
        if not self._offer(session, name, value, ttl):  # another writer won the race in between: replace it
            session.purge(name)
            self._offer(session, name, value, ttl)

    def put(self, key: str, value: bytes, ttl: float | None) -> None:
        ttl = check_ttl(ttl)

        def put(session: Session) -> None:
            self._replace(session, self._name(key, ":"), b"", ttl)  # the claim lives exactly as long
            self._replace(session, self._name(key), value, ttl)

        self._run(put, f"writing record {key!r}")

    def get(self, key: str) -> bytes | None:
        name = self._name(key)
        found = self._run(lambda session: session.peek(name, 1), f"reading record {key!r}")
        return bytes(found[0]) if found else None

    def add_if_absent(self, key: str, value: bytes, ttl: float | None) -> bool:
        ttl = check_ttl(ttl)

        def add(session: Session) -> bool:
            claim = self._name(key, ":")
            self._declare(session, claim, ttl)
            if not self._offer(session, claim, b"", ttl):
                return False
            self._replace(session, self._name(key), value, ttl)
            return True

        return bool(self._run(add, f"adding record {key!r}"))

    def delete(self, key: str) -> None:
        def delete(session: Session) -> None:
            session.delete_queue(self._name(key))
            session.delete_queue(self._name(key, ":"))

        self._run(delete, f"deleting record {key!r}")

    def exists(self, key: str) -> bool:
        return self.get(key) is not None
