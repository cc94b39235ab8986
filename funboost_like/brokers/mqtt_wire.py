"""Publishing queue messages on MQTT 5's wire, on a blocking socket per publishing thread.

paho-mqtt sends every packet through its network thread, and its Python per-message work bounds a
process at a few thousand QoS 1 publishes a second. A push or ``publish_many`` of plain queue messages
(no properties, not retained) goes here instead: one connection per publishing thread (``CONNECT``
with a clean start, no session, keepalive off), the ``PUBLISH`` packets written in windows of the
server's receive maximum, and each window's ``PUBACK`` read back before the call returns, so a publish
still returns once the server acknowledged every message (QoS 1). A reason code of 0x80 or more
raises :class:`~funboost_like.brokers.mqtt_client.MqttRefused`; a broken connection is opened again
and the unacknowledged messages sent once more (at least once), else it raises
:class:`~funboost_like.brokers.mqtt_client.MqttUnreachable`. TLS servers (``mqtts://``) are left to paho
(:meth:`WirePublishers.publish` returns False). A lone message's PUBACK is polled for a moment before the
blocking read (:mod:`.socket_spin`) while that measures faster (``PollChoice``), unless another thread
of the process published through this broker in the last ``socket_spin.SHARED_QUIET_SECONDS``.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Sequence

from funboost_like.brokers.mqtt_client import TIMEOUT, MqttRefused, MqttUnreachable, Server
from funboost_like.brokers.per_thread import PerThread
from funboost_like.brokers.socket_spin import PollChoice, Sharing, reply_poller, spin

_CONNECT, _CONNACK, _PUBACK, _DISCONNECT = 0x10, 0x20, 0x40, 0xE0
_PUBLISH_QOS1 = 0x32
_RECEIVE_MAXIMUM, _USER_PROPERTY = 0x21, 0x26  # property identifiers, and the sizes of the others
_FIXED = {0x11: 4, 0x13: 2, 0x22: 2, 0x24: 1, 0x25: 1, 0x27: 4, 0x28: 1, 0x29: 1, 0x2A: 1}
_STRINGS = {0x12, 0x15, 0x16, 0x1A, 0x1C, 0x1F}
SPIN_SECONDS = 0.0003  # how long a lone push polls for its PUBACK before blocking


def _read_varint(data: bytes | bytearray, at: int) -> tuple[int, int]:
    """A variable byte integer at ``at``: (value, index after it); IndexError when incomplete."""
    value, shift = 0, 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not byte & 0x80 or shift > 21:
            return value, at


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(value: bytes) -> bytes:
    return struct.pack(">H", len(value)) + value


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _varint(len(body)) + body


class _Connection:
    """One thread's publishing connection."""

    def __init__(self, server: Server) -> None:
        self.sock = socket.create_connection((server.host, server.port), timeout=TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()
        self.pos = 0
        self.next_id = 0
        flags = 0x02 | (0x80 if server.username is not None else 0) | (0x40 if server.password is not None else 0)
        payload = _string(b"") + (_string(server.username.encode()) if server.username is not None else b"") \
            + (_string(server.password.encode()) if server.password is not None else b"")
        self.sock.sendall(_packet(_CONNECT, _string(b"MQTT") + bytes((5, flags)) + b"\x00\x00" + b"\x00" + payload))
        kind, body = self._read_packet()
        if kind != _CONNACK or len(body) < 2 or body[1] >= 0x80:
            raise MqttRefused(f"{server.shown} refused the publishing connection (reason {body[1:2].hex() or '?'})")
        self.window = self._receive_maximum(body)
        self._ready = reply_poller(self.sock)

    @staticmethod
    def _receive_maximum(body: bytes) -> int:
        """The server's receive maximum from the CONNACK properties (65535 when absent)."""
        length, at = _read_varint(body, 2)
        props, i = body[at:at + length], 0
        while i < len(props):
            ident, i = props[i], i + 1
            if ident == _RECEIVE_MAXIMUM:
                return int(struct.unpack_from(">H", props, i)[0])
            if ident in _FIXED:
                i += _FIXED[ident]
            elif ident in _STRINGS:
                i += 2 + struct.unpack_from(">H", props, i)[0]
            elif ident == _USER_PROPERTY:
                i += 2 + struct.unpack_from(">H", props, i)[0]
                i += 2 + struct.unpack_from(">H", props, i)[0]
            else:
                break
        return 65535

    def _read_packet(self) -> tuple[int, bytes]:
        """The next packet's type (high nibble) and body."""
        while True:
            buffer, pos = self.buffer, self.pos
            if len(buffer) - pos >= 2:
                try:
                    length, at = _read_varint(buffer, pos + 1)
                except IndexError:  # the length is not all there yet
                    length, at = -1, 0
                if length >= 0 and len(buffer) >= at + length:
                    self.pos = at + length
                    return buffer[pos] & 0xF0, bytes(buffer[at:at + length])
            if pos > 65536:
                del buffer[:pos]
                self.pos = 0
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            buffer += chunk

    def publish(self, topic: str, bodies: Sequence[bytes], choice: PollChoice | None = None) -> None:
        """PUBLISH each body at QoS 1 and read every PUBACK (at most ``window`` in flight); ``choice``:
        given when no other thread publishes now; it says whether a lone message's PUBACK is polled for,
        and is told how long that PUBACK took."""
        head = _string(topic.encode())
        window, sent, acked = self.window, 0, 0
        ready = self._ready if len(bodies) == 1 else None
        if ready is None:
            choice = None
        started = time.perf_counter()
        while acked < len(bodies):
            packets = []
            while sent < len(bodies) and sent - acked < window:
                self.next_id = self.next_id % 65535 + 1
                packets.append(_packet(_PUBLISH_QOS1, head + struct.pack(">H", self.next_id) + b"\x00" + bodies[sent]))
                sent += 1
            if packets:
                self.sock.sendall(b"".join(packets))
            if choice is not None and ready is not None and self.pos == len(self.buffer) and choice.polls():
                spin(ready, SPIN_SECONDS)
            while True:  # every acknowledgement already here, at least one
                kind, body = self._read_packet()
                if kind == _PUBACK:
                    if len(body) > 2 and body[2] >= 0x80:
                        raise MqttRefused(f"the server refused a message to {topic!r} (reason 0x{body[2]:02x})")
                    acked += 1
                elif kind == _DISCONNECT:
                    raise ConnectionError(f"the server disconnected (reason 0x{body[0]:02x})" if body else
                                          "the server disconnected")
                if acked == sent or len(self.buffer) - self.pos < 4:
                    break
        if choice is not None:
            choice.took(time.perf_counter() - started)

    def close(self) -> None:
        try:
            self.sock.sendall(_packet(_DISCONNECT, b""))
        except OSError:
            pass
        self.sock.close()


class WirePublishers:
    """The publishing connections of one broker instance, one per thread."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._local = threading.local()
        self._all: PerThread[_Connection] = PerThread(_Connection.close)  # every thread's, for closing
        self._busy: set[_Connection] = set()  # publishing now (set.add and discard hold the GIL)
        self.sharing = Sharing()  # whether a publish is alone: no other thread publishes
        self.poll_choice = PollChoice()  # whether a lone publish polls for its PUBACK (measured in turns)

    def publish(self, topic: str, bodies: Sequence[bytes]) -> bool:
        """Publish ``bodies`` to ``topic`` at QoS 1; False when this server is left to paho (TLS)."""
        if self.server.tls:
            return False
        for attempt in (1, 2):
            connection: _Connection | None = getattr(self._local, "connection", None)
            try:
                if connection is None:
                    connection = self._local.connection = _Connection(self.server)
                    self._all.add(connection)
                self._busy.add(connection)
                try:
                    alone = self.sharing.alone(len(self._busy))
                    connection.publish(topic, bodies, self.poll_choice if alone else None)
                finally:
                    self._busy.discard(connection)
                return True
            except (OSError, ConnectionError) as exc:
                self._local.connection = None
                if connection is not None:
                    self._all.forget(connection)
                    connection.sock.close()
                if attempt == 2:
                    raise MqttUnreachable(f"publishing to {self.server.shown} failed: {exc}") from exc
        return True

    def close(self) -> None:
        self._all.close_all(self._all.take_all())
