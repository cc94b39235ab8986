"""RABBITMQ_AMQPSTORM: RabbitMQ through amqpstorm (extra ``rabbitmq``); semantics in :mod:`funboost_like.brokers.amqp`.

Setting ``RABBITMQ_URL`` (environment ``FUNBOOST_LIKE_RABBITMQ_URL``), read at first use.

amqpstorm connections are thread-safe and read their socket in a thread of their own, which also
keeps heartbeats flowing. Each publishing thread has its own connection and one more, driven by the
broker's I/O thread, consumes. amqpstorm's request/response calls poll for their answer every 10 ms
and its confirm mode waits for each message alone, so the channels here are :class:`_Channel`: the
reading thread hands them confirms, returns and deliveries and wakes whoever waits (RPC answers
included). Publishes are pipelined: every message of a ``publish_many`` is written (frames encoded
here) before the confirms are awaited. This reaches beneath amqpstorm's public API (the connection's
``_io``, ``_channels`` and channel numbering, ``Rpc._wait_for_request``), hence amqpstorm ``>=3,<4``.
"""

from __future__ import annotations

import collections
import socket
from collections.abc import Callable, Sequence
from typing import Any, cast

import amqpstorm
from amqpstorm.exception import AMQPChannelError, AMQPConnectionError, AMQPError, AMQPMessageError
from amqpstorm.rpc import Rpc

from funboost_like.brokers import amqp, amqpstorm_wake, client_logs
from funboost_like.brokers.amqp import AmqpBroker, Deliver
from funboost_like.brokers.amqp_frames import content_header, publish_chunks
from funboost_like.brokers.amqp_reader import DeliveryReader
from funboost_like.brokers.push_buffer import Signal
from funboost_like.core.enums import BrokerEnum

_NOT_FOUND = 404
_PRECONDITION_FAILED = 406
_POLL = 0.25  # how often a waiter looks for errors nobody signals (a dead socket)
_WRITE_CHUNK = 1 << 18


class _Rpc(Rpc):
    """amqpstorm's request/response bookkeeping, waiting on the connection's condition instead of polling."""

    def __init__(self, channel: _Channel, timeout: float, arrived: Signal) -> None:
        super().__init__(channel, timeout=timeout)
        self._arrived = arrived

    def _wait_for_request(self, uuid: str, connection_adapter: Any = None) -> None:
        responses = self._response[uuid]
        _wait(self._arrived, lambda: bool(responses), connection_adapter or self._default_connection_adapter,
              self._timeout)


def _wait(arrived: Signal, done: Callable[[], bool], adapter: Any, timeout: float | None = None,
          silent: type[AMQPError] = AMQPChannelError, progress: Callable[[], int] = lambda: 0) -> None:
    """Block until ``done()``; raise the channel's or connection's error if it breaks first, ``silent``
    after ``timeout`` seconds in which ``progress()`` did not change."""
    waited, seen = 0.0, progress()
    while not done():
        arrived.wait_until(done, _POLL)
        if done():
            return
        adapter.check_for_errors()  # outside the lock: closing a broken connection waits on the reader
        waited, seen = (waited + _POLL, seen) if progress() == seen else (0.0, progress())
        if timeout is not None and waited > timeout:
            raise silent(f"no answer from RabbitMQ within {timeout:.0f} s")


