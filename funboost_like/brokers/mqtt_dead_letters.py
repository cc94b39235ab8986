"""Dead letters of the MQTT broker, and the listing of its delayed records: retained messages.

A dead letter of queue ``q`` is the retained message of the topic ``funboost_like/dlq/<q>/<id>``
whose payload is the letter's JSON envelope; the :class:`DeadLetter` read back has that topic as its
``ref``. Delayed messages are the retained records ``funboost_like/delayed/<q>/<id>`` of
:mod:`.mqtt_delays`. Reading takes a snapshot of one kind's records
(:meth:`~funboost_like.brokers.mqtt_client.Control.snapshot`); deleting publishes empty retained
messages. Client errors are raised as they come: the broker translates them.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import TYPE_CHECKING

import paho.mqtt.client as paho

from funboost_like.brokers.dead_letters import DeadLetter
from funboost_like.brokers.mqtt_client import topic_part, user_properties
from funboost_like.brokers.mqtt_delays import DUE
from funboost_like.brokers.mqtt_sessions import Publish

if TYPE_CHECKING:
    from funboost_like.brokers.mqtt_client import Control


def records(control: Control, queue: str, kind: str) -> list[paho.MQTTMessage]:
    """The retained records of ``queue`` of one kind (``dlq``, ``delayed``, ``counts``)."""
    return control.snapshot(f"funboost_like/{kind}/{topic_part(queue)}/+")


def keep(control: Control, queue: str, letter: DeadLetter) -> None:
    """Store ``letter`` as a new retained message (returns once the server acknowledged it)."""
    topic = f"funboost_like/dlq/{topic_part(queue)}/{uuid.uuid4().hex}"
    control.publish([(topic, letter.envelope(), True, None)])


def newest_letters(queue: str, found: list[paho.MQTTMessage], limit: int) -> list[DeadLetter]:
    """The ``limit`` most recent letters among the ``dlq`` records ``found``, newest first."""
    letters = [dataclasses.replace(DeadLetter.from_envelope(queue, bytes(m.payload)), ref=m.topic) for m in found]
    return sorted(letters, key=lambda letter: letter.failed_at, reverse=True)[:limit]


def soonest_delayed(found: list[paho.MQTTMessage], limit: int) -> list[tuple[float, bytes]]:
    """(due time, body) of the first ``limit`` of the ``delayed`` records ``found``, soonest first."""
    entries = [(float(user_properties(m).get(DUE, 0)), bytes(m.payload)) for m in found]
    return sorted(entries, key=lambda entry: entry[0])[:limit]


def deletions(found: list[paho.MQTTMessage]) -> list[Publish]:
    """The publishes deleting the retained records ``found``."""
    return [(m.topic, b"", True, None) for m in found]


def remove(control: Control, topic: str) -> bool:
    """Delete the retained record of ``topic``; False when there is none."""
    if not control.snapshot(topic):
        return False
    control.publish([(topic, b"", True, None)])
    return True
