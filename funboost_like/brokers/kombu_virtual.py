"""KOMBU on kombu's virtual transports (``redis://``, ``memory://``, ``sqla+<SQLAlchemy URL>``, any other).

Broker kind KOMBU takes any kombu URL. :func:`kombu_broker_class` (the kind's registry entry) reads
``KOMBU_URL`` each time the kind is resolved and picks the class whose :class:`Capabilities` state
what that transport promises, so decoration-time checks (priorities, delays, RPC results, routing)
judge the transport actually configured: an AMQP URL gets
:class:`~funboost_like.brokers.kombu_broker.KombuBroker` (RabbitMQ's full semantics); the classes
below use kombu's virtual channels (``basic_get``, ``basic_ack``, a ``Producer``). A failover list must
stay on one transport. Kombu transport options may be given as query parameters of the URL
(``redis://host:6379/0?visibility_timeout=30``); passwords never reach a log.

What every virtual transport gets here: a message is taken with ``basic_get`` and stays unacked in
kombu until settled. A nack, a release or a delay publishes the message again (to the back of its
queue) with its counts in the headers ``fl-attempts`` and ``fl-crashes``, as on RabbitMQ, then acks
the original. Delays are emulated as Celery's ETA is: a message published with ``fl-not-before`` in the
future is taken by a consumer and held, unacked, until due, so it is neither waiting in ``count`` of
other processes nor visible to them. Dead letters are JSON envelopes in the queue ``<queue>.dlq``.
No routing (kombu's emulated exchanges keep their tables per process on most transports, and fanout on
Redis is PUB/SUB, which drops what nobody listens to).

Per transport (docs/guarantees.md says the same):

* ``redis://`` (``rediss://``, ``sentinel://``): at-least-once. kombu keeps a taken message in its
  ``unacked`` hash, indexed by time in ``unacked_index``; this broker renews the index entries of what
  its process holds every quarter of ``visibility_timeout`` (default here 20 s, not kombu's hour) and
  makes what a dead consumer held visible again (kombu's ``restore_visible``) once it is older than
  that, counting one crash per message (kombu marks it ``redelivered``). A message is lost only if its
  consumer dies between kombu's ``RPOP`` and its ``unacked`` write. Give every process of a database the
  same visibility timeout: the shortest decides, for plain kombu consumers too. Priorities in kombu's four steps,
  lower numbers first; the framework's priority ``p`` is kombu's ``9 - p``, so 7-9, 4-6, 1-3 and 0 are
  the four levels. Key-value records are Redis strings, as for the REDIS kinds. A message that a plain
  kombu consumer gave back by closing its channel also comes marked ``redelivered``: counted as a crash.
* ``memory://``: one process only; at-least-once within it (nacks and releases come back; closing the
  broker gives back what it holds). Key-value records in memory.
* ``sqla+...`` (SQLAlchemy; ``sqla+sqlite:///file`` is one host): at-most-once across a crash: kombu marks
  a taken row invisible and never makes it visible again, so a killed consumer loses what it held (its
  running and fetched calls); a graceful stop loses nothing. kombu never deletes taken rows (purging a
  queue does). No priorities, no key-value records.
* Any other kombu transport: taken and settled the same way, with no promise about a killed consumer,
  no priorities, no records and no listing of dead letters.
"""

from __future__ import annotations

import difflib
import heapq
import itertools
import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, ClassVar

import kombu
import kombu.exceptions as ke
from kombu.transport import TRANSPORT_ALIASES

from funboost_like.brokers.amqp import ATTEMPTS, CRASHES, url_setting
from funboost_like.brokers.base import Broker, Capabilities, DeadLetter, Delivery
from funboost_like.brokers.kombu_broker import AMQP_SCHEMES, KombuBroker, redact
from funboost_like.brokers.kombu_urls import split_options, transport_name
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.errors import ConfigurationError
from funboost_like.core.stores import KeyValueStore, MemoryKeyValueStore, check_namespace

logger = logging.getLogger("funboost_like.kombu")

NOT_BEFORE = "fl-not-before"
_JSON = "application/json"
_PERSISTENT = 2


class TransportUnreachable(Exception):
    """A kombu transport's connection error (the client's error is the cause)."""


class TransportFailed(Exception):
    """Any other error of a kombu transport (the client's error is the cause)."""


