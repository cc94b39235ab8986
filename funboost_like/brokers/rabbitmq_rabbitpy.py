"""RABBITMQ_RABBITPY: RabbitMQ through rabbitpy (extra ``rabbitmq``); semantics in :mod:`funboost_like.brokers.amqp`.

Setting ``RABBITMQ_URL`` (environment ``FUNBOOST_LIKE_RABBITMQ_URL``), read at first use.

Each publishing thread has its own connection and one more, driven by the broker's I/O thread,
consumes. The connections are rabbitpy's, with channels and writes of their own
(:mod:`.rabbitpy_link`, which says why), hence rabbitpy ``>=3,<4``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from pamqp import commands
from pamqp import frame as pamqp_frame
from rabbitpy import exceptions

from funboost_like.brokers.amqp import AmqpBroker, Deliver
from funboost_like.brokers.amqp_frames import content_header, publish_chunks
from funboost_like.brokers.rabbitpy_link import Channel, Link
from funboost_like.core.enums import BrokerEnum

_WRITE_CHUNK = 1 << 17


class _Session(Link):
    """One thread's publishing connection, confirms on; see :class:`~funboost_like.brokers.amqp.Session`."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._headers: dict[int, bytes] = {}  # priority -> encoded content header (no custom headers)
        try:
            self._open_channel()
        except BaseException:
            self.close()
            raise

    def _open_channel(self) -> None:
        self.ch = self.open_channel()
        self.ch.rpc(commands.Confirm.Select())
        self._headers.clear()  # they name the channel

    def _live(self) -> Channel:
        if self.ch.closed_by is not None:
            self.ch.close()
            self._open_channel()
        return self.ch

    def _rpc(self, method: Any) -> Any:
        return self._live().rpc(method)

    def _declare(self, declare: Any, passive: Any) -> bool:
        with contextlib.suppress(exceptions.AMQPPreconditionFailed):  # it exists with other properties
            self._rpc(declare)
            return True
        self._rpc(passive)
        return False

    def declare_queue(self, name: str, arguments: dict[str, Any] | None) -> bool:
        return self._declare(commands.Queue.Declare(queue=name, durable=True, arguments=arguments),
                             commands.Queue.Declare(queue=name, passive=True))

    def declare_exchange(self, name: str, exchange_type: str) -> bool:
        return self._declare(commands.Exchange.Declare(exchange=name, exchange_type=exchange_type, durable=True),
                             commands.Exchange.Declare(exchange=name, passive=True))

    def bind_queue(self, queue: str, exchange: str, key: str, arguments: dict[str, Any] | None = None) -> None:
        self._rpc(commands.Queue.Bind(queue=queue, exchange=exchange, routing_key=key, arguments=arguments))

    def bind_exchange(self, destination: str, source: str, key: str, arguments: dict[str, Any] | None = None) -> None:
        self._rpc(commands.Exchange.Bind(destination=destination, source=source, routing_key=key,
                                         arguments=arguments))

    def _header(self, **properties: Any) -> bytes:
        """A content header frame of this session's channel (body size 0: patched per message)."""
        return content_header(self.ch.number, **properties)

    def publish(self, exchange: str, routing_key: str, bodies: Sequence[bytes], priority: int,
                headers: dict[str, Any] | None) -> bool:
        ch = self._live()
        header = None if headers else self._headers.get(priority)
        if header is None:
            header = self._header(priority=priority or None, headers=headers or None)
            if not headers:
                self._headers[priority] = header
        returned = ch.returned
        self._send(ch, exchange, routing_key, bodies, header)
        if ch.nacked:
            ch.nacked = False
            raise exceptions.AMQPException("RabbitMQ refused a published message (basic.nack)")
        return ch.returned == returned

    def offer(self, queue: str, body: bytes, expiration_ms: int | None) -> bool:
        ch = self._live()
        expiration = None if expiration_ms is None else str(expiration_ms)
        self._send(ch, "", queue, [body], self._header(expiration=expiration))
        refused, ch.nacked = ch.nacked, False
        return not refused

    def _send(self, ch: Channel, exchange: str, routing_key: str, bodies: Sequence[bytes], header: bytes) -> None:
        """Write the messages as frames (the method frame and content header encoded once, the body size
        patched in) in chunks, then wait for the server's confirms of all of them."""
        for chunk in publish_chunks(ch.number, exchange, routing_key, bodies, header,
                                    self.connection._channel0.maximum_frame_size - 8, _WRITE_CHUNK):
            ch.write(chunk)
        ch.published += len(bodies)
        target = ch.published
        self.wait(lambda: ch.confirmed >= target, ch)

    def message_count(self, queue: str) -> int:
        return int(self._rpc(commands.Queue.Declare(queue=queue, passive=True)).message_count)

    def purge(self, queue: str) -> int:
        return int(self._rpc(commands.Queue.Purge(queue=queue)).message_count)

    def peek(self, queue: str, limit: int, take: bytes | None = None) -> list[bytes]:
        bodies: list[bytes] = []
        ch = self.open_channel()
        try:
            while len(bodies) < limit:
                reply = ch.rpc(commands.Basic.Get(queue=queue))
                if not isinstance(reply, bytes):  # Basic.GetEmpty
                    break
                bodies.append(reply)
                if reply == take:  # a new channel's deliveries are tagged 1, 2, ...
                    ch.write(pamqp_frame.marshal(commands.Basic.Ack(delivery_tag=len(bodies)), ch.number))
                    break
        except exceptions.AMQPNotFound:
            pass
        finally:
            ch.close()  # what it got goes back, in place
        return bodies

    def delete_queue(self, queue: str) -> None:
        self._rpc(commands.Queue.Delete(queue=queue))