class _Channel(amqpstorm.Channel):
    """A channel whose confirms, returns and deliveries are handled on arrival (see the module docstring)."""

    def __init__(self, channel_id: int, connection: amqpstorm.Connection, arrived: Signal) -> None:
        super().__init__(channel_id, connection, 60)
        self.rpc = _Rpc(self, 60, arrived)
        self.arrived = arrived
        self.published = self.confirmed = self.returned = 0
        self.nacked = False
        self.deliver: Deliver | None = None
        self.ready: collections.deque[tuple[Any, ...]] | None = None
        self.queue_name = ""
        self.consuming: str | None = None  # the consumer tag
        self._content: list[Any] | None = None  # [method frame, properties, parts, bytes still to come]

    def on_frame(self, frame_in: Any) -> None:
        name = frame_in.name
        content = self._content
        if name == "ContentBody" and content is not None:
            content[2].append(frame_in.value)
            content[3] -= len(frame_in.value)
            if content[3] <= 0:
                self._received(content)
            return
        if name == "ContentHeader" and content is not None:
            content[1], content[3] = frame_in.properties, frame_in.body_size
            if frame_in.body_size == 0:
                self._received(content)
            return
        if name == "Basic.Deliver" or name == "Basic.Return":
            self._content = [frame_in, None, [], 0]
            if name == "Basic.Return":
                self.returned += 1  # a mandatory publish nobody could take; its content is read and dropped
            return
        if name == "Basic.Ack" or name == "Basic.Nack":
            self.nacked = self.nacked or name == "Basic.Nack"
            tag = frame_in.delivery_tag
            self.confirmed = tag if frame_in.multiple else max(self.confirmed, tag)
        else:
            super().on_frame(frame_in)
        self.arrived.notify()

    def _received(self, content: list[Any]) -> None:
        method, properties, parts, _ = content
        self._content = None
        if method.name == "Basic.Deliver":
            self.delivered(method.delivery_tag, b"".join(parts), properties.headers or {}, properties.priority or 0,
                           method.redelivered)

    def delivered(self, tag: int, body: bytes, headers: dict[str, Any], priority: int, redelivered: bool) -> None:
        """A whole delivery (from :meth:`on_frame`, or decoded by the consumer's DeliveryReader)."""
        ready = self.ready
        if self.deliver is not None and ready is not None:
            ready.append((self.deliver, tag, body, headers, priority, redelivered))
            self.arrived.notify()


def _connect(url: str) -> amqpstorm.UriConnection:
    """An open connection with two of amqpstorm 3.1's gaps closed: its socket gets ``TCP_NODELAY`` (else
    the handshake alone waits 40 ms for a delayed ACK, and so can an ack), and its socket errors reach
    ``check_for_errors`` (``open()`` gives the connection a new error list after its reader took the old
    one, so a lost socket would surface only once heartbeats time out, 60 s later)."""
    client_logs.quiet("amqpstorm")
    connection = amqpstorm.UriConnection(url, lazy=True)
    io = connection._io
    amqpstorm_wake.install(io)  # under eventlet, each close waited a second for the reader (see there)
    create_socket = io._create_socket

    def create_without_delay(socket_family: int) -> socket.socket:
        sock = create_socket(socket_family)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    io._create_socket = create_without_delay  # type: ignore[method-assign]
    wait_for_state = connection._wait_for_connection_state  # its open() waits 30 s, whatever the URL says

    def bounded_wait(state: int, rpc_timeout: float = amqp.ANSWER_TIMEOUT) -> None:
        wait_for_state(state, min(rpc_timeout, amqp.ANSWER_TIMEOUT))

    connection._wait_for_connection_state = bounded_wait  # type: ignore[method-assign, assignment]
    connection.open()
    errors, lost = connection.exceptions, io._exceptions
    if lost is not errors:
        io._exceptions = errors
        if io.poller is not None:
            io.poller._exceptions = errors
        errors.extend(lost)
    return connection


def _open_channel(connection: amqpstorm.Connection, arrived: Signal) -> _Channel:
    """``connection.channel()``, opening a :class:`_Channel` instead."""
    if connection.is_closed:
        raise AMQPConnectionError("connection closed")
    with connection.lock:
        channel_id = connection._get_next_available_channel_id()
        channel = _Channel(channel_id, connection, arrived)
        connection._channels[channel_id] = channel
        channel.open()
    return channel


