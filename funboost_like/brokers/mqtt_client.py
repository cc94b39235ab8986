"""paho-mqtt 2 (MQTT 5) connections for the MQTT broker: URLs, topic names, a control connection.

* :func:`connect` opens one MQTT 5 connection with paho's network thread running, and returns once
  the server accepted it (``CONNACK``), or raises :class:`MqttUnreachable`. Its password comes
  from the URL (``mqtt://user:password@host:port``; ``mqtts://`` for TLS) and never reaches a log:
  errors name the server through :func:`funboost_like.core.config.redact_url`.
* :class:`Control` is a process's connection for everything but consuming: publishing at QoS 1
  (a publish returns once the server acknowledged it, ``PUBACK``), and reading the retained
  messages under a topic filter (:meth:`Control.snapshot`: subscribe, then a marker message to a
  topic of this connection alone; the server sends a subscription's retained messages before it
  routes a later publish of the same connection, so everything before the marker is the snapshot).
* :func:`topic_part` makes any string one topic level (``/``, ``+``, ``#`` and other characters
  outside ``[A-Za-z0-9_.~-]`` are %-escaped), so queue names and record keys never act as wildcards.
"""

from __future__ import annotations

import itertools
import logging
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from funboost_like.core.config import redact_url
from funboost_like.core.errors import ConfigurationError

logger = logging.getLogger("funboost_like.mqtt")

DROPPED = "$SYS/broker/publish/messages/dropped"  # Mosquitto's total of the messages it dropped (full queues)
TIMEOUT = 10.0  # seconds to wait for the server's answer (CONNACK, PUBACK, SUBACK, a snapshot's marker)
SESSION_TAKEN_OVER = 142  # DISCONNECT reason: another connection took this client id


class MqttUnreachable(ConnectionError):
    """The server refused or did not answer (a connection error: the base retries what it settles)."""


class MqttRefused(Exception):  # noqa: N818 - a refusal, named like the clients' own errors
    """The server answered with an error reason code."""


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool
    shown: str  # the URL without its password, for messages


