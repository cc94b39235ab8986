"""Slots of an MQTT queue: persistent sessions in one shared subscription, and their retained records.

The layout of :mod:`funboost_like.brokers.mqtt_broker` (which says what it guarantees), per queue ``q``
(escaped by :func:`~funboost_like.brokers.mqtt_client.topic_part`):

* ``<q>`` itself: the topic messages are published to (as in the seed); ``$share/funboost_like/<q>``: the
  shared subscription of every slot;
* slot ``n``: the session of client id ``funboost_like:<q>:<n>`` (``clean_start`` false, session expiry
  ``MQTT_SESSION_EXPIRY_SECONDS``, receive maximum ``MQTT_RECEIVE_MAXIMUM``, manual acks, QoS 1);
* ``funboost_like/slots/<q>/<n>``: its presence record, ``{"state": "live", "at": <time>, "owner": ...}``
  while a process holds it (written again every heartbeat), ``{"state": "parked"}`` otherwise (the
  connection's will writes it when the holder dies);
* ``funboost_like/held/<q>/<n>``: the packet ids its holder is running (read by the next holder).

Both records are retained, with the session's expiry; a ``parked`` record with a little less (the
will's too), so it is gone before the session it speaks for: a queue whose sessions expired has no
presence record left, and the next publish makes slot 0's session again (a record that outlived its
session made publishers think the queue had one, and MQTT drops what nobody subscribed to).
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes

from funboost_like.brokers.mqtt_client import (
    SESSION_TAKEN_OVER,
    Control,
    close,
    connect,
    properties,
    subscribe,
    topic_part,
    user_properties,
)
from funboost_like.brokers.mqtt_records import record_item
from funboost_like.brokers.push_buffer import PushBuffer
from funboost_like.core.config import settings
from funboost_like.core.errors import ConfigurationError

logger = logging.getLogger("funboost_like.mqtt")

ATTEMPTS, CRASHES = "fl-attempts", "fl-crashes"
STALE = 30.0  # a "live" record older than this belongs to nobody (a server restart kept it)
SETTLE = 0.2  # seconds a claim waits for a concurrent claim of the same slot to show in its record
TAKEOVER_CHECK = 1.5  # seconds a slot whose connection dropped looks for another owner before reconnecting
PARKED = json.dumps({"state": "parked"}).encode()
Item = tuple[int, bytes, int, int, bool]  # (packet id, body, attempts before, crashes, crashed: its holder died)
Publish = tuple[str, bytes, bool, Any]  # (topic, payload, retain, properties)
epochs = itertools.count(1)


def parked_margin(session_expiry: float) -> float:
    """How long before its session a ``parked`` record ends: a tenth of the expiry (for short expiries, up
    to half of it and 3 s), at most a minute."""
    return min(60.0, max(session_expiry / 10, min(3.0, session_expiry / 2)))


def anchor_seconds() -> float:
    """How often a publishing process makes sure its queues still have a session: within half the margin
    by which parked records end before their sessions, at least every second, at most every 30 s."""
    return max(1.0, min(30.0, parked_margin(float(settings.get("MQTT_SESSION_EXPIRY_SECONDS"))) / 2))


def parked_seconds(session_expiry: float) -> int:
    """The lifetime of a ``parked`` record (whole seconds, as MQTT counts them)."""
    return max(1, int(session_expiry - parked_margin(session_expiry)))


MAX_NAME_BYTES = 20_000  # escaped (up to 3 bytes a byte) into topics and client ids of at most 65,535 bytes


def check_queue_name(queue: str) -> None:
    """A name that fits a client id (``funboost_like:<queue>:<slot>``, where MQTT forbids NUL) and topics."""
    if "\0" in queue or len(queue.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise ConfigurationError(f"MQTT queue names must hold no NUL and take at most {MAX_NAME_BYTES} UTF-8 bytes "
                                 f"(the name is in the consumers' client ids and in topics), not {queue[:80]!r}")


def queue_topic(queue: str) -> str:
    """The queue's name is its topic (seed 6.18: a web page publishes calls there), escaped to one level."""
    return topic_part(queue)


def shared_filter(queue: str) -> str:
    return f"$share/funboost_like/{queue_topic(queue)}"


def copies(queue: str, items: Sequence[tuple[int, bytes, int, int]]) -> list[Publish]:
    """Publishes of (packet id, body, attempts before, crashes) to ``queue``, the counts in user properties."""
    topic = queue_topic(queue)
    return [(topic, body, False, properties(PacketTypes.PUBLISH,
                                            UserProperty=[(ATTEMPTS, str(attempts)), (CRASHES, str(crashes))]))
            for _, body, attempts, crashes in items]


def take_until_idle(buffer: PushBuffer, lost: list[bool], idle: float) -> Iterator[list[Item]]:
    """Batches of what arrives in ``buffer``, until nothing came for ``idle`` seconds or the session was lost."""
    while not lost:
        items: list[Item] = buffer.take(1000)
        if items:
            yield items
            continue
        buffer.wait(idle)
        if not buffer.items:
            return