class _Consumer(Link):
    """The consuming connection, driven by the broker's I/O thread only; the IO thread queues deliveries."""

    _woken = False

    def subscribe(self, queue: str, prefetch: int, deliver: Deliver) -> Any:
        ch = self.open_channel()
        ch.queue_name, ch.deliver = queue, deliver
        self._consume(ch, prefetch)
        return ch

    @staticmethod
    def _consume(ch: Channel, prefetch: int) -> None:
        """Start the channel's consumer with a per-consumer prefetch (RabbitMQ's cheap kind); 0: none."""
        ch.consuming = None
        if prefetch:
            ch.rpc(commands.Basic.Qos(prefetch_count=prefetch))
            ch.consuming = ch.rpc(commands.Basic.Consume(queue=ch.queue_name)).consumer_tag

    def ack(self, channel: Any, tag: int, multiple: bool) -> None:
        channel.write(pamqp_frame.marshal(commands.Basic.Ack(delivery_tag=tag, multiple=multiple), channel.number))

    def set_prefetch(self, channel: Any, prefetch: int, done: Callable[[], None]) -> None:
        """A consumer's prefetch is fixed when it starts: cancel it, then consume again with the new one.
        What it delivered before its CancelOk stays ours, unacked on the channel like the rest."""
        if channel.closed_by is None and not channel.cancelled:  # else channel_error() reports it next round
            if channel.consuming is not None:
                channel.rpc(commands.Basic.Cancel(consumer_tag=channel.consuming))  # nothing more from it
            self._dispatch()  # what the stopped consumer delivered goes before done() draws the line
            self._consume(channel, prefetch)
        done()

    def pump(self, timeout: float) -> None:
        self.arrived.wait_until(lambda: bool(self.ready) or self._woken, timeout)
        self._woken = False
        self._dispatch()
        self.check()  # a lost connection: the broker connects again

    def _dispatch(self) -> None:
        ready = self.ready
        while ready:
            deliver, *delivery = ready.popleft()
            deliver(*delivery)

    def channel_error(self, channel: Any) -> str | None:
        close = channel.closed_by
        if close is None and not channel.cancelled:
            return None
        channel.close()  # its unacked messages go back
        return f"{close.reply_code} {close.reply_text}" if close else "cancelled by the server (its queue deleted?)"

    def wake(self) -> None:
        self._woken = True
        self.arrived.notify()


class RabbitpyBroker(AmqpBroker):
    kind = BrokerEnum.RABBITMQ_RABBITPY
    # rabbitpy's IO thread runs asyncio.run(): patched threads are greenlets of one OS thread, where the
    # second connection's asyncio.run() finds the first one's loop running and fails.
    capabilities = dataclasses.replace(AmqpBroker.capabilities, green_threads=False)
    connection_errors = (exceptions.ConnectionException, exceptions.RemoteClosedException,
                         exceptions.AMQPConnectionForced, OSError)
    errors = (exceptions.RabbitpyException,)

    def _open_session(self, url: str) -> _Session:
        return _Session(url)

    def _open_consumer(self, url: str) -> _Consumer:
        return _Consumer(url)