def parse_url(url: str) -> Server:
    """``mqtt://[user[:password]@]host[:port]`` (port 1883) or ``mqtts://...`` (TLS, port 8883)."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ConfigurationError(f"MQTT_URL must start with mqtt:// or mqtts://, got {redact_url(url)!r}")
    tls = parts.scheme in ("mqtts", "ssl")
    return Server(parts.hostname or "127.0.0.1", parts.port or (8883 if tls else 1883),
                  unquote(parts.username) if parts.username else None,
                  unquote(parts.password) if parts.password is not None else None, tls, redact_url(url))


def topic_part(name: str) -> str:
    """``name`` as one topic level, with no wildcard or separator in it (reversible with ``unquote``)."""
    return quote(name, safe="-_.~") or "%00"


def properties(packet: int, **values: Any) -> Properties:
    props = Properties(packet)
    for name, value in values.items():
        setattr(props, name, value)
    return props


def user_properties(message: paho.MQTTMessage) -> dict[str, str]:
    props = getattr(message, "properties", None)
    return dict(getattr(props, "UserProperty", None) or ()) if props is not None else {}


def connect(server: Server, client_id: str, *, clean_start: bool, session_expiry: float = 0.0,
            receive_maximum: int = 65535, will: tuple[str, bytes, int] | None = None, manual_ack: bool = False,
            on_message: Any = None, on_disconnect: Any = None,
            on_reconnect: Callable[[paho.Client, bool], None] | None = None,
            reconnect_delay: int = 1) -> tuple[paho.Client, bool]:
    """A connected client with its network thread running, and whether the server had its session.

    ``will``: (topic, payload, expiry in seconds) the server publishes, retained, if the connection dies
    uncleanly.
    paho reconnects by itself after a lost connection; ``on_reconnect(client, session_present)`` then
    runs on its network thread (subscribe again what a session without state lost).
    """
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5,
                         manual_ack=manual_ack)
    if server.username is not None:
        client.username_pw_set(server.username, server.password)
    if server.tls:
        client.tls_set_context(ssl.create_default_context())
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True,
                        properties=properties(PacketTypes.WILLMESSAGE, MessageExpiryInterval=will[2]))
    client.max_inflight_messages_set(1000)
    client.reconnect_delay_set(reconnect_delay, max(5, reconnect_delay))
    answered = threading.Event()
    outcome: dict[str, Any] = {}

    def on_connect(_c: Any, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        present = bool(getattr(flags, "session_present", False))
        if not answered.is_set():
            outcome.update(reason=reason, present=present)
            answered.set()
        elif on_reconnect is not None and not getattr(reason, "is_failure", False):
            on_reconnect(_c, present)

    client.on_connect = on_connect
    client.on_message = on_message
    client.on_disconnect = on_disconnect
    props = properties(PacketTypes.CONNECT, SessionExpiryInterval=int(session_expiry),
                       ReceiveMaximum=max(1, min(65535, int(receive_maximum))))
    try:
        client.connect(server.host, server.port, keepalive=30, clean_start=clean_start, properties=props)
    except OSError as exc:
        raise MqttUnreachable(f"cannot connect to {server.shown}: {exc}") from exc
    client.loop_start()
    if not answered.wait(TIMEOUT):
        _stop(client)
        raise MqttUnreachable(f"{server.shown} did not answer the connection of {client_id!r}")
    reason = outcome["reason"]
    if getattr(reason, "is_failure", False):
        _stop(client)
        raise MqttRefused(f"{server.shown} refused the connection of {client_id!r}: {reason}")
    return client, outcome["present"]


def _stop(client: paho.Client) -> None:
    try:
        client.disconnect()
    finally:
        client.loop_stop()


def close(client: paho.Client, *, end_session: bool = False) -> None:
    """Disconnect cleanly (no will); ``end_session``: the server forgets the session and its messages."""
    try:
        if end_session:
            client.disconnect(properties=properties(PacketTypes.DISCONNECT, SessionExpiryInterval=0))
        else:
            client.disconnect()
    finally:
        client.loop_stop()


def subscribe(client: paho.Client, pattern: str, shown: str) -> None:
    """Subscribe at QoS 1 and wait for the server's SUBACK (one subscription at a time per client)."""
    done = threading.Event()
    client.on_subscribe = lambda *_args: done.set()
    client.subscribe(pattern, options=SubscribeOptions(qos=1))
    if not done.wait(TIMEOUT):
        raise MqttUnreachable(f"{shown} did not answer the subscription to {pattern!r}")


def wait_published(infos: Sequence[paho.MQTTMessageInfo], shown: str) -> None:
    """Wait for the server's acknowledgement of each publish; raise if one is missing."""
    deadline = time.monotonic() + TIMEOUT
    for info in infos:
        if info.rc != paho.MQTT_ERR_SUCCESS and info.rc != paho.MQTT_ERR_QUEUE_SIZE:
            raise MqttUnreachable(f"publishing to {shown} failed: {paho.error_string(info.rc)}")
        info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        if not info.is_published():
            raise MqttUnreachable(f"{shown} did not acknowledge a publish within {TIMEOUT:.0f} s")


