"""RABBITMQ_RABBITPY: RabbitMQ through rabbitpy (extra ``rabbitmq``); semantics in :mod:`funboost_like.brokers.amqp`.

Setting ``RABBITMQ_URL`` (environment ``FUNBOOST_LIKE_RABBITMQ_URL``), read at first use.

Each publishing thread has its own connection and one more, driven by the broker's I/O thread,
consumes. rabbitpy does the connection's part: it opens it (``TCP_NODELAY`` is set on its socket
before the handshake, else that waits 40 ms for a delayed ACK, and so could an ack), reads and
decodes frames in its ``IO`` thread (an asyncio loop), keeps heartbeats going and reports a lost
socket or a closing server. The channels are this module's own (:class:`_Channel`): rabbitpy's poll
their read queue every 10 ms, wait for each publisher confirm alone, and reject a delivery that
races the cancel of its consumer (back to the queue marked redelivered, which the layer would count
as a crash). rabbitpy's IO thread hands each frame to its :class:`_Channel`, which takes confirms,
returns, deliveries and RPC answers as they arrive, waking whoever waits.

Writes bypass rabbitpy's writer: the calling thread sends on the socket itself, under the
connection's lock (after whatever rabbitpy queued: heartbeats, ``connection.close``). So an ack is
on the socket when ``ack`` returns, which the layer's ``_flush_acks`` relies on (an ack that follows
a re-publish must be written before anything else runs), and a ``publish_many`` goes out in a few
large writes before its confirms are awaited. rabbitpy's event loop keeps its socket registered for
writing, so an idle connection would spin (half a CPU each); here that registration is removed, and
a one-second tick sends what rabbitpy queued meanwhile. This reaches beneath rabbitpy's public API
(the ``IO`` thread's socket, event loop, write buffer and channel table; the connection's events,
exception queue and channel 0), hence rabbitpy ``>=3,<4``.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any, cast

import rabbitpy
from pamqp import commands
from pamqp import frame as pamqp_frame
from pamqp.header import ContentHeader
from rabbitpy import exceptions

from funboost_like.brokers.amqp import AmqpBroker, Deliver
from funboost_like.brokers.push_buffer import Signal
from funboost_like.core.enums import BrokerEnum

_PERSISTENT = 2
_POLL = 0.25  # how often a waiter looks for errors nobody signals
_BODY_FRAME = struct.Struct(">BHI")
_BODY_SIZE = struct.Struct(">Q")  # at bytes 11..19 of a content header frame
_WRITE_CHUNK = 1 << 17


class _Connection(rabbitpy.Connection):
    """rabbitpy's connection; its socket gets ``TCP_NODELAY`` as it opens, before the handshake."""

    def connect(self) -> None:
        set_event = self._events.set

        def set_then_configure(event_id: int) -> bool | None:
            if event_id == rabbitpy.events.SOCKET_OPENED:  # on the IO thread, its socket just connected
                cast(Any, self._io)._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return set_event(event_id)

        self._events.set = set_then_configure  # type: ignore[method-assign]
        try:
            super().connect()
        except RuntimeError as exc:  # rabbitpy's timeouts while opening
            raise exceptions.ConnectionException(str(exc)) from exc


class _Channel:
    """One channel of a :class:`_Link`, fed by rabbitpy's IO thread (``put``); used by one thread."""

    def __init__(self, link: _Link, number: int) -> None:
        self.link, self.number = link, number
        self.replies: collections.deque[Any] = collections.deque()  # RPC answers; a basic.get's body as bytes
        self.published = self.confirmed = self.returned = 0
        self.nacked = self.cancelled = False  # cancelled: by the server (its queue was deleted)
        self.closed_by: Any = None  # the server's Channel.Close
        self.deliver: Deliver | None = None
        self.queue_name = ""
        self.consuming: str | None = None  # the consumer tag
        self._content: list[Any] | None = None  # [method frame, properties, parts, bytes still to come]

    def put(self, frame: Any) -> None:
        """Called by rabbitpy's IO thread with each frame of this channel, in order."""
        name = frame.name
        content = self._content
        if content is not None:  # the header and body frames of the last Deliver, GetOk or Return
            if name == "ContentHeader":
                content[1], content[3] = frame.properties, frame.body_size
            else:
                content[2].append(frame.value)
                content[3] -= len(frame.value)
            if content[1] is not None and content[3] <= 0:
                self._content = None
                self._received(*content[:3])
            return
        if name in ("Basic.Deliver", "Basic.GetOk", "Basic.Return"):
            self._content = [frame, None, [], 0]
            return
        if name == "Basic.Ack" or name == "Basic.Nack":
            self.nacked = self.nacked or name == "Basic.Nack"
            self.confirmed = frame.delivery_tag if frame.multiple else max(self.confirmed, frame.delivery_tag)
        elif name == "Basic.Cancel":
            self.cancelled = True
        elif name == "Channel.Close":
            with self.link.lock:  # no frame of ours may follow the CloseOk on this number
                self.closed_by = frame
                self.link.send(pamqp_frame.marshal(commands.Channel.CloseOk(), self.number))
        else:
            self.replies.append(frame)
        self.link.arrived.notify()

    def _received(self, method: Any, properties: Any, parts: list[bytes]) -> None:
        if method.name == "Basic.Deliver":
            self.link.ready.append((self.deliver, method.delivery_tag, b"".join(parts), properties.headers or {},
                                    properties.priority or 0, method.redelivered))
        elif method.name == "Basic.GetOk":
            self.replies.append(b"".join(parts))
        else:
            self.returned += 1  # a mandatory publish nobody could take
        self.link.arrived.notify()

    def write(self, data: bytes) -> None:
        """Write ``data`` now, from any thread; dropped if the server closed the channel (its wait raises)."""
        with self.link.lock:
            if self.closed_by is None:
                self.link.send(data)

    def rpc(self, method: Any) -> Any:
        self.write(pamqp_frame.marshal(method, self.number))
        self.link.wait(lambda: bool(self.replies), self)
        return self.replies.popleft()

    def close(self) -> None:
        """Close it (what it holds unacked goes back to its queue) and free its number."""
        if self.closed_by is None:
            with contextlib.suppress(exceptions.AMQPException):  # the server closed it meanwhile
                self.rpc(commands.Channel.Close(200, "Normal shutdown", 0, 0))
        self.link.channels.pop(self.number, None)


