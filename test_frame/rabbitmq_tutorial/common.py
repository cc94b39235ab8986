"""What the five tutorial programs share: the broker they run on, their names, and waiting for deliveries.

* ``TUTORIAL_BROKER`` (environment): a ``BrokerEnum`` name or number, ``RABBITMQ_PIKA`` by default;
  ``PERSISTQUEUE`` (the embedded default broker) and ``LOCAL_PYTHON_QUEUE`` need no server.
* ``TUTORIAL_NAMESPACE`` (environment, optional): a prefix for every queue and exchange name, so that
  runs sharing one RabbitMQ server (tests, say) never see each other's messages.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from funboost_like import Booster, BrokerEnum


def _broker_from_env() -> BrokerEnum:
    value = os.environ.get("TUTORIAL_BROKER", "RABBITMQ_PIKA").strip()
    try:
        return BrokerEnum(int(value)) if value.isdigit() else BrokerEnum[value.upper()]
    except (KeyError, ValueError):
        raise SystemExit(f"TUTORIAL_BROKER={value!r} is no broker kind; "
                         f"one of {', '.join(kind.name for kind in BrokerEnum)}") from None


BROKER = _broker_from_env()
NAMESPACE = os.environ.get("TUTORIAL_NAMESPACE", "")


def queue(name: str) -> str:
    """The queue name of this tutorial for ``name`` ("hello" -> "tutorial_hello")."""
    return f"{NAMESPACE}tutorial_{name}"


def exchange(name: str) -> str:
    """The exchange named as in RabbitMQ's tutorial ("logs", "direct_logs", "topic_logs")."""
    return f"{NAMESPACE}{name}"


_print_lock = threading.Lock()


def say(text: str) -> None:
    """Print one line; lines printed by consumer threads at the same time never mix."""
    with _print_lock:
        print(text, flush=True)


def bind_now(*functions: Booster[Any, Any]) -> None:
    """Bind each function's queue to its exchange now, as the tutorial's receivers do when they start.

    ``consume()`` binds too, but in the background, when its fetcher thread starts; a publish made
    right after ``consume()`` could reach the exchange before that. Binding twice is harmless.
    """
    for function in functions:
        routing = function.publisher.routing
        assert routing is not None, f"{function!r} has no exchange in its broker_exclusive_config"
        function.broker.bind(function.queue_name, routing.exchange, routing.exchange_type, routing.bind_keys)


class Inbox:
    """What each consumer received, printed as it arrives (one line at a time, from any thread)."""

    def __init__(self, verb: str = "received") -> None:
        self.verb = verb
        self.got: dict[str, list[Any]] = {}
        self._cond = threading.Condition()

    def add(self, who: str, what: Any) -> None:
        with self._cond:
            self.got.setdefault(who, []).append(what)
            say(f" [{who}] {self.verb} {what!r}")
            self._cond.notify_all()

    def wait(self, expected: dict[str, int] | int, timeout: float = 15.0, settle: float = 0.2) -> bool:
        """Wait until each consumer got its ``expected`` number of messages (or, given a number, until
        that many arrived in all), False after ``timeout`` seconds; then ``settle`` seconds more so that
        a message delivered twice would show up too."""

        def arrived() -> bool:
            if isinstance(expected, int):
                return sum(map(len, self.got.values())) >= expected
            return all(len(self.got.get(who, [])) >= n for who, n in expected.items())

        with self._cond:
            done = self._cond.wait_for(arrived, timeout)
        time.sleep(settle)
        return done


def stop(*consumers: Any) -> None:
    """Stop the consumers (boosters or ``get_consumer`` consumers) and wait for their threads to end."""
    for consumer in consumers:
        consumer.stop()
    for consumer in consumers:
        (consumer.consumer if isinstance(consumer, Booster) else consumer).join(10)
