"""KOMBU on an AMQP server: RabbitMQ through kombu (``kombu`` extra; py-amqp underneath); semantics in :mod:`.amqp`.

Setting ``KOMBU_URL`` (environment ``FUNBOOST_LIKE_KOMBU_URL``; empty: ``RABBITMQ_URL``), a kombu URL
read at first use. Kind KOMBU takes any kombu URL: the kind's registry entry,
:func:`~funboost_like.brokers.kombu_virtual.kombu_broker_class`, reads the URL each time the kind is
resolved and gives this class for ``amqp://``, ``amqps://`` and ``pyamqp://`` (kombu's failover lists
included: ``amqp://a//;amqp://b//``, each connection tries the hosts in order), and a class of
:mod:`~funboost_like.brokers.kombu_virtual` for kombu's virtual transports (``redis://``, ``memory://``,
``sqla+...``, ...). Passwords never reach a log.

Why two classes. On an AMQP server this is an :class:`~funboost_like.brokers.amqp.AmqpBroker`
whose session and consumer are kombu's ``Connection``, channels, ``Producer`` and ``Consumer``, so
it has RabbitMQ's full semantics: publisher confirms, priorities, delays through TTL levels, crash
counting in headers, native routing and dead letters in ``<queue>.dlq``. kombu's virtual transports
emulate exchanges in the client (no headers exchange) and have neither per-queue TTLs nor
dead-letter exchanges, so the delay levels cannot exist there; redelivery is their own scheme (on
Redis, an unacked message comes back after a visibility timeout; ``memory://`` never leaves its
process; the SQL transport never gives a taken row back) and priorities are coarse (Redis: four
steps). The framework checks a kind's :class:`~funboost_like.brokers.base.Capabilities` from its class
at decoration time, so each family of transports has its own class stating what it promises. An
instance keeps the transport it was built for: if ``KOMBU_URL`` later names a non-AMQP transport, its
next use raises :class:`~funboost_like.core.errors.ConfigurationError` (close the broker to switch).

Connections: each publishing thread has its own connection (heartbeats off, confirms on; publishes
pipelined: every message of a ``publish_many`` goes through the ``Producer`` before the confirms are
awaited, not kombu's one-round-trip-per-message ``confirm_publish``). One more connection, with
heartbeats, is driven by the broker's I/O thread only: one channel and one kombu ``Consumer`` (with a
per-consumer prefetch) per queue. py-amqp has no thread-safe wake-up, so the I/O thread waits in
``select`` on the connection's socket and on a socket pair that other threads write a byte to; it
reads that socket through a 64 KiB buffer (py-amqp alone makes nine ``recv`` calls per message).
Both reach beneath kombu into py-amqp 5 (``Connection.sock``, ``transport._quick_recv``,
``Channel._on_close``). Publishing stays slower than pika's: py-amqp writes every frame with its own
``sendall`` and polls the socket before every publish (for ``connection.blocked``).
"""

from __future__ import annotations

import select
import socket
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import amqp.exceptions as ae
import kombu
import kombu.exceptions as ke
from kombu.transport import pyamqp

from funboost_like.brokers.amqp import AmqpBroker, Deliver, url_setting
from funboost_like.core.config import redact_url
from funboost_like.core.enums import BrokerEnum
from funboost_like.core.errors import ConfigurationError

AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")
_PERSISTENT = 2
_JSON = "application/json"
HEARTBEAT = 60  # seconds, on the consuming connection (the I/O thread ticks every second at most)
CONFIRM_TIMEOUT = 60.0  # seconds without a frame from the server while awaiting confirms: the connection is dead
_READ_TIMEOUT = 0.05  # the longest wait for the rest of a message once its first bytes arrived
_MAX_METHODS = 1000  # methods read in one pump before the I/O thread sends its acks
_READ_SIZE = 65536


def redact(url: str) -> str:
    """:func:`~funboost_like.core.config.redact_url` for each URL of a kombu failover list (a URL without
    secrets is shown as written)."""
    return ";".join(_redacted(part) for part in url.split(";"))


def _redacted(url: str) -> str:
    masked = redact_url(url)
    return url if urlsplit(masked) == urlsplit(url) else masked


