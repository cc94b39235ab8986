"""AMQP 0-9-1 deliveries decoded by hand, for a consuming connection whose client decodes slowly.

A client library decodes every frame into objects (pamqp: a method object with validation, a
properties object, a body frame object), and amqpstorm copies the rest of its read buffer after
each frame. On a consuming connection nearly every frame is one of a delivery's three: the
``basic.deliver`` method, its content header and its body. :class:`DeliveryReader` walks a read
buffer by offsets, takes those three apart with ``struct`` for the channels registered with it,
and hands every other frame (confirms, RPC answers, heartbeats, a ``basic.return``, the frames of
an unregistered channel) to the client's own reader, in order, one frame at a time.

What a registered channel receives per message: ``(delivery_tag, body, headers, priority,
redelivered)``; ``headers`` is ``{}`` when the message has none.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, cast

from pamqp import frame as pamqp_frame
from pamqp.decode import field_table
from pamqp.header import ContentHeader

Delivered = Callable[[int, bytes, dict[str, Any], int, bool], None]

FRAME_END = 0xCE
_METHOD, _HEADER, _BODY = 1, 2, 3
_FRAME = struct.Struct(">BHI")  # type, channel, payload size
_DELIVER_METHOD = (60 << 16) | 60  # basic.deliver: class 60, method 60
_CLASS_METHOD = struct.Struct(">I")
_TAG_FLAG = struct.Struct(">QB")  # delivery tag, redelivered bit
_HEADER_FIELDS = struct.Struct(">QH")  # body size, property flags (after class id and weight)
# Property flags of the basic class, in wire order up to priority (the last one read here).
_CONTENT_TYPE, _CONTENT_ENCODING, _HEADERS, _DELIVERY_MODE, _PRIORITY = 0x8000, 0x4000, 0x2000, 0x1000, 0x0800
_MORE_FLAGS = 0x0001


class _Pending:
    """A delivery whose method frame arrived: its header and body frames follow on the same channel."""

    __slots__ = ("tag", "redelivered", "headers", "priority", "left", "parts", "header_seen")

    def __init__(self, tag: int, redelivered: bool) -> None:
        self.tag, self.redelivered = tag, redelivered
        self.headers: dict[str, Any] = {}
        self.priority = 0
        self.left = 0
        self.parts: list[bytes] = []
        self.header_seen = False


class DeliveryReader:
    """Splits a connection's incoming bytes into frames; decodes deliveries of registered channels.

    ``other(frame)`` gets each other frame's bytes (a whole frame, end byte included) and must
    dispatch it as the client would. Call :meth:`feed` from the connection's reading thread only;
    :meth:`register` / :meth:`forget` from any thread (a dict assignment).
    """

    def __init__(self, other: Callable[[bytes], object]) -> None:
        self._other = other
        self._channels: dict[int, Delivered] = {}
        self._pending: dict[int, _Pending] = {}

    def register(self, channel: int, delivered: Delivered) -> None:
        self._pending.pop(channel, None)
        self._channels[channel] = delivered

    def forget(self, channel: int) -> None:
        self._channels.pop(channel, None)
        self._pending.pop(channel, None)

    def feed(self, data: bytes) -> bytes:
        """Handle every whole frame of ``data``; return the incomplete rest (to be prefixed to the next read)."""
        size = len(data)
        position = 0
        unpack_frame = _FRAME.unpack_from
        channels, pending = self._channels, self._pending
        while size - position >= 8:
            kind, channel, length = unpack_frame(data, position)
            start = position + 7
            end = start + length
            if end >= size:
                break  # the frame (or its end byte) is not all here yet
            if data[end] != FRAME_END:  # broken framing: the client's reader reports it its own way
                self._other(data[position:])
                return b""
            waiting = pending.get(channel)
            if kind == _BODY and waiting is not None and waiting.header_seen:
                waiting.parts.append(data[start:end])
                waiting.left -= length
                if waiting.left <= 0:
                    self._complete(channel, waiting)
            elif kind == _HEADER and waiting is not None and not waiting.header_seen:
                self._header(data, start, end, waiting)
                if waiting.left <= 0:
                    self._complete(channel, waiting)
            elif (kind == _METHOD and channel in channels and length >= 4
                  and _CLASS_METHOD.unpack_from(data, start)[0] == _DELIVER_METHOD):
                pending[channel] = self._deliver(data, start + 4)
            else:
                if waiting is not None:  # out of order (a protocol error): that delivery is dropped
                    del pending[channel]
                self._other(data[position:end + 1])
            position = end + 1
        return data[position:] if position else data

    @staticmethod
    def _deliver(data: bytes, offset: int) -> _Pending:
        offset += 1 + data[offset]  # consumer tag
        tag, flags = _TAG_FLAG.unpack_from(data, offset)
        return _Pending(tag, bool(flags & 1))  # exchange and routing key follow; not needed

    @staticmethod
    def _header(data: bytes, start: int, end: int, waiting: _Pending) -> None:
        """Read a content header's body size, headers and priority."""
        body_size, flags = _HEADER_FIELDS.unpack_from(data, start + 4)
        waiting.left = body_size
        waiting.header_seen = True
        if flags & _MORE_FLAGS:  # more than 16 property flags (not in 0-9-1's basic class): pamqp reads them
            header = pamqp_frame.unmarshal(data[start - 7:end + 1])[2]
            properties = cast(ContentHeader, header).properties
            waiting.headers, waiting.priority = properties.headers or {}, properties.priority or 0
            return
        offset = start + 14
        if flags & _CONTENT_TYPE:
            offset += 1 + data[offset]
        if flags & _CONTENT_ENCODING:
            offset += 1 + data[offset]
        if flags & _HEADERS:
            used, headers = field_table(data[offset:end])
            offset += used
            waiting.headers = headers
        if flags & _DELIVERY_MODE:
            offset += 1
        if flags & _PRIORITY:
            waiting.priority = data[offset]

    def _complete(self, channel: int, waiting: _Pending) -> None:
        del self._pending[channel]
        parts = waiting.parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        self._channels[channel](waiting.tag, body, waiting.headers, waiting.priority, waiting.redelivered)