def kombu_broker_class() -> type[Broker]:
    """The class of kind KOMBU for the ``KOMBU_URL`` configured now (read at each call, never at import)."""
    url = url_setting("KOMBU_URL")
    names = {"amqp" if name in AMQP_SCHEMES else name for name in map(transport_name, url.split(";")) if name}
    names |= {""} if any("://" not in part for part in url.split(";")) else set()
    if len(names) != 1:
        raise ConfigurationError(f"KOMBU_URL {redact(url)!r}: a failover list must stay on one kombu transport")
    name = names.pop()
    if name == "amqp":
        return KombuBroker
    if name.partition("+")[0] not in TRANSPORT_ALIASES:
        guess = difflib.get_close_matches(name, list(TRANSPORT_ALIASES), n=1)
        hint = f"; did you mean {guess[0]!r}?" if guess else ""
        raise ConfigurationError(f"KOMBU_URL {redact(url)!r} names no kombu transport ({name or 'no scheme'!r}){hint}")
    return _CLASSES.get(name, KombuVirtualBroker)


class KombuVirtualBroker(Broker):
    """A kombu virtual transport on one connection and one channel, used under a lock (kombu's channels
    are not thread-safe); see the module docstring."""

    kind = BrokerEnum.KOMBU
    capabilities = Capabilities(redelivery="none", delay="emulated", cross_process=True, release_front=False,
                                counts_delayed=False, purges_delayed=False)  # delays held by their consumers
    connection_errors = (TransportUnreachable,)
    errors = (TransportFailed,)
    default_options: ClassVar[dict[str, Any]] = {}

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.RLock()
        self._connection: kombu.Connection | None = None
        self._chan: Any = None
        self._producer: kombu.Producer | None = None
        self._taken: dict[Any, Delivery] = {}  # token -> what this process holds unacked in kombu
        self._delayed: dict[str, list[tuple[float, int, Delivery]]] = {}  # queue -> held until due
        self._seq = itertools.count()
        self._down_errors: tuple[type[BaseException], ...] = (ke.OperationalError, OSError)
        self._failed_errors: tuple[type[BaseException], ...] = (ke.KombuError,)
        self._stores: dict[tuple[str, str], KeyValueStore] = {}

    # -- the channel ---------------------------------------------------------------------------------
    @contextmanager
    def _channel(self) -> Iterator[Any]:
        """The channel, under the lock; a client error comes out as TransportUnreachable or TransportFailed."""
        with self._lock:
            try:
                if self._chan is None:
                    self._open()
                yield self._chan
            except Exception as exc:
                if isinstance(exc, self._down_errors):
                    self._forget(close=True)  # the next use connects again
                    raise TransportUnreachable(str(exc)) from exc
                if isinstance(exc, self._failed_errors):
                    raise TransportFailed(str(exc)) from exc
                raise

    def _open(self) -> None:
        if kombu_broker_class() is not type(self):
            raise ConfigurationError(f"KOMBU_URL {redact(url_setting('KOMBU_URL'))!r} names another transport than "
                                     f"this {type(self).__name__} was built for; close it "
                                     "(funboost_like.brokers.registry.close) to switch")
        url, options = split_options(url_setting("KOMBU_URL"))
        try:
            connection = kombu.Connection(url, transport_options={**self.default_options, **options})
            self._down_errors = (ke.OperationalError, OSError, *connection.connection_errors)
            self._failed_errors = (ke.KombuError, *connection.channel_errors)
            self._connection = connection
            self._chan = connection.channel()
        except ImportError as exc:
            raise ConfigurationError(f"kombu transport {transport_name(url)!r} needs a client library that is "
                                     f"not installed: {exc}") from exc
        self._producer = kombu.Producer(self._chan)

    def _forget(self, *, close: bool) -> None:
        """Drop the channel without letting kombu restore what it holds (this broker settles that)."""
        channel, connection = self._chan, self._connection
        self._chan = self._connection = self._producer = None
        if channel is not None:
            channel.do_restore = False
        if close and connection is not None:
            try:
                connection.release()
            except Exception:  # noqa: BLE001 - it is being dropped
                logger.debug("closing a kombu connection failed", exc_info=True)

    def _where(self) -> str:
        url = url_setting("KOMBU_URL")
        return f"kombu transport {transport_name(url)!r} at {redact(url)}"

    # -- priorities and messages -----------------------------------------------------------------------
    def _kombu_priority(self, priority: int) -> int:
        """kombu's priority of the framework's ``priority``, and the framework's of kombu's (none here)."""
        return 0

    def _publish(self, queue: str, body: bytes, priority: int, headers: dict[str, Any]) -> None:
        assert self._producer is not None
        self._producer.publish(body, routing_key=queue, priority=self._kombu_priority(priority), headers=headers,
                               content_type=_JSON, content_encoding="utf-8", delivery_mode=_PERSISTENT, retry=False)

    def _republish(self, delivery: Delivery, attempts: int, crashes: int, not_before: float | None) -> None:
        headers: dict[str, Any] = {ATTEMPTS: attempts}
        if crashes:
            headers[CRASHES] = crashes
        if not_before:
            headers[NOT_BEFORE] = not_before
        self._publish(delivery.queue, delivery.body, delivery.priority, headers)

    # -- primitives ------------------------------------------------------------------------------------
    def _put(self, queue: str, bodies: Sequence[bytes], *, priority: int, not_before: float | None) -> None:
        headers = {NOT_BEFORE: not_before} if not_before and not_before > time.time() else {}
        with self._channel():
            for body in bodies:
                self._publish(queue, body, priority, dict(headers))

    def _get(self, queue: str, max_n: int) -> list[Delivery]:
        now, got = time.time(), list[Delivery]()
        with self._channel() as channel:
            waiting = self._delayed.get(queue)
            while waiting and waiting[0][0] <= now and len(got) < max_n:  # held delayed messages now due
                got.append(heapq.heappop(waiting)[2])
            while len(got) < max_n:
                message = channel.basic_get(queue, no_ack=False)
                if message is None:
                    break
                body, headers = message.body, message.headers or {}
                delivery = Delivery(queue, body if isinstance(body, bytes) else str(body).encode(),
                                    message.delivery_tag, int(headers.get(ATTEMPTS, 0)) + 1,
                                    self._kombu_priority(int(message.properties.get("priority") or 0)),
                                    int(headers.get(CRASHES, 0)))
                self._taken[delivery.token] = delivery
                not_before = float(headers.get(NOT_BEFORE) or 0)
                if (message.delivery_info or {}).get("redelivered"):  # its consumer died: counted, then run
                    crashed = not_before <= now  # (one held until due was not running)
                    self._republish(delivery, delivery.attempts - (not crashed), delivery.crashes + crashed,
                                    not_before or None)
                    self._ack_held(channel, [delivery])
                elif not_before > now:
                    heapq.heappush(self._delayed.setdefault(queue, []), (not_before, next(self._seq), delivery))
                else:
                    got.append(delivery)
        return got

    def _ack_held(self, channel: Any, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            channel.basic_ack(delivery.token)
            self._taken.pop(delivery.token, None)

    def _ack(self, deliveries: Sequence[Delivery]) -> None:
        with self._channel() as channel:
            self._ack_held(channel, deliveries)

    def _requeue(self, deliveries: Sequence[Delivery], *, delay: float, front: bool, count_attempt: bool) -> None:
        """Published again (to the back: kombu has no front) with the counts, then acked. Idempotent: what
        was published again before an outage is only acked."""
        not_before = time.time() + delay if delay > 0 else None
        with self._channel() as channel:
            for delivery in deliveries:
                if delivery.token in self._taken:
                    attempts = delivery.attempts if count_attempt else delivery.attempts - 1
                    self._republish(delivery, attempts, delivery.crashes, not_before)
                    self._taken.pop(delivery.token)
                channel.basic_ack(delivery.token)

    def _purge(self, queue: str) -> int:
        with self._channel() as channel:
            delayed = [entry[2] for entry in self._delayed.pop(queue, [])]
            self._ack_held(channel, delayed)
            return int(channel.queue_purge(queue) or 0) + len(delayed)

    def _size(self, queue: str) -> int:
        """kombu's count of waiting messages plus the delayed ones this process holds."""
        with self._channel() as channel:
            return int(channel.queue_declare(queue=queue).message_count) + len(self._delayed.get(queue, ()))

    def _hand_back(self, channel: Any, delivery: Delivery, not_before: float | None) -> None:
        """Published again uncounted (its delay kept), then acked: a release that keeps the delay."""
        self._republish(delivery, delivery.attempts - 1, delivery.crashes, not_before)
        self._ack_held(channel, [delivery])

    def _stop_fetching(self, queue: str) -> None:
        """The delayed messages held for ``queue`` go back, for other consumers to hold until due."""
        with self._channel() as channel:
            for not_before, _, delivery in self._delayed.pop(queue, []):
                self._hand_back(channel, delivery, not_before)

    def _give_back(self) -> None:
        """Everything this process holds goes back uncounted, as a release would."""
        with self._channel() as channel:
            due_at = {entry[2].token: entry[0] for entries in self._delayed.values() for entry in entries}
            self._delayed.clear()
            for delivery in list(self._taken.values()):
                self._hand_back(channel, delivery, due_at.get(delivery.token))

    def _close(self) -> None:
        with self._lock:
            if self._taken:
                try:
                    self._give_back()
                except Exception as exc:  # noqa: BLE001 - closing goes on; kombu keeps them unacked
                    logger.warning("%s: %d held message(s) could not be given back (%s)", self._where(),
                                   len(self._taken), exc)
            self._forget(close=True)

    def _after_fork(self) -> None:
        self._lock = threading.RLock()
        self._taken, self._delayed = {}, {}
        self._forget(close=False)

    # -- dead letters ----------------------------------------------------------------------------------
    def _peek(self, channel: Any, queue: str, limit: int) -> list[tuple[Any, dict[str, Any]]]:
        """Up to ``limit`` (where it is kept, raw kombu payload) of ``queue``, newest first, left in place."""
        raise NotImplementedError(f"{type(self).__name__} cannot list dead letters")

    def _remove(self, channel: Any, queue: str, ref: Any) -> bool:
        """Delete the message of ``queue`` that :meth:`_peek` found at ``ref``; False if it is gone."""
        raise NotImplementedError(f"{type(self).__name__} cannot remove a single dead letter")

    def list_dead_letters(self, queue: str, limit: int = 100) -> list[DeadLetter]:
        with self._channel() as channel:
            return [replace(DeadLetter.from_envelope(queue, channel.Message(payload, channel=channel).body),
                                        ref=ref)
                    for ref, payload in (self._peek(channel, f"{queue}.dlq", limit) if limit > 0 else [])]

    def remove_dead_letter(self, queue: str, letter: DeadLetter) -> bool:
        with self._channel() as channel:
            return self._remove(channel, f"{queue}.dlq", letter.ref)

    def purge_dead_letters(self, queue: str) -> int:
        with self._channel() as channel:
            return int(channel.queue_purge(f"{queue}.dlq") or 0)


class KombuMemoryBroker(KombuVirtualBroker):
    """``memory://``: kombu's queues in this process."""

    capabilities = Capabilities(redelivery="native", delay="emulated", dead_letters=True, key_value=True,
                                release_front=False)

    def _peek(self, channel: Any, queue: str, limit: int) -> list[tuple[Any, dict[str, Any]]]:
        return [(payload, payload) for payload in list(channel._queue_for(queue).queue)[::-1][:limit]]

    def _remove(self, channel: Any, queue: str, ref: Any) -> bool:
        waiting = channel._queue_for(queue)
        with waiting.mutex:
            try:
                waiting.queue.remove(ref)
            except ValueError:
                return False
            return True

    def key_value_store(self, queue: str, namespace: str) -> KeyValueStore:
        """Process-local records per (queue, namespace), living as long as this broker."""
        with self._lock:
            return self._stores.setdefault((queue, check_namespace(namespace)), MemoryKeyValueStore())


class KombuSqlBroker(KombuVirtualBroker):
    """``sqla+<SQLAlchemy URL>``: kombu's tables ``kombu_queue`` and ``kombu_message``."""

    capabilities = replace(KombuVirtualBroker.capabilities, dead_letters=True, persistent=True, cross_host=True)

    def _peek(self, channel: Any, queue: str, limit: int) -> list[tuple[Any, dict[str, Any]]]:
        table = channel.message_cls
        rows = (channel.session.query(table).filter(table.queue_id == channel._get_or_create(queue).id)
                .filter(table.visible.is_(True)).order_by(table.id.desc()).limit(limit).all())
        channel.session.commit()
        return [(row.id, json.loads(row.payload)) for row in rows]

    def _remove(self, channel: Any, queue: str, ref: Any) -> bool:
        table = channel.message_cls
        removed = channel.session.query(table).filter(table.id == ref, table.visible.is_(True)).delete()
        channel.session.commit()
        return bool(removed)

    def _after_fork(self) -> None:
        super()._after_fork()
        from kombu.transport.sqlalchemy import Channel

        for engine, _ in list(Channel._engines.values()):  # never reuse the parent's pooled connections
            engine.dispose(close=False)


class KombuSqliteBroker(KombuSqlBroker):
    """``sqla+sqlite:///<file>``: as :class:`KombuSqlBroker`, on one host."""

    capabilities = replace(KombuSqlBroker.capabilities, cross_host=False)


class KombuRedisBroker(KombuVirtualBroker):
    """``redis://``: kombu's lists, with leases on its ``unacked`` index (see the module docstring)."""

    capabilities = Capabilities(redelivery="lease", delay="emulated", max_priority=9, dead_letters=True,
                                key_value=True, persistent=True, cross_process=True, cross_host=True,
                                release_front=False, counts_delayed=False, purges_delayed=False)
    # kombu's restore mutex outlives a consumer killed while restoring: 300 s by default would stop every
    # restore that long. Restores are safe without it (each is a WATCH transaction), so it only saves work.
    default_options: ClassVar[dict[str, Any]] = {"visibility_timeout": 20, "unacked_mutex_expire": 1}

    def __init__(self) -> None:
        super().__init__()
        self._lease = float(self.default_options["visibility_timeout"])  # until connected: the URL may set it

    def _kombu_priority(self, priority: int) -> int:
        return 9 - min(max(priority, 0), 9)  # kombu's Redis serves lower numbers first

    def _peek(self, channel: Any, queue: str, limit: int) -> list[tuple[Any, dict[str, Any]]]:
        key = channel._q_for_pri(queue, self._kombu_priority(0))
        return [(item, json.loads(item)) for item in channel.client.lrange(key, 0, limit - 1)]

    def _remove(self, channel: Any, queue: str, ref: Any) -> bool:
        return bool(channel.client.lrem(channel._q_for_pri(queue, self._kombu_priority(0)), 1, ref))

    def _open(self) -> None:
        super()._open()
        self._lease = float(self._chan.visibility_timeout)

    def maintenance_interval(self) -> float:
        return self._lease / 4

    def _renew(self, deliveries: Sequence[Delivery]) -> None:
        """Held messages stay younger than the visibility timeout in kombu's ``unacked_index``."""
        with self._channel() as channel:
            tags = list(self._taken)
            if tags:
                now = time.time()
                channel.client.zadd(channel.unacked_index_key, dict.fromkeys(tags, now), xx=True)

    def _recover(self, queue: str) -> int:
        """kombu's ``restore_visible``: messages unacked for longer than the visibility timeout (their
        consumer stopped renewing them) go back, marked redelivered. For every queue of the database."""
        with self._channel() as channel:
            channel.qos.restore_visible(num=1000, interval=1)
        return 0

    def key_value_store(self, queue: str, namespace: str) -> KeyValueStore:
        """Records as Redis strings ``fl:{<queue>}:<namespace>:<key>``, beside kombu's keys."""
        with self._lock:
            store = self._stores.get((queue, namespace))
            if store is None:
                store = self._stores[(queue, namespace)] = _redis_records(self, queue, namespace)
            return store


def _redis_records(broker: KombuRedisBroker, queue: str, namespace: str) -> KeyValueStore:
    """A :class:`~funboost_like.brokers.redis_store.RedisKeyValueStore` on the broker's Redis connection."""
    from funboost_like.brokers.redis_store import RedisKeyValueStore

    class KombuRedisRecords(RedisKeyValueStore):
        def _run(self, action: str, *args: Any) -> Any:
            try:
                with broker._channel() as channel:
                    return channel.client.execute_command(*args)
            except (TransportUnreachable, TransportFailed) as exc:
                raise broker._translated(exc, f"{action} in {self.prefix}*") from exc

    return KombuRedisRecords(queue, namespace, broker)


_CLASSES: dict[str, type[KombuVirtualBroker]] = {
    "redis": KombuRedisBroker, "rediss": KombuRedisBroker, "sentinel": KombuRedisBroker,
    "memory": KombuMemoryBroker, "sqla": KombuSqlBroker, "sqla+sqlite": KombuSqliteBroker,
}