def check_url(url: str) -> str:
    """``url`` if every URL of it is AMQP; else a ConfigurationError (this class speaks AMQP only)."""
    parts = [part.strip() for part in url.split(";") if part.strip()]
    schemes = [part.partition("://")[0].lower() if "://" in part else "" for part in parts]
    wrong = [scheme for scheme in schemes if scheme not in AMQP_SCHEMES]
    if parts and not wrong:
        return url
    supported = ", ".join(f"{scheme}://" for scheme in AMQP_SCHEMES)
    scheme = f"kombu transport {wrong[0]!r}" if wrong and wrong[0] else "no scheme"
    raise ConfigurationError(
        f"KOMBU_URL {redact(url)!r} has {scheme}, but this KOMBU broker speaks AMQP ({supported}): it was built "
        "for an AMQP URL. Close it (funboost_like.brokers.registry.close(BrokerEnum.KOMBU)); the kind then "
        "picks the broker of the transport configured (funboost_like.brokers.kombu_virtual)")


def _connect(url: str, heartbeat: int) -> kombu.Connection:
    """A connected kombu connection; each host of a failover list is tried once, without sleeping."""
    connection = kombu.Connection(url, heartbeat=heartbeat)
    try:
        connection.ensure_connection(max_retries=max(0, len(connection.alt) - 1))
    except BaseException:
        connection.release()
        raise
    return connection


class _Session:
    """One thread's publishing connection, confirms on; see :class:`~funboost_like.brokers.amqp.Session`."""

    def __init__(self, url: str) -> None:
        self.connection = _connect(url, 0)
        self._open_channel()

    def _open_channel(self) -> None:
        channel = self.connection.channel()
        channel.confirm_select()
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)
        self.channel = channel
        self.producer = kombu.Producer(channel, on_return=self._on_return)
        self._published = self._confirmed = self._returned = 0
        self._nacked = False

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._confirmed = tag if multiple else max(self._confirmed, tag)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self._nacked = True
        self._on_ack(tag, multiple)

    def _on_return(self, *_args: Any) -> None:
        self._returned += 1

    def _call(self, action: Callable[[Any], Any]) -> Any:
        """``action(channel)``; after a channel error (py-amqp reopens the channel, without confirms) a
        fresh channel replaces it and the error is raised."""
        if not self.channel.is_open:
            self._open_channel()
        try:
            return action(self.channel)
        except ae.ChannelError:
            broken = self.channel
            self._open_channel()
            try:
                broken.close()
            except Exception:  # noqa: BLE001 - it is broken already
                pass
            raise

    def _declare(self, declare: Callable[[Any], Any], passive: Callable[[Any], Any]) -> bool:
        try:
            self._call(declare)
            return True
        except ae.PreconditionFailed:
            pass
        self._call(passive)
        return False

    def declare_queue(self, name: str, arguments: dict[str, Any] | None) -> bool:
        return self._declare(lambda ch: ch.queue_declare(name, durable=True, auto_delete=False, arguments=arguments),
                             lambda ch: ch.queue_declare(name, passive=True))

    def declare_exchange(self, name: str, exchange_type: str) -> bool:
        return self._declare(lambda ch: ch.exchange_declare(name, exchange_type, durable=True, auto_delete=False),
                             lambda ch: ch.exchange_declare(name, exchange_type, passive=True))

    def bind_queue(self, queue: str, exchange: str, key: str, arguments: dict[str, Any] | None = None) -> None:
        self._call(lambda ch: ch.queue_bind(queue, exchange, routing_key=key, arguments=arguments))

    def bind_exchange(self, destination: str, source: str, key: str, arguments: dict[str, Any] | None = None) -> None:
        self._call(lambda ch: ch.exchange_bind(destination, source, routing_key=key, arguments=arguments))

    def publish(self, exchange: str, routing_key: str, bodies: Sequence[bytes], priority: int,
                headers: dict[str, Any] | None) -> bool:
        returned, refused = self._call(lambda _ch: self._publish(exchange, routing_key, bodies, priority, headers))
        if refused:
            raise ae.MessageNacked(f"the server refused {len(bodies)} message(s) to {exchange or routing_key!r}")
        return not returned

    def offer(self, queue: str, body: bytes, expiration_ms: int | None) -> bool:
        expiration = None if expiration_ms is None else (expiration_ms + 0.5) / 1000  # kombu: int(seconds * 1000)
        _returned, refused = self._call(lambda _ch: self._publish("", queue, [body], 0, None, expiration))
        return not refused

    def _publish(self, exchange: str, routing_key: str, bodies: Sequence[bytes], priority: int,
                 headers: dict[str, Any] | None, expiration: float | None = None) -> tuple[bool, bool]:
        """Publish and await the confirms; (some came back unroutable, some were refused)."""
        publish = self.producer.publish
        returned = self._returned
        for body in bodies:
            publish(body, routing_key=routing_key, exchange=exchange, mandatory=True, priority=priority,
                    headers=headers, delivery_mode=_PERSISTENT, content_type=_JSON, content_encoding="utf-8",
                    expiration=expiration)
        self._published += len(bodies)
        target = self._published
        drain = self.connection.drain_events
        while self._confirmed < target:
            try:
                drain(timeout=CONFIRM_TIMEOUT)
            except TimeoutError:
                raise ae.RecoverableConnectionError(f"no publisher confirm within {CONFIRM_TIMEOUT:.0f} s") from None
        refused, self._nacked = self._nacked, False
        return self._returned != returned, refused  # a return arrives before the confirm of its message

    def message_count(self, queue: str) -> int:
        return int(self._call(lambda ch: ch.queue_declare(queue, passive=True)).message_count)

    def purge(self, queue: str) -> int:
        return int(self._call(lambda ch: ch.queue_purge(queue)) or 0)

    def peek(self, queue: str, limit: int, take: bytes | None = None) -> list[bytes]:
        bodies: list[bytes] = []
        channel = self.connection.channel()
        channel.auto_decode = False
        try:
            while len(bodies) < limit:
                message = channel.basic_get(queue, no_ack=False)
                if message is None:
                    break
                bodies.append(bytes(message.body))
                if bodies[-1] == take:
                    channel.basic_ack(message.delivery_tag)
                    break
        except ae.NotFound:
            pass  # no such queue: nothing to see
        finally:
            channel.close()  # what it got goes back, in place
        return bodies

    def delete_queue(self, queue: str) -> None:
        self._call(lambda ch: ch.queue_delete(queue))

    def close(self) -> None:
        self.connection.release()