class Control:
    """A process's connection for publishing and reading retained messages (see the module docstring)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._id = f"funboost_like-ctl-{uuid.uuid4().hex[:16]}"
        self._marker_topic = f"funboost_like/ctl/{self._id}"
        self._collecting: dict[str, tuple[str, list[paho.MQTTMessage], threading.Event]] = {}
        self._numbers = itertools.count()
        self._snap_lock = threading.Lock()
        self._watches: dict[str, Callable[[paho.MQTTMessage], None]] = {}
        self.client, _ = connect(server, self._id, clean_start=True, on_message=self._on_message,
                                 on_reconnect=self._subscribe_again)
        subscribe(self.client, self._marker_topic + "/#", server.shown)
        self.watch(DROPPED, DropWatch(server.shown))

    def _subscribe_again(self, client: paho.Client, _present: bool) -> None:
        for pattern in [self._marker_topic + "/#", *self._watches]:
            client.subscribe(pattern, options=SubscribeOptions(qos=1))

    def watch(self, pattern: str, callback: Callable[[paho.MQTTMessage], None]) -> None:
        """Call ``callback(message)`` on the network thread for every message under ``pattern`` from now on,
        its retained messages first (again whenever :meth:`snapshot` reads the same pattern)."""
        with self._snap_lock:
            if pattern not in self._watches:
                self._watches[pattern] = callback
                subscribe(self.client, pattern, self.server.shown)

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        topic = message.topic
        if topic.startswith(self._marker_topic):
            entry = self._collecting.get(topic)
            if entry is not None:
                entry[2].set()
            return
        for pattern, callback in list(self._watches.items()):
            if paho.topic_matches_sub(pattern, topic):
                callback(message)
        for pattern, found, done in list(self._collecting.values()):
            if not done.is_set() and paho.topic_matches_sub(pattern, topic):
                found.append(message)

    def publish(self, items: Sequence[tuple[str, bytes, bool, Properties | None]]) -> None:
        """Publish (topic, payload, retain, properties) at QoS 1 and wait for every acknowledgement."""
        publish = self.client.publish
        wait_published([publish(topic, payload, qos=1, retain=retain, properties=props)
                        for topic, payload, retain, props in items], self.server.shown)

    def snapshot(self, pattern: str) -> list[paho.MQTTMessage]:
        """The retained messages under ``pattern`` now: one round trip. The server handles a connection's
        packets in order, so it queues the subscription's retained messages before it routes the marker
        published right after, and removes the subscription only after that."""
        with self._snap_lock:
            marker = f"{self._marker_topic}/{next(self._numbers)}"
            found: list[paho.MQTTMessage] = []
            done = threading.Event()
            self._collecting[marker] = (pattern, found, done)
            try:
                self.client.subscribe(pattern, options=SubscribeOptions(qos=1))
                self.client.publish(marker, b"", qos=1)
                if pattern not in self._watches:
                    self.client.unsubscribe(pattern)
                if not done.wait(TIMEOUT):
                    raise MqttUnreachable(f"{self.server.shown} did not answer a read of {pattern!r}")
            finally:
                del self._collecting[marker]
            latest = {m.topic: m for m in found if m.retain}  # one per topic (overlapping subscriptions)
            return [m for m in latest.values() if m.payload]

    def close(self) -> None:
        close(self.client)


class DropWatch:
    """Logs the messages the server says it dropped: Mosquitto acknowledges a publish to a session whose
    queue is full (``max_queued_messages``, 1000 by default) and then drops it, telling nobody but its
    ``$SYS`` total, which it publishes every ``sys_interval`` (10 s by default). A server without that
    topic never calls this."""

    def __init__(self, shown: str) -> None:
        self.shown = shown
        self.seen: int | None = None

    def __call__(self, message: paho.MQTTMessage) -> None:
        try:
            total = int(message.payload)
        except ValueError:
            return
        seen, self.seen = self.seen, total
        advice = "set max_queued_messages 0 in mosquitto.conf (docs/mqtt.md, The server)"
        if seen is None and total > 0:
            logger.warning("%s has dropped %d messages since it started, because a session's queue was full "
                           "(its publishers were told they were delivered): %s", self.shown, total, advice)
        elif seen is not None and total > seen:
            logger.error("%s dropped %d messages just now (%d since it started) because a session's queue was "
                         "full: they are LOST, though their publishers were told they were delivered; %s",
                         self.shown, total - seen, total, advice)