class _Session:
    """One thread's publishing connection, confirms on; see :class:`~funboost_like.brokers.amqp.Session`."""

    def __init__(self, url: str) -> None:
        self.connection = _connect(url)
        self.arrived = Signal()
        self._headers: dict[int, bytes] = {}  # priority -> encoded content header (no custom headers)
        try:
            self._open_channel()
        except BaseException:
            self.connection.close()
            raise

    def _open_channel(self) -> None:
        self.channel = _open_channel(self.connection, self.arrived)
        self.channel.confirm_deliveries()
        self._headers.clear()  # they name the channel

    def _call(self, action: Callable[[_Channel], Any]) -> Any:
        if not self.channel.is_open:
            self._open_channel()
        return action(self.channel)

    def _declare(self, declare: Callable[[_Channel], Any], passive: Callable[[_Channel], Any]) -> bool:
        try:
            self._call(declare)
            return True
        except AMQPChannelError as exc:
            if exc.error_code != _PRECONDITION_FAILED:
                raise
        self._call(passive)
        return False

    def declare_queue(self, name: str, arguments: dict[str, Any] | None) -> bool:
        return self._declare(lambda ch: ch.queue.declare(name, durable=True, arguments=arguments),
                             lambda ch: ch.queue.declare(name, passive=True))

    def declare_exchange(self, name: str, exchange_type: str) -> bool:
        return self._declare(lambda ch: ch.exchange.declare(name, exchange_type, durable=True),
                             lambda ch: ch.exchange.declare(name, passive=True))

    def bind_queue(self, queue: str, exchange: str, key: str, arguments: dict[str, Any] | None = None) -> None:
        self._call(lambda ch: ch.queue.bind(queue, exchange, key, arguments))

    def bind_exchange(self, destination: str, source: str, key: str, arguments: dict[str, Any] | None = None) -> None:
        self._call(lambda ch: ch.exchange.bind(destination, source, key, arguments))

    def _live(self) -> _Channel:
        if not self.channel.is_open:
            self._open_channel()
        self.channel.check_for_errors()
        return self.channel

    def _header(self, **properties: Any) -> bytes:
        """A content header frame of this session's channel (body size 0: patched per message)."""
        return content_header(self.channel.channel_id, **properties)

    def publish(self, exchange: str, routing_key: str, bodies: Sequence[bytes], priority: int,
                headers: dict[str, Any] | None) -> bool:
        channel = self._live()
        header = None if headers else self._headers.get(priority)
        if header is None:
            header = self._header(priority=priority or None, headers=headers or None)
            if not headers:
                self._headers[priority] = header
        returned = channel.returned
        self._send(channel, exchange, routing_key, bodies, header)
        if channel.nacked:
            channel.nacked = False
            raise AMQPMessageError("RabbitMQ refused a published message (basic.nack)")
        return channel.returned == returned

    def offer(self, queue: str, body: bytes, expiration_ms: int | None) -> bool:
        channel = self._live()
        self._send(channel, "", queue, [body],
                   self._header(expiration=None if expiration_ms is None else str(expiration_ms)))
        refused, channel.nacked = channel.nacked, False
        return not refused

    def _send(self, channel: _Channel, exchange: str, routing_key: str, bodies: Sequence[bytes], header: bytes) -> None:
        """Write the messages as frames (the method frame and content header encoded once, the body size
        patched in) in chunks, then wait for the server's confirms of all of them."""
        write = self.connection._io.write_to_socket
        for chunk in publish_chunks(channel.channel_id, exchange, routing_key, bodies, header,
                                    self.connection.max_frame_size - 8, _WRITE_CHUNK):
            write(chunk)
        self.connection.heartbeat.register_write()
        channel.published += len(bodies)
        target = channel.published
        # nothing confirmed for ANSWER_TIMEOUT: a connection error, so the broker drops this connection
        _wait(self.arrived, lambda: channel.confirmed >= target, channel, amqp.ANSWER_TIMEOUT, AMQPConnectionError,
              lambda: channel.confirmed)

    def message_count(self, queue: str) -> int:
        return int(self._call(lambda ch: ch.queue.declare(queue, passive=True))["message_count"])

    def purge(self, queue: str) -> int:
        return int(self._call(lambda ch: ch.queue.purge(queue))["message_count"])

    def peek(self, queue: str, limit: int, take: bytes | None = None) -> list[bytes]:
        bodies: list[bytes] = []
        channel = _open_channel(self.connection, self.arrived)
        try:
            while len(bodies) < limit:
                message = cast(amqpstorm.Message | None, channel.basic.get(queue, no_ack=False, auto_decode=False))
                if message is None:
                    break
                bodies.append(cast(bytes, message.body))  # not decoded: auto_decode=False
                if bodies[-1] == take:
                    message.ack()
                    break
        except AMQPChannelError as exc:
            if exc.error_code != _NOT_FOUND:
                raise
        finally:
            channel.close()  # what it got goes back, in place
        return bodies

    def delete_queue(self, queue: str) -> None:
        self._call(lambda ch: ch.queue.delete(queue))

    def close(self) -> None:
        self.connection.close()