class _Channel(pyamqp.Channel):
    """A consuming channel that remembers why the server closed it (py-amqp then reopens it, without its
    consumer, and raises from whatever was reading)."""

    closed_by_server: str | None = None

    def _on_close(self, reply_code: int, reply_text: str, class_id: int, method_id: int) -> None:
        self.closed_by_server = f"({reply_code}) {reply_text}"
        super()._on_close(reply_code, reply_text, class_id, method_id)


class _Reader:
    """What py-amqp reads the consuming connection through: one ``recv`` of up to 64 KiB serves many
    frames (py-amqp alone makes three calls per frame, nine per message). Truthy while it holds bytes."""

    __slots__ = ("_recv", "_view")

    def __init__(self, recv: Callable[[int], bytes]) -> None:
        self._recv = recv
        self._view = memoryview(b"")

    def __call__(self, n: int) -> bytes:
        view = self._view
        if not view:
            data = self._recv(_READ_SIZE)  # raises as the socket does (timeout, reset): nothing is lost
            if not data:
                return data
            view = memoryview(data)
        self._view = view[n:]
        return view[:n].tobytes()

    def __bool__(self) -> bool:
        return bool(self._view)


class _Consumer:
    """The consuming connection, driven by the broker's I/O thread only (:meth:`wake` excepted)."""

    def __init__(self, url: str) -> None:
        self.connection = _connect(url, HEARTBEAT)
        self._sock = self.connection.connection.sock
        transport = self.connection.connection.transport
        self._reader = _Reader(transport._quick_recv)
        transport._quick_recv = self._reader  # py-amqp's transports read through this attribute
        self._pending = getattr(self._sock, "pending", None)  # TLS: decrypted bytes that select cannot see
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def subscribe(self, queue: str, prefetch: int, deliver: Deliver) -> kombu.Consumer:
        def on_message(message: Any) -> None:
            deliver(message.delivery_tag, message.body, message.headers or {},
                    message.properties.get("priority") or 0, bool(message.delivery_info.get("redelivered")))

        channel = _Channel(self.connection.connection, auto_decode=False)  # bodies stay bytes, whatever
        channel.open()  # content_encoding their publisher set
        consumer = kombu.Consumer(channel, queues=[kombu.Queue(queue, no_declare=True)], on_message=on_message,
                                  auto_declare=False)
        if prefetch:  # 0: paused (a resubscription during a pause)
            self._consume(consumer, prefetch)
        return consumer

    @staticmethod
    def _consume(consumer: kombu.Consumer, prefetch: int) -> None:
        # A per-consumer prefetch: RabbitMQ fixes it when the consumer starts (a channel-wide one costs
        # the server far more per message).
        consumer.qos(prefetch_count=prefetch)
        consumer.consume()  # waits for consume-ok

    def ack(self, consumer: kombu.Consumer, tag: int, multiple: bool) -> None:
        channel: Any = consumer.channel  # typed None in kombu
        channel.basic_ack(tag, multiple)

    def set_prefetch(self, consumer: kombu.Consumer, prefetch: int, done: Callable[[], None]) -> None:
        consumer.cancel()  # waits for cancel-ok; what was delivered before it stays unacked on the channel
        if prefetch:
            self._consume(consumer, prefetch)
        done()

    def channel_error(self, consumer: kombu.Consumer) -> str | None:
        channel: Any = consumer.channel
        reason: str | None = channel.closed_by_server
        if reason is not None and channel.is_open:
            try:
                channel.close()  # the channel py-amqp reopened: subscribing again opens another
            except ae.ChannelError:
                pass
        return reason

    def _buffered(self) -> bool:
        """Bytes already read from the socket (by the reader or by TLS), which select cannot see."""
        return bool(self._reader) or bool(self._pending and self._pending())

    def pump(self, timeout: float) -> None:
        sock = self._sock
        if not self._buffered():
            ready = select.select([sock, self._wake_r], [], [], timeout)[0]
            if self._wake_r in ready:
                self._drain_wake()
            if sock not in ready:
                self.connection.heartbeat_check()
                return
        drain = self.connection.drain_events
        blocking = sock.gettimeout()
        sock.settimeout(_READ_TIMEOUT)  # once, not around every frame as py-amqp would
        try:
            for _ in range(_MAX_METHODS):
                try:
                    drain(timeout=_READ_TIMEOUT)  # a frame cut by the timeout is kept for the next read
                except TimeoutError:
                    break
                except ae.ChannelError:
                    if not any(isinstance(ch, _Channel) and ch.closed_by_server for ch in self._channels()):
                        raise
                    break  # a channel the server closed: the broker subscribes again (see channel_error)
                if not self._buffered() and not select.select([sock], [], [], 0)[0]:
                    break
        finally:
            sock.settimeout(blocking)
        self.connection.heartbeat_check()

    def _channels(self) -> list[Any]:
        return list(self.connection.connection.channels.values())

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:
            pass  # full: the I/O thread wakes anyway

    def close(self) -> None:
        try:
            self.connection.release()
        finally:
            self._wake_r.close()
            self._wake_w.close()


class KombuBroker(AmqpBroker):
    kind = BrokerEnum.KOMBU
    url_setting = "KOMBU_URL"
    connection_errors = (ae.ConnectionError, ke.OperationalError, OSError)
    errors = (ae.AMQPError, ae.MessageNacked, ke.KombuError)

    def __init__(self) -> None:
        super().__init__()
        check_url(url_setting(self.url_setting))  # a non-AMQP URL fails here, before any use

    def _url(self) -> str:
        return check_url(url_setting(self.url_setting))

    def _where(self) -> str:
        return f"RabbitMQ (kombu) at {redact(url_setting(self.url_setting))}"

    def _open_session(self, url: str) -> _Session:
        return _Session(url)

    def _open_consumer(self, url: str) -> _Consumer:
        return _Consumer(url)