class Slot:
    """This process's session of one queue: the client, its buffer and what its predecessor was running."""

    def __init__(self, queue: str, index: int, inherited: set[int]) -> None:
        self.queue, self.index, self.inherited = queue, index, inherited
        self.epoch = next(epochs)  # tokens are (epoch, packet id): packet ids belong to one session
        self.buffer = PushBuffer()
        self.client: paho.Client | None = None
        self.taken_over: list[bool] = []  # appended to when another connection took this client id
        self.copied: set[int] = set()  # crashed packet ids of the fetch under way, copied already
        self.drops: list[bool] = []  # appended to at each lost connection (the server then resends what it sent)
        self.recorded: set[int] = set()  # the packet ids its held record lists
        self.fresh: set[int] = set()  # handed out by the last fetch (until the next maintenance round)
        self.lock = threading.Lock()  # the held record: written by fetches and by maintenance

    @property
    def lost(self) -> bool:
        return bool(self.taken_over)


class Sessions:
    """Opening slot sessions and reading and writing their records, on a process's control connection."""

    def __init__(self, control: Control) -> None:
        self.control = control

    @staticmethod
    def expiry() -> float:
        return float(settings.get("MQTT_SESSION_EXPIRY_SECONDS"))

    def record(self, kind: str, queue: str, index: int, value: Any) -> Publish:
        """The retained ``slots`` or ``held`` record of a slot, living as long as a session (None deletes it)."""
        topic = f"funboost_like/{kind}/{topic_part(queue)}/{index}"
        return record_item(topic, json.dumps(value).encode(), self.expiry()) if value is not None else \
            (topic, b"", True, None)

    def open(self, queue: str, index: int, buffer: PushBuffer, epoch: int, inherited: set[int], lost: list[bool],
             held: Callable[[], Collection[Any]], *, member: bool = False, owner: str = "",
             drops: list[bool] | None = None, receive_maximum: int | None = None) -> tuple[paho.Client, bool]:
        """Connect as slot ``index``: deliveries go to ``buffer`` as :data:`Item`; one the server sends again
        (DUP) is dropped if ``held()`` holds ``(epoch, packet id)`` (its ack will settle it), and counts as
        crashed if its packet id is in ``inherited``. A ``member`` joins the shared subscription again after
        a reconnection to a server that lost the session. ``lost`` gets an entry if another connection
        takes the client id (this one then stops): the server says so (reason 142), or, for an ``owner``
        (Mosquitto 2.0 just closes the socket), the slot's presence record names another owner within
        :data:`TAKEOVER_CHECK` seconds of a dropped connection, before paho reconnects."""
        def on_message(_c: Any, _u: Any, message: paho.MQTTMessage) -> None:
            mid, crashed = message.mid, False
            if message.dup:  # sent again: after our reconnection, or to us as the slot's next holder
                if (epoch, mid) in held():
                    return
                crashed = mid in inherited
            props = user_properties(message)
            buffer.put((mid, bytes(message.payload), int(props.get(ATTEMPTS, 0)), int(props.get(CRASHES, 0)), crashed))

        def on_reconnect(client: paho.Client, present: bool) -> None:
            if member and not present:
                client.subscribe(shared_filter(queue), qos=1)

        will = (f"funboost_like/slots/{topic_part(queue)}/{index}", PARKED, parked_seconds(self.expiry()))
        return connect(self.control.server, f"funboost_like:{queue}:{index}", clean_start=False,
                       session_expiry=self.expiry(),
                       receive_maximum=receive_maximum or int(settings.get("MQTT_RECEIVE_MAXIMUM")),
                       will=will, manual_ack=True, on_message=on_message, on_reconnect=on_reconnect,
                       on_disconnect=self._on_disconnect(queue, index, owner, buffer, lost, drops),
                       reconnect_delay=int(TAKEOVER_CHECK) + 1 if owner else 1)

    def presence(self, queue: str) -> dict[int, bool]:
        """Slot number -> whether a live process holds it, from the retained presence records."""
        now, found = time.time(), {}
        for message in self.control.snapshot(f"funboost_like/slots/{topic_part(queue)}/+"):
            record = json.loads(message.payload)
            found[int(message.topic.rsplit("/", 1)[1])] = record.get("state") == "live" and record["at"] > now - STALE
        return found

    def _on_disconnect(self, queue: str, index: int, owner: str, buffer: PushBuffer, lost: list[bool],
                       drops: list[bool] | None) -> Callable[..., None]:
        """paho's ``on_disconnect`` of a slot's client (see :meth:`open` on takeovers)."""
        def taken(client: paho.Client) -> None:
            if not lost:
                lost.append(True)
                buffer.wake()
                logger.warning("another connection took slot %d of queue %r", index, queue)
                threading.Thread(target=close, args=(client,), daemon=True).start()  # no reconnection war

        def check(client: paho.Client) -> None:
            deadline = time.monotonic() + TAKEOVER_CHECK
            while time.monotonic() < deadline and not lost:
                try:
                    other = self.owner_of(queue, index) not in ("", owner)
                except Exception:  # noqa: BLE001 - the server is away: no takeover to see; paho reconnects
                    return
                if other:
                    taken(client)
                time.sleep(0.1)

        def on_disconnect(client: paho.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
            buffer.clear()  # the server sends them again on reconnection
            if drops is not None:
                drops.append(True)
            if getattr(reason, "value", None) == SESSION_TAKEN_OVER:
                taken(client)
            elif owner and not getattr(flags, "is_disconnect_packet_from_server", True):
                threading.Thread(target=check, args=(client,), daemon=True).start()

        return on_disconnect

    def claim(self, queue: str, avoid: set[int], owner: str) -> tuple[int, dict[int, bool]]:
        """The lowest slot that is neither live nor in ``avoid``, claimed for ``owner`` (and the presence read
        for it): its record is written first and read again :data:`SETTLE` seconds later, and a slot another
        process claimed meanwhile is passed by (processes started together all saw slot 0 free, and took it
        from each other, each takeover sending the messages in flight again)."""
        avoid = set(avoid)
        while True:
            live = self.presence(queue)
            index = next(i for i in itertools.count() if i not in avoid and not live.get(i))
            self.beat(queue, index, owner)
            time.sleep(SETTLE)
            if self.owner_of(queue, index) == owner:
                return index, live
            avoid.add(index)

    def owner_of(self, queue: str, index: int) -> str:
        """The owner a slot's presence record names ("" when none, or parked)."""
        for message in self.control.snapshot(f"funboost_like/slots/{topic_part(queue)}/{index}"):
            return str(json.loads(message.payload).get("owner", ""))
        return ""

    def inherited(self, queue: str, index: int) -> set[int]:
        """The packet ids the last holder of the slot was running (from its ``held`` record)."""
        for message in self.control.snapshot(f"funboost_like/held/{topic_part(queue)}/{index}"):
            return set(json.loads(message.payload))
        return set()

    def beat(self, queue: str, index: int, owner: str) -> None:
        """Mark the slot live (held by ``owner``): claims pass it by."""
        self.control.publish([self.record("slots", queue, index, {"state": "live", "at": time.time(), "owner": owner})])

    def parked(self, queue: str, index: int) -> Publish:
        return (f"funboost_like/slots/{topic_part(queue)}/{index}", PARKED, True,
                properties(PacketTypes.PUBLISH, MessageExpiryInterval=parked_seconds(self.expiry())))

    def park(self, queue: str, index: int) -> None:
        self.control.publish([self.parked(queue, index)])

    def anchor(self, queue: str, where: str) -> None:
        """Make (or keep) slot 0's session, subscribed and parked; receive maximum 1, so what the session
        holds stays for its consumers (one message may come back to them marked DUP)."""
        client, _ = self.open(queue, 0, PushBuffer(), 0, set(), [], tuple, receive_maximum=1)
        try:
            subscribe(client, shared_filter(queue), where)
            self.park(queue, 0)
        finally:
            close(client)

    def drain(self, queue: str, index: int, owner: str, counted: Callable[[int, int], Publish], *, republish: bool,
              idle: float) -> int:
        """Take over parked slot ``index`` and empty its session: re-publish what it holds (a message its last
        holder was running counted as a crash) or drop it; ``counted(sent, taken)`` is the totals record to
        publish with each batch. Slots other than 0 leave the shared subscription first, and their sessions
        and records end. Returns how many messages it held."""
        buffer, lost = PushBuffer(), list[bool]()
        client, _ = self.open(queue, index, buffer, next(epochs), self.inherited(queue, index), lost, tuple)
        end, drained = index != 0, 0
        try:
            self.beat(queue, index, owner)  # a claim passes it by meanwhile
            if end:
                client.unsubscribe(shared_filter(queue))
            for items in take_until_idle(buffer, lost, idle):
                again = copies(queue, [(mid, body, attempts + dead, crashes + dead)
                                       for mid, body, attempts, crashes, dead in items]) if republish else []
                self.control.publish([*again, counted(len(again), len(items))])
                for mid, *_ in items:
                    client.ack(mid, 1)
                drained += len(items)
        finally:
            close(client, end_session=end and not lost)
        if not lost:
            presence = self.record("slots", queue, index, None) if end else self.parked(queue, index)
            self.control.publish([self.record("held", queue, index, None), presence])
        if drained:
            logger.info("%s %d message(s) of parked slot %d of queue %r", "re-published" if republish else "purged",
                        drained, index, queue)
        return drained
