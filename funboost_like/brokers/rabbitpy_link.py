"""The connections of RABBITMQ_RABBITPY (:mod:`.rabbitmq_rabbitpy`): rabbitpy's, with this module's own
channels (:class:`Channel`) and writes (:class:`Link`).

Each publishing thread has its own connection and one more, driven by the broker's I/O thread,
consumes. rabbitpy does the connection's part: it opens it (``TCP_NODELAY`` is set on its socket
before the handshake, else that waits 40 ms for a delayed ACK, and so could an ack), reads and
decodes frames in its ``IO`` thread (an asyncio loop), keeps heartbeats going and reports a lost
socket or a closing server. The channels are this module's own (:class:`Channel`): rabbitpy's poll
their read queue every 10 ms, wait for each publisher confirm alone, and reject a delivery that
races the cancel of its consumer (back to the queue marked redelivered, which the layer would count
as a crash). rabbitpy's IO thread hands each frame to its :class:`Channel`, which takes confirms,
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
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import rabbitpy
from pamqp import commands
from pamqp import frame as pamqp_frame
from rabbitpy import exceptions

from funboost_like.brokers.amqp import Deliver
from funboost_like.brokers.push_buffer import Signal

POLL = 0.25  # how often a waiter looks for errors nobody signals
CONNECT_POLL = 0.05  # how often opening a connection looks for the IO thread's error


class _Connection(rabbitpy.Connection):
    """rabbitpy's connection; its socket gets ``TCP_NODELAY`` as it opens, before the handshake."""

    def connect(self) -> None:
        set_event = self._events.set

        def set_then_configure(event_id: int) -> bool | None:
            if event_id == rabbitpy.events.SOCKET_OPENED:  # on the IO thread, its socket just connected
                cast(Any, self._io)._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return set_event(event_id)

        wait = self._events.wait

        def wait_or_fail(event_id: int, timeout: float = 1) -> bool | None:
            """rabbitpy looks for its IO thread's error (a refused connection) only after a whole wait:
            look every CONNECT_POLL seconds instead, so a refused connection fails at once."""
            deadline = time.monotonic() + timeout
            while True:
                done = wait(event_id, min(CONNECT_POLL, max(deadline - time.monotonic(), 0)))
                if done is not False or time.monotonic() >= deadline:
                    return done
                if not self._exceptions.empty():
                    raise self._exceptions.get()

        self._events.set = set_then_configure  # type: ignore[method-assign]
        self._events.wait = wait_or_fail  # type: ignore[method-assign]
        try:
            super().connect()
        except RuntimeError as exc:  # rabbitpy's timeouts while opening
            raise exceptions.ConnectionException(str(exc)) from exc
        finally:
            del self._events.wait


class Channel:
    """One channel of a :class:`Link`, fed by rabbitpy's IO thread (``put``); used by one thread."""

    def __init__(self, link: Link, number: int) -> None:
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


class Link:
    """One connection: rabbitpy's, with this module's channels and writes (see the module docstring)."""

    def __init__(self, url: str) -> None:
        self.connection = cast(Any, _Connection(url))  # its _io and _channel0 are set while open
        self.io: Any = self.connection._io
        self.sock: socket.socket = self.io._socket
        self.lock = threading.Lock()  # one writer on the socket at a time
        self.arrived = Signal()
        self.channels: dict[int, Channel] = {}
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

    def open_channel(self) -> Channel:
        number = next(n for n in itertools.count(1) if n not in self.channels)
        channel = self.channels[number] = Channel(self, number)
        self.io.add_channel(number, channel)
        channel.rpc(commands.Channel.Open())
        return channel

    def wait(self, done: Callable[[], bool], channel: Channel) -> None:
        """Block until ``done()``; raise the channel's or connection's error if it breaks first."""
        while not done():
            if channel.closed_by is not None:
                code, text = channel.closed_by.reply_code, channel.closed_by.reply_text
                raise exceptions.AMQP.get(code, exceptions.AMQPException)(code, text)
            self.check()
            self.arrived.wait_until(lambda: done() or channel.closed_by is not None, POLL)

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
