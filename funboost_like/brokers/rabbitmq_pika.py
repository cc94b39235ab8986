"""RABBITMQ_PIKA: RabbitMQ through pika (the ``rabbitmq`` extra); semantics in :mod:`funboost_like.brokers.amqp`.

Setting ``RABBITMQ_URL`` (environment ``FUNBOOST_LIKE_RABBITMQ_URL``, default
``amqp://guest:guest@127.0.0.1:5672/%2F``), read at first use; passwords never reach a log.

pika's connections are not thread-safe, so each publishing thread has its own
``BlockingConnection`` (heartbeats off: an idle publisher is never dropped for silence; a connection
found broken is replaced and the publish sent once more), and one more connection, driven by the
broker's I/O thread only, consumes. Publishes are pipelined: every message of a ``publish_many`` is
written before the confirms are awaited. This reaches beneath ``BlockingChannel`` (its confirm mode
waits for each message alone) to the channel and connection it wraps, hence pika ``>=1.3,<2``.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import pika
import pika.exceptions as pe
from pika.adapters.blocking_connection import BlockingChannel
from pika.adapters.utils.connection_workflow import AMQPConnectorException

from funboost_like.brokers import amqp, client_logs
from funboost_like.brokers.amqp import AmqpBroker, Deliver
from funboost_like.core.enums import BrokerEnum

_PERSISTENT = 2
_PRECONDITION_FAILED = 406
_NOT_FOUND = 404


def _connect(url: str, heartbeat: int | None) -> pika.BlockingConnection:
    """A connection; pika's own failures of a connection reset as it opens are connection errors here
    (its connector's timeouts, and a ValueError when the socket is gone before its transport starts)."""
    parameters = pika.URLParameters(url)
    if heartbeat is not None:
        parameters.heartbeat = heartbeat
    client_logs.quiet("pika")
    try:
        return pika.BlockingConnection(parameters)
    except (AMQPConnectorException, ValueError) as exc:
        raise pe.AMQPConnectionError(f"{type(exc).__name__}: {exc}") from exc


class _Session:
    """One thread's publishing connection, confirms on; see :class:`~funboost_like.brokers.amqp.Session`."""

    def __init__(self, url: str) -> None:
        self.connection = _connect(url, 0)
        self._properties: dict[tuple[int, Any], pika.BasicProperties] = {}
        self._open_channel()

    def _open_channel(self) -> None:
        self.channel: BlockingChannel = self.connection.channel()
        impl = self.channel._impl
        self._published = self._confirmed = self._returned = 0
        self._nacked = False
        ready: list[bool] = []
        impl.confirm_delivery(ack_nack_callback=self._on_confirm, callback=lambda _frame: ready.append(True))
        impl.add_on_return_callback(self._on_return)
        self._wait(lambda: bool(ready))

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            self._nacked = True
        self._confirmed = method.delivery_tag if method.multiple else max(self._confirmed, method.delivery_tag)

    def _on_return(self, *_args: Any) -> None:
        self._returned += 1

    def _wait(self, done: Callable[[], bool]) -> None:
        channel, last = self.channel, [self._confirmed, time.monotonic()]  # the last confirm seen, and when

        def silent() -> bool:  # nothing confirmed for ANSWER_TIMEOUT (a long publish_many keeps confirming)
            now = time.monotonic()
            if self._confirmed != last[0]:
                last[:] = [self._confirmed, now]
            return now - last[1] >= amqp.ANSWER_TIMEOUT

        timer = self.connection.call_later(amqp.ANSWER_TIMEOUT, _nothing)  # wakes the wait (then every 5 s)
        try:
            self.connection._flush_output(lambda: done() or channel.is_closed or silent())
        finally:
            self.connection.remove_timeout(timer)
        if not (done() or channel.is_closed):  # silent: drop the connection (a close would wait for an answer)
            error = pe.AMQPConnectionError(f"no answer from RabbitMQ within {amqp.ANSWER_TIMEOUT:.0f} s")
            self.connection._impl._terminate_stream(error)
            self.connection._flush_output(lambda: self.connection.is_closed)
            raise error
        if channel.is_closed:
            reason = channel._closing_reason
            self._open_channel()
            raise reason if isinstance(reason, BaseException) else pe.ChannelClosed(0, str(reason))

    def _call(self, action: Callable[[BlockingChannel], Any]) -> Any:
        if self.channel.is_closed:
            self._open_channel()
        return action(self.channel)

    def _declare(self, declare: Callable[[BlockingChannel], Any], passive: Callable[[BlockingChannel], Any]) -> bool:
        try:
            self._call(declare)
            return True
        except pe.ChannelClosedByBroker as exc:
            if exc.reply_code != _PRECONDITION_FAILED:
                raise
        self._call(passive)
        return False

    def declare_queue(self, name: str, arguments: dict[str, Any] | None) -> bool:
        return self._declare(lambda ch: ch.queue_declare(name, durable=True, arguments=arguments),
                             lambda ch: ch.queue_declare(name, passive=True))

    def declare_exchange(self, name: str, exchange_type: str) -> bool:
        return self._declare(lambda ch: ch.exchange_declare(name, exchange_type, durable=True),
                             lambda ch: ch.exchange_declare(name, passive=True))

    def bind_queue(self, queue: str, exchange: str, key: str, arguments: dict[str, Any] | None = None) -> None:
        self._call(lambda ch: ch.queue_bind(queue, exchange, routing_key=key, arguments=arguments))

    def bind_exchange(self, destination: str, source: str, key: str, arguments: dict[str, Any] | None = None) -> None:
        self._call(lambda ch: ch.exchange_bind(destination, source, routing_key=key, arguments=arguments))

    def publish(self, exchange: str, routing_key: str, bodies: Sequence[bytes], priority: int,
                headers: dict[str, Any] | None) -> bool:
        if self.channel.is_closed:
            self._open_channel()
        properties = self._props(priority, headers)
        returned = self._returned
        impl = self.channel._impl
        if len(bodies) > 1 and max(map(len, bodies)) <= getattr(impl.connection, "_body_max_length", 0):
            self._write_frames(impl, exchange, routing_key, bodies, properties)
        else:
            for body in bodies:
                impl.basic_publish(exchange, routing_key, body, properties, mandatory=True)
        self._published += len(bodies)
        target = self._published
        self._wait(lambda: self._confirmed >= target)
        if self._nacked:
            self._nacked = False
            raise pe.NackError([])
        return self._returned == returned

    def _write_frames(self, impl: Any, exchange: str, routing_key: str, bodies: Sequence[bytes],
                      properties: pika.BasicProperties) -> None:
        """Many messages of one-frame bodies, framed here in one write: the method frame and the content
        header are marshalled once by pika (the header's body size patched per message), which makes a
        ``publish_many`` several times faster than one ``basic_publish`` per message."""
        number = impl.channel_number
        method = pika.frame.Method(number, pika.spec.Basic.Publish(exchange=exchange, routing_key=routing_key,
                                                                   mandatory=True)).marshal()
        header = pika.frame.Header(number, 0, properties).marshal()
        head, tail = header[:11], header[19:]  # the 8 bytes between are the body size
        body_start = struct.Struct(">BHI")
        parts: list[bytes] = []
        append = parts.append
        for body in bodies:
            size = len(body)
            append(method)
            append(head)
            append(size.to_bytes(8, "big"))
            append(tail)
            append(body_start.pack(3, number, size))
            append(body)
            append(b"\xce")
        impl.connection._output_marshaled_frames([b"".join(parts)])

    def _props(self, priority: int, headers: dict[str, Any] | None) -> pika.BasicProperties:
        if headers:
            return pika.BasicProperties(delivery_mode=_PERSISTENT, content_type="application/json",
                                        priority=priority or None, headers=headers)
        properties = self._properties.get((priority, None))
        if properties is None:
            properties = self._properties[(priority, None)] = pika.BasicProperties(
                delivery_mode=_PERSISTENT, content_type="application/json", priority=priority or None)
        return properties

    def message_count(self, queue: str) -> int:
        return int(self._call(lambda ch: ch.queue_declare(queue, passive=True)).method.message_count)

    def purge(self, queue: str) -> int:
        return int(self._call(lambda ch: ch.queue_purge(queue)).method.message_count)

    def peek(self, queue: str, limit: int, take: bytes | None = None) -> list[bytes]:
        bodies: list[bytes] = []
        channel = self.connection.channel()
        try:
            while len(bodies) < limit:
                method, _properties, body = channel.basic_get(queue, auto_ack=False)
                if method is None:
                    break
                bodies.append(body)
                if body == take:
                    channel.basic_ack(method.delivery_tag)
                    break
        except pe.ChannelClosedByBroker as exc:
            if exc.reply_code != _NOT_FOUND:
                raise
        finally:
            if channel.is_open:
                channel.close()  # what it got goes back, in place
        return bodies

    def offer(self, queue: str, body: bytes, expiration_ms: int | None) -> bool:
        if self.channel.is_closed:
            self._open_channel()
        properties = pika.BasicProperties(delivery_mode=_PERSISTENT, content_type="application/json",
                                          expiration=None if expiration_ms is None else str(expiration_ms))
        self.channel._impl.basic_publish("", queue, body, properties, mandatory=True)
        self._published += 1
        target = self._published
        self._wait(lambda: self._confirmed >= target)
        refused, self._nacked = self._nacked, False
        return not refused

    def delete_queue(self, queue: str) -> None:
        self._call(lambda ch: ch.queue_delete(queue))

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


class _Consumer:
    """The consuming connection, driven by the broker's I/O thread only."""

    def __init__(self, url: str) -> None:
        self.connection = _connect(url, None)
        self._consuming: dict[Any, tuple[str, Callable[..., None], str | None]] = {}  # channel: (queue, callback, tag)

    def subscribe(self, queue: str, prefetch: int, deliver: Deliver) -> Any:
        channel = self.connection.channel()
        impl = channel._impl  # only the wrapped channel is used: BlockingChannel's own RPCs would see ours

        def on_message(_channel: Any, method: Any, properties: Any, body: bytes) -> None:
            deliver(method.delivery_tag, body, properties.headers or {}, properties.priority or 0, method.redelivered)

        ready: list[bool] = []
        # A per-consumer prefetch (RabbitMQ's cheap kind: a channel-wide one costs the server a
        # round trip between processes per message, several times slower here).
        impl.basic_qos(prefetch_count=prefetch, callback=lambda _ok: ready.append(True))
        self.connection._flush_output(lambda: bool(ready) or channel.is_closed)
        self._consuming[channel] = (queue, on_message, impl.basic_consume(queue, on_message))
        return channel

    def ack(self, channel: Any, tag: int, multiple: bool) -> None:
        channel._impl.basic_ack(tag, multiple)  # written by the next pump

    def set_prefetch(self, channel: Any, prefetch: int, done: Callable[[], None]) -> None:
        """A consumer's prefetch is fixed when it starts: cancel it, set the new one, consume again."""
        queue, on_message, tag = self._consuming[channel]
        impl = channel._impl

        def consume_again(_frame: Any) -> None:
            if not prefetch:  # paused
                self._consuming[channel] = (queue, on_message, None)
                done()
                return
            channel._basic_consume_ok_result.reset()  # BlockingChannel's own ConsumeOk latch, set by the first one
            impl.basic_qos(prefetch_count=prefetch, callback=lambda _ok: self._consuming.__setitem__(
                channel, (queue, on_message, impl.basic_consume(queue, on_message, callback=lambda _ok2: done()))))

        if tag is None:
            consume_again(None)
        else:
            impl.basic_cancel(tag, callback=consume_again)
            # Until CancelOk the server may still push to it; pika would reject those (back to the queue
            # marked redelivered: a crash, wrongly). They stay ours, unacked on the channel like the rest.
            impl._cancelled.discard(tag)

    def channel_error(self, channel: Any) -> str | None:
        return str(channel._closing_reason or "closed") if channel.is_closed else None

    def pump(self, timeout: float) -> None:
        self.connection.process_data_events(time_limit=timeout)

    def wake(self) -> None:
        self.connection.add_callback_threadsafe(_nothing)

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


def _nothing() -> None:
    pass


class PikaBroker(AmqpBroker):
    kind = BrokerEnum.RABBITMQ_PIKA
    connection_errors = (pe.AMQPConnectionError, pe.ConnectionWrongStateError, OSError)
    errors = (pe.AMQPError,)

    def _open_session(self, url: str) -> _Session:
        return _Session(url)

    def _open_consumer(self, url: str) -> _Consumer:
        return _Consumer(url)