class _Link:
    """One connection: rabbitpy's, with this module's channels and writes (see the module docstring)."""

    def __init__(self, url: str) -> None:
        self.connection = cast(Any, _Connection(url))  # its _io and _channel0 are set while open
        self.io: Any = self.connection._io
        self.sock: socket.socket = self.io._socket
        self.lock = threading.Lock()  # one writer on the socket at a time
        self.arrived = Signal()
        self.channels: dict[int, _Channel] = {}
        self.ready: collections.deque[tuple[Any, ...]] = collections.deque()  # deliveries, for the consumer
        loop, installed = self.io._ioloop, threading.Event()

        def tick() -> None:  # on rabbitpy's loop, once a second
            if self.io._socket is self.sock:
                loop.remove_writer(self.sock)  # rabbitpy's writer, always ready: it would spin
                installed.set()
                loop.call_later(1.0, tick)
                if self.io._write_buffer:  # what rabbitpy queued (heartbeats)
                    with contextlib.suppress(OSError), self.lock:  # an error: its reader notices
                        self.send(b"")

        loop.call_soon_threadsafe(tick)
        installed.wait(5.0)

    def send(self, data: bytes) -> None:
        """Write ``data`` after what rabbitpy queued; the caller holds ``lock``."""
        buffer = self.io._write_buffer
        data = b"".join([buffer.popleft() for _ in range(len(buffer))]) + data
        if data:
            self.sock.sendall(data)

    def open_channel(self) -> _Channel:
        number = next(n for n in itertools.count(1) if n not in self.channels)
        channel = self.channels[number] = _Channel(self, number)
        self.io.add_channel(number, channel)
        channel.rpc(commands.Channel.Open())
        return channel

    def wait(self, done: Callable[[], bool], channel: _Channel) -> None:
        """Block until ``done()``; raise the channel's or connection's error if it breaks first."""
        while not done():
            if channel.closed_by is not None:
                code, text = channel.closed_by.reply_code, channel.closed_by.reply_text
                raise exceptions.AMQP.get(code, exceptions.AMQPException)(code, text)
            self.check()
            self.arrived.wait_until(lambda: done() or channel.closed_by is not None, _POLL)

    def check(self) -> None:
        """Raise what rabbitpy's threads reported (a lost socket, a closing server)."""
        errors = self.connection._exceptions  # a queue.Queue that only rabbitpy's threads fill
        if not errors.empty():
            raise errors.get_nowait()
        if not self.io.is_alive():
            raise exceptions.ConnectionResetException()

    def close(self) -> None:
        """Say ``connection.close`` to the server (if it listens), then stop rabbitpy's threads."""
        self.connection._channel0.close()  # queues Connection.Close
        with contextlib.suppress(OSError), self.lock:
            self.send(b"")
        self.connection.close()


class _Session(_Link):
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

    def _live(self) -> _Channel:
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
        return pamqp_frame.marshal(ContentHeader(0, 0, commands.Basic.Properties(
            delivery_mode=_PERSISTENT, content_type="application/json", **properties)), self.ch.number)

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

    def _send(self, ch: _Channel, exchange: str, routing_key: str, bodies: Sequence[bytes], header: bytes) -> None:
        """Write the messages as frames (the method frame and content header encoded once, the body size
        patched in) in chunks, then wait for the server's confirms of all of them."""
        number = ch.number
        method = pamqp_frame.marshal(commands.Basic.Publish(exchange=exchange, routing_key=routing_key,
                                                            mandatory=True), number)
        head, tail = header[:11], header[19:]
        largest = self.connection._channel0.maximum_frame_size - 8
        pack_size, pack_body = _BODY_SIZE.pack, _BODY_FRAME.pack
        parts: list[bytes] = []
        pending = 0
        for body in bodies:
            size = len(body)
            parts += (method, head, pack_size(size), tail)
            for start in range(0, size, largest):
                piece = body[start:start + largest]
                parts += (pack_body(3, number, len(piece)), piece, b"\xce")
            pending += size + 100
            if pending > _WRITE_CHUNK:
                ch.write(b"".join(parts))
                parts, pending = [], 0
        if parts:
            ch.write(b"".join(parts))
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


class _Consumer(_Link):
    """The consuming connection, driven by the broker's I/O thread only; the IO thread queues deliveries."""

    _woken = False

    def subscribe(self, queue: str, prefetch: int, deliver: Deliver) -> Any:
        ch = self.open_channel()
        ch.queue_name, ch.deliver = queue, deliver
        self._consume(ch, prefetch)
        return ch

    @staticmethod
    def _consume(ch: _Channel, prefetch: int) -> None:
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
    connection_errors = (exceptions.ConnectionException, exceptions.RemoteClosedException,
                         exceptions.AMQPConnectionForced, OSError)
    errors = (exceptions.RabbitpyException,)

    def _open_session(self, url: str) -> _Session:
        return _Session(url)

    def _open_consumer(self, url: str) -> _Consumer:
        return _Consumer(url)