class _Consumer:
    """The consuming connection, driven by the broker's I/O thread only; the reader queues deliveries."""

    def __init__(self, url: str) -> None:
        self.connection = _connect(url)
        self.arrived = Signal()
        self.ready: collections.deque[tuple[Any, ...]] = collections.deque()
        self._woken = False
        # Deliveries are decoded by hand; every other frame goes through amqpstorm's reader (which
        # decodes each frame with pamqp and copies the rest of its buffer after each one).
        self.reader = DeliveryReader(self.connection._read_buffer)
        register_read = self.connection.heartbeat.register_read

        def read(data: bytes) -> bytes:
            register_read()
            return self.reader.feed(data)

        self.connection._io._on_read_impl = read

    def subscribe(self, queue: str, prefetch: int, deliver: Deliver) -> Any:
        channel = _open_channel(self.connection, self.arrived)
        channel.queue_name, channel.deliver, channel.ready = queue, deliver, self.ready
        self.reader.register(channel.channel_id, channel.delivered)
        self._consume(channel, prefetch)
        return channel

    @staticmethod
    def _consume(channel: _Channel, prefetch: int) -> None:
        """Start the channel's consumer with a per-consumer prefetch (RabbitMQ's cheap kind); 0: none."""
        channel.consuming = None
        if prefetch:
            channel.basic.qos(prefetch)
            channel.consuming = channel.basic.consume(queue=channel.queue_name)

    def ack(self, channel: Any, tag: int, multiple: bool) -> None:
        channel.basic.ack(tag, multiple)

    def set_prefetch(self, channel: Any, prefetch: int, done: Callable[[], None]) -> None:
        """A consumer's prefetch is fixed when it starts: cancel it, then consume again with the new one."""
        if channel.consuming in channel.consumer_tags:
            channel.basic.cancel(channel.consuming)  # returns once CancelOk arrived: nothing more from it
        self._dispatch()  # what the stopped consumer delivered goes before done() draws the line
        self._consume(channel, prefetch)
        done()

    def pump(self, timeout: float) -> None:
        self.arrived.wait_until(lambda: bool(self.ready) or self._woken, timeout)
        self._woken = False
        self._dispatch()
        self.connection.check_for_errors()  # a lost connection: the broker connects again

    def _dispatch(self) -> None:
        ready = self.ready
        while ready:
            deliver, *delivery = ready.popleft()
            deliver(*delivery)

    def channel_error(self, channel: Any) -> str | None:
        if not channel.is_open:
            return str(channel.exceptions[0]) if channel.exceptions else "closed"
        if channel.consuming is not None and channel.consuming not in channel.consumer_tags:
            channel.close()  # its unacked messages go back
            return "the server cancelled the consumer (its queue was deleted?)"
        return None

    def wake(self) -> None:
        self._woken = True
        self.arrived.notify()

    def close(self) -> None:
        self.connection.close()


class AmqpStormBroker(AmqpBroker):
    kind = BrokerEnum.RABBITMQ_AMQPSTORM
    # amqpstorm's AMQPError derives from OSError: listing OSError itself would make a channel error
    # (404, 406) a connection error, so only the socket's own connection failures are named.
    connection_errors = (AMQPConnectionError, ConnectionError, TimeoutError, socket.gaierror)
    errors = (AMQPError,)

    def _open_session(self, url: str) -> _Session:
        return _Session(url)

    def _open_consumer(self, url: str) -> _Consumer:
        return _Consumer(url)
