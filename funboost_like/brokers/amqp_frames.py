"""AMQP 0-9-1 publish frames encoded by hand, for the clients whose own publish path is slow
(amqpstorm, rabbitpy): the method frame and the content header are encoded once per batch, and only
the body size is patched in per message."""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from typing import Any

from pamqp import commands
from pamqp import frame as pamqp_frame
from pamqp.header import ContentHeader

PERSISTENT = 2  # delivery_mode
_BODY_FRAME = struct.Struct(">BHI")  # frame type, channel, payload size
_BODY_SIZE = struct.Struct(">Q")  # at bytes 11..19 of a content header frame


def content_header(channel: int, **properties: Any) -> bytes:
    """A persistent JSON message's content header frame on ``channel`` (body size 0: patched per message)."""
    return pamqp_frame.marshal(ContentHeader(0, 0, commands.Basic.Properties(
        delivery_mode=PERSISTENT, content_type="application/json", **properties)), channel)


def publish_chunks(channel: int, exchange: str, routing_key: str, bodies: Sequence[bytes], header: bytes,
                   largest: int, chunk: int) -> Iterator[bytes]:
    """The frames publishing ``bodies`` (mandatory) with ``header``, joined into writes of about ``chunk``
    bytes; a body longer than ``largest`` (the frame size minus its 8 bytes of framing) is split."""
    method = pamqp_frame.marshal(commands.Basic.Publish(exchange=exchange, routing_key=routing_key,
                                                        mandatory=True), channel)
    head, tail = header[:11], header[19:]
    pack_size, pack_body = _BODY_SIZE.pack, _BODY_FRAME.pack
    parts: list[bytes] = []
    pending = 0
    for body in bodies:
        size = len(body)
        parts += (method, head, pack_size(size), tail)
        for start in range(0, size, largest):
            piece = body[start:start + largest]
            parts += (pack_body(3, channel, len(piece)), piece, b"\xce")
        pending += size + 100
        if pending > chunk:
            yield b"".join(parts)
            parts, pending = [], 0
    if parts:
        yield b"".join(parts)
