"""Key-value records (RPC results, task filters) and dead letters of the MQTT broker: retained messages.

A record of (queue, namespace, key) is the retained message of the topic
``funboost_like/kv/<queue>/<namespace>/<key>`` (each part escaped by
:func:`~funboost_like.brokers.mqtt_client.topic_part`); its value is the payload, its expiry the user
property ``fl-expires`` (UNIX seconds; readers ignore an expired record at once) and the MQTT 5
message expiry interval (the TTL rounded up, plus one second: the server then forgets it). Deleting publishes an empty
retained message. So **an RPC result is published to the topic**
``funboost_like/kv/<queue>/results/<task_id>``: a browser (MQTT over WebSocket) or any program that
subscribes to it receives the call's result record as JSON when the call ends, or at once if it
subscribes later, until the record expires (``RPC_RESULT_EXPIRE_SECONDS``).

:meth:`MqttRecords.wait` subscribes to the record's topic and returns when it arrives (no polling).

Limit, stated: MQTT has no compare-and-set, so :meth:`MqttRecords.add_if_absent` is atomic between
the threads of one process only; two processes adding the same key at the same moment may both get
``True`` (task filtering across processes can then let a duplicate call run).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.subscribeoptions import SubscribeOptions

from funboost_like.brokers.mqtt_client import close, connect, properties, topic_part, user_properties
from funboost_like.core.stores import KeyValueStore, check_namespace, check_ttl

if TYPE_CHECKING:
    from funboost_like.brokers.mqtt_client import Control

EXPIRES = "fl-expires"


def live_value(message: paho.MQTTMessage, now: float) -> bytes | None:
    """The payload of a retained record, or None when it is a deletion or has expired."""
    if not message.payload:
        return None
    expires = user_properties(message).get(EXPIRES)
    if expires is not None and float(expires) <= now:
        return None
    return bytes(message.payload)


def record_item(topic: str, value: bytes, ttl: float | None) -> tuple[str, bytes, bool, Any]:
    """The retained publish that sets ``topic`` to ``value`` for ``ttl`` seconds (None: no expiry)."""
    if ttl is None:
        return topic, value, True, None
    # Mosquitto counts the expiry interval in whole seconds of its clock, so a message of interval n may go
    # at any time in its n-th second: one more second, and readers go by the exact fl-expires.
    props = properties(PacketTypes.PUBLISH, MessageExpiryInterval=math.ceil(ttl) + 1,
                       UserProperty=[(EXPIRES, repr(time.time() + ttl))])
    return topic, value, True, props


class MqttRecords(KeyValueStore):
    """The records of one (queue, namespace) as retained messages (see the module docstring)."""

    def __init__(self, control: Control, queue: str, namespace: str) -> None:
        self._control = control
        self.prefix = f"funboost_like/kv/{topic_part(queue)}/{check_namespace(namespace)}/"
        self._adding = threading.Lock()

    def topic(self, key: str) -> str:
        return self.prefix + topic_part(key)

    def put(self, key: str, value: bytes, ttl: float | None) -> None:
        self._control.publish([record_item(self.topic(key), bytes(value), check_ttl(ttl))])

    def get(self, key: str) -> bytes | None:
        now = time.time()
        for message in self._control.snapshot(self.topic(key)):
            return live_value(message, now)
        return None

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        wanted = {self.topic(key): key for key in keys}
        if len(wanted) <= 1:
            return super().get_many(keys)
        now, found = time.time(), {}
        for message in self._control.snapshot(self.prefix + "+"):
            key, value = wanted.get(message.topic), live_value(message, now)
            if key is not None and value is not None:
                found[key] = value
        return found

    def wait(self, key: str, timeout: float | None) -> bytes | None:
        """Subscribe to the record's topic on a connection of its own; return its value when it arrives."""
        arrived, got = threading.Event(), []

        def on_message(_c: Any, _u: Any, message: paho.MQTTMessage) -> None:
            value = live_value(message, time.time())
            if value is not None:
                got.append(value)
                arrived.set()

        client, _ = connect(self._control.server, "", clean_start=True, on_message=on_message)
        try:
            client.subscribe(self.topic(key), options=SubscribeOptions(qos=1))
            arrived.wait(timeout)
        finally:
            close(client)
        return got[0] if got else None

    def add_if_absent(self, key: str, value: bytes, ttl: float | None) -> bool:
        ttl = check_ttl(ttl)
        with self._adding:
            if self.get(key) is not None:
                return False
            self.put(key, value, ttl)
            return True

    def delete(self, key: str) -> None:
        self._control.publish([(self.topic(key), b"", True, None)])
